"""The DeepSpeed config fastlm derives from a run config, and the engine built from it."""

from __future__ import annotations

import functools
import json
import logging
import math
import warnings
from pathlib import Path

import torch

from fastlm.train.config import ConfigError, RunConfig

logger = logging.getLogger("fastlm")

_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg: RunConfig, micro: int, accum: int, glob: int,
                     hidden_size: int | None = None) -> dict:
    """The user's DeepSpeed JSON (if any) with the keys fastlm derives filled in.

    A key the user set wins, except that batch sizes must agree with the run config: the
    loader is sized from those, so a silent disagreement would train on the wrong batch.
    ``"auto"`` values (the Hugging Face Trainer's DeepSpeed JSONs are full of them) are filled
    from the run config the way that Trainer fills them (see :func:`_resolve_auto`).
    """
    user: dict = {}
    if cfg.train.deepspeed:
        path = Path(cfg.train.deepspeed)
        if not path.is_file():
            raise ConfigError(f"train.deepspeed: {path} not found (a DeepSpeed JSON file)")
        try:
            user = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"train.deepspeed: {path} is not valid JSON: {exc}") from exc
        if not isinstance(user, dict):
            raise ConfigError(f"train.deepspeed: {path} holds a JSON {type(user).__name__}, "
                              f"not an object of DeepSpeed keys")
        user = _resolve_auto(user, cfg, str(path), hidden_size)
    derived = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
               "train_batch_size": glob}
    for key, value in derived.items():
        if key in user and user[key] != value:
            raise ConfigError(f"{cfg.train.deepspeed}: {key}={user[key]} disagrees with the run "
                              f"config's batch sizes ({key}={value}); set them in one place")
    ds = dict(user)
    ds.update(derived)
    ds.setdefault("gradient_clipping", cfg.train.grad_clip)
    ds.setdefault("steps_per_print", 1 << 30)  # fastlm logs; DeepSpeed's own prints are noise
    ds.setdefault("wall_clock_breakdown", False)
    zero = ds.setdefault("zero_optimization", {})
    zero.setdefault("stage", cfg.train.zero_stage)
    if cfg.train.offload_optimizer:
        zero.setdefault("offload_optimizer", {"device": "cpu", "pin_memory": False})
    p = cfg.train.precision
    if p == "bf16" and not _optimizer_keeps_masters(cfg, ds):
        ds.setdefault("bf16", {"enabled": True})
    elif p == "fp16":
        ds.setdefault("fp16", {"enabled": True, "loss_scale": 0, "initial_scale_power": 16,
                               "loss_scale_window": 1000, "hysteresis": 1,
                               "min_loss_scale": 1})
    return ds


_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
               "train_batch_size")


def _resolve_auto(user: dict, cfg: RunConfig, path: str, hidden: int | None) -> dict:
    """The user's JSON with its "auto" values resolved as the HF Trainer resolves them, so a
    config written for that Trainer runs here unchanged:

    - batch sizes and ``gradient_clipping``: from the run config (left for fastlm to fill);
    - ``fp16``/``bf16`` ``enabled``: whether train.precision is that precision (bf16 then
      goes fastlm's way, fp32 masters in FusedAdamW where that applies);
    - an ``optimizer``/``scheduler`` section whose params are all "auto": dropped, fastlm
      builds both from optim.*. One with values is an error: DeepSpeed would silently ignore
      it for the optimizer and schedule fastlm hands it;
    - ZeRO bucket sizes: from the model's hidden size h (h^2, 0.9 h^2, 10 h, HF's rule);
    - any other "auto": an error naming the key.
    """
    ds = json.loads(json.dumps(user))  # a deep copy
    for key in _BATCH_KEYS + ("gradient_clipping",):
        if ds.get(key) == "auto":
            del ds[key]
    for name in ("fp16", "bf16"):
        section = ds.get(name)
        if isinstance(section, dict) and section.get("enabled") == "auto":
            if cfg.train.precision != name or name == "bf16":
                del ds[name]  # bf16: fastlm's own choice of how (see deepspeed_config)
            else:
                section["enabled"] = True
    for name, keys in (("optimizer", "optim.name, optim.lr, optim.betas, optim.eps, "
                                     "optim.weight_decay"),
                       ("scheduler", "optim.warmup_steps, optim.min_lr, optim.decay_steps")):
        section = ds.get(name)
        if section is None:
            continue
        params = section.get("params", {}) if isinstance(section, dict) else None
        if isinstance(params, dict) and all(v == "auto" for v in params.values()):
            del ds[name]
            continue
        raise ConfigError(
            f"train.deepspeed: {path} has an '{name}' section with values; fastlm builds the "
            f"{name} itself from {keys} and DeepSpeed would ignore the section. Set those "
            f"keys instead and remove the section (or leave its params \"auto\")")
    zero = ds.get("zero_optimization")
    if isinstance(zero, dict):
        sizes = {} if hidden is None else {
            "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
            "stage3_param_persistence_threshold": 10 * hidden}
        for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                    "stage3_param_persistence_threshold"):
            if zero.get(key) == "auto":
                if key in sizes:
                    zero[key] = sizes[key]
                else:
                    del zero[key]  # no model to size them from: DeepSpeed's defaults
    left = _auto_paths(ds)
    if left:
        raise ConfigError(f"train.deepspeed: {path} sets {', '.join(left)} to \"auto\", which "
                          f"fastlm does not derive; give a value")
    return ds


