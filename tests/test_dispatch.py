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
