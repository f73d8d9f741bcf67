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
        "cross_entropy_rows": (lambda h, w: fused_linear_cross_entropy(
            h.reshape(15, 16), w, labels, reduction="none", chunk_size=4), (x, head)),
        "cross_entropy_rows_frozen_head": (lambda h: fused_linear_cross_entropy(
            h.reshape(15, 16), head, labels, reduction="none", chunk_size=4), (x,)),
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
    torch.library.opcheck(_rotary.op, (q, torch.randn(1, 5, 8), torch.randn(1, 5, 8), False, False, ""),
                          test_utils=tests)
    head = torch.randn(11, 16, requires_grad=True)
    torch.library.opcheck(
        _fused.op, (x, head, torch.randint(0, 11, (6,)), None, -100, 0.0, 0.0, False, 0, True, True, ""),
        test_utils=tests)
    from fastlm.ops.cross_entropy import _rows
    bias = torch.randn(11, requires_grad=True)
    for ahead in (False, True):  # the frozen head's precomputed hidden gradient
        torch.library.opcheck(
            _rows.op, (x, head, torch.randint(0, 11, (6,)), bias, -100, 0.1, 2.0, 4, ahead, ""),
            test_utils=tests)


def test_eager_path_hands_no_zeros_for_saved_outputs():
    """Outputs after the first exist for the backward only: the eager path marks them
    non-differentiable, and their gradient slots reach the backward as None, not as zero
    buffers (for the cross-entropy that would be a vocab x hidden fill per step)."""
    from fastlm.ops.cross_entropy import _fused

    seen = []
    original = _fused._backward

    def spy(ctx, *grads):
        seen.append(grads)
        return original(ctx, *grads)

    h = torch.randn(6, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    _fused._backward = spy
    try:
        loss, dh, dw, _ = _fused(h, w, torch.randint(0, 11, (6,)), None, -100, 0.0, 0.0, False,
                                 0, True, True, "")
        assert loss.requires_grad and not dh.requires_grad and not dw.requires_grad
        (loss * 3).backward()
    finally:
        _fused._backward = original
    assert len(seen) == 1 and seen[0][0] is not None and all(g is None for g in seen[0][1:])
    assert h.grad is not None and w.grad is not None


def test_cross_entropy_gradients_survive_retained_graphs():
    """The gradients are computed in the forward and saved: a retained graph run twice must
    accumulate 2x (nothing the backward hands out may alias what it saved), and a scaled
    upstream gradient must scale them."""
    torch.manual_seed(0)
    h = torch.randn(7, 16, requires_grad=True)
    w = torch.randn(11, 16, requires_grad=True)
    labels = torch.randint(0, 11, (7,))
    loss = fused_linear_cross_entropy(h, w, labels)
    loss.backward(retain_graph=True)
    g1 = (h.grad.clone(), w.grad.clone())
    loss.backward(retain_graph=True)
    torch.testing.assert_close(h.grad, 2 * g1[0], rtol=0, atol=0)
    torch.testing.assert_close(w.grad, 2 * g1[1], rtol=0, atol=0)
    h.grad = w.grad = None
    loss.backward(torch.tensor(0.5))
    torch.testing.assert_close(h.grad, 0.5 * g1[0])
    torch.testing.assert_close(w.grad, 0.5 * g1[1])
    ref = torch.nn.functional.cross_entropy(h.double() @ w.double().T, labels)
    gh, gw = torch.autograd.grad(ref, (h, w))
    torch.testing.assert_close(g1[0], gh.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1[1], gw.float(), rtol=1e-5, atol=1e-6)
