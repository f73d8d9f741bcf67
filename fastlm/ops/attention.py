"""Fused scaled-dot-product attention: one public function, four backends, one dispatch rule.

Backends (see ``fastlm._dispatch`` for the rule):

- ``cuda``   csrc/cuda/attention_*.cu, tensor cores (bf16/fp16, head dim 64/128), CUDA tensors
- ``triton`` triton_kernels/attention.py, any float dtype and head dim <= 256, CUDA tensors
             (CPU tensors only inside Triton's interpreter, for tests)
- ``cpu``    csrc/cpu/attention_*.cpp, flash-style tiled C++ with OpenMP and SIMD, CPU tensors
- ``torch``  the reference in fastlm/ops/reference.py, in fp32 (always available)

The forward and backward are ``torch.library`` custom ops with fake implementations and a
registered autograd formula, so the op composes with ``torch.compile``.
"""

from __future__ import annotations

import math

import torch

from fastlm._build import load_extension
from fastlm._custom_op import custom_op
from fastlm._dispatch import (
    Call,
    all_of,
    define_op,
    extension_check,
    needs_device,
    needs_dtypes,
    triton_check,
    triton_launchers,
)
from fastlm.ops import _attention_checks as checks
from fastlm.ops import reference
from fastlm.ops._attention_checks import FLOATS as _FLOATS
from fastlm.ops._autocast import autocast_inputs

__all__ = ["attention", "attention_varlen"]

_op = define_op("attention")


def _cuda_features(call: Call) -> str | None:
    d = call.features.get("head_dim")
    if d not in (64, 128):
        return f"head dim {d} is not compiled (64 and 128 are)"
    return None


def _triton_features(call: Call) -> str | None:
    d = call.features.get("head_dim", 0)
    if d > 256:
        return f"head dim {d} > 256 does not fit the Triton kernels' tiles"
    return None


class _TorchBackend:
    """The reference as a backend: fp32 compute (fp64 for fp64 inputs), O(S^2) memory."""

    @staticmethod
    def _compute_dtype(t: torch.Tensor) -> torch.dtype:
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    @classmethod
    def _fwd(cls, q, k, v, mask, causal, scale, wl, wr, softcap, cu_q=None, cu_k=None):
        dt = cls._compute_dtype(q)
        args = (q.to(dt), k.to(dt), v.to(dt))
        kw = dict(causal=causal, scale=scale, window=(wl, wr), softcap=softcap, upcast=False)
        if cu_q is None:
            out, lse = reference.attention_ref(*args, key_padding_mask=mask, return_lse=True, **kw)
        else:
            out, lse = reference.attention_varlen_ref(*args, cu_q, cu_k, return_lse=True, **kw)
        return _like(out.to(q.dtype), q), lse.float()

    @classmethod
    def _bwd(cls, dout, q, k, v, mask, causal, scale, wl, wr, softcap, cu_q=None, cu_k=None,
             sinks=None):
        dt = cls._compute_dtype(q)
        args = [t.to(dt) for t in (dout, q, k, v)]
        kw = dict(causal=causal, scale=scale, window=(wl, wr), softcap=softcap,
                  sinks=None if sinks is None else sinks.to(dt))
        if cu_q is None:
            grads = reference.attention_bwd_ref(*args, key_padding_mask=mask, **kw)
        else:
            grads = reference.attention_varlen_bwd_ref(*args, cu_q, cu_k, **kw)
        return tuple(_like(g.to(t.dtype), t) for g, t in zip(grads, (q, k, v)))

    @classmethod
    def attention_fwd(cls, q, k, v, mask, causal, scale, wl, wr, softcap):
        return cls._fwd(q, k, v, mask, causal, scale, wl, wr, softcap)

    @classmethod
    def attention_bwd(cls, dout, q, k, v, out, lse, mask, causal, scale, wl, wr, softcap, det,
                      sinks=None):
        return cls._bwd(dout, q, k, v, mask, causal, scale, wl, wr, softcap, sinks=sinks)

    @classmethod
    def attention_varlen_fwd(cls, q, k, v, cu_q, cu_k, mq, mk, causal, scale, wl, wr, softcap):
        return cls._fwd(q, k, v, None, causal, scale, wl, wr, softcap, cu_q, cu_k)

    @classmethod
    def attention_varlen_bwd(
        cls, dout, q, k, v, out, lse, cu_q, cu_k, mq, mk, causal, scale, wl, wr, softcap, det,
        sinks=None,
    ):
        return cls._bwd(dout, q, k, v, None, causal, scale, wl, wr, softcap, cu_q, cu_k, sinks)


