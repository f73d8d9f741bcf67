"""Every model type this transformers knows for a task, tiny and random, with and without fastlm.

Tasks: causal LMs, masked LMs, sequence and token classification, encoder-decoder LMs, and
vision-language models on text alone (their language model: masks, RoPE, cache; the vision
tower is built at small sizes too but not run). For each type: a
config with small sizes (the keys it has of a common set; dropout off, so training steps are
deterministic), the model built with eager attention; then a copy with
``attn_implementation="fastlm"`` and ``fastlm.patch``. Compared with eager on a padded batch:
logits in eval (real positions), the training loss and every parameter's gradient, and (causal
and encoder-decoder) greedy tokens with the KV cache. Types whose config or eager model cannot
be built from these sizes (too large, or needing packages not installed) are listed as n/a:
they say nothing about fastlm. A type passes when logits match to 1e-4 (relative), the loss to
1e-4, gradients to 1e-3 (relative to each tensor, floored at 1e-3 of the largest) and tokens
exactly. With ``--dtype bf16`` or ``fp16`` fastlm and PyTorch (the model's eager and sdpa code)
run in that dtype and each is measured against the fp32 eager run: fastlm passes when its error
is within 2x PyTorch's own (+ the dtype's rounding), for the logits, the loss and each gradient
(greedy tokens may part at near ties: not compared), on most of ``--draws`` input draws (a
rounding can flip an MoE router's choice or a ReLU for one token, in either model). Types whose
own eager run overflows in that dtype are n/a.

    python benchmarks/sweep_model_types.py --task causal --out benchmarks/results/model_types_causal.md

Writes a markdown table with the command, versions and one row per type.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path

import torch

SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             num_hidden_layers=2, head_dim=16, n_embd=64, n_head=4, n_layer=2, d_model=64,
             n_heads=4, n_layers=2, num_layers=2, num_heads=4, ffn_dim=128, n_inner=128,
             vocab_size=128, max_position_embeddings=128, n_positions=128,
             moe_intermediate_size=32, num_experts=4, num_local_experts=4, num_experts_per_tok=2,
             pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4, rotary_dim=8,
             # encoder-decoder models
             encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, d_kv=16,
             d_ff=128, num_decoder_layers=2, decoder_start_token_id=2)
MAX_PARAMS = 5e7
TIMEOUT_S = 60


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


VLM = "image-text-to-text"  # text-only inputs: the language model inside, its masks and cache


def _tasks():
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )
    from transformers.models.auto import modeling_auto as ma

    return {
        "causal": (AutoModelForCausalLM, ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
        "masked": (AutoModelForMaskedLM, ma.MODEL_FOR_MASKED_LM_MAPPING_NAMES),
        "classification": (AutoModelForSequenceClassification,
                           ma.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
        "seq2seq": (AutoModelForSeq2SeqLM, ma.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
        "token-classification": (AutoModelForTokenClassification,
                                 ma.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
        VLM: (AutoModelForImageTextToText, ma.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES),
    }


def _inputs(task: str, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    if task in ("causal", VLM):
        mask[0, :2] = 0  # left padding, as batched generation pads
        labels = ids.masked_fill(mask == 0, -100)
        # and no target predicted from a padded position: a query with no key to attend to
        # has no defined output (eager averages the masked row, the kernels give 0)
        labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    else:
        mask[0, -3:] = 0
        labels = {"masked": ids.masked_fill(torch.arange(9) % 2 == 0, -100),
                  "classification": torch.tensor([0, 1]),
                  "seq2seq": torch.randint(3, 100, (2, 5), generator=gen),
                  "token-classification": torch.randint(0, 2, (2, 9), generator=gen)
                  .masked_fill(mask == 0, -100)}[task]
    return ids, mask, labels


def _run(model, task, ids, mask, labels):
    """(eval logits at compared positions, train loss, grads, greedy tokens or None)."""
    model.eval()
    extra = {"decoder_input_ids": labels} if task == "seq2seq" else {}
    logits = model(input_ids=ids, attention_mask=mask, **extra).logits
    if task in ("causal", "masked", "token-classification", VLM):
        logits = logits[mask.bool()]
    tokens = None
    if task in ("causal", "seq2seq", VLM):
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                num_beams=1, pad_token_id=0)
    model.train()
    model.zero_grad()
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.eval()
    return logits.detach(), float(loss), grads, tokens


def _config(kind: str, task: str = "causal"):
    from transformers import AutoConfig

    base = AutoConfig.for_model(kind)
    if task == VLM:
        return _shrink(base)
    keys = {k: v for k, v in SIZES.items() if hasattr(base, k)}
    keys.update({k: 0.0 for k, v in base.to_dict().items() if isinstance(v, float) and _random(k)})
    keys.update(_latent_sizes(base, keys))
    keys.update(_hybrid_layers(base, keys))
    return AutoConfig.for_model(kind, **keys)


def _latent_sizes(base, keys: dict) -> dict:
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, Kimi): its own head sizes, values
    narrower than queries and keys as in DeepSeek-V3 (head_dim there is the rotary part: the
    common 16 broke the rotary shapes, and eager failed)."""
    if not hasattr(base, "qk_rope_head_dim"):
        return {}
    keys.pop("head_dim", None)
    out = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, kv_lora_rank=16,
               num_key_value_heads=keys.get("num_attention_heads", 4))
    for k, v in dict(head_dim=8, qk_head_dim=16).items():  # the rotary part; nope + rope
        if hasattr(base, k):
            out[k] = v
    if hasattr(base, "v_head_dim"):
        out["v_head_dim"] = 8
    if getattr(base, "q_lora_rank", None) is not None:
        out["q_lora_rank"] = 32
    for k, v in dict(n_routed_experts=4, n_group=1, topk_group=1).items():
        if hasattr(base, k):
            out[k] = v
    return out


