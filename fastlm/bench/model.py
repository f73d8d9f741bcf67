"""``fastlm bench model``: a transformers model's training step (forward + backward) with and
without fastlm (``attn_implementation="fastlm"`` + ``fastlm.patch``), side by side with SDPA
and eager attention: step time, tokens/s and peak memory, over sequence lengths."""

from __future__ import annotations

import shlex
import sys

import torch

from fastlm.bench import harness

SIZES = {  # small enough for a CPU run, shaped like the real thing
    "llama": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
    "gpt2": dict(n_embd=256, n_layer=4, n_head=8, vocab_size=8192),
}
IMPLS = ("eager", "sdpa", "fastlm")


def add_arguments(parser) -> None:
    parser.add_argument("--model-type", default="llama", choices=sorted(SIZES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--seqlens", default="256,512,1024")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=None)
    parser.add_argument("--name", default=None)


def _model(kind: str, impl: str, device: str, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    import fastlm

    conf = AutoConfig.for_model(kind, **SIZES[kind])
    if hasattr(conf, "n_positions"):
        conf.n_positions = 4096
    torch.manual_seed(0)
    attn = "sdpa" if impl == "fastlm" else impl
    model = AutoModelForCausalLM.from_config(conf, attn_implementation=attn).to(device, dtype)
    if impl == "fastlm":
        fastlm.patch(model)  # attention + norms + MLP activations
    return model.train()


def run(args) -> int:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    report = harness.Report(
        name=args.name or f"model_{args.model_type}_{args.device}",
        command="fastlm bench model " + shlex.join(sys.argv[3:]), device=args.device,
        env=harness.environment(args.device))
    for impl in IMPLS:
        model = _model(args.model_type, impl, args.device, dtype)
        vocab = model.config.vocab_size
        for s in [int(x) for x in args.seqlens.split(",")]:
            ids = torch.randint(0, vocab, (args.batch, s), device=args.device)

            def step(i, model=model, ids=ids):
                model(ids, labels=ids).loss.backward()

            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            t = harness.time_fn(step, device=args.device, warmup=1, repeat=args.repeat)
            peak = (torch.cuda.max_memory_allocated() / 2**30
                    if args.device.startswith("cuda") else None)
            model.zero_grad(set_to_none=True)
            report.add(model=args.model_type, impl=impl, dtype=str(dtype).split(".")[-1],
                       seqlen=s, batch=args.batch, ms=t.median_ms,
                       tokens_per_s=args.batch * s / (t.median_ms * 1e-3), peak_gb=peak)
    harness.add_speedup(report, "vs_best_peer", ["seqlen"], lambda r: r["impl"] != "fastlm")
    print(harness.format_table(report.rows))
    if args.out:
        paths = report.write(args.out)
        paths.append(harness.plot(report, f"{args.out}/{report.name}.png", x="seqlen",
                                  y="tokens_per_s", series="impl", ylabel="training tokens/s"))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
