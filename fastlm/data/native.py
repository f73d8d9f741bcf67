"""fastlm's text kernels (``csrc/text``): byte-level BPE encoding and document cleaning in C++.

A plain shared library with a C ABI, loaded with ctypes: data preparation never imports torch
(3-4 s of startup) and the library has nothing to do with tensors. It is compiled on first use
with the system C++ compiler and cached like the op extensions (``$FASTLM_CACHE_DIR``, a folder
named by a hash of sources, flags and compiler). Where it cannot be built, callers fall back to
the Python/`tokenizers` path with one warning (:func:`load` returns None).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from fastlm._build import cache_root, cpu_simd_flags, csrc_dir, cxx_compiler


def _flags() -> list[str]:
    # the op extension's per-machine SIMD flags (MinHash's 64-bit multiply-min vectorises)
    return ["-O3", "-std=c++20", "-shared", "-fPIC", "-pthread", *cpu_simd_flags()]


def sources() -> list[Path]:
    return sorted((csrc_dir() / "text").glob("*.cpp"))


def _key() -> str:
    from fastlm._build import _tool_version

    h = hashlib.sha256()
    root = csrc_dir() / "text"
    for p in sorted(root.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for part in [_tool_version(cxx_compiler()), sys.platform, *_flags()]:
        h.update(part.encode())
    return h.hexdigest()[:16]


def library_path() -> Path:
    return cache_root() / f"text-{_key()}" / "libfastlm_text.so"


def _build(path: Path) -> None:
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path.parent) + ".lock", timeout=600):
        if path.exists():  # another process built it while this one waited
            return
        if shutil.which(cxx_compiler()) is None:
            raise OSError(f"no C++ compiler found (looked for '{cxx_compiler()}'; set CXX or "
                          f"install g++)")
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            cmd = [cxx_compiler(), *_flags(), f"-I{csrc_dir()}", *map(str, sources()), "-o", tmp]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:
                raise OSError(f"compiling fastlm's text kernels failed:\n  {' '.join(cmd)}\n"
                              + run.stderr[-3000:])
            from fastlm._fs import shareable

            shareable(tmp)  # mkstemp's 0600 (the linker adds x: 0711, unreadable to others)
            os.replace(tmp, path)  # a half-written library is never loaded
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The text library, built on first use; None (and one warning) if it cannot be built or
    ``FASTLM_TEXT_NATIVE=0`` turns it off."""
    if os.environ.get("FASTLM_TEXT_NATIVE", "1") == "0":
        return None
    path = library_path()
    try:
        if not path.exists():
            _build(path)
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        warnings.warn(f"fastlm's C++ text kernels are unavailable ({exc}); `fastlm prepare` "
                      f"falls back to its Python cleaning and the tokenizers library, which are "
                      f"several times slower", RuntimeWarning, stacklevel=2)
        return None
    _declare(lib)
    return lib


def ptr(a):
    """A numpy array's data as a void pointer for the library's C functions."""
    return a.ctypes.data_as(ctypes.c_void_p)


def pack(blobs: list[bytes]):
    """Documents as one uint8 buffer (never empty: C receives a valid pointer) and their
    (n + 1,) int64 start offsets, the layout every text kernel reads."""
    import numpy as np

    offsets = np.zeros(len(blobs) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs)), out=offsets[1:])
    return np.frombuffer(b"".join(blobs) or b"\0", dtype=np.uint8), offsets


def _declare(lib: ctypes.CDLL) -> None:
    P, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32
    lib.fastlm_bpe_new.restype = P
    lib.fastlm_bpe_new.argtypes = [P, P, P, P, i64, P]
    lib.fastlm_bpe_free.restype = None
    lib.fastlm_bpe_free.argtypes = [P]
    lib.fastlm_bpe_encode.restype = i64
    lib.fastlm_bpe_encode.argtypes = [P, P, P, i64, i32, P, P, P]
    lib.fastlm_clean_normalize.restype = i64
    lib.fastlm_clean_normalize.argtypes = [P, P, i64, i32, i32, P, P]
    lib.fastlm_clean_filter.restype = None
    lib.fastlm_clean_filter.argtypes = [P, P, i64, P, P, P]
    lib.fastlm_pretokenize.restype = i64
    lib.fastlm_pretokenize.argtypes = [P, P, i64, P]