_ATTENTION_LAYERS = ("full_attention", "attention", "sliding_attention", "indexed_attention")


def _hybrid_layers(base, keys: dict) -> dict:
    """Hybrid models (Qwen3-Next and 3.5, Jamba, Bamba, Granite 4, RecurrentGemma) at two
    layers: the first layers of their pattern are all linear or recurrent, and the model had
    no attention layer at all (generation then failed in eager). The second layer attends."""
    n = keys.get("num_hidden_layers")
    if n is None:
        return {}
    if hasattr(base, "attn_layer_period"):  # Jamba
        return dict(attn_layer_period=n, attn_layer_offset=n - 1)
    if hasattr(base, "attn_layer_indices"):  # Bamba
        return dict(attn_layer_indices=[n - 1])
    if isinstance(getattr(base, "block_types", None), list):  # RecurrentGemma
        attend = [t for t in base.block_types if t in _ATTENTION_LAYERS]
        return dict(block_types=[base.block_types[0]] * (n - 1) + attend[:1]) if attend else {}
    types = getattr(base, "layer_types", None)
    if not isinstance(types, list) or any(t in _ATTENTION_LAYERS for t in types[:n]):
        return {}
    attend = [t for t in types if t in _ATTENTION_LAYERS]
    return dict(layer_types=types[:n - 1] + attend[:1]) if attend else {}


def _random(key: str) -> bool:
    """A config rate that makes training steps random: dropout, and layerdrop (M2M-100 skips a
    random 5% of its layers in training: in one draw of three fastlm's copy had no gradient for
    26 parameters, the dropped layers', and in another eager's)."""
    return "dropout" in key or "layerdrop" in key or key.endswith("_pdrop")


# vision towers' own size keys (Qwen2-VL's: depth, embed_dim; its merger's output width)
VISION_SIZES = dict(depth=2, embed_dim=64, out_hidden_size=64)


