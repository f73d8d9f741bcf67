"""FusedAdamW as DeepSpeed's client optimizer under ZeRO 1/2/3 and ZeRO-2 + CPU offload.

One 2-rank launch (CPU, gloo) runs every case with FusedAdamW and with torch.optim.AdamW; the
first launch on a machine also JIT-builds DeepSpeed's shm op (~90 s), hence one launch only.
"""

from pathlib import Path

import pytest

from fastlm.integrations.deepspeed import prepare_config
from fastlm.optim import FusedAdamW

HERE = Path(__file__).parent


def test_prepare_config_sets_only_what_fastlm_needs():
    opt = FusedAdamW([__import__("torch").zeros(1, requires_grad=True)])
    cfg = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}, "x": 1}
    out = prepare_config(cfg, opt)
    assert out["zero_allow_untested_optimizer"] is True
    assert out["zero_force_ds_cpu_optimizer"] is False
    assert out["x"] == 1 and "zero_allow_untested_optimizer" not in cfg  # input untouched
    # a user's own choice wins
    assert prepare_config({**cfg, "zero_allow_untested_optimizer": False}, opt)[
        "zero_allow_untested_optimizer"] is False
    assert "zero_allow_untested_optimizer" not in prepare_config({"zero_optimization": {"stage": 0}}, opt)


def test_prepare_config_lists_fused_adamw_as_supported_by_zero():
    """On DeepSpeed's list, ZeRO takes FusedAdamW as it takes torch's AdamW: without its
    "untested optimizer" warning on every run; listed once however often it is called."""
    from deepspeed.runtime.zero import utils

    opt = FusedAdamW([__import__("torch").zeros(1, requires_grad=True)])
    prepare_config({"zero_optimization": {"stage": 1}}, opt)
    assert FusedAdamW in utils.ZERO_SUPPORTED_OPTIMIZERS
    prepare_config({"zero_optimization": {"stage": 1}}, opt)
    assert utils.ZERO_SUPPORTED_OPTIMIZERS.count(FusedAdamW) == 1




@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["zero1", "zero2", "zero3", "zero2_offload"])
def test_zero_losses_match_torch_adamw(zero_runs, case):
    run = zero_runs[case]
    assert run["handed"]["type"] == "FusedAdamW"
    assert len(run["fused"]) == 8
    for a, b in zip(run["fused"], run["torch"]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (run["fused"], run["torch"])


@pytest.mark.slow
@pytest.mark.distributed
def test_zero_hands_the_optimizer_flat_partitions(zero_runs):
    half = (zero_runs["total_params"] + 1) // 2
    for case in ("zero1", "zero2", "zero2_offload"):
        # stages 1-2: one flat fp32 partition per group and rank (ZeRO pads the flat buffer to
        # an alignment multiple, a few elements), on the host when offloaded
        (numel,) = zero_runs[case]["handed"]["numels"]
        assert half <= numel <= half + 8, zero_runs[case]["handed"]
        assert zero_runs[case]["handed"]["devices"] == ["cpu"]
    # stage 3: the optimizer's state was built from ZeRO-3's partitioned fp32 sub-groups
    assert sum(zero_runs["zero3"]["handed"]["state_numels"]) <= half + 64
    assert zero_runs["zero3"]["handed"]["state_numels"]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["zero0_clip", "zero2_clip", "zero1_clip_bf16",
                                  "zero2_clip_offload"])
def test_unscale_and_clip_folded_into_the_step(zero_runs, case):
    """fuse_unscale_and_clip: DeepSpeed's separate multiply over the gradient partition is
    gone, and the run is the one DeepSpeed's own pass gives (same factor, applied inside the
    optimizer's read of the gradient)."""
    run = zero_runs[case]
    assert run["handed"]["fused_pass"] is True
    # vs torch AdamW in bf16: the bf16 model weights round differently (fused masters)
    tol_torch = 2e-2 if "bf16" in case else 1e-6
    for a, b, c in zip(run["fused"], run["unfused"], run["torch"]):
        assert abs(a - b) <= 1e-6 * max(1.0, abs(b)), (run["fused"], run["unfused"])
        assert abs(a - c) <= tol_torch * max(1.0, abs(c)), (run["fused"], run["torch"])
    # clipping really acted (otherwise the factor would be 1 and the test vacuous)
    assert max(abs(a - b) for a, b in zip(run["fused"], run["noclip"])) > 1e-4
    if case == "zero0_clip":  # without ZeRO the folded clip also reports the norm it clipped
        assert run["handed"]["grad_norm"] > 0.05
