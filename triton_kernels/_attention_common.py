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
        first = tl.load(CU + b)
        length = tl.load(CU + b + 1) - first
        start = first.to(tl.int64)  # see token_offset
    else:
        start = 0
        length = seqlen
    return start, length


@triton.jit
def token_offset(b, h, t0, sb, sh, st):
    """Element offset of token t0 of (sequence b, head h), in int64; callers add the offsets
    within the sequence (row * st + d) in int32. All int32 before, the offset wrapped in a
    tensor of more than 2^31 elements (16 x 32 heads x 32k tokens x 128, or a packed batch of
    512k tokens), and the kernel read and wrote outside it."""
    return b.to(tl.int64) * sb + h.to(tl.int64) * sh + t0 * st


@triton.jit
def program_sequence(CU_Q, CU_K, seqlen_q, seqlen_k, H: tl.constexpr, IS_VARLEN: tl.constexpr):
    """(sequence, head, q start, q length, k start, k length) of this program (grid axis 1 runs
    over sequence x head, H heads per sequence)."""
    bh = tl.program_id(1)
    b = bh // H
    q0, sq = seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    k0, sk = seq_bounds(CU_K, b, seqlen_k, IS_VARLEN)
    return b, bh % H, q0, sq, k0, sk


@triton.jit
def key_blocks(start_m, sq, sk, wl, wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[lo, hi) of the key blocks some row of query block start_m can see; key blocks outside
    every row's window are never visited (causal halves the work)."""
    lo = tl.maximum(start_m + sk - sq - wl, 0)
    hi = tl.minimum(start_m + BLOCK_M - 1 + sk - sq + wr + 1, sk)
    return (lo // BLOCK_N) * BLOCK_N, hi


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
