"""Typed run configuration: YAML file + ``--set a.b=c`` overrides, validated with errors that
name the key.

Every section is a dataclass; unknown keys, wrong types and inconsistent batch sizes are
rejected before anything expensive starts. DeepSpeed's own JSON (``train.deepspeed``) is not
modelled here: it passes through, and fastlm fills only the keys it derives.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(Exception):
    """A bad config file, key or value; printed without a traceback by the CLI."""

    user_facing = True


@dataclass
class LoraSettings:
    """``model.lora``: train low-rank adapters only (PEFT's LoRA); export merges them."""

    r: int = 16
    alpha: float = 32.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0
    # module names (suffixes) or "all-linear" (every linear layer but the LM head)
    target_modules: str | list = "all-linear"
    rslora: bool = False


@dataclass
class ModelConfig:
    preset: str | None = "tiny-gpt2"  # configs/models/<preset>.yaml, or a path to a YAML file
    pretrained: str | None = None  # local HF directory to fine-tune (overrides preset)
    overrides: dict = field(default_factory=dict)  # HF config kwargs on top of the preset
    attn_implementation: str = "fastlm"  # "fastlm", "sdpa" or "eager"
    patch: bool = True  # fastlm.patch(model): fused norms/rope/mlp/loss where available
    lora: LoraSettings | None = None  # e.g. --set model.lora.r=16; null = every weight trains


@dataclass
class DataConfig:
    path: str = "data/demo"  # a directory written by `fastlm prepare`
    # {prepared directory: weight, ...}: samples drawn from several datasets in these
    # proportions, in place of data.path (validation: each source's val split, and their
    # mix-weighted mean as val_loss)
    mix: dict | None = None
    prepare: dict | None = None  # if set and `path` is missing: fastlm.data.prepare(**prepare)
    block_size: int = 256
    mode: str = "random"  # "random" windows or "sequential" epochs
    boundaries: bool = False  # restart positions at document boundaries


@dataclass
class TrainConfig:
    # global = micro * accum * world: any two given -> the third; fewer -> micro 8 (per rank),
    # accum 1 (defaults that count as given would make "micro + global" an inconsistent triple)
    micro_batch_size: int | None = None
    grad_accum: int | None = None
    global_batch_size: int | None = None
    max_steps: int | None = None  # default 1000, unless train.epochs decides it
    # passes over the training split (its blocks; its pairs for DPO), as HF's
    # num_train_epochs: the run sets max_steps = ceil(epochs x samples / global batch) once the
    # data is open, and says so. A --set of one of the two overrides the other from the file.
    epochs: float | None = None
    # "fp32", "bf16", "fp16" (dynamic loss scaling), or "auto": bf16 where the hardware has bf16
    # matrix instructions (a GPU that supports it; a CPU with AVX-512 BF16 or AMX), else fp16 on
    # a GPU and fp32 on a CPU; the run logs and saves what it resolved to
    precision: str = "fp32"
    zero_stage: int = 0
    offload_optimizer: bool = False
    # "lm": next-token loss (pretraining, SFT); "dpo": preference pairs (`fastlm prepare
    # --preference`), the model against its starting point (see fastlm.train.dpo)
    objective: str = "lm"
    dpo_beta: float = 0.1  # how far the policy may move from the reference
    # "sigmoid": DPO's loss; "ipo": IPO's squared loss (Azar et al. 2023), which does not push
    # the margin on to infinity on pairs it already ranks right; without a reference model:
    # "simpo" (Meng et al. 2024; its paper's beta is 2-2.5) and "orpo" (Hong et al. 2024: beta
    # is its lambda, the odds-ratio term's weight beside the chosen answers' token loss)
    dpo_loss: str = "sigmoid"
    # conservative DPO: the share of pairs assumed mislabelled (sigmoid and simpo losses)
    dpo_label_smoothing: float = 0.0
    simpo_gamma: float = 0.5  # SimPO's target margin between the answers' mean log-probs
    # RPO: the chosen answers' mean token loss added at this weight (not with orpo, which has
    # its own)
    dpo_nll_weight: float = 0.0
    # the reference's log-probabilities of every pair computed once, at the start (saved with
    # the run for resuming): no frozen copy of the model (full-weight DPO under ZeRO-3) and no
    # reference forward a step (a third less compute; the reference runs in eval mode)
    dpo_precompute_reference: bool = False
    grad_clip: float = 1.0  # 0 = off
    seed: int = 1337
    # abort after this many optimizer steps in a row skipped for gradients that are not
    # finite (fp16 overflows, or a NaN/inf loss in any precision)
    max_consecutive_skips: int = 20
    deepspeed: str | None = None  # a DeepSpeed JSON of the user's; passes through
    compile: bool = False  # torch.compile the model
    # recompute each block's activations in the backward instead of keeping them: ~1/3 more
    # compute for activation memory that no longer grows with depth (big models, long blocks)
    activation_checkpointing: bool = False
    fused_loss: bool = True  # LM head + cross-entropy without the full logits (ZeRO-3: via patch)


@dataclass
class OptimConfig:
    name: str = "fused_adamw"  # or "adamw" (torch.optim.AdamW)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    # after the linear warmup: "cosine" or "linear" decay to min_lr, "constant" at lr, or
    # warmup-stable-decay: at lr, then a cooldown to min_lr at the end, "wsd" linear or
    # "wsd_sqrt" 1 - sqrt (a stable-phase checkpoint resumes into a longer run)
    schedule: str = "cosine"
    # the decay's length: cosine/linear from the end of warmup (default: the rest of the run);
    # wsd: the cooldown ending at max_steps (default: the last 20% of the run)
    decay_steps: int | None = None
    weight_decay: float = 0.1
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8


@dataclass
class EvalConfig:
    every: int = 250  # steps; 0 = only at the end
    batches: int = 20  # 0: no validation (data without a val split)
    patience: int | None = None  # stop after this many evals without a new best
    # a JSONL file of multiple-choice records (HellaSwag's ctx/endings/label): accuracy by
    # completion likelihood at every evaluation (choices_acc, choices_acc_norm)
    choices: str | None = None
    choices_limit: int | None = None  # the first N records only


@dataclass
class CheckpointConfig:
    every: int = 0  # steps; 0 = only at the end (and on SIGTERM/SIGINT)
    keep_last: int = 2
    keep_best: bool = True


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    progress: bool = True
    # Weights & Biases (pip install wandb): the run's metrics and samples, its config, the same
    # W&B run continued on resume; WANDB_API_KEY / WANDB_ENTITY / WANDB_MODE=offline as usual
    wandb: bool = False
    wandb_project: str = "fastlm"
    wandb_run_name: str | None = None  # default: out_dir's name


@dataclass
class SampleConfig:
    prompt: str = "\n"
    tokens: int = 0  # 0 = no sample at the end
    every: int = 0  # also sample every N steps while training (0: at the end only)
    temperature: float = 0.8
    top_k: int | None = 50
    top_p: float | None = None
    # the prompt as a user's message in the data's chat template; default: for fine-tuning
    # (--sft) data whose tokenizer has one
    chat: bool | None = None


@dataclass
class RunConfig:
    out_dir: str = "runs/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    export: bool = False  # write an HF directory to out_dir/hf at the end

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_CHOICES = {
    "model.attn_implementation": ("fastlm", "sdpa", "eager"),
    "data.mode": ("random", "sequential"),
    "train.precision": ("fp32", "bf16", "fp16", "auto"),
    "train.zero_stage": (0, 1, 2, 3),
    "optim.name": ("fused_adamw", "adamw"),
    "train.objective": ("lm", "dpo"),
    "train.dpo_loss": ("sigmoid", "ipo", "simpo", "orpo"),
    "optim.schedule": ("cosine", "linear", "constant", "wsd", "wsd_sqrt"),
}


def model_config(saved: dict) -> ModelConfig:
    """The ModelConfig of a saved run config's ``model`` section."""
    return _build(ModelConfig, saved, "model.")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config (or the defaults), apply ``key=value`` overrides, validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found (give a YAML file; see configs/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    from_file = dict(raw.get("train") or {}) if isinstance(raw.get("train"), dict) else {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. train.max_steps=100")
        _assign(raw, key.strip(), yaml.safe_load(value) if value.strip() else None)
        # the command line's length of run replaces the file's other one
        other = {"train.epochs": "max_steps", "train.max_steps": "epochs"}.get(key.strip())
        if other and other in from_file and raw["train"].get(other) == from_file[other]:
            raw["train"].pop(other)
    cfg = _build(RunConfig, raw, "")
    if cfg.train.epochs is None and cfg.train.max_steps is None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=1000))
    validate(cfg)
    return cfg


def _assign(raw: dict, dotted: str, value) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for p in parents:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p} is not a section")
        node = nxt
    node[leaf] = value


