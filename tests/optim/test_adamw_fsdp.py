"""FusedAdamW on PyTorch FSDP2 (``fully_shard``) parameters on 2 CPU ranks (gloo). They are
DTensors, and the kernels' custom op has no sharding rule: every step raised
NotImplementedError. Each rank now steps its own shards (AdamW is elementwise), the state is
DTensors as torch's is, and the folded clip reduces the norm over every rank's shards. See
fsdp_adamw_script.py for what runs."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed]

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_parameters_step_as_torch_adamw_and_resume_through_dcp(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "fsdp_adamw.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", str(_free_port()), str(Path(__file__).with_name(
               "fsdp_adamw_script.py")), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    # 8 clipped steps, two groups, an lr change: torch's AdamW to fp32 rounding
    assert r["diff"] <= 1e-6
    assert r["fused_norms"] == pytest.approx(r["ref_norms"], rel=1e-6)
    assert all(n > 0.05 for n in r["ref_norms"])  # the clip acted on every step
    assert r["empty"][0] == [False] * 4 and r["empty"][1][2]  # rank 1: no row of (1, 37)
    assert r["sharded_state"]
    assert r["resumed_diff"] == 0.0
