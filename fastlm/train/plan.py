"""``fastlm train CONFIG --dry-run [--world-size N]``: what a run would do, before any of it.

The model is built on the meta device (no weights are allocated or read), so the plan of a
multi-billion-parameter run on N GPUs takes seconds on a laptop. It reports what the config
resolves to (batch triple, tokens, precision, ZeRO, schedule), the model's parameters (and what
trains under LoRA), FLOPs a token as MFU counts them, each rank's memory for weights, gradients
and optimizer state under the ZeRO stage (activations are not included: they depend on the
kernels, checkpointing and batch), and the DeepSpeed JSON fastlm would hand DeepSpeed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from fastlm.train.config import ConfigError, RunConfig, resolve_batch


@dataclass
class Memory:
    """Bytes a rank holds for the model state (ZeRO's split of it)."""

    weights: float
    gradients: float
    optimizer: float
    optimizer_on_cpu: bool


def model_state_memory(params: int, trainable: int, precision: str, stage: int, world: int,
                       offload: bool) -> Memory:
    """Weights in the run's dtype, a gradient per trained weight in that dtype, and Adam's two
    fp32 moments per trained weight plus an fp32 master copy when the weights are bf16/fp16.
    ZeRO splits the optimizer state across ranks from stage 1, the gradients from stage 2, the
    weights at stage 3."""
    w = 2 if precision in ("bf16", "fp16") else 4
    optimizer = trainable * (8 + (4 if w == 2 else 0))
    return Memory(weights=params * w / (world if stage >= 3 else 1),
                  gradients=trainable * w / (world if stage >= 2 else 1),
                  optimizer=optimizer / (world if stage >= 1 else 1), optimizer_on_cpu=offload)


def plan(cfg: RunConfig, world: int) -> dict:
    """The resolved run as a dict (see the module docstring)."""
    from fastlm.data.format import read_meta
    from fastlm.train.engine import deepspeed_config, resolve_precision
    from fastlm.train.model import flops_per_token, hf_config, hidden_size, lm_class

    micro, accum, glob = resolve_batch(cfg.train, world)
    data = Path(next(iter(cfg.data.mix)) if cfg.data.mix else cfg.data.path)
    vocab = eos = None
    if (data / "meta.json").is_file():
        meta = read_meta(data)
        vocab, eos = int(meta["vocab_size"]), int(meta["eos_id"])
    conf = hf_config(cfg.model, vocab, cfg.data.block_size, eos)
    if cfg.model.pretrained and vocab is not None:
        conf.vocab_size = max(conf.vocab_size, vocab)  # the trainer grows the embeddings
    with torch.device("meta"):
        model = lm_class(conf).from_config(conf)
        if cfg.model.lora is not None:
            from fastlm.train.lora import apply_lora

            apply_lora(model, cfg.model.lora)
    params = {id(p): p for p in model.parameters()}.values()  # tied weights once
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = resolve_precision(cfg.train.precision, dev)[0]
    ds = deepspeed_config(cfg, micro, accum, glob, hidden_size=hidden_size(model))
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    offload = "offload_optimizer" in ds.get("zero_optimization", {})
    fpt = flops_per_token(model, cfg.data.block_size)
    tokens = glob * cfg.data.block_size
    mem = model_state_memory(total, trainable, precision, stage, world, offload)
    from fastlm.train.dpo import needs_reference_copy

    # DPO's frozen copy of the starting weights, whole on every rank in the run's dtype
    reference = total * (2 if precision in ("bf16", "fp16") else 4) \
        if needs_reference_copy(cfg) else 0
    return {"model": type(model).__name__, "parameters": total, "trainable": trainable,
            "vocab_size": conf.vocab_size if vocab is None else vocab,
            "data": [str(p) for p in cfg.data.mix] if cfg.data.mix else str(data),
            "data_prepared": vocab is not None,
            "world_size": world, "micro_batch": micro, "grad_accum": accum,
            "global_batch": glob, "tokens_per_step": tokens,
            "tokens_total": tokens * cfg.train.max_steps, "precision": precision,
            "zero_stage": stage, "flops_per_token": fpt, "flops_per_step": fpt * tokens,
            "flops_total": fpt * tokens * cfg.train.max_steps,
            "memory_per_rank": {"weights": mem.weights, "gradients": mem.gradients,
                                "optimizer": mem.optimizer, "reference": reference,
                                "optimizer_on": "cpu" if offload else "device"},
            "deepspeed": ds}


def render(p: dict, cfg: RunConfig) -> str:
    mem = p["memory_per_rank"]
    on_device = mem["weights"] + mem["gradients"] + mem["reference"] + (
        0 if mem["optimizer_on"] == "cpu" else mem["optimizer"])
    lines = [
        _model_line(p, cfg),
        f"data       {p['data']}, blocks of {cfg.data.block_size} tokens"
        + ("" if p["data_prepared"] else " (not prepared yet: the vocabulary is the model "
                                         "config's)"),
        _batch_line(p, cfg),
        _training_line(p, cfg),
        f"compute    {_n(p['flops_per_token'])}FLOPs a token, {_n(p['flops_per_step'])}FLOPs a "
        f"step, {_n(p['flops_total'])}FLOPs in all",
        f"memory     a rank holds {_b(on_device)} of model state on the "
        f"{'GPU' if torch.cuda.is_available() else 'device'}: weights {_b(mem['weights'])}, "
        f"gradients {_b(mem['gradients'])}, optimizer {_b(mem['optimizer'])}"
        + (" (in CPU memory: offload)" if mem["optimizer_on"] == "cpu" else "")
        + (f", DPO's reference copy {_b(mem['reference'])}" if mem["reference"] else "")
        + "; activations come on top",
        "deepspeed  " + json.dumps(p["deepspeed"], sort_keys=True),
    ]
    return "\n".join(lines)


def _model_line(p: dict, cfg: RunConfig) -> str:
    trains = "" if p["trainable"] == p["parameters"] else \
        f" ({_n(p['trainable'])} train: LoRA rank {cfg.model.lora.r})"
    return (f"model      {p['model']}, {_n(p['parameters'])} parameters{trains}, vocabulary "
            f"{p['vocab_size']:,}")


def _batch_line(p: dict, cfg: RunConfig) -> str:
    if cfg.train.objective == "dpo":  # rows of a pair's own length, not blocks
        return (f"batch      micro {p['micro_batch']} x accumulation {p['grad_accum']} x "
                f"{p['world_size']} rank(s) = {p['global_batch']} pairs a step (a chosen and "
                f"a rejected answer each, up to {cfg.data.block_size} tokens); "
                f"{cfg.train.max_steps:,} steps")
    return (f"batch      micro {p['micro_batch']} x accumulation {p['grad_accum']} x "
            f"{p['world_size']} rank(s) = {p['global_batch']} blocks = "
            f"{_n(p['tokens_per_step']).rstrip()} tokens a step; {cfg.train.max_steps:,} steps "
            f"= {_n(p['tokens_total']).rstrip()} tokens")


def _training_line(p: dict, cfg: RunConfig) -> str:
    o = cfg.optim
    return (f"training   {p['precision']}, ZeRO stage {p['zero_stage']}, {o.name}, lr {o.lr:g} "
            f"({o.schedule}, warmup {o.warmup_steps})")


def header(cfg: RunConfig, model, loader, *, world: int, micro: int, accum: int, glob: int,
           ds_config: dict) -> str:
    """What a run is about to do, printed as it starts (the first lines of ``--dry-run``, from
    the model and data it has built), with how many times it goes over its data: a run that
    repeats a small corpus many times overfits, and the steps alone do not tell."""
    params = {id(q): q for q in model.parameters()}.values()  # tied weights once
    zero = ds_config.get("zero_optimization", {})
    tokens = glob * cfg.data.block_size
    p = {"model": type(model).__name__, "parameters": sum(q.numel() for q in params),
         "trainable": sum(q.numel() for q in params if q.requires_grad),
         "vocab_size": loader.split.vocab_size, "world_size": world, "micro_batch": micro,
         "grad_accum": accum, "global_batch": glob, "tokens_per_step": tokens,
         "tokens_total": tokens * cfg.train.max_steps, "precision": cfg.train.precision,
         "zero_stage": int(zero.get("stage", 0))}
    lines = [_model_line(p, cfg), _data_line(cfg, loader, glob), _batch_line(p, cfg),
             _training_line(p, cfg) + (", optimizer state offloaded to the CPU"
                                       if "offload_optimizer" in zero else "")]
    return "\n".join(lines)


def epoch_samples(loader) -> tuple[int, str]:
    """(samples an epoch, what they are) of a training loader of one dataset: its blocks, or
    its pairs."""
    if hasattr(loader, "pairs"):
        return loader.pairs, "pairs"
    return loader.tokens_per_epoch // loader.block_size, "blocks"


def resolve_run_length(cfg: RunConfig, world: int) -> RunConfig:
    """``cfg`` with train.epochs turned into train.max_steps from the prepared data, as the
    run will (the plan of a run given in epochs)."""
    if cfg.train.epochs is None:
        return cfg
    from fastlm.data.loader import BlockLoader
    from fastlm.data.pairs import PairLoader
    from fastlm.train.config import resolve_epochs

    data = Path(cfg.data.path)
    if not (data / "meta.json").is_file():
        raise ConfigError(f"train.epochs: {data} is not prepared yet, and its size decides the "
                          f"steps; prepare it first (or give train.max_steps)")
    glob = resolve_batch(cfg.train, world)[2]
    loader = PairLoader(data, cfg.data.block_size, 1) if cfg.train.objective == "dpo" else \
        BlockLoader(data, cfg.data.block_size, 1)
    samples, what = epoch_samples(loader)
    return resolve_epochs(cfg, samples, glob, what)[0]


def _data_line(cfg: RunConfig, loader, glob: int) -> str:
    rows = glob * cfg.train.max_steps  # blocks (pairs, for DPO) the run reads
    if hasattr(loader, "sources"):  # a mixture: each source's share of the blocks
        each = ", ".join(f"{path} {w:.3g} ({_epochs(rows * w / epoch_samples(src)[0])})"
                         for (path, w), src in zip(loader.mix.items(), loader.sources))
        return f"data       mixture of {each}"
    samples, what = epoch_samples(loader)
    held = (f"{samples:,} training pairs" if what == "pairs" else
            f"{_n(loader.tokens_per_epoch).rstrip()} training tokens in blocks of "
            f"{cfg.data.block_size}")
    return (f"data       {cfg.data.path}: {held}; {cfg.train.max_steps:,} steps read "
            f"{_epochs(rows / samples)}")


def _epochs(x: float) -> str:
    return f"{x:.3g} epoch" + ("" if f"{x:.3g}" == "1" else "s")


def _n(x: float) -> str:
    for unit, size in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6),
                       ("k", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.3g} "


def _b(x: float) -> str:
    for unit, size in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if x >= size:
            return f"{x / size:.3g} {unit}"
    return f"{x:.0f} B"


def world_size(explicit: int | None) -> int:
    import os

    if explicit is not None:
        if explicit < 1:
            raise ConfigError(f"--world-size must be >= 1, got {explicit}")
        return explicit
    return int(os.environ.get("WORLD_SIZE", "1"))