def _build(cls, raw, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(key, names, n=1)
        hint = f"; did you mean '{prefix}{close[0]}'?" if close else f"; known: {sorted(names)}"
        raise ConfigError(f"unknown config key '{prefix}{key}'{hint}")
    kwargs = {}
    for name, value in raw.items():
        tp = hints[name]
        optional = [t for t in typing.get_args(tp) if dataclasses.is_dataclass(t)]
        if optional:  # a section that may be null (off), e.g. model.lora
            if value is True or value is False:  # model.lora=true: the defaults
                value = {} if value else None
            kwargs[name] = None if value is None else _build(optional[0], value,
                                                             f"{prefix}{name}.")
        elif dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(value, tp, key: str):
    options = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    for opt in options:
        if opt is type(None):
            continue
        origin = typing.get_origin(opt) or opt
        if origin is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, str):
            try:
                return float(value)  # YAML reads "1e-3" as a string
            except ValueError:
                pass
        if origin in (str, bool, dict, list) and isinstance(value, origin):
            return value
    want = " or ".join("null" if o is type(None) else getattr(o, "__name__", str(o))
                       for o in options)
    raise ConfigError(f"config key {key!r} must be {want}, got {value!r} "
                      f"({type(value).__name__})")


def resolve_epochs(cfg: RunConfig, samples: int, global_batch: int,
                   what: str = "blocks") -> tuple[RunConfig, str | None]:
    """``cfg`` with train.max_steps from train.epochs (and epochs dropped: the run, its saved
    config and a resume count steps), and the note the run prints; ``samples``: the training
    split's blocks (pairs for DPO) an epoch."""
    t = cfg.train
    if t.epochs is None:
        return cfg, None
    import math

    steps = max(1, math.ceil(t.epochs * samples / global_batch))
    out = dataclasses.replace(cfg, train=dataclasses.replace(t, max_steps=steps, epochs=None))
    validate(out)
    return out, (f"train.epochs={t.epochs:g} -> train.max_steps={steps} ({samples:,} {what} "
                 f"an epoch, {global_batch} a step)")


