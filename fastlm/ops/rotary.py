"""Rotary position embedding (RoPE): one public function, backends side by side, one dispatch
rule (fastlm/ops/_fused_common.py): ``triton`` (triton_kernels/rotary.py), ``cpu``
(csrc/cpu/rotary.cpp), ``torch`` (below, fp32 math; fp64 for fp64 inputs).

Why fuse: HF's ``q * cos + rotate_half(q) * sin`` is five full-size passes over q and k
(two slices and a cat inside rotate_half, two products, a sum), and its backward as many. The
kernels read each feature pair once and write it once, follow the strides of HF's transposed
(B, S, H, D) views instead of copying them, and compute in fp32 whatever the input dtype, so
the result is rounded once (HF rounds cos/sin and every product to bf16 in bf16 runs).

The backward is the same kernel run with the transposed rotation; cos/sin get no gradient
(HF computes them from a buffer under no_grad). Tables that do require a gradient are
announced and sent through the differentiable reference instead.
"""

from __future__ import annotations

import logging

import torch

from fastlm._custom_op import custom_op
from fastlm.ops import _fused_common as fc
from fastlm.ops import reference
from fastlm.ops._autocast import autocast_inputs

__all__ = ["rotary"]

logger = logging.getLogger("fastlm")
_warned_table_grad = False


class _TorchRotary:
    """The reference as a backend, with the kernels' exact pairing (so it is also their spec)."""

    @staticmethod
    def rotary(x, cos, sin, inverse, interleaved=False):
        dt = fc.compute_dtype(x)
        xc, c, s = x.to(dt), cos[:, None].to(dt), sin[:, None].to(dt)
        rot = c.shape[-1]
        h = rot // 2
        if interleaved:  # pairs (2i, 2i + 1)
            first, second = slice(0, rot, 2), slice(1, rot, 2)
        else:  # halves
            first, second = slice(0, h), slice(h, rot)
        x1, x2 = xc[..., first], xc[..., second]
        c1, c2, s1, s2 = c[..., first], c[..., second], s[..., first], s[..., second]
        if inverse:
            y1, y2 = x1 * c1 + x2 * s2, x2 * c2 - x1 * s1
        else:
            y1, y2 = x1 * c1 - x2 * s1, x2 * c2 + x1 * s2
        if interleaved:
            rotated = torch.stack((y1, y2), dim=-1).flatten(-2)
        else:
            rotated = torch.cat((y1, y2), dim=-1)
        out = torch.empty_like(x)  # the fake's layout: the input's strides
        out.copy_(torch.cat((rotated, xc[..., rot:]), dim=-1))
        return out


_op = fc.fused_op("rotary", cpu_symbol="rotary", triton_module="rotary",
                  torch_impl=lambda: _TorchRotary)


@custom_op("fastlm::rotary")
def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool,
            interleaved: bool, backend: str) -> torch.Tensor:
    return fc.select(_op, backend, x).rotary(x, cos, sin, inverse, interleaved)


@_rotary.register_fake
def _(x, cos, sin, inverse, interleaved, backend):
    return torch.empty_like(x)


def _setup(ctx, inputs, output):
    _x, cos, sin, _inverse, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin)
    ctx.interleaved, ctx.backend = interleaved, backend


def _backward(ctx, dy):
    cos, sin = ctx.saved_tensors
    if dy.stride(-1) != 1:
        dy = dy.contiguous()
    return _rotary(dy, cos, sin, True, ctx.interleaved, ctx.backend), None, None, None, None, \
        None


_rotary.register_autograd(_backward, setup_context=_setup)


def _table(name: str, t, x: torch.Tensor) -> torch.Tensor:
    """cos/sin as (1 or B, S, R) in the compute dtype. Accepted: (S, R), (B or 1, S, R) and
    HF's unsqueezed (B or 1, 1, S, R)."""
    fc.check_float_tensor("rotary", name, t)
    if t.dim() == 4 and t.shape[1] == 1:
        t = t[:, 0]
    elif t.dim() == 2:
        t = t[None]
    batch, _, seqlen, dim = x.shape
    if t.dim() != 3 or t.shape[0] not in (1, batch) or t.shape[1] != seqlen:
        fc.fail("rotary", f"{name} must be (seqlen, rot_dim), (1 or batch, seqlen, rot_dim) or "
                          f"(1 or batch, 1, seqlen, rot_dim) with batch={batch}, "
                          f"seqlen={seqlen}; got {tuple(t.shape)}")
    if t.shape[-1] % 2 or not 0 < t.shape[-1] <= dim:
        fc.fail("rotary", f"{name}'s last dim (rot_dim = {t.shape[-1]}) must be even and in "
                          f"(0, head_dim = {dim}]")
    if t.device != x.device:
        fc.fail("rotary", f"{name} is on {t.device} but q is on {x.device}; move it")
    return t.to(fc.compute_dtype(x)).contiguous()


def _check_qk(q, k) -> None:
    fc.check_float_tensor("rotary", "q", q)
    if q.dim() != 4:
        fc.fail("rotary", f"q must be 4-D (batch, heads, seqlen, head_dim), got {tuple(q.shape)}")
    if k is None:
        return
    fc.check_float_tensor("rotary", "k", k)
    if k.dim() != 4 or (k.shape[0], k.shape[2], k.shape[3]) != (q.shape[0], q.shape[2],
                                                                 q.shape[3]):
        fc.fail("rotary", f"k {tuple(k.shape)} must be (batch, kv_heads, seqlen, head_dim) "
                          f"with q's batch, seqlen and head_dim {tuple(q.shape)}")
    if k.dtype != q.dtype or k.device != q.device:
        fc.fail("rotary", f"k ({k.dtype}, {k.device}) must match q ({q.dtype}, {q.device})")


def rotary(
    q: torch.Tensor,
    k: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    interleaved: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotary embedding of q and k (HF convention: ``x * cos + rotate_half(x) * sin``).

    Args:
        q: (B, Hq, S, D); k: (B, Hkv, S, D) or None. Any strides with a contiguous last dim
            (HF's ``(B, S, H, D).transpose(1, 2)`` views are read in place).
        cos, sin: (S, R), (1 or B, S, R) or (1 or B, 1, S, R), R even and <= D; features
            [R, D) pass through unchanged (partial rotary, as GPT-NeoX and Phi use).
        interleaved: rotate adjacent pairs (x[2i], x[2i+1]) with cos/sin[2i], [2i+1] instead
            of the halves (Cohere's and GLM's form, with their repeat-interleaved tables).
    Returns:
        (q_out, k_out) in q's dtype and layout; differentiable in q and k.
    """
    q, k, cos, sin = autocast_inputs("promote", q, k, cos, sin)
    _check_qk(q, k)
    c, s = _table("cos", cos, q), _table("sin", sin, q)
    if c.shape != s.shape:
        fc.fail("rotary", f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} differ in shape")
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        global _warned_table_grad
        if not _warned_table_grad:
            _warned_table_grad = True
            logger.warning("fastlm.ops.rotary: cos/sin require grad; the kernels give them no "
                           "gradient, so these calls use the differentiable torch reference")
        qo, ko = reference.rotary_ref(q, q if k is None else k, c, s,  # c, s keep grad
                                      interleaved=interleaved)
        return qo, None if k is None else ko

    def one(x):
        return _rotary(x if x.stride(-1) == 1 else x.contiguous(), c, s, False,
                       bool(interleaved), backend or "")

    return one(q), None if k is None else one(k)