def _auto_paths(node, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _auto_paths(v, f"{prefix}{k}.")]
    return [prefix.rstrip(".")] if node == "auto" else []


def _optimizer_keeps_masters(cfg: RunConfig, ds: dict) -> bool:
    """bf16 without ZeRO and with FusedAdamW: the optimizer keeps the fp32 master weights
    itself (it reads bf16 gradients, updates fp32 masters and writes bf16 parameters in its one
    pass). DeepSpeed's own bf16 wrapper for this case adds, per step, a pass copying the
    gradients to fp32, an overflow check (bf16 does not overflow like fp16), a norm pass, an
    unscale pass and a copy of the masters back: ~20% of a tiny model's step on a CPU. A user's
    DeepSpeed JSON that configures bf16/fp16 itself keeps DeepSpeed's way."""
    return (cfg.optim.name == "fused_adamw" and "bf16" not in ds and "fp16" not in ds
            and ds.get("zero_optimization", {}).get("stage", 0) == 0)


def lr_lambda(cfg: RunConfig):
    """The multiplier of optim.lr at each step: a linear warmup to 1, then optim.schedule's
    shape (see OptimConfig), flat at min_lr / lr once its decay is over."""
    o = cfg.optim
    warm, total = o.warmup_steps, cfg.train.max_steps
    floor = o.min_lr / o.lr
    if o.schedule.startswith("wsd"):
        # the cooldown ends at max_steps; at least one step, and it starts after the warmup
        cool = o.decay_steps if o.decay_steps is not None else max(1, round(0.2 * total))
        start = max(warm, total - cool)
    else:
        cool = o.decay_steps if o.decay_steps is not None else max(1, total - warm)
        start = warm
    shape = _DECAYS[o.schedule]

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, max(0.0, (step - start) / max(1, cool)))
        return floor + (1 - floor) * shape(t)

    return factor


def schedule_note(cfg: RunConfig) -> str | None:
    """A warning where the warmup does not end before the run does (a run given in epochs, or
    shortened, under a config's warmup): the lr never reaches optim.lr, nor decays."""
    warm, total = cfg.optim.warmup_steps, cfg.train.max_steps
    if warm < total:
        return None
    return (f"optim.warmup_steps={warm} is not shorter than the run ({total} steps): the lr "
            f"rises for the whole run, peaking at {total / warm:.2g} x optim.lr, and never "
            f"decays; set optim.warmup_steps lower")


_DECAYS = {  # t: 0 -> 1 over the decay; 1 = optim.lr, 0 = optim.min_lr
    "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t)),
    "linear": lambda t: 1 - t,
    "constant": lambda t: 1.0,
    "wsd": lambda t: 1 - t,
    "wsd_sqrt": lambda t: 1 - math.sqrt(t),  # Hägele et al. 2024: better than linear
}


def make_optimizer(cfg: RunConfig, groups: list[dict]):
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "fused_adamw":
        from fastlm.optim import FusedAdamW

        return FusedAdamW(groups, **kw)
    return torch.optim.AdamW(groups, **kw)


def native_bf16(dev: torch.device) -> bool:
    """Whether the GPU multiplies bf16 on its tensor cores (Ampere, sm_80, and later). torch's
    ``is_bf16_supported()`` also says yes where bf16 is only emulated (V100, T4), and "auto"
    picked a run there slower than fp32 instead of fp16 with loss scaling."""
    return torch.cuda.get_device_capability(dev)[0] >= 8


def resolve_precision(requested: str, dev: torch.device) -> tuple[str, str]:
    """(precision, why) for train.precision on this device; "auto" picks bf16 where the hardware
    multiplies bf16 natively (on such a CPU bf16 matmuls run ~4x fp32's rate; elsewhere bf16 is
    emulated in fp32 and only adds conversions), else fp16 on a GPU (loss-scaled) and fp32 on a
    CPU (DeepSpeed has no fp16 there)."""
    if requested != "auto":
        return requested, "as configured"
    if dev.type == "cuda":
        if native_bf16(dev):
            return "bf16", "the GPU multiplies bf16 natively"
        return "fp16", "the GPU has no bf16 tensor cores"
    from fastlm._build import cpu_features

    flags = cpu_features()
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "bf16", "this CPU has bf16 dot-product instructions"
    return "fp32", "this CPU has no bf16 dot-product instructions"


def precision_dtype(cfg: RunConfig) -> torch.dtype:
    return _PRECISION_DTYPES[cfg.train.precision]


