"""Process-group setup for one process or a DeepSpeed launch, and small collective helpers."""

from __future__ import annotations

import atexit
import os
import socket
import sys
import time

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> tuple[int, int, int]:
    """(rank, local_rank, world_size). A plain `fastlm train` is a world of one: the same
    DeepSpeed engine runs, so single-process and multi-node runs share one code path."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=None, verbose=False)
        atexit.register(_shutdown)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return rank, local_rank, world


def _shutdown() -> None:
    """Destroy the process groups before interpreter exit rather than during it (torch warns
    about NCCL groups left to exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """all_reduce that returns only once the collective has let go of `t`.

    gloo finishes a collective on its worker thread, wakes the caller, and only then drops its
    own reference to the tensor. Dropping the last C++ reference to a tensor that Python has
    seen decrefs its PyObject, which takes the GIL. Right before exit that drop can land after
    interpreter finalization began: the worker is killed while taking the GIL and the process
    aborts ("terminate called without an active exception", exit -6) after a successful run.
    The tensor's Python refcount carries the C++ side's hold (torch increfs the PyObject while
    C++ references exist), so waiting, GIL released, until it is back to what it was before the
    call means gloo is done with it. Bounded: a stuck worker costs one second, not a hang."""
    base = sys.getrefcount(t)
    dist.all_reduce(t, op=op)
    deadline = time.monotonic() + 1.0
    while sys.getrefcount(t) > base and time.monotonic() < deadline:
        time.sleep(0)  # releases the GIL for the worker's decref
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over all ranks, in place."""
    return t if dist.get_world_size() == 1 else _all_reduce(t)


def mean(value: float, dev: torch.device) -> float:
    """Mean of a Python float over all ranks."""
    return means([value], dev)[0]


def means(values: list[float], dev: torch.device) -> list[float]:
    """Means of Python floats over all ranks, in one all-reduce."""
    if dist.get_world_size() == 1:
        return [float(v) for v in values]
    t = _all_reduce(torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev))
    return [float(x) / dist.get_world_size() for x in t.tolist()]


def any_true(flag: bool, dev: torch.device) -> bool:
    if dist.get_world_size() == 1:
        return bool(flag)
    t = _all_reduce(torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev),
                    op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
