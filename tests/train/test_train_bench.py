"""``fastlm bench train``: the trainer side by side with the HF Trainer, and the nanoGPT recipe
side by side (against a stand-in for nanoGPT's train.py that prints its log format: nanoGPT
itself is never part of the project)."""

import json
from pathlib import Path

import pytest

from fastlm import cli
from fastlm.train import recipe_bench

pytestmark = pytest.mark.slow


def test_bench_train_side_by_side_with_hf_trainer(tmp_path):
    argv = ["bench", "train", "--preset", "tiny-gpt2", "--vocab-size", "300", "--block-size",
            "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "train_cpu.json").read_text())["rows"]
    assert [r["impl"] for r in rows] == ["fastlm", "hf_trainer"]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in rows)
    hf = rows[1]["tokens_per_s"]
    assert rows[0]["vs_hf_trainer"] == pytest.approx(rows[0]["tokens_per_s"] / hf)
    assert (tmp_path / "train_cpu.png").exists()
    assert cli.main(["bench", "train", "--impls", "fastlm,keras"]) == 2


def test_bench_train_lora_adapts_the_same_layers_in_both(tmp_path, capsys):
    """--lora: fastlm's model.lora and PEFT's get_peft_model under the Trainer train the same
    number of adapter weights (every linear layer but the head), far fewer than the model's."""
    argv = ["bench", "train", "--preset", "tiny-llama", "--vocab-size", "300", "--block-size",
            "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1", "--lora", "4",
            "--out", str(tmp_path), "--name", "lora"]
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "lora.json").read_text())["rows"]
    assert [(r["impl"], r["lora"]) for r in rows] == [("fastlm", 4), ("hf_trainer", 4)]
    assert rows[0]["trained_params"] == rows[1]["trained_params"] > 0
    assert all(r["tokens_per_s"] > 0 for r in rows)
    plain = json.loads((tmp_path / "lora.json").read_text())  # the same model without LoRA
    assert cli.main(argv[:-6] + ["--impls", "fastlm", "--out", str(tmp_path), "--name",
                                 "full"]) == 0
    full = json.loads((tmp_path / "full.json").read_text())["rows"][0]
    assert plain["rows"][0]["trained_params"] < full["trained_params"] / 5
    assert cli.main(["bench", "train", "--lora", "-1"]) == 2
    assert "--lora must be a rank >= 1" in capsys.readouterr().err


FAKE_NANOGPT = '''
import sys, time
# prints nanoGPT's evaluation lines: val loss 4.0 at step 0, then 0.5 lower every 250 steps
for step in range(0, 2001, 250):
    print(f"step {step}: train loss 1.0000, val loss {4.0 - step / 500:.4f}", flush=True)
    time.sleep(0.05)
'''


def test_recipe_side_by_side_times_both_runs_to_the_target(tmp_path):
    text = tmp_path / "shakespeare.txt"
    lines = [f"{'ABCDEFGH'[i % 8]}{i}: a line of the play, number {i}." for i in range(400)]
    text.write_text("\n\n".join(lines))
    nano = tmp_path / "nanoGPT"
    (nano / "data" / "shakespeare_char").mkdir(parents=True)
    (nano / "data" / "shakespeare_char" / "train.bin").write_bytes(b"\0\0")
    (nano / "train.py").write_text(FAKE_NANOGPT)
    out = tmp_path / "results"
    argv = ["bench", "train", "--vs-nanogpt", str(nano), "--text", str(text), "--work-dir",
            str(tmp_path / "work"), "--target-loss", "3.2", "--out", str(out),
            "--fastlm-set", "train.max_steps=20", "--fastlm-set", "eval.every=10",
            "--fastlm-set", "eval.batches=2", "--fastlm-set", "model.overrides.n_layer=1",
            # bf16 whatever this CPU has (the config's auto would pick per machine): then the
            # recipe runs again in fp32 beside it
            "--fastlm-set", "train.precision=bf16"]
    assert cli.main(argv) == 0
    rows = {r["impl"]: r for r in json.loads((out / "train_shakespeare_cpu.json")
                                              .read_text())["rows"]}
    nano_row = rows["nanogpt"]
    assert nano_row["step_at_target"] == 500 and nano_row["final_val_loss"] == 0.0
    fl = rows["fastlm"]
    assert fl["wall_s"] > 0 and fl["final_val_loss"] > 0
    assert [(r["impl"], r["precision"]) for r in rows.values()] == [
        ("nanogpt", "fp32"), ("fastlm", "bf16"), ("fastlm-fp32", "fp32")]
    assert rows["fastlm-fp32"]["final_val_loss"] != fl["final_val_loss"]
    curves = json.loads((out / "train_shakespeare_cpu_curves.json").read_text())
    if fl["s_to_target"] is not None:  # the ratio of the unrounded times since launch
        ratio = recipe_bench.time_to(curves["fastlm"], 3.2) / recipe_bench.time_to(
            curves["nanogpt"], 3.2)
        assert fl["vs_nanogpt"] == pytest.approx(ratio)
    assert [s for _, s, _ in curves["fastlm"]] == [s for _, s, _ in curves["fastlm-fp32"]] == [10, 20]
    assert (out / "train_shakespeare_cpu.png").exists()
    # one untimed step ran first (one-time builds stay out of the timed runs)
    assert (tmp_path / "work" / "warmup-run" / "metrics.jsonl").exists()
    meta = json.loads((tmp_path / "work" / "shakespeare_char" / "meta.json").read_text())
    assert meta["config"]["tokenizer"] == "char"  # nanoGPT's character vocabulary
    assert meta["vocab_size"] == len(set("".join(lines))) + 2  # paragraphs are the documents


def test_recipe_without_out_keeps_its_curves_and_plot_in_the_work_dir():
    """(a run without --out once overwrote the committed curves in benchmarks/results)"""
    parser = cli.build_parser()[0]
    args = parser.parse_args(["bench", "train", "--vs-nanogpt", "n", "--work-dir", "/tmp/w"])
    assert recipe_bench.artifact_dir(args) == Path("/tmp/w")
    args = parser.parse_args(["bench", "train", "--vs-nanogpt", "n", "--out", "r"])
    assert recipe_bench.artifact_dir(args) == Path("r")


def test_recipe_needs_a_prepared_nanogpt_checkout(tmp_path, capsys):
    assert cli.main(["bench", "train", "--vs-nanogpt", str(tmp_path)]) == 2
    assert "run its prepare.py first" in capsys.readouterr().err


def test_time_to_target_is_the_first_evaluation_at_or_below_it():
    evals = [(1.0, 0, 4.0), (2.0, 250, 2.0), (3.0, 500, 1.5), (4.0, 750, 1.9)]
    assert recipe_bench.time_to(evals, 2.0) == 2.0
    assert recipe_bench.time_to(evals, 1.0) is None
