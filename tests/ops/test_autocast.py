"""The ops under torch.autocast (mixed precision with fp32 weights, as the HF Trainer's bf16
mode runs): inputs of mixed dtypes are cast as torch's autocast treats the op each replaces,
the result has the dtype torch's own code gives there, and its error against float64 is within
2x torch's (+ the bf16 floor). Before, every op failed inside under autocast (it recast the
kernels' own products) or refused the dtype mix."""

import pytest
import torch
import torch.nn.functional as F

from fastlm import _custom_op
from fastlm.ops import attention, fused_linear_cross_entropy, layer_norm, rms_norm, rotary, swiglu
from fastlm.testing import assert_within


@pytest.fixture(params=[True, False], ids=["eager_path", "registered_op"])
def op_path(request, monkeypatch):
    """Both ways into an op: fastlm's eager fast path and the torch.library op."""
    monkeypatch.setattr(_custom_op, "EAGER_FAST_PATH", request.param)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def run(fn, tensors, autocast=True):
    """fn's result and the gradients of its float sum w.r.t. each tensor (fresh leaves)."""
    xs = leaves(*tensors)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = fn(*xs)
    out.float().sum().backward() if out.dim() == 0 else (out.float() * 0.01).sum().backward()
    return out.detach(), [x.grad for x in xs]


def check(ours, theirs, tensors, grad_factor=3.0, dtype=None):
    """ours under autocast vs torch's code under autocast, both against theirs in float64;
    the result's dtype is torch's there (or ``dtype``)."""
    out, grads = run(ours, tensors)
    base, base_grads = run(theirs, tensors)
    ref, ref_grads = run(theirs, [t.double() for t in tensors], autocast=False)
    assert out.dtype == (dtype or base.dtype)
    assert_within(out, ref, base, floor=1.6e-2, name="out")
    for g, gb, gr, t in zip(grads, base_grads, ref_grads, tensors):
        assert g.dtype == t.dtype  # the gradient comes back in the input's dtype
        assert_within(g, gr, gb, factor=grad_factor, floor=1.6e-2, name="grad")


def test_attention_runs_in_the_autocast_dtype(op_path):
    q, k = torch.randn(2, 4, 33, 32), torch.randn(2, 2, 33, 32)
    v = torch.randn(2, 2, 33, 32).bfloat16()  # a projection autocast already ran
    check(lambda q, k, v: attention(q, k, v, causal=True),
          lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                          enable_gqa=True), [q, k, v])


def test_fused_loss_runs_the_head_in_the_autocast_dtype(op_path):
    hidden, weight = torch.randn(37, 64), torch.randn(100, 64) * 0.1
    labels = torch.randint(0, 100, (37,))
    check(lambda h, w: fused_linear_cross_entropy(h, w, labels),
          lambda h, w: F.cross_entropy(F.linear(h, w).float(), labels), [hidden, weight])


def test_norms_run_in_fp32(op_path):
    x, w, b = torch.randn(5, 7, 48).bfloat16(), torch.randn(48), torch.randn(48)

    def hf_rms(x, w):  # transformers' LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    check(lambda x, w: rms_norm(x, w, 1e-6), hf_rms, [x, w])
    # torch's CPU autocast leaves layer_norm in bf16, its CUDA autocast runs it in fp32: fastlm
    # runs norms in fp32 on both (as HF's RMSNorm with an fp32 weight returns fp32)
    check(lambda x, w, b: layer_norm(x, w, b, 1e-5),
          lambda x, w, b: F.layer_norm(x, (48,), w, b, 1e-5), [x, w, b], dtype=torch.float32)


def test_elementwise_ops_promote(op_path):
    gate, up = torch.randn(9, 40).bfloat16(), torch.randn(9, 40)
    check(swiglu, lambda g, u: F.silu(g) * u, [gate, up])
    q, k = torch.randn(1, 4, 10, 16).bfloat16(), torch.randn(1, 2, 10, 16).bfloat16()
    cos, sin = torch.randn(1, 10, 16), torch.randn(1, 10, 16)  # fp32 tables, no grad (HF's)

    def hf_rope(q, k):
        def half(x):
            return torch.cat((-x[..., 8:], x[..., :8]), dim=-1)

        c, s = cos.to(q.dtype if q.dtype == torch.float64 else cos.dtype).unsqueeze(1), \
            sin.to(q.dtype if q.dtype == torch.float64 else sin.dtype).unsqueeze(1)
        return torch.cat([(q * c + half(q) * s).flatten(), (k * c + half(k) * s).flatten()])

    check(lambda q, k: torch.cat([t.flatten() for t in rotary(q, k, cos, sin)]), hf_rope, [q, k])


def test_without_autocast_nothing_is_cast():
    x, w = torch.randn(3, 8).bfloat16(), torch.randn(8).bfloat16()
    assert rms_norm(x, w).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="must match hidden"):
        fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8).bfloat16(),
                                   torch.zeros(3, dtype=torch.long))


_SEEN = []


@_custom_op.custom_op("fastlm_test::autocast_probe")
def _probe(x: torch.Tensor) -> torch.Tensor:
    _SEEN.append(torch.is_autocast_enabled("cpu"))
    return (x @ x.T).sum(0)


_probe.register_fake(lambda x: x.new_empty(x.shape[0]))
_probe.register_autograd(lambda ctx, g: (g[:, None] + g[None, :]) @ ctx.x,
                         setup_context=lambda ctx, inputs, output: setattr(ctx, "x", inputs[0]))


def test_autocast_is_off_inside_an_op(op_path):
    """Inside an op (either path in) autocast is off: the torch reference backend's fp32
    products stay fp32 instead of being recast to bf16, as they would in the caller's region."""
    _SEEN.clear()
    x = torch.randn(4, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _probe(x)
    out.sum().backward()
    assert out.dtype == torch.float32 and _SEEN == [False]
