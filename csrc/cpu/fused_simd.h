// SIMD building blocks of the fused elementwise/row kernels (norms, rotary, activations, cross
// entropy): float vectors of W lanes, loads/stores of fp32/bf16/fp16 to them, and the few
// transcendental functions those kernels need, written once for both vectors and scalars.
//
// Vectors are GCC/Clang vector extensions rather than intrinsics: the compiler lowers them to
// whatever the build flags allow (one zmm, one ymm, two SSE or NEON registers, or scalar code),
// so there is no separate scalar path to keep in sync. W is 16 where the build has AVX-512 (a
// zmm register: the exp/sigmoid/erfc polynomials are compute-bound, ~1.5x faster at 16 lanes
// than at 8) and 8 elsewhere; the kernels are written against W. libm's
// expf/erff would not vectorise (glibc only exposes its vector variants under -ffast-math), so
// exp/sigmoid/erfc are polynomials here, accurate to a few ulp of fp32.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/cpu_vec.h"

namespace fastlm::simd {

// Vector types of N float lanes (8: one ymm register, 16: one zmm register).
template <int N>
struct Lanes {
  typedef float f __attribute__((vector_size(4 * N)));
  typedef int32_t i __attribute__((vector_size(4 * N)));
  typedef uint32_t u __attribute__((vector_size(4 * N)));
  typedef uint16_t h __attribute__((vector_size(2 * N)));
};
#if defined(__AVX512F__)
constexpr int W = 16;  // lanes
#else
constexpr int W = 8;
#endif
typedef Lanes<W>::f vf;
typedef Lanes<W>::i vi;
typedef Lanes<W>::u vu;
typedef Lanes<W>::h vu16;
// 8 lanes whatever W is, for code written around ymm registers (the attention tiles' transposes)
typedef Lanes<8>::f vf8;

inline vf splat(float x) { return vf{} + x; }
// Horizontal sum and max by halving (log2 W dependent steps; the lane-by-lane loop was a chain
// of W dependent adds, ~60 cycles per row at 16 lanes: at hidden 128 it cost more than the
// row's arithmetic in the norms' kernels).
template <int N, typename Op>
inline float reduce_lanes(typename Lanes<N>::f v, Op op) {
  if constexpr (N == 2) {
    return op(v[0], v[1]);
  } else {
    typename Lanes<N / 2>::f lo, hi;
    std::memcpy(&lo, &v, sizeof(lo));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(lo), sizeof(hi));
    return reduce_lanes<N / 2>(op(lo, hi), op);
  }
}
inline float hsum(vf v) {
  return reduce_lanes<W>(v, [](auto a, auto b) { return a + b; });
}
inline float hmax(vf v) {
  return reduce_lanes<W>(v, [](auto a, auto b) { return a > b ? a : b; });
}

// -- overloads that let one template body serve float and vf ----------------------------------
inline float vmax(float a, float b) { return a > b ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float vmin(float a, float b) { return a < b ? a : b; }
inline vf vmin(vf a, vf b) { return a < b ? a : b; }
inline float vabs(float a) { return std::fabs(a); }
inline vf vabs(vf a) { return (vf)((vu)a & 0x7fffffffu); }
inline float pick(bool c, float a, float b) { return c ? a : b; }
inline vf pick(vi c, vf a, vf b) { return c ? a : b; }
inline int32_t to_i32(float x) { return static_cast<int32_t>(x); }
inline vi to_i32(vf x) { return __builtin_convertvector(x, vi); }
inline float bits_to_f(int32_t x) { return __builtin_bit_cast(float, x); }
inline vf bits_to_f(vi x) { return (vf)x; }

// e^x: x < -87.3 gives exactly 0 (masked logits rely on it) and x > 88.3 saturates at e^88.3
// ~ 2.2e38, finite. Range reduction x = n ln2 + r, |r| <= ln2/2, then the degree-6 Taylor
// polynomial of e^r: relative error < 2e-7 (~2 ulp).
template <typename F>
inline F exp_any(F x) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to integer
  F xc = vmin(vmax(x, F{} - 87.3f), F{} + 88.3f);
  F n = (xc * 1.44269504088896341f + kRound) - kRound;
  F r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = F{} + (1.0f / 720.0f);
  p = p * r + (1.0f / 120.0f);
  p = p * r + (1.0f / 24.0f);
  p = p * r + (1.0f / 6.0f);
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  F scale = bits_to_f((to_i32(n) + 127) << 23);
  return pick(x < -87.3f, F{}, p * scale);
}

