"""Test-wide setup: device-dependent environment, markers, fixed seeds.

Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, and DeepSpeed uses
its CPU accelerator; both must be chosen before triton/deepspeed are first imported, hence at
conftest import time.
"""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fixed_seeds():
    """Every test starts from the same RNG state, whatever ran before it."""
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def transformers_log():
    """The messages transformers logs during the test (its loggers write to a stream of their
    own, which capsys and capfd do not see)."""
    import logging

    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    log = logging.getLogger("transformers")
    log.addHandler(handler)
    yield seen
    log.removeHandler(handler)


@pytest.fixture(scope="session")
def zero_runs(tmp_path_factory):
    """One 2-rank DeepSpeed launch (CPU, gloo) of tests/optim/zero_script.py, shared by the
    optimizer and the patch suites."""
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path_factory.mktemp("zero") / "runs.json"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    script = Path(__file__).parent / "optim" / "zero_script.py"
    proc = subprocess.run(
        [launcher, "--num_gpus", "2", str(script), str(out)],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture
def torchrun(tmp_path):
    """``torchrun(script, *args)``: ``script`` on 2 CPU ranks (torch.distributed.run, gloo, a
    free port, the repo importable); asserts it succeeded and returns the JSON it wrote to the
    path given as its last argument."""
    import socket

    repo = Path(__file__).resolve().parents[1]

    def run(script: Path, *args) -> dict:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        out = tmp_path / f"{Path(script).stem}.json"
        env = dict(os.environ, OMP_NUM_THREADS="1",
                   PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", str(port), str(script), *map(str, args), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return json.loads(out.read_text())

    return run


@pytest.fixture
def emulated_cuda(monkeypatch):
    """The ``cuda`` backend of attention and FusedAdamW, run by the CUDA emulator on CPU tensors.

    The emulator builds csrc/cuda and its bindings for the host (fastlm/_cuda_emu.py); this
    points the two ops' ``cuda`` backend at that build, keeping the backends' own dtype and
    feature checks but not their device check, so ``backend="cuda"`` runs the CUDA kernels
    through the same Python and binding code a GPU run takes. Returns the emulated ops.
    """
    import fastlm.optim  # noqa: F401  (defines the adamw op)
    from fastlm import _cuda_emu
    from fastlm._dispatch import OPS, Backend, all_of, needs_dtypes
    from fastlm.ops.attention import _cuda_features

    try:
        ops = _cuda_emu.load()
    except _cuda_emu.ExtensionBuildError as err:
        pytest.skip(f"CUDA emulator unavailable: {str(err).splitlines()[0]}")
    checks = {
        "attention": all_of(needs_dtypes(torch.float16, torch.bfloat16), _cuda_features),
        "adamw": needs_dtypes(torch.float32, torch.bfloat16, torch.float16),
    }
    for name, check in checks.items():
        op = OPS[name]
        monkeypatch.setitem(op.backends, "cuda", Backend("cuda", check, lambda: ops))
        monkeypatch.setattr(op, "_auto", {})
    return ops
