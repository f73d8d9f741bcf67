"""``fastlm.patch(model)``: swap fastlm's fused kernels into one transformers model instance.

One generic mechanism, one declarative table. Modules are matched by class name (the table
below); a match gets an instance-level ``forward`` that calls the fused op with the module's
own parameters, so nothing global changes (no class attribute, nothing in
``torch.nn.functional``), other instances of the same model class are untouched, and
``undo()`` deletes the instance attribute to restore the class's forward. DeepSpeed ZeRO-3's
parameter gathering hooks on the module still run around the new forward.

What is swapped per model type (``PATCH_TABLE`` drives ``patch`` and the README table):
attention via ``attn_implementation="fastlm"``; RMSNorm/LayerNorm; the MLP activation, fused
with the gate product where the MLP is gated (SwiGLU/GeGLU). Rotary embeddings and the fused
linear cross-entropy are not in this version: requested, they are reported as skipped.
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch

logger = logging.getLogger("fastlm")

# model_type -> what its modules are, so the table can be read without running anything.
PATCH_TABLE = {
    "gpt2": {"norm": "LayerNorm", "mlp": "GELU (tanh) activation"},
    "llama": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)"},
    "mistral": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)"},
    "qwen2": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)"},
    "qwen3": {"norm": "RMSNorm (+ q/k norms)", "mlp": "SwiGLU (gate/up/down)"},
    "gemma": {"norm": "RMSNorm (1 + weight)", "mlp": "GeGLU tanh (gate/up/down)"},
    "phi3": {"norm": "RMSNorm", "mlp": "SwiGLU (fused gate_up_proj)"},
    "gpt_neox": {"norm": "LayerNorm", "mlp": "GELU activation"},
    "opt": {"norm": "LayerNorm", "mlp": "ReLU: left alone (nothing to fuse)"},
    "bert": {"norm": "LayerNorm", "mlp": "GELU activation"},
}

_GELU_TANH = {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"}
_GELU_ERF = {"GELUActivation"}
_SILU = {"SiLUActivation", "SiLU"}


@dataclass
class PatchHandle:
    """What :func:`patch` changed on one model; ``undo()`` restores it."""

    model: torch.nn.Module
    swapped: dict = field(default_factory=dict)  # kind -> number of modules swapped
    skipped: dict = field(default_factory=dict)  # kind -> reason
    _modules: list = field(default_factory=list)
    _attn_before: str | None = None

    def undo(self) -> None:
        for m in self._modules:
            if "forward" in m.__dict__:
                del m.forward
            m.__dict__.pop("_fastlm_patched", None)
        self._modules.clear()
        if self._attn_before is not None:
            self.model.set_attn_implementation(self._attn_before)
            self._attn_before = None
        self.model.__dict__.pop("_fastlm_patch", None)

    def summary(self) -> str:
        done = ", ".join(f"{k}: {n}" for k, n in self.swapped.items()) or "nothing"
        left = "; ".join(f"{k}: {r}" for k, r in self.skipped.items())
        return f"fastlm.patch swapped {done}" + (f"; left alone: {left}" if left else "")


def patch(model: torch.nn.Module, *, attention: bool = True, norms: bool = True,
          loss: bool = True, rope: bool = True, mlp: bool = True,
          verbose: bool = False) -> PatchHandle:
    """Swap every fused kernel that applies into ``model`` (per instance, idempotent: a
    second call returns the first call's handle). Returns a :class:`PatchHandle`."""
    existing = model.__dict__.get("_fastlm_patch")
    if existing is not None:
        return existing
    h = PatchHandle(model)
    if attention:
        _patch_attention(model, h)
    inside_gated = set()  # activation modules a fused gated MLP no longer calls
    for _name, module in model.named_modules():
        if getattr(module, "_fastlm_patched", False) or id(module) in inside_gated:
            continue
        fwd, kind = None, None
        if norms:
            fwd, kind = _norm_forward(module), "norms"
        if fwd is None and mlp:
            fwd, kind = _mlp_forward(module), "mlp"
        if fwd is None:
            continue
        if kind == "mlp":
            inside_gated.update(id(c) for c in module.children())
        module.forward = types.MethodType(fwd, module)
        module._fastlm_patched = True
        h._modules.append(module)
        h.swapped[kind] = h.swapped.get(kind, 0) + 1
    if rope:
        h.skipped["rope"] = "fused rotary embeddings are not in this version of fastlm"
    if loss:
        h.skipped["loss"] = "the fused linear cross-entropy is not in this version of fastlm"
    model.__dict__["_fastlm_patch"] = h
    if verbose:
        logger.warning(h.summary())
    return h


def _patch_attention(model, h: PatchHandle) -> None:
    if not hasattr(model, "set_attn_implementation"):
        h.skipped["attention"] = "not a transformers model (no set_attn_implementation)"
        return
    from fastlm.integrations import transformers as hf

    hf.register()
    before = getattr(model.config, "_attn_implementation", None) or "eager"
    if before == hf.NAME:
        return
    try:
        model.set_attn_implementation(hf.NAME)
    except Exception as exc:  # an architecture without the attention interface
        h.skipped["attention"] = f"{type(model).__name__} refused it ({exc})"
        return
    h._attn_before = before
    h.swapped["attention"] = 1


# -- norms ----------------------------------------------------------------------------------


def _norm_forward(m):
    from fastlm.ops import layer_norm, rms_norm

    cls = type(m).__name__
    if cls.endswith("RMSNorm") and isinstance(getattr(m, "weight", None), torch.nn.Parameter):
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if eps is None or m.weight.dim() != 1:
            return None
        offset = 1.0 if cls.startswith("Gemma") else 0.0  # Gemma stores weight - 1

        def rms_forward(self, x):
            return rms_norm(x, self.weight, float(eps), offset=offset)

        return rms_forward
    if isinstance(m, torch.nn.LayerNorm) and len(m.normalized_shape) == 1:

        def ln_forward(self, x):
            return layer_norm(x, self.weight, self.bias, self.eps)

        return ln_forward
    return None


# -- MLP ------------------------------------------------------------------------------------


def _act_kind(act) -> str | None:
    cls = type(act).__name__
    if cls in _GELU_TANH or (isinstance(act, torch.nn.GELU) and act.approximate == "tanh"):
        return "gelu_tanh"
    if cls in _GELU_ERF or (isinstance(act, torch.nn.GELU) and act.approximate == "none"):
        return "gelu"
    if cls in _SILU:
        return "silu"
    return None


def _mlp_forward(m):
    from fastlm.ops import geglu, gelu, silu, swiglu

    act = getattr(m, "act_fn", None) or getattr(m, "activation_fn", None)
    kind = _act_kind(act) if act is not None else None
    gated = kind in ("silu", "gelu_tanh")
    if gated and all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj")):
        fused = swiglu if kind == "silu" else geglu

        def gated_forward(self, x):
            return self.down_proj(fused(self.gate_proj(x), self.up_proj(x)))

        return gated_forward
    if gated and hasattr(m, "gate_up_proj") and hasattr(m, "down_proj"):
        fused = swiglu if kind == "silu" else geglu

        def phi3_forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(fused(gate, up))

        return phi3_forward
    # a bare activation module (GPT-2, GPT-NeoX, BERT): replace its own forward
    own = _act_kind(m)
    if own is not None and not list(m.children()):
        if own == "silu":
            return lambda self, x: silu(x)
        approx = "tanh" if own == "gelu_tanh" else "none"
        return lambda self, x: gelu(x, approx)
    return None
