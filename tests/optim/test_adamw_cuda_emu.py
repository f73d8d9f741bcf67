"""The CUDA multi-tensor AdamW (csrc/cuda/adamw.cu), run by the CUDA emulator on the CPU.

FusedAdamW with backend="cuda" goes through the real binding and kernel (fastlm/_cuda_emu.py).
The kernel spells out torch's operation order with round-to-nearest intrinsics, as the CPU
kernel does in C++, so the two must agree bit for bit; against torch.optim.AdamW the bound is
test_adamw.py's. The tensor list is sized to cross the kernel's launch packing: more tensors
than one launch's table holds (24), a tensor with more chunks than one launch's blocks (320 of
16384 elements) continuing into the next launch, and empty, odd and one-element tensors.
"""

import pytest
import torch

from fastlm.optim import FusedAdamW

# 30 tensors; the 5.3M-element one spans 324 chunks
SIZES = [(1,), (0,), (7,), (33, 5), (16385,)] * 5 + [(5_300_000,)]
SIZES = SIZES[:25] + [(5_300_000,)] + SIZES[25:29]


def _run(backend, dtype=torch.float32, steps=3, **kw):
    torch.manual_seed(0)
    params = [torch.randn(s, dtype=dtype, requires_grad=True) for s in SIZES]
    opt = FusedAdamW([{"params": params[:20], "weight_decay": 0.1},
                      {"params": params[20:], "weight_decay": 0.0}],
                     lr=3e-3, betas=(0.9, 0.95), backend=backend, **kw)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


@pytest.mark.parametrize("kw", [dict(), dict(state_dtype=torch.bfloat16)], ids=["fp32", "bf16-states"])
def test_emulated_cuda_matches_cpu_kernel_bitwise(emulated_cuda, kw):
    ours, opt = _run("cuda", **kw)
    ref, opt_ref = _run("cpu", **kw)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], opt_ref.state[b][key]), key


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_cuda_low_precision_params_with_masters(emulated_cuda, dtype):
    ours, opt = _run("cuda", dtype=dtype)
    ref, opt_ref = _run("cpu", dtype=dtype)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)
        assert torch.equal(opt.state[a]["master"], opt_ref.state[b]["master"])
        assert torch.equal(a.detach(), opt.state[a]["master"].to(dtype))  # rounded write-back


def test_emulated_cuda_matches_torch_adamw(emulated_cuda):
    torch.manual_seed(1)
    ref = [torch.randn(s, requires_grad=True) for s in [(1,), (7,), (33, 5), (65537,)]]
    ours = [p.detach().clone().requires_grad_() for p in ref]
    opt_ref = torch.optim.AdamW(ref, lr=3e-3, foreach=False)
    opt = FusedAdamW(ours, lr=3e-3, backend="cuda")
    for _ in range(20):
        for a, b in zip(ref, ours):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt_ref.step()
        opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
