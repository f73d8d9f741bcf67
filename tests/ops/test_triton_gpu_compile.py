"""Every Triton kernel fastlm launches compiles for sm_80 and sm_90 (Triton's compiler and
ptxas, no GPU): the CPU tests run the kernels in Triton's interpreter, which never lowers
them. It let GELU's kernels read plain float globals, which the GPU compiler refuses (they
failed to compile for every GPU), and it cannot show shared memory or register spills (the fp32
attention tiles spilled kilobytes a thread). See benchmarks/triton_compile.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_compile")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "triton_compile.py"),
                          "--arch", "80,90", "--cases", "ci", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=900)
    return run, json.loads((out / "triton_compile.json").read_text())


def test_every_case_compiles_for_ampere_and_hopper(report):
    run, data = report
    assert run.returncode == 0, run.stdout + run.stderr
    assert [r["arch"] for r in data["reports"]] == [80, 90]
    for rep in data["reports"]:
        for case in rep["cases"]:
            assert case["ok"], (rep["arch"], case)
            # at least one configuration of each kernel fits the architecture's shared memory
            fits = {c["kernel"] for c in case["compiled"]
                    if c["shared"] <= rep["shared_memory_limit"]}
            assert fits == {c["kernel"] for c in case["compiled"]}, (rep["arch"], case["case"])
        kernels = {c["kernel"] for case in rep["cases"] for c in case["compiled"]}
        assert {"attention_fwd_kernel", "dkdv_kernel", "dq_kernel", "_act_fwd", "_glu_bwd",
                "_rms_bwd", "_ln_bwd", "_rotary", "adamw_kernel", "_ce_rows"} <= kernels


def test_fp32_attention_tiles_do_not_spill(report):
    """fp32 attention runs its dots as FMAs: the half-precision tiles spilled 1-24 KB a thread
    and took up to 105 s each to compile; the fp32 list spills a few dozen bytes at most."""
    _, data = report
    for rep in data["reports"]:
        (case,) = [c for c in rep["cases"] if c["case"].startswith("attention fp32")]
        tiles = [c for c in case["compiled"] if c["kernel"] != "delta_kernel"]
        assert len(tiles) == 9 and all(c["spill_stack"] <= 32 for c in tiles), tiles


def test_half_precision_attention_runs_on_hoppers_warpgroup_mma(report):
    """What the H100 targets rest on: on sm_90 Triton lowers the attention dots to Hopper's
    warpgroup MMA (HGMMA, what FlashAttention-3 is built on) in every configuration, the
    forward's with no warp MMA left (HMMA: mma.sync, the Ampere instruction, a fraction of
    Hopper's tensor-core rate); on sm_80 there is no wgmma to use. A change to a kernel's dots
    (operand layout, a transpose, a block shape) that lost wgmma would compile and pass every
    CPU test and run at a fraction of the speed; fp32 dots stay off the tensor cores (IEEE)."""
    _, data = report
    for rep in data["reports"]:
        for case in rep["cases"]:
            if not case["case"].startswith("attention"):
                continue
            dots = [c for c in case["compiled"] if c["kernel"] != "delta_kernel"]
            assert dots, case["case"]
            if "fp32" in case["case"]:
                assert all(c["wgmma"] == c["mma_sync"] == 0 for c in dots), case["case"]
            elif rep["arch"] == 90:
                assert all(c["wgmma"] > 0 for c in dots), (case["case"], dots)
                fwd = [c for c in dots if c["kernel"] == "attention_fwd_kernel"]
                assert fwd and all(c["mma_sync"] == 0 for c in fwd), (case["case"], fwd)
            else:
                assert all(c["wgmma"] == 0 and c["mma_sync"] > 0 for c in dots), case["case"]
