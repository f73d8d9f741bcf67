"""``fastlm env``: what this machine has and which backend each op would run, and why.

Like DeepSpeed's ``ds_report``: versions, compilers, CPU features, GPUs, then for every op and
device the backend that would be selected and the reason each other backend would not run.
``--build`` compiles every extension that can be built here and reports each result.
"""

from __future__ import annotations

import importlib
import platform
import sys
import time

import torch

from fastlm import _build, _dispatch

# Modules that define ops; imported so their registries exist. Missing ones are skipped so the
# report works on a partial install.
OP_MODULES = ("fastlm.ops", "fastlm.optim")

# One representative call per op and device for the report.
_SAMPLE_FEATURES = {"attention": {"head_dim": 128, "varlen": False}}


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception as exc:  # an import can fail in many ways; the report must not
        return f"not available ({type(exc).__name__})"


def versions() -> list[tuple[str, str]]:
    import fastlm

    return [
        ("fastlm", fastlm.__version__),
        ("python", sys.version.split()[0]),
        ("platform", platform.platform()),
        ("torch", f"{torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})"),
        ("triton", _version("triton")),
        ("deepspeed", _version("deepspeed")),
        ("transformers", _version("transformers")),
        ("datasets", _version("datasets")),
    ]


def machine() -> list[tuple[str, str]]:
    nvcc = _build.nvcc_path()
    simd = sorted(
        f for f in _build.cpu_features()
        if f.startswith(("avx", "fma", "f16c", "amx", "sse4"))
    )
    rows = [
        ("c++ compiler", f"{_build.cxx_compiler()}: {_build._tool_version(_build.cxx_compiler())}"),
        ("nvcc", f"{nvcc}: {_build._tool_version('nvcc')}" if nvcc else "not found"),
        ("cpu", f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"),
        ("cpu features", " ".join(simd) or "unknown"),
        ("cpu build flags", " ".join(_build.cpu_simd_flags()) or "(none)"),
        ("torch cpu capability", torch.backends.cpu.get_cpu_capability()),
    ]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"gpu {i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB"))
    else:
        rows.append(("gpu", "none visible to torch"))
    rows.append(("extension cache", str(_build.cache_root())))
    from fastlm.data import native

    text = native.library_path()
    rows.append(("text kernels", f"built: {text}" if text.exists() else
                 "not built yet (fastlm prepare builds them on first use; or fastlm env --build)"))
    return rows


def op_table() -> list[tuple[str, str, str, str]]:
    """(op, device/dtype, backend, status) rows."""
    for module in OP_MODULES:
        try:
            importlib.import_module(module)
        except ImportError:
            continue
    rows = []
    for name, op in sorted(_dispatch.OPS.items()):
        features = _SAMPLE_FEATURES.get(name, {})
        for device, dtype in (("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.bfloat16)):
            call = _dispatch.Call(device, dtype, features)
            label = f"{device} {str(dtype).removeprefix('torch.')}"
            for backend, status in op.describe(call):
                rows.append((name, label, backend, status))
    return rows


def build_all() -> list[tuple[str, str]]:
    results = []
    for name, builder in _build.BUILDERS.items():
        start = time.perf_counter()
        try:
            builder.load()
            results.append((name, f"OK in {time.perf_counter() - start:.1f}s: {builder.how_loaded()}"))
        except _build.ExtensionBuildError as err:
            results.append((name, f"FAILED: {err}"))
    import warnings

    from fastlm.data import native

    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lib = native.load()
    results.append(("text", f"OK in {time.perf_counter() - start:.1f}s: {native.library_path()}"
                    if lib is not None else
                    "FAILED: " + "; ".join(str(w.message) for w in caught)))
    return results


def _print_rows(title: str, rows, out) -> None:
    print(f"\n{title}", file=out)
    print("-" * len(title), file=out)
    width = max((len(r[0]) for r in rows), default=0)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}", file=out)


def report(build: bool = False, out=sys.stdout) -> int:
    _print_rows("versions", versions(), out)
    _print_rows("machine", machine(), out)
    if build:
        _print_rows("extension builds (--build)", build_all(), out)
    print("\nbackends per op (selected = what an automatic call runs)", file=out)
    print("-" * 56, file=out)
    if build:
        rows = op_table()
    else:
        with _build.no_build():
            rows = op_table()
    last = None
    for op, label, backend, status in rows:
        head = f"  {op:<12} {label:<16}" if (op, label) != last else " " * 31
        print(f"{head} {backend:<7} {status}", file=out)
        last = (op, label)
    return 0
