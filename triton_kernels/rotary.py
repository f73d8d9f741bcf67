"""Triton rotary embedding (launcher, no autograd), the HF convention as csrc/cpu/rotary.h:
[x1, x2] -> [x1 c1 - x2 s1, x2 c2 + x1 s2] on the first R features, the rest copied; the
inverse (the backward) applies the transpose. x is any strided (B, H, S, D) view with a
contiguous last dim (HF's q/k are (B, S, H, D) transposed): its strides are followed, not
copied. cos/sin are fp32 (1 or B, S, R). One program rotates BLOCK_S positions of one (b, h)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary(X, C, S, Y, seqlen, heads, xb, xh, xs, yb, yh, ys, cb, HALF: tl.constexpr,
            PASS: tl.constexpr, INVERSE: tl.constexpr, INTERLEAVED: tl.constexpr,
            BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_P: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // heads, bh % heads
    pos = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    f = tl.arange(0, BLOCK_H)
    m = (pos[:, None] < seqlen) & (f[None, :] < HALF)
    xrow = X + b.to(tl.int64) * xb + h.to(tl.int64) * xh + pos[:, None].to(tl.int64) * xs
    yrow = Y + b.to(tl.int64) * yb + h.to(tl.int64) * yh + pos[:, None].to(tl.int64) * ys
    trow = b.to(tl.int64) * cb + pos[:, None].to(tl.int64) * (2 * HALF)
    if INTERLEAVED:  # pairs (2i, 2i + 1) (Cohere, GLM)
        i1 = 2 * f[None, :]
        i2 = i1 + 1
    else:  # halves (i, i + R/2)
        i1 = f[None, :]
        i2 = i1 + HALF
    x1 = tl.load(xrow + i1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(xrow + i2, mask=m, other=0.0).to(tl.float32)
    c1 = tl.load(C + trow + i1, mask=m, other=0.0)
    c2 = tl.load(C + trow + i2, mask=m, other=0.0)
    s1 = tl.load(S + trow + i1, mask=m, other=0.0)
    s2 = tl.load(S + trow + i2, mask=m, other=0.0)
    if INVERSE:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(yrow + i1, y1.to(Y.dtype.element_ty), mask=m)
    tl.store(yrow + i2, y2.to(Y.dtype.element_ty), mask=m)
    if PASS > 0:  # partial rotary (GPT-NeoX, Phi): features [2 * HALF, D) pass through
        p = tl.arange(0, BLOCK_P)
        mp = (pos[:, None] < seqlen) & (p[None, :] < PASS)
        keep = tl.load(xrow + 2 * HALF + p[None, :], mask=mp, other=0.0)
        tl.store(yrow + 2 * HALF + p[None, :], keep, mask=mp)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool,
           interleaved: bool = False) -> torch.Tensor:
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    batch, heads, seqlen, dim = x.shape
    half = cos.shape[-1] // 2
    block_h = triton.next_power_of_2(max(half, 1))
    block_s = max(1, min(64, 4096 // block_h, triton.next_power_of_2(seqlen)))
    grid = (triton.cdiv(seqlen, block_s), batch * heads)
    _rotary[grid](x, cos, sin, out, seqlen, heads, *x.stride()[:3], *out.stride()[:3],
                  0 if cos.shape[0] == 1 else cos.stride(0), HALF=half, PASS=dim - 2 * half,
                  INVERSE=inverse, INTERLEAVED=interleaved, BLOCK_S=block_s, BLOCK_H=block_h,
                  BLOCK_P=triton.next_power_of_2(max(dim - 2 * half, 1)))
    return out
