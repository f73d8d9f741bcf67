"""The fastlm command line: subcommands, env report, env --build."""

import re
import subprocess
import sys

import pytest

from fastlm import cli


def _fastlm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "fastlm.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in ("env", "prepare", "train", "generate", "export", "bench"):
        assert name in out


@pytest.mark.parametrize("name", ["env", "prepare", "train", "generate", "export", "bench"])
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage: fastlm " + name in capsys.readouterr().out


def test_no_subcommand_prints_help_and_fails(capsys):
    assert cli.main([]) == 2


def test_user_errors_exit_2_without_traceback(capsys):
    assert cli.main(["bench"]) == 2
    err = capsys.readouterr().err
    assert "name a benchmark" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["bench", "attention", "--seqlens", "256,abc"], "--seqlens: 'abc' is not a positive int"),
    (["bench", "attention", "--dtypes", "bf16,fp8"], "--dtypes: 'fp8' is not one of fp32"),
    (["bench", "fused", "--modes", "fw"], "--modes: 'fw' is not one of fwd, fwd_bwd"),
    (["bench", "adamw", "--sizes", "0"], "--sizes: '0' is not a positive float"),
    (["bench", "model", "--seqlens", "-5"], "--seqlens: '-5' is not a positive int"),
    # generate and eval took these and went on: a greedy "sample", a top-p of 1.5, nothing
    # generated, a block size of 0 meaning the default
    (["generate", "m", "--temperature", "-1"], "--temperature: '-1' is not a number >= 0"),
    (["generate", "m", "--top-p", "1.5"], "--top-p: '1.5' is not a number in (0, 1]"),
    (["generate", "m", "--max-new-tokens", "-3"], "--max-new-tokens: '-3' is not an integer >= 1"),
    (["generate", "m", "--num-samples", "0"], "--num-samples: '0' is not an integer >= 1"),
    (["generate", "m", "--prompts", "p", "--batch-size", "0"], "--batch-size: '0' is not an"),
    (["eval", "m", "d", "--block-size", "0"], "--block-size: '0' is not an integer >= 1"),
    (["eval", "m", "d", "--batch-size", "0"], "--batch-size: '0' is not an integer >= 1"),
    (["eval", "m", "d", "--max-tokens", "1"], "--max-tokens: '1' is not an integer >= 2"),
    # prepare took a near-dedup threshold of 2 (no near copy removed) and --num-proc 0
    (["prepare", "x", "--out", "o", "--near-dedup-threshold", "2"],
     "--near-dedup-threshold: '2' is not a number in (0, 1]"),
    (["prepare", "x", "--out", "o", "--num-proc", "0"], "--num-proc: '0' is not an integer"),
    (["prepare", "x", "--out", "o", "--min-chars", "-1"], "--min-chars: '-1' is not an"),
    (["tokenizer", "x", "--out", "o", "--sample-mb", "-1"], "--sample-mb: '-1' is not a number > 0"),
    # the benchmarks' sizes and counts: a head dim of 0 ran and reported ZeroDivisionError rows
    (["bench", "attention", "--head-dim", "0"], "--head-dim: '0' is not an integer >= 1"),
    (["bench", "attention", "--batch", "-2"], "--batch: '-2' is not an integer >= 1"),
    (["bench", "adamw", "--tensors", "0"], "--tensors: '0' is not an integer >= 1"),
    (["bench", "fused", "--hidden", "0"], "--hidden: '0' is not an integer >= 1"),
    (["bench", "model", "--min-seconds", "-1"], "--min-seconds: '-1' is not a number >= 0"),
    (["bench", "train", "--micro-batch", "0"], "--micro-batch: '0' is not an integer >= 1"),
    (["bench", "adamw-moments", "--lr", "0"], "--lr: '0' is not a number > 0"),
    (["bench", "data", "--mb", "0"], "--mb: '0' is not a number > 0"),
])
def test_bad_benchmark_lists_are_usage_errors(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["bench", "attention", "--impls", "sdpa_math,sdpa_mth"],
     "--impls 'sdpa_math,sdpa_mth': sdpa_mth is not an implementation on cpu; choose from "
     "fastlm_cpu, "),
    (["bench", "adamw", "--impls", "fastlm_cuda"],
     "fastlm_cuda is not an implementation on cpu; choose from fastlm_cpu, fastlm_cpu_bf16m, "),
])
def test_unknown_benchmark_implementations_are_named(argv, says, capsys):
    """A typo, or a GPU kernel asked for on the CPU, was dropped: an empty report, rc 0."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    # a CUDA device on a machine without one was an AssertionError traceback from torch
    (["bench", "attention", "--device", "cuda"], "--device cuda: no CUDA GPU is visible here"),
    (["bench", "adamw", "--device", "cuda:1"], "--device cuda:1: no CUDA GPU is visible here"),
    (["bench", "fused", "--device", "gpu"], "--device 'gpu' is not a device name: use cpu, cuda"),
    (["bench", "model", "--device", "meta"], "--device 'meta': fastlm's benchmarks run on cpu"),
    # checked before the workers start (its message was buried in a worker's traceback)
    (["bench", "train", "--preset", "nosuch"], "--preset: model.preset 'nosuch' not found; known"),
])
def test_benchmark_devices_and_presets_are_checked_first(argv, says, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_env_report_without_building(capsys):
    from fastlm.env import report

    assert report(build=False) == 0
    out = capsys.readouterr().out
    for key in ("torch", "triton", "deepspeed", "transformers", "c++ compiler", "nvcc",
                "cpu features", "attention"):
        assert key in out
    # every op has a selected backend for CPU tensors, and CUDA's absence is explained
    assert "selected" in out
    assert "cuda" in out and ("CPU-only build" in out or "sm_" in out)


@pytest.mark.slow
def test_env_build_builds_cpu_and_explains_cuda():
    proc = _fastlm("env", "--build")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "extension builds (--build)" in out
    build_lines = out.split("extension builds (--build)")[1].split("backends per op")[0]
    assert "cpu" in build_lines and "OK in" in build_lines
    assert re.search(r"^\s+text\s+OK in .*libfastlm_text\.so$", build_lines, re.MULTILINE)
    import torch

    if torch.version.cuda is None:
        assert "FAILED" in build_lines and "CPU-only build" in build_lines