def _check_sampling(s: SampleConfig) -> None:
    """The end-of-run (and every-N-steps) sample's settings: transformers takes a top_p of 2 or
    a negative temperature without a word and samples something meaningless."""
    if s.temperature < 0 or s.tokens < 0 or s.every < 0:
        raise ConfigError(f"sample.temperature, sample.tokens and sample.every must be >= 0 "
                          f"(temperature 0 = greedy), got {s.temperature}, {s.tokens}, "
                          f"{s.every}")
    if s.top_k is not None and s.top_k < 0:
        raise ConfigError(f"sample.top_k must be >= 0 (0 or null = off), got {s.top_k}")
    if s.top_p is not None and not 0 < s.top_p <= 1:
        raise ConfigError(f"sample.top_p must be in (0, 1] (null = off), got {s.top_p}")


def validate(cfg: RunConfig) -> None:
    for key, allowed in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"config key {key!r} must be one of {list(allowed)}, got {value!r}")
    if cfg.train.epochs is not None and cfg.train.max_steps is not None:
        raise ConfigError(f"give one of train.max_steps ({cfg.train.max_steps}) and "
                          f"train.epochs ({cfg.train.epochs}), not both")
    if cfg.train.epochs is not None and not cfg.train.epochs > 0:
        raise ConfigError(f"config key 'train.epochs' must be > 0, got {cfg.train.epochs}")
    if cfg.train.epochs is not None and cfg.data.mix is not None:
        raise ConfigError("train.epochs counts passes over one dataset (data.path); with "
                          "data.mix give train.max_steps (the run's header shows the epochs "
                          "of each source)")
    positive = {"data.block_size": cfg.data.block_size,
                "train.max_steps": 1 if cfg.train.max_steps is None else cfg.train.max_steps,
                "log.every": cfg.log.every,
                "checkpoint.keep_last": cfg.checkpoint.keep_last}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {value}")
    if cfg.eval.batches < 0:
        raise ConfigError(f"config key 'eval.batches' must be >= 1 (or 0: no validation), got "
                          f"{cfg.eval.batches}")
    if cfg.eval.batches == 0:
        for key, value in (("eval.patience", cfg.eval.patience),
                           ("eval.choices", cfg.eval.choices)):
            if value is not None:
                raise ConfigError(f"{key} runs at validations, which eval.batches=0 turns off: "
                                  f"drop {key} or give eval.batches >= 1")
    o = cfg.optim
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        raise ConfigError(f"optim.lr must be > 0 and 0 <= optim.min_lr <= optim.lr, got "
                          f"lr={o.lr}, min_lr={o.min_lr}")
    if o.warmup_steps < 0 or (o.decay_steps is not None and o.decay_steps < 1):
        raise ConfigError(f"optim.warmup_steps must be >= 0 and optim.decay_steps >= 1 (or "
                          f"null), got {o.warmup_steps} and {o.decay_steps}")
    if o.schedule.startswith("wsd") and o.decay_steps is not None \
            and cfg.train.max_steps is not None \
            and o.warmup_steps + o.decay_steps > cfg.train.max_steps:
        raise ConfigError(f"optim.schedule={o.schedule}: warmup ({o.warmup_steps}) and cooldown "
                          f"(optim.decay_steps={o.decay_steps}) do not fit in "
                          f"train.max_steps={cfg.train.max_steps}")
    if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {o.betas}")
    if o.weight_decay < 0 or o.eps <= 0:
        raise ConfigError(f"optim.weight_decay must be >= 0 and optim.eps > 0, got "
                          f"{o.weight_decay} and {o.eps}")
    if cfg.train.grad_clip < 0:
        raise ConfigError(f"train.grad_clip must be >= 0 (0 = no clipping), got "
                          f"{cfg.train.grad_clip}")
    _check_sampling(cfg.sample)
    if cfg.data.mix is not None and cfg.data.prepare is not None:
        raise ConfigError("data.mix takes prepared directories: prepare each with `fastlm "
                          "prepare INPUT --out DIR` (one tokenizer for all) and drop data.prepare")
    t = cfg.train
    if t.objective == "dpo" and (cfg.data.mix is not None or t.dpo_beta <= 0
                                 or not 0 <= t.dpo_label_smoothing < 0.5 or t.simpo_gamma < 0
                                 or t.dpo_nll_weight < 0):
        raise ConfigError("train.objective=dpo takes one prepared directory of preference "
                          "pairs (data.path, not data.mix), train.dpo_beta > 0, "
                          "train.dpo_label_smoothing in [0, 0.5), train.simpo_gamma >= 0 and "
                          "train.dpo_nll_weight >= 0")
    if t.dpo_precompute_reference and t.dpo_loss in ("simpo", "orpo"):
        raise ConfigError(f"train.dpo_precompute_reference: train.dpo_loss={t.dpo_loss} has no "
                          f"reference model; drop one of them")
    if t.dpo_nll_weight and t.dpo_loss == "orpo":
        raise ConfigError("train.dpo_nll_weight adds the chosen answers' token loss, which "
                          "train.dpo_loss=orpo has already: drop one of them")
    if t.dpo_label_smoothing and t.dpo_loss not in ("sigmoid", "simpo"):
        raise ConfigError(f"train.dpo_label_smoothing applies to the sigmoid and simpo losses, "
                          f"not train.dpo_loss={t.dpo_loss}: drop one of them")
    lora = cfg.model.lora
    if lora is not None and (lora.r < 1 or lora.alpha <= 0 or not 0 <= lora.dropout < 1
                             or not lora.target_modules):
        raise ConfigError(f"model.lora: r must be >= 1, alpha > 0, dropout in [0, 1) and "
                          f"target_modules not empty, got {lora}")
    if cfg.model.preset is None and cfg.model.pretrained is None:
        raise ConfigError("set model.preset (e.g. tiny-gpt2) or model.pretrained (a local HF dir)")


