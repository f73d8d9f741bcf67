"""``fastlm bench train --vs-nanogpt DIR``: nanoGPT's CPU recipe side by side, time to a target
validation loss.

Runs, one after the other on the same machine, (1) nanoGPT's own ``train.py`` from a local
checkout the user provides (its ``data/shakespeare_char`` prepared with its ``prepare.py``) with
the recipe's arguments, and (2) ``fastlm train configs/shakespeare_char.yaml`` on the same text
prepared by ``fastlm prepare`` (nanoGPT's character vocabulary, validation = the last 10%), in the
precision the config's ``auto`` picks here, then (3) where that was not fp32, the same in fp32.
Each run's validation losses are read from its log with the wall-clock time since launch; the
report gives the time at which each first reached the target loss, and the ratio. An untimed
one-step fastlm run goes first, so one-time builds (DeepSpeed's shared-memory comm op, fastlm's
extensions) are not charged to whichever timed run happens to come first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

NANOGPT_ARGS = ["config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
                "--eval_iters=20", "--log_interval=50", "--block_size=64", "--batch_size=12",
                "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
                "--lr_decay_iters=2000", "--dropout=0.0"]
_NANO_EVAL = re.compile(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)")
_FASTLM_EVAL = re.compile(r"step (\d+): val loss ([\d.]+)")


def _timed_run(cmd, cwd, pattern, log_path: Path) -> tuple[float, list]:
    """(wall seconds, [(seconds since launch, step, val loss)]) reading the log as it streams."""
    t0 = time.perf_counter()
    evals = []
    with open(log_path, "w") as log:
        # unbuffered: each eval line must arrive when it is printed, or its time is wrong
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, env=env)
        for line in proc.stdout:
            log.write(line)
            m = pattern.search(line)
            if m:
                evals.append((time.perf_counter() - t0, int(m.group(1)), float(m.group(2))))
        proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - t0, evals


def _run_precision(run_dir: Path) -> str | None:
    """The precision a fastlm run trained in (its saved config holds "auto" resolved)."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()).get("train") or {}).get("precision")


def time_to(evals, target):
    return next((t for t, _, loss in evals if loss <= target), None)


def artifact_dir(args) -> Path:
    """Where the curves JSON and the plot go: --out, else the work directory (a run without
    --out must not overwrite the committed results in benchmarks/results)."""
    return Path(args.out) if args.out else Path(args.work_dir)


def run(args, report) -> None:
    out = artifact_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    nano = Path(args.vs_nanogpt).resolve()
    if not (nano / "train.py").is_file() or not (nano / "data/shakespeare_char/train.bin").is_file():
        from fastlm.cli import UserError

        raise UserError(f"--vs-nanogpt {nano}: expected a nanoGPT checkout with train.py and "
                        f"data/shakespeare_char/{{train,val}}.bin (run its prepare.py first)")
    shakes = Path(args.text)
    data = work / "shakespeare_char"
    # the work dir is the bench's own: a dataset left by an earlier run is replaced
    prep = subprocess.run([sys.executable, "-m", "fastlm.cli", "prepare", str(shakes), "--out",
                           str(data), "--tokenizer", "char", "--split", "tail",
                           "--val-fraction", "0.1", "--no-dedup", "--no-near-dedup",
                           "--no-repetition", "--overwrite"], capture_output=True, text=True)
    if prep.returncode != 0:
        from fastlm.cli import UserError

        raise UserError(f"preparing {shakes} failed: {prep.stderr.strip()[-500:]}")
    user_sets = list(getattr(args, "fastlm_set", []))

    def fastlm_cmd(run_dir: Path, extra) -> list:
        return [sys.executable, "-m", "fastlm.cli", "train", "configs/shakespeare_char.yaml",
                "--set", f"data.path={data}", "--set", f"out_dir={run_dir}",
                "--set", "log.progress=false", "--set", "sample.tokens=0",
                *(a for kv in [*user_sets, *extra] for a in ("--set", kv))]

    # An untimed step first: one-time builds (DeepSpeed's shared-memory comm op, ~20-90 s on
    # a fresh machine; fastlm's extensions) would otherwise land in the first timed run only.
    warm_dir = work / "warmup-run"
    shutil.rmtree(warm_dir, ignore_errors=True)
    warm = subprocess.run(fastlm_cmd(warm_dir, ["train.max_steps=1", "eval.batches=1"]),
                          capture_output=True, text=True)
    if warm.returncode != 0:
        from fastlm.cli import UserError

        raise UserError(f"the untimed warm-up run of fastlm failed: "
                        f"{(warm.stdout + warm.stderr).strip()[-800:]}")
    runs = {}
    nano_cmd = [sys.executable, "train.py", *NANOGPT_ARGS, f"--out_dir={work / 'nanogpt-out'}"]
    runs["nanogpt"] = _timed_run(nano_cmd, nano, _NANO_EVAL, work / "nanogpt.log")
    precisions = {"nanogpt": "fp32"}  # nanoGPT's train.py has no mixed precision on a CPU
    # the recipe's config says train.precision=auto: bf16 on a CPU with bf16 dot products.
    # Such a run is followed by the same recipe in fp32, so both sit beside nanoGPT's fp32
    for name, extra in (("fastlm", []), ("fastlm-fp32", ["train.precision=fp32"])):
        if extra and precisions.get("fastlm") in (None, "fp32"):
            break
        run_dir = work / f"{name}-run"
        shutil.rmtree(run_dir, ignore_errors=True)
        runs[name] = _timed_run(fastlm_cmd(run_dir, extra), Path.cwd(), _FASTLM_EVAL,
                                work / f"{name}.log")
        precisions[name] = _run_precision(run_dir)
    target = args.target_loss
    base = time_to(runs["nanogpt"][1], target)
    for name, (wall, evals) in runs.items():
        t = time_to(evals, target)
        report.add(impl=name, precision=precisions.get(name), wall_s=round(wall, 1), final_val_loss=evals[-1][2] if evals else None,
                   target=target, s_to_target=None if t is None else round(t, 1),
                   step_at_target=next((s for tt, s, v in evals if v <= target), None),
                   vs_nanogpt=(t / base) if (t and base) else None)
    (out / f"{report.name}_curves.json").write_text(json.dumps(
        {k: v[1] for k, v in runs.items()}))
    _plot(runs, target, out / f"{report.name}.png", report)


def _plot(runs, target, path: Path, report) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (_, evals) in runs.items():
        ax.plot([t for t, _, _ in evals], [v for _, _, v in evals], marker="o", label=name)
    ax.axhline(target, color="gray", ls="--", lw=1, label=f"target {target}")
    ax.set_xlabel("wall-clock seconds since launch")
    ax.set_ylabel("validation loss")
    ax.set_title(f"nanoGPT CPU recipe (char shakespeare) on "
                 f"{report.env.get('device', 'cpu')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
