"""``fastlm bench attention``: fastlm's backends side by side with torch SDPA and eager math.

FLOPs are counted as FlashAttention counts them: 4 * B * H * Sq * Sk * D for the forward
(two matmuls), halved when causal, and 3.5x the forward for forward + backward (the backward
does five matmuls of the same size: 2.5x). Every row also reports its share of the matmul
peak measured in the same run and its speed relative to the fastest SDPA backend.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys

import torch
import torch.nn.functional as F

from fastlm.bench import harness

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser) -> None:
    from fastlm.cli import at_least

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32,bf16,fp16",
                        type=harness.comma_list(choices=DTYPES))
    parser.add_argument("--seqlens", default="256,512,1024", help="comma list",
                        type=harness.comma_list(int))
    parser.add_argument("--batch", type=at_least(1), default=1)
    parser.add_argument("--heads", type=at_least(1), default=8)
    parser.add_argument("--head-dim", type=at_least(1), default=64)
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--query-len", type=at_least(1), default=None,
                        help="query tokens against each --seqlens keys (decoding: 1); "
                             "default: as many as keys. Causal is then bottom-right aligned")
    parser.add_argument("--modes", default="fwd,fwd_bwd", help="comma list of fwd,fwd_bwd",
                        type=harness.comma_list(choices=("fwd", "fwd_bwd")))
    parser.add_argument("--impls", default="", help="comma list to restrict the implementations")
    parser.add_argument("--repeat", type=at_least(1), default=10)
    parser.add_argument("--out", default=None, help="directory for JSON, markdown and PNG")
    parser.add_argument("--name", default=None, help="file stem (default attention_<device>)")


def flops(b, h, sq, sk, d, causal, mode) -> float:
    f = 4.0 * b * h * sq * sk * d
    if causal and sq == sk:
        f /= 2  # FlashAttention's convention
    elif causal:  # the visible fraction of a bottom-right causal (sq x sk) score matrix
        f *= 1 - (sq - 1) / (2 * sk) if sq < sk else (sk + 1) / (2 * sq)
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def _sdpa_variants(device: str) -> dict[str, contextlib.AbstractContextManager]:
    """Each SDPA backend torch has for this device, pinned one at a time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if device == "cpu":
        # On the CPU torch has a flash-style kernel (chosen by default) and the math path.
        names = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_math": SDPBackend.MATH}
    else:
        names = {
            "sdpa_flash": SDPBackend.FLASH_ATTENTION,
            "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        }
    return {name: (lambda b=b: sdpa_kernel([b])) for name, b in names.items()}


def _sdpa(q, k, v, causal):
    sq, sk = q.shape[2], k.shape[2]
    if causal and sq != sk:  # SDPA's is_causal aligns top-left; fastlm's (and HF's) bottom-right
        from torch.nn.attention.bias import causal_lower_right

        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(sq, sk))
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def implementations(device: str) -> dict:
    """name -> (fn(q, k, v, causal) -> out, context factory)."""
    from fastlm.ops import attention
    from fastlm.ops.reference import attention_ref

    impls = {}
    backends = ("cuda", "triton") if device == "cuda" else ("cpu",)
    for name in backends:
        impls[f"fastlm_{name}"] = (
            lambda q, k, v, causal, n=name: attention(q, k, v, causal=causal, backend=n),
            contextlib.nullcontext,
        )
    for name, ctx in _sdpa_variants(device).items():
        impls[name] = (_sdpa, ctx)
    impls["eager_math"] = (
        lambda q, k, v, causal: attention_ref(q, k, v, causal=causal, upcast=False),
        contextlib.nullcontext,
    )
    return impls


def _bench_one(fn, ctx, shape, dtype, device, causal, mode, repeat, sq=None) -> harness.Timing | str:
    b, h, s, d = shape
    sq = s if sq is None else sq
    copies = 3
    inputs = [
        [torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=mode == "fwd_bwd")
         for n in (sq, s, s)]
        for _ in range(copies)
    ]
    dout = torch.randn(b, h, sq, d, device=device, dtype=dtype)

    def step(i):
        q, k, v = inputs[i % copies]
        out = fn(q, k, v, causal)
        if mode == "fwd_bwd":
            torch.autograd.grad(out, (q, k, v), dout)

    try:
        with ctx():
            return harness.time_fn(step, device=device, warmup=2, repeat=repeat)
    except Exception as exc:  # a peer that cannot run this case is reported, not fatal
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"


def run(args) -> int:
    device = args.device
    dtypes = [DTYPES[d] for d in args.dtypes.split(",")]
    seqlens = [int(s) for s in args.seqlens.split(",")]
    modes = args.modes.split(",")
    impls = implementations(device)
    wanted = harness.chosen_impls(args.impls, list(impls), device)
    if wanted is not None:
        impls = {k: v for k, v in impls.items() if k in wanted}
    command = "fastlm bench attention " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    report = harness.Report("attention", command, device, env=harness.environment(device))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    fp32_peak = harness.matmul_peak_tflops(device, torch.float32)
    for dtype in dtypes:
        dname = str(dtype).removeprefix("torch.")
        # The ceiling is the faster of this dtype's and fp32's matmul: on CPUs without native
        # bf16/fp16 arithmetic torch's low-precision matmul is far below what the machine can
        # do (kernels upconvert and run fp32 FMAs), which would make "% of peak" meaningless.
        peak = fp32_peak if dtype == torch.float32 else harness.matmul_peak_tflops(device, dtype)
        report.ceilings[f"matmul_tflops_{dname}"] = max(peak, fp32_peak)
    cases = [(dt, s, m, n) for dt in dtypes for s in seqlens for m in modes for n in impls]
    for dtype, s, mode, name in (tqdm(cases, desc="attention") if tqdm else cases):
        fn, ctx = impls[name]
        shape = (args.batch, args.heads, s, args.head_dim)
        sq = s if args.query_len is None else args.query_len
        t = _bench_one(fn, ctx, shape, dtype, device, args.causal, mode, args.repeat, sq)
        dname = str(dtype).removeprefix("torch.")
        row = dict(impl=name, case=f"{dname} {mode}", dtype=dname, mode=mode, seqlen=s, batch=args.batch, heads=args.heads,
                   head_dim=args.head_dim, causal=args.causal)
        if args.query_len is not None:
            row["query_len"] = sq
        if isinstance(t, str):
            row.update(ms=None, tflops=None, pct_peak=None, error=t)
        else:
            tf = flops(args.batch, args.heads, sq, s, args.head_dim, args.causal, mode) / (
                t.median_ms * 1e-3) / 1e12
            peak = report.ceilings[f"matmul_tflops_{dname}"]
            row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, tflops=tf,
                       pct_peak=100 * tf / peak)
        report.add(**row)
    harness.add_speedup(report, "vs_best_sdpa", ("dtype", "mode", "seqlen"),
                        lambda r: r["impl"].startswith("sdpa"))
    print(harness.format_table(report.rows))
    if args.out:
        stem = args.name or f"attention_{device}"
        paths = report.write(args.out, stem)
        paths.append(harness.plot(report, f"{args.out}/{stem}.png", x="seqlen", y="tflops",
                                  series="impl", facet="case", ylabel="TFLOP/s"))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
