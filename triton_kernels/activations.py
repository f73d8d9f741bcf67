"""Triton GELU / SiLU and the gated units (SwiGLU, GeGLU), forward and backward (launchers, no
autograd). Elementwise over contiguous tensors, fp32 math; act codes as csrc/cpu/activations.h:
0 silu, 1 gelu (erf), 2 gelu (tanh approximation)."""

import torch
import triton
import triton.language as tl

BLOCK = 1024
# constexpr: a jitted function may read no other global (the GPU compiler refuses it with a
# NameError; Triton's interpreter, where the CPU tests run, let plain floats through, and
# benchmarks/triton_compile.py found GELU failing to compile for every GPU)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT2 = tl.constexpr(0.7071067811865476)


@triton.jit
def _tanh_sech2(x):
    """(tanh x, 1 - tanh^2 x) from e = exp(-2|x|) <= 1 (no overflow; tl has no portable tanh).
    1 - tanh^2 = 4e / (1 + e)^2 directly: subtracting t^2 from 1 loses every digit where the
    GELU derivative needs them (|x| large, t near 1)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return t, 4.0 * e / ((1.0 + e) * (1.0 + e))


@triton.jit
def _act(x, ACT: tl.constexpr):
    """(act(x), act'(x)) in fp32."""
    if ACT == 0:
        s = tl.sigmoid(x)
        return x * s, s * (1.0 + x * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(x * _INV_SQRT2))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * x * x)
        return x * cdf, cdf + x * pdf
    else:
        inner = _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)
        t, sech2 = _tanh_sech2(inner)
        dinner = _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        return 0.5 * x * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * x * sech2 * dinner


@triton.jit
def _act_fwd(X, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    y, _ = _act(x, ACT)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _act_bwd(DY, X, DX, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    _, d = _act(x, ACT)
    tl.store(DX + offs, (dy * d).to(DX.dtype.element_ty), mask=m)


@triton.jit
def _glu_fwd(G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    a, _ = _act(g, ACT)
    tl.store(Y + offs, (a * u).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _glu_bwd(DY, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    g = tl.load(G + offs, mask=m, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=m, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=m, other=0.0).to(tl.float32)
    a, d = _act(g, ACT)
    tl.store(DG + offs, (dy * u * d).to(DG.dtype.element_ty), mask=m)
    tl.store(DU + offs, (dy * a).to(DU.dtype.element_ty), mask=m)


def _grid(n):
    return (triton.cdiv(max(n, 1), BLOCK),)


def act_fwd(x: torch.Tensor, act: int) -> torch.Tensor:
    y = torch.empty_like(x)
    if x.numel():
        _act_fwd[_grid(x.numel())](x, y, x.numel(), ACT=act, BLOCK=BLOCK)
    return y


def act_bwd(dy: torch.Tensor, x: torch.Tensor, act: int) -> torch.Tensor:
    dx = torch.empty_like(x)
    if x.numel():
        _act_bwd[_grid(x.numel())](dy, x, dx, x.numel(), ACT=act, BLOCK=BLOCK)
    return dx


def glu_fwd(gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:
    y = torch.empty_like(gate)
    if gate.numel():
        _glu_fwd[_grid(gate.numel())](gate, up, y, gate.numel(), ACT=act, BLOCK=BLOCK)
    return y


def glu_bwd(dy, gate, up, act: int):
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    if gate.numel():
        _glu_bwd[_grid(gate.numel())](dy, gate, up, dg, du, gate.numel(), ACT=act, BLOCK=BLOCK)
    return dg, du
