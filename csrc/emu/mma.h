// CUDA emulation of the WMMA API (16x16x16 shapes, fp16/bf16 inputs, fp32 accumulators).
//
// Every lane holds the whole 16x16 tile (a real fragment spreads it over the warp in an
// opaque layout, which fastlm's kernels never index, so results cannot depend on it), and a
// store writes only the lane's share of it. Loads and stores begin at a warp barrier: the API
// has every lane wait for the others there, so a __syncwarp just before one cannot be checked
// (one just after a store can). They also enforce the API's rules: a 256-bit aligned pointer
// and a leading dimension that is a multiple of 16 bytes.
#pragma once

#include <cstdint>
#include <type_traits>

#include "emu/device.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements 16x16x16 only");
  float x[256];  // element (r, c) at x[r * 16 + c]: A is M x K, B is K x N, C is M x N
  static constexpr int num_elements = 256;
};

namespace detail {
inline float to_f(float v) { return v; }
inline float to_f(__half v) { return __half2float(v); }
inline float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
void check(const T* ptr, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail(what);
  if ((ldm * sizeof(T)) % 16 != 0) emu::fail(what);
}

template <typename T>
void load(float* x, const T* p, unsigned ldm, bool row_major) {
  check(p, ldm, "wmma::load_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
  emu::sync_warp();
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      x[r * 16 + c] = to_f(row_major ? p[r * ldm + c] : p[c * ldm + r]);
}
}  // namespace detail

template <typename Use, typename T, typename L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float v) {
  for (float& e : f.x) e = v;
}

// matrix_a / matrix_b fragments, row- or column-major in memory as the fragment type says
template <typename Use, typename T, typename L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  static_assert(std::is_same_v<L, row_major> || std::is_same_v<L, col_major>, "a layout");
  detail::load(f.x, p, ldm, std::is_same_v<L, row_major>);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  detail::load(f.x, p, ldm, layout == mem_row_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  detail::check(p, ldm, "wmma::store_matrix_sync: pointer not 256-bit aligned or ldm not a multiple of 16 bytes");
  emu::sync_warp();
  // Each lane writes only its share of the tile, as on the device (where the share is opaque):
  // a lane that reads the tile back without a __syncwarp first sees the other lanes' shares
  // missing.
  const int lane = static_cast<int>(threadIdx.x % 32);
  for (int e = lane; e < 256; e += 32) {
    const int r = e / 16, c = e % 16;
    (layout == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.x[e];
  }
}

// D = A B + C in fp32 (the inputs are exact in fp32; the summation order differs from the
// tensor cores', which the tests' tolerances cover).
template <typename T, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
              const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b,
              const fragment<accumulator, 16, 16, 16, float>& c) {
  float out[256];
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc = c.x[m * 16 + n];
      for (int k = 0; k < 16; ++k) acc += a.x[m * 16 + k] * b.x[k * 16 + n];
      out[m * 16 + n] = acc;
    }
  for (int i = 0; i < 256; ++i) d.x[i] = out[i];
}

}  // namespace wmma
}  // namespace nvcuda
