// Small CPU helpers shared by fastlm's C++ kernels: dtype conversion and a vectorisable exp.
// Plain C++ written so GCC/Clang auto-vectorise the loops that call these (AVX2/AVX-512 when
// the build enables them, see fastlm/_build.py); no intrinsics are needed for correctness.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__) || defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace fastlm {

// bf16 / fp16 are passed around as raw 16-bit storage so these headers never need torch.
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  return __builtin_bit_cast(float, static_cast<uint32_t>(x.bits) << 16);
}

inline float to_float(fp16 x) {
#if defined(__F16C__)
  return _cvtsh_ss(x.bits);
#else
  // IEEE half -> float without F16C: sign, exponent rebias, subnormals.
  uint32_t sign = (x.bits & 0x8000u) << 16, exp = (x.bits >> 10) & 0x1f, man = x.bits & 0x3ffu;
  uint32_t u;
  if (exp == 0x1f) {
    u = sign | 0x7f800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else if (man == 0) {
    u = sign;
  } else {
    int e = -1;
    do { man <<= 1; ++e; } while (!(man & 0x400u));
    u = sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

template <typename T> T from_float(float x);

template <> inline float from_float<float>(float x) { return x; }

template <> inline bf16 from_float<bf16>(float x) {
  uint32_t u = __builtin_bit_cast(uint32_t, x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return bf16{static_cast<uint16_t>(u >> 16)};
}

template <> inline fp16 from_float<fp16>(float x) {
#if defined(__F16C__)
  return fp16{_cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT)};
#else
  // Round-to-nearest-even float -> half, with overflow to inf and subnormals.
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return fp16{static_cast<uint16_t>(sign | 0x7e00u)};
  if (a >= 0x477ff000u) return fp16{static_cast<uint16_t>(sign | 0x7c00u)};
  if (a < 0x38800000u) {  // subnormal half
    float f;
    std::memcpy(&f, &a, sizeof(f));
    return fp16{static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(f * 16777216.0f)))};
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - 0x38000000u;
  return fp16{static_cast<uint16_t>(sign | (r >> 13))};
#endif
}

template <typename T>
inline void load_row(const T* src, float* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]);
}

template <typename T>
inline void store_row(const float* src, T* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = from_float<T>(src[i]);
}

// exp(x) for x <= 0 (softmax arguments after subtracting the max), branch-free so loops over
// it vectorise. Range reduction x = n*ln2 + r, |r| <= ln2/2, then a degree-6 polynomial for
// e^r: relative error ~2e-7, below fp32's own rounding of the products that follow. Inputs
// below -87 (including -inf) return exactly 0, which masked scores rely on.
inline float exp_neg(float x) {
  const float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  float xc = std::fmax(x, -87.0f);
  // Round to nearest by adding and subtracting 1.5 * 2^23 (no libm call, so loops vectorise).
  const float kRound = 12582912.0f;
  float n = (xc * kLog2e + kRound) - kRound;
  float r = xc - n * kLn2Hi - n * kLn2Lo;
  float p = 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  // __builtin_bit_cast rather than memcpy: GCC vectorises loops around it, not around memcpy.
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  return x < -87.0f ? 0.0f : p * scale;
}

// max(init, x[0], ..., x[n-1]). Running maxima in registers (16 lanes on AVX-512, 8 on AVX2): the scalar loop
// is one serial chain of compares (GCC does not reorder float max without -ffast-math), and
// at head dim 32 it cost as much as both GEMMs of an attention tile.
inline float row_max(const float* x, int n, float init) {
  int i = 0;
  float m = init;
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 a = _mm512_loadu_ps(x), b = a;
    for (i = 16; i + 32 <= n; i += 32) {
      a = _mm512_max_ps(a, _mm512_loadu_ps(x + i));
      b = _mm512_max_ps(b, _mm512_loadu_ps(x + i + 16));
    }
    for (; i + 16 <= n; i += 16) a = _mm512_max_ps(a, _mm512_loadu_ps(x + i));
    m = std::max(m, _mm512_reduce_max_ps(_mm512_max_ps(a, b)));
  }
