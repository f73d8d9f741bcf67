"""The CPU bf16 x bf16 -> fp32 matmul (csrc/cpu/bf16_matmul.cpp) that the fused cross-entropy's
weight gradient accumulates with on AMX CPUs.

Built only with AVX-512 BF16. Judged against float64 by the project's error rule, torch's
baseline being the same product in fp32 (torch has no bf16 -> fp32 matmul on the CPU). Shapes
cover the packers' tails (odd k, rows and columns not a multiple of a tile), all four operand
layouts (row-major or transposed views, as the cross-entropy passes logits.T), and both the
overwriting and the accumulating form.
"""

import os
import subprocess
import sys

import pytest
import torch

from fastlm._build import load_extension
from fastlm.testing import assert_within

_EXT = load_extension("cpu")
HAS_OP = hasattr(_EXT, "bf16_matmul_acc_")
pytestmark = pytest.mark.skipif(not HAS_OP, reason="built only where the CPU has AVX-512 BF16")

# (64, 96, 128), (70, 40, 64): k a multiple of 32, so a row-major A is read in place (the
# second with a partial last block of 26 rows, packed); (40, 20, 4096): a long k, whose sum
# the kernel must block as torch's GEMM does (one chain of roundings per lane had 3-5x its
# error on an EPYC's vdpbf16ps path)
SHAPES = [(1, 1, 1), (5, 17, 33), (37, 64, 70), (100, 3, 300), (33, 48, 15), (64, 96, 128),
          (90, 40, 64), (211, 32, 166), (40, 20, 4096)]


def _operand(rows, cols, transposed, g):
    if transposed:
        return torch.randn(cols, rows, generator=g).bfloat16().t()
    return torch.randn(rows, cols, generator=g).bfloat16()


@pytest.mark.parametrize("m, n, k", SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["rr", "rt", "tr", "tt"])
@pytest.mark.parametrize("accumulate", [False, True])
def test_matches_float64(m, n, k, layout, accumulate):
    g = torch.Generator().manual_seed(m * 1000 + n * 10 + k)
    a = _operand(m, k, layout[0] == "t", g)
    b = _operand(k, n, layout[1] == "t", g)
    c0 = torch.randn(m, n, generator=g)
    c = c0.clone()
    _EXT.bf16_matmul_acc_(c, a, b, accumulate)
    start = c0 if accumulate else torch.zeros_like(c0)
    ref64 = start.double() + a.double() @ b.double()
    base = start + a.float() @ b.float()
    assert_within(c, ref64, base, factor=2)


def test_writes_only_its_block_of_a_wider_output():
    """c may be a column slice of a wider matrix (row stride > n): the rest stays untouched."""
    g = torch.Generator().manual_seed(1)
    a, b = _operand(40, 24, False, g), _operand(24, 20, True, g)
    wide = torch.randn(40, 50, generator=g)
    before = wide.clone()
    _EXT.bf16_matmul_acc_(wide[:, 10:30], a, b, True)
    assert torch.equal(wide[:, :10], before[:, :10]) and torch.equal(wide[:, 30:], before[:, 30:])
    assert_within(wide[:, 10:30], before[:, 10:30].double() + a.double() @ b.double(),
                  before[:, 10:30] + a.float() @ b.float(), factor=2)


def test_bad_inputs_name_the_argument():
    a, b, c = torch.zeros(4, 6).bfloat16(), torch.zeros(6, 5).bfloat16(), torch.zeros(4, 5)
    with pytest.raises(RuntimeError, match="a must be bfloat16"):
        _EXT.bf16_matmul_acc_(c, a.float(), b, True)
    with pytest.raises(RuntimeError, match="inner sizes differ"):
        _EXT.bf16_matmul_acc_(c, a, b[:5], True)
    with pytest.raises(RuntimeError, match="c must be a float32 CPU matrix of shape"):
        _EXT.bf16_matmul_acc_(c.bfloat16(), a, b, True)
    with pytest.raises(RuntimeError, match="unit stride"):
        _EXT.bf16_matmul_acc_(c, torch.zeros(8, 12).bfloat16()[::2, ::2], b, True)


@pytest.mark.skipif(not (HAS_OP and _EXT.bf16_matmul_amx()),
                    reason="the CPU has no AMX tiles: the vector path is what ran above")
def test_vector_path_where_amx_runs():
    """FASTLM_CPU_AMX=0 (read once per process, hence a subprocess) runs the vdpbf16ps blocks
    the CPUs without AMX use; the cases above ran on the tiles."""
    env = dict(os.environ, FASTLM_CPU_AMX="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        __file__, "-k", "test_matches_float64"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    probe = subprocess.run([sys.executable, "-c", "from fastlm._build import load_extension; "
                            "print(load_extension('cpu').bf16_matmul_amx())"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip().endswith("False"), probe.stdout + probe.stderr


@pytest.mark.skipif(not (HAS_OP and _EXT.bf16_matmul_amx()), reason="the CPU has no AMX tiles")
@pytest.mark.parametrize("value, on", [("off", False), ("False", False), ("no", False),
                                       ("1", True)])
def test_amx_switch_reads_the_usual_spellings(value, on):
    probe = subprocess.run([sys.executable, "-c", "from fastlm._build import load_extension; "
                            "print(load_extension('cpu').bf16_matmul_amx())"],
                           env=dict(os.environ, FASTLM_CPU_AMX=value), capture_output=True,
                           text=True, timeout=300)
    assert probe.stdout.strip().endswith(str(on)), probe.stdout + probe.stderr