_op.register(
    "cuda",
    all_of(needs_device("cuda"), needs_dtypes(torch.float16, torch.bfloat16), _cuda_features,
           extension_check("cuda", "attention_fwd")),
    lambda: load_extension("cuda"),
)
_op.register(
    "triton",
    all_of(triton_check, needs_dtypes(*_FLOATS), _triton_features),
    triton_launchers("fastlm.triton_kernels.attention"),
)
_op.register(
    "cpu",
    all_of(needs_device("cpu"), needs_dtypes(*_FLOATS), extension_check("cpu", "attention_fwd")),
    lambda: load_extension("cpu"),
)
_op.register("torch", lambda call: None, lambda: _TorchBackend)


def _like(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """t's values in layout's memory layout (every backend returns out like q, grads like
    their inputs, and reads dout like out: what the fake implementations promise)."""
    st, sl = t.stride(), layout.stride()
    if st == sl or all(a == b for a, b, n in zip(st, sl, t.shape) if n != 1):
        return t  # (a size-1 dim's stride is never used)
    return torch.empty_like(layout).copy_(t)


def _unit_rows(t: torch.Tensor) -> bool:
    """A contiguous last (head) dim: rows the kernels can read (torch has no negative
    strides)."""
    return t.stride(-1) == 1 or t.shape[-1] == 1


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: a permutation of a contiguous tensor."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _kernel_layout(q, k, v, backend: str | None):
    """The layouts the kernels receive. On CPU q/k/v keep their strides when every row is
    contiguous: HF's (B, S, H, D) projections viewed as (B, H, S, D), and slices of a fused
    QKV projection (GPT-2), cost no copy in; the output is allocated dense in q's dimension
    order (``empty_like``), so transposing it back to (B, S, H, D) is a view too. k and v must
    share strides (the Triton kernels read both with one set), and Triton (tests only, on CPU
    tensors) only dense ones, whose ``empty_like`` keeps their strides. Anything else, and
    every tensor on a GPU or for the CUDA kernels (which assume contiguous rows; on CPU
    tensors only in the CUDA emulator's tests), is made contiguous."""
    requested = _op.requested(backend)[0]
    if (q.device.type == "cpu" and requested != "cuda" and all(_unit_rows(t) for t in (q, k, v))
            and _like(v, k) is v and (requested != "triton" or all(_dense(t) for t in (q, k, v)))):
        return q, k, v
    return q.contiguous(), k.contiguous(), v.contiguous()


def _impl(backend: str, q: torch.Tensor, varlen: bool = False):
    """The launchers of the backend that runs this call.

    Selection happens here, inside the custom op, rather than in :func:`attention`: under
    ``torch.compile`` the op is opaque, so the choice is made when it actually runs (and the
    dispatch code is never traced). ``backend`` is the caller's request, "" for none.
    """
    call = Call.of(q, head_dim=q.shape[-1], varlen=varlen or q.dim() == 3)
    return _op.launchers(call, backend or None)


# -- dense custom ops ---------------------------------------------------------------------------


@custom_op("fastlm::attention_fwd")
def _attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    backend: str,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if segment_ids is not None:
        out, lse = _packed_fwd(backend, q, k, v, segment_ids, causal, scale, window_left,
                               window_right, softcap)
    else:
        out, lse = _impl(backend, q).attention_fwd(
            q, k, v, key_padding_mask, causal, scale, window_left, window_right, softcap
        )
    if sinks is None:
        return out, lse
    return _with_sinks(out, lse, sinks.view(1, -1, 1))


@_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, segment_ids, causal, scale, window_left, window_right, softcap,
      det, backend, sinks=None):
    b, h, s, _ = q.shape
    return torch.empty_like(q), q.new_empty((b, h, s), dtype=torch.float32)


