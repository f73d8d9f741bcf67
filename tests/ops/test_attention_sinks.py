"""fastlm.ops.attention with ``sinks`` (GPT-OSS's per-head logits that join every row's softmax
with no value).

The reference is ``attention_ref(..., sinks=)``: the softmax over [scores, sink] with the sink's
column dropped, in float64, differentiated by autograd (the sinks' gradient included). Output and
q/k/v/sinks gradients are judged by the rule in fastlm/testing.py (2x / 3x PyTorch's own error in
the same dtype + floor). Triton runs in its interpreter on small fp32 shapes only (its bf16
``tl.dot`` is wrong in the interpreter here, see test_attention.py).
"""

import math

import pytest
import torch

from fastlm.ops import attention, attention_varlen
from fastlm.ops.reference import attention_ref, attention_varlen_ref
from fastlm.testing import GRAD_FACTOR, assert_within

HAS_CUDA = torch.cuda.is_available()
TRITON_ON_CPU = pytest.param(
    "triton", marks=pytest.mark.skipif(HAS_CUDA, reason="CPU tensors run Triton only in its interpreter"))

# (B, Hq, Hkv, Sq, Sk, D): length 1, odd lengths, Sq != Sk (decoding), GQA, a partial block
SHAPES = [(1, 1, 1, 1, 1, 16), (2, 4, 2, 37, 37, 32), (1, 4, 1, 1, 129, 64),
          (2, 2, 1, 65, 130, 40)]
FEATURES = [dict(), dict(causal=True, padding=True), dict(causal=True, window=(9, 0), softcap=5.0)]


def _sinks(hq, dtype, device="cpu"):
    # spread over [-3, 3]: from a sink that takes almost nothing to one that takes most rows'
    # weight (a row's lse is ~log(Sk) here)
    return (torch.rand(hq, device=device) * 6 - 3).to(dtype)


