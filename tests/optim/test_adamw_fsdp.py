"""FusedAdamW on PyTorch FSDP2 (``fully_shard``) parameters on 2 CPU ranks (gloo). They are
DTensors, and the kernels' custom op has no sharding rule: every step raised
NotImplementedError. Each rank now steps its own shards (AdamW is elementwise), the state is
DTensors as torch's is, and the folded clip reduces the norm over every rank's shards. See
fsdp_adamw_script.py for what runs."""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]


def test_fsdp2_parameters_step_as_torch_adamw_and_resume_through_dcp(torchrun):
    r = torchrun(Path(__file__).with_name("fsdp_adamw_script.py"))
    # 8 clipped steps, two groups, an lr change: torch's AdamW to fp32 rounding
    assert r["diff"] <= 1e-6
    assert r["fused_norms"] == pytest.approx(r["ref_norms"], rel=1e-6)
    assert all(n > 0.05 for n in r["ref_norms"])  # the clip acted on every step
    assert r["empty"][0] == [False] * 4 and r["empty"][1][2]  # rank 1: no row of (1, 37)
    assert r["sharded_state"]
    assert r["resumed_diff"] == 0.0