DEFAULT_MICRO_BATCH = 8


def resolve_batch(train: TrainConfig, world_size: int) -> tuple[int, int, int]:
    """(micro, accum, global) from any two of them; an inconsistent triple names all three."""
    micro, accum, glob = train.micro_batch_size, train.grad_accum, train.global_batch_size
    given = f"(micro_batch_size={micro}, grad_accum={accum}, global_batch_size={glob}, " \
            f"world_size={world_size})"
    for name, v in (("micro_batch_size", micro), ("grad_accum", accum),
                    ("global_batch_size", glob)):
        if v is not None and v < 1:
            raise ConfigError(f"train.{name} must be >= 1 {given}")
    if glob is None:  # the defaults fill what is not given
        micro, accum = micro or DEFAULT_MICRO_BATCH, accum or 1
    elif micro is None and accum is None:
        raise ConfigError(f"train.global_batch_size alone: give train.micro_batch_size or "
                          f"train.grad_accum too {given}")
    if glob is None:
        glob = micro * accum * world_size
    elif micro is None:
        micro, rem = divmod(glob, accum * world_size)
        if rem or micro < 1:
            raise ConfigError(f"train.global_batch_size is not a multiple of "
                              f"grad_accum x world_size {given}")
    elif accum is None:
        accum, rem = divmod(glob, micro * world_size)
        if rem or accum < 1:
            raise ConfigError(f"train.global_batch_size is not a multiple of "
                              f"micro_batch_size x world_size {given}")
    if micro * accum * world_size != glob:
        raise ConfigError(f"inconsistent batch sizes: micro_batch_size x grad_accum x world_size "
                          f"= {micro * accum * world_size} != global_batch_size {given}")
    return micro, accum, glob
