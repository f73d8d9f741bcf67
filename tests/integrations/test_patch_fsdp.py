"""fastlm.patch with PyTorch FSDP2 (``fully_shard``) on 2 CPU ranks (gloo), patched before or
after the sharding: the losses of 3 training steps equal an unsharded single process's, and
every kernel is swapped either way (after the sharding, the probes met DTensor weights and
left the norms and MLPs unfused)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]


REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_before_and_after_the_patch(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(free_port()), str(Path(__file__).with_name("fsdp_script.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    want = result["single"][0]
    assert want[-1] < want[0]
    for order in ("patch-then-shard", "shard-then-patch"):
        losses, swapped = result[order]
        assert losses == pytest.approx(want, rel=1e-5), order
        assert swapped == {"rope": 2, "mlp": 2, "norms": 5, "loss": 1}, order
