"""Make fastlm's optimizers first-class under DeepSpeed ZeRO.

DeepSpeed accepts a client optimizer under ZeRO only if its type is on an internal list, unless
``zero_allow_untested_optimizer`` is set; and with ``offload_optimizer`` it insists on its own
DeepSpeedCPUAdam unless ``zero_force_ds_cpu_optimizer`` is false. FusedAdamW steps whatever
ZeRO hands it (the flat fp32 partitions of stages 1-2, the sub-groups of stage 3, on the host
under offload, where its C++ kernel runs), so :func:`prepare_config` adds its type to that list
(DeepSpeed otherwise warns "You are using ZeRO with an untested optimizer, proceed with
caution" on every run) and sets both switches for it (the first one for a DeepSpeed whose list
is not where fastlm looks).
"""

from __future__ import annotations

import copy

from fastlm.optim import FusedAdamW

_FASTLM_OPTIMIZERS = (FusedAdamW,)


def prepare_config(ds_config: dict, optimizer=None) -> dict:
    """A copy of ``ds_config`` that lets DeepSpeed use ``optimizer`` (a fastlm optimizer).

    Only the two switches are filled in, and only when the user did not set them; every other
    key passes through unchanged.
    """
    cfg = copy.deepcopy(ds_config)
    if optimizer is not None and not isinstance(optimizer, _FASTLM_OPTIMIZERS):
        return cfg
    register()
    zero = cfg.get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg


def register() -> bool:
    """Put fastlm's optimizers on DeepSpeed's list of those ZeRO supports (checked by exact
    type); False when this DeepSpeed keeps no such list."""
    try:
        from deepspeed.runtime.zero import utils
    except ImportError:
        return False
    listed = getattr(utils, "ZERO_SUPPORTED_OPTIMIZERS", None)
    if not isinstance(listed, list):
        return False
    listed.extend(t for t in _FASTLM_OPTIMIZERS if t not in listed)
    return True


def fuse_unscale_and_clip(engine) -> bool:
    """Fold ZeRO-1/2's unscale + clip pass over the fp32 gradient partition into FusedAdamW's
    step: one fewer read and write of every gradient (8 of ~36 bytes per parameter moved by
    the optimizer phase). Per engine instance; returns False (and changes nothing) when the
    engine is neither ZeRO stage 1/2 around a FusedAdamW nor plain fp32 without ZeRO around one.

    DeepSpeed computes one combined factor (loss scale x clip coefficient) and multiplies the
    gradients by its inverse before calling the optimizer; here the factor is handed to the
    optimizer as ``grad_scale`` instead, which its kernels divide by while they read the
    gradient anyway. Overflow handling is untouched: DeepSpeed still skips the step itself.

    Without ZeRO, in fp32, DeepSpeed clips with its own ``clip_grad_norm_`` (a norm per
    tensor, then a multiply of every gradient); there FusedAdamW's ``clip_grad_norm_`` takes
    its place (one fused norm, the coefficient applied inside the step), and the norm becomes
    the engine's ``get_global_grad_norm()``, which DeepSpeed leaves empty in that mode.
    """
    import torch
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = getattr(engine, "optimizer", None)
    if isinstance(zero, _FASTLM_OPTIMIZERS):
        return _fold_fp32_clip(engine, zero)
    if not isinstance(zero, DeepSpeedZeroOptimizer):
        return False
    inner = getattr(zero, "optimizer", None)
    if not isinstance(inner, _FASTLM_OPTIMIZERS) or getattr(zero, "torch_autocast_gradscaler",
                                                             None):
        return False

    def unscale_and_clip_grads(self, grad_groups_flat, total_norm):
        if self.clip_grad == 0.0 and self.loss_scale == 1.0:
            inner.grad_scale = None
            return
        combined = self.loss_scale
        if self.clip_grad > 0.0:
            norm = total_norm
            if not torch.is_tensor(norm) or not torch.isfinite(norm).all():
                norm = torch.as_tensor(float("inf"))
            clip = torch.clamp(((norm / self.loss_scale) + 1e-6) / self.clip_grad, min=1.0)
            combined = clip * self.loss_scale
        inner.grad_scale = combined  # FusedAdamW divides the gradient by it in its step

    import types

    zero.unscale_and_clip_grads = types.MethodType(unscale_and_clip_grads, zero)
    return True


def _fold_fp32_clip(engine, opt) -> bool:
    import types

    if (engine.zero_optimization() or engine.fp16_enabled() or engine.bfloat16_enabled()
            or getattr(engine, "torch_autocast_z0_gradscaler", None) is not None
            or engine.mpu is not None):  # model parallel: the norm spans ranks' shards
        return False

    def clip_fp32_gradients(self):
        # called by the engine's step only when gradient_clipping > 0; the optimizer's
        # _global_grad_norm is what the engine then reports as the global gradient norm
        opt._global_grad_norm = opt.clip_grad_norm_(self.gradient_clipping())

    engine.clip_fp32_gradients = types.MethodType(clip_fp32_gradients, engine)
    engine.fastlm_clip_reports_norm = True  # see fastlm.train.trainer: no norm of its own
    return True
