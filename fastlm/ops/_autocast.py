"""torch.autocast at the public op boundaries.

Mixed precision with fp32 weights (the HF Trainer's ``bf16=True``/``fp16=True``, a user's own
``torch.autocast``) hands ops a mix of dtypes: bf16 projections, fp32 weights, fp32 rotary
tables. Each public function casts its inputs the way torch's autocast treats the op it
replaces, once, outside the custom op (the casts are differentiable, so gradients come back in
each input's own dtype); inside the op autocast is off (``fastlm._custom_op``).

- ``lower``: matrix-product ops (attention like SDPA, the LM head's linear in the fused loss)
  run in the autocast dtype.
- ``fp32``: normalisations, as torch's autocast runs layer_norm (and HF's RMSNorm with an fp32
  weight returns fp32).
- ``promote``: elementwise ops take the widest input dtype, as torch's type promotion does
  (HF's ``q * cos`` with a bf16 q and fp32 tables is fp32).

Without autocast (or for float64 inputs) nothing changes.
"""

from __future__ import annotations

import torch

_LOW = (torch.float16, torch.bfloat16)


def autocast_inputs(policy: str, *tensors):
    """``tensors`` cast for an op of kind ``policy`` if autocast is on for their device."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or not torch.is_autocast_enabled(first.device.type):
        return tensors
    if policy == "lower":
        dtype = torch.get_autocast_dtype(first.device.type)
        wanted = (torch.float32, *_LOW)
    elif policy == "fp32":
        dtype, wanted = torch.float32, _LOW
    elif policy == "promote":
        floats = [t.dtype for t in tensors if isinstance(t, torch.Tensor)
                  and t.dtype.is_floating_point]
        dtype = floats[0]
        for d in floats[1:]:
            dtype = torch.promote_types(dtype, d)
        wanted = (torch.float32, *_LOW)
    else:
        raise ValueError(f"unknown autocast policy {policy!r}")
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in wanted else t
                 for t in tensors)