def initialize(cfg: RunConfig, model, groups, ds_config: dict):
    """deepspeed.initialize with fastlm's optimizer accepted under ZeRO and offload."""
    import deepspeed

    from fastlm.integrations.deepspeed import fuse_unscale_and_clip, prepare_config
    from fastlm.train.model import cast_buffers_as_built, to_dtype

    if cfg.train.precision == "bf16" and not ds_config.get("bf16", {}).get("enabled"):
        to_dtype(model, torch.bfloat16)  # in place: the groups' parameters stay the same objects
    elif cfg.train.precision in ("bf16", "fp16"):  # DeepSpeed's engine casts the parameters
        cast_buffers_as_built(model, _PRECISION_DTYPES[cfg.train.precision])
    optimizer = make_optimizer(cfg, groups)
    factor = lr_lambda(cfg)
    ds_config = prepare_config(ds_config, optimizer)
    # DeepSpeed 0.19's ZeRO gathers call a torch.distributed function torch 2.13 deprecates:
    # a FutureWarning on every rank of every run that the user can do nothing about
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated")
    # A callable: the schedule must drive the optimizer DeepSpeed wraps (ZeRO's flat groups).
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
    # ZeRO 1/2 + FusedAdamW: DeepSpeed's unscale/clip multiply happens inside the step
    fuse_unscale_and_clip(engine)
    skip_nonfinite_steps(engine)
    if (engine.world_size == 1 and not engine.zero_optimization()
            and not (engine.bfloat16_enabled() or engine.fp16_enabled())):
        # One process, no ZeRO, no bf16/fp16 wrapper: DeepSpeed would still flatten every gradient
        # into a bucket, "all-reduce" it over one rank and copy it back after each backward
        # (~4% of a tiny model's step here); there is nothing to reduce.
        engine.enable_backward_allreduce = False
    return engine, optimizer, scheduler


def skip_nonfinite_steps(engine) -> bool:
    """Without ZeRO (and without DeepSpeed's fp16/bf16 wrappers), skip an optimizer step whose
    gradients are not finite, as ZeRO 1-3 and fp16 do: one NaN or inf loss (a bad batch, a
    spike) made every weight NaN for the rest of the run, which went on evaluating NaN and
    saving NaN checkpoints over the good ones. The step is skipped the way DeepSpeed skips an
    overflow (its ``overflow`` flag: ``skipped_steps`` counted, the schedule held, the
    gradients zeroed), so the trainer's ``train.max_consecutive_skips`` applies. The norm is
    the one the folded clip just computed (FusedAdamW, gradient clipping on), else one read of
    the gradients. Returns whether the guard was installed."""
    if engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled():
        return False  # DeepSpeed checks these itself
    opt = engine.optimizer
    step = opt.step  # torch's scheduler may have wrapped it already: kept, called through
    folded = (getattr(engine, "fastlm_clip_reports_norm", False)
              and engine.gradient_clipping() > 0)

    # wraps: the scheduler's mark on the step it wrapped stays visible (else torch warns the
    # step was "overridden after learning rate scheduler initialization")
    @functools.wraps(step)
    def guarded(*args, **kwargs):
        # the clip runs right before every step when folded, so this norm is this step's
        norm = getattr(opt, "_global_grad_norm", None) if folded else None
        if norm is None:
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            norm = (torch.zeros(()) if not grads else
                    opt._total_norm(grads, 2.0, False) if hasattr(opt, "_total_norm")
                    else torch.nn.utils.get_total_norm(grads))
        opt.overflow = not bool(torch.isfinite(norm))
        if opt.overflow:
            if engine.global_rank == 0:
                logger.warning("optimizer step %d skipped: the gradients are not finite (norm "
                               "%s); the weights and the schedule are unchanged",
                               engine.global_steps + 1, float(norm))
            return None
        return step(*args, **kwargs)

    opt.step = guarded
    return True


def release(engine) -> None:
    """Free what DeepSpeed keeps of ``engine`` after the run, so that ``train()`` called again in
    the same process (a notebook, a sweep) does not hold every earlier model.

    ZeRO-3 leaves three roots behind: gradient hooks held by C++ autograd nodes (a cycle
    Python's collector cannot see through; ``engine.destroy()`` removes them), the model left on
    ``parameter_offload.FWD_MODULE_STACK`` (a module-level list ZeRO-3 pushes the top module
    onto at set-up and never pops), and a class-level ``functools.lru_cache`` on the parameter
    coordinator keyed by coordinator and submodule.
    """
    engine.destroy()
    if not engine.zero_optimization_partition_weights():
        return
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import (
        PartitionedParameterCoordinator,
    )

    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not engine.module]  # another live engine keeps its own
    cached = _lru_cache_of(getattr(PartitionedParameterCoordinator,
                                   "_PartitionedParameterCoordinator__params_to_release", None))
    if cached is not None:
        cached.cache_clear()  # shared by every coordinator; it refills on the next step


def _lru_cache_of(fn):
    """The functools.lru_cache wrapper under DeepSpeed's (unwrapping) nvtx decorator, if any."""
    for _ in range(3):
        if fn is None or hasattr(fn, "cache_clear"):
            return fn
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())]
        fn = next((c for c in cells if callable(c)), None)
    return None
