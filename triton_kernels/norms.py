"""Triton RMSNorm / LayerNorm forward and backward (launchers, no autograd).

One program per row in the forward (the whole row in registers, BLOCK = next power of two >=
H). The backward runs a fixed number of programs, each walking rows pid, pid + G, ... and
keeping its weight/bias gradient partial in registers; the (G, H) partials are summed by torch
afterwards, so results are deterministic (no atomics).
"""

import torch
import triton
import triton.language as tl

from ._fused_common import grid_programs


@triton.jit
def _rms_fwd(X, W, Y, RSTD, H, eps, offset, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(X + row * H + cols, mask=m, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / H + eps)
    y = x * rstd
    if HAS_W:
        y = y * (tl.load(W + cols, mask=m, other=0.0) + offset)
    tl.store(Y + row * H + cols, y.to(Y.dtype.element_ty), mask=m)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_bwd(DY, X, W, RSTD, DX, DW, rows, H, offset, HAS_W: tl.constexpr, WANT_DW: tl.constexpr,
             BLOCK: tl.constexpr):
    # int64 before the loop: row * H overflows int32 past 2^31 elements (and in the
    # interpreter range() yields Python ints, which have no .to())
    pid = tl.program_id(0).to(tl.int64)
    g_count = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    if HAS_W:
        w = tl.load(W + cols, mask=m, other=0.0) + offset
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, rows, g_count):
        base = row * H  # pid, hence row, is int64 (see above)
        x = tl.load(X + base + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=m, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xh = x * rstd
        g = dy
        if HAS_W:
            g = dy * w
        c = tl.sum(g * xh, axis=0) / H
        tl.store(DX + base + cols, ((g - xh * c) * rstd).to(DX.dtype.element_ty), mask=m)
        if WANT_DW:
            dw += dy * xh
    if WANT_DW:
        tl.store(DW + pid * H + cols, dw, mask=m)


@triton.jit
def _ln_fwd(X, W, B, Y, MEAN, RSTD, H, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    x = tl.load(X + row * H + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / H
    d = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / H + eps)
    y = d * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=m, other=0.0)
    if HAS_B:
        y = y + tl.load(B + cols, mask=m, other=0.0)
    tl.store(Y + row * H + cols, y.to(Y.dtype.element_ty), mask=m)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _ln_bwd(DY, X, W, MEAN, RSTD, DX, DW, DB, rows, H, HAS_W: tl.constexpr,
            WANT_DW: tl.constexpr, WANT_DB: tl.constexpr, BLOCK: tl.constexpr):
    # int64 before the loop: row * H overflows int32 past 2^31 elements (and in the
    # interpreter range() yields Python ints, which have no .to())
    pid = tl.program_id(0).to(tl.int64)
    g_count = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    m = cols < H
    if HAS_W:
        w = tl.load(W + cols, mask=m, other=0.0)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    for row in range(pid, rows, g_count):
        base = row * H  # pid, hence row, is int64 (see above)
        x = tl.load(X + base + cols, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(DY + base + cols, mask=m, other=0.0).to(tl.float32)
        xh = tl.where(m, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        g = dy
        if HAS_W:
            g = dy * w
        c1 = tl.sum(g, axis=0) / H
        c2 = tl.sum(g * xh, axis=0) / H
        dx = (g - c1 - xh * c2) * tl.load(RSTD + row)
        tl.store(DX + base + cols, dx.to(DX.dtype.element_ty), mask=m)
        if WANT_DW:
            dw += dy * xh
        if WANT_DB:
            db += dy
    if WANT_DW:
        tl.store(DW + pid * H + cols, dw, mask=m)
    if WANT_DB:
        tl.store(DB + pid * H + cols, db, mask=m)


def _block(h: int) -> int:
    return triton.next_power_of_2(h)


def _stat(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape[0], device=x.device, dtype=torch.float32)


def _partials(wanted: bool, g: int, x: torch.Tensor) -> torch.Tensor:
    return torch.empty((g if wanted else 0, x.shape[1]), device=x.device, dtype=torch.float32)


def rms_norm_fwd(x, weight, eps, offset):
    y, rstd = torch.empty_like(x), _stat(x)
    if x.shape[0]:
        _rms_fwd[(x.shape[0],)](x, weight if weight is not None else x, y, rstd, x.shape[1],
                                eps, offset, HAS_W=weight is not None, BLOCK=_block(x.shape[1]))
    return y, rstd


def rms_norm_bwd(dy, x, weight, rstd, offset, weight_grad):
    rows, h = x.shape
    g = grid_programs(x, rows)
    want_dw = weight_grad and weight is not None
    dx, dw = torch.empty_like(x), _partials(want_dw, g, x)
    if rows:
        _rms_bwd[(g,)](dy, x, weight if weight is not None else x, rstd, dx, dw, rows, h, offset,
                       HAS_W=weight is not None, WANT_DW=want_dw, BLOCK=_block(h))
    return dx, dw.sum(0) if want_dw else dw.new_empty(0)


def layer_norm_fwd(x, weight, bias, eps):
    y, mean, rstd = torch.empty_like(x), _stat(x), _stat(x)
    if x.shape[0]:
        _ln_fwd[(x.shape[0],)](x, weight if weight is not None else x,
                               bias if bias is not None else x, y, mean, rstd, x.shape[1], eps,
                               HAS_W=weight is not None, HAS_B=bias is not None,
                               BLOCK=_block(x.shape[1]))
    return y, mean, rstd


def layer_norm_bwd(dy, x, weight, mean, rstd, weight_grad, bias_grad):
    rows, h = x.shape
    g = grid_programs(x, rows)
    dx, dw, db = torch.empty_like(x), _partials(weight_grad, g, x), _partials(bias_grad, g, x)
    if rows:
        _ln_bwd[(g,)](dy, x, weight if weight is not None else x, mean, rstd, dx, dw, db, rows, h,
                      HAS_W=weight is not None, WANT_DW=weight_grad, WANT_DB=bias_grad,
                      BLOCK=_block(h))
    return (dx, dw.sum(0) if weight_grad else dw.new_empty(0),
            db.sum(0) if bias_grad else db.new_empty(0))
