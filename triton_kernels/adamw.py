"""Triton AdamW step: one program per BLOCK elements of one tensor, a single pass per element.

Same arithmetic order as torch.optim.AdamW (and csrc/cpu/adamw.cpp): decoupled decay, lerp for
the first moment, addcmul for the second, addcdiv for the update. Params may be fp32, bf16 or
fp16 (then with an fp32 master copy), moments fp32 or bf16. One launch per tensor keeps the
launcher simple; the kernel itself is bound by memory bandwidth.
"""

from __future__ import annotations

import math

import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def adamw_kernel(P, G, M, V, W, n, decay, step_size, lerp_a, beta2, omb2, bc2_sqrt, eps,
                 inv_scale, LERP_LOW: tl.constexpr, HAS_MASTER: tl.constexpr,
                 BLOCK: tl.constexpr):
    # int64: ZeRO's flat partition on one GPU is the whole model (a 2.2B-parameter one passed
    # 2^31 elements, and int32 offsets wrapped negative, inside the mask)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32) * inv_scale
    if HAS_MASTER:
        p = tl.load(W + offs, mask=mask, other=0.0)
    else:
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * decay
    m0 = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
    base = m0 if LERP_LOW else g
    m = tl.fma(lerp_a, g - m0, base)  # torch's lerp
    v = tl.fma(omb2 * g, g, tl.load(V + offs, mask=mask, other=0.0).to(tl.float32) * beta2)
    denom = tl.sqrt_rn(v) / bc2_sqrt + eps
    p = p + (-step_size * m) / denom
    # .to() rounds to nearest even on GPUs. (Triton's interpreter truncates fp32 -> bf16 even
    # when asked for "rtne": tests mark that case, see tests/optim/test_adamw.py.)
    tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
    tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)
    if HAS_MASTER:
        tl.store(W + offs, p, mask=mask)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, masters, lr, beta1, beta2, eps,
                weight_decay, step, inv_grad_scale):
    """Update every tensor of the lists in place (the fastlm adamw backend contract)."""
    bc1 = 1.0 - beta1**step
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    w1 = 1.0 - beta1
    lerp_low = w1 < 0.5
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        n = p.numel()
        if n == 0:
            continue
        w = masters[i] if masters else p  # unused when HAS_MASTER is false
        adamw_kernel[(triton.cdiv(n, BLOCK),)](
            p, g, m, v, w, n, 1.0 - lr * weight_decay, lr / bc1,
            w1 if lerp_low else -(1.0 - w1), beta2, 1.0 - beta2, bc2_sqrt, eps, inv_grad_scale,
            LERP_LOW=lerp_low, HAS_MASTER=bool(masters), BLOCK=BLOCK,
        )
