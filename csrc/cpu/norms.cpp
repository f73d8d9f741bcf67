// RMSNorm / LayerNorm forward and backward: one thread per block of rows, each row read from
// memory once per pass (a 4096-wide bf16 row is 8 KiB, so the second and third passes hit L1),
// statistics in fp32. The unfused PyTorch forms make 4-6 full passes over (rows, hidden)
// through memory, with fp32 temporaries for bf16 inputs.
#include "cpu/norms.h"

#include <omp.h>

#include <vector>

// No fused multiply-add contraction: the backward relies on g = dy * w being rounded the same
// way in the pass that sums it and in the pass that subtracts the mean (g - mean(g) is exactly 0
// for a constant row, e.g. hidden 1, and rstd ~ 1/sqrt(eps) then multiplies any mismatch by 300).
// Which products GCC fuses depends on inlining, so it is off for the whole file.
#pragma GCC optimize("fp-contract=off")

namespace fastlm::fused {
namespace {

using simd::vf;
using simd::W;

inline int lanes(int64_t hidden, int64_t j) {
  return static_cast<int>(std::min<int64_t>(hidden - j, W));
}

// (weight + offset) for W features; no weight means 1 (the offset only shifts a real weight).
inline vf gain(const float* w, int64_t j, int n, float offset) {
  return w ? simd::load_n(w + j, n) + offset : simd::splat(1.0f);
}
inline vf shift(const float* b, int64_t j, int n) { return b ? simd::load_n(b + j, n) : vf{}; }

// Rows go through the kernels kRows at a time. A row's statistics are a chain of dependent
// steps (sum its chunks, reduce the lanes, divide, take a square root) that takes longer than
// the row's arithmetic at small hidden sizes (128 lanes are 8 vectors): row by row, nothing
// overlaps those chains. Interleaving kRows rows gives the core independent chains to overlap
// (LayerNorm's forward at (768, 128) bf16: 1.3x faster on one thread). Each row's sums run
// over its chunks in order into one accumulator per row (the row-at-a-time code alternated two),
// so a row's result depends on that row alone, whichever group or thread it falls in.
constexpr int kRows = 4;

// Per row i < NR: out[i] = the lane sum of f(i, j, n) over the row's chunks (n <= W features
// from j; full chunks pass the constant n = W, so their loads compile without masking).
template <int NR, typename F>
inline void rows_sum(int64_t h, float* out, F&& f) {
  vf a[NR] = {};
  int64_t j = 0;
  for (; j + W <= h; j += W)
    for (int i = 0; i < NR; ++i) a[i] += f(i, j, W);
  if (j < h) {
    const int n = lanes(h, j);
    for (int i = 0; i < NR; ++i) a[i] += f(i, j, n);
  }
  for (int i = 0; i < NR; ++i) out[i] = simd::hsum(a[i]);
}

// rows_sum for two sums over the same loads: f(i, j, n, a, b) adds its terms to a and b.
template <int NR, typename F>
inline void rows_sum2(int64_t h, float* sa, float* sb, F&& f) {
  vf a[NR] = {}, b[NR] = {};
  int64_t j = 0;
  for (; j + W <= h; j += W)
    for (int i = 0; i < NR; ++i) f(i, j, W, a[i], b[i]);
  if (j < h) {
    const int n = lanes(h, j);
    for (int i = 0; i < NR; ++i) f(i, j, n, a[i], b[i]);
  }
  for (int i = 0; i < NR; ++i) {
    sa[i] = simd::hsum(a[i]);
    sb[i] = simd::hsum(b[i]);
  }
}

// Calls body(j, n) for each chunk of a row, full chunks with the constant n = W.
template <typename F>
inline void row_chunks(int64_t h, F&& body) {
  int64_t j = 0;
  for (; j + W <= h; j += W) body(j, W);
  if (j < h) body(j, lanes(h, j));
}

// Calls block.template operator()<NR>(r) over rows [r0, r1): kRows rows at a time, then the
// remaining rows one by one.
template <typename Block>
inline void for_row_groups(int64_t r0, int64_t r1, Block&& block) {
  int64_t r = r0;
  for (; r + kRows <= r1; r += kRows) block.template operator()<kRows>(r);
  for (; r < r1; ++r) block.template operator()<1>(r);
}

// Runs body(t, nt, row_begin, row_end) on each thread; tiny problems stay on one thread.
template <typename Body>
void for_row_blocks(int64_t rows, int64_t hidden, Body&& body) {
#pragma omp parallel if (rows * hidden >= kParallelMin)
  {
    const int t = omp_get_thread_num(), nt = omp_get_num_threads();
    int64_t begin, end;
    thread_rows(rows, t, nt, begin, end);
    body(t, nt, begin, end);
  }
}

// Parameter gradients: each thread sums its rows into its own (hidden,) fp32 slice, then the
// slices are added in thread order, so results do not depend on scheduling. Slices start on
// their own cache lines: every row updates the whole slice, and two threads' slices sharing a
// line made the two-thread backward slower than one thread.
struct Partials {
  static constexpr int64_t kLine = 64 / sizeof(float);
  std::vector<float> buf;
  int64_t hidden, stride;
  int used = 1;
  Partials(bool wanted, int64_t h)
      : buf(wanted ? omp_get_max_threads() * ((h + kLine - 1) / kLine * kLine) + kLine : 0, 0.0f),
        hidden(h), stride((h + kLine - 1) / kLine * kLine) {}
  float* of(int t) {
    if (buf.empty()) return nullptr;
    const auto addr = reinterpret_cast<uintptr_t>(buf.data());
    const int64_t skew = static_cast<int64_t>((64 - addr % 64) % 64 / sizeof(float));
    return buf.data() + skew + t * stride;
  }
  void reduce_into(float* out) {
    if (out == nullptr) return;
    const float* base = of(0);
#pragma omp parallel for if (used * hidden >= kParallelMin)
    for (int64_t j = 0; j < hidden; ++j) {
      float s = 0.0f;
      for (int t = 0; t < used; ++t) s += base[t * stride + j];
      out[j] = s;
    }
  }
};

template <typename T>
void rms_fwd_rows(const T* x, const float* w, T* y, float* rstd, int64_t r0, int64_t r1,
                  int64_t h, float eps, float offset) {
  for_row_groups(r0, r1, [&]<int NR>(int64_t r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    float ss[NR], rs[NR];
    rows_sum<NR>(h, ss, [&](int i, int64_t j, int n) {
      const vf u = simd::load_n(xr + i * h + j, n);
      return u * u;
    });
    for (int i = 0; i < NR; ++i) {
      rs[i] = 1.0f / std::sqrt(ss[i] / static_cast<float>(h) + eps);
      rstd[r + i] = rs[i];
    }
    row_chunks(h, [&](int64_t j, int n) {
      const vf g = gain(w, j, n, offset);
      for (int i = 0; i < NR; ++i)
        simd::store_n(yr + i * h + j, simd::load_n(xr + i * h + j, n) * rs[i] * g, n);
    });
  });
}

template <typename T>
void rms_bwd_rows(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* pw,
                  int64_t r0, int64_t r1, int64_t h, float offset) {
  for_row_groups(r0, r1, [&]<int NR>(int64_t r) {
    const T *dyr = dy + r * h, *xr = x + r * h;
    T* dxr = dx + r * h;
    float dot[NR], c[NR];
    rows_sum<NR>(h, dot, [&](int i, int64_t j, int n) {
      return simd::load_n(dyr + i * h + j, n) * gain(w, j, n, offset) *
             simd::load_n(xr + i * h + j, n);
    });
    // d/dx of x * rs: rs * (g - xhat * mean(g * xhat)), g = dy * (w + offset)
    for (int i = 0; i < NR; ++i) c[i] = dot[i] * rstd[r + i] / static_cast<float>(h);
    row_chunks(h, [&](int64_t j, int n) {
      const vf g = gain(w, j, n, offset);
      vf acc = pw ? simd::load_n(pw + j, n) : vf{};
      for (int i = 0; i < NR; ++i) {
        const float rs = rstd[r + i];
        const vf d = simd::load_n(dyr + i * h + j, n), xh = simd::load_n(xr + i * h + j, n) * rs;
        simd::store_n(dxr + i * h + j, (d * g - xh * c[i]) * rs, n);
        acc += d * xh;
      }
      if (pw) simd::store_n(pw + j, acc, n);
    });
  });
}

template <typename T>
void ln_fwd_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                 int64_t r0, int64_t r1, int64_t h, float eps) {
  const float inv_h = 1.0f / static_cast<float>(h);
  for_row_groups(r0, r1, [&]<int NR>(int64_t r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    float mu[NR], var[NR], rs[NR];
    rows_sum<NR>(h, mu, [&](int i, int64_t j, int n) { return simd::load_n(xr + i * h + j, n); });
    for (int i = 0; i < NR; ++i) mu[i] *= inv_h;
    // Two-pass variance (sum of squared deviations), not E[x^2] - mean^2, which cancels
    // catastrophically for rows with a large mean.
    rows_sum<NR>(h, var, [&](int i, int64_t j, int n) {
      const vf d = simd::load_n(xr + i * h + j, n) - mu[i];
      return simd::lanes_below(n) ? d * d : vf{};  // the tail's zero padding is not x - mu
    });
    for (int i = 0; i < NR; ++i) {
      rs[i] = 1.0f / std::sqrt(var[i] * inv_h + eps);
      mean[r + i] = mu[i];
      rstd[r + i] = rs[i];
    }
    row_chunks(h, [&](int64_t j, int n) {
      const vf g = gain(w, j, n, 0.0f), s = shift(b, j, n);
      for (int i = 0; i < NR; ++i) {
        const vf xh = (simd::load_n(xr + i * h + j, n) - mu[i]) * rs[i];
        simd::store_n(yr + i * h + j, xh * g + s, n);
      }
    });
  });
}

template <typename T>
void ln_bwd_rows(const T* dy, const T* x, const float* w, const float* mean, const float* rstd,
                 T* dx, float* pw, float* pb, int64_t r0, int64_t r1, int64_t h) {
  const float inv_h = 1.0f / static_cast<float>(h);
  for_row_groups(r0, r1, [&]<int NR>(int64_t r) {
    const T *dyr = dy + r * h, *xr = x + r * h;
    T* dxr = dx + r * h;
    float sg[NR], sgx[NR];
    rows_sum2<NR>(h, sg, sgx, [&](int i, int64_t j, int n, vf& a, vf& b) {
      const vf g = simd::load_n(dyr + i * h + j, n) * gain(w, j, n, 0.0f);  // 0 in padding
      a += g;
      b += g * ((simd::load_n(xr + i * h + j, n) - mean[r + i]) * rstd[r + i]);
    });
    row_chunks(h, [&](int64_t j, int n) {
      const vf g = gain(w, j, n, 0.0f);
      vf aw = pw ? simd::load_n(pw + j, n) : vf{}, ab = pb ? simd::load_n(pb + j, n) : vf{};
      for (int i = 0; i < NR; ++i) {
        const float mu = mean[r + i], rs = rstd[r + i];
        const vf d = simd::load_n(dyr + i * h + j, n), xh = (simd::load_n(xr + i * h + j, n) - mu) * rs;
        simd::store_n(dxr + i * h + j, (d * g - sg[i] * inv_h - xh * (sgx[i] * inv_h)) * rs, n);
        aw += d * xh;
        ab += d;
      }
      if (pw) simd::store_n(pw + j, aw, n);
      if (pb) simd::store_n(pb + j, ab, n);
    });
  });
}

}  // namespace

