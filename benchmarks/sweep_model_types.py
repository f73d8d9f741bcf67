"""Every causal-LM type this transformers knows, tiny and random, with and without fastlm.

For each type: a config with small sizes (the keys it has of a common set), the model built
with eager attention; then a copy with ``attn_implementation="fastlm"`` and one also with
``fastlm.patch``. Logits on a left-padded batch (real positions) and greedy tokens with the KV
cache are compared with eager. Types whose config or eager model cannot be built from these
sizes (or that are too large, or need packages not installed) are listed as such: they say
nothing about fastlm. A type passes when both variants match eager (relative logit error
< 1e-4, identical tokens).

    python benchmarks/sweep_model_types.py --out benchmarks/results/model_types_sweep.md

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
             pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=4, rotary_dim=8)
MAX_PARAMS = 5e7
TIMEOUT_S = 60


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def check(kind: str) -> tuple[str, str]:
    """(outcome, detail): pass, MISMATCH, FAIL (fastlm's side), or n/a (not buildable here)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import fastlm

    stage = "config"
    try:
        base = AutoConfig.for_model(kind)
        conf = AutoConfig.for_model(kind, **{k: v for k, v in SIZES.items() if hasattr(base, k)})
        stage = "build"
        with torch.device("meta"):
            n = sum(p.numel() for p in AutoModelForCausalLM.from_config(conf).parameters())
        if n > MAX_PARAMS:
            return "n/a", f"{n / 1e6:.0f}M parameters at these sizes"
        torch.manual_seed(0)
        ref = AutoModelForCausalLM.from_config(conf, attn_implementation="eager").eval()
        ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(1))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        keep = mask.bool()
        stage = "eager"
        want = ref(input_ids=ids, attention_mask=mask).logits
        tokens = ref.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                              pad_token_id=0)
    except _Timeout:
        return "n/a", f"timed out building ({stage})"
    except Exception as exc:  # noqa: BLE001 - the row says why
        return "n/a", f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    stage = "fastlm attention"
    try:
        fast = copy.deepcopy(ref)
        fast.set_attn_implementation("fastlm")
        errs = []
        for step in ("attention", "patch"):
            if step == "patch":
                stage = "fastlm.patch"
                handle = fastlm.patch(fast)
            got = fast(input_ids=ids, attention_mask=mask).logits
            errs.append(float((got - want)[keep].abs().max() / want[keep].abs().max()))
        stage = "generate"
        same = torch.equal(fast.generate(ids, attention_mask=mask, max_new_tokens=4,
                                         do_sample=False, pad_token_id=0), tokens)
    except _Timeout:
        return "FAIL", f"timed out ({stage})"
    except Exception as exc:  # noqa: BLE001
        return "FAIL", f"{stage}: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
    attn = fast.config._attn_implementation
    detail = (f"attention {attn}; logit error {errs[0]:.1e} / patched {errs[1]:.1e}; "
              f"swapped {', '.join(f'{k} {v}' for k, v in handle.swapped.items()) or 'nothing'}")
    ok = max(errs) < 1e-4 and same
    return ("pass" if ok else "MISMATCH"), detail + ("" if same else "; tokens differ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="markdown file to write")
    parser.add_argument("--types", default=None, help="comma list (default: all)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from fastlm.integrations import transformers as hf

    hf.register()
    kinds = sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if args.types:
        kinds = [k for k in kinds if k in args.types.split(",")]
    signal.signal(signal.SIGALRM, _alarm)
    rows = []
    from tqdm import tqdm

    for kind in tqdm(kinds, desc="model types"):
        signal.alarm(TIMEOUT_S)
        try:
            outcome, detail = check(kind)
        finally:
            signal.alarm(0)
        rows.append((kind, outcome, detail))
    counts = {o: sum(r[1] == o for r in rows) for o in ("pass", "MISMATCH", "FAIL", "n/a")}
    lines = ["# transformers causal-LM types with fastlm", "",
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