def _shrink(conf):
    """A composite (vision-language) config with every sub-config at the sizes above."""
    from transformers import PretrainedConfig

    for k, v in {**SIZES, **VISION_SIZES}.items():
        if hasattr(conf, k) and not isinstance(getattr(conf, k), PretrainedConfig):
            setattr(conf, k, v)
    for k, v in conf.to_dict().items():
        if isinstance(v, float) and _random(k):
            setattr(conf, k, 0.0)
    rope = getattr(conf, "rope_parameters", None)
    if isinstance(rope, dict) and hasattr(conf, "vocab_size"):
        rope["mrope_section"] = [2, 3, 3]  # multimodal RoPE's split of head_dim 16 / 2
    for k in list(vars(conf)):
        if isinstance(getattr(conf, k), PretrainedConfig):
            _shrink(getattr(conf, k))
    return conf


def _rel(got, want, scale=None) -> float:
    scale = want.abs().max().item() if scale is None else scale
    return float((got.float() - want.float()).abs().max()) / max(scale, 1e-12)


HALF = {"bf16": (torch.bfloat16, 2.0 ** -8), "fp16": (torch.float16, 2.0 ** -11)}


def _nonfinite(runs) -> str | None:
    """What is inf/NaN in any of these runs' logits, loss or gradients (a name), else None."""
    for logits, loss, grads, _ in runs:
        if not torch.isfinite(logits).all():
            return "logits"
        if not math.isfinite(loss):
            return "loss"
        bad = [k for k, g in grads.items() if not torch.isfinite(g).all()]
        if bad:
            return f"gradients ({len(bad)}, e.g. {bad[0]})"
    return None


def _half_verdict(want, torch_runs, got, floor: float) -> tuple[bool, str]:
    """bf16/fp16 judged the flash-attention way: fastlm's error against the fp32 eager run within
    2x PyTorch's own error in that dtype (+ a floor of its rounding), for the logits, the loss
    and each parameter's gradient of 16 elements or more. PyTorch's own error is the larger of
    the model's eager and sdpa runs in that dtype (``torch_runs``): two ways of PyTorch's to
    compute the same model, whose spread is that dtype's noise (DiffLlama's lambda vectors, whose
    gradient is one scalar's long sum times a vector, failed the rule against eager alone with
    sdpa's own error). Gradients are relative to the tensor, floored at the dtype's resolution of
    the largest (a gradient that is 0 in fp32, ~1e-10 of the largest, is noise in either model);
    smaller ones are skipped (DeepSeek-V4's one-element hyper-connection scales were 5x eager's
    error or 0.3x by the seed). The detail names the quantity nearest its limit."""
    bad = _nonfinite([got])
    if bad:
        return False, f"non-finite {bad} (PyTorch's are finite)"
    missing = sorted(set(want[2]) - set(got[2]))
    if missing:  # a parameter the model's own code trains gets no gradient in fastlm's
        return False, f"no gradient for {len(missing)} parameters, e.g. {missing[0]}"
    gmax = max((g.abs().max().item() for g in want[2].values()), default=0.0)
    # (name, fastlm's error, PyTorch's, limit); the loss is one 16-bit number: its error is its
    # rounding, 1-2 ulps either way
    rows = [("logits", _rel(got[0], want[0]), max(_rel(r[0], want[0]) for r in torch_runs), floor)]
    loss_err = [abs(x[1] - want[1]) / max(abs(want[1]), 1e-12) for x in [got, *torch_runs]]
    rows.append(("loss", loss_err[0], max(loss_err[1:]), 2 * floor))
    for k, g in want[2].items():
        if g.numel() < 16:  # a scalar's gradient is one long sum: its 16-bit error is luck
            continue
        scale = max(g.abs().max().item(), floor * gmax)
        rows.append((k, _rel(got[2][k], g, scale),
                     max(_rel(r[2][k], g, scale) for r in torch_runs), 4 * floor))
    margins = [(ef / (2 * et + fl), name, ef, et) for name, ef, et, fl in rows]
    ok = all(m <= 1 for m, *_ in margins)
    _, name, ef, et = max(margins, key=lambda m: m[0])
    return ok, (f"logits {rows[0][1]:.1e} (torch {rows[0][2]:.1e}), loss {rows[1][1]:.1e} "
                f"({rows[1][2]:.1e}); nearest its limit: {name} {ef:.1e} ({et:.1e})")


