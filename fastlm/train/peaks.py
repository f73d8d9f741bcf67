"""Datasheet peak TFLOP/s of the GPUs MFU is reported against (dense: no 2:4 sparsity).

Matched on the model token of ``torch.cuda.get_device_name`` ("NVIDIA H100 80GB HBM3" ->
H100; "NVIDIA H100 PCIe" -> H100 + PCIe), never by substring: "L4" inside "NVIDIA L40S" gave
an L40S the L4's peak (MFU 3x too high), and every H100 was counted as the SXM part. A GPU not
in the table gets no MFU rather than another GPU's number.
"""

from __future__ import annotations

import re

# (model token, variant token or None) -> (bf16/fp16 tensor-core, TF32 tensor-core, fp32)
_PEAKS = {
    ("H100", None): (989.4, 494.7, 66.9),  # SXM
    ("H100", "PCIE"): (756.5, 378.0, 51.2),
    ("H100", "NVL"): (835.5, 417.5, 60.0),
    ("H200", None): (989.4, 494.7, 66.9),  # SXM
    ("H200", "NVL"): (835.5, 417.5, 60.0),
    ("GH200", None): (989.4, 494.7, 66.9),
    ("A100", None): (312.0, 156.0, 19.5),
    ("A10", None): (125.0, 62.5, 31.2),
    ("L4", None): (121.0, 60.0, 30.3),
    ("L40", None): (181.0, 90.5, 90.5),
    ("L40S", None): (362.0, 183.0, 91.6),
}
_VARIANTS = {"PCIE", "NVL"}


def gpu_peak_tflops(name: str, precision: str, tf32: bool = False) -> float | None:
    """The peak for a run in ``precision`` ("bf16", "fp16" or "fp32"; fp32 matmuls on tensor
    cores when ``tf32``) on the GPU ``name``, or None when the GPU is not in the table."""
    tokens = [t.upper() for t in re.split(r"[\s_\-]+", name) if t]
    variant = next((t for t in tokens if t in _VARIANTS), None)
    for token in tokens:
        peaks = _PEAKS.get((token, variant)) or _PEAKS.get((token, None))
        if peaks is not None:
            half, tf32_peak, fp32 = peaks
            if precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else fp32
    return None
