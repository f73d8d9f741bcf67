// C (fp32) += A B for bf16 matrices on the CPU (raw pointers, no torch here), fp32
// accumulation. Built where the compiler targets AVX-512 BF16 (FASTLM_DPBF16); the blocks run
// on AMX tiles where the CPU has them (see bf16_gemm.h), else on vdpbf16ps.
#pragma once

#include <cstdint>

#include "common/cpu_vec.h"

namespace fastlm {

// A bf16 matrix operand: element (i, j) at p[i * s0 + j * s1], with s0 == 1 or s1 == 1
// (row-major, or a transposed view).
struct MatView {
  const bf16* p;
  int64_t s0, s1;
};

// c (m x n fp32, row stride ldc) += a (m x k) b (k x n); accumulate = false: c = a b.
void bf16_matmul_acc_cpu(int64_t m, int64_t n, int64_t k, MatView a, MatView b, float* c,
                         int64_t ldc, bool accumulate);

// Whether the blocks run on AMX tiles in this process (the CPU has them, Linux granted them,
// FASTLM_CPU_AMX is not 0).
bool bf16_matmul_uses_amx();

}  // namespace fastlm
