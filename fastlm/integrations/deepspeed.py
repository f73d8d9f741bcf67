"""Make fastlm's optimizers first-class under DeepSpeed ZeRO.

DeepSpeed accepts a client optimizer under ZeRO only if its type is on an internal list, unless
``zero_allow_untested_optimizer`` is set; and with ``offload_optimizer`` it insists on its own
DeepSpeedCPUAdam unless ``zero_force_ds_cpu_optimizer`` is false. FusedAdamW steps whatever
ZeRO hands it (the flat fp32 partitions of stages 1-2, the sub-groups of stage 3, on the host
under offload, where its C++ kernel runs), so :func:`prepare_config` sets both switches for it.
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
    zero = cfg.get("zero_optimization", {}) or {}
    if int(zero.get("stage", 0)) > 0:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    offload = (zero.get("offload_optimizer") or {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    return cfg
