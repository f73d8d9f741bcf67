"""Fused linear + cross-entropy against float64, with ignore_index, smoothing, soft-capping,
chunk boundaries that do not divide the rows, and gradients in hidden, weight and bias."""

import pytest
import torch

from fastlm.ops.cross_entropy import fused_linear_cross_entropy
from fastlm.ops.reference import linear_cross_entropy_ref
from fastlm.testing import GRAD_FACTOR, assert_within

# Triton's row kernel runs CPU tensors in its interpreter only (TRITON_INTERPRET=1, set by the
# test conftest); on a machine with a GPU the GPU tests cover it
BACKENDS = ["cpu", "torch", pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU tensors run Triton only in its interpreter"))]


def _inputs(n, h, v, dtype, bias):
    hidden = torch.randn(n, h).to(dtype)
    weight = (torch.randn(v, h) / h**0.5).to(dtype)
    b = torch.randn(v).to(dtype) if bias else None
    labels = torch.randint(0, v, (n,))
    labels[::3] = -100  # ignored rows
    return hidden, weight, b, labels


def _run(fn, tensors):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return loss.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
# (48, 32, 211, None): one chunk, where bf16 weight gradients take the unfused head's GEMM
@pytest.mark.parametrize("n, h, v, chunk", [(1, 8, 5, None), (48, 32, 211, None), (37, 16, 101, 8),
                                            (64, 33, 257, 7)])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1), dict(softcap=3.0),
                                  dict(reduction="sum")], ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_matches_float64(backend, dtype, n, h, v, chunk, opts, bias):
    hidden, weight, b, labels = _inputs(n, h, v, dtype, bias)
    if n == 1:
        labels[0] = 3

    def fused(hh, ww, bb=None):
        return fused_linear_cross_entropy(hh, ww, labels, bb, chunk_size=chunk, backend=backend,
                                          **opts)

    def ref(upcast):
        return lambda hh, ww, bb=None: linear_cross_entropy_ref(hh, ww, labels, bias=bb,
                                                                upcast=upcast, **opts)

    tensors = [hidden, weight] + ([b] if bias else [])
    loss, grads = _run(fused, tensors)
    base, base_grads = _run(ref(False), tensors)
    ref64, grads64 = _run(ref(True), [t.double() for t in tensors])
    assert loss.dtype == torch.float32 and loss.shape == ()
    # the loss is one number of size ~|ref|: the fp32 floor is relative to it (sum reduction)
    assert_within(loss, ref64, base, factor=2, floor=2e-7 * max(1.0, abs(ref64.item())))
    for g, g64, gb in zip(grads, grads64, base_grads):
        assert g.dtype == dtype
        assert_within(g, g64, gb, factor=GRAD_FACTOR)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, h, v, chunk", [(1, 8, 5, None), (48, 32, 211, None), (37, 16, 101, 8),
                                            (64, 33, 257, 7)])
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1), dict(softcap=3.0)], ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("frozen", [False, True], ids=["head", "frozen_head"])
def test_per_row_losses_match_float64(backend, dtype, n, h, v, chunk, opts, bias, frozen):
    """reduction="none": each row's loss (0 where ignored), and gradients under a different
    incoming gradient per row (the backward recomputes the logits chunk by chunk; with the
    head frozen the forward computes the hidden states' gradient, scaled per row after)."""
    hidden, weight, b, labels = _inputs(n, h, v, dtype, bias)
    labels = labels.view(-1, 1) if n == 1 else labels.view(n // 2 if n % 2 == 0 else n, -1)
    seed = torch.randn(labels.shape, dtype=torch.float64)

    def weighted(rows):
        return (rows * seed.to(rows.dtype)).sum()

    def fused(hh, ww, bb=None):
        rows = fused_linear_cross_entropy(hh, ww, labels, bb, chunk_size=chunk, backend=backend,
                                          reduction="none", **opts)
        assert rows.shape == labels.shape and rows.dtype == torch.float32
        fused.rows = rows.detach()
        return weighted(rows)

    def ref(upcast):
        def run(hh, ww, bb=None):
            rows = linear_cross_entropy_ref(hh, ww, labels.flatten(), bias=bb, upcast=upcast,
                                            reduction="none", **opts).view(labels.shape)
            run.rows = rows.detach()
            return weighted(rows)
        return run

    tensors = [hidden, weight] + ([b] if bias else [])
    base, ref64 = ref(False), ref(True)
    if frozen:  # the head a constant: gradients in the hidden states alone
        def only_hidden(fn, ts):
            return lambda hh: fn(hh, *ts[1:])
        wide = [t.double() for t in tensors]
        _, grads = _run(only_hidden(fused, tensors), tensors[:1])
        _, base_grads = _run(only_hidden(base, tensors), tensors[:1])
        _, grads64 = _run(only_hidden(ref64, wide), wide[:1])
    else:
        _, grads = _run(fused, tensors)
        _, base_grads = _run(base, tensors)
        _, grads64 = _run(ref64, [t.double() for t in tensors])
    assert (fused.rows[labels == -100] == 0).all()
    assert_within(fused.rows, ref64.rows, base.rows, factor=2, floor=2e-7)
    for g, g64, gb in zip(grads, grads64, base_grads):
        assert g.dtype == dtype
        assert_within(g, g64, gb, factor=GRAD_FACTOR)


def test_per_row_losses_sum_to_the_sum_reduction():
    hidden, weight, b, labels = _inputs(29, 12, 53, torch.float32, True)
    h = hidden.requires_grad_()
    rows = fused_linear_cross_entropy(h, weight, labels, b, reduction="none", chunk_size=5)
    total = fused_linear_cross_entropy(h, weight, labels, b, reduction="sum", chunk_size=5)
    torch.testing.assert_close(rows.sum(), total, rtol=1e-6, atol=1e-6)
    g_rows, = torch.autograd.grad(rows.sum(), h)
    g_sum, = torch.autograd.grad(total, h)
    torch.testing.assert_close(g_rows, g_sum, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # no graph: the forward alone
        assert not fused_linear_cross_entropy(h, weight, labels, b, reduction="none").requires_grad


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, _, labels = _inputs(6, 8, 11, torch.float32, False)
    labels[:] = -100
    loss, (gh, gw) = _run(lambda hh, ww: fused_linear_cross_entropy(hh, ww, labels), [hidden, weight])
    assert loss.item() == 0 and gh.abs().max() == 0 and gw.abs().max() == 0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_the_loss_can_be_added_to_in_place(backend):
    """Mixtral and Qwen-MoE add their router loss with ``loss += coef * aux``: the returned
    loss must be a tensor of its own (a view of the op's output made autograd refuse that)."""
    hidden, weight, _, labels = _inputs(10, 8, 11, torch.float32, False)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    aux = torch.tensor(0.5, requires_grad=True)
    loss = fused_linear_cross_entropy(h, w, labels, backend=backend)
    loss += 2 * aux
    loss.backward()
    want = linear_cross_entropy_ref(hidden.detach(), weight.detach(), labels) + 1.0
    torch.testing.assert_close(loss.detach(), want.float(), rtol=1e-5, atol=1e-6)
    assert aux.grad.item() == 2.0 and h.grad is not None and w.grad is not None


def test_bad_inputs():
    hidden, weight, _, labels = _inputs(6, 8, 11, torch.float32, False)
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 8\)"):
        fused_linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="labels must be int64"):
        fused_linear_cross_entropy(hidden, weight, labels.int())
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none'"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="rows")
    bad = labels.clone()
    bad[1] = 99
    with pytest.raises(RuntimeError, match="outside"):
        fused_linear_cross_entropy(hidden, weight, bad, backend="cpu")


