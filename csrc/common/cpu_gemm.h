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

// block(std::integral_constant<int, R>{}, i) for the one remainder size R = rem (1 <= R < N).
template <int R, typename Block>
inline void row_remainder(int rem, int i, Block& block) {
  if constexpr (R > 0) {
    if (rem == R) return block(std::integral_constant<int, R>{}, i);
    row_remainder<R - 1>(rem, i, block);
  }
}

// Calls block(std::integral_constant<int, M>{}, i) over rows [i0, m): blocks of M = N rows,
// then one block of the 1..N-1 left; the register-blocked GEMM tiles instantiate per M.
// N = 6 for ymm kernels; N = 8 for zmm ones (32 registers hold 8 x 32 of C, and the attention
// tiles' 32 and 64 rows split into whole blocks instead of 6s and a 2-row remainder).
template <int N, typename Block>
inline void row_blocks(int i0, int m, Block&& block) {
  int i = i0;
  for (; i + N <= m; i += N) block(std::integral_constant<int, N>{}, i);
  row_remainder<N - 1>(m - i, i, block);
}

#if defined(__AVX2__) && defined(__FMA__)
// The register width a block kernel runs in: ymm (8 floats) or, with AVX-512, zmm (16). On CPUs
// with two 512-bit FMA units (Intel Xeon since Skylake-SP) the ymm kernel runs at half the FMA
// rate (fp32 attention measured 0.7x SDPA on a Sapphire-Rapids-class VM with it alone); on
// EPYC (Zen 4 splits a zmm op in two) zmm is no slower. Each C element sums its k terms in the
// same order either way.
struct Ymm {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static V zero() { return _mm256_setzero_ps(); }
  static V splat(const float* p) { return _mm256_broadcast_ss(p); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
};
#if defined(__AVX512F__)
struct Zmm {
  using V = __m512;
  static constexpr int kLanes = 16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static V zero() { return _mm512_setzero_ps(); }
  static V splat(const float* p) { return _mm512_set1_ps(*p); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
};
#endif

// C block rows [i, i + M), columns [j, j + 2 lanes), held in 2M registers across the whole k
// loop: per k, 2 loads of B and M broadcasts of A feed 2M FMAs. In ymm, M = 6 uses 12
// accumulators + 2 B + 1 broadcast of the 16 registers (12 FMAs per 8 loads, where a 4-row
// block gave 8 per 6); in zmm M = 8 (16 accumulators of 32 registers). Smaller M serve the
// last rows of a tile.
template <typename R, int M>
inline void gemm_rows(int i, int j, int k, const float* a, int a_m, int a_k, const float* b,
                      int ldb, float* c, int ldc, bool acc) {
  constexpr int L = R::kLanes;
  typename R::V c0[M], c1[M];
  const float* ar[M];
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    c0[r] = acc ? R::load(c + (i + r) * ldc + j) : R::zero();
    c1[r] = acc ? R::load(c + (i + r) * ldc + j + L) : R::zero();
    ar[r] = a + (i + r) * a_m;
  }
  for (int kk = 0; kk < k; ++kk) {
    const float* bk = b + kk * ldb + j;
    const typename R::V b0 = R::load(bk), b1 = R::load(bk + L);
    const int o = kk * a_k;
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      const typename R::V x = R::splat(ar[r] + o);
      c0[r] = R::fma(x, b0, c0[r]);
      c1[r] = R::fma(x, b1, c1[r]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < M; ++r) {
    R::store(c + (i + r) * ldc + j, c0[r]);
    R::store(c + (i + r) * ldc + j + L, c1[r]);
  }
}

// Rows [i0, m) of the 16-wide column block j, in blocks of 6 then one smaller block.
inline void gemm_col_block(int i0, int m, int j, int k, const float* a, int a_m, int a_k,
                           const float* b, int ldb, float* c, int ldc, bool acc) {
  row_blocks<6>(i0, m, [&](auto rows, int i) {
    gemm_rows<Ymm, decltype(rows)::value>(i, j, k, a, a_m, a_k, b, ldb, c, ldc, acc);
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
    row_blocks<8>(0, m, [&](auto rows, int i) {
      gemm_rows<Zmm, decltype(rows)::value>(i, j0, k, a, a_m, a_k, b, ldb, c, ldc, acc);
    });
#endif
  for (int j = j0; j < n16; j += 16) gemm_col_block(0, m, j, k, a, a_m, a_k, b, ldb, c, ldc, acc);
  gemm_scalar(0, m, n16, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
#else
  gemm_scalar(0, m, 0, n, k, a, a_m, a_k, b, ldb, c, ldc, acc);
#endif
}

}  // namespace fastlm
