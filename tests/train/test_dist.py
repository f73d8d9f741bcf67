"""fastlm.train.dist's reductions return only after the collective has let go of its tensor.

gloo drops its reference on a worker thread after waking the caller; if that drop lands after
interpreter finalization began, the process aborts at exit (seen as an intermittent exit -6 of
2-rank runs). A stand-in all_reduce that keeps the tensor on another thread for a while checks
the wait, with no process group needed."""

import threading
import time

import pytest
import torch

from fastlm.train import dist as fdist


class HoldingAllReduce:
    """Does the reduction at once (x world), then holds the tensor for `hold_s` on a thread."""

    def __init__(self, hold_s: float):
        self.hold_s, self.released = hold_s, threading.Event()

    def __call__(self, t, op=None):
        if op is None or op == torch.distributed.ReduceOp.SUM:
            t.mul_(2)

        def hold(ref=t):
            time.sleep(self.hold_s)
            del ref
            self.released.set()

        threading.Thread(target=hold, daemon=True).start()


@pytest.fixture
def two_ranks(monkeypatch):
    monkeypatch.setattr(fdist.dist, "get_world_size", lambda *a, **k: 2)


@pytest.mark.parametrize("call", ["mean", "any_true"])
def test_returns_after_the_collective_released_its_tensor(monkeypatch, two_ranks, call):
    fake = HoldingAllReduce(hold_s=0.05)
    monkeypatch.setattr(fdist.dist, "all_reduce", fake)
    if call == "mean":
        assert fdist.mean(3.0, torch.device("cpu")) == 3.0  # (3 + 3) / 2
    else:
        assert fdist.any_true(True, torch.device("cpu")) is True
    assert fake.released.is_set(), "returned while the collective still held the tensor"


def test_a_collective_that_never_lets_go_costs_a_second_not_a_hang(monkeypatch, two_ranks):
    fake = HoldingAllReduce(hold_s=30.0)
    monkeypatch.setattr(fdist.dist, "all_reduce", fake)
    start = time.monotonic()
    assert fdist.mean(1.0, torch.device("cpu")) == 1.0
    assert 0.9 < time.monotonic() - start < 5.0
    assert not fake.released.is_set()
