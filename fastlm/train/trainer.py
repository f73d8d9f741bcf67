"""The training run: data, model, DeepSpeed engine, loop, eval, checkpoints, sample, export.

One code path for one process and for a DeepSpeed launch on many nodes: a plain
``fastlm train`` is a world of one. The loss curve depends only on (config, seed), so a run
resumed from a checkpoint repeats the uninterrupted run's losses exactly (same batches: the
loader's position is the step; same dropout: every rank's RNG state is saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fastlm import _gc
from fastlm.data.format import FormatError
from fastlm.data.loader import IGNORE_INDEX, Batch, BlockLoader
from fastlm.train import checkpoint as ckpt
from fastlm.train import dist as fdist
from fastlm.train import runlock
from fastlm.train.config import ConfigError, RunConfig, resolve_batch, resolve_epochs
from fastlm.train.dpo import REFERENCE_FREE, PairFlops, row_lengths
from fastlm.train.dpo import STATS as DPO_STATS
from fastlm.train.engine import (
    deepspeed_config,
    initialize,
    release,
    resolve_precision,
    schedule_note,
)
from fastlm.train.metrics import MetricsLog
from fastlm.train.model import (
    build_model,
    check_context,
    check_tokenizer,
    enable_activation_checkpointing,
    flops_per_token,
    hidden_size,
    param_groups,
)
from fastlm.train.plan import epoch_samples, header

logger = logging.getLogger("fastlm")

# Peak dense bf16/fp16 tensor-core TFLOP/s by device name, for MFU (fp32 runs use the same
# figure: MFU is reported against what the hardware could do).


class TrainingAborted(RuntimeError):
    user_facing = True


@dataclass
class RunState:
    step: int = 0
    best_val: float = math.inf
    best_tag: str | None = None
    evals_since_best: int = 0
    history: list = field(default_factory=list)  # (step, loss) of every logged step


class _Signals:
    """SIGTERM, SIGINT and SIGUSR1 set a flag; the loop saves a checkpoint at the next step and
    exits (128 + the signal). SIGUSR1 is what SLURM sends ahead of a job's time limit when
    asked (``#SBATCH --signal=USR1@120``); its default action killed the run unsaved."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in self.SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def train(cfg: RunConfig, *, resume: str | None = None) -> RunState:
    """Run ``cfg``; ``resume``: None (fresh; refuses a run dir holding checkpoints), "auto"
    (continue from the latest checkpoint if any) or a checkpoint path."""
    rank, local_rank, world = fdist.init()
    dev = fdist.device(local_rank)
    precision, why = resolve_precision(cfg.train.precision, dev)
    resolved_note = None
    if precision != cfg.train.precision:  # "auto": the run (and its saved config) says which
        resolved_note = f"train.precision=auto -> {precision} ({why})"
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
    if cfg.train.precision == "fp16" and dev.type != "cuda":
        raise ConfigError("train.precision=fp16 needs a GPU (DeepSpeed has no fp16 on the CPU); "
                          "use train.precision=bf16 or fp32 here")
    if cfg.log.wandb and rank == 0:  # before anything is built or written
        from fastlm.train.metrics import require_wandb

        require_wandb()
    micro, accum, glob = resolve_batch(cfg.train, world)
    out_dir = Path(cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    if resume is None and ckpt_dir.is_dir() and (ckpt_dir / "latest").exists():
        raise ConfigError(f"{out_dir} already holds checkpoints: pass --resume auto to "
                          f"continue, or choose another out_dir")
    if resume not in (None, "auto"):
        try:  # before anything is built: a mistyped path was a traceback after the engine
            ckpt.resolve(resume)
        except (FileNotFoundError, RuntimeError) as exc:
            raise ConfigError(f"--resume {resume}: {exc}") from exc

    data_dir = _ensure_data(cfg, rank)
    if cfg.model.pretrained:
        check_tokenizer(cfg.model.pretrained, data_dir)
    train_loader = _loader(cfg, data_dir, micro, "train", rank=rank, world_size=world,
                           seed=cfg.train.seed, mode=cfg.data.mode)
    # eval.batches=0: no validation (data prepared without a val split)
    val_loader = _val_loader(cfg, data_dir, micro, rank, world) if cfg.eval.batches else []
    epochs_note = None
    if cfg.train.epochs is not None:  # one dataset (a mixture is refused with epochs)
        samples, what = epoch_samples(train_loader)
        cfg, epochs_note = resolve_epochs(cfg, samples, glob, what)
    choices = _choices(cfg, data_dir)
    vocab = train_loader.split.vocab_size

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    model = build_model(cfg.model, vocab, cfg.data.block_size,
                        eos_id=train_loader.split.eos_id).to(dev)
    if cfg.model.pretrained:
        check_context(model, cfg.data.block_size)
    lora_note = None
    if cfg.model.lora is not None:  # counted before ZeRO-3 partitions the parameters
        from fastlm.train.lora import summary

        lora_note = summary(model, cfg.model.lora)
    if cfg.train.activation_checkpointing:
        enable_activation_checkpointing(model)
    if cfg.train.compile:
        # in place (nn.Module.compile): parameter names, checkpoint keys and the patch handle
        # stay the model's own (torch.compile(model) wrapped it: keys under "_orig_mod.", which
        # export could not load)
        model.compile()
    fpt = flops_per_token(model, cfg.data.block_size)
    dpo = None
    if cfg.train.objective == "dpo":
        from fastlm.train.dpo import objective

        dpo = objective(cfg, model, dev)  # its reference: the starting weights
        fpt = None  # rows of pairs of their own lengths: counted a batch at a time
    ds_config = deepspeed_config(cfg, micro, accum, glob, hidden_size=hidden_size(model))
    # counted before ZeRO-3 partitions the parameters
    head = header(cfg, model, train_loader, world=world, micro=micro, accum=accum, glob=glob,
                  ds_config=ds_config)
    # before anything in out_dir is read (a checkpoint to resume) or written
    with runlock.hold(out_dir, rank, dev):
        engine, _, scheduler = initialize(cfg, model, param_groups(model, cfg.optim.weight_decay),
                                          ds_config)
        try:
            # before any RNG state is restored: it draws random inputs
            peak = _peak_flops(dev, cfg.train.precision)
            torch.manual_seed(cfg.train.seed + 1 + rank)  # dropout streams differ across ranks

            state = RunState()
            if resume is not None:
                state = _resume(engine, resume, ckpt_dir, rank, world, train_loader,
                                cfg.train.precision)

            log = MetricsLog(out_dir, rank, total=cfg.train.max_steps, start=state.step,
                             tensorboard=cfg.log.tensorboard, progress=cfg.log.progress,
                             wandb=_wandb_init(cfg, out_dir))
            log.write(head)
            for note in (resolved_note, epochs_note, schedule_note(cfg)):
                if note:
                    log.write(note)
            if lora_note and state.step == 0:
                log.write(lora_note)
            if resume is not None and state.step >= cfg.train.max_steps:
                # a requeued job after the end, or a max_steps below the checkpoint's: it ran
                # nothing, silently, and exported the checkpoint again
                log.write(f"resumed at step {state.step}, train.max_steps is "
                          f"{cfg.train.max_steps}: nothing left to train (set train.max_steps "
                          f"above {state.step} to go on)")
            if rank == 0:
                out_dir.mkdir(parents=True, exist_ok=True)
                _save_run_files(cfg, out_dir, data_dir)
            fused = _fused_loss(cfg, engine.module)
            if dpo is not None and cfg.train.dpo_precompute_reference:
                _precomputed_reference(cfg, engine, train_loader, val_loader, state, log, rank,
                                       world, dev, micro, _head_fused(engine, fused))
            try:
                with _Signals() as signals, _gc.loop():
                    _loop(cfg, engine, scheduler, train_loader, val_loader, state, log, signals,
                          fused=fused, ckpt_dir=ckpt_dir, rank=rank, dev=dev, accum=accum,
                          tokens_per_step=glob * cfg.data.block_size, fpt=fpt,
                          peak=peak * world if peak else None, data_dir=data_dir,
                          choices=choices, dpo=dpo)
                if cfg.sample.tokens > 0 and state.step >= cfg.train.max_steps:
                    _log_sample(cfg, engine, log, rank, data_dir, dev, state.step, end=True)
            finally:
                log.close()
        finally:
            release(engine)  # a failed resume too: train() called again holds none of it
        if cfg.export and state.step >= cfg.train.max_steps:
            fdist.barrier()
            if rank == 0:
                from fastlm.train.export import export

                export(out_dir, out_dir / "hf", overwrite=True)
    return state


_PAIR_LOSSES = {"sigmoid": "DPO", "ipo": "IPO", "simpo": "SimPO", "orpo": "ORPO"}


def _pair_loss_name(cfg: RunConfig) -> str:
    """The preference objective the val loss is (it said "DPO" for IPO, SimPO and ORPO too)."""
    name = _PAIR_LOSSES[cfg.train.dpo_loss]
    return name + " + NLL" if cfg.train.dpo_nll_weight and cfg.train.dpo_loss != "orpo" else name


def _loop(cfg, engine, scheduler, loader, val_loader, state, log, signals, *, fused, ckpt_dir,
          rank, dev, accum, tokens_per_step, fpt, peak, data_dir=None, choices=None, dpo=None):
    model_dtype = next(engine.module.parameters()).dtype
    head_fused = _head_fused(engine, fused)
    if fused and cfg.train.zero_stage == 3 and not _patched_loss(engine.module):
        logger.warning("train.fused_loss under ZeRO-3 runs through fastlm.patch's loss, which "
                       "this model does not have (model.patch=false or an unsupported type): "
                       "training computes the full logits")
    skipped_before, consecutive_skips = _skipped(engine), 0
    window_t0, window_steps, window_loss = time.perf_counter(), 0, 0.0
    # DPO's reward accuracy, margin and log-probs; its pairs' tokens and FLOPs
    window_stats, window_tokens, window_flops = [0.0] * len(DPO_STATS), 0.0, 0.0
    world = engine.dp_world_size
    if dpo is not None:
        dpo_flops = PairFlops(engine.module, dpo.kind not in REFERENCE_FREE)
    kill_at = os.environ.get("FASTLM_TEST_KILL_AT_STEP")
    overflow_at = os.environ.get("FASTLM_TEST_OVERFLOW_AT_STEP")
    # DeepSpeed records the global gradient norm in its ZeRO/fp16/bf16 optimizers only; without
    # those (fp32, or bf16 with FusedAdamW's masters) and no ZeRO the norm comes from FusedAdamW's folded clip (which computes it
    # anyway, fastlm.integrations.deepspeed), or else the trainer measures it on logging steps
    own_norm = (not engine.zero_optimization()
                and not (engine.bfloat16_enabled() or engine.fp16_enabled())
                and not (cfg.train.grad_clip > 0
                         and getattr(engine, "fastlm_clip_reports_norm", False)))
    grad_norm = None
    while state.step < cfg.train.max_steps:
        loss_sum, stats_sum, pair_tokens, pair_flops = 0.0, [0.0] * len(DPO_STATS), 0, 0.0
        log_step = (state.step + 1) % cfg.log.every == 0 or state.step + 1 == cfg.train.max_steps
        for micro in range(accum):
            batch = next(loader).to(dev)
            if dpo is None:
                loss = _loss(engine, batch, model_dtype, fused)
            else:
                loss, stats = dpo.loss(engine, batch, head_fused)
                stats_sum = [a + b for a, b in zip(stats_sum, stats.tolist())]
                lengths = row_lengths(batch).tolist()
                pair_tokens += sum(lengths)
                pair_flops += dpo_flops.of(lengths)
            if overflow_at is not None and state.step + 1 == int(overflow_at):
                loss = loss * float("inf")  # fault injection: an fp16 overflow this step
            engine.backward(loss)
            if own_norm and log_step and micro == accum - 1:
                grad_norm = _grads_norm(engine.module)  # reduced, not yet clipped
            engine.step()
            loss_sum += loss.item()
        state.step += 1
        skipped_now = _skipped(engine)
        consecutive_skips = consecutive_skips + 1 if skipped_now > skipped_before else 0
        skipped_before = skipped_now
        if consecutive_skips >= cfg.train.max_consecutive_skips:
            why = (f"overflowing fp16 gradients (loss scale {_loss_scale(engine)})"
                   if engine.fp16_enabled() else "gradients that are not finite (NaN or inf)")
            fix = "use train.precision=bf16, " if engine.fp16_enabled() else ""
            raise TrainingAborted(
                f"{consecutive_skips} optimizer steps in a row were skipped for {why}; the run "
                f"is diverging: lower optim.lr, {fix}or raise train.max_consecutive_skips")
        step_loss, *step_stats = fdist.means(
            [loss_sum / accum] + ([x / accum for x in stats_sum] + [pair_tokens, pair_flops]
                                  if dpo is not None else []), dev)
        state.history.append((state.step, step_loss))
        window_steps += 1
        window_loss += step_loss
        if dpo is not None:  # the pairs' tokens and FLOPs: a rank's mean times the ranks
            *step_stats, tokens, flops = step_stats
            window_stats = [a + b for a, b in zip(window_stats, step_stats)]
            window_tokens += tokens * world
            window_flops += flops * world
        if state.step % cfg.log.every == 0 or state.step == cfg.train.max_steps:
            dt = time.perf_counter() - window_t0
            if dpo is None:
                tps = tokens_per_step * window_steps / dt
                mfu = tps * fpt / peak if peak and fpt else None
            else:
                tps, mfu = window_tokens / dt, window_flops / dt / peak if peak else None
            row = {"loss": window_loss / window_steps, "lr": scheduler.get_last_lr()[0],
                   "tokens_per_s": tps, "mfu": mfu,
                   "grad_norm": grad_norm if own_norm else _grad_norm(engine),
                   "loss_scale": _loss_scale(engine),
                   "skipped_steps": skipped_now}
            if dpo is not None:  # see fastlm.train.dpo.STATS
                row.update({k: v / window_steps for k, v in zip(DPO_STATS, window_stats)})
            log.log(state.step, **row)
            log.progress(state.step, _postfix(row))
            window_t0, window_steps, window_loss = time.perf_counter(), 0, 0.0
            window_stats, window_tokens, window_flops = [0.0] * len(DPO_STATS), 0.0, 0.0
        done = state.step >= cfg.train.max_steps
        stop_early = False
        paused_at = time.perf_counter()  # validation, samples and saves are not training time
        if val_loader and ((cfg.eval.every and state.step % cfg.eval.every == 0) or done):
            with _eager(engine):
                stop_early = _evaluate(cfg, engine, val_loader, state, log, ckpt_dir, rank, dev,
                                       model_dtype, loader, fused, choices, dpo)
        if cfg.sample.tokens > 0 and cfg.sample.every and state.step % cfg.sample.every == 0 \
                and not done:
            _log_sample(cfg, engine, log, rank, data_dir, dev, state.step)
        save_due = cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0
        interrupted = fdist.any_true(signals.received is not None, dev)
        if save_due or done or stop_early or interrupted:
            _save(engine, cfg, ckpt_dir, state, loader, rank)
        # off the window's clock: tokens/s and MFU fell ~20x in the window after each
        # validation and checkpoint
        window_t0 += time.perf_counter() - paused_at
        if kill_at is not None and state.step == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection for the resume tests
        if interrupted:
            log.write(f"signal received: checkpoint saved at step {state.step}; exiting")
            raise SystemExit(128 + (signals.received or signal.SIGTERM))
        if stop_early:
            log.write(f"early stop at step {state.step}: no better validation loss in "
                      f"{cfg.eval.patience} evaluations")
            break


def _postfix(row: dict) -> dict:
    """The progress bar's view of a logged row: loss, lr, tokens/s, MFU, the gradient norm
    and, in fp16, the loss scale (DPO: the reward accuracy too); what a run lacks is left out."""
    def fmt(key, spec):
        return format(row[key], spec) if row.get(key) is not None else None

    return {"loss": fmt("loss", ".4f"), "lr": fmt("lr", ".2e"), "tok/s": fmt("tokens_per_s", ",.0f"),
            "mfu": fmt("mfu", ".1%") if row.get("mfu") else None,
            "gnorm": fmt("grad_norm", ".3g"), "scale": fmt("loss_scale", "g"),
            "acc": fmt("reward_acc", ".2f")}


def _fused_loss(cfg, module) -> bool:
    """train.fused_loss where it computes the model's own loss: causal LMs whose forward was read
    to hand the head's output straight to the loss, or to soft-cap it or scale it (which the
    fused path does too). Other types compute the logits: a fused head that missed a step of
    their forward would train on a different loss (it missed Granite's and Cohere's scales)."""
    if not cfg.train.fused_loss:
        return False
    from fastlm.integrations._patch_loss import loss_unsupported

    why = loss_unsupported(module)
    if why is not None:
        logger.warning("train.fused_loss: not for this model (%s); training computes the full "
                       "logits", why)
        return False
    return True


def _head_fused(engine, fused: bool) -> bool:
    """Whether the fused LM head + loss can run on the final hidden states (evaluation, DPO):
    it reads the head's weight, which ZeRO-3 gathers only inside the head module's call, where
    fastlm.patch's head computes it."""
    return fused and (engine.zero_optimization_stage() < 3 or _patched_loss(engine.module))


def _patched_loss(module) -> bool:
    handle = module.__dict__.get("_fastlm_patch")
    return handle is not None and "loss" in handle.swapped


def _inputs(engine, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> dict:
    kwargs = {"input_ids": input_ids, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    elif getattr(getattr(engine, "module", None), "_compiled_call_impl", None) is not None:
        # Without a mask, a traced transformers forward adds its packed-sequence check as
        # closures dynamo cannot read, and fastlm's attention falls back to SDPA; with one
        # (all ones: blocks have no padding) its mask is plain causal and the kernel runs.
        kwargs["attention_mask"] = torch.ones_like(input_ids)
    return kwargs


def _loss(engine, batch: Batch, model_dtype, fused: bool = False) -> torch.Tensor:
    kwargs = _inputs(engine, batch.input_ids, batch.position_ids)
    if fused and engine.module.training and _patched_loss(engine.module):
        # fastlm.patch's fused loss: computed inside the LM head module's call, where ZeRO-3
        # has gathered its weight; the loader's targets are already the next tokens
        return engine(**kwargs, labels=batch.targets, shift_labels=batch.targets).loss
    # below: the fused loss on the final hidden states; under ZeRO-3 only through a patched
    # head (its module call gathers the partitioned weight), else the full logits
    if _head_fused(engine, fused):
        # the model stops at the final hidden states (logits for one position only); the
        # LM head and the loss run chunked, never holding (B*T, V) logits
        out = engine(**kwargs, output_hidden_states=True, logits_to_keep=1)
        return _head_loss(engine, out.hidden_states[-1], batch.targets)
    logits = engine(**kwargs).logits  # (B, T, V)
    return F.cross_entropy(logits.float().flatten(0, 1), batch.targets.flatten(),
                           ignore_index=IGNORE_INDEX)


def _head_loss(engine, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The fused LM head + cross-entropy on final hidden states (B, T, H): mean over targets."""
    from fastlm.integrations._patch_loss import head_loss

    return head_loss(engine.module, hidden, targets, ignore_index=IGNORE_INDEX)


# Evaluation runs small batches through the model together, up to this many tokens a forward:
# 20 batches of 12 x 64 tokens (the Shakespeare recipe) took 135 ms one by one and 80 ms ten at
# a time, the per-call overheads paid once per group. Batches of 8192 tokens or more run alone.
_EVAL_GROUP_TOKENS = 8192


@torch.no_grad()
def evaluate_loss(engine, val_loader: BlockLoader, batches: int, dev, model_dtype,
                  fused: bool = False) -> float:
    """Mean validation loss over the same ``batches`` batches every time, all ranks.

    Each batch's loss is its own mean, as if it ran alone, whether or not it went through the
    model grouped with others (grouping needs the fused loss, which computes no full logits, and
    plain blocks without position ids)."""
    engine.eval()
    total = 0.0
    i = 0
    while i < batches:
        first = val_loader.batch_at(i)
        group = [first]
        if fused and first.position_ids is None and first.cu_seqlens is None:
            per = max(1, _EVAL_GROUP_TOKENS // first.input_ids.numel())
            group += [val_loader.batch_at(j) for j in range(i + 1, min(batches, i + per))]
        i += len(group)
        if len(group) == 1:
            total += _loss(engine, first.to(dev), model_dtype, fused).item()
            continue
        ids = torch.cat([b.input_ids for b in group]).to(dev)
        out = engine(**_inputs(engine, ids), output_hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1].split(first.input_ids.shape[0])
        total += sum(_head_loss(engine, h, b.targets.to(dev)) for h, b in zip(hidden, group)).item()
    engine.train()
    return fdist.mean(total / batches, dev)


@torch.no_grad()
def _evaluate_dpo(engine, val_loader, batches: int, dev, dpo,
                  fused: bool = False) -> tuple[float, float, float]:
    """Mean DPO loss and reward accuracy and margin over the same ``batches`` val batches,
    all ranks."""
    engine.eval()
    sums = [0.0] * 3
    for i in range(batches):
        batch_loss, stats = dpo.loss(engine, val_loader.batch_at(i).to(dev), fused)
        sums = [a + b for a, b in zip(sums, [batch_loss.item(), *stats.tolist()[:2]])]
    engine.train()
    return tuple(fdist.means([x / batches for x in sums], dev))


def _evaluate(cfg, engine, val_loader, state, log, ckpt_dir, rank, dev, model_dtype,
              loader, fused, choices=None, dpo=None) -> bool:
    quality = {}  # per-objective measures logged with the validation loss
    if dpo is not None:
        loss, acc, margin = _evaluate_dpo(engine, val_loader[0][2], cfg.eval.batches, dev, dpo,
                                          _head_fused(engine, fused))
        parts = [(None, 1.0, loss)]
        quality.update(val_reward_acc=acc, val_reward_margin=margin)
    else:
        parts = [(name, weight, evaluate_loss(engine, ld, cfg.eval.batches, dev, model_dtype,
                                              _head_fused(engine, fused)))
                 for name, weight, ld in val_loader]
    # with data.mix: the mixture's expected loss, each source's weighted by its share
    val = sum(weight * loss for _, weight, loss in parts)
    if dpo is None:
        quality["val_ppl"] = math.exp(min(val, 50.0))
    each = {f"val_loss/{name}": loss for name, _, loss in parts if name is not None}
    said = ""
    if choices is not None:  # multiple-choice accuracy (eval.choices), every rank a share
        from fastlm.train.choices import accuracy
        from fastlm.train.generate import context_length

        records, tok = choices
        res = accuracy(engine.module, tok, records, device=dev,
                       max_length=context_length(engine.module), rank=rank,
                       world=engine.dp_world_size, fused=fused)
        each.update(choices_acc=res.acc, choices_acc_norm=res.acc_norm)
        said = f"; choices accuracy {res.acc:.4f} (per token {res.acc_norm:.4f})"
    log.log(state.step, val_loss=val, **quality, **each)
    sources = ", ".join(f"{name} {loss:.4f}" for name, _, loss in parts if name is not None)
    measure = (f"perplexity {quality['val_ppl']:.2f}" if dpo is None else
               f"reward accuracy {quality['val_reward_acc']:.3f} ({_pair_loss_name(cfg)} loss)")
    log.write(f"step {state.step}: val loss {val:.4f}, {measure}"
              + (f" ({sources})" if sources else "") + said)
    if val < state.best_val:
        state.best_val, state.evals_since_best = val, 0
        if cfg.checkpoint.keep_best:
            state.best_tag = ckpt.tag_for(state.step)
            _save(engine, cfg, ckpt_dir, state, loader, rank)
            if rank == 0:
                ckpt.mark_best(ckpt_dir, state.best_tag)
        return False
    state.evals_since_best += 1
    return cfg.eval.patience is not None and state.evals_since_best >= cfg.eval.patience


def _save(engine, cfg, ckpt_dir, state, loader, rank) -> None:
    if (ckpt_dir / ckpt.tag_for(state.step) / ckpt.COMPLETE).exists():
        return  # already saved at this step (e.g. as the best)
    payload = {"step": state.step, "best_val": state.best_val, "best_tag": state.best_tag,
               "evals_since_best": state.evals_since_best, "loader": loader.state_dict(),
               "vocab_size": loader.split.vocab_size, "eos_id": loader.split.eos_id,
               "global_batch": engine.train_batch_size(),
               # the engine's, which a DeepSpeed JSON of the user's may set, not train.zero_stage
               "zero_stage": int(engine.zero_optimization_stage()), "config": cfg.to_dict()}
    ckpt.save(engine, ckpt_dir, state.step, payload, rank, keep_last=cfg.checkpoint.keep_last,
              best_tag=state.best_tag)


def _stage_family(stage: int) -> int:
    """ZeRO stages whose checkpoints load into each other: 0, 1-2 (one layout), 3."""
    return {0: 0, 1: 1, 2: 1}.get(stage, 3)


REFERENCE_FILE = "reference_logps.pt"


def _precomputed_reference(cfg, engine, train_loader, val_loader, state, log, rank, world, dev,
                           micro, fused: bool) -> None:
    """train.dpo_precompute_reference: every pair's log-probabilities under the starting model,
    computed by all ranks when the run starts and saved beside its checkpoints (a resumed run's
    model is no longer the reference: it reads them back), handed to the pair loaders."""
    from fastlm.train.dpo import reference_logps

    path = Path(cfg.out_dir) / REFERENCE_FILE
    loaders = {"train": train_loader, **({"val": val_loader[0][2]} if val_loader else {})}
    if state.step == 0:
        log.write(f"computing the reference's log-probabilities of "
                  f"{sum(ld.pairs for ld in loaders.values())} pairs (train.dpo_precompute_"
                  f"reference)")
        tables = {name: reference_logps(engine, ld, micro, rank, world, dev, fused,
                                        progress=rank == 0 and cfg.log.progress)
                  for name, ld in loaders.items()}
        if rank == 0:
            tmp = path.with_name(path.name + ".tmp")
            torch.save(tables, tmp)
            os.replace(tmp, path)
        fdist.barrier()
    else:
        if not path.is_file():
            raise ConfigError(f"train.dpo_precompute_reference: {path} is missing (the run "
                              f"started without the setting, or the file was removed): resume "
                              f"with --set train.dpo_precompute_reference=false")
        tables = torch.load(path, map_location="cpu", weights_only=True)
        for name, ld in loaders.items():
            if tables[name].shape[0] != ld.pairs:
                raise ConfigError(f"{path} holds {tables[name].shape[0]} {name} pairs, the data "
                                  f"{ld.pairs}: the run started on other data")
    for name, ld in loaders.items():
        ld.reference = tables[name]


def _resume(engine, resume: str, ckpt_dir: Path, rank: int, world: int, loader: BlockLoader,
            precision: str) -> RunState:
    if resume == "auto":
        tag = ckpt.latest_tag(ckpt_dir) if ckpt_dir.is_dir() else None
        if tag is None:
            return RunState()
        where = ckpt_dir
    else:
        where, tag = ckpt.resolve(resume)
    damage = ckpt.damaged_file(where, tag)  # every rank: the same files, the same verdict
    if damage is not None:
        earlier = [t for t in ckpt.complete_tags(where) if t < tag]
        fix = (f"resume from an earlier one with --resume {where / earlier[-1]}"
               if earlier else "no earlier checkpoint is there: start afresh in another out_dir")
        raise ConfigError(f"the checkpoint {where / tag} is damaged: {damage} (copied in part, "
                          f"a full disk, a deleted file); {fix}, or restore its files")
    saved = ckpt.saved_state(where, tag)
    was = saved.get("config", {}).get("train", {}).get("precision", precision)
    if was != precision:  # DeepSpeed's optimizer state differs in kind between precisions
        raise ConfigError(f"train.precision: the checkpoint {where / tag} was trained in {was}, "
                          f"this run is {precision}; resume with --set train.precision={was}")
    try:
        loader.load_state_dict(saved["loader"])  # before the engine: the cheap check first
    except ValueError as exc:
        raise ConfigError(f"resuming {where / tag}: {exc}") from exc
    stage, was_stage = int(engine.zero_optimization_stage()), saved.get("zero_stage")
    if was_stage is not None and _stage_family(was_stage) != _stage_family(stage):
        # stage 0 keeps the optimizer state whole, in the model file, and ZeRO-3 partitions
        # the weights too: DeepSpeed loads none of these layouts into another (it failed with
        # an AssertionError, a TypeError or a missing file, none of which said why)
        raise ConfigError(f"train.zero_stage: the checkpoint {where / tag} was saved with ZeRO "
                          f"stage {was_stage}, this run has {stage}; resume with --set "
                          f"train.zero_stage={was_stage} (any stage resumes on another number "
                          f"of ranks; stages 1 and 2 also from each other)")
    was_batch = saved.get("global_batch")
    if rank == 0 and was_batch not in (None, engine.train_batch_size()):
        logger.warning("resuming %s with a global batch of %d samples, saved with %d: the loss "
                       "curve goes on from another run (set train.global_batch_size=%d to "
                       "continue this one)", where / tag, engine.train_batch_size(), was_batch,
                       was_batch)
    ckpt.load(engine, where, tag, rank, world)
    return RunState(step=saved["step"], best_val=saved["best_val"],
                    best_tag=saved.get("best_tag"),
                    evals_since_best=saved.get("evals_since_best", 0))


def _ensure_data(cfg: RunConfig, rank: int) -> Path:
    """The prepared directory (with data.mix: the first; all share its tokenizer)."""
    if cfg.data.mix is not None:
        for p in cfg.data.mix:
            if not (Path(p) / "meta.json").is_file():
                raise ConfigError(f"data.mix: {p!r} is not a prepared dataset: run `fastlm "
                                  f"prepare INPUT --out {p}` first")
        return Path(next(iter(cfg.data.mix)))
    path = Path(cfg.data.path)
    if not (path / "meta.json").is_file():
        if cfg.data.prepare is None:
            raise ConfigError(
                f"data.path {str(path)!r} is not a prepared dataset: run `fastlm prepare "
                f"INPUT --out {path}` first, or give data.prepare in the config")
        if rank == 0:
            from fastlm.data import prepare
            from fastlm.data.sources import resolve_inputs

            kwargs = dict(cfg.data.prepare)
            inputs = kwargs.pop("inputs", None)
            if not inputs:
                raise ConfigError("data.prepare needs 'inputs' (files, globs, directories or "
                                  "builtin:pydoc)")
            prepare(resolve_inputs(list(inputs), path.parent / "sources"), path, **kwargs)
        fdist.barrier()
    return path


def _choices(cfg, data_dir):
    """(records, tokenizer) for eval.choices, read before anything is built, or None."""
    if cfg.eval.choices is None:
        return None
    from fastlm.train.choices import ChoicesError, read_choices
    from fastlm.train.generate import load_tokenizer

    try:
        records = read_choices(cfg.eval.choices, cfg.eval.choices_limit)
    except ChoicesError as exc:
        raise ConfigError(f"eval.choices: {exc}") from exc
    return records, load_tokenizer(data_dir)


def _source_loader(cfg, path, micro, split, **kw):
    """The loader of one prepared directory: pairs for DPO, else blocks."""
    if cfg.train.objective == "dpo":
        from fastlm.data.pairs import PairLoader

        kw.pop("mode", None)
        try:
            return PairLoader(path, cfg.data.block_size, micro, split_name=split, **kw)
        except (ValueError, FormatError) as exc:
            raise ConfigError(f"train.objective=dpo: {exc}") from exc
    return BlockLoader(path, cfg.data.block_size, micro, split_name=split,
                       boundaries=cfg.data.boundaries, **kw)


def _loader(cfg, data_dir, micro, split, **kw):
    if cfg.data.mix is None:
        return _source_loader(cfg, data_dir, micro, split, **kw)
    from fastlm.data.mix import MixedLoader

    try:
        return MixedLoader(cfg.data.mix, cfg.data.block_size, micro, split_name=split,
                           boundaries=cfg.data.boundaries, **kw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _val_loader(cfg, data_dir, micro, rank, world) -> list[tuple[str | None, float, BlockLoader]]:
    """[(name, weight, loader)]: the dataset's val split, or with data.mix each source's,
    named by its directory (eval.batches batches each), weighted by its share of the mix."""
    mix = {str(data_dir): 1.0} if cfg.data.mix is None else cfg.data.mix
    total = sum(mix.values())
    names = _short_names(list(mix)) if cfg.data.mix is not None else [None]
    out = []
    for name, (path, weight) in zip(names, mix.items()):
        try:
            ld = _source_loader(cfg, path, micro, "val", rank=rank, world_size=world,
                                seed=cfg.train.seed + 1, mode="random")
        except Exception as exc:
            raise ConfigError(f"validation split of {path} unusable: {exc} (or prepare it with "
                              f"a larger --val-fraction: {_val_share(path)}; or train without "
                              f"validation: eval.batches=0)") from exc
        out.append((name, weight / total, ld))
    return out


def _val_share(path) -> str:
    """What the validation split was prepared as, for the message that finds it too small."""
    try:
        meta = json.loads((Path(path) / "meta.json").read_text())
        docs = meta["splits"]["val"]["docs"]
        return f"it was {meta['config']['val_fraction']}, {docs} document{'s' * (docs != 1)}"
    except (OSError, KeyError, TypeError, ValueError):
        return "see its meta.json"


def _short_names(paths: list[str]) -> list[str]:
    """Each directory's last component, or its whole path where two share one."""
    base = [Path(p).name or str(p) for p in paths]
    return [b if base.count(b) == 1 else str(p) for b, p in zip(base, paths)]


def _wandb_init(cfg: RunConfig, out_dir: Path) -> dict | None:
    if not cfg.log.wandb:
        return None
    return {"project": cfg.log.wandb_project, "name": cfg.log.wandb_run_name or out_dir.name,
            "config": cfg.to_dict()}


def _save_run_files(cfg: RunConfig, out_dir: Path, data_dir: Path) -> None:
    import yaml

    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # The tokenizer travels with the run, so export and generate need only the run directory.
    src, dst = data_dir / "tokenizer", out_dir / "tokenizer"
    if src.is_dir() and not dst.exists():
        import shutil

        from fastlm.data.tokenizer import tokenizer_files

        tmp = out_dir / ".tokenizer.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in tokenizer_files(src):
            shutil.copy2(f, tmp / f.name)
        os.replace(tmp, dst)


def _skipped(engine) -> int:
    return int(getattr(engine, "skipped_steps", 0) or 0)


def _loss_scale(engine):
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    scale = getattr(opt, "cur_scale", None) or getattr(opt, "loss_scale", None)
    return float(scale) if scale is not None else None


def _grads_norm(module) -> float:
    norms = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def _grad_norm(engine):
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _peak_flops(dev: torch.device, precision: str = "fp32") -> float | None:
    if dev.type == "cuda":
        from fastlm.train.peaks import gpu_peak_tflops

        # the datasheet peak of the precision the run multiplies in (fp32 on TF32 tensor cores
        # when the user allowed it); an fp32 run was measured against the bf16 peak
        tf32 = torch.get_float32_matmul_precision() != "highest" or \
            torch.backends.cuda.matmul.allow_tf32
        tflops = gpu_peak_tflops(torch.cuda.get_device_name(dev), precision, tf32)
        return None if tflops is None else tflops * 1e12
    from fastlm.bench.harness import matmul_peak_tflops

    # MFU against the matmul rate of the precision the run multiplies in (bf16 ~4x fp32 on a
    # CPU with bf16 dot products)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    # the best of three: a ceiling measured while something else held the cores read low and
    # put the run's MFU above 1
    return max(matmul_peak_tflops("cpu", dtype, n=512) for _ in range(3)) * 1e12


def _log_sample(cfg, engine, log, rank, data_dir, dev, step: int, end: bool = False) -> None:
    """A sample from the model as it is now, on rank 0 (every rank enters: ZeRO-3 gathers the
    whole weights for rank 0 to generate alone; its per-layer gathers need every rank, and on
    2+ ranks rank 0 generating through them failed or hung). Drawn from the seed on a forked
    RNG: samples along a run are comparable, and training's random streams (dropout) are the
    ones a run without samples has."""
    with _whole_weights(engine):
        if rank != 0:
            return
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), _eager(engine):
            torch.manual_seed(cfg.train.seed)
            text, shown = _sample(cfg, engine.module, data_dir, dev)
        log.write(shown if end else f"step {step}: {shown}")
        log.log(step, sample=text)  # metrics.jsonl, and TensorBoard's text tab


def _eager(engine):
    """Generation off the compiled graph (train.compile): every decoding step has new shapes,
    and each recompiled until dynamo's recompile limit, with a wall of warnings."""
    if getattr(engine.module, "_compiled_call_impl", None) is None:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("force_eager")


def _whole_weights(engine):
    """A context in which the model's weights are whole on every rank and ZeRO-3's hooks are
    off (collective: every rank enters); nothing to do without ZeRO-3."""
    if not engine.zero_optimization_partition_weights():
        return contextlib.nullcontext()
    return _zero3_unhooked(engine)


@contextlib.contextmanager
def _zero3_unhooked(engine):
    """DeepSpeed's generation context (whole weights, the per-layer hooks removed) with the
    top module's start-of-forward hook off too: that hook resets the parameter coordinator's
    step, which checks its trace against every rank (a collective: rank 0 generating alone
    crashed there on gloo after DPO's reference forwards, and would hang on NCCL)."""
    from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

    offload = getattr(engine.optimizer, "parameter_offload", None)
    handle = getattr(offload, "fwd_pre_hook", None)
    with unwrap_model_for_generation(engine):
        hooks = engine.module._forward_pre_hooks
        hook = hooks.pop(handle.id, None) if handle is not None else None
        try:
            yield
        finally:
            if hook is not None:  # back in its place, first
                hooks[handle.id] = hook
                hooks.move_to_end(handle.id, last=False)


def _sample(cfg: RunConfig, model, data_dir: Path, dev) -> tuple[str, str]:
    """(the sample, as the console shows it)."""
    from fastlm.train.generate import load_tokenizer, sample

    tok = load_tokenizer(data_dir)
    chat = cfg.sample.chat
    if chat is None:  # a model fine-tuned on conversations is asked in their layout
        sft = json.loads((data_dir / "meta.json").read_text()).get("sft", False)
        chat = bool(sft) and isinstance(tok.chat_template, str)
    text = sample(model, tok, cfg.sample.prompt, max_new_tokens=cfg.sample.tokens,
                  temperature=cfg.sample.temperature, top_k=cfg.sample.top_k,
                  top_p=cfg.sample.top_p, device=dev, chat=chat)
    if chat:
        return text, f"--- sample (chat) ---\nuser: {cfg.sample.prompt}\nassistant: {text}\n" \
               f"--------------"
    return text, f"--- sample ---\n{text}\n--------------"
