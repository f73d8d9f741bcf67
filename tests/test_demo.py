"""The README's main command (`make demo` = `fastlm train configs/demo.yaml`) end to end, short:
prepare builtin:pydoc, train, evaluate, checkpoint, sample, export."""

import json
import os

import pytest
from transformers import AutoModelForCausalLM

from fastlm.cli import main


@pytest.fixture
def _env():
    saved = dict(os.environ)  # the trainer sets DeepSpeed's launcher variables
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_demo_config_runs_end_to_end(tmp_path, capsys, _env):
    rc = main(["train", "configs/demo.yaml", "--set", f"data.path={tmp_path / 'data'}",
               "--set", f"out_dir={tmp_path / 'run'}", "--set", "train.max_steps=40",
               "--set", "eval.every=20", "--set", "log.progress=false",
               "--set", "sample.tokens=20", "--set", "checkpoint.every=20"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "cleaning report" in out and "val loss" in out and "--- sample ---" in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vals = [r["val_loss"] for r in rows if "val_loss" in r]
    assert len(vals) == 2 and vals[1] < vals[0] < 5.6  # learns: below log(257) = 5.55 + margin
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf")
    assert model.config.vocab_size == 257