#endif
#if defined(__AVX2__)
  if (n - i >= 8) {
    __m256 a = _mm256_loadu_ps(x + i), b = a;
    for (i += 8; i + 16 <= n; i += 16) {
      a = _mm256_max_ps(a, _mm256_loadu_ps(x + i));
      b = _mm256_max_ps(b, _mm256_loadu_ps(x + i + 8));
    }
    for (; i + 8 <= n; i += 8) a = _mm256_max_ps(a, _mm256_loadu_ps(x + i));
    a = _mm256_max_ps(a, b);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    m = std::max(m, _mm_cvtss_f32(h));
  }
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

// x[i] = exp_neg(x[i] * mul - sub) for i < n, eight lanes at a time where AVX2 is available
// (the same polynomial, so both paths agree). Written out because GCC would not vectorise the
// scalar loop inside the attention tile code. mul = 1 is exact (x - sub); a mul folds the
// softmax scale into the exponent instead of a pass over the scores.
// Returns the sum of the results when kSum (the softmax's row sum, accumulated in the same
// pass: a separate loop over the row did not vectorise and cost a tenth of a forward).
template <bool kSum>
inline float exp_neg_sub_impl(float* x, int n, float sub, float mul) {
  int i = 0;
  float total = 0.0f;
#if defined(__AVX512F__)
  {  // 16 lanes, the same operations lane for lane as the 8-lane loop below
    const __m512 vsub = _mm512_set1_ps(sub), vmul = _mm512_set1_ps(mul), lo = _mm512_set1_ps(-87.0f);
    __m512 acc = _mm512_setzero_ps();
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2hi = _mm512_set1_ps(0.693359375f), ln2lo = _mm512_set1_ps(-2.12194440e-4f);
    const float coef[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
    for (; i + 16 <= n; i += 16) {
      const __m512 v = _mm512_fmsub_ps(_mm512_loadu_ps(x + i), vmul, vsub);
      const __m512 xc = _mm512_max_ps(v, lo);
      const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      __m512 r = _mm512_fnmadd_ps(k, ln2hi, xc);
      r = _mm512_fnmadd_ps(k, ln2lo, r);
      __m512 q = _mm512_set1_ps(coef[0]);
      for (int c = 1; c < 7; ++c) q = _mm512_fmadd_ps(q, r, _mm512_set1_ps(coef[c]));
      // q * 2^k in one instruction (exact, as the multiply by the built power of two is)
      const __m512 y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, lo, _CMP_NLT_UQ),
                                           _mm512_scalef_ps(q, k));
      _mm512_storeu_ps(x + i, y);
      if constexpr (kSum) acc = _mm512_add_ps(acc, y);
    }
    if constexpr (kSum) total = _mm512_reduce_add_ps(acc);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc8 = _mm256_setzero_ps();
  const __m256 vsub = _mm256_set1_ps(sub), vmul = _mm256_set1_ps(mul), lo = _mm256_set1_ps(-87.0f);
  const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
  const __m256 ln2hi = _mm256_set1_ps(0.693359375f), ln2lo = _mm256_set1_ps(-2.12194440e-4f);
  const float coef[] = {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f};
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_fmsub_ps(_mm256_loadu_ps(x + i), vmul, vsub);
    const __m256 xc = _mm256_max_ps(v, lo);
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(k, ln2hi, xc);
    r = _mm256_fnmadd_ps(k, ln2lo, r);
    __m256 p = _mm256_set1_ps(coef[0]);
    for (int c = 1; c < 7; ++c) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(coef[c]));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
    const __m256 z = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(v, lo, _CMP_LT_OQ));
    _mm256_storeu_ps(x + i, z);
    if constexpr (kSum) acc8 = _mm256_add_ps(acc8, z);
  }
  if constexpr (kSum) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc8), _mm256_extractf128_ps(acc8, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    total += _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
  }
#endif
  for (; i < n; ++i) {
    x[i] = exp_neg(std::fma(x[i], mul, -sub));
    if constexpr (kSum) total += x[i];
  }
  return total;
}

inline void exp_neg_sub(float* x, int n, float sub, float mul = 1.0f) {
  exp_neg_sub_impl<false>(x, n, sub, mul);
}

// exp_neg_sub, returning the sum of the results.
inline float exp_neg_sub_sum(float* x, int n, float sub, float mul = 1.0f) {
  return exp_neg_sub_impl<true>(x, n, sub, mul);
}

}  // namespace fastlm
