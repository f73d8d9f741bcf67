"""Rotary embeddings for ``fastlm.patch``.

transformers applies RoPE through a module-level function of each modeling file
(``modeling_llama.apply_rotary_pos_emb`` ...), called from the attention module's forward, so
there is no per-instance hook. fastlm puts a dispatcher in that one name, once per modeling
file: it calls the fused op only while a *patched* attention module is running (a context
variable its instance forward sets) and the original function otherwise. Unpatched models,
including other instances of the same class, keep HF's code path exactly; ``undo()`` removes
the instance forward, after which the dispatcher only passes calls through.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys

import torch

_ACTIVE = contextvars.ContextVar("fastlm_rope_active", default=False)
_NAME = "apply_rotary_pos_emb"


def rope_target(module: torch.nn.Module):
    """The modeling file whose ``apply_rotary_pos_emb`` this attention module calls, or None."""
    forward = inspect.unwrap(type(module).forward)
    code = getattr(forward, "__code__", None)
    if code is None or _NAME not in code.co_names:
        return None
    modeling = sys.modules.get(type(module).__module__)
    return modeling if callable(getattr(modeling, _NAME, None)) else None


def _install(modeling) -> None:
    original = getattr(modeling, _NAME)
    if getattr(original, "_fastlm_dispatch", False):
        return

    @functools.wraps(original)
    def dispatch(q, k, cos, sin, *args, **kwargs):
        # Only HF's standard form: (B, H, S, D) q/k, (B, S, R) tables unsqueezed at dim 1.
        if (_ACTIVE.get() and not args and kwargs.get("unsqueeze_dim", 1) == 1
                and cos.dim() == 3 and q.dim() == 4 and k.dim() == 4):
            from fastlm.ops import rotary

            return rotary(q, k, cos, sin)
        return original(q, k, cos, sin, *args, **kwargs)

    dispatch._fastlm_dispatch = True
    setattr(modeling, _NAME, dispatch)


def rope_forward(module: torch.nn.Module, modeling):
    """An instance forward for an attention module (``modeling``: its :func:`rope_target`)
    that turns the fused RoPE on around the class's own forward (same signature, for anything
    that inspects it)."""
    _install(modeling)
    cls_forward = type(module).forward

    @functools.wraps(cls_forward)
    def forward(self, *args, **kwargs):
        token = _ACTIVE.set(True)
        try:
            return cls_forward(self, *args, **kwargs)
        finally:
            _ACTIVE.reset(token)

    return forward
