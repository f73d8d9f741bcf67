// Small CPU helpers shared by fastlm's C++ kernels: dtype conversion and a vectorisable exp.
// Plain C++ written so GCC/Clang auto-vectorise the loops that call these (AVX2/AVX-512 when
// the build enables them, see fastlm/_build.py); no intrinsics are needed for correctness.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace fastlm {

// bf16 / fp16 are passed around as raw 16-bit storage so these headers never need torch.
struct bf16 { uint16_t bits; };
struct fp16 { uint16_t bits; };

inline float to_float(float x) { return x; }

inline float to_float(bf16 x) {
  uint32_t u = static_cast<uint32_t>(x.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
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
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
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
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return x < -87.0f ? 0.0f : p * scale;
}

}  // namespace fastlm