@custom_op("fastlm::attention_bwd")
def _attention_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    backend: str,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(backend, q, varlen=segment_ids is not None)
    # the torch backend recomputes from q, k, v (not from out and lse): it takes the sinks
    extra = {"sinks": sinks} if sinks is not None and impl is _TorchBackend else {}
    if segment_ids is not None:
        return _packed_bwd(impl, dout, q, k, v, out, lse, segment_ids, causal, scale,
                           window_left, window_right, softcap, deterministic, **extra)
    return tuple(
        impl.attention_bwd(
            _like(dout, out), q, k, v, out, lse, key_padding_mask, causal, scale,
            window_left, window_right, softcap, deterministic, **extra,
        )
    )


@_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_dense(ctx, inputs, output):
    q, k, v, mask, segment_ids, causal, scale, wl, wr, softcap, det, backend, *sinks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, mask, segment_ids, *sinks)
    ctx.args = (causal, scale, wl, wr, softcap, det, backend)


def _backward_dense(ctx, dout, dlse):
    q, k, v, out, lse, mask, segment_ids, *sinks = ctx.saved_tensors
    sinks = sinks[0] if sinks else None
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, mask, segment_ids, *ctx.args, sinks)
    dsinks = None if sinks is None else _sinks_grad(dout, out, lse, sinks.view(1, -1, 1))
    return (dq, dk, dv) + (None,) * 9 + (dsinks,)


# -- attention sinks ----------------------------------------------------------------------------
# A sink is a per-head logit with no value (GPT-OSS, StreamingLLM): it joins each row's softmax
# denominator and takes its share of the weight. With the kernel's row lse, the sink's row is
#   lse' = logaddexp(lse, sink),  out' = out * exp(lse - lse'),
# and the gradients need no new kernel: the flash backward run with out' and lse' computes
# P' = exp(s - lse') and delta = rowsum(dout * out'), which are the sink-softmax's own, so
# dq, dk, dv come out right; the sink's gradient is -sum over rows of P'_sink * delta. Every
# backend gets sinks this way, forward and backward.


def _with_sinks(out, lse, sinks):
    """(out', lse') for sinks broadcast against lse. A row with no key keeps lse = +inf and
    out = 0 (all its weight goes to the sink)."""
    empty = torch.isinf(lse)
    merged = torch.logaddexp(lse.masked_fill(empty, -math.inf), sinks.float())
    factor = torch.exp(lse - merged).masked_fill(empty, 0.0)
    scaled = (out.float() * factor.unsqueeze(-1)).to(out.dtype)
    return _like(scaled, out), merged.masked_fill(empty, math.inf)


def _sinks_grad(dout, out, lse, sinks):
    """d loss / d sinks from the sink-adjusted out' and lse' (sinks broadcast against lse)."""
    delta = (dout.float() * out.float()).sum(-1)
    share = torch.exp(sinks.float() - lse)  # P'_sink per row; 0 where lse' = +inf
    grad = -(share * delta)
    dims = [i for i in range(grad.dim()) if sinks.shape[i] == 1]
    return grad.sum(dim=dims).reshape(-1).to(sinks.dtype)


# -- packed sequences (segment ids) on the varlen kernels -----------------------------------------
# Inside the custom ops, so the host-side offsets computed from the ids (a device sync on GPU)
# never enter a torch.compile graph: compiled models pass the (B, S) ids and get static shapes.


