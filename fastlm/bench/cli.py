"""``fastlm bench <name>``: every benchmark module provides add_arguments(parser) and run(args)."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "attention": ("fastlm.bench.attention", "fused attention vs torch SDPA backends and eager math"),
    "adamw": ("fastlm.bench.adamw", "FusedAdamW vs torch AdamW (foreach, fused) and DeepSpeed's Adam"),
    "adamw-moments": ("fastlm.bench.adamw_moments",
                      "the accuracy cost of FusedAdamW's bf16 moments on a tiny training run"),
    "data": ("fastlm.data.bench", "MB/s of raw text through the whole data pipeline"),
    "train": ("fastlm.train.bench", "training tokens/s, MFU and memory vs a Hugging Face Trainer"),
    "model": ("fastlm.bench.model", "a transformers model with and without fastlm.patch"),
    "fused": ("fastlm.bench.fused", "RMSNorm, LayerNorm, GELU and SwiGLU kernels vs PyTorch"),
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name, (module_name, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if not (exc.name and module_name.startswith(exc.name)):
                raise
            p.set_defaults(bench_module=None)
            continue
        module.add_arguments(p)
        p.set_defaults(bench_module=module)


def run(args) -> int:
    if getattr(args, "bench", None) is None:
        from fastlm.cli import UserError

        raise UserError("name a benchmark: " + ", ".join(BENCHMARKS) + " (see fastlm bench --help)")
    if args.bench_module is None:
        from fastlm.cli import UserError

        raise UserError(f"benchmark '{args.bench}' is not yet available in this version of fastlm")
    if getattr(args, "device", None) is not None:
        check_device(args.device)
    return args.bench_module.run(args)


def check_device(name: str) -> None:
    """A ``--device`` the benchmark can run on, else a UserError naming the fix (a CUDA device
    on a machine without one was an AssertionError from torch's lazy CUDA init)."""
    import torch

    from fastlm.cli import UserError

    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name!r} is not a device name: use cpu, cuda or cuda:N") \
            from exc
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r}: fastlm's benchmarks run on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise UserError(f"--device {name}: no CUDA GPU is visible here (torch "
                        f"{torch.__version__}, {build}); run it on a GPU machine, or use "
                        f"--device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} "
                        f"GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}")
