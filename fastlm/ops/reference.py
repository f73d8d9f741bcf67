"""Float64-capable PyTorch references for every fastlm op.

These are the ground truth shared by tests, benchmarks and the ``torch`` backend. They are
written for clarity, not speed: each materialises what the fused kernels never do.

``upcast=True`` computes in float64 (the tests' ground truth); ``upcast=False`` computes in the
inputs' own dtype, which is what "PyTorch's own error in the same dtype" means in the tolerance
rule (see ``tests/tolerances.py``).
"""

from __future__ import annotations

import math

import torch

# A row whose keys are all masked has lse = +inf: then exp(s - lse) = 0 for every key, so the
# backward needs no special case and produces zero gradients (never NaN).
EMPTY_ROW_LSE = math.inf


def attention_mask(
    sq: int,
    sk: int,
    *,
    causal: bool = False,
    window: tuple[int, int] = (-1, -1),
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor | None:
    """Boolean mask (True = attend) broadcastable to (B, H, Sq, Sk), or None if nothing is masked.

    Causal and window limits are aligned bottom-right: query ``i`` sits at key position
    ``i + sk - sq``, as FlashAttention does, so a short query block attends like the last rows
    of a full one (KV-cache decoding). ``window=(left, right)`` keeps keys in
    ``[pos - left, pos + right]``; -1 means unbounded on that side; causal forces right = 0.
    """
    left, right = window
    if causal:
        right = 0
    mask = None
    if left >= 0 or right >= 0:
        pos = torch.arange(sq, device=device)[:, None] + (sk - sq)  # (Sq, 1)
        j = torch.arange(sk, device=device)[None, :]  # (1, Sk)
        mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if right >= 0:
            mask &= j <= pos + right
        if left >= 0:
            mask &= j >= pos - left
        mask = mask[None, None]  # (1, 1, Sq, Sk)
    if key_padding_mask is not None:
        kpm = key_padding_mask[:, None, None, :].to(torch.bool)  # (B, 1, 1, Sk)
        mask = kpm if mask is None else (mask & kpm)
    return mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Reference scaled-dot-product attention.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA/MQA).
    key_padding_mask: (B, Sk) bool, True = attend. softcap > 0 applies
    ``softcap * tanh(s / softcap)`` to the scaled scores (Gemma-2 style).
    Returns out (B, Hq, Sq, D) in q's dtype, and with ``return_lse`` the float32 log-sum-exp
    (B, Hq, Sq) of the scaled scores (+inf for rows that attend to nothing; their output is 0).
    """
    dtype = q.dtype
    if upcast:
        q, k, v = q.double(), k.double(), v.double()
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    mask = attention_mask(
        sq, sk, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device
    )
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    lse = torch.logsumexp(s.float() if not upcast else s, dim=-1)  # (B, H, Sq)
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows: softmax of all -inf is NaN -> 0
    out = torch.matmul(p.to(v.dtype), v).to(dtype)
    if not return_lse:
        return out
    lse = lse.float().masked_fill(empty, EMPTY_ROW_LSE)
    return out, lse


def attention_bwd_ref(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit gradients of :func:`attention_ref` (computed in the inputs' dtype).

    Written out rather than taken from autograd so it also works where autograd is not
    recording (inside a custom op's backward). dk/dv are summed over each GQA group.
    """
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    group = hq // hkv
    kr = k.repeat_interleave(group, dim=1) if group > 1 else k
    vr = v.repeat_interleave(group, dim=1) if group > 1 else v
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    raw = torch.matmul(q, kr.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    s = softcap * torch.tanh(raw / softcap) if softcap > 0 else raw
    mask = attention_mask(
        sq, sk, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device
    )
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    p = torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)
    dv = torch.matmul(p.transpose(-1, -2), dout)  # (B, H, Sk, D)
    dp = torch.matmul(dout, vr.transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    if softcap > 0:
        ds = ds * (1 - torch.tanh(raw / softcap) ** 2)
    dq = torch.matmul(ds, kr) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    if group > 1:
        dk = dk.view(b, hkv, group, sk, d).sum(dim=2)
        dv = dv.view(b, hkv, group, sk, d).sum(dim=2)
    return dq, dk, dv


def attention_varlen_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    upcast: bool = True,
    return_lse: bool = False,
):
    """Reference for packed sequences: q (total_q, Hq, D), k/v (total_k, Hkv, D).

    Sequence ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i+1]``; each is attended on its own with
    :func:`attention_ref`. Returns out (total_q, Hq, D) and with ``return_lse`` lse (Hq, total_q).
    """
    outs, lses = [], []
    n = cu_seqlens_q.numel() - 1
    for i in range(n):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        o, lse = attention_ref(
            q[qs:qe].transpose(0, 1)[None],
            k[ks:ke].transpose(0, 1)[None],
            v[ks:ke].transpose(0, 1)[None],
            causal=causal,
            scale=scale,
            window=window,
            softcap=softcap,
            upcast=upcast,
            return_lse=True,
        )
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    out = torch.cat(outs, dim=0)
    if not return_lse:
        return out
    return out, torch.cat(lses, dim=-1)


def attention_varlen_bwd_ref(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_varlen_ref`, sequence by sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1])
        ks, ke = int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        grads = attention_bwd_ref(
            *(t.transpose(0, 1)[None] for t in (dout[qs:qe], q[qs:qe], k[ks:ke], v[ks:ke])),
            **kwargs,
        )
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (g[0].transpose(0, 1) for g in grads)
    return dq, dk, dv
