// CUDA emulation: vector types and the 16-bit float types (bit-exact round-to-nearest-even
// conversions, as the device's __float2half_rn / __float2bfloat16_rn).
#pragma once

#include <cstdint>
#include <cstring>

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};

inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __half {
  uint16_t x;
};

struct __nv_bfloat16 {
  uint16_t x;
};

namespace emu {
inline uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
}  // namespace emu

inline float __bfloat162float(__nv_bfloat16 h) { return emu::from_bits(uint32_t{h.x} << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = emu::bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return {static_cast<uint16_t>((u >> 16) | 0x40)};  // NaN
  const uint32_t rounded = u + 0x7fffu + ((u >> 16) & 1u);  // ties to even
  return {static_cast<uint16_t>(rounded >> 16)};
}

// _Float16 (GCC 12 on x86-64) converts with round-to-nearest-even, subnormals and overflow
// to infinity included, as the device does.
inline float __half2float(__half h) {
  _Float16 v;
  std::memcpy(&v, &h.x, 2);
  return static_cast<float>(v);
}

inline __half __float2half_rn(float f) {
  const _Float16 v = static_cast<_Float16>(f);
  __half h;
  std::memcpy(&h.x, &v, 2);
  return h;
}