def check(kind: str, task: str = "causal", dtype: str = "fp32",
          draws: int = 1) -> tuple[str, str]:
    """(outcome, detail): pass, MISMATCH, FAIL (fastlm's side), or n/a (not buildable here).

    In 16 bits each of ``draws`` input draws is judged on its own and the type passes when most
    do: a 16-bit rounding can flip a discrete choice (an MoE router's top-k, a ReLU at 0) for one
    token in either model, which moves that token's outputs by far more than rounding (Qwen2-MoE
    in fp16: one of 18 routings flipped, logits 20x eager's error at that token alone). A flip
    depends on the draw; an error of fastlm's shows in every draw.
    """
    from transformers import AutoConfig  # noqa: F401  (imported before any meta build)

    import fastlm

    cls = _tasks()[task][0]
    stage = "config"
    try:
        conf = _config(kind, task)
        stage = "build"
        with torch.device("meta"):
            n = sum(p.numel() for p in cls.from_config(conf).parameters())
        if n > MAX_PARAMS:
            return "n/a", f"{n / 1e6:.0f}M parameters at these sizes"
        torch.manual_seed(0)
        ref = cls.from_config(conf, attn_implementation="eager")
        for module in ref.modules():  # dropouts with a constant rate in the code (heads)
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        # copies are taken before any forward: RecurrentGemma keeps its states on its modules,
        # tensors of the autograd graph that cannot be deep-copied
        pristine = copy.deepcopy(ref)
        stage = "eager"
        inputs = [_inputs(task, seed) for seed in range(1, draws + 1)]
        wants = [_run(ref, task, *x) for x in inputs]
        if dtype in HALF:
            half = copy.deepcopy(pristine).to(HALF[dtype][0])
            torch_runs = [[_run(half, task, *x)] for x in inputs]
            bad = _nonfinite(r[0] for r in torch_runs)
            if bad:  # the model overflows in this dtype by itself: nothing to judge fastlm by
                return "n/a", f"eager {dtype} itself gives non-finite {bad}"
            try:
                half.set_attn_implementation("sdpa")
            except (ValueError, ImportError):
                pass  # no sdpa for this model: eager alone is PyTorch's own error
            else:
                for runs, x in zip(torch_runs, inputs):
                    runs.append(_run(half, task, *x))
    except _Timeout:
        return "n/a", f"timed out building ({stage})"
    except Exception as exc:  # noqa: BLE001 - the row says why
        return "n/a", f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    stage = "fastlm"
    try:
        fast = pristine
        if dtype in HALF:
            fast = fast.to(HALF[dtype][0])
        fast.set_attn_implementation("fastlm")
        handle = fastlm.patch(fast)
        gots = [_run(fast, task, *x) for x in inputs]
    except _Timeout:
        return "FAIL", f"timed out ({stage})"
    except Exception as exc:  # noqa: BLE001
        return "FAIL", f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    swapped = ", ".join(f"{k} {v}" for k, v in handle.swapped.items()) or "nothing"
    head = f"attention {fast.config._attn_implementation}; "
    if dtype in HALF:  # greedy tokens may part at a near tie in 16 bits: not compared
        verdicts = [_half_verdict(w, e, g, HALF[dtype][1])
                    for w, e, g in zip(wants, torch_runs, gots)]
        passed = sum(ok for ok, _ in verdicts)
        # the row shows a failing draw where there is one, else the first
        shown = next((d for ok, d in verdicts if not ok), verdicts[0][1])
        tally = f"{passed}/{draws} draws pass; " if draws > 1 else ""
        return ("pass" if 2 * passed > draws else "MISMATCH"), (
            f"{head}{tally}{'failing draw: ' if passed < draws else ''}{shown}; swapped {swapped}")
    want, got = wants[0], gots[0]
    logit_err = float((got[0] - want[0]).abs().max() / want[0].abs().max().clamp_min(1e-12))
    loss_err = abs(got[1] - want[1]) / max(abs(want[1]), 1e-12)
    gmax = max((g.abs().max().item() for g in want[2].values()), default=0.0)
    grad_err = max(((got[2][k] - g).abs().max() / max(g.abs().max().item(), 1e-3 * gmax))
                   .item() for k, g in want[2].items()) if gmax > 0 else 0.0
    same = want[3] is None or torch.equal(got[3], want[3])
    detail = (f"{head}logits {logit_err:.1e}, loss "
              f"{loss_err:.1e}, grads {grad_err:.1e}; swapped {swapped}")
    ok = logit_err < 1e-4 and loss_err < 1e-4 and grad_err < 1e-3 and same
    return ("pass" if ok else "MISMATCH"), detail + ("" if same else "; tokens differ")


