"""The CUDA emulator itself (csrc/emu, fastlm/_cuda_emu.py): the translator, and the runtime's
checks on kernels that break CUDA's rules on purpose (tests/emu/selftest.cu, built without
torch in a second). The CUDA kernels are tested through it in tests/ops and tests/optim."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fastlm._build import ExtensionBuildError, csrc_dir, cxx_compiler
from fastlm._cuda_emu import translate


def test_translate_rewrites_launches_and_dynamic_shared_memory():
    src = (
        "extern __shared__ __align__(128) unsigned char smem[];\n"
        "extern __shared__ float buf[];\n"
        "if (nb > 0) adamw_kernel<P, S><<<nb, kThreads, 0, stream>>>(l, h);\n"
        "k<<<dim3((n + 7) / 8, h, b), 256, 0, stream>>>(p, x);\n"
    )
    out = translate(src, "x.cu")
    assert out.startswith('#include "emu/device.h"\n#line 1 "x.cu"\n')
    assert "unsigned char* smem = reinterpret_cast<unsigned char*>(::emu::dynamic_smem());" in out
    assert "float* buf = reinterpret_cast<float*>(::emu::dynamic_smem());" in out
    assert "::emu::launch(adamw_kernel<P, S>, nb, kThreads, 0, stream)(l, h);" in out
    assert "::emu::launch(k, dim3((n + 7) / 8, h, b), 256, 0, stream)(p, x);" in out
    assert "<<<" not in out and ">>>" not in out
    out = translate("__shared__ __align__(16) float red[4][33];", "y.cu")
    assert out.endswith('float (&red)[4][33] = *reinterpret_cast<float (*)[4][33]>('
                        '::emu::static_smem("y.cu:0", sizeof(float[4][33])));')


def test_translate_refuses_what_it_cannot_parse():
    with pytest.raises(ExtensionBuildError, match="kernel launch"):
        translate("(*table[i])<<<1, 32>>>(x);", "bad.cu")
    with pytest.raises(ExtensionBuildError, match="dynamic shared memory"):
        translate("extern __shared__ float2 pairs[4];", "bad.cu")
    with pytest.raises(ExtensionBuildError, match="static shared memory"):
        translate("__shared__ float *p;", "bad.cu")


@pytest.fixture(scope="module")
def selftest(tmp_path_factory):
    if shutil.which(cxx_compiler()) is None:
        pytest.skip("no C++ compiler")
    root = csrc_dir()
    here = Path(__file__).parent / "emu" / "selftest.cu"
    tmp = tmp_path_factory.mktemp("emu")
    (tmp / "selftest.cpp").write_text(translate(here.read_text(), str(here)))
    exe = tmp / "selftest"
    subprocess.run([cxx_compiler(), "-std=c++20", "-O1", "-ffp-contract=off", f"-I{root / 'emu'}",
                    f"-I{root}", str(tmp / "selftest.cpp"), str(root / "emu" / "runtime.cpp"),
                    "-o", str(exe)], check=True)
    runs = {}
    for schedule in ("forward", "reverse"):
        env = dict(os.environ, FASTLM_CUDA_EMU_SCHEDULE=schedule)
        out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60, check=True,
                             env=env).stdout
        runs[schedule] = dict(line.split(": ", 1) for line in out.splitlines())
    return runs


@pytest.mark.parametrize("schedule", ["forward", "reverse"])
def test_correct_kernels_run_correctly(selftest, schedule):
    assert selftest[schedule]["neighbour with barrier"] == "correct"
    assert selftest[schedule]["shuffle sum"] == "correct"


def test_missing_barrier_and_unwritten_shared_memory_read_as_nan(selftest):
    # Thread i reads thread i+1's slot. Without the barrier, in index order every thread but
    # the last runs before the neighbour it reads has written; in reverse, only the last
    # (which reads thread 0's slot). Statics are fresh per block: the run with the barrier
    # before it left every slot written.
    assert selftest["forward"]["neighbour without barrier"] == "127 NaN"
    assert selftest["reverse"]["neighbour without barrier"] == "1 NaN"
    assert selftest["forward"]["unwritten shared memory"] == "32 NaN"


@pytest.mark.parametrize("case, message", [
    ("diverged barriers", "deadlock in block (0,0,0): 1 threads wait at __syncthreads; warp 0: 31 at"),
    ("shared memory overflow", "wrote past the 1024 bytes of dynamic shared memory"),
    ("60 KiB without opt-in", "61440 bytes of dynamic shared memory requested; allowed 49152"),
    ("200 KiB with opt-in", "204800 bytes of dynamic shared memory requested; allowed 166912"),
    ("grid y of 70000", "grid (1,70000,1) x block of 64 threads exceeds the limits"),
    ("misaligned wmma", "wmma::load_matrix_sync: pointer not 256-bit aligned"),
])
def test_broken_kernels_are_reported(selftest, case, message):
    assert message in selftest["forward"][case]
