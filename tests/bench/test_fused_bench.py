"""``fastlm bench fused``: every op and mode timed beside PyTorch, written with its command and
plot; unknown ops or dtypes are refused by name."""

import json

import pytest

from fastlm import cli


def test_fused_bench_times_each_op_beside_torch(tmp_path):
    argv = ["bench", "fused", "--device", "cpu", "--dtypes", "fp32", "--tokens", "7",
            "--hidden", "24", "--repeat", "3", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    report = json.loads((tmp_path / "fused_cpu.json").read_text())
    rows = report["rows"]
    ops = ["rms_norm", "layer_norm", "gelu_tanh", "swiglu"]
    assert [(r["op"], r["mode"], r["impl"]) for r in rows] == [
        (op, mode, impl) for op in ops for mode in ("fwd", "fwd_bwd") for impl in ("fastlm", "torch")]
    assert all(r["ms"] > 0 and r["tokens"] == 7 and r["hidden"] == 24 for r in rows)
    assert all(r["vs_torch"] > 0 for r in rows if r["impl"] == "fastlm")
    assert "fastlm bench fused" in report["command"]
    assert (tmp_path / "fused_cpu.png").stat().st_size > 0
    assert "| op" in (tmp_path / "fused_cpu.md").read_text()


def test_fused_bench_refuses_unknown_ops_and_dtypes(capsys):
    assert cli.main(["bench", "fused", "--ops", "rms_norm,softmax"]) == 2
    assert "--ops: unknown softmax" in capsys.readouterr().err
    assert cli.main(["bench", "fused", "--dtypes", "fp8"]) == 2
    assert "--dtypes: unknown fp8" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", "fused", "--ops", "linear_cross_entropy", "--vocab", "0"])
    assert exit_info.value.code == 2
    assert "--vocab: '0' is not an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("op", ["linear_cross_entropy", "linear_cross_entropy_rows"])
@pytest.mark.parametrize("frozen", [False, True])
def test_fused_bench_times_the_fused_loss_beside_the_unfused_head(tmp_path, op, frozen):
    argv = ["bench", "fused", "--device", "cpu", "--dtypes", "fp32,bf16", "--tokens", "7",
            "--hidden", "24", "--vocab", "50", "--ops", op, "--repeat", "3",
            "--out", str(tmp_path), "--name", "loss"] + (["--frozen-head"] if frozen else [])
    assert cli.main(argv) == 0
    rows = json.loads((tmp_path / "loss.json").read_text())["rows"]
    assert [(r["dtype"], r["mode"], r["impl"]) for r in rows] == [
        (d, m, i) for d in ("fp32", "bf16") for m in ("fwd", "fwd_bwd") for i in ("fastlm", "torch")]
    assert all(r["peak_gb"] is not None and r["peak_gb"] >= 0 for r in rows)  # Linux CPU
    assert all(r["op"] == op and r["vocab"] == 50 and r["frozen_head"] == frozen and r["ms"] > 0
               for r in rows)
    assert all(r["vs_torch"] > 0 for r in rows if r["impl"] == "fastlm")
