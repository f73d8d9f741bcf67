"""RMSNorm, LayerNorm, GELU/SiLU and SwiGLU/GeGLU against float64, every backend.

Error rule (fastlm.testing): |kernel - ref64| <= 2x (outputs) / 3x (gradients) the error of
PyTorch's own computation in the same dtype, plus a per-dtype floor. Shapes include one row,
odd hidden sizes and sizes that are not a multiple of any block. The Triton cases run in
Triton's interpreter on the CPU in fp32 (the interpreter's bf16 conversions are unreliable
here; bf16 is covered on GPU by the gpu-marked cases).
"""

import pytest
import torch

from fastlm.ops import reference as R
from fastlm.ops.activations import geglu, gelu, silu, swiglu
from fastlm.ops.norms import layer_norm, rms_norm
from fastlm.testing import GRAD_FACTOR, assert_within

HAS_CUDA = torch.cuda.is_available()
SHAPES = [(1, 1), (3, 7), (2, 5, 127), (4, 1025)]
CPU_CASES = [(b, d) for b in ("cpu", "torch") for d in (torch.float32, torch.bfloat16,
                                                        torch.float16)]
CPU_CASES += [] if HAS_CUDA else [("triton", torch.float32)]
GPU_CASES = [pytest.param(b, d, marks=pytest.mark.gpu) for b in ("triton",)
             for d in (torch.float32, torch.bfloat16, torch.float16)]
CASES = CPU_CASES + GPU_CASES


def _device(backend):
    return "cuda" if backend == "triton" and HAS_CUDA else "cpu"


def _run(fn, inputs, dy):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out, leaves, dy)


def _compare(fused, torch_fn, inputs, dy):
    """fused(inputs) vs float64 torch_fn, judged against torch_fn in the inputs' dtype."""
    out, grads = _run(fused, inputs, dy)
    base, base_grads = _run(torch_fn, inputs, dy)
    ref, ref_grads = _run(torch_fn, [t.double() for t in inputs], dy.double())
    assert out.dtype == inputs[0].dtype and out.shape == ref.shape
    assert_within(out, ref, base, factor=2)
    for g, g64, gb in zip(grads, ref_grads, base_grads):
        assert_within(g, g64, gb, factor=GRAD_FACTOR)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm(backend, dtype, shape, offset):
    dev = _device(backend)
    x = torch.randn(shape, device=dev).to(dtype)
    w = torch.randn(shape[-1], device=dev)  # fp32 weight with low-precision activations
    dy = torch.randn_like(x)
    _compare(lambda x, w: rms_norm(x, w, 1e-6, offset=offset, backend=backend),
             lambda x, w: R.rms_norm_ref(x, w, 1e-6, offset=offset, upcast=False), [x, w], dy)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, dtype", CASES)
def test_layer_norm(backend, dtype, shape):
    dev = _device(backend)
    x = (torch.randn(shape, device=dev) * 2 + 1).to(dtype)
    w, b = torch.randn(shape[-1], device=dev), torch.randn(shape[-1], device=dev)
    dy = torch.randn_like(x)

    def ref(x, w, b):  # torch's layer_norm needs one dtype: the weight follows x
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), w.to(x.dtype), b.to(x.dtype),
                                              1e-5)

    _compare(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend=backend), ref, [x, w, b], dy)


@pytest.mark.parametrize("kind", ["gelu_tanh", "silu"])
def test_cpu_16bit_activations_round_like_float64(kind):
    """16-bit activations take their sigmoid's exponential from a cheaper polynomial (~3e-6
    relative; csrc/cpu/fused_simd.h exp_neg_16bit). fp16 results must still round like the
    float64 values: measured 0.07-0.17% of them one unit off (the fp32 exponential: 0.01%).
    The error rule above is blind to a 0.05% error in one coefficient, which gives 4-8% here."""
    from fastlm.ops.activations import ACT_CODES, _act_bwd, _act_fwd

    g = torch.Generator().manual_seed(0)
    x = (torch.rand(200_000, generator=g, dtype=torch.float64) * 16 - 8).half()
    dy = torch.randn(200_000, generator=g).half()
    f64, df64 = R.activation_and_grad_ref(x.double(), kind)
    y = _act_fwd(x, ACT_CODES[kind], "cpu")
    dx = _act_bwd(dy, x, ACT_CODES[kind], "cpu")
    for got, ref in ((y, f64), (dx, dy.double() * df64)):
        assert (got != ref.half()).double().mean().item() <= 0.005


