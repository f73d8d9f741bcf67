"""Triton row kernel of the fused linear + cross-entropy (launcher, no autograd): one chunk of
logits in, the loss per row out and, for the gradients, the logits overwritten in place with
row_scale * d(loss)/d(logits), as ``fastlm.ops.cross_entropy._ce_rows_torch`` (the reference)
and the CPU kernel (csrc/cpu/cross_entropy.cpp) compute them. One program a row, two passes over
its vocabulary (an online max and sum for the logsumexp, then the gradient), fp32 math: the
torch path reads and writes the chunk about six times (float copy, log_softmax, exp, scatter,
scale, copy back)."""

import torch
import triton
import triton.language as tl

from .activations import _tanh_sech2


@triton.jit
def _ce_rows(X, LABELS, SCALE, LOSS, V, stride, ignore_index, smoothing, softcap,
             HAS_SMOOTHING: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GRAD: tl.constexpr,
             BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride
    label = tl.load(LABELS + row)
    valid = label != ignore_index
    safe = tl.where(valid, label, 0)
    m = tl.zeros([], tl.float32) - float("inf")
    d = tl.zeros([], tl.float32)
    zsum = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        inside = cols < V
        z = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:  # z = softcap * tanh(x / softcap)
            t, _ = _tanh_sech2(z / softcap)
            z = softcap * t
        if HAS_SMOOTHING:
            zsum += tl.sum(tl.where(inside, z, 0.0), 0)
        z = tl.where(inside, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
    lse = m + tl.log(d)
    zt = tl.load(x_row + safe).to(tl.float32)
    if HAS_SOFTCAP:
        tt, _ = _tanh_sech2(zt / softcap)
        zt = softcap * tt
    loss = lse - zt
    if HAS_SMOOTHING:  # (1 - e) nll - e mean(log p), mean(log p) = mean(z) - lse
        loss = (1.0 - smoothing) * loss - smoothing * (zsum / V - lse)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if GRAD:
        scale = tl.where(valid, tl.load(SCALE + row), 0.0)
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            inside = cols < V
            x = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t, sech2 = _tanh_sech2(x / softcap)
                z = softcap * t
            else:
                z = x
            g = tl.exp(z - lse)
            if HAS_SMOOTHING:
                g = g - smoothing / V
            g = tl.where(cols == safe, g - (1.0 - smoothing), g)
            if HAS_SOFTCAP:
                g = g * sech2
            tl.store(x_row + cols, (g * scale).to(X.dtype.element_ty), mask=inside)


def ce_rows(logits: torch.Tensor, labels: torch.Tensor, row_scale: torch.Tensor,
            ignore_index: int, smoothing: float, softcap: float, grad: bool) -> torch.Tensor:
    n, v = logits.shape
    assert logits.stride(1) == 1, "the rows of logits must be contiguous"
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n == 0:
        return loss
    block = min(triton.next_power_of_2(v), 4096)
    _ce_rows[(n,)](logits, labels, row_scale, loss, v, logits.stride(0), ignore_index,
                   float(smoothing), float(softcap), HAS_SMOOTHING=smoothing > 0,
                   HAS_SOFTCAP=softcap > 0, GRAD=bool(grad), BLOCK=block,
                   num_warps=8 if block >= 2048 else 4)
    return loss
