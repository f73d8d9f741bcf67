"""Triton attention backward, deterministic: no atomics anywhere.

- ``delta_kernel``: Delta_i = dO_i . O_i per query row.
- ``dkdv_kernel``: one program per (key block, sequence, kv head); it loops over every query
  head of its GQA group and every query block that can see its keys, so it alone writes its
  dK/dV rows.
- ``dq_kernel``: one program per (query block, sequence, query head), recomputing P and dS.
Recomputing S in both kernels costs one extra matmul over the atomic-add formulation; in
exchange the gradients are bit-identical run to run.
"""

import triton
import triton.language as tl

from ._attention_common import (
    key_blocks,
    program_sequence,
    scores,
    seq_bounds,
    token_offset,
    visible,
)


@triton.jit
def delta_kernel(OUT, DO, DELTA, sob, soh, sot, slb, slh, slt, seqlen_q, CU_Q,
                 H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    q0, sq = seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m = (rows < sq)[:, None] & (offs_d < D)[None, :]
    base = token_offset(b, h, q0, sob, soh, sot)
    ptr = rows[:, None] * sot + offs_d[None, :]
    o = tl.load(OUT + base + ptr, mask=m, other=0.0).to(tl.float32)
    do = tl.load(DO + base + ptr, mask=m, other=0.0).to(tl.float32)
    tl.store(DELTA + token_offset(b, h, q0, slb, slh, slt) + rows * slt, tl.sum(o * do, 1),
             mask=rows < sq)


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, b, h, q0, rows, offs_d, sq, sqb, sqh, sqt, slb, slh, slt,
                D: tl.constexpr):
    """q and dO of these rows of (sequence b, head h), their logsumexp and delta; and where
    the rows are (offset of the sequence, offsets within it, mask), for dQ's store."""
    qmask = (rows < sq)[:, None] & (offs_d < D)[None, :]
    qbase = token_offset(b, h, q0, sqb, sqh, sqt)
    qptr = rows[:, None] * sqt + offs_d[None, :]
    q = tl.load(Q + qbase + qptr, mask=qmask, other=0.0)
    do = tl.load(DO + qbase + qptr, mask=qmask, other=0.0)
    lbase = token_offset(b, h, q0, slb, slh, slt)
    lse = tl.load(LSE + lbase + rows * slt, mask=rows < sq, other=float("inf"))
    delta = tl.load(DELTA + lbase + rows * slt, mask=rows < sq, other=0.0)
    return q, do, lse, delta, qbase, qptr, qmask


@triton.jit
def _p_and_ds(q, kt, vt, do, lse, delta, rows, cols, sq, sk, wl, wr, MASK, mrow, scale,
              softcap, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              PRECISION: tl.constexpr):
    """P and dS (both (M, N), fp32) of one tile, recomputed from lse."""
    s, t = scores(q, kt, scale, softcap, HAS_SOFTCAP, PRECISION)
    ok = visible(rows, cols, sq, sk, wl, wr, MASK, mrow, HAS_MASK)
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # empty rows: lse = +inf -> 0
    dp = tl.dot(do, vt, input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return p, ds


@triton.jit
def dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, MASK, CU_Q, CU_K,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, slt, smb,
    seqlen_q, seqlen_k, scale, softcap, wl, wr,
    seqlen_bucket,  # unused in the body: the autotuner's key (next power of two of the lengths)
    HKV: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, hk, q0, sq, k0, sk = program_sequence(CU_Q, CU_K, seqlen_q, seqlen_k, HKV, IS_VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= sk:
        return
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m = tl.arange(0, BLOCK_M)
    kmask = (cols < sk)[:, None] & (offs_d < D)[None, :]
    kbase = token_offset(b, hk, k0, skb, skh, skt)
    kptr = cols[:, None] * skt + offs_d[None, :]
    k = tl.load(K + kbase + kptr, mask=kmask, other=0.0)
    v = tl.load(V + kbase + kptr, mask=kmask, other=0.0)
    kt = tl.trans(k)
    vt = tl.trans(v)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # Query rows that can see any of these keys: pos - wl <= j <= pos + wr, pos = i + sk - sq.
    m_lo = tl.maximum(start_n - wr - (sk - sq), 0)
    m_hi = tl.minimum(start_n + BLOCK_N - 1 + wl - (sk - sq) + 1, sq)
    m_lo = (m_lo // BLOCK_M) * BLOCK_M
    for g in range(GROUP):
        h = hk * GROUP + g
        for start_m in range(m_lo, m_hi, BLOCK_M):
            rows = start_m + offs_m
            q, do, lse, delta, _, _, _ = _query_rows(Q, DO, LSE, DELTA, b, h, q0, rows, offs_d,
                                                     sq, sqb, sqh, sqt, slb, slh, slt, D)
            p, ds = _p_and_ds(q, kt, vt, do, lse, delta, rows, cols, sq, sk, wl, wr, MASK,
                              b.to(tl.int64) * smb, scale, softcap, HAS_MASK, HAS_SOFTCAP,
                              PRECISION)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    tl.store(DK + kbase + kptr, (dk * scale).to(DK.dtype.element_ty), mask=kmask)
    tl.store(DV + kbase + kptr, dv.to(DV.dtype.element_ty), mask=kmask)


@triton.jit
def dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, CU_Q, CU_K,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, slt, smb,
    seqlen_q, seqlen_k, scale, softcap, wl, wr,
    seqlen_bucket,  # unused in the body: the autotuner's key (next power of two of the lengths)
    H: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b, h, q0, sq, k0, sk = program_sequence(CU_Q, CU_K, seqlen_q, seqlen_k, H, IS_VARLEN)
    hk = h // GROUP
    start_m = tl.program_id(0) * BLOCK_M
    if start_m >= sq:
        return
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    q, do, lse, delta, qbase, qptr, qmask = _query_rows(Q, DO, LSE, DELTA, b, h, q0, rows,
                                                        offs_d, sq, sqb, sqh, sqt, slb, slh,
                                                        slt, D)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kbase = token_offset(b, hk, k0, skb, skh, skt)
    lo, hi = key_blocks(start_m, sq, sk, wl, wr, BLOCK_M, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kmask = (cols < sk)[None, :] & (offs_d < D)[:, None]
        kptr_t = cols[None, :] * skt + offs_d[:, None]
        kt = tl.load(K + kbase + kptr_t, mask=kmask, other=0.0)
        vt = tl.load(V + kbase + kptr_t, mask=kmask, other=0.0)
        _, ds = _p_and_ds(q, kt, vt, do, lse, delta, rows, cols, sq, sk, wl, wr, MASK,
                          b.to(tl.int64) * smb, scale, softcap, HAS_MASK, HAS_SOFTCAP, PRECISION)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    tl.store(DQ + qbase + qptr, (dq * scale).to(DQ.dtype.element_ty), mask=qmask)
