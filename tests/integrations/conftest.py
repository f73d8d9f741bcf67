"""Fixtures shared by the transformers integration tests."""

import pytest

from fastlm.integrations import _hf_attention


@pytest.fixture
def kernel_calls(monkeypatch):
    """The keyword arguments of each call the attention function makes to the fused op."""
    calls = []
    real = _hf_attention.attention

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(_hf_attention, "attention", spy)
    return calls
