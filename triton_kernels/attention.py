"""Launchers of the Triton attention kernels (no autograd here: see fastlm/ops/attention.py).

Signatures follow the backend contract of ``fastlm.ops.attention``: dense tensors are
(B, H, S, D) contiguous, packed ones (T, H, D) with int32 cu_seqlens; lse is fp32, (B, H, Sq)
dense or (H, T) packed. Every kernel addresses a token as base + seq*stride_b + head*stride_h +
token*stride_t, so the dense and packed layouts share one set of kernels (IS_VARLEN switches
where a sequence starts).

On a GPU, block sizes are autotuned per (head dim, seqlen bucket); in Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors, tests only) one small fixed configuration is used.
"""

from __future__ import annotations

import functools
import os

import torch
import triton

from ._attention_bwd import delta_kernel, dkdv_kernel, dq_kernel
from ._attention_common import BIG
from ._attention_fwd import attention_fwd_kernel

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# (BLOCK_M, BLOCK_N, warps, stages) tried by the autotuner. bf16/fp16 run tl.dot on tensor
# cores. fp32 runs it in IEEE fp32 (see _precision), as FMAs holding the operand tiles in
# registers: the half-precision tiles spilled 1-24 KB a thread there and took 4-105 s each to
# compile (a first fp32 call autotuned for ~5 minutes); these smaller ones spill at most a
# few dozen bytes at head dims up to 128 (benchmarks/results/triton_compile.md, sm_80 and sm_90) and
# compile in about a second each.
_HALF_CONFIGS = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2),
                 (128, 128, 8, 2)]
_FP32_CONFIGS = [(32, 16, 8, 1), (16, 32, 8, 1), (16, 16, 4, 1)]


def _for_dtype(configs, named_args, **kwargs):
    """The configurations of the inputs' dtype (every kernel's first argument is Q)."""
    table = _FP32_CONFIGS if named_args["Q"].dtype == torch.float32 else _HALF_CONFIGS
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps,
                                   c.num_stages) in table]


def _tuned(kernel, key):
    if _INTERPRET:
        return kernel
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for m, n, w, s in _HALF_CONFIGS + _FP32_CONFIGS]
    # the dtype is part of Triton's tuning key already: each dtype tunes over its own list
    return triton.autotune(configs, key=key,
                           prune_configs_by={"early_config_prune": _for_dtype})(kernel)


@functools.cache
def _kernels():
    key = ["D", "IS_VARLEN", "seqlen_bucket"]
    return {
        "fwd": _tuned(attention_fwd_kernel, key),
        "dkdv": _tuned(dkdv_kernel, key),
        "dq": _tuned(dq_kernel, key),
    }


def _fixed_blocks():
    return {"BLOCK_M": 16, "BLOCK_N": 16} if _INTERPRET else {}


def _block_d(d: int) -> int:
    # tl.dot needs every dimension >= 16; non-power-of-two head dims are masked.
    return max(16, triton.next_power_of_2(d))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs: full IEEE products. Triton's default would use TF32 tensor cores on Ampere+,
    # whose 10-bit mantissa breaks the fp32 error budget (2x PyTorch's own fp32 error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _window(wl: int, wr: int, causal: bool) -> tuple[int, int]:
    wr = 0 if causal else wr
    return (BIG if wl < 0 else wl), (BIG if wr < 0 else wr)


class _Geometry:
    """Strides and sequence layout shared by all kernels of one call."""

    def __init__(self, q, k, cu_q=None, cu_k=None, max_q=0, max_k=0):
        self.varlen = cu_q is not None
        if self.varlen:
            self.batch, self.hq, self.hkv = cu_q.numel() - 1, q.shape[1], k.shape[1]
            self.sq, self.sk = max_q, max_k
            self.q_strides = (0, q.stride(1), q.stride(0))
            self.k_strides = (0, k.stride(1), k.stride(0))
            self.cu_q, self.cu_k = cu_q, cu_k
        else:
            self.batch, self.hq, self.sq = q.shape[:3]
            self.hkv, self.sk = k.shape[1], k.shape[2]
            self.q_strides = q.stride()[:3]
            self.k_strides = k.stride()[:3]
            self.cu_q = self.cu_k = q.new_zeros(1, dtype=torch.int32)  # unused placeholder
        self.d = q.shape[-1]
        self.group = self.hq // self.hkv

    def lse_strides(self, lse):
        return (0, lse.stride(0), lse.stride(1)) if self.varlen else lse.stride()

    def new_lse(self, q):
        shape = (self.hq, q.shape[0]) if self.varlen else (self.batch, self.hq, self.sq)
        return torch.empty(shape, device=q.device, dtype=torch.float32)

    def common(self, dtype):
        return dict(D=self.d, BLOCK_D=_block_d(self.d), IS_VARLEN=self.varlen,
                    PRECISION=_precision(dtype), **_fixed_blocks())

    def bucket(self) -> int:
        return triton.next_power_of_2(max(self.sq, self.sk, 1))


