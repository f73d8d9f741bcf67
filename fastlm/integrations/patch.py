"""``fastlm.patch(model)``: swap fastlm's fused kernels into one transformers model instance.

One generic mechanism, one declarative table. Modules are matched by class name (the table
below); a match gets an instance-level ``forward`` that calls the fused op with the module's
own parameters, so nothing global changes (no class attribute, nothing in
``torch.nn.functional``), other instances of the same model class are untouched, and
``undo()`` deletes the instance attribute to restore the class's forward. DeepSpeed ZeRO-3's
parameter gathering hooks on the module still run around the new forward.

What is swapped per model type (``PATCH_TABLE`` drives ``patch`` and the README table):
attention via ``attn_implementation="fastlm"``; RMSNorm/LayerNorm; the MLP activation, fused
with the gate product where the MLP is gated (SwiGLU/GeGLU); rotary embeddings in every
attention module that applies them (fastlm/integrations/_patch_rope.py: the one place a
behaviour-neutral dispatcher is installed in the modeling file); the fused linear
cross-entropy in training with labels (fastlm/integrations/_patch_loss.py, ZeRO-3 safe).
"""

from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch

from fastlm.integrations._forward import foreign_forward, install_forward, remove_forward
from fastlm.integrations._patch_loss import (
    loss_function,
    loss_unsupported,
    mlm_forward,
    mlm_head,
    model_forward,
    set_head_forward,
)
from fastlm.integrations._patch_probe import disagrees as _disagrees
from fastlm.integrations._patch_rope import rope_forward, rope_target
from fastlm.integrations.transformers import quiet

logger = logging.getLogger("fastlm")

# model_type -> what its modules are, so the table can be read without running anything.
PATCH_TABLE = {
    "gpt2": {"norm": "LayerNorm", "mlp": "GELU (tanh) activation", "rope": "none (learned)",
             "loss": "fused"},
    "llama": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)", "rope": "fused",
              "loss": "fused"},
    "mistral": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)", "rope": "fused",
                "loss": "fused"},
    "qwen2": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)", "rope": "fused",
              "loss": "fused"},
    "qwen3": {"norm": "RMSNorm (+ q/k norms)", "mlp": "SwiGLU (gate/up/down)", "rope": "fused",
              "loss": "fused"},
    "gemma": {"norm": "RMSNorm (1 + weight)", "mlp": "GeGLU tanh (gate/up/down)",
              "rope": "fused", "loss": "fused"},
    "phi3": {"norm": "RMSNorm", "mlp": "SwiGLU (fused gate_up_proj)", "rope": "fused (partial)",
             "loss": "fused"},
    "gpt_neox": {"norm": "LayerNorm", "mlp": "GELU: left alone (one torch kernel already)",
                 "rope": "fused (partial)", "loss": "fused"},
    "opt": {"norm": "LayerNorm", "mlp": "ReLU: left alone (nothing to fuse)",
            "rope": "none (learned)", "loss": "fused"},
    "bert": {"norm": "LayerNorm", "mlp": "GELU: left alone (one torch kernel already)",
             "rope": "none (learned)", "loss": "fused masked-LM head (labelled positions only)"},
    # the same mechanism on more architectures (tests/integrations/test_patch.py)
    "gemma2": {"norm": "RMSNorm (1 + weight), pre and post", "mlp": "GeGLU tanh (gate/up/down)",
               "rope": "fused", "loss": "fused, with its final-logit soft-capping"},
    "gemma3_text": {"norm": "RMSNorm (1 + weight), pre and post (+ q/k norms)",
                    "mlp": "GeGLU tanh (gate/up/down)", "rope": "fused",
                    "loss": "fused, with its final-logit soft-capping"},
    "starcoder2": {"norm": "LayerNorm", "mlp": "GELU: left alone (one torch kernel already)",
                   "rope": "fused", "loss": "fused"},
    "olmo2": {"norm": "RMSNorm (+ q/k norms)", "mlp": "SwiGLU (gate/up/down)", "rope": "fused",
              "loss": "fused"},
    "phi": {"norm": "LayerNorm", "mlp": "GELU (tanh) activation", "rope": "fused (partial)",
            "loss": "fused"},
    "stablelm": {"norm": "LayerNorm", "mlp": "SwiGLU (gate/up/down)", "rope": "fused (partial)",
                 "loss": "fused"},
    "falcon": {"norm": "LayerNorm", "mlp": "GELU: left alone (one torch kernel already)",
               "rope": "fused", "loss": "fused"},
    "granite": {"norm": "RMSNorm", "mlp": "SwiGLU (gate/up/down)", "rope": "fused",
                "loss": "fused (its logits_scaling applied to the hidden states)"},
    "mixtral": {"norm": "RMSNorm", "mlp": "experts left alone (stacked expert weights)",
                "rope": "fused", "loss": "fused (+ HF's router loss)"},
    "qwen3_moe": {"norm": "RMSNorm (+ q/k norms)",
                  "mlp": "experts left alone (stacked expert weights)", "rope": "fused",
                  "loss": "fused (+ HF's router loss)"},
    "gpt_oss": {"norm": "RMSNorm", "mlp": "experts left alone (stacked expert weights)",
                "rope": "fused (half-width tables)", "loss": "fused (+ HF's router loss)"},
    "cohere": {"norm": "LayerNorm (its own class, no bias)", "mlp": "SwiGLU (gate/up/down)",
               "rope": "fused (interleaved pairs)",
               "loss": "fused (its logit_scale applied to the hidden states)"},
    "glm": {"norm": "RMSNorm", "mlp": "SwiGLU (fused gate_up_proj)",
            "rope": "fused (interleaved pairs, partial)", "loss": "fused"},
    "modernbert": {"norm": "LayerNorm", "mlp": "GELU: left alone (one torch kernel already)",
                   "rope": "fused", "loss": "left alone (not a BERT-style MLM head)"},
    "gptj": {"norm": "LayerNorm", "mlp": "GELU (tanh) activation",
             "rope": "left alone (GPT-J's own function)", "loss": "fused"},
}

