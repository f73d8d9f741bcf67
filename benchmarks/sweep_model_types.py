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
exactly. With ``--dtype bf16`` both eager and fastlm run in bf16 and each is measured against the
fp32 eager run: fastlm passes when its error is within 2x eager bf16's own (+ bf16's rounding),
for the logits, the loss and each gradient (greedy tokens may part at near ties: not compared).

    python benchmarks/sweep_model_types.py --task causal --out benchmarks/results/model_types_causal.md

Writes a markdown table with the command, versions and one row per type.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import signal
import sys
import time
import warnings

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


def _inputs(task: str):
    gen = torch.Generator().manual_seed(1)
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
    keys.update({k: 0.0 for k, v in base.to_dict().items() if isinstance(v, float)
                 and ("dropout" in k or k.endswith("_pdrop") or k == "dropout_rate")})
    return AutoConfig.for_model(kind, **keys)


# vision towers' own size keys (Qwen2-VL's: depth, embed_dim; its merger's output width)
VISION_SIZES = dict(depth=2, embed_dim=64, out_hidden_size=64)


def _shrink(conf):
    """A composite (vision-language) config with every sub-config at the sizes above."""
    from transformers import PretrainedConfig

    for k, v in {**SIZES, **VISION_SIZES}.items():
        if hasattr(conf, k) and not isinstance(getattr(conf, k), PretrainedConfig):
            setattr(conf, k, v)
    for k, v in conf.to_dict().items():
        if isinstance(v, float) and ("dropout" in k or k.endswith("_pdrop")):
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


def _bf16_verdict(want, eager, got) -> tuple[bool, str]:
    """bf16 judged the flash-attention way: fastlm's error against the fp32 eager run within
    2x eager bf16's own error (+ a floor of bf16's rounding), for the logits, the loss and each
    parameter's gradient of 16 elements or more (relative to that tensor, floored at bf16's
    resolution of the largest: a gradient that is 0 in fp32, ~1e-10 of the largest, is bf16
    noise in either model; DeepSeek-V4's one-element hyper-connection scales were 5x eager's
    error or 0.3x by the seed)."""
    floor = 2.0 ** -8
    e_logits = (_rel(got[0], want[0]), _rel(eager[0], want[0]))
    e_loss = tuple(abs(x[1] - want[1]) / max(abs(want[1]), 1e-12) for x in (got, eager))
    gmax = max((g.abs().max().item() for g in want[2].values()), default=0.0)
    worst, ratio = ("", 0.0, 0.0), 0.0
    # the loss is one bf16 number: its error is its rounding, 1-2 ulps (2^-9..2^-8) either way
    ok = e_logits[0] <= 2 * e_logits[1] + floor and e_loss[0] <= 2 * e_loss[1] + 2 * floor
    for k, g in want[2].items():
        if g.numel() < 16:  # a scalar's gradient is one long sum: its bf16 error is luck
            continue
        scale = max(g.abs().max().item(), floor * gmax)
        ef, ee = _rel(got[2][k], g, scale), _rel(eager[2][k], g, scale)
        ok = ok and ef <= 2 * ee + 4 * floor
        if (ef + floor) / (ee + floor) > ratio:
            ratio, worst = (ef + floor) / (ee + floor), (k, ef, ee)
    detail = (f"logits {e_logits[0]:.1e} (eager {e_logits[1]:.1e}), loss {e_loss[0]:.1e} "
              f"({e_loss[1]:.1e}), grads worst {worst[1]:.1e} ({worst[2]:.1e}) at {worst[0]}")
    return ok, detail


def check(kind: str, task: str = "causal", dtype: str = "fp32") -> tuple[str, str]:
    """(outcome, detail): pass, MISMATCH, FAIL (fastlm's side), or n/a (not buildable here)."""
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
        ids, mask, labels = _inputs(task)
        stage = "eager"
        want = _run(ref, task, ids, mask, labels)
        if dtype == "bf16":
            eager = _run(copy.deepcopy(ref).to(torch.bfloat16), task, ids, mask, labels)
    except _Timeout:
        return "n/a", f"timed out building ({stage})"
    except Exception as exc:  # noqa: BLE001 - the row says why
        return "n/a", f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    stage = "fastlm"
    try:
        fast = copy.deepcopy(ref)
        if dtype == "bf16":
            fast = fast.to(torch.bfloat16)
        fast.set_attn_implementation("fastlm")
        handle = fastlm.patch(fast)
        got = _run(fast, task, ids, mask, labels)
    except _Timeout:
        return "FAIL", f"timed out ({stage})"
    except Exception as exc:  # noqa: BLE001
        return "FAIL", f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    swapped = ", ".join(f"{k} {v}" for k, v in handle.swapped.items()) or "nothing"
    if dtype == "bf16":  # greedy tokens may part at a near tie in bf16: not compared
        ok, detail = _bf16_verdict(want, eager, got)
        return ("pass" if ok else "MISMATCH"), (f"attention {fast.config._attn_implementation}; "
                                                f"{detail}; swapped {swapped}")
    logit_err = float((got[0] - want[0]).abs().max() / want[0].abs().max().clamp_min(1e-12))
    loss_err = abs(got[1] - want[1]) / max(abs(want[1]), 1e-12)
    gmax = max((g.abs().max().item() for g in want[2].values()), default=0.0)
    grad_err = max(((got[2][k] - g).abs().max() / max(g.abs().max().item(), 1e-3 * gmax))
                   .item() for k, g in want[2].items()) if gmax > 0 else 0.0
    same = want[3] is None or torch.equal(got[3], want[3])
    detail = (f"attention {fast.config._attn_implementation}; logits {logit_err:.1e}, loss "
              f"{loss_err:.1e}, grads {grad_err:.1e}; swapped {swapped}")
    ok = logit_err < 1e-4 and loss_err < 1e-4 and grad_err < 1e-3 and same
    return ("pass" if ok else "MISMATCH"), detail + ("" if same else "; tokens differ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="causal",
                        choices=["causal", "masked", "classification", "seq2seq",
                                 "token-classification", VLM])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                        help="bf16: both models in bf16, each judged against the fp32 eager run")
    parser.add_argument("--out", default=None, help="markdown file to write")
    parser.add_argument("--types", default=None, help="comma list (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers

    from fastlm.integrations import transformers as hf

    hf.register()
    kinds = sorted(_tasks()[args.task][1])
    if args.types:
        kinds = [k for k in kinds if k in args.types.split(",")]
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    from tqdm import tqdm

    for kind in tqdm(kinds, desc="model types"):
        signal.alarm(TIMEOUT_S)
        try:
            outcome, detail = check(kind, args.task, args.dtype)
        finally:
            signal.alarm(0)
        rows.append((kind, outcome, detail))
    counts = {o: sum(r[1] == o for r in rows) for o in ("pass", "MISMATCH", "FAIL", "n/a")}
    lines = [f"# transformers {args.task} model types with fastlm", "",
             f"Command: `python benchmarks/sweep_model_types.py {' '.join(sys.argv[1:])}`", "",
             f"torch {torch.__version__}, transformers {transformers.__version__}; "
             f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}", "",
             ", ".join(f"{o}: {n}" for o, n in counts.items()), "",
             "| model type | outcome | detail |", "|---|---|---|"]
    lines += [f"| {k} | {o} | {d.replace('|', '/')} |" for k, o, d in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
    return 1 if counts["MISMATCH"] or counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
