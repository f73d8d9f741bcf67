"""Rotary embedding against float64, every backend, by the fused ops' error rule (2x torch's
same-dtype error for outputs, 3x for gradients; fastlm.testing).

Shapes include one position, odd lengths, GQA (fewer k heads), partial rotary (R < D, as
GPT-NeoX/Phi), a head dim that is not a power of two, per-batch tables (position ids that
differ per sequence) and HF's transposed (B, S, H, D) views. Tables are real RoPE angles
(halves repeated, as HF builds them) and, in one case, arbitrary values, so the backward's
transpose is checked where the halves differ. Triton runs in the interpreter in fp32 (its
bf16 conversions are unreliable there); bf16/fp16 Triton cases are gpu-marked.
"""

import logging

import pytest
import torch

from fastlm.ops import reference as R
from fastlm.ops.rotary import rotary
from fastlm.testing import GRAD_FACTOR, assert_within

HAS_CUDA = torch.cuda.is_available()
LOW = (torch.float32, torch.bfloat16, torch.float16)
CASES = [(b, d) for b in ("cpu", "torch") for d in LOW]
CASES += [] if HAS_CUDA else [("triton", torch.float32)]
CASES += [pytest.param("triton", d, marks=pytest.mark.gpu) for d in LOW]

# (batch, q heads, k heads, seqlen, head_dim, rot_dim, per-batch table, HF layout)
SHAPES = [
    (1, 1, 1, 1, 2, 2, False, False),
    (2, 3, 1, 7, 16, 16, True, True),
    (1, 4, 2, 33, 10, 6, False, True),
    (2, 2, 2, 65, 64, 64, False, False),
    (3, 2, 1, 5, 80, 40, True, False),
]


def _tables(batch, seqlen, rot, per_batch, dtype, device, arbitrary=False):
    if arbitrary:
        shape = (batch if per_batch else 1, seqlen, rot)
        return (torch.randn(shape, device=device).to(dtype),
                torch.randn(shape, device=device).to(dtype))
    inv = 1.0 / (10000 ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot))
    pos = torch.arange(seqlen, dtype=torch.float64)
    pos = pos[None] + torch.arange(batch if per_batch else 1)[:, None] * 3  # shifted ids
    ang = torch.cat([pos[..., None] * inv] * 2, dim=-1)
    return ang.cos().to(device=device, dtype=dtype), ang.sin().to(device=device, dtype=dtype)


def _qk(batch, hq, hk, seqlen, dim, hf_layout, dtype, device):
    def make(h):
        if hf_layout:  # HF's projections come out (B, S, H, D) and are transposed
            return torch.randn(batch, seqlen, h, dim, device=device).to(dtype).transpose(1, 2)
        return torch.randn(batch, h, seqlen, dim, device=device).to(dtype)

    return make(hq), make(hk)


def _run(fn, q, k, cos, sin, dq, dk):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    qo, ko = fn(q, k, cos, sin)
    gq, gk = torch.autograd.grad((qo, ko), (q, k), (dq, dk))
    return qo.detach(), ko.detach(), gq, gk


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("arbitrary", [False, True], ids=["rope", "arbitrary-tables"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
def test_rotary_matches_float64(backend, dtype, shape, arbitrary, interleaved):
    batch, hq, hk, seqlen, dim, rot, per_batch, hf_layout = shape
    dev = "cuda" if backend == "triton" and HAS_CUDA else "cpu"
    q, k = _qk(batch, hq, hk, seqlen, dim, hf_layout, dtype, dev)
    cos, sin = _tables(batch, seqlen, rot, per_batch, dtype, dev, arbitrary)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    out = _run(lambda *a: rotary(*a, interleaved=interleaved, backend=backend), q, k, cos, sin,
               dq, dk)
    base = _run(lambda *a: R.rotary_ref(*a, upcast=False, interleaved=interleaved), q, k, cos,
                sin, dq, dk)
    ref = _run(lambda *a: R.rotary_ref(*a, interleaved=interleaved), q.double(), k.double(),
               cos.double(), sin.double(), dq.double(), dk.double())
    for i, name in enumerate(("q_out", "k_out", "dq", "dk")):
        factor = 2 if i < 2 else GRAD_FACTOR
        assert out[i].dtype == dtype and out[i].shape == ref[i].shape
        assert_within(out[i], ref[i], base[i], factor=factor, name=name)
    if interleaved:
        return
    # the grads also equal the closed-form transpose (shared reference)
    gq, gk = R.rotary_bwd_ref(dq.double(), dk.double(), cos.double(), sin.double())
    torch.testing.assert_close(ref[2], gq)
    torch.testing.assert_close(ref[3], gk)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_output_keeps_the_input_layout(backend):
    q = torch.randn(2, 9, 4, 16).transpose(1, 2)  # HF layout, not contiguous
    cos, sin = _tables(1, 9, 16, False, torch.float32, "cpu")
    qo, _ = rotary(q, None, cos, sin, backend=backend)
    assert qo.stride() == q.stride()
    torch.testing.assert_close(qo, R.rotary_ref(q, q, cos, sin)[0])


def test_matches_transformers_llama_rope():
    """Tables in HF's own form ((B, S, D) from the model's rotary module) give HF's result."""
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as ml

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    emb = ml.LlamaRotaryEmbedding(cfg)
    x = torch.randn(2, 11, 64)
    pos = torch.stack([torch.arange(11), torch.arange(5, 16)])
    cos, sin = emb(x, pos)
    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 2, 11, 16)
    want = ml.apply_rotary_pos_emb(q, k, cos, sin)
    got = rotary(q, k, cos[:, None], sin[:, None])
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)


def test_tables_that_need_grad_are_announced_and_differentiated(caplog, monkeypatch):
    import sys

    # warned once a process (the name fastlm.ops.rotary is the function; the module's here)
    monkeypatch.setattr(sys.modules["fastlm.ops.rotary"], "_warned_table_grad", False)
    q = torch.randn(1, 2, 5, 8, requires_grad=True)
    cos, sin = _tables(1, 5, 8, False, torch.float32, "cpu")
    cos.requires_grad_()
    with caplog.at_level(logging.WARNING, logger="fastlm"):
        qo, ko = rotary(q, None, cos, sin)
    assert ko is None
    qo.sum().backward()
    assert cos.grad is not None and q.grad is not None
    assert "cos/sin require grad" in caplog.text
    torch.testing.assert_close(qo, R.rotary_ref(q, q, cos, sin)[0])


def test_bad_inputs_name_the_argument():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 1, 5, 8)
    cos, sin = _tables(1, 5, 8, False, torch.float32, "cpu")
    with pytest.raises(ValueError, match="q must be 4-D"):
        rotary(q[0], k, cos, sin)
    with pytest.raises(ValueError, match="k .* must be"):
        rotary(q, torch.randn(1, 1, 6, 8), cos, sin)
    with pytest.raises(ValueError, match="cos must be .* seqlen=5"):
        rotary(q, k, cos[:, :4], sin)
    with pytest.raises(ValueError, match="rot_dim = 7"):
        rotary(q, k, cos[..., :7], sin[..., :7])
    with pytest.raises(ValueError, match="differ in shape"):
        rotary(q, k, cos, sin[..., :6])
    with pytest.raises(ValueError, match="k .* must match q"):
        rotary(q, k.double(), cos, sin)
