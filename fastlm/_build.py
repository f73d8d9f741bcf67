"""Builders for fastlm's C++/CUDA extensions: prebuilt if installed, else JIT-compiled and cached.

Two extensions, one small builder each:

- ``cpu``: every ``csrc/cpu/*.cpp`` plus ``csrc/bindings/cpu_*.cpp`` -> ``torch.ops.fastlm_cpu``
- ``cuda``: every ``csrc/cuda/*.cu`` plus ``csrc/bindings/cuda_*.cpp`` -> ``torch.ops.fastlm_cuda``

Sources are globbed, never listed: a new kernel file is picked up by adding it. Each binding
file registers its own ops with ``TORCH_LIBRARY_FRAGMENT``, so loading the library is all it
takes to make them callable.

JIT builds go to ``$FASTLM_CACHE_DIR`` (default ``~/.cache/fastlm/extensions``) in a folder named
by a hash of everything that changes the binary: sources and headers, flags, torch, compiler and
Python versions. Several processes (DeepSpeed ranks) may load at once; a file lock makes one
build while the others wait and then load the result.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# torch is imported where it is used: fastlm.data.native shares this module's cache and
# compiler helpers without importing torch.

_PKG_DIR = Path(__file__).resolve().parent
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh")


class ExtensionBuildError(RuntimeError):
    """A fastlm extension could not be built or loaded; the message says why and what to do."""


def csrc_dir() -> Path:
    """The C++/CUDA sources: ``csrc/`` of a source checkout, else the copy installed as data."""
    for candidate in (_PKG_DIR.parent / "csrc", _PKG_DIR / "_csrc"):
        if (candidate / "bindings").is_dir():
            return candidate
    raise ExtensionBuildError(
        "fastlm's C++ sources (csrc/) are not found next to the package nor installed with it; "
        "reinstall fastlm from a source checkout, or set FASTLM_BACKEND=torch to use the "
        "pure-PyTorch backends."
    )


def cache_root() -> Path:
    return Path(os.environ.get("FASTLM_CACHE_DIR", Path.home() / ".cache" / "fastlm" / "extensions"))


@functools.cache
def cpu_features() -> frozenset[str]:
    """CPU feature flags of this machine (Linux /proc/cpuinfo; empty set elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    m = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return frozenset(m.group(1).split()) if m else frozenset()


# Feature -> compiler flags. Chosen per machine rather than -march=native so the flags are
# visible (and part of the cache key): a home directory shared by nodes with different CPUs
# then holds one build per instruction set instead of a binary that faults on the older node.
_SIMD_FLAGS = (
    (("avx2", "fma"), ("-mavx2", "-mfma")),
    (("f16c",), ("-mf16c",)),
    (("avx512f", "avx512bw", "avx512vl", "avx512dq"), ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")),
    (("avx512_bf16",), ("-mavx512bf16",)),
    (("amx_tile", "amx_bf16"), ("-mamx-tile", "-mamx-bf16")),
)


def cpu_simd_flags(features: frozenset[str] | None = None) -> list[str]:
    """Compiler flags for the SIMD extensions this CPU has (override: ``FASTLM_CPU_FLAGS``)."""
    override = os.environ.get("FASTLM_CPU_FLAGS")
    if override is not None:
        return override.split()
    features = cpu_features() if features is None else features
    flags: list[str] = []
    for needed, add in _SIMD_FLAGS:
        # AVX-512 BF16 instructions are only usable on top of AVX-512F, and fastlm's AMX
        # path sits inside its AVX-512 BF16 kernels.
        if all(f in features for f in needed) and (
                (add[0] != "-mavx512bf16" or "-mavx512f" in flags)
                and (add[0] != "-mamx-tile" or "-mavx512bf16" in flags)):
            flags.extend(add)
    return flags


@functools.cache
def _tool_version(cmd: str) -> str:
    exe = shutil.which(cmd)
    if exe is None:
        return "missing"
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = [ln for ln in out.stdout.splitlines() if ln.strip()]
    return lines[-1] if cmd == "nvcc" and lines else (lines[0] if lines else "unknown")


def cxx_compiler() -> str:
    return os.environ.get("CXX", "c++")


def nvcc_path() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME and Path(CUDA_HOME, "bin", "nvcc").exists():
        return str(Path(CUDA_HOME, "bin", "nvcc"))
    return shutil.which("nvcc")


@dataclass
class ExtensionBuilder:
    """Everything needed to build one extension; subclasses fill the specifics."""

    name: str
    prebuilt_module: str
    library_namespace: str
    source_globs: tuple[str, ...]
    root: Path | None = None  # source tree; None = csrc_dir() (tests point it elsewhere)
    _state: dict = field(default_factory=dict, repr=False)

    # -- per-extension specifics -------------------------------------------------------------
    def incompatible_reason(self) -> str | None:
        """Why this extension cannot be built on this machine, or None if it can."""
        raise NotImplementedError

    # No -std flag: torch.utils.cpp_extension adds the standard its headers need (C++20 for
    # torch 2.13), and a later -std=c++17 here would override it.
    def cflags(self) -> list[str]:
        return ["-O3"]

    def cuda_cflags(self) -> list[str]:
        return []

    def ldflags(self) -> list[str]:
        return []

    def include_paths(self) -> list[str]:
        return [str(self.source_root())]

    def build_sources(self, build_dir: Path) -> list[str]:
        """The files handed to the compiler (called under the build lock)."""
        return [str(p) for p in self.sources()]

    # -- shared machinery -----------------------------------------------------------------------
    def source_root(self) -> Path:
        return self.root if self.root is not None else csrc_dir()

    def sources(self) -> list[Path]:
        root = self.source_root()
        files = sorted({p for pattern in self.source_globs for p in root.glob(pattern)})
        module = root / "bindings" / "module.cpp"
        return files + ([module] if module.exists() else [])

    def cache_key(self) -> str:
        root = self.source_root()
        h = hashlib.sha256()
        headers = sorted(p for p in root.rglob("*") if p.suffix in _HEADER_SUFFIXES)
        for path in self.sources() + headers:
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
        import torch

        compilers = [_tool_version(cxx_compiler())]
        if self.cuda_cflags():
            compilers.append(_tool_version("nvcc"))
        meta = [torch.__version__, str(torch.version.cuda), sys.version, platform.machine()]
        for part in meta + compilers + self.cflags() + self.cuda_cflags() + self.ldflags():
            h.update(part.encode())
        return h.hexdigest()[:16]

    def build_dir(self) -> Path:
        return cache_root() / f"{self.name}-{self.cache_key()}"

    def load(self):
        """Load the extension (building it if needed) and return ``torch.ops.<namespace>``.

        Raises :class:`ExtensionBuildError` with the reason; the outcome is remembered, so a
        failing build is attempted once per process.
        """
        import torch

        if "error" in self._state:
            raise self._state["error"]
        if "ops" not in self._state:
            try:
                self._load_uncached()
            except ExtensionBuildError as err:
                if not _NO_BUILD["on"]:
                    self._state["error"] = err
                raise
            self._state["ops"] = getattr(torch.ops, self.library_namespace)
        return self._state["ops"]

    def _load_uncached(self) -> None:
        if os.environ.get("FASTLM_FORCE_JIT") != "1":
            try:
                importlib.import_module(self.prebuilt_module)
                self._state["how"] = f"prebuilt ({self.prebuilt_module})"
                return
            except ImportError:
                pass
        reason = self.incompatible_reason()
        if reason is not None:
            raise ExtensionBuildError(f"fastlm extension '{self.name}' cannot be built here: {reason}")
        self._jit_build()

    def is_built(self) -> bool:
        """Whether loading needs no compilation (prebuilt installed or a cached JIT build)."""
        return _has_module(self.prebuilt_module) or any(self.build_dir().glob("*.so"))

    def _jit_build(self) -> None:
        from filelock import FileLock

        if _NO_BUILD["on"] and not self.is_built():
            raise ExtensionBuildError(
                f"extension '{self.name}' is not built yet (it builds on first use; "
                f"`fastlm env --build` builds it now)"
            )
        from torch.utils.cpp_extension import load

        build_dir = self.build_dir()
        build_dir.mkdir(parents=True, exist_ok=True)
        # One process compiles, the others wait here and then load the finished library
        # (ninja sees it up to date). 20 minutes covers a cold CUDA build on a slow node.
        with FileLock(str(build_dir) + ".lock", timeout=1200):
            try:
                load(
                    name=f"fastlm_{self.name}_{self.cache_key()}",
                    sources=self.build_sources(build_dir),
                    extra_cflags=self.cflags(),
                    extra_cuda_cflags=self.cuda_cflags(),
                    extra_ldflags=self.ldflags(),
                    extra_include_paths=self.include_paths(),
                    build_directory=str(build_dir),
                    is_python_module=False,
                    verbose=os.environ.get("FASTLM_BUILD_VERBOSE") == "1",
                )
            except Exception as exc:  # torch raises RuntimeError/OSError/CalledProcessError
                raise ExtensionBuildError(self._explain_failure(exc, build_dir)) from exc
        self._state["how"] = f"JIT-built in {build_dir}"

    def _explain_failure(self, exc: Exception, build_dir: Path) -> str:
        text = str(exc)
        lines = [ln for ln in text.splitlines() if ln.strip()]
        tail = "\n".join("    " + ln for ln in lines[-25:])
        missing = re.findall(r"fatal error: ([^:\s]+): No such file", text)
        hint = f"\n  missing header(s): {', '.join(sorted(set(missing)))}" if missing else ""
        return (
            f"building fastlm extension '{self.name}' failed ({len(self.sources())} sources, "
            f"compiler {_tool_version(cxx_compiler())}).{hint}\n"
            f"  last compiler output:\n{tail}\n"
            f"  build directory: {build_dir} (set FASTLM_BUILD_VERBOSE=1 for the full log)\n"
            f"  to skip it: set FASTLM_BACKEND=torch (or FASTLM_BACKEND_<OP>=<other backend>); "
            f"automatic backend selection already falls back to the next backend."
        )

    def how_loaded(self) -> str | None:
        return self._state.get("how")


class CpuOpsBuilder(ExtensionBuilder):
    def __init__(self) -> None:
        super().__init__(
            name="cpu",
            prebuilt_module="fastlm._C_cpu",
            library_namespace="fastlm_cpu",
            source_globs=("cpu/*.cpp", "bindings/cpu_*.cpp"),
        )

    def incompatible_reason(self) -> str | None:
        if shutil.which(cxx_compiler()) is None:
            return f"no C++ compiler found (looked for '{cxx_compiler()}'; set CXX or install g++)"
        return None

    def cflags(self) -> list[str]:
        # -fno-trapping-math: no kernel relies on floating-point exceptions, and without it GCC
        # refuses to if-convert compares, so softmax/exp loops would stay scalar (~2x slower).
        # -fno-math-errno: likewise nothing reads errno, and it lets sqrt vectorise.
        return ["-O3", "-fopenmp", "-fno-trapping-math", "-fno-math-errno", *cpu_simd_flags()]

    def ldflags(self) -> list[str]:
        return ["-fopenmp"]


class CudaOpsBuilder(ExtensionBuilder):
    def __init__(self) -> None:
        super().__init__(
            name="cuda",
            prebuilt_module="fastlm._C_cuda",
            library_namespace="fastlm_cuda",
            source_globs=("cuda/*.cu", "bindings/cuda_*.cpp"),
        )

    def incompatible_reason(self) -> str | None:
        import torch

        if torch.version.cuda is None:
            return f"this torch ({torch.__version__}) is a CPU-only build"
        if nvcc_path() is None:
            return "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
        return None

    def cuda_cflags(self) -> list[str]:
        return ["-O3", "--expt-relaxed-constexpr", *cuda_arch_flags()]


def cuda_arch_flags() -> list[str]:
    """-gencode flags: $TORCH_CUDA_ARCH_LIST if set, else the visible GPUs' architectures."""
    import torch

    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if arch_list:
        archs = {a.split("+")[0].replace(".", "") for a in re.split(r"[;\s]+", arch_list) if a}
    elif torch.cuda.is_available():
        caps = (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
        archs = {f"{major}{minor}" for major, minor in caps}
    else:
        archs = {"80", "90"}
    # sm_90 kernels use sm_90a features where they exist (wgmma); "a" targets are not forward
    # compatible, so keep plain sm_90 too.
    return [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sorted(archs)]


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


# While on, load() reports an unbuilt extension instead of compiling it: `fastlm env` uses this
# to describe the backends quickly without starting minutes of compilation.
_NO_BUILD = {"on": False}


@contextlib.contextmanager
def no_build():
    _NO_BUILD["on"] = True
    try:
        yield
    finally:
        _NO_BUILD["on"] = False


BUILDERS: dict[str, ExtensionBuilder] = {"cpu": CpuOpsBuilder(), "cuda": CudaOpsBuilder()}


def load_extension(name: str):
    """``torch.ops.fastlm_<name>`` after loading (or building) extension ``name``."""
    try:
        builder = BUILDERS[name]
    except KeyError:
        raise ValueError(f"unknown extension {name!r}; choose one of {sorted(BUILDERS)}") from None
    return builder.load()


def extension_unavailable_reason(name: str) -> str | None:
    """None if extension ``name`` loads (building it if needed), else the one-line reason."""
    try:
        load_extension(name)
    except ExtensionBuildError as err:
        return str(err).splitlines()[0]
    return None
