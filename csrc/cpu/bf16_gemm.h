// bf16 x bf16 -> fp32 GEMM tiles on AVX-512 BF16's dot-product instruction (vdpbf16ps), for
// the attention tiles when q/k/v are bf16. One instruction multiplies 32 bf16 pairs and adds
// them into 16 fp32 lanes: on this project's EPYC VMs it runs at 4x the fp32 FMA rate, and
// torch's bf16 matmul uses it, so bf16 attention computed in fp32 FMAs could not keep up with
// SDPA there. Compiled only where the build enables the instruction (fastlm/_build.py adds
// -mavx512bf16 on CPUs that have it); FASTLM_DPBF16 tells the callers.
//
// Operand layouts (k counted in bf16 pairs, "words": a 32-bit word holds elements 2t and 2t+1
// of the reduction dimension, the first in its low half, as the instruction reads them):
//   A: word (i, t) at a[i * lda + t * a_k] (a_k = 1: a row-major bf16 matrix read as words;
//      lda = 1: a matrix stored transposed, e.g. P^T from pair-interleaved rows of P)
//   B: k2 rows of n words, row stride ldb words ("VNNI": word (t, j) = B[2t][j] | B[2t+1][j] << 16)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu_gemm.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define FASTLM_DPBF16 1

namespace fastlm::bf16dot {

inline __mmask16 lanes(int n) {  // the first n of 16 lanes (n <= 0: none)
  return n >= 16 ? static_cast<__mmask16>(0xffff)
                 : n <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << n) - 1);
}

inline __m512bh as_bh(__m512i x) { return reinterpret_cast<__m512bh&>(x); }

// Rows [i, i + M) of C, all n columns in blocks of 32 (two 16-lane registers per row, the
// last block masked): 2M accumulators stay in registers across the k loop.
template <int M>
inline void rows(int i, int n, int k2, const uint32_t* a, int lda, int a_k, const uint32_t* b,
                 int ldb, float* c, int ldc, bool acc) {
  for (int j = 0; j < n; j += 32) {
    const __mmask16 m0 = lanes(n - j), m1 = lanes(n - j - 16);
    __m512 c0[M], c1[M];
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      float* cr = c + static_cast<size_t>(i + r) * ldc + j;
      c0[r] = acc ? _mm512_maskz_loadu_ps(m0, cr) : _mm512_setzero_ps();
      c1[r] = acc ? _mm512_maskz_loadu_ps(m1, cr + 16) : _mm512_setzero_ps();
    }
    for (int t = 0; t < k2; ++t) {
      const uint32_t* bt = b + static_cast<size_t>(t) * ldb + j;
      const __m512bh b0 = as_bh(_mm512_maskz_loadu_epi32(m0, bt));
      const __m512bh b1 = as_bh(_mm512_maskz_loadu_epi32(m1, bt + 16));
#pragma GCC unroll 8
      for (int r = 0; r < M; ++r) {
        const __m512bh x = as_bh(_mm512_set1_epi32(static_cast<int>(
            a[static_cast<size_t>(i + r) * lda + static_cast<size_t>(t) * a_k])));
        c0[r] = _mm512_dpbf16_ps(c0[r], x, b0);
        c1[r] = _mm512_dpbf16_ps(c1[r], x, b1);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < M; ++r) {
      float* cr = c + static_cast<size_t>(i + r) * ldc + j;
      _mm512_mask_storeu_ps(cr, m0, c0[r]);
      _mm512_mask_storeu_ps(cr + 16, m1, c1[r]);
    }
  }
}

// C (m x n, fp32) (+)= A (m x 2 k2, bf16) B (2 k2 x n, bf16); acc = false overwrites C.
inline void gemm(int m, int n, int k2, const uint32_t* a, int lda, int a_k, const uint32_t* b,
                 int ldb, float* c, int ldc, bool acc) {
  row_blocks6(0, m, [&](auto block, int i) {
    rows<decltype(block)::value>(i, n, k2, a, lda, a_k, b, ldb, c, ldc, acc);
  });
}

// fp32 row -> bf16 words (round to nearest even): n floats to (n + 1) / 2 words, the odd last
// one paired with 0.
inline void pack_f32(const float* src, int n, uint32_t* dst) {
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + j + 16), _mm512_loadu_ps(src + j));
    _mm512_storeu_si512(dst + j / 2, reinterpret_cast<const __m512i&>(v));
  }
  for (; j < n; j += 2) {
    const float lo = src[j], hi = j + 1 < n ? src[j + 1] : 0.0f;
    const __m128bh v = _mm_cvtneps_pbh(_mm_setr_ps(lo, hi, 0.0f, 0.0f));
    uint32_t w;
    std::memcpy(&w, &v, sizeof(w));
    dst[j / 2] = w;
  }
}

// Two rows of bf16 (r1 may be null: zeros) interleaved into n VNNI words.
inline void interleave(const uint16_t* r0, const uint16_t* r1, int n, uint32_t* dst) {
  int c = 0;
  if (r1 != nullptr) {
    // word c = r0[c] | r1[c] << 16: 16 columns of both rows, permuted into 16 words
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    for (; c + 16 <= n; c += 16) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + c));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + c));
      const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
      _mm512_storeu_si512(dst + c, _mm512_permutexvar_epi16(idx, ab));
    }
  }
  for (; c < n; ++c)
    dst[c] = r0[c] | (r1 != nullptr ? static_cast<uint32_t>(r1[c]) << 16 : 0u);
}

}  // namespace fastlm::bf16dot
#endif
