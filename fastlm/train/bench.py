"""``fastlm bench train``: training throughput of fastlm's trainer against a plain Hugging Face
Trainer (+SDPA) on the same model, batch and precision.

``--lora R``: LoRA fine-tuning of the same model, each the way its users adapt one: fastlm's
``model.lora`` (adapters injected, fastlm's kernels around them) against PEFT's
``get_peft_model`` under the Trainer (rank R, alpha 2R, every linear layer but the head).

Each contender runs in its own process (so peak memory is its own, and neither inherits the
other's threads or allocator state) on random tokens: this measures the training step, not
data loading. Rows: tokens/s, MFU against the peak used by the trainer's own logging, peak
memory (GPU: max allocated; CPU: max RSS), and the speed-up over the Trainer.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time

import torch

from fastlm.bench import harness

IMPLS = ("fastlm", "hf_trainer")


def add_arguments(parser) -> None:
    from fastlm.cli import at_least, positive

    parser.add_argument("--preset", default="tiny-gpt2", help="model preset (configs/models)")
    parser.add_argument("--vocab-size", type=at_least(2), default=None, help="default: the preset's")
    parser.add_argument("--block-size", type=at_least(1), default=256)
    parser.add_argument("--micro-batch", type=at_least(1), default=8)
    parser.add_argument("--steps", type=at_least(1), default=20, help="timed steps")
    parser.add_argument("--warmup", type=at_least(0), default=5)
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"],
                        default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument("--lora", type=int, default=0, metavar="R",
                        help="LoRA fine-tuning at rank R (HF Trainer: PEFT's get_peft_model)")
    parser.add_argument("--out", default=None, help="directory for JSON, markdown and PNG")
    parser.add_argument("--name", default=None)
    parser.add_argument("--vs-nanogpt", default=None, metavar="DIR",
                        help="instead: nanoGPT's CPU shakespeare recipe side by side (a local "
                        "nanoGPT checkout with its data prepared), time to --target-loss")
    parser.add_argument("--text", default="../shared/data/tinyshakespeare.txt")
    parser.add_argument("--target-loss", type=positive, default=1.89)
    parser.add_argument("--work-dir", default="/tmp/fastlm-recipe-bench")
    parser.add_argument("--fastlm-set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --vs-nanogpt: a config override for the fastlm run "
                             "(repeatable), e.g. to try the recipe at another setting")
    parser.add_argument("--worker", default=None, help=argparse_suppress())


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def run(args) -> int:
    if args.worker:
        print("RESULT " + json.dumps(_worker(args.worker, args)), flush=True)
        return 0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.vs_nanogpt:
        return _recipe(args, device)
    from fastlm.cli import UserError
    from fastlm.train.config import ConfigError
    from fastlm.train.model import preset_path

    try:  # here, not in each worker (their traceback buried the message)
        preset_path(args.preset)
    except ConfigError as exc:
        raise UserError(f"--preset: {exc}") from exc
    if args.lora < 0:
        raise UserError(f"--lora must be a rank >= 1 (0: no LoRA), got {args.lora}")
    report = harness.Report(
        name=args.name or f"train_{device}", command="fastlm bench train " + shlex.join(
            a for a in sys.argv[3:]) if sys.argv[1:3] == ["bench", "train"] else
        shlex.join(sys.argv), device=device, env=harness.environment(device))
    for impl in [i for i in args.impls.split(",") if i]:
        if impl not in IMPLS:
            raise UserError(f"--impls: unknown {impl!r}; choose from {list(IMPLS)}")
        res = _spawn(impl, args)
        report.add(impl=impl, preset=args.preset, block=args.block_size,
                   micro_batch=args.micro_batch, precision=args.precision,
                   lora=args.lora or None, **res)
    base = next((r for r in report.rows if r["impl"] == "hf_trainer"), None)
    for r in report.rows:
        r["vs_hf_trainer"] = (r["tokens_per_s"] / base["tokens_per_s"]
                              if base and base.get("tokens_per_s") else None)
    print(harness.format_table(report.rows))
    if args.out:
        paths = report.write(args.out)
        paths.append(_plot(report, args.out))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _recipe(args, device) -> int:
    from fastlm.train import recipe_bench

    report = harness.Report(name=args.name or f"train_shakespeare_{device}",
                            command="fastlm bench train " + shlex.join(sys.argv[3:]),
                            device=device, env=harness.environment(device))
    recipe_bench.run(args, report)
    print(harness.format_table(report.rows))
    if args.out:
        print("wrote " + ", ".join(str(p) for p in report.write(args.out)))
    return 0


def _spawn(impl: str, args) -> dict:
    argv = [sys.executable, "-m", "fastlm.cli", "bench", "train", "--worker", impl,
            "--preset", args.preset, "--block-size", str(args.block_size),
            "--micro-batch", str(args.micro_batch), "--steps", str(args.steps),
            "--warmup", str(args.warmup), "--precision", args.precision,
            "--lora", str(args.lora)]
    if args.vocab_size:
        argv += ["--vocab-size", str(args.vocab_size)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"bench worker {impl} failed:\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-3000:]}")


def _model_config(args):
    from fastlm.train.config import ModelConfig

    overrides = {} if args.vocab_size is None else {"vocab_size": args.vocab_size}
    return ModelConfig(preset=args.preset, overrides=overrides)


def _worker(impl: str, args) -> dict:
    from fastlm.train import dist as fdist
    from fastlm.train.model import build_model, flops_per_token

    rank, local_rank, _ = fdist.init()
    dev = fdist.device(local_rank)
    torch.manual_seed(0)
    mcfg = _model_config(args)
    if impl == "hf_trainer":
        mcfg.attn_implementation, mcfg.patch = "sdpa", False
    model = build_model(mcfg, args.vocab_size, args.block_size).to(dev)
    if args.lora:
        model = _with_lora(model, impl, args.lora)
    vocab = model.config.vocab_size
    fpt = flops_per_token(model, args.block_size)
    from fastlm.train.trainer import _peak_flops

    peak = _peak_flops(dev, args.precision)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = (_time_fastlm if impl == "fastlm" else _time_hf_trainer)(model, vocab, args, dev)
    tokens = args.steps * args.micro_batch * args.block_size
    tps = tokens / seconds
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"trained_params": trained, "tokens_per_s": tps,
            "ms_per_step": seconds / args.steps * 1e3,
            "mfu": tps * fpt / peak if peak else None, "peak_mem_gb": _peak_mem(dev)}


def _with_lora(model, impl: str, r: int):
    if impl == "fastlm":
        from fastlm.train.config import LoraSettings
        from fastlm.train.lora import apply_lora

        return apply_lora(model, LoraSettings(r=r, alpha=2.0 * r))
    import peft

    return peft.get_peft_model(model, peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                      target_modules="all-linear", bias="none"))


def _peak_mem(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def _batches(vocab, args, dev):
    g = torch.Generator().manual_seed(0)
    while True:
        ids = torch.randint(0, vocab, (args.micro_batch, args.block_size + 1), generator=g)
        yield ids[:, :-1].to(dev), ids[:, 1:].to(dev)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_fastlm(model, vocab, args, dev) -> float:
    from fastlm.data.loader import Batch
    from fastlm.train.config import load_config
    from fastlm.train.engine import deepspeed_config, initialize
    from fastlm.train.model import param_groups
    from fastlm.train.trainer import _loss

    cfg = load_config(None, [f"train.precision={args.precision}",
                             f"train.micro_batch_size={args.micro_batch}"])
    engine, _, _ = initialize(cfg, model, param_groups(model, 0.1),
                              deepspeed_config(cfg, args.micro_batch, 1, args.micro_batch))
    data = _batches(vocab, args, dev)
    t0 = None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            _sync(dev)
            t0 = time.perf_counter()
        x, y = next(data)
        loss = _loss(engine, Batch(x, y), None, fused=True)
        engine.backward(loss)
        engine.step()
    _sync(dev)
    return time.perf_counter() - t0


def _time_hf_trainer(model, vocab, args, dev) -> float:
    import tempfile

    from transformers import Trainer, TrainerCallback, TrainingArguments

    data = _batches(vocab, args, dev)
    rows = []
    for _ in range(args.micro_batch * (args.warmup + args.steps)):
        x, _ = next(data)
        rows.append({"input_ids": x[0].cpu(), "labels": x[0].cpu()})
    times = {}

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if state.global_step == args.warmup:
                _sync(dev)
                times["t0"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _sync(dev)
            times["t1"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.micro_batch,
            max_steps=args.warmup + args.steps, learning_rate=1e-3, weight_decay=0.1,
            bf16=args.precision == "bf16", fp16=args.precision == "fp16",
            use_cpu=dev.type == "cpu", report_to=[], save_strategy="no", logging_strategy="no",
            max_grad_norm=1.0, dataloader_num_workers=0, disable_tqdm=True,
            optim="adamw_torch_fused" if dev.type == "cuda" else "adamw_torch")
        Trainer(model=model, args=targs, train_dataset=rows, callbacks=[Clock()]).train()
    return times["t1"] - times["t0"]


def _plot(report, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    names = [r["impl"] for r in report.rows]
    ax.bar(names, [r["tokens_per_s"] for r in report.rows], color=["C0", "C1", "C2"][:len(names)])
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{report.rows[0]['preset']}, block {report.rows[0]['block']}, "
                 f"{report.rows[0]['precision']} on {report.env.get('device', report.device)}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(out_dir) / f"{report.name}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