// sigmoid(x) and 1 - sigmoid(x), each without cancellation: both come from e = exp(-|x|) <= 1,
// so neither 1/(1+e) nor e/(1+e) ever subtracts nearly equal numbers (silu', gelu-tanh' need
// the complement at |x| ~ 10, where 1 - sigmoid(x) computed directly would be all rounding).
// 1 / a. With AVX-512, vrcp14ps (14 bits) refined by one Newton step: relative error ~2^-27
// before the step's own roundings (within ~1.5 ulp), where vdivps, ~10 cycles per zmm on
// Intel cores, was a third of a GELU-tanh's arithmetic.
inline float recip(float a) { return 1.0f / a; }
inline vf recip(vf a) {
#if defined(__AVX512F__)
  const vf r = (vf)_mm512_rcp14_ps((__m512)a);
  return r + r * (1.0f - a * r);
#else
  return (vf{} + 1.0f) / a;
#endif
}

// e^x for x <= 0 (below -87 it returns ~1e-38, not 0), to ~3e-6 relative: for results stored
// in 16 bits (bf16 keeps 2^-9 of them, fp16 2^-11). 2^u = 2^k 2^f, k = round(u), |f| <= 1/2,
// 2^f by a degree-4 fit: ~13 vector ops against exp_any's ~18.
template <typename F>
inline F exp_neg_16bit(F x) {
  const float kRound = 12582912.0f;  // 1.5 * 2^23
  const F u = vmax(x * 1.44269504088896341f, F{} - 126.0f);
  const F k = (u + kRound) - kRound;
  const F f = u - k;
  F q = F{} + 0.00957010127604008f;
  q = q * f + 0.05591786280274391f;
  q = q * f + 0.24024744331836700f;
  q = q * f + 0.69312179088592530f;
  q = q * f + 0.99999928474426270f;
  return q * bits_to_f((to_i32(k) + 127) << 23);
}

// sigmoid(x) and 1 - sigmoid(x); Lowp: e^-|x| by exp_neg_16bit (16-bit results only).
template <bool Lowp = false, typename F>
inline void sigmoid2(F x, F& s, F& one_minus_s) {
  F e = Lowp ? exp_neg_16bit(F{} - vabs(x)) : exp_any(F{} - vabs(x));
  F inv = recip(e + 1.0f);
  F big = inv, small = e * inv;  // sigmoid(|x|), sigmoid(-|x|)
  s = pick(x >= 0.0f, big, small);
  one_minus_s = pick(x >= 0.0f, small, big);
}

// tanh(x). Near 0, (1 - e)/(1 + e) with e = exp(-2|x|) would lose the leading digits to
// cancellation (tanh(0.01) with an absolute error of 1e-7 is 1e-5 relative), so |x| < 0.4 uses
// the Taylor series to x^11 (truncation < 3e-8 relative there) and larger |x| the exp form.
template <typename F>
inline F tanh_any(F x) {
  F a = vabs(x), x2 = x * x;
  F p = F{} - 1382.0f / 155925.0f;
  p = p * x2 + 62.0f / 2835.0f;
  p = p * x2 - 17.0f / 315.0f;
  p = p * x2 + 2.0f / 15.0f;
  p = p * x2 - 1.0f / 3.0f;
  p = x + x * x2 * p;
  F e = exp_any(a * -2.0f);
  F big = (F{} + 1.0f - e) / (e + 1.0f);
  big = pick(x < 0.0f, F{} - big, big);
  return pick(a < 0.4f, p, big);
}

// erfc(x). For z = |x|: erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z/2), with the degree-9
// Chebyshev fit of Press et al., Numerical Recipes (2nd ed.) sec. 6.2: relative error < 1.2e-7
// for every z >= 0. erfc(-z) = 2 - erfc(z). Used as gelu(x) = x/2 erfc(-x/sqrt 2), which keeps
// full relative accuracy for very negative x where 1 + erf(x) would cancel.
template <typename F>
inline F erfc_any(F x) {
  F z = vabs(x);
  F t = (F{} + 1.0f) / (z * 0.5f + 1.0f);
  F p = F{} + 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  F r = t * exp_any(p - z * z);
  return pick(x >= 0.0f, r, (F{} + 2.0f) - r);
}

