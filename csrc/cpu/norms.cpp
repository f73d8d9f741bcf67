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

// Sums f(j, n) (a vector for the n <= W features from j) over a row, with two accumulators: one
// chain of dependent adds would be bound by the add latency. Full chunks pass n = W as a
// constant, so their loads compile without the tail's masking.
template <typename F>
inline float row_sum(int64_t h, F&& f) {
  vf a0{}, a1{};
  int64_t j = 0;
  for (; j + 2 * W <= h; j += 2 * W) {
    a0 += f(j, W);
    a1 += f(j + W, W);
  }
  for (; j < h; j += W) a0 += f(j, lanes(h, j));
  return simd::hsum(a0 + a1);
}

// row_sum for two sums over the same loads: f(j, n, a, b) adds its terms to a and b.
template <typename F>
inline void row_sum2(int64_t h, float& sa, float& sb, F&& f) {
  vf a0{}, a1{}, b0{}, b1{};
  int64_t j = 0;
  for (; j + 2 * W <= h; j += 2 * W) {
    f(j, W, a0, b0);
    f(j + W, W, a1, b1);
  }
  for (; j < h; j += W) f(j, lanes(h, j), a0, b0);
  sa = simd::hsum(a0 + a1);
  sb = simd::hsum(b0 + b1);
}

// Calls body(j, n) for each chunk of a row, full chunks with the constant n = W.
template <typename F>
inline void row_chunks(int64_t h, F&& body) {
  int64_t j = 0;
  for (; j + W <= h; j += W) body(j, W);
  if (j < h) body(j, lanes(h, j));
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
// slices are added in thread order, so results do not depend on scheduling.
struct Partials {
  std::vector<float> buf;
  int64_t hidden;
  int used = 1;
  Partials(bool wanted, int64_t h) : buf(wanted ? omp_get_max_threads() * h : 0, 0.0f), hidden(h) {}
  float* of(int t) { return buf.empty() ? nullptr : buf.data() + t * hidden; }
  void reduce_into(float* out) const {
    if (out == nullptr) return;
#pragma omp parallel for if (used * hidden >= kParallelMin)
    for (int64_t j = 0; j < hidden; ++j) {
      float s = 0.0f;
      for (int t = 0; t < used; ++t) s += buf[t * hidden + j];
      out[j] = s;
    }
  }
};

template <typename T>
void rms_fwd_rows(const T* x, const float* w, T* y, float* rstd, int64_t r0, int64_t r1,
                  int64_t h, float eps, float offset) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    const float ss = row_sum(h, [&](int64_t j, int n) {
      const vf u = simd::load_n(xr + j, n);
      return u * u;
    });
    const float rs = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
    rstd[r] = rs;
    row_chunks(h, [&](int64_t j, int n) {
      simd::store_n(yr + j, simd::load_n(xr + j, n) * rs * gain(w, j, n, offset), n);
    });
  }
}

template <typename T>
void rms_bwd_rows(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* pw,
                  int64_t r0, int64_t r1, int64_t h, float offset) {
  for (int64_t r = r0; r < r1; ++r) {
    const T *dyr = dy + r * h, *xr = x + r * h;
    T* dxr = dx + r * h;
    const float rs = rstd[r];
    const float dot = row_sum(h, [&](int64_t j, int n) {
      return simd::load_n(dyr + j, n) * gain(w, j, n, offset) * simd::load_n(xr + j, n);
    });
    // d/dx of x * rs: rs * (g - xhat * mean(g * xhat)), g = dy * (w + offset)
    const float c = dot * rs / static_cast<float>(h);
    row_chunks(h, [&](int64_t j, int n) {
      const vf d = simd::load_n(dyr + j, n), xh = simd::load_n(xr + j, n) * rs;
      simd::store_n(dxr + j, (d * gain(w, j, n, offset) - xh * c) * rs, n);
      if (pw) simd::store_n(pw + j, simd::load_n(pw + j, n) + d * xh, n);
    });
  }
}

template <typename T>
void ln_fwd_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                 int64_t r0, int64_t r1, int64_t h, float eps) {
  const float inv_h = 1.0f / static_cast<float>(h);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    const float mu = row_sum(h, [&](int64_t j, int n) { return simd::load_n(xr + j, n); }) * inv_h;
    // Two-pass variance (sum of squared deviations), not E[x^2] - mean^2, which cancels
    // catastrophically for rows with a large mean.
    const float var = row_sum(h, [&](int64_t j, int n) {
      const vf d = simd::load_n(xr + j, n) - mu;
      return simd::lanes_below(n) ? d * d : vf{};  // the tail's zero padding is not x - mu
    }) * inv_h;
    const float rs = 1.0f / std::sqrt(var + eps);
    mean[r] = mu;
    rstd[r] = rs;
    row_chunks(h, [&](int64_t j, int n) {
      const vf xh = (simd::load_n(xr + j, n) - mu) * rs;
      simd::store_n(yr + j, xh * gain(w, j, n, 0.0f) + shift(b, j, n), n);
    });
  }
}

template <typename T>
void ln_bwd_rows(const T* dy, const T* x, const float* w, const float* mean, const float* rstd,
                 T* dx, float* pw, float* pb, int64_t r0, int64_t r1, int64_t h) {
  const float inv_h = 1.0f / static_cast<float>(h);
  for (int64_t r = r0; r < r1; ++r) {
    const T *dyr = dy + r * h, *xr = x + r * h;
    T* dxr = dx + r * h;
    const float mu = mean[r], rs = rstd[r];
    float sg, sgx;
    row_sum2(h, sg, sgx, [&](int64_t j, int n, vf& a, vf& b) {
      const vf g = simd::load_n(dyr + j, n) * gain(w, j, n, 0.0f);  // 0 in padding lanes
      a += g;
      b += g * ((simd::load_n(xr + j, n) - mu) * rs);
    });
    const float c1 = sg * inv_h, c2 = sgx * inv_h;
    row_chunks(h, [&](int64_t j, int n) {
      const vf d = simd::load_n(dyr + j, n), xh = (simd::load_n(xr + j, n) - mu) * rs;
      simd::store_n(dxr + j, (d * gain(w, j, n, 0.0f) - c1 - xh * c2) * rs, n);
      if (pw) simd::store_n(pw + j, simd::load_n(pw + j, n) + d * xh, n);
      if (pb) simd::store_n(pb + j, simd::load_n(pb + j, n) + d, n);
    });
  }
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