_GELU_TANH = {"NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "GELUPytorchTanh"}
_GELU_ERF = {"GELUActivation"}
_SILU = {"SiLUActivation", "SiLU"}
# Standalone activations worth swapping: those transformers computes as a chain of elementwise
# ops (NewGELUActivation: pow, mul, add, tanh, ... five passes and their saved temporaries).
# The others already call one torch kernel (F.gelu, F.silu); a fused op saves no pass there
# and its Python wrapper only adds time (measured: BERT/GPT-NeoX steps 1-2% slower on CPU).
_COMPOSITE_ACTIVATIONS = {"NewGELUActivation"}  # tanh-approximated GELU


@dataclass
class PatchHandle:
    """What :func:`patch` changed on one model; ``undo()`` restores it."""

    model: torch.nn.Module
    swapped: dict = field(default_factory=dict)  # kind -> number of modules swapped
    skipped: dict = field(default_factory=dict)  # kind -> reason
    _modules: list = field(default_factory=list)
    _restore: list = field(default_factory=list)  # callables that put other state back
    _attn_before: str | None = None

    def undo(self) -> None:
        for restore in reversed(self._restore):
            restore(self.model)
        self._restore.clear()
        for m in self._modules:
            remove_forward(m)
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
    rope_refused = None  # why a modeling file's rotary function was left alone
    probed = {}  # (class, kind, parameter layout, plain attributes) -> the probe's verdict
    for _name, module in model.named_modules():
        if getattr(module, "_fastlm_patched", False) or id(module) in inside_gated:
            continue
        fwd, kind = None, None
        if norms:
            fwd, kind = _norm_forward(module), "norms"
        if fwd is None and mlp:
            fwd, kind = _mlp_forward(module), "mlp"
            if fwd is None and _act_kind(module) is not None and not list(module.children()):
                h.skipped["mlp"] = (f"{type(module).__name__} is one torch kernel already "
                                    "(a standalone activation has nothing to fuse)")
        if fwd is not None and (owner := foreign_forward(module)) is not None:
            h.skipped[f"{kind}: {type(module).__name__}"] = (
                f"its forward is replaced on the instance by {owner}: left to it")
            continue
        if fwd is not None:
            # a class's forward is one piece of code: probed once per parameter layout and
            # plain attributes (flags, eps), not for each of a 7B model's 32 identical MLPs
            # (each probe runs the module twice, on the CPU a second or so for all of them)
            key = (type(module), kind, tuple((p.shape, p.dtype) for p in module.parameters()),
                   tuple(sorted((k, v) for k, v in vars(module).items()
                                if isinstance(v, (bool, int, float, str)))))
            if key not in probed:
                probed[key] = _disagrees(module, fwd)
            if probed[key] is not None:
                h.skipped[f"{kind}: {type(module).__name__}"] = probed[key]
                continue
        if fwd is None and rope:
            modeling, why = rope_target(module)
            if modeling is not None:
                fwd, kind = rope_forward(module, modeling), "rope"
            rope_refused = rope_refused or why
        if fwd is None:
            continue
        if kind == "mlp":
            inside_gated.update(id(c) for c in module.children())
        _set_forward(h, module, fwd)
        h.swapped[kind] = h.swapped.get(kind, 0) + 1
    if rope and "rope" not in h.swapped:
        h.skipped["rope"] = rope_refused or ("no attention module applies rotary embeddings "
                                             "(learned positions?)")
    if loss:
        _patch_loss(_loss_owner(model), h)
    model.__dict__["_fastlm_patch"] = h
    if verbose:
        logger.warning(h.summary())
    return h


def _set_forward(h: PatchHandle, module, fwd) -> None:
    install_forward(module, fwd)
    h._modules.append(module)


def _loss_owner(model):
    """The model whose forward computes the loss: a PEFT wrapper's base model (its own forward
    only passes the call on, and the base's calls its own loss_function)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _own_loss_function(model):
    """``model.loss_function``, read without transformers' warning "`loss_type=None` was set
    in the config but it is unrecognized. Using the default loss: `ForCausalLMLoss`": it
    comes for every model whose class name carries no loss type (GPT-2's ``LMHeadModel``
    classes), names the loss it falls back to (the right one), and reading it here is not
    the user's doing (every patched GPT-2, every demo run, printed it)."""
    with quiet("transformers.modeling_utils"):
        return model.loss_function


def _patch_loss(model, h: PatchHandle) -> None:
    if model is not h.model and "_fastlm_patch" in model.__dict__:
        h.skipped["loss"] = "the base model was patched on its own (its handle has the loss)"
        return
    reason = loss_unsupported(model)
    if reason is None:
        head = mlm_head(model) or model.get_output_embeddings()
        for module, what in ((model, "the model"), (head, "its output embedding")):
            owner = foreign_forward(module) if module is not None else None
            if owner is not None:
                reason = f"the forward of {what} is replaced on the instance by {owner}"
                break
    if reason is not None:
        h.skipped["loss"] = reason
        return
    mlm = mlm_head(model)
    if mlm is not None:  # masked LM: the loss is computed inline, not by loss_function
        set_head_forward(h, mlm)
        _set_forward(h, model, mlm_forward(model))
        h.swapped["loss"] = 1
        return
    set_head_forward(h, model.get_output_embeddings())
    _set_forward(h, model, model_forward(model))
    # bound to the model, and reading the model's own state, so that a deepcopy of the model
    # (a reference model, an EMA copy) runs on the copy's modules
    model.__dict__["_fastlm_loss_original"] = _own_loss_function(model)
    had_own = "_loss_function" in model.__dict__
    before = model.__dict__.get("_loss_function")
    model._loss_function = types.MethodType(loss_function, model)

    if model is not h.model:  # patch(base) then returns this handle too
        model.__dict__["_fastlm_patch"] = h

    def restore(model):  # the handle's model: a deepcopy's handle restores the copy
        model = _loss_owner(model)
        if model is not h.model:
            model.__dict__.pop("_fastlm_patch", None)
        model.__dict__.pop("_fastlm_loss_original", None)
        if had_own:
            model._loss_function = before
        else:
            model.__dict__.pop("_loss_function", None)

    h._restore.append(restore)
    h.swapped["loss"] = 1


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
    if getattr(model.config, "_attn_implementation", None) != hf.NAME:
        # some models (GPT-Neo) only log that they cannot switch, and keep their own attention
        h.skipped["attention"] = (f"{type(model).__name__} kept attn_implementation={before!r} "
                                  "(it does not use transformers' attention interface)")
        return
    h._attn_before = before
    h.swapped["attention"] = 1


# -- norms ----------------------------------------------------------------------------------

# bf16 LayerNorm on the CPU from this many elements: fastlm's kernel (fp32 math on the bf16
# rows) beats aten's there, fwd + bwd 1.25-1.47x at 768-4096 x 1024 (fused_cpu,
# fused_cpu_xeon_amx), and its wrapper's ~0.1 ms no longer decides; at 1024 x 256 they were
# at parity. (fp32: parity at every size measured; fp16 on CPU: not measured.)
_CPU_LN_MIN_ELEMENTS = 1 << 19


def _cpu_ln_pays(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.numel() >= _CPU_LN_MIN_ELEMENTS


def _norm_forward(m):
    from fastlm.ops import rms_norm

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
        return _ln_forward(m.normalized_shape, "eps", has_bias=True, native_ok=True)
    # a model's own LayerNorm class written as a chain of ops (Cohere's: mean, variance,
    # rsqrt, product in fp32, no bias): the probe in patch() confirms it is a LayerNorm
    weight = getattr(m, "weight", None)
    eps_attr = "variance_epsilon" if hasattr(m, "variance_epsilon") else "eps"
    if (cls.endswith("LayerNorm") and isinstance(weight, torch.nn.Parameter)
            and weight.dim() == 1 and isinstance(getattr(m, eps_attr, None), float)):
        bias = getattr(m, "bias", None)
        has_bias = isinstance(bias, torch.nn.Parameter) and bias.shape == weight.shape
        return _ln_forward((weight.shape[0],), eps_attr, has_bias, native_ok=False)
    return None


def _ln_forward(shape, eps_attr: str, has_bias: bool, native_ok: bool):
    """A LayerNorm forward over the module's weight, bias (if has_bias) and eps attribute.
    ``native_ok``: the module is torch's LayerNorm, whose own kernel may stand in for fastlm's
    at any dtype; a model's own class (DeBERTa's, Cohere's) computes in fp32, and torch's
    16-bit kernel is not that (below)."""
    from fastlm.ops import layer_norm

    def ln_forward(self, x):
        bias, eps = self.bias if has_bias else None, getattr(self, eps_attr)
        if x.device.type == "cpu" and not _cpu_ln_pays(x) and (
                native_ok or x.dtype == torch.float32):
            # torch's CPU LayerNorm is already one fused pass each way: in fp32, and on small
            # bf16 inputs, fastlm's kernel runs at parity with it and the custom-op wrapper
            # only adds time (GPT-2/NeoX/BERT steps 5% slower). Where fastlm's kernel wins
            # (GPUs, Triton, large bf16 inputs on CPU) it runs. Not for a model's own fp32
            # LayerNorm in bf16: torch's bf16 backward gave DeBERTa's weight and bias
            # gradients 2.5-3x the error of the model's own fp32 code (fastlm's kernel, fp32
            # throughout: the model's error).
            return torch.nn.functional.layer_norm(x, shape, self.weight, bias, eps)
        return layer_norm(x, self.weight, bias, eps)

    return ln_forward


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
    from fastlm.ops import geglu, gelu, swiglu

    act = getattr(m, "act_fn", None) or getattr(m, "activation_fn", None)
    kind = _act_kind(act) if act is not None else None
    # a dropout inside the MLP (T5Gemma's, GTE's) would be skipped by the fused forward in
    # training, and a probe in eval mode cannot see that
    gated = kind in ("silu", "gelu_tanh") and not any(
        isinstance(c, torch.nn.Dropout) and c.p > 0 for c in m.modules())
    # the projections must be modules (Linear, or a LoRA/quantised wrapper) taking x: a
    # mixture of experts' stacked weights (Mixtral/Qwen-MoE "experts": 3D parameters, a
    # forward taking the routing too) are not an MLP to fuse here
    if gated and all(isinstance(getattr(m, a, None), torch.nn.Module)
                     for a in ("gate_proj", "up_proj", "down_proj")):
        fused = swiglu if kind == "silu" else geglu

        def gated_forward(self, x):
            return self.down_proj(fused(self.gate_proj(x), self.up_proj(x)))

        return gated_forward
    if gated and all(isinstance(getattr(m, a, None), torch.nn.Module)
                     for a in ("gate_up_proj", "down_proj")):
        fused = swiglu if kind == "silu" else geglu

        def phi3_forward(self, x):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(fused(gate, up))

        return phi3_forward
    # a bare activation module (GPT-2): replace its own forward where HF's is composite
    if type(m).__name__ in _COMPOSITE_ACTIVATIONS and not list(m.children()):
        return lambda self, x: gelu(x, "tanh")
    return None
