"""fastlm.ops.attention with ``segment_ids``: sequences packed into batch rows.

Each run of equal consecutive ids in a row is one sequence. The reference is independent of the
op's offset computation: float64 ``attention_ref`` called on each run's slice in a Python loop.
Outputs and q/k/v gradients are judged by the rule in fastlm/testing.py (2x / 3x PyTorch's own
error in the same dtype, per run, + floor). Triton runs in its interpreter on small fp32 shapes
(its bf16 ``tl.dot`` is wrong in the interpreter here, see test_attention.py).
"""

import math

import pytest
import torch

from fastlm.ops import attention
from fastlm.ops.reference import attention_ref
from fastlm.testing import GRAD_FACTOR, assert_within

HAS_CUDA = torch.cuda.is_available()


def _segments(lengths_per_row):
    """(B, S) ids from run lengths; ids restart per row as transformers' do (0, 1, ...)."""
    rows = [torch.cat([torch.full((n,), i) for i, n in enumerate(lens)]) for lens in lengths_per_row]
    return torch.stack(rows)


def _runs(ids_row):
    bounds = [0] + [i for i in range(1, len(ids_row)) if ids_row[i] != ids_row[i - 1]]
    return list(zip(bounds, bounds[1:] + [len(ids_row)]))


def _packed_ref(q, k, v, segment_ids, **kw):
    """Each run attends alone: the dense reference on its slice, rows reassembled."""
    out = torch.zeros_like(q)
    for b in range(q.shape[0]):
        for a, e in _runs(segment_ids[b].tolist()):
            sl = (slice(b, b + 1), slice(None), slice(a, e))
            out[sl] = attention_ref(q[sl], k[sl], v[sl], upcast=False, **kw)
    return out


def _grads(fn, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


# lengths per row: runs of 1, odd runs, a run longer than a kernel block (64/128), rows packed
# differently; a row that is one sequence (what transformers' ids are when nothing is packed)
PACKINGS = [
    [[1]],
    [[3, 1, 5], [9]],
    [[70, 1, 59], [2, 128]],
]
FEATURES = [dict(), dict(causal=True), dict(causal=True, window=(6, 0), softcap=4.0),
            dict(window=(3, 2))]


def _check(backend, packing, dtype, hq=4, hkv=2, d=32, device="cpu", **kw):
    ids = _segments(packing).to(device)
    b, s = ids.shape

    def bshd(h):  # HF's layout, seen as (B, H, S, D)
        return torch.randn(b, s, h, d, dtype=dtype, device=device).transpose(1, 2)

    q, k, v, dout = bshd(hq), bshd(hkv), bshd(hkv), bshd(hq)
    out, grads = _grads(lambda q, k, v: attention(q, k, v, segment_ids=ids, backend=backend, **kw),
                        q, k, v, dout)
    ref = lambda q, k, v: _packed_ref(q, k, v, ids, **kw)  # noqa: E731
    out64, grads64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    base, base_grads = _grads(ref, q, k, v, dout)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within(out, out64, base, name="out")
    for name, g, g64, gb in zip("qkv", grads, grads64, base_grads):
        assert_within(g, g64, gb, factor=GRAD_FACTOR, name=f"d{name}")
    return out, grads


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("packing", PACKINGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_packed_matches_per_sequence_reference(backend, dtype, packing, features):
    _check(backend, packing, dtype, **features)


@pytest.mark.skipif(HAS_CUDA, reason="CPU tensors run Triton only in its interpreter")
@pytest.mark.parametrize("features", FEATURES[1:3], ids=lambda f: "-".join(f))
def test_packed_triton_interpreter_fp32(features):
    _check("triton", [[3, 1, 5], [9]], torch.float32, d=16, **features)


@pytest.mark.gpu
@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_packed_matches_per_sequence_reference(backend, dtype, features):
    _check(backend, [[70, 1, 185], [2, 254]], dtype, d=64, device="cuda", **features)


def test_one_segment_per_row_equals_the_dense_op():
    """Ids that pack nothing (transformers' ids under torch.compile, where it cannot look at
    them) give what the dense op gives."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 37, 32) for _ in range(3))
    ids = torch.zeros(2, 37, dtype=torch.long)
    dense = attention(q, k, v, causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True, segment_ids=ids), dense,
                               atol=2e-6, rtol=0)


def test_packed_layouts_match_the_fake_implementation():
    """Out comes back in q's layout, gradients in their inputs' (what the fake promises), for
    HF's transposed layout and for contiguous (B, H, S, D) tensors; opcheck compares them."""
    from fastlm.ops.attention import _attention_fwd

    ids = _segments([[3, 6], [9]])
    for make in (lambda h: torch.randn(2, 9, h, 8).transpose(1, 2),
                 lambda h: torch.randn(2, h, 9, 8)):
        q, k, v = (make(h).requires_grad_() for h in (4, 2, 2))
        torch.library.opcheck(
            _attention_fwd.op, (q, k, v, None, ids, True, 1 / math.sqrt(8), -1, 0, 0.0, False,
                                "cpu"),
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


def test_torch_compile_fullgraph_with_segment_ids():
    """The offsets are computed inside the op, so a compiled graph has no data-dependent
    shapes and no graph break."""
    ids = _segments([[4, 5], [2, 7]])

    def block(q, k, v, ids):
        return attention(q, k, v, causal=True, segment_ids=ids).sum(dim=-1)

    q, k, v = (torch.randn(2, 2, 9, 16, requires_grad=True) for _ in range(3))
    out = torch.compile(block, backend="aot_eager", fullgraph=True)(q, k, v, ids)
    torch.testing.assert_close(out, block(q, k, v, ids))
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_packed_backward_is_deterministic():
    ids = _segments([[30, 40], [70]])
    q, k, v = (torch.randn(2, 4, 70, 32) for _ in range(3))
    dout = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, causal=True, segment_ids=ids,  # noqa: E731
                                   deterministic=True)
    (o1, g1), (o2, g2) = _grads(fn, q, k, v, dout), _grads(fn, q, k, v, dout)
    assert torch.equal(o1, o2) and all(torch.equal(a, b) for a, b in zip(g1, g2))


BAD = [
    (dict(segment_ids=torch.zeros(1, 4)), "segment_ids must hold integers"),
    (dict(segment_ids=torch.zeros(1, 5, dtype=torch.long)), r"shape \(batch, seqlen\)"),
    (dict(segment_ids=torch.zeros(1, 4, dtype=torch.long),
          key_padding_mask=torch.ones(1, 4, dtype=torch.bool)), "cannot be combined"),
    (dict(segment_ids=[0, 0, 1, 1]), "segment_ids must be a tensor"),
]


@pytest.mark.parametrize("kwargs,message", BAD)
def test_bad_segment_ids_name_the_argument(kwargs, message):
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=message):
        attention(q, q, q, **kwargs)


def test_segment_ids_need_as_many_queries_as_keys():
    q, k = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="as many queries as keys"):
        attention(q, k, k, segment_ids=torch.zeros(1, 3, dtype=torch.long))
