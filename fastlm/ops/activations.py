"""GELU / SiLU and the gated MLP units (SwiGLU, GeGLU): one public function each, backends
side by side (``triton``, ``cpu``, ``torch``), one dispatch rule (fastlm/ops/_fused_common.py).

Fusing saves memory traffic, and on the CPU it also saves time where it matters: GPT-2's
tanh-GELU written in PyTorch is six elementwise passes (pow, mul, add, tanh, ...), and torch's
own ``gelu(approximate="tanh")`` kernel is not vectorised on AVX2 builds; one pass with a
vectorised tanh replaces both. The backward recomputes the activation from the saved input.
"""

from __future__ import annotations

import torch

from fastlm._custom_op import custom_op
from fastlm.ops import _fused_common as fc
from fastlm.ops import reference
from fastlm.ops._autocast import autocast_inputs

__all__ = ["gelu", "silu", "swiglu", "geglu", "ACT_CODES"]

# the kernels' activation codes (csrc/cpu/activations.h, triton_kernels/activations.py)
ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


_KIND = {code: name for name, code in ACT_CODES.items()}


def _act_and_grad(x: torch.Tensor, act: int):
    """(act(x), act'(x)) from the shared reference; written out rather than autograd, because
    custom-op bodies run below autograd."""
    return reference.activation_and_grad_ref(x, _KIND[act])


class _TorchActivations:
    """The references as a backend: fp32 math (fp64 for fp64 inputs)."""

    @staticmethod
    def act_fwd(x, act):
        return _act_and_grad(x.to(fc.compute_dtype(x)), act)[0].to(x.dtype)

    @staticmethod
    def act_bwd(dy, x, act):
        dt = fc.compute_dtype(x)
        return (dy.to(dt) * _act_and_grad(x.to(dt), act)[1]).to(x.dtype)

    @staticmethod
    def glu_fwd(gate, up, act):
        dt = fc.compute_dtype(gate)
        return (_act_and_grad(gate.to(dt), act)[0] * up.to(dt)).to(gate.dtype)

    @staticmethod
    def glu_bwd(dy, gate, up, act):
        dt = fc.compute_dtype(gate)
        a, da = _act_and_grad(gate.to(dt), act)
        d = dy.to(dt)
        return (d * up.to(dt) * da).to(gate.dtype), (d * a).to(up.dtype)


_act_op = fc.fused_op("activation", cpu_symbol="act_fwd", triton_module="activations",
                      torch_impl=lambda: _TorchActivations)
_glu_op = fc.fused_op("glu", cpu_symbol="glu_fwd", triton_module="activations",
                      torch_impl=lambda: _TorchActivations)


@custom_op("fastlm::act_fwd")
def _act_fwd(x: torch.Tensor, act: int, backend: str) -> torch.Tensor:
    return fc.select(_act_op, backend, x).act_fwd(x, act)


@_act_fwd.register_fake
def _(x, act, backend):
    return torch.empty_like(x)


@custom_op("fastlm::act_bwd")
def _act_bwd(dy: torch.Tensor, x: torch.Tensor, act: int, backend: str) -> torch.Tensor:
    return fc.select(_act_op, backend, x).act_bwd(dy, x, act)


@_act_bwd.register_fake
def _(dy, x, act, backend):
    return torch.empty_like(x)


def _act_setup(ctx, inputs, output):
    x, act, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (act, backend)


def _act_backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _act_bwd(dy.contiguous(), x, *ctx.args), None, None


_act_fwd.register_autograd(_act_backward, setup_context=_act_setup)


@custom_op("fastlm::glu_fwd")
def _glu_fwd(gate: torch.Tensor, up: torch.Tensor, act: int, backend: str) -> torch.Tensor:
    return fc.select(_glu_op, backend, gate).glu_fwd(gate, up, act)


@_glu_fwd.register_fake
def _(gate, up, act, backend):
    return torch.empty_like(gate)


@custom_op("fastlm::glu_bwd")
def _glu_bwd(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, act: int,
             backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(fc.select(_glu_op, backend, gate).glu_bwd(dy, gate, up, act))


@_glu_bwd.register_fake
def _(dy, gate, up, act, backend):
    return torch.empty_like(gate), torch.empty_like(up)


def _glu_setup(ctx, inputs, output):
    gate, up, act, backend = inputs
    ctx.save_for_backward(gate, up)
    ctx.args = (act, backend)


def _glu_backward(ctx, dy):
    gate, up = ctx.saved_tensors
    dg, du = _glu_bwd(dy.contiguous(), gate, up, *ctx.args)
    return dg, du, None, None


_glu_fwd.register_autograd(_glu_backward, setup_context=_glu_setup)


def _check(op: str, **tensors) -> None:
    ref = None
    for name, t in tensors.items():
        fc.check_float_tensor(op, name, t)
        if ref is None:
            ref = (name, t)
            continue
        if t.shape != ref[1].shape or t.dtype != ref[1].dtype or t.device != ref[1].device:
            fc.fail(op, f"{name} {tuple(t.shape)} {t.dtype} on {t.device} must match "
                        f"{ref[0]} {tuple(ref[1].shape)} {ref[1].dtype} on {ref[1].device}")


def _code(op: str, approximate: str) -> int:
    if approximate not in ("none", "tanh"):
        fc.fail(op, f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return ACT_CODES["gelu_tanh" if approximate == "tanh" else "gelu"]


def gelu(x: torch.Tensor, approximate: str = "none", *, backend: str | None = None):
    """``torch.nn.functional.gelu`` in one fused pass; any shape, fp32/fp16/bf16."""
    _check("gelu", x=x)
    return _act_fwd(x.contiguous(), _code("gelu", approximate), backend or "")


def silu(x: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    _check("silu", x=x)
    return _act_fwd(x.contiguous(), ACT_CODES["silu"], backend or "")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str | None = None):
    """``silu(gate) * up`` (Llama/Mistral/Qwen MLPs) in one pass; gate and up alike."""
    gate, up = autocast_inputs("promote", gate, up)
    _check("swiglu", gate=gate, up=up)
    return _glu_fwd(gate.contiguous(), up.contiguous(), ACT_CODES["silu"], backend or "")


def geglu(gate: torch.Tensor, up: torch.Tensor, approximate: str = "tanh", *,
          backend: str | None = None):
    """``gelu(gate) * up`` (Gemma MLPs) in one pass."""
    gate, up = autocast_inputs("promote", gate, up)
    _check("geglu", gate=gate, up=up)
    return _glu_fwd(gate.contiguous(), up.contiguous(), _code("geglu", approximate),
                    backend or "")
