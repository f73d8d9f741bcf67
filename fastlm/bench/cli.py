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
    return args.bench_module.run(args)
