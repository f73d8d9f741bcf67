"""fastlm.patch with PyTorch FSDP2 (``fully_shard``) on 2 CPU ranks (gloo), patched before or
after the sharding: the losses of 3 training steps equal an unsharded single process's, and
every kernel is swapped either way (after the sharding, the probes met DTensor weights and
left the norms and MLPs unfused)."""

from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]


def test_fsdp2_before_and_after_the_patch(torchrun):
    result = torchrun(Path(__file__).with_name("fsdp_script.py"))
    want = result["single"][0]
    assert want[-1] < want[0]
    for order in ("patch-then-shard", "shard-then-patch"):
        losses, swapped = result[order]
        assert losses == pytest.approx(want, rel=1e-5), order
        assert swapped == {"rope": 2, "mlp": 2, "norms": 5, "loss": 1}, order
