"""RMSNorm and LayerNorm: one public function each, backends side by side, one dispatch rule.

Backends (see ``fastlm.ops._fused_common``): ``triton`` (triton_kernels/norms.py), ``cpu``
(csrc/cpu/norms.cpp), ``torch`` (fastlm/ops/reference.py in fp32). Statistics are fp32 in every
backend; the forward saves them (rstd, and mean for LayerNorm) so the backward reads x once.
The weight and bias are upcast to fp32 before the kernels (a (H,) cast, free next to the
(rows, H) activations), so bf16 activations with fp32 parameters work, and parameter
gradients come back in the parameters' own dtype.
"""

from __future__ import annotations

import torch

from fastlm._custom_op import custom_op
from fastlm.ops import _fused_common as fc
from fastlm.ops import reference
from fastlm.ops._autocast import autocast_inputs

__all__ = ["rms_norm", "layer_norm"]

_MAX_TRITON_HIDDEN = 65536  # one program holds a row in registers


def _triton_features(call):
    h = call.features.get("hidden", 0)
    if h > _MAX_TRITON_HIDDEN:
        return f"hidden size {h} > {_MAX_TRITON_HIDDEN} does not fit one Triton program"
    return None


class _TorchNorms:
    """The references as a backend: fp32 compute (fp64 for fp64 inputs)."""

    @staticmethod
    def rms_norm_fwd(x, weight, eps, offset):
        xc = x.to(fc.compute_dtype(x))
        rstd = torch.rsqrt(xc.pow(2).mean(-1) + eps)
        w = None if weight is None else weight.to(xc.dtype)
        return reference.rms_norm_ref(xc, w, eps, offset=offset, upcast=False).to(x.dtype), rstd.float()

    @staticmethod
    def rms_norm_bwd(dy, x, weight, rstd, offset, weight_grad):
        dt = fc.compute_dtype(x)
        w = None if weight is None else weight.to(dt)
        dx, dw = reference.rms_norm_bwd_ref(dy.to(dt), x.to(dt), w, offset=offset,
                                            rstd=rstd.to(dt)[:, None])
        return dx.to(x.dtype), _grad_or_empty(dw if weight_grad else None, x)

    @staticmethod
    def layer_norm_fwd(x, weight, bias, eps):
        xc = x.to(fc.compute_dtype(x))
        mean = xc.mean(-1)
        rstd = torch.rsqrt((xc - mean[:, None]).pow(2).mean(-1) + eps)
        y = reference.layer_norm_ref(xc, weight, bias, eps, upcast=False)
        return y.to(x.dtype), mean.float(), rstd.float()

    @staticmethod
    def layer_norm_bwd(dy, x, weight, mean, rstd, weight_grad, bias_grad):
        dt = fc.compute_dtype(x)
        w = None if weight is None else weight.to(dt)
        dx, dw, db = reference.layer_norm_bwd_ref(
            dy.to(dt), x.to(dt), w, mean=mean.to(dt)[:, None], rstd=rstd.to(dt)[:, None])
        return (dx.to(x.dtype), _grad_or_empty(dw if weight_grad else None, x),
                _grad_or_empty(db if bias_grad else None, x))


def _grad_or_empty(g: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x.new_empty(0, dtype=torch.float32) if g is None else g.float()


_rms_op = fc.fused_op("rms_norm", cpu_symbol="rms_norm_fwd", triton_module="norms",
                      torch_impl=lambda: _TorchNorms, triton_features=_triton_features)
_ln_op = fc.fused_op("layer_norm", cpu_symbol="layer_norm_fwd", triton_module="norms",
                     torch_impl=lambda: _TorchNorms, triton_features=_triton_features)


# -- RMSNorm custom ops -------------------------------------------------------------------------


@custom_op("fastlm::rms_norm_fwd")
def _rms_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = fc.select(_rms_op, backend, x, hidden=x.shape[-1])
    return tuple(impl.rms_norm_fwd(x, weight, eps, offset))


@_rms_norm_fwd.register_fake
def _(x, weight, eps, offset, backend):
    return torch.empty_like(x), x.new_empty(x.shape[0], dtype=torch.float32)


@custom_op("fastlm::rms_norm_bwd")
def _rms_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor,
    offset: float, weight_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    impl = fc.select(_rms_op, backend, x, hidden=x.shape[-1])
    return tuple(impl.rms_norm_bwd(dy, x, weight, rstd, offset, weight_grad))


@_rms_norm_bwd.register_fake
def _(dy, x, weight, rstd, offset, weight_grad, backend):
    n = x.shape[-1] if (weight_grad and weight is not None) else 0
    return torch.empty_like(x), x.new_empty(n, dtype=torch.float32)


def _rms_setup(ctx, inputs, output):
    x, weight, _eps, offset, backend = inputs
    ctx.save_for_backward(x, weight, output[1])
    ctx.args = (offset, backend)


def _rms_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    offset, backend = ctx.args
    want_w = weight is not None and ctx.needs_input_grad[1]
    dx, dw = _rms_norm_bwd(dy.contiguous(), x, weight, rstd, offset, want_w, backend)
    return dx, (dw if want_w else None), None, None, None


_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)