@pytest.mark.parametrize("bias", [False, True])
def test_repeated_backward_and_accumulation_are_not_corrupted(bias):
    """The gradients are computed in the forward and saved: backward twice (retain_graph), into
    leaves that already hold a grad, and a second use of the hidden states must give exactly
    twice / the sum of the single gradients, and never alias what an earlier backward returned
    (handing the saved tensors out unscaled was tried: autograd then accumulates into them)."""
    h = torch.randn(7, 12, requires_grad=True)
    w = torch.randn(9, 12, requires_grad=True)
    b = torch.randn(9, requires_grad=True) if bias else None
    y = torch.randint(0, 9, (7,))
    leaves = [t for t in (h, w, b) if t is not None]
    loss = fused_linear_cross_entropy(h, w, y, b)
    once = torch.autograd.grad(loss, leaves, retain_graph=True)
    loss.backward(retain_graph=True)
    loss.backward()
    for t, g in zip(leaves, once):
        torch.testing.assert_close(t.grad, 2 * g, rtol=1e-6, atol=1e-7)
    # the hidden states used twice: the two gradient contributions are summed, not aliased
    h.grad = None
    (fused_linear_cross_entropy(h, w, y, b) + (h * 3).sum()).backward()
    torch.testing.assert_close(h.grad, once[0] + 3, rtol=1e-6, atol=1e-6)
    for g in once:  # what the first backward returned was not modified afterwards
        assert torch.isfinite(g).all()
    again = torch.autograd.grad(fused_linear_cross_entropy(h, w, y, b), leaves)
    for g1, g2 in zip(once, again):
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)


