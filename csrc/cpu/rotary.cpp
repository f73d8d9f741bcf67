// Rotary embedding: one pass over q or k, reading each feature pair once and writing it once;
// the unfused form (x * cos + cat(-x2, x1) * sin) materialises three full-size temporaries.
#include "cpu/rotary.h"

#include <omp.h>

#include <cstring>

namespace fastlm::fused {
namespace {

using simd::vf;
using simd::W;

template <typename T>
void rotate_row(const T* x, T* out, const float* c, const float* s, int64_t half, bool inverse) {
  for (int64_t i = 0; i < half; i += W) {
    const int n = static_cast<int>(std::min<int64_t>(half - i, W));
    const vf x1 = simd::load_n(x + i, n), x2 = simd::load_n(x + half + i, n);
    const vf c1 = simd::load_n(c + i, n), c2 = simd::load_n(c + half + i, n);
    const vf s1 = simd::load_n(s + i, n), s2 = simd::load_n(s + half + i, n);
    // Forward [[c1, -s1], [s2, c2]]; inverse is its transpose [[c1, s2], [-s1, c2]] (the two
    // coincide with a rotation by -angle when the halves of cos/sin repeat, as HF's do).
    const vf y1 = inverse ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
    const vf y2 = inverse ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
    simd::store_n(out + i, y1, n);
    simd::store_n(out + half + i, y2, n);
  }
}

// Adjacent pairs: scalar in fp32 (the compiler vectorises the even/odd loads); the same
// matrices as rotate_row with (x1, x2) = (x[2i], x[2i+1]).
template <typename T>
void rotate_pairs(const T* x, T* out, const float* c, const float* s, int64_t half,
                  bool inverse) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[2 * i]), x2 = to_float(x[2 * i + 1]);
    const float c1 = c[2 * i], c2 = c[2 * i + 1], s1 = s[2 * i], s2 = s[2 * i + 1];
    const float y1 = inverse ? x1 * c1 + x2 * s2 : x1 * c1 - x2 * s1;
    const float y2 = inverse ? x2 * c2 - x1 * s1 : x2 * c2 + x1 * s2;
    out[2 * i] = from_float<T>(y1);
    out[2 * i + 1] = from_float<T>(y2);
  }
}

template <typename T>
void rotary_impl(const RotaryParams& p, const T* x, const float* cos, const float* sin, T* out) {
  const int64_t rows = p.batch * p.heads * p.seqlen, half = p.rot_dim / 2;
  const int64_t pass = p.head_dim - p.rot_dim;
#pragma omp parallel for schedule(static) if (rows * p.head_dim >= kParallelMin)
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = r % p.seqlen, h = (r / p.seqlen) % p.heads, b = r / (p.seqlen * p.heads);
    const T* xr = x + b * p.xb + h * p.xh + s * p.xs;
    T* outr = out + b * p.ob + h * p.oh + s * p.os;
    const int64_t cs = b * p.cos_b + s * p.rot_dim;
    if (p.interleaved) {
      rotate_pairs(xr, outr, cos + cs, sin + cs, half, p.inverse);
    } else {
      rotate_row(xr, outr, cos + cs, sin + cs, half, p.inverse);
    }
    if (pass > 0) std::memcpy(outr + p.rot_dim, xr + p.rot_dim, pass * sizeof(T));
  }
}

}  // namespace

void rotary_cpu(Dt dt, const RotaryParams& p, const void* x, const float* cos, const float* sin,
                void* out) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    rotary_impl(p, static_cast<const T*>(x), cos, sin, static_cast<T*>(out));
  });
}

}  // namespace fastlm::fused