# -- LayerNorm custom ops -----------------------------------------------------------------------


@custom_op("fastlm::layer_norm_fwd")
def _layer_norm_fwd(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = fc.select(_ln_op, backend, x, hidden=x.shape[-1])
    return tuple(impl.layer_norm_fwd(x, weight, bias, eps))


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps, backend):
    stat = x.new_empty(x.shape[0], dtype=torch.float32)
    return torch.empty_like(x), stat, torch.empty_like(stat)


@custom_op("fastlm::layer_norm_bwd")
def _layer_norm_bwd(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, mean: torch.Tensor,
    rstd: torch.Tensor, weight_grad: bool, bias_grad: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    impl = fc.select(_ln_op, backend, x, hidden=x.shape[-1])
    return tuple(impl.layer_norm_bwd(dy, x, weight, mean, rstd, weight_grad, bias_grad))


@_layer_norm_bwd.register_fake
def _(dy, x, weight, mean, rstd, weight_grad, bias_grad, backend):
    h = x.shape[-1]
    return (torch.empty_like(x), x.new_empty(h if weight_grad else 0, dtype=torch.float32),
            x.new_empty(h if bias_grad else 0, dtype=torch.float32))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, _eps, backend = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    want_w = weight is not None and ctx.needs_input_grad[1]
    want_b = ctx.has_bias and ctx.needs_input_grad[2]
    dx, dw, db = _layer_norm_bwd(dy.contiguous(), x, weight, mean, rstd, want_w, want_b,
                                 ctx.backend)
    return dx, (dw if want_w else None), (db if want_b else None), None, None


_layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)


# -- public API ---------------------------------------------------------------------------------


def _rows(op: str, x: torch.Tensor, weight, bias=None) -> torch.Tensor:
    fc.check_float_tensor(op, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        fc.fail(op, f"x must have a non-empty last (hidden) dimension, got shape {tuple(x.shape)}")
    fc.check_vector(op, "weight", weight, x)
    fc.check_vector(op, "bias", bias, x)
    return x.reshape(-1, x.shape[-1]).contiguous()  # (rows, H)


def _param(p: torch.Tensor | None) -> torch.Tensor | None:
    # Differentiable upcast: autograd returns the fp32 gradient in the parameter's dtype.
    return None if p is None else p.float().contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    backend: str | None = None,
) -> torch.Tensor:
    """Root-mean-square normalisation: ``x / sqrt(mean(x^2) + eps) * (weight + offset)``.

    Args:
        x: (..., H) activations, fp32/fp16/bf16 (fp64 runs on the torch backend), any strides.
        weight: (H,) gain, any float dtype, or None for no gain. Gemma stores ``weight - 1`` and
            uses ``offset=1.0``; Llama/Mistral use offset 0.
        eps: added to the mean square before the square root.
        backend: "triton", "cpu", "torch" or "auto" (default: $FASTLM_BACKEND_RMS_NORM, then
            $FASTLM_BACKEND, then auto). A named backend that cannot run raises.

    Returns:
        y of x's shape and dtype; statistics and the product are computed in fp32.
        Differentiable in x and weight.
    """
    x, weight = autocast_inputs("fp32", x, weight)
    x2 = _rows("rms_norm", x, weight)
    y, _ = _rms_norm_fwd(x2, _param(weight), float(eps), float(offset), backend or "")
    return y.view_as(x)  # (view(x.shape) costs 3x as much: ~2 us, a third of a small call)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    """Layer normalisation over the last dimension, as ``torch.nn.functional.layer_norm``.

    x (..., H); weight and bias (H,) or None. Mean and (biased) variance in fp32, two-pass.
    Returns x's shape and dtype; differentiable in x, weight and bias. ``backend`` as in
    :func:`rms_norm` ($FASTLM_BACKEND_LAYER_NORM).
    """
    x, weight, bias = autocast_inputs("fp32", x, weight, bias)
    x2 = _rows("layer_norm", x, weight, bias)
    y, _, _ = _layer_norm_fwd(x2, _param(weight), _param(bias), float(eps), backend or "")
    return y.view_as(x)  # (view(x.shape) costs 3x as much: ~2 us, a third of a small call)