def _mask_args(mask, q):
    if mask is None:
        return q.new_zeros(1, dtype=torch.uint8), 0, False
    mask = mask.to(torch.uint8).contiguous()
    return mask, mask.stride(0), True


def _same_layout(a, b) -> bool:
    """Equal strides wherever the size is not 1 (a size-1 dim's stride is never used)."""
    return a.shape == b.shape and all(
        sa == sb for sa, sb, n in zip(a.stride(), b.stride(), a.shape) if n != 1)


def _forward(q, k, v, mask, causal, scale, wl, wr, softcap, geo: _Geometry):
    assert _same_layout(k, v), "k and v must share strides"
    out = torch.empty_like(q)
    lse = geo.new_lse(q)
    mask_t, smb, has_mask = _mask_args(mask, q)
    wl, wr = _window(wl, wr, causal)
    kernel = _kernels()["fwd"]

    def grid(meta):
        return (triton.cdiv(geo.sq, meta["BLOCK_M"]), geo.batch * geo.hq)

    kernel[grid](
        q, k, v, out, lse, mask_t, geo.cu_q, geo.cu_k,
        *geo.q_strides, *geo.k_strides, *geo.k_strides, *geo.q_strides, *geo.lse_strides(lse),
        smb, geo.sq, geo.sk, scale, softcap, wl, wr,
        H=geo.hq, GROUP=geo.group, HAS_MASK=has_mask, HAS_SOFTCAP=softcap > 0,
        seqlen_bucket=geo.bucket(), **geo.common(q.dtype),
    )
    return out, lse


def _backward(dout, q, k, v, out, lse, mask, causal, scale, wl, wr, softcap, geo: _Geometry):
    assert _same_layout(dout, q) and _same_layout(out, q), "dout/out must match q's strides"
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    mask_t, smb, has_mask = _mask_args(mask, q)
    wl, wr = _window(wl, wr, causal)
    lse_strides = geo.lse_strides(lse)
    block_d = _block_d(geo.d)
    delta_kernel[(triton.cdiv(geo.sq, 64), geo.batch * geo.hq)](
        out, dout, delta, *geo.q_strides, *lse_strides, geo.sq, geo.cu_q,
        H=geo.hq, D=geo.d, BLOCK_M=64, BLOCK_D=block_d, IS_VARLEN=geo.varlen,
    )
    args = (*geo.q_strides, *geo.k_strides, *lse_strides, smb, geo.sq, geo.sk, scale, softcap,
            wl, wr)
    flags = dict(GROUP=geo.group, HAS_MASK=has_mask, HAS_SOFTCAP=softcap > 0,
                 seqlen_bucket=geo.bucket(), **geo.common(q.dtype))
    kernels = _kernels()
    kernels["dkdv"][lambda m: (triton.cdiv(geo.sk, m["BLOCK_N"]), geo.batch * geo.hkv)](
        q, k, v, dout, lse, delta, dk, dv, mask_t, geo.cu_q, geo.cu_k, *args, HKV=geo.hkv,
        **flags,
    )
    kernels["dq"][lambda m: (triton.cdiv(geo.sq, m["BLOCK_M"]), geo.batch * geo.hq)](
        q, k, v, dout, lse, delta, dq, mask_t, geo.cu_q, geo.cu_k, *args, H=geo.hq, **flags,
    )
    return dq, dk, dv


def attention_fwd(q, k, v, key_padding_mask, causal, scale, window_left, window_right, softcap):
    return _forward(q, k, v, key_padding_mask, causal, scale, window_left, window_right, softcap,
                    _Geometry(q, k))


def attention_bwd(dout, q, k, v, out, lse, key_padding_mask, causal, scale, window_left,
                  window_right, softcap, deterministic):
    # Always deterministic: no atomics (see _attention_bwd.py).
    return _backward(dout, q, k, v, out, lse, key_padding_mask, causal, scale, window_left,
                     window_right, softcap, _Geometry(q, k))


def attention_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
                         scale, window_left, window_right, softcap):
    geo = _Geometry(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _forward(q, k, v, None, causal, scale, window_left, window_right, softcap, geo)


def attention_varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                         max_seqlen_k, causal, scale, window_left, window_right, softcap,
                         deterministic):
    geo = _Geometry(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _backward(dout, q, k, v, out, lse, None, causal, scale, window_left, window_right,
                     softcap, geo)