# (131, 257): above the CPU kernels' threading threshold (2^15 elements), so the rows are split
# between threads, each summing its own weight/bias-gradient slice; 131 rows leave remainders
# after the kernels' groups of 4 rows, and 257 a partial vector.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_norms_threaded(dtype):
    x = (torch.randn(131, 257) * 2 + 1).to(dtype)
    w, b = torch.randn(257), torch.randn(257)
    dy = torch.randn_like(x)
    _compare(lambda x, w: rms_norm(x, w, 1e-6, backend="cpu"),
             lambda x, w: R.rms_norm_ref(x, w, 1e-6, upcast=False), [x, w], dy)
    _compare(lambda x, w, b: layer_norm(x, w, b, 1e-5, backend="cpu"),
             lambda x, w, b: torch.nn.functional.layer_norm(
                 x, (257,), w.to(x.dtype), b.to(x.dtype), 1e-5), [x, w, b], dy)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_norms_without_weight(backend):
    x = torch.randn(3, 33)
    torch.testing.assert_close(rms_norm(x, None, backend=backend),
                               R.rms_norm_ref(x, None), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer_norm(x, None, None, backend=backend),
                               torch.nn.functional.layer_norm(x, (33,)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("kind", ["gelu", "gelu_tanh", "silu"])
def test_activation(backend, dtype, shape, kind):
    x = (torch.randn(shape, device=_device(backend)) * 3).to(dtype)
    dy = torch.randn_like(x)
    approx = "tanh" if kind == "gelu_tanh" else "none"
    if kind == "silu":
        fused, ref = (lambda x: silu(x, backend=backend)), torch.nn.functional.silu
    else:
        fused = lambda x: gelu(x, approx, backend=backend)  # noqa: E731
        ref = lambda x: torch.nn.functional.gelu(x, approximate=approx)  # noqa: E731
    _compare(fused, ref, [x], dy)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend, dtype", CASES)
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_gated_units(backend, dtype, shape, kind):
    dev = _device(backend)
    gate, up = (torch.randn(shape, device=dev) * 2).to(dtype), torch.randn(shape, device=dev).to(dtype)
    dy = torch.randn_like(gate)
    if kind == "swiglu":
        fused = lambda g, u: swiglu(g, u, backend=backend)  # noqa: E731
        ref = lambda g, u: torch.nn.functional.silu(g) * u  # noqa: E731
    else:
        fused = lambda g, u: geglu(g, u, backend=backend)  # noqa: E731
        ref = lambda g, u: torch.nn.functional.gelu(g, approximate="tanh") * u  # noqa: E731
    _compare(fused, ref, [gate, up], dy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_low_precision_stores_round_like_torch(dtype):
    """The CPU kernels' bf16/fp16 stores: round to nearest even, overflow to inf, NaN kept.

    For gate >= 20, silu(gate) is exactly gate in fp32 (sigmoid rounds to 1), and the product
    of two 8- or 11-bit mantissas is exact in fp32, so swiglu's output is the single rounding
    of gate * up: it must equal torch's rounding of the same fp32 product bit for bit, ties
    included (products of short mantissas hit ties often). Sizes cover the vector body and
    the tail of every SIMD width.
    """
    g = torch.Generator().manual_seed(0)
    n = 16 * 37 + 5
    gate = (torch.rand(n, generator=g) * 80 + 20).to(dtype)
    up = torch.randn(n, generator=g).to(dtype)
    big = torch.finfo(dtype).max
    up[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    gate[4], up[4] = 99.0, big  # 99 * max overflows to inf
    out = swiglu(gate, up, backend="cpu")
    want = (gate.float() * up.float()).to(dtype)
    assert torch.equal(out.isnan(), want.isnan()) and bool(out[0].isnan())
    finite = ~want.isnan()
    assert torch.equal(out[finite], want[finite])
    assert out[4] == float("inf")


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        rms_norm(x, torch.ones(7))
    with pytest.raises(ValueError, match="x has dtype torch.int64"):
        layer_norm(torch.ones(4, 8, dtype=torch.long), None, None)
    with pytest.raises(ValueError, match="up .* must match gate"):
        swiglu(x, torch.randn(4, 9))
    with pytest.raises(ValueError, match="approximate must be"):
        gelu(x, "fast")


def test_explicit_unavailable_backend_raises():
    from fastlm._dispatch import BackendUnavailable

    if not HAS_CUDA:
        import os

        os.environ.pop("TRITON_INTERPRET", None)  # read per call by the triton check
        try:
            with pytest.raises(BackendUnavailable, match="triton"):
                gelu(torch.randn(3), backend="triton")
        finally:
            os.environ["TRITON_INTERPRET"] = "1"
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*choose one of"):
        gelu(torch.randn(3), backend="cuda")
