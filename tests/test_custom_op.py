"""fastlm._custom_op: the eager fast path and the registered torch.library op give identical
outputs and gradients for every fused op (they share the body, setup_context and backward);
the registered ops pass torch.library.opcheck (schema, fake tensors, autograd registration)."""

import pytest
import torch

from fastlm import _custom_op
from fastlm.ops import (
    attention,
    fused_linear_cross_entropy,
    gelu,
    layer_norm,
    rms_norm,
    rotary,
    swiglu,
)


def _cases():
    x = torch.randn(3, 5, 16)
    w, b = torch.randn(16), torch.randn(16)
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    head, labels = torch.randn(11, 16), torch.randint(0, 11, (15,))
    labels[3] = -100
    return {
        "rms_norm": (lambda x, w: rms_norm(x, w, 1e-6), (x, w)),
        "layer_norm": (lambda x, w, b: layer_norm(x, w, b), (x, w, b)),
        "gelu": (lambda x: gelu(x, "tanh"), (x,)),
        "swiglu": (swiglu, (x, torch.randn(3, 5, 16))),
        "rotary": (lambda q, k: rotary(q, k, cos, sin), (q, k)),
        "attention": (lambda q, k, v: attention(q, k, v, causal=True), (q, k, torch.randn_like(k))),
        "cross_entropy": (lambda h, w: fused_linear_cross_entropy(h.reshape(15, 16), w, labels),
                          (x, head)),
    }


def _run(fn, inputs):
    leaves = [t.clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum() for o in outs)
    loss.backward()
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.parametrize("name", sorted(_cases()))
def test_eager_path_equals_registered_op(name, monkeypatch):
    fn, inputs = _cases()[name]
    fast = _run(fn, inputs)
    monkeypatch.setattr(_custom_op, "EAGER_FAST_PATH", False)
    registered = _run(fn, inputs)
    for a, b in zip(fast, registered):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_opcheck_of_the_registered_ops():
    from fastlm.ops.activations import _glu_fwd
    from fastlm.ops.cross_entropy import _fused
    from fastlm.ops.norms import _rms_norm_fwd
    from fastlm.ops.rotary import _rotary

    x = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(16, requires_grad=True)
    tests = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(_rms_norm_fwd.op, (x, w, 1e-6, 0.0, ""), test_utils=tests)
    torch.library.opcheck(_glu_fwd.op, (x, torch.randn(6, 16), 0, ""), test_utils=tests)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    torch.library.opcheck(_rotary.op, (q, torch.randn(1, 5, 8), torch.randn(1, 5, 8), False, ""),
                          test_utils=tests)
    head = torch.randn(11, 16, requires_grad=True)
    torch.library.opcheck(
        _fused.op, (x, head, torch.randint(0, 11, (6,)), None, -100, 0.0, 0.0, False, 0, True, ""),
        test_utils=tests)
