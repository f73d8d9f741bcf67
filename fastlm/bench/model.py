"""``fastlm bench model``: a transformers model's training step (forward + backward) with and
without fastlm (``attn_implementation="fastlm"`` + ``fastlm.patch``), side by side with SDPA
and eager attention: step time, tokens/s and peak memory, over sequence lengths.

The implementations are timed in alternation. ``vs_best_peer`` is the ratio of medians;
``paired_vs_best_peer`` (fastlm's rows) the median over rounds of the fastest unpatched call
over the patched one in the same round, the steadier of the two on a drifting machine."""

from __future__ import annotations

import dataclasses
import math
import shlex
import sys

import torch
from tqdm import tqdm

from fastlm.bench import harness

_DEC = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            vocab_size=8192)
SIZES = {  # small enough for a CPU run, shaped like the real thing (head dim 32)
    "llama": dict(_DEC, num_key_value_heads=4),
    "mistral": dict(_DEC, num_key_value_heads=4),
    "qwen2": dict(_DEC, num_key_value_heads=4),
    "qwen3": dict(_DEC, num_key_value_heads=4, head_dim=32),
    "gemma": dict(_DEC, num_key_value_heads=1, head_dim=32),
    "phi3": dict(_DEC, pad_token_id=0),
    "gpt_neox": dict(_DEC, intermediate_size=1024),
    "gpt2": dict(n_embd=256, n_layer=4, n_head=8, vocab_size=8192),
    "opt": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=8,
                word_embed_proj_dim=256, vocab_size=8192, max_position_embeddings=4096),
    "bert": dict(_DEC, intermediate_size=1024, max_position_embeddings=4096),
}
NO_DROPOUT = {"gpt2": dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
              "opt": dict(dropout=0.0), "bert": dict(hidden_dropout_prob=0.0,
                                                      attention_probs_dropout_prob=0.0)}
IMPLS = ("eager", "sdpa", "fastlm")


def add_arguments(parser) -> None:
    parser.add_argument("--model-type", default="llama",
                        help=f"one or more (comma-separated) of {', '.join(sorted(SIZES))}, "
                             "or 'all'")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seqlens", default="256,512,1024")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5,
                        help="timed rounds at least (more when --min-seconds asks for them)")
    parser.add_argument("--min-seconds", type=float, default=3.0,
                        help="time each implementation for at least this long per length: "
                             "short steps get more rounds (this VM drifts by a few %%)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default=None)


def _model(kind: str, impl: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    import fastlm

    # dropout off: attention dropout would send every implementation to a different path
    conf = AutoConfig.for_model(kind, **SIZES[kind], **NO_DROPOUT.get(kind, {}))
    if hasattr(conf, "n_positions"):
        conf.n_positions = 4096
    torch.manual_seed(0)
    attn = "sdpa" if impl == "fastlm" else impl
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    model = auto.from_config(conf, attn_implementation=attn).to(device, dtype)
    if impl == "fastlm":
        fastlm.patch(model)  # attention + norms + MLP activations
    return model.train()


def _kinds(spec: str) -> list[str]:
    from fastlm.cli import UserError

    kinds = sorted(SIZES) if spec == "all" else [k.strip() for k in spec.split(",") if k.strip()]
    bad = [k for k in kinds if k not in SIZES]
    if bad or not kinds:
        raise UserError(f"--model-type {spec!r}: unknown {bad}; choose from "
                        f"{', '.join(sorted(SIZES))} or 'all'")
    return kinds


def run(args) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    kinds = _kinds(args.model_type)
    tag = kinds[0] if len(kinds) == 1 else "all" if len(kinds) == len(SIZES) else "_".join(kinds)
    report = harness.Report(
        name=args.name or f"model_{tag}_{args.device}",
        command="fastlm bench model " + shlex.join(sys.argv[3:]), device=args.device,
        env=harness.environment(args.device))
    seqlens = [int(x) for x in args.seqlens.split(",")]
    for kind in tqdm(kinds, desc="bench model", disable=None):
        models = {impl: _model(kind, impl, args.device, dtype) for impl in IMPLS}
        vocab = models["eager"].config.vocab_size
        for s in seqlens:
            ids = torch.randint(0, vocab, (args.batch, s), device=args.device)
            steps = {impl: (lambda i, m=m, x=ids: m(x, labels=x).loss.backward())
                     for impl, m in models.items()}
            probe, _ = harness.time_interleaved(steps, device=args.device, warmup=1, repeat=1)
            slowest = max(t.median_ms for t in probe.values()) * 1e-3
            repeat = max(args.repeat, math.ceil(args.min_seconds / max(slowest, 1e-6)))
            timings, peaks = harness.time_interleaved(steps, device=args.device, warmup=0,
                                                      repeat=repeat)
            paired = harness.paired_speedup(timings, "fastlm", [i for i in IMPLS
                                                                if i != "fastlm"])
            for impl, t in timings.items():
                report.add(model=kind, impl=impl, dtype=str(dtype).split(".")[-1],
                           seqlen=s, batch=args.batch, rounds=t.n, ms=t.median_ms,
                           tokens_per_s=args.batch * s / (t.median_ms * 1e-3),
                           peak_gb=peaks[impl],
                           paired_vs_best_peer=paired if impl == "fastlm" else None)
        for m in models.values():
            m.zero_grad(set_to_none=True)
        del models
    harness.add_speedup(report, "vs_best_peer", ["model", "seqlen"],
                        lambda r: r["impl"] != "fastlm")
    print(harness.format_table(report.rows))
    if args.out:
        paths = report.write(args.out)
        png = f"{args.out}/{report.name}.png"
        if len(kinds) == 1:
            paths.append(harness.plot(report, png, x="seqlen", y="tokens_per_s", series="impl",
                                      ylabel="training tokens/s"))
        else:  # one line per model: the patched model's speed over the best unpatched one
            ours = dataclasses.replace(report, rows=[r for r in report.rows
                                                     if r["impl"] == "fastlm"])
            paths.append(harness.plot(ours, png, x="seqlen", y="vs_best_peer", series="model",
                                      ylabel="fastlm.patch speed / best of eager, sdpa"))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
