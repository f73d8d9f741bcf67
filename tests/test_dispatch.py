"""The dispatch rule: explicit backend -> it or an error; auto -> fallback with one warning."""

import logging

import pytest
import torch

from fastlm._dispatch import BackendUnavailable, Call, Op


def _op():
    op = Op("demo")
    op.register("cuda", lambda c: None if c.device == "cuda" else "needs cuda", lambda: "CUDA")
    op.register("cpu", lambda c: "extension failed to build" if c.dtype == torch.float16 else None,
                lambda: "CPU")
    op.register("torch", lambda c: None, lambda: "TORCH")
    return op


def test_auto_picks_first_available_in_device_order():
    op = _op()
    assert op.select(Call("cpu", torch.float32)).name == "cpu"
    assert op.select(Call("cuda", torch.float32)).name == "cuda"


def test_explicit_backend_that_cannot_run_raises_with_reason():
    op = _op()
    with pytest.raises(BackendUnavailable, match="needs cuda"):
        op.select(Call("cpu", torch.float32), backend="cuda")
    with pytest.raises(BackendUnavailable, match="requested by the backend= argument"):
        op.select(Call("cpu", torch.float16), backend="cpu")


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cuuda'"):
        _op().select(Call("cpu", torch.float32), backend="cuuda")


def test_auto_falls_back_with_one_warning(caplog):
    op = _op()
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        for _ in range(3):
            assert op.select(Call("cpu", torch.float16)).name == "torch"
    warnings = [r for r in caplog.records if "falls back" in r.getMessage()]
    assert len(warnings) == 1
    assert "'cpu' to 'torch'" in warnings[0].getMessage()
    assert "extension failed to build" in warnings[0].getMessage()


def test_env_override_per_op_beats_global(monkeypatch):
    op = _op()
    monkeypatch.setenv("FASTLM_BACKEND", "cpu")
    monkeypatch.setenv("FASTLM_BACKEND_DEMO", "torch")
    assert op.select(Call("cpu", torch.float32)).name == "torch"
    monkeypatch.delenv("FASTLM_BACKEND_DEMO")
    assert op.select(Call("cpu", torch.float32)).name == "cpu"
    # an env request is explicit too: it raises rather than silently running something else
    monkeypatch.setenv("FASTLM_BACKEND", "cuda")
    with pytest.raises(BackendUnavailable, match=r"\$FASTLM_BACKEND"):
        op.select(Call("cpu", torch.float32))


def test_argument_beats_env(monkeypatch):
    monkeypatch.setenv("FASTLM_BACKEND_DEMO", "torch")
    assert _op().select(Call("cpu", torch.float32), backend="cpu").name == "cpu"


def test_broken_check_is_a_reason_not_a_crash():
    op = Op("demo2")
    op.register("cpu", lambda c: 1 / 0, lambda: "CPU")
    op.register("torch", lambda c: None, lambda: "TORCH")
    assert op.select(Call("cpu", torch.float32)).name == "torch"
    rows = dict(op.describe(Call("cpu", torch.float32)))
    assert "ZeroDivisionError" in rows["cpu"] and rows["torch"] == "selected"


def test_launchers_keeps_auto_choice_but_follows_env_and_argument(monkeypatch):
    """launchers() keeps the launcher object of an auto selection (impl() is not called
    again), yet an environment variable set later, or a backend= argument, still decides."""
    calls = []
    op = _op()
    op.register("cpu", lambda c: None, lambda: calls.append("cpu") or "CPU")
    cpu = Call("cpu", torch.float32, {"hidden": 8})
    assert [op.launchers(cpu) for _ in range(3)] == ["CPU"] * 3
    assert calls == ["cpu"]  # looked up once
    monkeypatch.setenv("FASTLM_BACKEND_DEMO", "torch")
    assert op.launchers(cpu) == "TORCH"
    monkeypatch.delenv("FASTLM_BACKEND_DEMO")
    assert op.launchers(cpu) == "CPU"
    assert op.launchers(cpu, "torch") == "TORCH"
    assert op.launchers(Call("cpu", torch.float32, {"hidden": 16})) == "CPU"  # another key
    op.register("cpu", lambda c: "gone", lambda: "CPU")  # a new registration forgets choices
    assert op.launchers(cpu) == "TORCH"


def test_getenv_matches_os_environ(monkeypatch):
    import os

    from fastlm._dispatch import getenv

    monkeypatch.setenv("FASTLM_TEST_GETENV", "välue")
    assert getenv("FASTLM_TEST_GETENV") == os.environ["FASTLM_TEST_GETENV"] == "välue"
    assert getenv("FASTLM_TEST_GETENV", os.fsencode("FASTLM_TEST_GETENV")) == "välue"
    monkeypatch.delenv("FASTLM_TEST_GETENV")
    assert getenv("FASTLM_TEST_GETENV") is None
    # os.environ replaced by a copy (datasets' map(num_proc=...) does this): the copy counts
    import copy

    monkeypatch.setattr(os, "environ", copy.deepcopy(os.environ))
    os.environ["FASTLM_TEST_GETENV"] = "copy"
    assert getenv("FASTLM_TEST_GETENV") == "copy"
    del os.environ["FASTLM_TEST_GETENV"]
    monkeypatch.setattr(os, "environ", {"FASTLM_TEST_GETENV": "plain dict"})
    assert getenv("FASTLM_TEST_GETENV") == "plain dict"


class _OnGpu(torch.Tensor):
    """A CPU tensor that says it lives on a given GPU (this machine has none)."""

    index = 1

    @property
    def device(self):
        return torch.device("cuda", self.index)


def test_triton_launchers_run_on_their_tensors_gpu(monkeypatch):
    """Triton launches on the current device: a layer on cuda:1 with cuda:0 current raised
    "Pointer argument cannot be accessed from Triton" (a model spread over GPUs). Each launcher
    runs with its first CUDA tensor's device current, switching only when it differs; a
    launcher replaced after the first call is the one that runs."""
    import contextlib
    import sys
    import types

    from fastlm._dispatch import triton_launchers

    current, entered = [0], []

    @contextlib.contextmanager
    def device(dev):
        entered.append(dev.index)
        before, current[0] = current[0], dev.index
        try:
            yield
        finally:
            current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    fake = types.ModuleType("fake_launchers")
    fake.norm = lambda x, eps: (current[0], eps)
    fake.step = lambda params, lr: current[0]
    fake.BLOCK = 64
    monkeypatch.setitem(sys.modules, "fake_launchers", fake)
    mod = triton_launchers("fake_launchers")()
    on1 = torch.zeros(3).as_subclass(_OnGpu)
    assert mod.norm(on1, eps=1e-5) == (1, 1e-5) and entered == [1] and current == [0]
    assert mod.step([on1], lr=0.1) == 1 and entered == [1, 1]  # tensor lists (AdamW)
    assert mod.norm(torch.zeros(3), 1e-5) == (0, 1e-5)  # CPU tensors (interpreter): no switch
    current[0] = 1
    assert mod.norm(on1, 1e-5) == (1, 1e-5) and entered == [1, 1]  # already current
    fake.norm = lambda x, eps: "replaced"
    assert mod.norm(on1, 1e-5) == "replaced"
    assert mod.BLOCK == 64
