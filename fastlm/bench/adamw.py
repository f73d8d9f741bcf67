"""``fastlm bench adamw``: FusedAdamW against torch's AdamW variants and DeepSpeed's Adam.

An fp32 AdamW step moves 28 bytes per parameter (read param, grad, m, v; write param, m, v),
so each row reports GB/s at 28 B/param and its share of the copy bandwidth measured in the same
run; ``vs_best_peer`` divides the fastest peer's time by the row's time.
"""

from __future__ import annotations

import os
import shlex
import sys

import torch

from fastlm.bench import harness

BYTES_PER_PARAM = 28


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="1,4,16,40", help="millions of parameters (comma list)")
    parser.add_argument("--tensors", type=int, default=8, help="tensors the parameters split into")
    parser.add_argument("--impls", default="", help="comma list to restrict the implementations")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--out", default=None, help="directory for JSON, markdown and PNG")
    parser.add_argument("--name", default=None, help="file stem (default adamw_<device>)")


def _make(n_params: int, n_tensors: int, device: str):
    sizes = [n_params // n_tensors] * n_tensors
    sizes[-1] += n_params - sum(sizes)
    params = [torch.randn(s, device=device, requires_grad=True) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def implementations(device: str) -> dict:
    """name -> factory(params) -> optimizer."""
    from fastlm.optim import FusedAdamW

    impls = {
        f"fastlm_{'cpu' if device == 'cpu' else 'auto'}": lambda ps: FusedAdamW(ps, lr=1e-3),
        "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
        "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    }
    if device == "cpu":
        impls["torch_single"] = lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False)
        impls["deepspeed_cpu_adam"] = _deepspeed_cpu_adam
    else:
        impls["deepspeed_fused_adam"] = _deepspeed_fused_adam
    return impls


def _deepspeed_cpu_adam(params):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=True)


def _deepspeed_fused_adam(params):
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, lr=1e-3, adam_w_mode=True)


def run(args) -> int:
    device = args.device
    impls = implementations(device)
    if args.impls:
        impls = {k: v for k, v in impls.items() if k in args.impls.split(",")}
    command = "fastlm bench adamw " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    report = harness.Report("adamw", command, device, env=harness.environment(device))
    report.ceilings["copy_gbs"] = harness.copy_bandwidth_gbs(device)
    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",")]
    from tqdm import tqdm

    for n, (name, factory) in tqdm([(n, i) for n in sizes for i in impls.items()], desc="adamw"):
        row = dict(impl=name, params_m=n / 1e6, tensors=args.tensors)
        try:
            params = _make(n, args.tensors, device)
            opt = factory(params)
            t = harness.time_fn(lambda i, opt=opt: opt.step(), device=device, warmup=2,
                                repeat=args.repeat)
            gbs = BYTES_PER_PARAM * n / (t.median_ms * 1e-3) / 1e9
            row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, gbs=gbs,
                       pct_copy_bw=100 * gbs / report.ceilings["copy_gbs"])
            del opt, params
        except Exception as exc:  # a peer that cannot run here is reported, not fatal
            row.update(ms=None, gbs=None, error=f"{type(exc).__name__}: {str(exc)[:80]}")
        report.add(**row)
    harness.add_speedup(report, "vs_best_peer", ("params_m",),
                        lambda r: not r["impl"].startswith("fastlm"))
    print(harness.format_table(report.rows))
    if args.out:
        stem = args.name or f"adamw_{device}"
        paths = report.write(args.out, stem)
        paths.append(harness.plot(report, f"{args.out}/{stem}.png", x="params_m", y="gbs",
                                  series="impl", ylabel="GB/s at 28 B/param", logx=True))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
