// bf16 operands of the CPU attention tiles for the AVX-512 BF16 GEMMs (bf16_gemm.h): one
// head's K or V as 32-bit words of bf16 pairs, in the two layouts the GEMMs read.
#pragma once

#include <cstring>

#include "cpu/attention_tile.h"
#include "cpu/bf16_gemm.h"

#if defined(FASTLM_DPBF16)
namespace fastlm {
namespace attn {

inline uint32_t pair_word(const uint16_t* r, int c, int d) {
  return r[c] | (c + 1 < d ? static_cast<uint32_t>(r[c + 1]) << 16 : 0u);
}

// Rows [t0, t0 + n) of one head (x with strides st) transposed per BK-row tile, as words:
// tile t holds word (c2, j) = X[t BK + j][2 c2 .. 2 c2 + 1] (K^T for Q K^T, V^T for dO V^T).
inline void load_words_t(const AttnParams& p, const bf16* x, const AttnStrides& st, int b, int h,
                         int64_t t0, int n, uint32_t* dst) {
  const int d = p.head_dim, d2 = (d + 1) / 2, tiles = (n + BK - 1) / BK;
  std::fill(dst, dst + static_cast<size_t>(tiles) * d2 * BK, 0u);
  for (int t = 0; t < tiles; ++t) {
    uint32_t* tile = dst + static_cast<size_t>(t) * d2 * BK;
    const int nk = std::min(BK, n - t * BK);
    int j0 = 0;
    if (d % 16 == 0) {  // 8 keys x 8 words through registers (strided scalar stores were slow)
      for (; j0 + 8 <= nk; j0 += 8)
        for (int c2 = 0; c2 < d2; c2 += 8) {
          __m256 r[8];
          for (int u = 0; u < 8; ++u)
            r[u] = _mm256_loadu_ps(reinterpret_cast<const float*>(
                row(x, st, b, h, t0 + t * BK + j0 + u)) + c2);
          transpose8(r);
          for (int u = 0; u < 8; ++u)
            _mm256_storeu_ps(reinterpret_cast<float*>(tile + (c2 + u) * BK + j0), r[u]);
        }
    }
    for (int j = j0; j < nk; ++j) {
      const auto* r = reinterpret_cast<const uint16_t*>(row(x, st, b, h, t0 + t * BK + j));
      for (int c2 = 0; c2 < d2; ++c2) tile[c2 * BK + j] = pair_word(r, 2 * c2, d);
    }
  }
}

// Rows [t0, t0 + n) of one head as VNNI words, pairs of rows interleaved: word (j2, c) =
// X[2 j2][c] | X[2 j2 + 1][c] << 16, zero past n up to a whole BK tile (V for P V, K for dS K,
// dO for P^T dO, Q for dS^T Q).
inline void load_words_vnni(const AttnParams& p, const bf16* x, const AttnStrides& st, int b,
                            int h, int64_t t0, int n, uint32_t* dst) {
  const int d = p.head_dim, pairs = (n + BK - 1) / BK * BK / 2;
  for (int j2 = 0; j2 < pairs; ++j2) {
    uint32_t* w = dst + static_cast<size_t>(j2) * d;
    if (2 * j2 >= n) {
      std::fill(w, w + d, 0u);
      continue;
    }
    const auto* r0 = reinterpret_cast<const uint16_t*>(row(x, st, b, h, t0 + 2 * j2));
    const auto* r1 = 2 * j2 + 1 < n
        ? reinterpret_cast<const uint16_t*>(row(x, st, b, h, t0 + 2 * j2 + 1)) : nullptr;
    bf16dot::interleave(r0, r1, d, w);
  }
}

// Rows [t0, t0 + n) of one head as words along the row (d2 per row, the odd last dim paired
// with 0): the A operand of Q K^T and dO V^T.
inline void load_words_rows(const AttnParams& p, const bf16* x, const AttnStrides& st, int b,
                            int h, int64_t t0, int n, uint32_t* dst) {
  const int d = p.head_dim, d2 = (d + 1) / 2;
  for (int i = 0; i < n; ++i) {
    const auto* r = reinterpret_cast<const uint16_t*>(row(x, st, b, h, t0 + i));
    if (d % 2 == 0) {  // an even row already is its words (element 2c in the low half)
      std::memcpy(dst + static_cast<size_t>(i) * d2, r, sizeof(uint16_t) * d);
      continue;
    }
    for (int c2 = 0; c2 < d2; ++c2) dst[static_cast<size_t>(i) * d2 + c2] = pair_word(r, 2 * c2, d);
  }
}

// exp(x[j] * mul - sub) for the bf16 paths' P, whose products are rounded to bf16 (relative
// 2^-9) before the P V / dS GEMMs: computed as 2^(x log2e mul - sub log2e), so the range
// reduction is one rounding and one subtraction, and a degree-4 polynomial fitted to 2^f on
// [-1/2, 1/2] (relative error 2.7e-6; the rounding of mul * log2e adds ~1e-5 at |x mul| ~ 100)
// replaces exp_neg's degree 6: 10 vector operations per 16 lanes instead of 14, where that
// exponential was as much of a tile's time as its GEMMs. Arguments below -125 in base 2 (-inf,
// masked scores, included) come out exactly 0 by a mask: left to underflow in vscalefps, they
// made subnormals, whose microcode assists took longer than everything else in the row.
// Writes the results to out (fp32) or, with words != nullptr, only as bf16 pairs (n even) to
// words; returns their fp32 sum when kSum.
template <bool kSum>
inline float exp_p_bf16(const float* x, int n, float sub, float mul, float* out, uint32_t* words) {
  const float kLog2e = 1.44269504088896341f;
  const __m512 vmul = _mm512_set1_ps(mul * kLog2e), vsub = _mm512_set1_ps(sub * kLog2e);
  const __m512 lo = _mm512_set1_ps(-125.0f);
  const __m512 c0 = _mm512_set1_ps(0.99999928474426270f), c1 = _mm512_set1_ps(0.69312179088592530f);
  const __m512 c2 = _mm512_set1_ps(0.24024744331836700f), c3 = _mm512_set1_ps(0.05591786280274391f);
  const __m512 c4 = _mm512_set1_ps(0.00957010127604008f);
  __m512 acc = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - j)) - 1);
    const __m512 u = _mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, x + j), vmul, vsub);
    const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, u, lo, _CMP_GE_OQ);  // lanes past n: 0
    const __m512 v = _mm512_max_ps(u, lo);
    const __m512 k = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(v, k);
    __m512 q = _mm512_fmadd_ps(c4, f, c3);
    q = _mm512_fmadd_ps(q, f, c2);
    q = _mm512_fmadd_ps(q, f, c1);
    q = _mm512_fmadd_ps(q, f, c0);
    const __m512 y = _mm512_maskz_scalef_ps(keep, q, k);
    if constexpr (kSum) acc = _mm512_add_ps(acc, y);
    if (words != nullptr) {
      const __m256bh h = _mm512_cvtneps_pbh(y);
      _mm256_mask_storeu_epi16(reinterpret_cast<uint16_t*>(words) + j, m,
                               reinterpret_cast<const __m256i&>(h));
    } else {
      _mm512_mask_storeu_ps(out + j, m, y);
    }
  }
  return kSum ? _mm512_reduce_add_ps(acc) : 0.0f;
}

// Words of a head's n rows in the two layouts (both padded to whole BK tiles).
inline size_t words_t_size(int n, int d) { return static_cast<size_t>((n + BK - 1) / BK * BK) * ((d + 1) / 2); }
inline size_t words_vnni_size(int n, int d) { return static_cast<size_t>((n + BK - 1) / BK * BK) / 2 * d; }

}  // namespace attn
}  // namespace fastlm
#endif