def _packed_offsets(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens over the B*S flattened rows (a sequence starts at each row start and where
    the id changes) and the longest sequence."""
    b, s = segment_ids.shape
    starts = torch.ones((b, s), dtype=torch.bool, device=segment_ids.device)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first = starts.flatten().nonzero().flatten()
    cu = torch.cat([first, first.new_full((1,), b * s)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B*S, H, D) contiguous; a view when t is a transposed (B, S, H, D)."""
    b, h, s, d = t.shape
    return t.transpose(1, 2).reshape(b * s, h, d).contiguous()


def _unrows(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    b, h, s, d = layout.shape
    return _like(t.view(b, s, h, d).transpose(1, 2), layout)


def _packed_fwd(backend, q, k, v, segment_ids, causal, scale, wl, wr, softcap):
    cu, longest = _packed_offsets(segment_ids)
    b, h, s, _ = q.shape
    out, lse = _impl(backend, q, varlen=True).attention_varlen_fwd(
        _rows(q), _rows(k), _rows(v), cu, cu, longest, longest, causal, scale, wl, wr, softcap)
    # varlen's lse is (H, B*S); the dense op's (B, H, S)
    return _unrows(out, q), lse.view(h, b, s).transpose(0, 1).contiguous()


def _packed_bwd(impl, dout, q, k, v, out, lse, segment_ids, causal, scale, wl, wr, softcap,
                det, **extra):
    cu, longest = _packed_offsets(segment_ids)
    b, h, s, _ = q.shape
    grads = impl.attention_varlen_bwd(
        _rows(dout), _rows(q), _rows(k), _rows(v), _rows(out),
        lse.transpose(0, 1).reshape(h, b * s).contiguous(), cu, cu, longest, longest, causal,
        scale, wl, wr, softcap, det, **extra)
    return tuple(_unrows(g, t) for g, t in zip(grads, (q, k, v)))


_attention_fwd.register_autograd(_backward_dense, setup_context=_setup_dense)


# -- varlen custom ops --------------------------------------------------------------------------


@custom_op("fastlm::attention_varlen_fwd")
def _attention_varlen_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    backend: str,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _impl(backend, q).attention_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        window_left, window_right, softcap,
    )
    if sinks is None:
        return out, lse
    out, lse = _with_sinks(out.transpose(0, 1), lse, sinks.view(-1, 1))  # (H, T, D), (H, T)
    return out.transpose(0, 1), lse


@_attention_varlen_fwd.register_fake
def _(q, k, v, *args):
    t, h, _ = q.shape
    return torch.empty_like(q), q.new_empty((h, t), dtype=torch.float32)


@custom_op("fastlm::attention_varlen_bwd")
def _attention_varlen_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    causal: bool,
    scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    deterministic: bool,
    backend: str,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = _impl(backend, q)
    extra = {"sinks": sinks} if sinks is not None and impl is _TorchBackend else {}
    return tuple(
        impl.attention_varlen_bwd(
            dout.contiguous(), q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
            max_seqlen_k, causal, scale, window_left, window_right, softcap, deterministic,
            **extra,
        )
    )


@_attention_varlen_bwd.register_fake
def _(dout, q, k, v, *args):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_varlen(ctx, inputs, output):
    q, k, v, cu_q, cu_k, *rest = inputs
    sinks = rest[9] if len(rest) > 9 else None
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, sinks)
    ctx.args = tuple(rest[:9])


def _backward_varlen(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, sinks = ctx.saved_tensors
    dq, dk, dv = _attention_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, sinks)
    dsinks = None
    if sinks is not None:
        dsinks = _sinks_grad(dout.transpose(0, 1), out.transpose(0, 1), lse, sinks.view(-1, 1))
    return (dq, dk, dv) + (None,) * 11 + (dsinks,)


_attention_varlen_fwd.register_autograd(_backward_varlen, setup_context=_setup_varlen)


# -- public API ---------------------------------------------------------------------------------