def _grads(fn, inputs, dout):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def _check(backend, shape, dtype, padding=False, device="cpu", **kw):
    b, hq, hkv, sq, sk, d = shape
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=device)
    k, v = (torch.randn(b, hkv, sk, d, dtype=dtype, device=device) for _ in range(2))
    sinks = _sinks(hq, dtype, device)
    mask = None
    if padding:
        lengths = torch.randint(1, sk + 1, (b,))
        lengths[0] = 0  # a fully padded row: all its weight goes to the sink; out and grads 0
        mask = (torch.arange(sk)[None, :] < lengths[:, None]).to(device)
    dout = torch.randn_like(q)
    kw = dict(kw, key_padding_mask=mask)
    out, grads = _grads(lambda q, k, v, s: attention(q, k, v, sinks=s, backend=backend, **kw),
                        (q, k, v, sinks), dout)
    ref = lambda q, k, v, s: attention_ref(q, k, v, sinks=s, upcast=False, **kw)  # noqa: E731
    out64, grads64 = _grads(ref, [t.double() for t in (q, k, v, sinks)], dout.double())
    base, base_grads = _grads(ref, (q, k, v, sinks), dout)
    assert torch.isfinite(out).all()
    assert_within(out, out64, base, name="out")
    for name, g, g64, gb in zip(("q", "k", "v", "sinks"), grads, grads64, base_grads):
        assert torch.isfinite(g).all(), f"d{name} has NaN/inf"
        assert_within(g, g64, gb, factor=GRAD_FACTOR, name=f"d{name}")
    if padding:
        assert (out[0] == 0).all() and all((g[0] == 0).all() for g in grads[:3])


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_sinks_match_reference(backend, dtype, shape, features):
    _check(backend, shape, dtype, **features)


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f) or "plain")
def test_sinks_triton_interpreter_fp32(features):
    if HAS_CUDA:
        pytest.skip("covered by the GPU test")
    _check("triton", (2, 2, 1, 19, 23, 16), torch.float32, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("shape", SHAPES + [(2, 8, 2, 1000, 1000, 64)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_sinks_gpu(backend, dtype, shape, features):
    if backend == "cuda" and shape[-1] not in (64, 128):
        pytest.skip("the CUDA kernels are compiled for head dims 64 and 128")
    _check(backend, shape, dtype, device="cuda", **features)


def test_sinks_that_take_nothing_change_nothing():
    """A sink of -inf gets no weight: the result and q/k/v gradients are the sinkless op's,
    and its own gradient is 0."""
    q, k, v = (torch.randn(2, 4, 17, 16) for _ in range(3))
    dout = torch.randn_like(q)
    sinks = torch.full((4,), -math.inf)
    out, grads = _grads(lambda q, k, v, s: attention(q, k, v, causal=True, sinks=s),
                        (q, k, v, sinks), dout)
    plain, plain_grads = _grads(lambda q, k, v: attention(q, k, v, causal=True), (q, k, v), dout)
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    for g, p in zip(grads[:3], plain_grads):
        torch.testing.assert_close(g, p, rtol=0, atol=0)
    assert (grads[3] == 0).all()


@pytest.mark.parametrize("backend", ["cpu", "torch", TRITON_ON_CPU])
def test_sinks_varlen_and_packed_rows(backend):
    """attention_varlen(sinks=) and attention(segment_ids=, sinks=) against the float64
    reference per sequence: each sequence's rows share their heads' sinks."""
    lens = [5, 1, 37, 21]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    total = sum(lens)
    q, k, v = torch.randn(total, 4, 16), torch.randn(total, 2, 16), torch.randn(total, 2, 16)
    sinks, dout = _sinks(4, torch.float32), torch.randn(total, 4, 16)
    out, grads = _grads(lambda q, k, v, s: attention_varlen(
        q, k, v, cu, cu, max(lens), max(lens), causal=True, sinks=s, backend=backend),
        (q, k, v, sinks), dout)
    ref = lambda q, k, v, s: attention_varlen_ref(q, k, v, cu, cu, causal=True, sinks=s,  # noqa: E731
                                                  upcast=False)
    out64, grads64 = _grads(ref, [t.double() for t in (q, k, v, sinks)], dout.double())
    base, base_grads = _grads(ref, (q, k, v, sinks), dout)
    assert_within(out, out64, base, name="varlen out")
    for name, g, g64, gb in zip(("q", "k", "v", "sinks"), grads, grads64, base_grads):
        assert_within(g, g64, gb, factor=GRAD_FACTOR, name=f"varlen d{name}")

    # the same sequences packed into one batch row: (1, H, S, D) and segment ids
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lens)])[None]
    rows = lambda t: t.transpose(0, 1)[None]  # noqa: E731  (T, H, D) -> (1, H, T, D)
    packed, packed_grads = _grads(lambda q, k, v, s: attention(
        q, k, v, causal=True, segment_ids=ids, sinks=s, backend=backend),
        (rows(q), rows(k), rows(v), sinks), rows(dout))
    torch.testing.assert_close(packed, rows(out), rtol=1e-5, atol=1e-6)
    for g, gv in zip(packed_grads[:3], grads[:3]):
        torch.testing.assert_close(g, rows(gv), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_grads[3], grads[3], rtol=1e-5, atol=1e-5)


def test_sinks_opcheck_and_compile():
    """The custom op with sinks passes opcheck (schema, fake tensors, autograd registration),
    and a compiled function using it gives the eager gradients, sinks' included."""
    from fastlm.ops.attention import _attention_fwd

    q, k, v = (torch.randn(1, 2, 5, 8, requires_grad=True) for _ in range(3))
    sinks = torch.randn(2, requires_grad=True)
    torch.library.opcheck(
        _attention_fwd.op,
        (q, k, v, None, None, True, 1 / math.sqrt(8), -1, 0, 0.0, False, "cpu", sinks),
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )

    def fn(q, k, v, s):
        return attention(q, k, v, causal=True, sinks=s).sum()

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    eager = torch.autograd.grad(fn(q, k, v, sinks), (q, k, v, sinks))
    traced = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    for a, b in zip(eager, traced):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("sinks, message", [
    (torch.zeros(3), r"shape \(num_query_heads,\) = \(4,\)"),
    (torch.zeros(1, 4), r"shape \(num_query_heads,\)"),
    (torch.zeros(4, dtype=torch.int64), "float tensor"),
    ([0.0] * 4, "float tensor"),
    (torch.zeros(4, device="meta"), "sinks is on meta"),
])
def test_bad_sinks_name_the_argument(sinks, message):
    q, k, v = (torch.randn(1, 4, 5, 8) for _ in range(3))
    with pytest.raises(ValueError, match=message):
        attention(q, k, v, sinks=sinks)
    with pytest.raises(ValueError, match=message):
        attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                         torch.tensor([0, 5], dtype=torch.int32),
                         torch.tensor([0, 5], dtype=torch.int32), 5, 5, sinks=sinks)