def report(title: str, rows, out: str | None, notes: tuple[str, ...] = ()) -> dict:
    """Print the markdown table of ``rows`` (type, outcome, detail) under the command, versions
    and ``notes``; write it to ``out`` (complete or not at all). Returns the outcome counts."""
    import transformers

    counts = {o: sum(r[1] == o for r in rows) for o in ("pass", "MISMATCH", "FAIL", "n/a")}
    script = Path(sys.argv[0]).name
    lines = [f"# {title}", "", f"Command: `python benchmarks/{script} {' '.join(sys.argv[1:])}`",
             "", f"torch {torch.__version__}, transformers {transformers.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", ""]
    for note in notes:
        lines += [note, ""]
    lines += [", ".join(f"{o}: {n}" for o, n in counts.items()), "",
              "| model type | outcome | detail |", "|---|---|---|"]
    lines += [f"| {k} | {o} | {d.replace('|', '/')} |" for k, o, d in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        tmp = out + ".tmp"
        Path(tmp).write_text(text)
        os.replace(tmp, out)
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="causal",
                        choices=["causal", "masked", "classification", "seq2seq",
                                 "token-classification", VLM])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="bf16/fp16: both models in that dtype, each judged against the "
                             "fp32 eager run")
    parser.add_argument("--draws", type=int, default=1,
                        help="input draws per type (bf16/fp16: a type passes when most do)")
    parser.add_argument("--out", default=None, help="markdown file to write")
    parser.add_argument("--types", default=None, help="comma list (default: all)")
    args = parser.parse_args()
    if args.draws < 1 or (args.draws > 1 and args.dtype not in HALF):
        parser.error("--draws: 1 or more, and more than 1 only with --dtype bf16 or fp16 "
                     "(fp32 is judged exactly on one draw)")
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)

    from fastlm.integrations import transformers as hf

    hf.register()
    kinds = sorted(_tasks()[args.task][1])
    if args.types:
        kinds = [k for k in kinds if k in args.types.split(",")]
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    from tqdm import tqdm

    # a type's time limit grows with its runs: 2 per draw in fp32, 4 in 16 bits (+ eager, sdpa)
    limit = TIMEOUT_S * args.draws * (2 if args.dtype in HALF else 1)
    for kind in tqdm(kinds, desc="model types"):
        signal.alarm(limit)
        try:
            outcome, detail = check(kind, args.task, args.dtype, args.draws)
        finally:
            signal.alarm(0)
        rows.append((kind, outcome, detail))
    counts = report(f"transformers {args.task} model types with fastlm", rows, args.out)
    return 1 if counts["MISMATCH"] or counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