def _normalise(causal, window, softcap, scale, head_dim):
    left, right = checks.window_arg(window)
    if causal:
        right = 0  # causal is the window (inf, 0); kernels still receive causal=True
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return left, right, float(softcap), scale


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    deterministic: bool = False,
    backend: str | None = None,
    segment_ids: torch.Tensor | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scaled dot-product attention without materialising the (Sq, Sk) score matrix.

    Args:
        q: (B, Hq, Sq, D) queries. k, v: (B, Hkv, Sk, D) keys and values, Hq % Hkv == 0
            (grouped-query / multi-query attention). fp32, fp16 or bf16, all the same dtype and
            device; any strides (on CPU, tensors whose head dim is contiguous, such as
            transposed (B, S, H, D) views or slices of a fused QKV projection, are read in
            place; others are copied first).
        causal: mask future keys, aligned bottom-right when Sq != Sk: query i sees keys
            j <= i + Sk - Sq, as in KV-cache decoding (FlashAttention's convention).
        scale: multiplies q.k; defaults to 1/sqrt(D).
        key_padding_mask: (B, Sk) bool, True = attend. A query row that can attend to
            nothing returns 0 and gets zero gradients (never NaN).
        window: (left, right) sliding window around the query's aligned position; -1 means
            unbounded on that side. ``causal`` forces right = 0.
        softcap: if > 0, scores become ``softcap * tanh(scores / softcap)`` (Gemma-2).
        deterministic: bit-identical gradients from run to run on every backend.
        backend: "cuda", "triton", "cpu", "torch" or "auto" (default: $FASTLM_BACKEND_ATTENTION,
            then $FASTLM_BACKEND, then auto). A named backend that cannot run raises.
        segment_ids: (B, S) integer ids for sequences packed into batch rows (Sq == Sk == S):
            each run of equal consecutive ids in a row is one sequence, attending only within
            itself, with ``causal`` and ``window`` applied inside it (transformers' packing by
            position ids). Runs on the varlen kernels, offsets computed inside the op (one
            device sync on GPU); not combinable with ``key_padding_mask``.
        sinks: (Hq,) attention sinks (GPT-OSS's learned per-head logits): each joins its
            head's softmax as one more score with no value, so a row's weights sum to less
            than 1. Differentiable; any float dtype, on q's device.

    Returns:
        (B, Hq, Sq, D) tensor of q's dtype, dense in the dimension order of the q the kernel
        read (``torch.empty_like(q)``).
        Differentiable in q, k and v; accumulation is fp32.
    """
    q, k, v = autocast_inputs("lower", q, k, v)
    checks.check_dense(q, k, v, key_padding_mask, segment_ids)
    checks.check_sinks(sinks, q, heads_dim=1)
    left, right, softcap, scale = _normalise(causal, window, softcap, scale, q.shape[-1])
    mask = None if key_padding_mask is None else key_padding_mask.contiguous()
    if segment_ids is not None:  # the packed path makes its own (B*S, H, D) rows
        qkv = (q, k, v)
        segment_ids = segment_ids.contiguous()
    else:
        qkv = _kernel_layout(q, k, v, backend)
    out, _ = _attention_fwd(
        *qkv, mask, segment_ids, bool(causal), scale, left, right, softcap,
        bool(deterministic), backend or "", None if sinks is None else sinks.contiguous(),
    )
    return out


def attention_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    causal: bool = False,
    scale: float | None = None,
    window: tuple[int, int] | None = None,
    softcap: float = 0.0,
    deterministic: bool = False,
    backend: str | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention over packed variable-length sequences (no padding).

    q: (total_q, Hq, D), k/v: (total_k, Hkv, D). Sequence i occupies rows
    ``cu_seqlens[i]:cu_seqlens[i+1]`` (int32 offsets starting at 0, length N+1); sequences
    attend only within themselves. Other arguments and the result as in :func:`attention`;
    returns (total_q, Hq, D).
    """
    q, k, v = autocast_inputs("lower", q, k, v)
    checks.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    checks.check_sinks(sinks, q, heads_dim=1)
    left, right, softcap, scale = _normalise(causal, window, softcap, scale, q.shape[-1])
    out, _ = _attention_varlen_fwd(
        q.contiguous(), k.contiguous(), v.contiguous(), cu_seqlens_q.contiguous(),
        cu_seqlens_k.contiguous(), int(max_seqlen_q), int(max_seqlen_k), bool(causal), scale,
        left, right, softcap, bool(deterministic), backend or "",
        None if sinks is None else sinks.contiguous(),
    )
    return out