def test_last_backward_scales_the_saved_gradients_in_place(monkeypatch):
    """Without retain_graph the backward scales its saved gradients in place and returns them
    (seed 1: not even scaled); a retained graph gets scaled copies. All give the reference
    gradients, and a retained graph's second backward is not affected by the first."""
    from fastlm.ops import cross_entropy as ce

    decisions = []
    real = ce._last_use
    monkeypatch.setattr(ce, "_last_use", lambda d: decisions.append(real(d)) or decisions[-1])
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    b = torch.randn(11, requires_grad=True)
    y = torch.randint(0, 11, (5,))
    ref = torch.autograd.grad(torch.nn.functional.cross_entropy(h @ w.T + b, y), (h, w, b))
    fused_linear_cross_entropy(h, w, y, b).backward()
    for got, want in zip((h.grad, w.grad, b.grad), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    h.grad = w.grad = b.grad = None
    (0.25 * fused_linear_cross_entropy(h, w, y, b)).backward()  # as gradient accumulation seeds
    for got, want in zip((h.grad, w.grad, b.grad), ref):
        torch.testing.assert_close(got, 0.25 * want, rtol=1e-5, atol=1e-6)
    loss = 3 * fused_linear_cross_entropy(h, w, y, b)
    first = torch.autograd.grad(loss, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(loss, (h, w, b))
    for g1, g2, want in zip(first, second, ref):
        torch.testing.assert_close(g1, 3 * want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g2, 3 * want, rtol=1e-5, atol=1e-6)
    assert decisions == [True, True, False, True]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_frozen_head_skips_its_gradients(reduction, bias, monkeypatch):
    """LoRA freezes the LM head: the hidden states' gradient is the same, the head's weight
    gradient GEMM is not run (a third of the head's work) and nothing is returned for it; per
    row ("none") the hidden states' gradient is computed in the forward (no recomputation)."""
    from fastlm.ops import cross_entropy as ce

    flags = []
    real = ce._chunked
    monkeypatch.setattr(ce, "_chunked", lambda *a: flags.append(
        (a[10], a[11] if len(a) > 11 else True)) or real(*a))
    hidden, weight, b, labels = _inputs(23, 16, 41, torch.float32, bias)
    seed = torch.randn(23)

    def grads(frozen):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        bb = None if b is None else b.clone().requires_grad_(not frozen)
        out = fused_linear_cross_entropy(h, w, labels, bb, reduction=reduction, chunk_size=6)
        (out * seed).sum().backward() if reduction == "none" else out.backward()
        return h.grad, w.grad, None if bb is None else bb.grad

    trained, frozen = grads(False), grads(True)
    # "none" with a frozen head scales the precomputed rows after the matmul, not before it
    exact = dict(rtol=0, atol=0) if reduction == "mean" else dict(rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(frozen[0], trained[0], **exact)
    assert frozen[1] is None and frozen[2] is None
    assert trained[1] is not None and (trained[2] is not None) == bias
    # (want_grads, head_grads) of each pass. "none": the trained head's forward and its
    # recomputation in the backward; the frozen head's hidden gradient in its forward alone
    if reduction == "mean":
        assert flags == [(True, True), (True, False)]
    else:
        assert flags == [(False, False), (True, True), (True, False)]


@pytest.mark.parametrize("hidden, vocab, itemsize, rows", [
    (256, 128256, 4, 256),  # the 16 MB rule alone: 32 rows, each reading the 128 MB weight
    (256, 128256, 2, 128),
    (768, 50257, 4, 256),
    (64, 128256, 4, 32),  # tiny hidden: passes over the logits dominate, 16 MB chunks
    (128, 8000, 2, 1048),  # a small vocabulary: 16 MB of logits is more than the floor
])
def test_chunks_keep_enough_rows_for_the_head_gemm(hidden, vocab, itemsize, rows):
    from fastlm.ops.cross_entropy import _chunk_rows

    assert _chunk_rows(1 << 20, vocab, None, itemsize, hidden) == rows
    assert _chunk_rows(7, vocab, None, itemsize, hidden) == 7  # never more rows than there are
    assert _chunk_rows(1 << 20, vocab, 5, itemsize, hidden) == 5  # an explicit chunk_size


@pytest.mark.parametrize("frozen", [False, True], ids=["head", "frozen_head"])
def test_per_row_losses_compile(frozen):
    """reduction="none" inside torch.compile (fullgraph): the registered ops and their fake
    implementations trace, and the compiled gradients are the eager ones."""
    hidden, weight, _, labels = _inputs(21, 16, 37, torch.float32, False)
    seed = torch.randn(21)

    def step(h, w):
        return (fused_linear_cross_entropy(h, w, labels, reduction="none", chunk_size=8)
                * seed).sum()

    def grads(fn):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        loss = fn(h, w)
        return [loss.detach()] + list(torch.autograd.grad(loss, [h] + ([] if frozen else [w])))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for got, want in zip(grads(compiled), grads(step)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opts", [dict(), dict(label_smoothing=0.1), dict(softcap=30.0)], ids=str)
def test_gpu_triton_rows_match_float64(dtype, opts):
    """GPT-2's vocabulary (50257: blocks that do not divide it), several chunks, on CUDA."""
    torch.manual_seed(0)
    hidden, weight, _, labels = _inputs(300, 64, 50257, dtype, False)
    hidden, weight, labels = hidden.cuda(), weight.cuda(), labels.cuda()

    def fused(hh, ww):
        return fused_linear_cross_entropy(hh, ww, labels, chunk_size=128, backend="triton",
                                          **opts)

    def ref(upcast):
        return lambda hh, ww: linear_cross_entropy_ref(hh, ww, labels, upcast=upcast, **opts)

    loss, grads = _run(fused, [hidden, weight])
    base, base_grads = _run(ref(False), [hidden, weight])
    ref64, grads64 = _run(ref(True), [hidden.double(), weight.double()])
    assert_within(loss, ref64, base, factor=2, floor=2e-7 * max(1.0, abs(ref64.item())))
    for g, g64, gb in zip(grads, grads64, base_grads):
        assert_within(g, g64, gb, factor=GRAD_FACTOR)
