"""``fastlm bench fused``: the fused row/elementwise kernels around attention vs PyTorch.

RMSNorm, LayerNorm, GELU (tanh, GPT-2's) and SwiGLU on (tokens, hidden) activations, forward
and forward+backward, fastlm's op (its automatic backend) side by side with the PyTorch
functions a transformers model calls. The two are timed in alternation call by call
(``harness.time_interleaved``), and ``vs_torch`` is the median of the per-round ratios.

``--ops linear_cross_entropy`` (not in the default list: it takes a vocabulary, ``--vocab``)
times the fused LM head + loss against the unfused ``F.cross_entropy((h @ W.T).float(), y)``
that transformers' causal-LM loss computes, and records the peak memory of each (a GPU's
allocator, or the process's resident memory on a Linux CPU);
``linear_cross_entropy_rows`` the same with a loss per token (``reduction="none"``, what DPO's
sequence log-probabilities and multiple-choice scoring take), each row's loss weighted
differently in the backward; ``--frozen-head`` times both with the head's weight frozen (LoRA),
the gradient of the hidden states alone.
"""

from __future__ import annotations

import shlex
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

from fastlm.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser) -> None:
    from fastlm.cli import at_least

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16")
    parser.add_argument("--tokens", default="768,4096", help="comma list of rows (batch x seq)",
                        type=harness.comma_list(int))
    parser.add_argument("--hidden", type=at_least(1), default=1024)
    parser.add_argument("--ops", default="rms_norm,layer_norm,gelu_tanh,swiglu",
                        help="comma list; also linear_cross_entropy and "
                             "linear_cross_entropy_rows (LM head + loss, --vocab)")
    parser.add_argument("--vocab", type=at_least(1), default=32000,
                        help="vocabulary of linear_cross_entropy's LM head")
    parser.add_argument("--frozen-head", action="store_true",
                        help="linear_cross_entropy*: the head's weight frozen (LoRA)")
    parser.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd,fwd_bwd",
                        type=harness.comma_list(choices=("fwd", "fwd_bwd")))
    parser.add_argument("--repeat", type=at_least(1), default=30)
    parser.add_argument("--out", default=None, help="directory for JSON, markdown and PNG")
    parser.add_argument("--name", default=None, help="file stem (default fused_<device>)")


def _ops():
    """op -> (number of (tokens, hidden) inputs, has a (hidden,) weight, fastlm fn, torch fn)."""
    import fastlm.ops as fo

    return {
        "rms_norm": (1, True, lambda x, w: fo.rms_norm(x, w, 1e-6),
                     lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6)),
        "layer_norm": (1, True, lambda x, w: fo.layer_norm(x, w, w, 1e-5),
                       lambda x, w: F.layer_norm(x, (x.shape[-1],), w, w, 1e-5)),
        "gelu_tanh": (1, False, lambda x: fo.gelu(x, approximate="tanh"),
                      lambda x: F.gelu(x, approximate="tanh")),
        "swiglu": (2, False, fo.swiglu, lambda g, u: F.silu(g) * u),
        "linear_cross_entropy": None,  # see _loss_steps
        "linear_cross_entropy_rows": None,
    }


def _loss_steps(dtype, tokens, hidden, vocab, mode, device, rows=False, frozen=False):
    """The fused LM head + cross-entropy and the unfused one (logits in the inputs' dtype,
    the loss in fp32, as transformers computes it), on the same inputs; ``rows``: a loss per
    row, the backward seeded with a different weight per row; ``frozen``: the head's weight
    a constant."""
    import fastlm.ops as fo

    grad = mode == "fwd_bwd"
    h = torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=grad)
    w = (torch.randn(vocab, hidden, device=device) / hidden**0.5).to(dtype)
    w.requires_grad_(grad and not frozen)
    wrt = (h,) if frozen else (h, w)
    y = torch.randint(0, vocab, (tokens,), device=device)
    reduction = "none" if rows else "mean"
    seed = torch.randn(tokens, device=device) if rows else None

    def step(fn):
        def call(_i):
            loss = fn()
            if grad:
                torch.autograd.grad(loss, wrt, seed)
        return call

    return {"fastlm": step(lambda: fo.fused_linear_cross_entropy(h, w, y, reduction=reduction)),
            "torch": step(lambda: F.cross_entropy((h @ w.T).float(), y, reduction=reduction))}


def _steps(op, dtype, tokens, hidden, mode, device, vocab=32000, frozen=False):
    """{"fastlm": step(i), "torch": step(i)} on the same inputs."""
    if op.startswith("linear_cross_entropy"):
        return _loss_steps(dtype, tokens, hidden, vocab, mode, device,
                           rows=op.endswith("_rows"), frozen=frozen)
    n_in, weighted, ours, theirs = _ops()[op]
    grad = mode == "fwd_bwd"
    xs = [torch.randn(tokens, hidden, device=device, dtype=dtype, requires_grad=grad)
          for _ in range(n_in)]
    args = xs + ([torch.randn(hidden, device=device, dtype=dtype, requires_grad=grad)]
                 if weighted else [])
    dy = torch.randn(tokens, hidden, device=device, dtype=dtype)

    def step(fn):
        def call(_i):
            y = fn(*args)
            if grad:
                torch.autograd.grad(y, args, dy)
        return call

    return {"fastlm": step(ours), "torch": step(theirs)}


def run(args) -> int:
    from fastlm.cli import UserError

    device = args.device
    unknown = sorted(set(args.ops.split(",")) - set(_ops()))
    if unknown:
        raise UserError(f"--ops: unknown {', '.join(unknown)} (choose from {', '.join(_ops())})")
    bad = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if bad:
        raise UserError(f"--dtypes: unknown {', '.join(bad)} (choose from fp32, bf16, fp16)")
    command = "fastlm bench fused " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    report = harness.Report("fused", command, device, env=harness.environment(device))
    cases = [(op, d, t, m) for op in args.ops.split(",") for d in args.dtypes.split(",")
             for t in (int(x) for x in args.tokens.split(",")) for m in args.modes.split(",")]
    for op, dname, tokens, mode in tqdm(cases, desc="fused"):
        fns = _steps(op, DTYPES[dname], tokens, args.hidden, mode, device, args.vocab,
                     args.frozen_head)
        timings, peaks = harness.time_interleaved(
            fns, device=device, warmup=3, repeat=args.repeat,
            cpu_memory=op.startswith("linear_cross_entropy"))
        paired = harness.paired_speedup(timings, "fastlm", ["torch"])
        for impl, t in timings.items():
            extra = ({"vocab": args.vocab, "frozen_head": args.frozen_head,
                      "peak_gb": peaks[impl]}
                     if op.startswith("linear_cross_entropy") else {})
            report.add(op=op, impl=impl, case=f"{dname} {mode}", dtype=dname, mode=mode,
                       tokens=tokens, hidden=args.hidden, ms=t.median_ms, p20_ms=t.p20_ms,
                       p80_ms=t.p80_ms, vs_torch=paired if impl == "fastlm" else 1.0, **extra)
    print(harness.format_table(report.rows))
    if args.out:
        stem = args.name or f"fused_{device}"
        paths = report.write(args.out, stem)
        ours = harness.Report(report.name, report.command, device, env=report.env,
                              rows=[dict(r, series=f"{r['op']}") for r in report.rows
                                    if r["impl"] == "fastlm"])
        paths.append(harness.plot(ours, f"{args.out}/{stem}.png", x="tokens", y="vs_torch",
                                  series="series", facet="case",
                                  ylabel="fastlm speedup vs torch (paired)"))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
