"""Plumbing shared by the fused row/elementwise ops (norms, rotary, activations, cross-entropy).

Every one of them has the same four backends, registered the same way:

- (no ``cuda`` backend: these ops are memory-bound and the Triton kernels cover GPUs; no CUDA
  C++ versions were written)
- ``triton`` ``fastlm.triton_kernels.<module>``: CUDA tensors (CPU tensors in the interpreter)
- ``cpu``    the ``fastlm_cpu`` extension (csrc/cpu/<op>.cpp): OpenMP + SIMD, fp32 math
- ``torch``  an object built on fastlm/ops/reference.py, computing in fp32 (always available)

A backend object exposes the same launcher names with the same signatures whichever backend it
is, so each op's custom-op body is one line: ``_impl(...).<launcher>(...)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastlm._build import load_extension
from fastlm._dispatch import (
    Call,
    Op,
    all_of,
    define_op,
    extension_check,
    needs_device,
    needs_dtypes,
    triton_check,
    triton_launchers,
)

FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # dtypes the compiled kernels run


def fused_op(
    name: str,
    *,
    cpu_symbol: str,
    triton_module: str,
    torch_impl: Callable[[], object],
    triton_features: Callable[[Call], str | None] | None = None,
) -> Op:
    """Define op ``name`` with its triton, cpu and torch backends."""
    # No CUDA C++ kernels: on GPUs Triton is first, so auto selection never logs a fallback.
    op = define_op(name, order={"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")})
    triton_checks = [triton_check, needs_dtypes(*FLOATS)]
    if triton_features is not None:
        triton_checks.append(triton_features)
    op.register(
        "triton",
        all_of(*triton_checks),
        triton_launchers(f"fastlm.triton_kernels.{triton_module}"),
    )
    op.register(
        "cpu",
        all_of(needs_device("cpu"), needs_dtypes(*FLOATS), extension_check("cpu", cpu_symbol)),
        lambda: load_extension("cpu"),
    )
    op.register("torch", lambda call: None, torch_impl)
    return op


def select(op: Op, backend: str, tensor: torch.Tensor, **features):
    """The launchers of the backend that runs this call (``backend`` "" = not requested).

    Called inside the custom ops, so under ``torch.compile`` the choice is made when the op
    runs, never traced.
    """
    return op.launchers(Call(tensor.device.type, tensor.dtype, features), backend or None)


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """What the torch backends compute in: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def fail(op: str, msg: str) -> None:
    raise ValueError(f"fastlm.ops.{op}: {msg}")


def check_float_tensor(op: str, name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS and t.dtype != torch.float64:
        fail(op, f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")


def check_vector(op: str, name: str, t, x: torch.Tensor) -> None:
    """t is None or a float (H,) tensor on x's device, H = x.shape[-1]."""
    if t is None:
        return
    check_float_tensor(op, name, t)
    if t.dim() != 1 or t.shape[0] != x.shape[-1]:
        fail(op, f"{name} must have shape ({x.shape[-1]},) = (x.shape[-1],), got {tuple(t.shape)}")
    if t.device != x.device:
        fail(op, f"{name} is on {t.device} but x is on {x.device}; move it to x's device")


def none_if_empty(t: torch.Tensor) -> torch.Tensor | None:
    """Launchers return an empty tensor for a gradient that was not requested."""
    return None if t.numel() == 0 else t
