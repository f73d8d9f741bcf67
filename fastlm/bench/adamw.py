"""``fastlm bench adamw``: FusedAdamW against torch's AdamW variants and DeepSpeed's Adam.

An fp32 AdamW step moves 28 bytes per parameter (read param, grad, m, v; write param, m, v):
every implementation is bound by memory bandwidth, so each row reports its GB/s (at the bytes
it moves) and its share of an in-place update's bandwidth measured in the same run, and
``vs_best_peer`` divides the fastest peer's time by the row's time in the same scenario:

- ``step``: the optimizer step alone. ``fastlm_cpu_bf16m`` is FusedAdamW with bf16 moments
  (20 B/param; the accuracy cost is in the README), compared against the fp32 peers' step.
- ``clip+step``: gradient-norm clipping then the step, as every LLM training loop runs it.
  torch's ``clip_grad_norm_`` reads the gradients for the norm and rescales them in place
  (4 + 8 B) before the step's 28; FusedAdamW.clip_grad_norm_ folds the rescale into the
  step's read of the gradient (4 + 28 B).
"""

from __future__ import annotations

import os
import shlex
import sys

import torch

from fastlm.bench import harness

BYTES_PER_PARAM = 28
SCENARIOS = ("step", "clip+step")


def add_arguments(parser) -> None:
    from fastlm.cli import at_least

    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", default="1,4,16,40", help="millions of parameters (comma list)",
                        type=harness.comma_list(float))
    parser.add_argument("--tensors", type=at_least(1), default=8, help="tensors the parameters split into")
    parser.add_argument("--impls", default="", help="comma list to restrict the implementations")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma list of {', '.join(SCENARIOS)}")
    parser.add_argument("--repeat", type=at_least(1), default=10)
    parser.add_argument("--out", default=None, help="directory for JSON, markdown and PNG")
    parser.add_argument("--name", default=None, help="file stem (default adamw_<device>)")


def _make(n_params: int, n_tensors: int, device: str):
    sizes = [n_params // n_tensors] * n_tensors
    sizes[-1] += n_params - sum(sizes)
    params = [torch.randn(s, device=device, requires_grad=True) for s in sizes]
    for p in params:
        p.grad = torch.randn_like(p)
    return params


def _step(opt):
    return lambda i: opt.step()


def _clip_then_step(params, opt):
    # torch's clip: foreach norm, then every gradient rescaled in place (an active clip)
    def run(i):
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
    return run


def _fused_clip_then_step(params, opt):
    def run(i):
        opt.clip_grad_norm_(1.0)
        opt.step()
    return run


def implementations(device: str, scenario: str = "step") -> dict:
    """name -> (factory(params) -> step function, bytes moved per parameter)."""
    from fastlm.optim import FusedAdamW

    ours = f"fastlm_{'cpu' if device == 'cpu' else 'auto'}"
    peers = {
        "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
        "deepspeed_cpu_adam" if device == "cpu" else "deepspeed_fused_adam":
            _deepspeed_cpu_adam if device == "cpu" else _deepspeed_fused_adam,
    }
    if scenario == "clip+step":
        impls = {ours: (lambda ps: _fused_clip_then_step(ps, FusedAdamW(ps, lr=1e-3)), 32)}
        for name, make in peers.items():
            impls[name] = (lambda ps, make=make: _clip_then_step(ps, make(ps)), 40)
        return impls
    impls = {
        ours: (lambda ps: _step(FusedAdamW(ps, lr=1e-3)), 28),
        f"{ours}_bf16m": (lambda ps: _step(FusedAdamW(ps, lr=1e-3, state_dtype=torch.bfloat16)),
                          20),
        "torch_foreach": (lambda ps: _step(torch.optim.AdamW(ps, lr=1e-3, foreach=True)), 28),
    }
    if device == "cpu":
        impls["torch_single"] = (lambda ps: _step(torch.optim.AdamW(ps, lr=1e-3, foreach=False)),
                                 28)
    for name, make in peers.items():
        impls[name] = (lambda ps, make=make: _step(make(ps)), 28)
    return impls


def _deepspeed_cpu_adam(params):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=1e-3, adamw_mode=True)


def _deepspeed_fused_adam(params):
    from deepspeed.ops.adam import FusedAdam

    return FusedAdam(params, lr=1e-3, adam_w_mode=True)


def run(args) -> int:
    from tqdm import tqdm

    device = args.device
    scenarios = [x.strip() for x in args.scenarios.split(",") if x.strip()]
    bad = [x for x in scenarios if x not in SCENARIOS]
    if bad or not scenarios:
        from fastlm.cli import UserError

        raise UserError(f"--scenarios {args.scenarios!r}: choose from {', '.join(SCENARIOS)}")
    names = list(dict.fromkeys(n for sc in scenarios for n in implementations(device, sc)))
    wanted = harness.chosen_impls(args.impls, names, device)
    command = "fastlm bench adamw " + " ".join(shlex.quote(a) for a in sys.argv[3:])
    report = harness.Report("adamw", command, device, env=harness.environment(device))
    report.ceilings["copy_gbs"] = harness.copy_bandwidth_gbs(device)
    report.ceilings["update_gbs"] = harness.update_bandwidth_gbs(device)
    sizes = [int(float(s) * 1e6) for s in args.sizes.split(",")]
    for n in tqdm(sizes, desc="adamw", disable=None):
        # every implementation of this size built first, then timed in alternation: this
        # VM's bandwidth drifts over seconds, and sequential runs would hand it to one of them
        steps, meta = {}, {}
        for sc in scenarios:
            for name, (factory, nbytes) in implementations(device, sc).items():
                if wanted is not None and name not in wanted:
                    continue
                row = dict(impl=name, scenario=sc, params_m=n / 1e6, tensors=args.tensors,
                           bytes_per_param=nbytes)
                try:
                    steps[(name, sc)] = factory(_make(n, args.tensors, device))
                except Exception as exc:  # a peer that cannot run here is reported, not fatal
                    row.update(ms=None, gbs=None, error=f"{type(exc).__name__}: {str(exc)[:80]}")
                meta[(name, sc)] = row
        timings, _ = harness.time_interleaved(steps, device=device, warmup=2,
                                              repeat=args.repeat)
        for key, row in meta.items():
            t = timings.get(key)
            if t is not None:
                gbs = row["bytes_per_param"] * n / (t.median_ms * 1e-3) / 1e9
                row.update(ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, gbs=gbs,
                           pct_update_bw=100 * gbs / report.ceilings["update_gbs"])
            report.add(**row)
        del steps
    harness.add_speedup(report, "vs_best_peer", ("params_m", "scenario"),
                        lambda r: not r["impl"].startswith("fastlm"))
    print(harness.format_table(report.rows))
    if args.out:
        stem = args.name or f"adamw_{device}"
        paths = report.write(args.out, stem)
        paths.append(harness.plot(report, f"{args.out}/{stem}.png", x="params_m",
                                  y="vs_best_peer", series="impl", facet="scenario",
                                  ylabel="speed / fastest peer's (higher is better)",
                                  logx=True))
        print("wrote " + ", ".join(str(p) for p in paths))
    return 0
