"""Device helpers shared by the Triton attention kernels (forward and backward)."""

import triton
import triton.language as tl

# Stand-in for "unbounded" in window arithmetic: larger than any sequence, small enough that
# position + BIG cannot overflow int32.
BIG = 1 << 30


@triton.jit
def seq_bounds(CU, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first token, length) of sequence b: from cu_seqlens when packed, else (0, seqlen)."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        length = tl.load(CU + b + 1) - start
    else:
        start = 0
        length = seqlen
    return start, length


@triton.jit
def tanh(x):
    # tl has no portable tanh (libdevice is CUDA-only, and the interpreter has no libdevice):
    # 1 - 2 / (exp(2x) + 1) saturates correctly to +-1 for large |x|.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def visible(rows, cols, sq, sk, wl, wr, MASK, mask_row_ptr, HAS_MASK: tl.constexpr):
    """(M, N) bool: key cols[j] is visible to query rows[i] (bottom-right aligned limits)."""
    pos = rows + sk - sq
    ok = (rows[:, None] < sq) & (cols[None, :] < sk)
    ok = ok & (cols[None, :] <= pos[:, None] + wr) & (cols[None, :] >= pos[:, None] - wl)
    if HAS_MASK:
        keep = tl.load(MASK + mask_row_ptr + cols, mask=cols < sk, other=0)
        ok = ok & (keep[None, :] != 0)
    return ok


@triton.jit
def scores(q, kt, scale, softcap, HAS_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """scale * q k^T, soft-capped; also returns tanh(s / softcap) for the backward."""
    s = tl.dot(q, kt, input_precision=PRECISION) * scale
    if HAS_SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    else:
        t = s
    return s, t
