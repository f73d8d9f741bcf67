"""The attention function registered as ``"fastlm"`` in transformers' ``AttentionInterface``.

transformers calls it from every attention layer as
``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
query (B, Hq, Sq, D) and key/value (B, Hkv, Sk, D) (GQA, already including the KV cache), and
expects ``(out (B, Sq, Hq, D), weights or None)``. The mask is what :mod:`._hf_mask` built:
a :class:`FastlmMask` for patterns the kernels compute, else a dense tensor.

A call the kernels cannot serve exactly goes to transformers' own sdpa function (or the model's
eager function when attention weights, soft-capping or attention sinks are needed there), with
one warning per reason. Attention sinks (GPT-OSS's ``s_aux``) run in the kernels.
Never a silently different result.
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch
import torch.nn.functional as F
from transformers import masking_utils as mu
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface
from transformers.utils import output_capturing as _capturing

from fastlm.integrations import transformers as hf
from fastlm.integrations._hf_mask import FastlmMask, fastlm_mask, to_additive
from fastlm.ops.attention import attention

__all__ = ["attention_forward", "register_with_transformers"]

_logger = logging.getLogger("fastlm")
_warned: set[str] = set()
# Arguments some models pass that change the result and that the kernels do not take.
_UNSUPPORTED_KWARGS = ("position_bias", "cache", "attention_bias")


def register_with_transformers() -> None:
    """Register the attention function and its mask function as ``"fastlm"``; idempotent."""
    AttentionInterface.register(hf.NAME, attention_forward)
    mu.AttentionMaskInterface.register(hf.NAME, fastlm_mask)
    hf._mark_registered()


def _warn_once(reason: str, path: str) -> None:
    if torch.compiler.is_compiling():
        _warn_while_tracing(reason, path)
    else:
        _emit(reason, path)


def _emit(reason: str, path: str) -> bool:
    if reason not in _warned:
        _warned.add(reason)
        _logger.warning(
            "fastlm attention: %s is not supported by the fused kernel; those calls use "
            "transformers' %s attention instead (correct, not fused).", reason, path,
        )
    return True


# Dynamo cannot trace a logger call (the graph breaks); a function whose result it takes as a
# constant runs for real, once, while the graph is traced.
_warn_while_tracing = torch._dynamo.assume_constant_result(_emit)


def _wants_weights(module, kwargs) -> bool:
    config = getattr(module, "config", None)
    if kwargs.get("output_attentions", getattr(config, "output_attentions", False)):
        return True
    # Models whose forward records outputs with hooks (GPT-2 and most in transformers 5) drop
    # output_attentions before the layers see it: what they will record says it instead
    # (transformers' sdpa returns no weights there, and the model silently returns none).
    collector = getattr(_capturing, "_active_collector", None)
    if collector is None or torch.compiler.is_compiling():  # a ContextVar breaks the graph
        return False
    recording = collector.get()
    return bool(recording) and "attentions" in recording


def _fallback_reason(module, query, key, value, mask, dropout, kwargs) -> str | None:
    """Why this call cannot run in the kernel, or None if it can."""
    if _wants_weights(module, kwargs):
        return "output_attentions=True"
    if dropout and dropout > 0.0:
        return "attention dropout (p > 0, training)"
    for name in _UNSUPPORTED_KWARGS:
        if kwargs.get(name) is not None:
            return f"the argument {name!r}"
    if isinstance(mask, torch.Tensor):
        if torch.compiler.is_compiling():
            return ("under torch.compile, a mask transformers builds from closures it cannot "
                    "read while tracing (packed-sequence checks, sliding windows, overlays)")
        return "a custom or dense attention mask (4D mask, chunked/blockwise, custom overlays)"
    if mask is not None and not isinstance(mask, FastlmMask):
        return f"an attention mask of type {type(mask).__name__}"
    if isinstance(mask, FastlmMask):
        if key.shape[2] != mask.kv_length:
            return "keys not covered by the mask (cache length mismatch)"
    elif query.shape[2] not in (1, key.shape[2]) and _module_causal(module, kwargs):
        return "a causal call without a mask where queries and keys differ in length"
    return None


def _sinks(kwargs) -> torch.Tensor | None:
    """GPT-OSS's attention sinks (``s_aux``; ``sinks`` in some kernels' naming)."""
    sinks = kwargs.get("s_aux")
    return kwargs.get("sinks") if sinks is None else sinks


def _module_causal(module, kwargs) -> bool:
    is_causal = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-interface signature; returns ((B, Sq, Hq, D), None)."""
    reason = _fallback_reason(module, query, key, value, attention_mask, dropout, kwargs)
    if reason is not None:
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling,
                         softcap, kwargs)
    if isinstance(attention_mask, FastlmMask):
        m = attention_mask
        key, value = key[:, :, : m.kv_used], value[:, :, : m.kv_used]  # static cache tail
        causal, window, padding = m.causal, m.window, m.key_padding_mask
        segments = m.segment_ids
    else:  # the model built no mask: no padding; causality is the module's
        causal, window, padding = _module_causal(module, kwargs), None, None
        segments = None
    dv = value.shape[-1]
    query, key, value, scaling = _same_head_dims(query, key, value, scaling)
    out = attention(
        query, key, value, causal=causal, scale=scaling, key_padding_mask=padding,
        window=window, softcap=float(softcap or 0.0), segment_ids=segments,
        sinks=_sinks(kwargs),
    )  # (B, Hq, Sq, D)
    return out[..., :dv].transpose(1, 2), None


