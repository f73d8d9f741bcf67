// A small fp32 GEMM micro-kernel for the tiles of fused CPU kernels:
//
//   C[m][n] (+)= sum_k A(m, k) * B[k][n],   A(m, k) = a[m * a_m + k * a_k]
//
// A is addressed through two strides so the same kernel computes Q K^T (A = Q rows),
// P V (A = P), P^T dO and dS^T Q (A transposed: a_m = 1). B rows are contiguous.
// With AVX2+FMA it keeps a 4 x 16 block of C in 8 registers across the whole k loop: per k,
// 2 loads of B and 4 broadcasts of A feed 8 FMAs, instead of a load and a store of C per FMA.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace fastlm {

inline void gemm_scalar(int m0, int m1, int n0, int n1, int k, const float* a, int a_m, int a_k,
                        const float* b, int ldb, float* c, int ldc, bool acc) {
  for (int i = m0; i < m1; ++i) {
    for (int j = n0; j < n1; ++j) {
      float s = acc ? c[i * ldc + j] : 0.0f;
      for (int kk = 0; kk < k; ++kk) s += a[i * a_m + kk * a_k] * b[kk * ldb + j];
      c[i * ldc + j] = s;
    }
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// C block rows [i, i + 4), columns [j, j + 16).
inline void gemm_4x16(int i, int j, int k, const float* a, int a_m, int a_k, const float* b,
                      int ldb, float* c, int ldc, bool acc) {
  __m256 c00, c01, c10, c11, c20, c21, c30, c31;
  if (acc) {
    c00 = _mm256_loadu_ps(c + (i + 0) * ldc + j), c01 = _mm256_loadu_ps(c + (i + 0) * ldc + j + 8);
    c10 = _mm256_loadu_ps(c + (i + 1) * ldc + j), c11 = _mm256_loadu_ps(c + (i + 1) * ldc + j + 8);
    c20 = _mm256_loadu_ps(c + (i + 2) * ldc + j), c21 = _mm256_loadu_ps(c + (i + 2) * ldc + j + 8);
    c30 = _mm256_loadu_ps(c + (i + 3) * ldc + j), c31 = _mm256_loadu_ps(c + (i + 3) * ldc + j + 8);
  } else {
    c00 = c01 = c10 = c11 = c20 = c21 = c30 = c31 = _mm256_setzero_ps();
  }
  const float* a0 = a + (i + 0) * a_m;
  const float* a1 = a + (i + 1) * a_m;
  const float* a2 = a + (i + 2) * a_m;
  const float* a3 = a + (i + 3) * a_m;
  for (int kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * ldb + j;
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
    const int o = kk * a_k;
    __m256 x = _mm256_broadcast_ss(a0 + o);
    c00 = _mm256_fmadd_ps(x, b0, c00), c01 = _mm256_fmadd_ps(x, b1, c01);
    x = _mm256_broadcast_ss(a1 + o);
    c10 = _mm256_fmadd_ps(x, b0, c10), c11 = _mm256_fmadd_ps(x, b1, c11);
    x = _mm256_broadcast_ss(a2 + o);
    c20 = _mm256_fmadd_ps(x, b0, c20), c21 = _mm256_fmadd_ps(x, b1, c21);
    x = _mm256_broadcast_ss(a3 + o);
    c30 = _mm256_fmadd_ps(x, b0, c30), c31 = _mm256_fmadd_ps(x, b1, c31);
  }
  _mm256_storeu_ps(c + (i + 0) * ldc + j, c00), _mm256_storeu_ps(c + (i + 0) * ldc + j + 8, c01);
  _mm256_storeu_ps(c + (i + 1) * ldc + j, c10), _mm256_storeu_ps(c + (i + 1) * ldc + j + 8, c11);
  _mm256_storeu_ps(c + (i + 2) * ldc + j, c20), _mm256_storeu_ps(c + (i + 2) * ldc + j + 8, c21);
  _mm256_storeu_ps(c + (i + 3) * ldc + j, c30), _mm256_storeu_ps(c + (i + 3) * ldc + j + 8, c31);
}
#endif

// C (m x n) (+)= A (m x k) B (k x n); acc = false overwrites C.
inline void gemm(int m, int n, int k, const float* a, int a_m, int a_k, const float* b, int ldb,
                 float* c, int ldc, bool acc) {
#if defined(__AVX2__) && defined(__FMA__)
  const int m4 = m - m % 4, n16 = n - n % 16;
  for (int i = 0; i < m4; i += 4)
    for (int j = 0; j < n16; j += 16) gemm_4x16(i, j, k, a, a_m, a_k, b, ldb, c, ldc, acc);
  gemm_scalar(0, m4, n16, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
  gemm_scalar(m4, m, 0, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
#else
  gemm_scalar(0, m, 0, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
#endif
}

}  // namespace fastlm
