"""Trainer paths that need a GPU: fp16 dynamic loss scaling (DeepSpeed has no fp16 on CPU), and
bf16 with the CUDA FusedAdamW holding the masters."""

import json

import pytest

from fastlm.train.config import load_config

pytestmark = pytest.mark.gpu

TINY = ["model.preset=tiny-gpt2", "model.overrides={n_layer: 2, n_embd: 64, n_head: 2}",
        "data.block_size=32", "optim.warmup_steps=2", "eval.every=0", "log.every=1",
        "log.progress=false", "log.tensorboard=false", "train.micro_batch_size=4"]


@pytest.fixture(autouse=True)
def _env(launcher_env):
    yield


def test_injected_fp16_overflow_skips_the_step_and_halves_the_scale(tmp_path, tiny_data,
                                                                    monkeypatch):
    from fastlm.train.trainer import train

    monkeypatch.setenv("FASTLM_TEST_OVERFLOW_AT_STEP", "3")
    cfg = load_config(None, [*TINY, "train.precision=fp16", "train.max_steps=5",
                             f"data.path={tiny_data}", f"out_dir={tmp_path / 'run'}"])
    train(cfg)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = {r["step"]: r for r in rows if "loss" in r}
    assert rows[2]["skipped_steps"] == 0 and rows[3]["skipped_steps"] == 1
    assert rows[3]["loss_scale"] == rows[2]["loss_scale"] / 2
    assert rows[5]["skipped_steps"] == 1


def test_consecutive_overflows_abort_with_a_clear_message(tmp_path, tiny_data, monkeypatch):
    from fastlm.train.trainer import TrainingAborted, train

    cfg = load_config(None, [*TINY, "train.precision=fp16", "train.max_steps=20",
                             "train.max_consecutive_skips=3", "optim.lr=1e6",
                             f"data.path={tiny_data}", f"out_dir={tmp_path / 'run'}"])
    monkeypatch.setenv("FASTLM_TEST_OVERFLOW_AT_STEP", "1")
    import fastlm.train.trainer as tr

    real = tr._loss
    monkeypatch.setattr(tr, "_loss", lambda *a: real(*a) * float("inf"))
    with pytest.raises(TrainingAborted, match="3 optimizer steps in a row were skipped"):
        train(cfg)


def test_bf16_on_the_gpu_keeps_fp32_masters_in_fused_adamw_and_follows_fp32(tmp_path, tiny_data):
    """bf16 + ZeRO-0 on CUDA: the CUDA FusedAdamW steps bf16 parameters from fp32 masters (not
    DeepSpeed's bf16 wrapper); the curve follows the fp32 run's to bf16's resolution, and
    `auto` picks bf16 on a GPU that has it."""
    import yaml

    from fastlm.train.trainer import train

    def run(name, *extra):
        cfg = load_config(None, [*TINY, "train.max_steps=6", f"data.path={tiny_data}",
                                 f"out_dir={tmp_path / name}", *extra])
        return [loss for _, loss in train(cfg).history]

    bf16 = run("auto", "train.precision=auto")
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())
    assert saved["train"]["precision"] == "bf16"
    fp32 = run("fp32", "train.precision=fp32")
    assert bf16 == pytest.approx(fp32, rel=5e-3) and bf16 != fp32
