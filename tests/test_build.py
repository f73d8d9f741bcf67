"""The extension builder: cache, readable failures, concurrent builds, CPU flags.

These use a throwaway source tree with torch-free C++ so each compile takes about a second;
the real extensions are exercised by the op tests.
"""

import ctypes
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastlm import _build

GOOD = 'extern "C" int fastlm_test_answer() { return 42; }\n'


class TinyBuilder(_build.ExtensionBuilder):
    def __init__(self, root: Path):
        super().__init__(
            name="tiny", prebuilt_module="fastlm._C_tiny_absent", library_namespace="fastlm_tiny",
            source_globs=("cpu/*.cpp",), root=root,
        )

    def incompatible_reason(self):
        return None

    def cflags(self):
        return ["-O1"]


def _tree(tmp_path: Path, source: str) -> Path:
    (tmp_path / "src" / "cpu").mkdir(parents=True)
    (tmp_path / "src" / "cpu" / "answer.cpp").write_text(source)
    return tmp_path / "src"


def _answer(builder: TinyBuilder) -> int:
    (so,) = builder.build_dir().glob("*.so")
    lib = ctypes.CDLL(str(so))
    return lib.fastlm_test_answer()


def test_build_then_cache_hit(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    root = _tree(tmp_path, GOOD)
    b = TinyBuilder(root)
    b.load()
    assert _answer(b) == 42
    (so,) = b.build_dir().glob("*.so")
    mtime = so.stat().st_mtime_ns
    # a fresh builder (as in a new process) finds the cached build and does not recompile
    b2 = TinyBuilder(root)
    b2.load()
    assert so.stat().st_mtime_ns == mtime
    assert "JIT-built" in b2.how_loaded()


def test_cache_key_changes_with_source_and_flags(tmp_path, monkeypatch):
    root = _tree(tmp_path, GOOD)
    key = TinyBuilder(root).cache_key()
    (root / "cpu" / "answer.cpp").write_text(GOOD.replace("42", "43"))
    assert TinyBuilder(root).cache_key() != key
    (root / "cpu" / "extra.h").write_text("// a header change must rebuild too\n")
    key2 = TinyBuilder(root).cache_key()
    (root / "cpu" / "extra.h").write_text("// changed\n")
    assert TinyBuilder(root).cache_key() != key2


def test_failure_message_is_readable_and_remembered(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTLM_CACHE_DIR", str(tmp_path / "cache"))
    bad = '#include "no_such_header.h"\nint broken( { return 1; }\n'
    b = TinyBuilder(_tree(tmp_path, bad))
    with pytest.raises(_build.ExtensionBuildError) as info:
        b.load()
    msg = str(info.value)
    assert "building fastlm extension 'tiny' failed" in msg
    assert "missing header(s): no_such_header.h" in msg
    assert "no_such_header.h" in msg.split("last compiler output:")[1]
    assert "FASTLM_BACKEND=torch" in msg
    # the second call reports the same error without compiling again
    with pytest.raises(_build.ExtensionBuildError) as again:
        b.load()
    assert again.value is info.value


def test_concurrent_builds_from_two_processes(tmp_path):
    root = _tree(tmp_path, GOOD)
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_build import TinyBuilder, _answer
        from pathlib import Path
        b = TinyBuilder(Path({str(root)!r}))
        b.load()
        print(_answer(b))
    """)
    env = {"FASTLM_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin:/usr/local/bin"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert out.strip() == "42"
    assert len(list((tmp_path / "cache").glob("tiny-*/*.so"))) == 1


def test_cpu_flags_follow_features(monkeypatch):
    monkeypatch.delenv("FASTLM_CPU_FLAGS", raising=False)
    assert _build.cpu_simd_flags(frozenset()) == []
    avx2 = _build.cpu_simd_flags(frozenset({"avx2", "fma", "f16c"}))
    assert avx2 == ["-mavx2", "-mfma", "-mf16c"]
    full = frozenset({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                      "avx512_bf16"})
    assert "-mavx512bf16" in _build.cpu_simd_flags(full)
    # bf16 instructions without AVX-512F would not compile: not enabled
    assert "-mavx512bf16" not in _build.cpu_simd_flags(frozenset({"avx512_bf16"}))
    amx = {"amx_tile", "amx_bf16"}
    assert _build.cpu_simd_flags(full | amx)[-2:] == ["-mamx-tile", "-mamx-bf16"]
    assert "-mamx-tile" not in _build.cpu_simd_flags(full)
    # the tile path lives in the AVX-512 BF16 kernels: not without them
    assert "-mamx-tile" not in _build.cpu_simd_flags(full - {"avx512_bf16"} | amx)
    monkeypatch.setenv("FASTLM_CPU_FLAGS", "-mavx2")
    assert _build.cpu_simd_flags() == ["-mavx2"]


def test_cuda_extension_explains_why_it_cannot_build_on_cpu_torch():
    import torch

    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    reason = _build.BUILDERS["cuda"].incompatible_reason()
    assert "CPU-only build" in reason


def test_unknown_extension_name():
    with pytest.raises(ValueError, match="unknown extension 'gpu'"):
        _build.load_extension("gpu")