void rms_norm_fwd_cpu(Dt dt, const void* x, const float* weight, void* y, float* rstd,
                      int64_t rows, int64_t hidden, float eps, float offset) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    for_row_blocks(rows, hidden, [&](int, int, int64_t b, int64_t e) {
      rms_fwd_rows(static_cast<const T*>(x), weight, static_cast<T*>(y), rstd, b, e, hidden,
                   eps, offset);
    });
  });
}

void rms_norm_bwd_cpu(Dt dt, const void* dy, const void* x, const float* weight,
                      const float* rstd, void* dx, float* dweight, int64_t rows, int64_t hidden,
                      float offset) {
  Partials pw(dweight != nullptr, hidden);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    for_row_blocks(rows, hidden, [&](int t, int nt, int64_t b, int64_t e) {
      if (t == 0) pw.used = nt;
      rms_bwd_rows(static_cast<const T*>(dy), static_cast<const T*>(x), weight, rstd,
                   static_cast<T*>(dx), pw.of(t), b, e, hidden, offset);
    });
  });
  pw.reduce_into(dweight);
}

void layer_norm_fwd_cpu(Dt dt, const void* x, const float* weight, const float* bias, void* y,
                        float* mean, float* rstd, int64_t rows, int64_t hidden, float eps) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    for_row_blocks(rows, hidden, [&](int, int, int64_t b, int64_t e) {
      ln_fwd_rows(static_cast<const T*>(x), weight, bias, static_cast<T*>(y), mean, rstd, b, e,
                  hidden, eps);
    });
  });
}

void layer_norm_bwd_cpu(Dt dt, const void* dy, const void* x, const float* weight,
                        const float* mean, const float* rstd, void* dx, float* dweight,
                        float* dbias, int64_t rows, int64_t hidden) {
  Partials pw(dweight != nullptr, hidden), pb(dbias != nullptr, hidden);
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    for_row_blocks(rows, hidden, [&](int t, int nt, int64_t b, int64_t e) {
      if (t == 0) pw.used = pb.used = nt;
      ln_bwd_rows(static_cast<const T*>(dy), static_cast<const T*>(x), weight, mean, rstd,
                  static_cast<T*>(dx), pw.of(t), pb.of(t), b, e, hidden);
    });
  });
  pw.reduce_into(dweight);
  pb.reduce_into(dbias);
}

}  // namespace fastlm::fused