def _same_head_dims(query, key, value, scaling):
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, Kimi-Linear, GLM-4.7-Flash) has
    values narrower than queries and keys (128 against 192 in DeepSeek-V3); the kernels take
    one head dim, and these calls fell back to sdpa. Zeros pad the narrower side: padded value
    columns give output columns of zeros (sliced off by the caller), padded query/key columns
    add nothing to the scores, whose scale stays the one of the real query dim."""
    dqk, dv = query.shape[-1], value.shape[-1]
    if dqk == dv:
        return query, key, value, scaling
    scaling = dqk ** -0.5 if scaling is None else scaling
    if dv < dqk:
        return query, key, F.pad(value, (0, dqk - dv)), scaling
    return F.pad(query, (0, dv - dqk)), F.pad(key, (0, dv - dqk)), value, scaling


# -- fallbacks ------------------------------------------------------------------------------------


def _fallback(reason, module, query, key, value, mask, dropout, scaling, softcap, kwargs):
    needs_eager = bool(softcap) or _wants_weights(module, kwargs) or any(
        kwargs.get(name) is not None for name in ("s_aux", "sinks")
    )
    kwargs = {k: v for k, v in kwargs.items() if k != "output_attentions"}
    dense = mask.dense() if isinstance(mask, FastlmMask) else mask
    if needs_eager:
        _warn_once(reason, "eager")
        additive = None if dense is None else to_additive(dense, query.dtype)
        eager = _model_eager(module, softcap)
        return eager(module, query, key, value, additive, dropout=dropout, scaling=scaling,
                     softcap=softcap, **kwargs)
    _warn_once(reason, "sdpa")
    return sdpa_attention_forward(module, query, key, value, dense, dropout=dropout,
                                  scaling=scaling, **kwargs)


def _model_eager(module, softcap):
    """The model's own eager function (exactly what attn_implementation="eager" runs).

    Used only if it takes every feature in play (a ``softcap`` parameter when soft-capping),
    else the generic :func:`eager_attention`.
    """
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        return eager_attention
    if softcap and "softcap" not in inspect.signature(fn).parameters:
        return eager_attention
    return fn


def eager_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                    softcap=None, **kwargs):
    """Plain attention returning weights: (B, Sq, Hq, D) and (B, Hq, Sq, Sk)."""
    group = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, Hq, Sq, Sk)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[2]]
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return out, weights


register_with_transformers()  # importing this module is what registers (see transformers.py)
