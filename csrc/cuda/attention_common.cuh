// Device pieces shared by the CUDA attention forward and backward: element conversion, the
// sequence geometry and visibility rule (identical to csrc/cpu/attention_tile.h), tile loads
// into shared memory, and the WMMA fragment types.
//
// Tiles: a block of 4 warps owns 64 rows (queries in the forward and dQ kernels, keys in the
// dK/dV kernel), 16 per warp, and streams 64-row tiles of the other operand. Score tiles go
// through shared memory because WMMA accumulator layouts are opaque: the softmax needs to
// know which row and column an element is.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

#include "common/attention_params.h"

namespace fastlm {
namespace cuda {
namespace attn {

namespace wmma = nvcuda::wmma;

constexpr int kBM = 64;  // rows owned by a block
constexpr int kBN = 64;  // rows of a streamed tile
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kLdS = kBN + 4;  // float score tile row stride (WMMA: multiple of 4 floats)
constexpr int kLdP = kBN + 8;  // 16-bit P / dS tile row stride (WMMA: multiple of 8)

template <int D>
struct Dims {
  static constexpr int kLdH = D + 8;  // 16-bit Q/K/V/dO tile row stride, padded (banks)
  static constexpr int kLdF = D + 4;  // float per-warp output rows
  static constexpr int kFrags = D / 16;
};

template <typename T>
__device__ __forceinline__ float to_f(T x);
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

struct Seq {
  int64_t q0, k0;  // first token of the sequence in q and k
  int sq, sk;
};

__device__ __forceinline__ Seq sequence(const AttnParams& p, int b) {
  if (p.cu_seqlens_q != nullptr) {
    const int q0 = p.cu_seqlens_q[b], k0 = p.cu_seqlens_k[b];
    return {q0, k0, p.cu_seqlens_q[b + 1] - q0, p.cu_seqlens_k[b + 1] - k0};
  }
  return {0, 0, p.seqlen_q, p.seqlen_k};
}

// Keys [lo, hi) visible to query row i: causal/window limits aligned bottom-right. Both ends
// are non-decreasing in i, which the kernels use to bound their tile loops.
struct Range {
  int lo, hi;
};

__device__ __forceinline__ Range key_range(const AttnParams& p, const Seq& s, int i) {
  const int64_t pos = static_cast<int64_t>(i) + s.sk - s.sq;
  int64_t lo = p.window_left >= 0 ? pos - p.window_left : 0;
  int64_t hi = p.window_right >= 0 ? pos + p.window_right + 1 : s.sk;
  lo = lo < 0 ? 0 : lo;
  hi = hi > s.sk ? s.sk : hi;
  if (hi < lo) hi = lo;
  return {static_cast<int>(lo), static_cast<int>(hi)};
}

__device__ __forceinline__ bool visible(const AttnParams& p, const Seq& s, int b, int i, int j) {
  if (i >= s.sq || j >= s.sk) return false;
  const Range r = key_range(p, s, i);
  if (j < r.lo || j >= r.hi) return false;
  return p.key_padding_mask == nullptr ||
         p.key_padding_mask[static_cast<int64_t>(b) * p.seqlen_k + j];
}

// Score after scaling and soft-capping; *dcap = d(score)/d(scaled raw score).
__device__ __forceinline__ float finish_score(const AttnParams& p, float raw, float* dcap) {
  float s = raw * p.scale;
  *dcap = 1.0f;
  if (p.softcap > 0.0f) {
    const float t = tanhf(s / p.softcap);
    s = p.softcap * t;
    *dcap = 1.0f - t * t;
  }
  return s;
}

// Copies rows [t0, t0 + 64) of one head into a padded shared tile, zero-filling rows at or
// past `n`. 16-byte vector loads when the caller has checked alignment (`vec`).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* smem, const T* base, const AttnStrides& st, int b,
                                          int h, int64_t first_token, int t0, int n, bool vec) {
  constexpr int ld = Dims<D>::kLdH;
  const T* head = base + b * st.b + h * st.h;
  if (vec) {
    constexpr int kVec = 8;  // 8 x 16-bit = 16 bytes
    constexpr int per_row = D / kVec;
    for (int idx = threadIdx.x; idx < kBN * per_row; idx += kThreads) {
      const int r = idx / per_row, c = (idx % per_row) * kVec;
      uint4 val = make_uint4(0, 0, 0, 0);
      if (t0 + r < n)
        val = *reinterpret_cast<const uint4*>(head + (first_token + t0 + r) * st.t + c);
      *reinterpret_cast<uint4*>(smem + r * ld + c) = val;
    }
  } else {
    for (int idx = threadIdx.x; idx < kBN * D; idx += kThreads) {
      const int r = idx / D, c = idx % D;
      smem[r * ld + c] = t0 + r < n ? head[(first_token + t0 + r) * st.t + c] : from_f<T>(0.0f);
    }
  }
}

// Row-wise ends of a key-tile loop for query rows [i0, i1): [first tile start, end).
__device__ __forceinline__ Range key_tiles(const AttnParams& p, const Seq& s, int i0, int i1) {
  const Range first = key_range(p, s, i0), last = key_range(p, s, i1 - 1);
  return {(first.lo / kBN) * kBN, last.hi};
}

// Query rows that can see some key in [j0, j1): [lo, hi), from the inverse of key_range.
__device__ __forceinline__ Range query_rows(const AttnParams& p, const Seq& s, int j0, int j1) {
  const int64_t shift = static_cast<int64_t>(s.sk) - s.sq;  // pos(i) = i + shift
  int64_t lo = p.window_right >= 0 ? j0 - p.window_right - shift : 0;
  int64_t hi = p.window_left >= 0 ? j1 - 1 + p.window_left - shift + 1 : s.sq;
  lo = lo < 0 ? 0 : lo;
  hi = hi > s.sq ? s.sq : hi;
  if (hi < lo) hi = lo;
  return {static_cast<int>(lo), static_cast<int>(hi)};
}

}  // namespace attn
}  // namespace cuda
}  // namespace fastlm
