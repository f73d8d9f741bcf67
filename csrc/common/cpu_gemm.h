// A small fp32 GEMM micro-kernel for the tiles of fused CPU kernels:
//
//   C[m][n] (+)= sum_k A(m, k) * B[k][n],   A(m, k) = a[m * a_m + k * a_k]
//
// A is addressed through two strides so the same kernel computes Q K^T (A = Q rows),
// P V (A = P), P^T dO and dS^T Q (A transposed: a_m = 1). B rows are contiguous.
// With AVX2+FMA it keeps a 6 x 16 block of C in 12 registers across the whole k loop (below),
// instead of a load and a store of C per FMA; the last rows of a tile use a smaller block.
#pragma once

#include <type_traits>

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

// Calls block(std::integral_constant<int, M>{}, i) over rows [i0, m): blocks of M = 6 rows,
// then one block of the 1-5 left; the register-blocked GEMM tiles instantiate per M.
template <typename Block>
inline void row_blocks6(int i0, int m, Block&& block) {
  int i = i0;
  for (; i + 6 <= m; i += 6) block(std::integral_constant<int, 6>{}, i);
  switch (m - i) {
    case 5: return block(std::integral_constant<int, 5>{}, i);
    case 4: return block(std::integral_constant<int, 4>{}, i);
    case 3: return block(std::integral_constant<int, 3>{}, i);
    case 2: return block(std::integral_constant<int, 2>{}, i);
    case 1: return block(std::integral_constant<int, 1>{}, i);
    default: return;
  }
}

// The same with blocks of M = 8 rows (AVX-512: 32 registers hold 8 x 32 of C, and the
// attention tiles' 32 and 64 rows split into whole blocks instead of 6s and a 2-row remainder)
template <typename Block>
inline void row_blocks8(int i0, int m, Block&& block) {
  int i = i0;
  for (; i + 8 <= m; i += 8) block(std::integral_constant<int, 8>{}, i);
  switch (m - i) {
    case 7: return block(std::integral_constant<int, 7>{}, i);
    case 6: return block(std::integral_constant<int, 6>{}, i);
    case 5: return block(std::integral_constant<int, 5>{}, i);
    case 4: return block(std::integral_constant<int, 4>{}, i);
    case 3: return block(std::integral_constant<int, 3>{}, i);
    case 2: return block(std::integral_constant<int, 2>{}, i);
    case 1: return block(std::integral_constant<int, 1>{}, i);
    default: return;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// C block rows [i, i + M), columns [j, j + 16), held in 2M registers across the whole k loop:
// per k, 2 loads of B and M broadcasts of A feed 2M FMAs. M = 6 uses 12 accumulators + 2 B +
// 1 broadcast of the 16 ymm registers (the FMA units stay busy: 12 FMAs per 8 loads, where a
// 4-row block gave 8 per 6); smaller M serve the last rows of a tile.
template <int M>
inline void gemm_rows_x16(int i, int j, int k, const float* a, int a_m, int a_k, const float* b,
                          int ldb, float* c, int ldc, bool acc) {
  __m256 c0[M], c1[M];
  const float* ar[M];
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    c0[r] = acc ? _mm256_loadu_ps(c + (i + r) * ldc + j) : _mm256_setzero_ps();
    c1[r] = acc ? _mm256_loadu_ps(c + (i + r) * ldc + j + 8) : _mm256_setzero_ps();
    ar[r] = a + (i + r) * a_m;
  }
  for (int kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * ldb + j;
    const __m256 b0 = _mm256_loadu_ps(bk), b1 = _mm256_loadu_ps(bk + 8);
    const int o = kk * a_k;
#pragma GCC unroll 6
    for (int r = 0; r < M; ++r) {
      const __m256 x = _mm256_broadcast_ss(ar[r] + o);
      c0[r] = _mm256_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm256_fmadd_ps(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < M; ++r) {
    _mm256_storeu_ps(c + (i + r) * ldc + j, c0[r]);
    _mm256_storeu_ps(c + (i + r) * ldc + j + 8, c1[r]);
  }
}

#if defined(__AVX512F__)
// 32 columns in zmm registers, blocks of up to 8 rows (row_blocks8): on CPUs with two 512-bit
// FMA units (Intel Xeon since Skylake-SP) a ymm kernel runs at half the FMA rate (fp32
// attention measured 0.7x SDPA on a Sapphire-Rapids-class VM with the ymm kernel alone); on
// EPYC (Zen 4 splits a zmm op in two) it is no slower. Each C element sums its k terms in the
// same order either way.
template <int M>
inline void gemm_rows_x32(int i, int j, int k, const float* a, int a_m, int a_k, const float* b,
                          int ldb, float* c, int ldc, bool acc) {
  __m512 c0[M], c1[M];
  const float* ar[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    c0[r] = acc ? _mm512_loadu_ps(c + (i + r) * ldc + j) : _mm512_setzero_ps();
    c1[r] = acc ? _mm512_loadu_ps(c + (i + r) * ldc + j + 16) : _mm512_setzero_ps();
    ar[r] = a + (i + r) * a_m;
  }
  for (int kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * ldb + j;
    const __m512 b0 = _mm512_loadu_ps(bk), b1 = _mm512_loadu_ps(bk + 16);
    const int o = kk * a_k;
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const __m512 x = _mm512_set1_ps(ar[r][o]);
      c0[r] = _mm512_fmadd_ps(x, b0, c0[r]);
      c1[r] = _mm512_fmadd_ps(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    _mm512_storeu_ps(c + (i + r) * ldc + j, c0[r]);
    _mm512_storeu_ps(c + (i + r) * ldc + j + 16, c1[r]);
  }
}
#endif

// Rows [i0, m) of the 16-wide column block j, in blocks of 6 then one smaller block.
inline void gemm_col_block(int i0, int m, int j, int k, const float* a, int a_m, int a_k,
                           const float* b, int ldb, float* c, int ldc, bool acc) {
  row_blocks6(i0, m, [&](auto rows, int i) {
    gemm_rows_x16<decltype(rows)::value>(i, j, k, a, a_m, a_k, b, ldb, c, ldc, acc);
  });
}
#endif

// C (m x n) (+)= A (m x k) B (k x n); acc = false overwrites C.
inline void gemm(int m, int n, int k, const float* a, int a_m, int a_k, const float* b, int ldb,
                 float* c, int ldc, bool acc) {
#if defined(__AVX2__) && defined(__FMA__)
  const int n16 = n - n % 16;
  int j0 = 0;
#if defined(__AVX512F__)
  for (; j0 + 32 <= n; j0 += 32)
    row_blocks8(0, m, [&](auto rows, int i) {
      gemm_rows_x32<decltype(rows)::value>(i, j0, k, a, a_m, a_k, b, ldb, c, ldc, acc);
    });
#endif
  for (int j = j0; j < n16; j += 16) gemm_col_block(0, m, j, k, a, a_m, a_k, b, ldb, c, ldc, acc);
  gemm_scalar(0, m, n16, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
#else
  gemm_scalar(0, m, 0, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
#endif
}

}  // namespace fastlm
