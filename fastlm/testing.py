"""The tolerance rule every fastlm kernel is tested by, shared by all test files.

A kernel's error against the float64 reference may be at most ``k`` times the error PyTorch's
own computation makes in the same dtype, plus a small floor (FlashAttention's test rule):

    max|kernel - ref64| <= k * max|torch_same_dtype - ref64| + floor

k = 2 for outputs and 3 for gradients (a backward compounds more roundings). The floor covers
cases where PyTorch happens to be exact (e.g. length-1 softmax) and so would allow no error.
"""

from __future__ import annotations

import torch

OUTPUT_FACTOR = 2.0
GRAD_FACTOR = 3.0

# Floors per dtype: a few ulps at magnitude ~1 of that dtype.
FLOORS = {
    torch.float64: 1e-12,
    torch.float32: 1e-6,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def max_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    if actual.shape != ref.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference {tuple(ref.shape)}")
    if actual.numel() == 0:
        return 0.0
    diff = (actual.double() - ref.double()).abs()
    if torch.isnan(diff).any():
        return float("inf")
    return float(diff.max())


def assert_within(
    actual: torch.Tensor,
    ref64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    factor: float = OUTPUT_FACTOR,
    floor: float | None = None,
    name: str = "output",
) -> None:
    """Assert ``actual`` is within ``factor`` x the error of ``baseline`` (same dtype) + floor."""
    floor = FLOORS.get(actual.dtype, 1e-6) if floor is None else floor
    err = max_err(actual, ref64)
    base = max_err(baseline, ref64)
    bound = factor * base + floor
    if not err <= bound:
        raise AssertionError(
            f"{name}: max error {err:.3g} exceeds {factor} x torch's same-dtype error "
            f"{base:.3g} + floor {floor:.1g} = {bound:.3g}"
        )
