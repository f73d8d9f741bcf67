"""Triton attention forward: one program per (BLOCK_M query rows, sequence, query head)."""

import triton
import triton.language as tl

from ._attention_common import key_blocks, program_sequence, scores, token_offset, visible


@triton.jit
def attention_fwd_kernel(
    Q, K, V, OUT, LSE, MASK, CU_Q, CU_K,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh, slt, smb,
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
    dmask = offs_d < D
    q = tl.load(Q + token_offset(b, h, q0, sqb, sqh, sqt) + rows[:, None] * sqt + offs_d[None, :],
                mask=(rows < sq)[:, None] & dmask[None, :], other=0.0)
    lo, hi = key_blocks(start_m, sq, sk, wl, wr, BLOCK_M, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    k_base = K + token_offset(b, hk, k0, skb, skh, skt)
    v_base = V + token_offset(b, hk, k0, svb, svh, svt)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < sk)[None, :] & dmask[:, None]
        kt = tl.load(k_base + cols[None, :] * skt + offs_d[:, None], mask=kv_mask, other=0.0)
        s, _ = scores(q, kt, scale, softcap, HAS_SOFTCAP, PRECISION)
        ok = visible(rows, cols, sq, sk, wl, wr, MASK, b.to(tl.int64) * smb, HAS_MASK)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svt + offs_d[None, :],
                    mask=(cols < sk)[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0  # saw no key: output 0 and lse +inf so the backward's P is exactly 0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(OUT + token_offset(b, h, q0, sob, soh, sot) + rows[:, None] * sot + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=(rows < sq)[:, None] & dmask[None, :])
    tl.store(LSE + token_offset(b, h, q0, slb, slh, slt) + rows * slt, lse, mask=rows < sq)
