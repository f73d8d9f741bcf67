"""The CUDA attention kernels (csrc/cuda/attention_*.cu), run by the CUDA emulator on the CPU.

No session has had a GPU, so this is how the tensor-core kernels' logic is tested here: the
public op with backend="cuda" runs the real binding and kernels (see fastlm/_cuda_emu.py for
what emulation cannot show). Inputs are fp16/bf16 (the kernels' dtypes) with head dims 64 and
128 (the compiled ones); tolerances are test_attention.py's: within 2x (3x for gradients)
PyTorch's own error in the same dtype, against float64. The GPU versions of these cases are
the `gpu`-marked tests in test_attention.py.
"""

import pytest
import torch
from test_attention import FEATURES, _grads, _inputs, _layouts, check_against_reference

from fastlm._dispatch import BackendUnavailable
from fastlm.ops import attention, attention_varlen
from fastlm.ops.reference import attention_varlen_ref
from fastlm.testing import GRAD_FACTOR, assert_within

# (B, Hq, Hkv, Sq, Sk, D): one token; odd lengths; 65/130 straddle the kernels' 64-row tiles;
# Sq != Sk both ways (bottom-right causal); GQA and MQA; head dim 128.
SHAPES = [
    (1, 1, 1, 1, 1, 64),
    (2, 2, 2, 7, 7, 64),
    (1, 4, 2, 65, 130, 64),
    (1, 2, 2, 130, 63, 128),
    (1, 4, 1, 1, 129, 64),
]


@pytest.mark.parametrize("features", FEATURES, ids=lambda f: "-".join(f) or "plain")
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_cuda_matches_reference(emulated_cuda, dtype, shape, features):
    check_against_reference("cuda", shape, dtype, **features)


@pytest.mark.parametrize("causal", [False, True])
def test_emulated_cuda_varlen_matches_reference(emulated_cuda, causal):
    # packed sequences of unequal lengths, one empty, one longer than a tile
    lens_q, lens_k = [5, 0, 70, 1], [9, 3, 70, 64]
    cu_q = torch.tensor([0] + lens_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lens_k).cumsum(0).to(torch.int32)
    dt = torch.bfloat16
    q = torch.randn(sum(lens_q), 4, 64, dtype=dt)
    k = torch.randn(sum(lens_k), 2, 64, dtype=dt)
    v = torch.randn(sum(lens_k), 2, 64, dtype=dt)
    dout = torch.randn_like(q)
    args = (cu_q, cu_k, max(lens_q), max(lens_k))
    kw = dict(causal=causal)

    def ours(q, k, v):
        return attention_varlen(q, k, v, *args, backend="cuda", **kw)

    def ref(q, k, v):
        return attention_varlen_ref(q, k, v, cu_q, cu_k, upcast=False, **kw)

    out, grads = _grads(ours, q, k, v, dout)
    out64, grads64 = _grads(ref, q.double(), k.double(), v.double(), dout.double())
    base, base_grads = _grads(ref, q, k, v, dout)
    assert_within(out, out64, base, name="out")
    for name, g, g64, gb in zip("qkv", grads, grads64, base_grads):
        assert_within(g, g64, gb, factor=GRAD_FACTOR, name=f"d{name}")


def test_emulated_cuda_backward_is_deterministic_and_fp32_rejected(emulated_cuda):
    q, k, v, _ = _inputs((1, 2, 1, 70, 70, 64), torch.float16)
    dout = torch.randn_like(q)
    fn = lambda q, k, v: attention(q, k, v, causal=True, backend="cuda")  # noqa: E731
    _, g1 = _grads(fn, q, k, v, dout)
    _, g2 = _grads(fn, q, k, v, dout)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))
    with pytest.raises(BackendUnavailable, match="float16, bfloat16"):
        attention(q.float(), k.float(), v.float(), backend="cuda")
    with pytest.raises(BackendUnavailable, match="head dim 32"):
        attention(q[..., :32], k[..., :32], v[..., :32], backend="cuda")


@pytest.mark.parametrize("features", [dict(causal=True, padding=True), dict(window=(5, 3))],
                         ids=lambda f: "-".join(f))
@pytest.mark.parametrize("shape", [(1, 4, 2, 65, 130, 64), (1, 2, 2, 130, 63, 128)], ids=str)
def test_emulated_cuda_in_reverse_thread_order(emulated_cuda, monkeypatch, shape, features):
    # The emulator runs the first ready thread first; in reverse order the last warp runs
    # ahead instead, which exposes a missing barrier whose reader comes after its writer.
    monkeypatch.setenv("FASTLM_CUDA_EMU_SCHEDULE", "reverse")
    check_against_reference("cuda", shape, torch.bfloat16, **features)


@pytest.mark.parametrize("layout", ["bshd", "fused_qkv"])
def test_emulated_cuda_strided_inputs_match_contiguous(emulated_cuda, layout):
    # HF's layouts are made contiguous before the CUDA kernels (they assume dense rows)
    q, k, v = (t.half() for t in _layouts(1, 4, 2, 70, 64)[layout])
    assert not q.is_contiguous()
    dout = torch.randn(q.shape, dtype=q.dtype)
    fn = lambda q, k, v: attention(q, k, v, causal=True, backend="cuda")  # noqa: E731
    out, grads = _grads(fn, q, k, v, dout)
    ref, ref_grads = _grads(fn, q.contiguous(), k.contiguous(), v.contiguous(), dout)
    assert torch.equal(out, ref)
    assert all(torch.equal(g, r) for g, r in zip(grads, ref_grads))