// -- loads of N lanes (loadw: W lanes; load8: 8, the attention tiles' loads) and stores of W -----
template <int N>
inline typename Lanes<N>::f load_lanes(const float* p) {
  typename Lanes<N>::f v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <int N>
inline typename Lanes<N>::f load_lanes(const bf16* p) {
#if defined(__AVX2__)
  // GCC lowers the generic widening below to two 4-lane widens and an insert on AVX2; one
  // vpmovzxwd from memory does it (the loads of every bf16 kernel go through here).
  if constexpr (N == 8)
    return (typename Lanes<N>::f)_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
#endif
#if defined(__AVX512F__)
  if constexpr (N == 16)  // likewise: GCC widened 16 lanes as two 8-lane halves
    return (typename Lanes<N>::f)_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
#endif
  typename Lanes<N>::h h;
  std::memcpy(&h, p, sizeof(h));
  return (typename Lanes<N>::f)(__builtin_convertvector(h, typename Lanes<N>::u) << 16);
}
template <int N>
inline typename Lanes<N>::f load_lanes(const fp16* p) {
  using F = typename Lanes<N>::f;
#if defined(__AVX512F__)
  if constexpr (N == 16)
    return (F)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#endif
#if defined(__F16C__)
  if constexpr (N == 8)
    return (F)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#endif
  F v;
  for (int i = 0; i < N; ++i) v[i] = to_float(p[i]);
  return v;
}
template <typename T>
inline vf loadw(const T* p) { return load_lanes<W>(p); }
template <typename T>
inline vf8 load8(const T* p) { return load_lanes<8>(p); }

inline void storew(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }
inline void storew(bf16* p, vf v) {
#if defined(__AVX512BF16__)
  // One instruction: round to nearest even, NaNs quieted (it also flushes fp32 denormals, below
  // 1.2e-38, to zero: bf16 values that small are not seen in training).
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
#else
  // Round to nearest even on the bit pattern; NaNs keep a set quiet bit instead of rounding
  // into infinity.
  vu u = (vu)v;
  vu r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  r = (v != v) ? ((u >> 16) | 0x40u) : r;
#if defined(__AVX2__) && !defined(__AVX512F__)
  // r < 2^16, so the saturating pack is exact; it spares the mask GCC puts before its own
  // narrowing (AVX2 has no truncating 32->16 move). The pack works within 128-bit halves,
  // hence the permute.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32((__m256i)r, (__m256i)r), 0xd8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#else
  vu16 h = __builtin_convertvector(r, vu16);
  std::memcpy(p, &h, sizeof(h));
#endif
#endif  // __AVX512BF16__
}
inline void storew(fp16* p, vf v) {
#if defined(__AVX512F__)
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif defined(__F16C__)
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT));
#else
  for (int i = 0; i < W; ++i) p[i] = from_float<fp16>(v[i]);
#endif
}

// The last n < W elements of a row: staged through a zero-padded buffer so the same vector code
// handles them (zeros are harmless in sums; callers mask maxima themselves).
template <typename T>
inline vf load_part(const T* p, int n) {
  T tmp[W];
  std::memset(tmp, 0, sizeof(tmp));
  std::memcpy(tmp, p, n * sizeof(T));
  return loadw(tmp);
}
template <typename T>
inline void store_part(T* p, vf v, int n) {
  T tmp[W];
  storew(tmp, v);
  std::memcpy(p, tmp, n * sizeof(T));
}
template <typename T>
inline vf load_n(const T* p, int n) { return n >= W ? loadw(p) : load_part(p, n); }
template <typename T>
inline void store_n(T* p, vf v, int n) {
  if (n >= W) storew(p, v); else store_part(p, v, n);
}

// Lanes [0, n) set, for masking a partial vector (n >= W sets all).
inline vi lanes_below(int n) {
  vi idx;
  for (int i = 0; i < W; ++i) idx[i] = i;
  return idx < n;
}

}  // namespace fastlm::simd

namespace fastlm::fused {

// Element types of the fused kernels' tensors (weights and statistics are always fp32).
enum class Dt { f32, bf16, f16 };

// Calls fn(T{}) with T the C++ type of dt, so one generic lambda instantiates every kernel.
template <typename Fn>
inline void dispatch(Dt dt, Fn&& fn) {
  switch (dt) {
    case Dt::f32: fn(float{}); break;
    case Dt::bf16: fn(bf16{}); break;
    case Dt::f16: fn(fp16{}); break;
  }
}

// Below this many elements a kernel runs on the calling thread: waking the OpenMP team costs
// a few microseconds, more than the work itself.
constexpr int64_t kParallelMin = 1 << 15;

// Rows [begin, end) of thread t out of nt: contiguous blocks, so the split (and with it every
// per-thread partial sum) depends only on the thread count, never on timing.
inline void thread_rows(int64_t rows, int t, int nt, int64_t& begin, int64_t& end) {
  const int64_t per = rows / nt, extra = rows % nt;
  begin = t * per + std::min<int64_t>(t, extra);
  end = begin + per + (t < extra ? 1 : 0);
}

}  // namespace fastlm::fused
