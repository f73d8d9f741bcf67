// Pieces shared by the CPU attention forward and backward: sequence geometry, the visible
// key range of a query row, and the score tile S = Q K^T with masking and soft-capping.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "common/cpu_gemm.h"
#include "common/cpu_vec.h"
#include "cpu/attention.h"
#include "cpu/fused_simd.h"

namespace fastlm {
namespace attn {

// Tile sizes. BK keys per tile: 64 fp32 scores of one row are 8 AVX2 registers; the K^T tile
// (D x 64 floats = 16 KiB at D = 64) stays in L1 while BQ rows stream over it. BQ query rows
// amortise each converted/transposed K and V tile over 32 rows.
constexpr int BQ = 32;
constexpr int BK = 64;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Seq {
  int64_t q0, k0;  // first token of this sequence in the q and k tensors
  int sq, sk;      // lengths
};

inline Seq sequence(const AttnParams& p, int b) {
  if (p.cu_seqlens_q != nullptr) {
    return {p.cu_seqlens_q[b], p.cu_seqlens_k[b], p.cu_seqlens_q[b + 1] - p.cu_seqlens_q[b],
            p.cu_seqlens_k[b + 1] - p.cu_seqlens_k[b]};
  }
  return {0, 0, p.seqlen_q, p.seqlen_k};
}

inline int max_seqlen_q(const AttnParams& p) {
  if (p.cu_seqlens_q == nullptr) return p.seqlen_q;
  int m = 0;
  for (int b = 0; b < p.batch; ++b) m = std::max(m, sequence(p, b).sq);
  return m;
}

// Keys [lo, hi) of query row i are inside the causal/window limits (bottom-right aligned).
struct Range {
  int lo, hi;
};

inline Range key_range(const AttnParams& p, const Seq& s, int i) {
  int64_t pos = static_cast<int64_t>(i) + s.sk - s.sq;
  int64_t lo = p.window_left >= 0 ? pos - p.window_left : 0;
  int64_t hi = p.window_right >= 0 ? pos + p.window_right + 1 : s.sk;
  lo = std::max<int64_t>(lo, 0);
  hi = std::min<int64_t>(hi, s.sk);
  if (hi < lo) hi = lo;
  return {static_cast<int>(lo), static_cast<int>(hi)};
}

template <typename T>
inline const T* row(const T* base, const AttnStrides& st, int b, int h, int64_t t) {
  return base + b * st.b + h * st.h + t * st.t;
}

template <typename T>
inline T* row(T* base, const AttnStrides& st, int b, int h, int64_t t) {
  return base + b * st.b + h * st.h + t * st.t;
}

// Finishes one row of raw scores s = (scale q) . k over a key tile [j0, j0 + nk): soft-caps
// (keeping tanh in `th` for the backward when non-null), then sets -inf outside [lo, hi), past
// the tile and where the padding mask is false.
inline void mask_row(const AttnParams& p, float* s, int j0, int nk, Range r, const bool* kpm,
                     float* th) {
  // Most tiles of a long sequence are fully visible: nothing to mask.
  const bool all_visible = nk == BK && r.lo <= j0 && j0 + BK <= r.hi && kpm == nullptr;
  if (p.softcap > 0.0f) {
    const float inv = 1.0f / p.softcap;
    for (int j = 0; j < nk; ++j) {
      float t = std::tanh(s[j] * inv);
      if (th != nullptr) th[j] = t;
      s[j] = p.softcap * t;
    }
  }
  if (all_visible) return;
  // visible [lo, hi): fills outside it (a per-element select with the padding mask's branch
  // stayed scalar, a quarter of a causal tile's time at head dim 32)
  const int lo = std::clamp(r.lo - j0, 0, BK), hi = std::clamp(std::min(r.hi - j0, nk), lo, BK);
  std::fill(s, s + lo, kNegInf);
  std::fill(s + hi, s + BK, kNegInf);
  if (kpm != nullptr)
    for (int j = lo; j < hi; ++j) s[j] = kpm[j0 + j] ? s[j] : kNegInf;
}

// Converts rows [t0, t0 + n) of one head to fp32: dst is n x d (row-major).
template <typename T>
inline void load_rows(const T* base, const AttnStrides& st, int b, int h, int64_t t0, int n, int d,
                      float* dst, float mul = 1.0f, int pad_to = 0) {
  for (int i = n; i < pad_to; ++i)  // zero rows so a tile-wide GEMM never reads garbage (NaN * 0)
    for (int c = 0; c < d; ++c) dst[i * d + c] = 0.0f;
  for (int i = 0; i < n; ++i) {
    const T* src = row(base, st, b, h, t0 + i);
    for (int c = 0; c < d; ++c) dst[i * d + c] = to_float(src[c]) * mul;
  }
}

#if defined(__AVX2__)
// r[i][j] <- r[j][i] for an 8 x 8 block of floats.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}
#endif

// Converts rows [t0, t0 + n) to a transposed, zero-padded fp32 tile dst (d x BK). Blocks of
// 8 x 8 go through registers: element by element, every store went to another row of dst
// (a scalar strided loop that cost as much as a short sequence's score GEMM).
template <typename T>
inline void load_rows_t(const T* base, const AttnStrides& st, int b, int h, int64_t t0, int n,
                        int d, float* dst) {
  for (int c = 0; c < d; ++c)
    for (int j = n; j < BK; ++j) dst[c * BK + j] = 0.0f;
  int j0 = 0;
#if defined(__AVX2__)
  if (d % 8 == 0) {
    for (; j0 + 8 <= n; j0 += 8) {
      for (int c = 0; c < d; c += 8) {
        __m256 r[8];
        for (int t = 0; t < 8; ++t) r[t] = (__m256)simd::load8(row(base, st, b, h, t0 + j0 + t) + c);
        transpose8(r);
        for (int t = 0; t < 8; ++t) _mm256_storeu_ps(dst + (c + t) * BK + j0, r[t]);
      }
    }
  }
#endif
  for (int j = j0; j < n; ++j) {
    const T* src = row(base, st, b, h, t0 + j);
    for (int c = 0; c < d; ++c) dst[c * BK + j] = to_float(src[c]);
  }
}

// Columns of a key tile to compute when only its first `vis` keys can be visible to any row of
// the query block (the causal diagonal: a block's last row sees up to its own position), rounded
// up to the GEMM's 16-wide column blocks. The columns past `vis` are masked to -inf whatever
// they hold, and nothing reads them after the softmax: at short sequences the diagonal tiles
// are most of the work (S = 64, 32-row blocks: a quarter of the score and P V FLOPs).
inline int visible_cols(int vis) { return std::min(BK, (vis + 15) / 16 * 16); }

// Floats of one head's n rows padded to whole key tiles (load_head / load_head_t write this many).
inline size_t head_floats(int n, int d) { return static_cast<size_t>((n + BK - 1) / BK * BK) * d; }

template <typename T>
inline void load_head(const AttnParams& p, const T* x, const AttnStrides& st, int b, int h, int64_t t0,
                      int n, float* dst, float mul = 1.0f) {
  const int padded = (n + BK - 1) / BK * BK;  // whole tiles, zero rows past n
  load_rows(x, st, b, h, t0, n, p.head_dim, dst, mul, padded);
}

template <typename T>
inline void load_head(const AttnParams& p, const T* x, const AttnStrides& st, int b, int h, int64_t t0,
                      int n, std::vector<float>& dst, float mul = 1.0f) {
  dst.resize(head_floats(n, p.head_dim));
  load_head(p, x, st, b, h, t0, n, dst.data(), mul);
}

// kt/vt: the unit's keys and values transposed per BK tile: tile t is a (d x BK) block.
template <typename T>
inline void load_head_t(const AttnParams& p, const T* x, const AttnStrides& st, int b, int h, int64_t t0,
                        int n, float* dst) {
  const int tiles = (n + BK - 1) / BK;
  for (int t = 0; t < tiles; ++t)
    load_rows_t(x, st, b, h, t0 + t * BK, std::min(BK, n - t * BK), p.head_dim,
                dst + static_cast<size_t>(t) * p.head_dim * BK);
}

template <typename T>
inline void load_head_t(const AttnParams& p, const T* x, const AttnStrides& st, int b, int h, int64_t t0,
                        int n, std::vector<float>& dst) {
  dst.resize(head_floats(n, p.head_dim));
  load_head_t(p, x, st, b, h, t0, n, dst.data());
}

}  // namespace attn
}  // namespace fastlm
