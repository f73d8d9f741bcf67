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
    sinks: torch.Tensor | None = None,
):
    """Reference scaled-dot-product attention.

    q: (B, Hq, Sq, D); k, v: (B, Hkv, Sk, D) with Hq % Hkv == 0 (GQA/MQA).
    key_padding_mask: (B, Sk) bool, True = attend. softcap > 0 applies
    ``softcap * tanh(s / softcap)`` to the scaled scores (Gemma-2 style). sinks (Hq,): one
    more logit per head in every row's softmax, with no value (GPT-OSS): the weights on the
    keys are the softmax over [scores, sink] without its last column.
    Returns out (B, Hq, Sq, D) in q's dtype, and with ``return_lse`` the float32 log-sum-exp
    (B, Hq, Sq) of the scaled scores, the sink included (+inf for rows that attend to nothing
    and have no sink; their output is 0).
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
    s = _append_sinks(s, sinks)
    lse = torch.logsumexp(s.float() if not upcast else s, dim=-1)  # (B, H, Sq)
    empty = torch.isinf(lse) & (lse < 0)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # fully masked rows: softmax of all -inf is NaN -> 0
    if sinks is not None:
        p = p[..., :-1]
    out = torch.matmul(p.to(v.dtype), v).to(dtype)
    if not return_lse:
        return out
    lse = lse.float().masked_fill(empty, EMPTY_ROW_LSE)
    return out, lse


def _append_sinks(s: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor:
    """Scores (B, H, Sq, Sk) -> (B, H, Sq, Sk + 1) with each head's sink as the last column."""
    if sinks is None:
        return s
    col = sinks.to(s.dtype).view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
    return torch.cat([s, col], dim=-1)


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
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Explicit gradients of :func:`attention_ref` (computed in the inputs' dtype).

    Written out rather than taken from autograd so it also works where autograd is not
    recording (inside a custom op's backward). dk/dv are summed over each GQA group. With
    sinks, still the gradients of q, k and v only: the op computes the sinks' own from its
    saved output and lse (tests take it from autograd over :func:`attention_ref`).
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
    p = torch.nan_to_num(torch.softmax(_append_sinks(s, sinks), dim=-1), nan=0.0)
    if sinks is not None:
        p = p[..., :-1]  # the sink's value is 0: it adds nothing to dp or to (p * dp).sum()
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
    sinks: torch.Tensor | None = None,
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
            sinks=sinks,
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


# =============================================================================================
# Fused ops around attention: RMSNorm, LayerNorm, rotary, activations, linear cross-entropy.
# Each ``*_ref`` computes in float64 when ``upcast`` (else in the inputs' dtype) and returns the
# input dtype; the ``*_bwd_ref`` functions are explicit gradients, usable where autograd is not
# recording (the ``torch`` backends call them inside their custom ops' backward).
# =============================================================================================


def _work(t: torch.Tensor | None, upcast: bool) -> torch.Tensor | None:
    return t.double() if (upcast and t is not None) else t


def rms_norm_ref(x, weight, eps=1e-6, *, offset=0.0, upcast=True):
    """``x / sqrt(mean(x^2, -1) + eps) * (weight + offset)``; weight (H,) or None (= 1)."""
    xc = _work(x, upcast)
    y = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * (_work(weight, upcast).to(xc.dtype) + offset)
    return y.to(x.dtype)


def rms_norm_bwd_ref(dy, x, weight, eps=1e-6, *, offset=0.0, rstd=None):
    """(dx, dweight or None) of :func:`rms_norm_ref`, in x's dtype (dweight in weight's).

    rstd (..., 1), if given, is the forward's saved 1/rms instead of a recomputed one.
    """
    h = x.shape[-1]
    if rstd is None:
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xhat = x * rstd
    g = dy if weight is None else dy * (weight.to(x.dtype) + offset)
    dx = rstd * (g - xhat * (g * xhat).sum(-1, keepdim=True) / h)
    dw = None if weight is None else (dy * xhat).reshape(-1, h).sum(0).to(weight.dtype)
    return dx, dw


def layer_norm_ref(x, weight, bias, eps=1e-5, *, upcast=True):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last dim (biased variance)."""
    xc = _work(x, upcast)
    w, b = _work(weight, upcast), _work(bias, upcast)
    y = torch.nn.functional.layer_norm(
        xc, (x.shape[-1],), None if w is None else w.to(xc.dtype),
        None if b is None else b.to(xc.dtype), eps,
    )
    return y.to(x.dtype)


def layer_norm_bwd_ref(dy, x, weight, eps=1e-5, *, mean=None, rstd=None):
    """(dx, dweight, dbias) of :func:`layer_norm_ref`; dweight is None without a weight.

    mean and rstd (..., 1), if given, are the forward's saved statistics.
    """
    h = x.shape[-1]
    if mean is None or rstd is None:
        mean = x.mean(-1, keepdim=True)
        rstd = torch.rsqrt((x - mean).pow(2).mean(-1, keepdim=True) + eps)
    xhat = (x - mean) * rstd
    g = dy if weight is None else dy * weight.to(x.dtype)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    dw = None if weight is None else (dy * xhat).reshape(-1, h).sum(0).to(weight.dtype)
    db = dy.reshape(-1, h).sum(0)
    return dx, dw, db


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] over the last dim (the HF convention's rotation)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...): the interleaved form (Cohere, GLM)."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).flatten(-2)


def _rotary_tables(cos, sin):
    # (S, R) -> (1, 1, S, R); (B, S, R) -> (B, 1, S, R): broadcast over heads
    if cos.dim() == 2:
        return cos[None, None], sin[None, None]
    return cos[:, None], sin[:, None]


def rotary_ref(q, k, cos, sin, *, upcast=True, interleaved=False):
    """HF rotary: ``x * cos + rotate_half(x) * sin`` on the first cos.shape[-1] features
    (``rotate_pairs`` instead with ``interleaved``).

    q (B, Hq, S, D), k (B, Hkv, S, D), cos/sin (S, R) or (B, S, R) with R <= D even; features
    [R, D) pass through (partial rotary). Returns (q_out, k_out) in the inputs' dtypes.
    """
    c, s = _rotary_tables(_work(cos, upcast), _work(sin, upcast))
    rot = c.shape[-1]
    rotate = rotate_pairs if interleaved else rotate_half

    def apply(x):
        xc = _work(x, upcast)
        xr = xc[..., :rot]
        out = xr * c.to(xc.dtype) + rotate(xr) * s.to(xc.dtype)
        return torch.cat((out, xc[..., rot:]), dim=-1).to(x.dtype)

    return apply(q), apply(k)


def rotary_bwd_ref(dq_out, dk_out, cos, sin):
    """(dq, dk) of :func:`rotary_ref`: the transpose of the rotation, applied to the gradients."""
    c, s = _rotary_tables(cos, sin)
    rot = c.shape[-1]

    def apply(dy):
        dr = dy[..., :rot]
        ds = dr * s.to(dy.dtype)
        d1, d2 = ds.chunk(2, dim=-1)
        back = torch.cat((d2, -d1), dim=-1)  # rotate_half transposed
        return torch.cat((dr * c.to(dy.dtype) + back, dy[..., rot:]), dim=-1)

    return apply(dq_out), apply(dk_out)


def gelu_ref(x, *, approximate="none", upcast=True):
    """GELU, exact (erf) or the tanh approximation, as torch.nn.functional.gelu."""
    return torch.nn.functional.gelu(_work(x, upcast), approximate=approximate).to(x.dtype)


def swiglu_ref(gate, up, *, upcast=True):
    """``silu(gate) * up`` (Llama/Mistral MLP)."""
    return (torch.nn.functional.silu(_work(gate, upcast)) * _work(up, upcast)).to(gate.dtype)


def geglu_ref(gate, up, *, approximate="tanh", upcast=True):
    """``gelu(gate) * up`` (Gemma MLP uses the tanh approximation)."""
    g = torch.nn.functional.gelu(_work(gate, upcast), approximate=approximate)
    return (g * _work(up, upcast)).to(gate.dtype)


def activation_and_grad_ref(x, kind):
    """(act(x), act'(x)) for kind "silu", "gelu" (erf) or "gelu_tanh", in x's dtype."""
    if kind == "silu":
        s = torch.sigmoid(x)
        return x * s, s * (1 + x * (1 - s))
    if kind == "gelu":
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        return x * cdf, cdf + x * torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    if kind == "gelu_tanh":
        k0, k1 = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k0 * (x + k1 * x**3))
        dt = (1 - t * t) * k0 * (1 + 3 * k1 * x * x)
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * dt
    raise ValueError(f"unknown activation kind {kind!r}")


def linear_cross_entropy_ref(
    hidden,
    weight,
    labels,
    *,
    bias=None,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="mean",
    softcap=0.0,
    upcast=True,
):
    """``cross_entropy(softcap(hidden @ weight.T + bias), labels)``, materialising all logits.

    upcast=False is the usual unfused PyTorch recipe: the LM-head matmul in the inputs' dtype,
    then the logits upcast to fp32 for the loss (as Hugging Face's causal-LM loss does).
    Returns fp32 (float64 when upcast); "mean" averages over labels != ignore_index.
    """
    h, w, b = _work(hidden, upcast), _work(weight, upcast), _work(bias, upcast)
    logits = h @ w.T
    if b is not None:
        logits = logits + b
    logits = logits if upcast else logits.float()
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(
        logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing,
        reduction=reduction,
    )
