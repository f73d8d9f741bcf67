"""Crash safety, in real processes: a crash mid-save, kill -9, SIGTERM, then --resume auto."""

import json
import signal
import subprocess
import sys
import time

import pytest

PY = sys.executable
BASE = ["model.preset=tiny-gpt2", "model.overrides={n_layer: 2, n_embd: 64, n_head: 2}",
        "data.block_size=32", "train.micro_batch_size=4", "optim.warmup_steps=2",
        "eval.batches=2", "eval.every=0", "log.progress=false", "log.tensorboard=false",
        "log.every=1", "checkpoint.keep_last=2"]
# attention/dropout make the resumed curve depend on RNG state too, not just weights
DROPOUT = "model.overrides={n_layer: 2, n_embd: 64, n_head: 2, resid_pdrop: 0.1}"


def train_cmd(out, data, *extra, resume=False):
    cmd = [PY, "-m", "fastlm.train", *sum((["--set", s] for s in [*BASE, DROPOUT,
           f"data.path={data}", f"out_dir={out}", *extra]), [])]
    return cmd + (["--resume", "auto"] if resume else [])


def run(cmd, env, env_extra=None, expect=0):
    env = dict(env, **(env_extra or {}))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def step_losses(out):
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    by_step = {}
    for r in rows:
        if "loss" in r:
            by_step[r["step"]] = r["loss"]
    return by_step


def logged_steps(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.mark.slow
def test_crash_in_save_and_kill9_then_resume_reproduces_losses(tmp_path, tiny_data, child_env):
    steps = ["train.max_steps=12", "checkpoint.every=4"]
    ref = tmp_path / "ref"
    run(train_cmd(ref, tiny_data, *steps), child_env)
    expected = step_losses(ref)

    out = tmp_path / "crashy"
    # 1. the process dies inside the save of step 8, after DeepSpeed wrote its files
    run(train_cmd(out, tiny_data, *steps), child_env, {"FASTLM_TEST_CRASH_IN_SAVE": "8"}, expect=17)
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step00000004"  # not the half-saved step 8
    assert not (ckpts / "step00000008" / "COMPLETE").exists()
    # 2. resume; this time SIGKILL right after step 10 (latest: step 8)
    run(train_cmd(out, tiny_data, *steps, resume=True), child_env, {"FASTLM_TEST_KILL_AT_STEP": "10"},
        expect=-signal.SIGKILL)
    assert (ckpts / "latest").read_text() == "step00000008"
    # 3. resume to the end: every step's loss equals the uninterrupted run's, exactly
    run(train_cmd(out, tiny_data, *steps, resume=True), child_env)
    got = step_losses(out)
    assert sorted(got) == list(range(1, 13))
    assert got == expected
    # each step's row once, in order: a resume drops the rows logged past its checkpoint
    assert logged_steps(out) == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_sigterm_saves_a_checkpoint_and_generate_reads_it(tmp_path, tiny_data, child_env, sig):
    """SIGUSR1: SLURM's warning ahead of the time limit (--signal=USR1@120); it killed the run
    unsaved (its default action)."""
    out = tmp_path / "term"
    proc = subprocess.Popen(train_cmd(out, tiny_data, "train.max_steps=100000"), env=child_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = out / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") > 2):
        time.sleep(0.2)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, log[-3000:]
    ckpts = out / "checkpoints"
    tag = (ckpts / "latest").read_text()
    assert (ckpts / tag / "COMPLETE").exists()
    assert "checkpoint saved" in log
    gen = run([PY, "-m", "fastlm.cli", "generate", str(out), "--max-new-tokens", "8",
               "--temperature", "0"], child_env)
    assert gen.stdout.strip() != "" or gen.returncode == 0
