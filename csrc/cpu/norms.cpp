// RMSNorm / LayerNorm forward and backward: one thread per block of rows, each row read from
// memory once per pass (a 4096-wide bf16 row is 8 KiB, so the second and third passes hit L1),
// statistics in fp32. The unfused PyTorch forms make 4-6 full passes over (rows, hidden)
// through memory, with fp32 temporaries for bf16 inputs.
#include "cpu/norms.h"

#include <omp.h>

#include <vector>

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
    vf a0{}, a1{};  // two accumulators: the adds are latency-bound otherwise
    int64_t j = 0;
    for (; j + 2 * W <= h; j += 2 * W) {
      const vf u = simd::loadw(xr + j), v = simd::loadw(xr + j + W);
      a0 += u * u;
      a1 += v * v;
    }
    for (; j < h; j += W) {
      const vf u = simd::load_n(xr + j, lanes(h, j));
      a0 += u * u;
    }
    const float rs = 1.0f / std::sqrt(simd::hsum(a0 + a1) / static_cast<float>(h) + eps);
    rstd[r] = rs;
    for (j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      simd::store_n(yr + j, simd::load_n(xr + j, n) * rs * gain(w, j, n, offset), n);
    }
  }
}

template <typename T>
void rms_bwd_rows(const T* dy, const T* x, const float* w, const float* rstd, T* dx, float* pw,
                  int64_t r0, int64_t r1, int64_t h, float offset) {
  for (int64_t r = r0; r < r1; ++r) {
    const T *dyr = dy + r * h, *xr = x + r * h;
    T* dxr = dx + r * h;
    const float rs = rstd[r];
    vf acc{};
    for (int64_t j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      acc += simd::load_n(dyr + j, n) * gain(w, j, n, offset) * simd::load_n(xr + j, n);
    }
    // d/dx of x * rs: rs * (g - xhat * mean(g * xhat)), g = dy * (w + offset)
    const float c = simd::hsum(acc) * rs / static_cast<float>(h);
    for (int64_t j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      const vf d = simd::load_n(dyr + j, n), xh = simd::load_n(xr + j, n) * rs;
      simd::store_n(dxr + j, (d * gain(w, j, n, offset) - xh * c) * rs, n);
      if (pw) simd::store_n(pw + j, simd::load_n(pw + j, n) + d * xh, n);
    }
  }
}

template <typename T>
void ln_fwd_rows(const T* x, const float* w, const float* b, T* y, float* mean, float* rstd,
                 int64_t r0, int64_t r1, int64_t h, float eps) {
  const float inv_h = 1.0f / static_cast<float>(h);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * h;
    T* yr = y + r * h;
    vf s{};
    for (int64_t j = 0; j < h; j += W) s += simd::load_n(xr + j, lanes(h, j));
    const float mu = simd::hsum(s) * inv_h;
    // Two-pass variance (sum of squared deviations), not E[x^2] - mean^2, which cancels
    // catastrophically for rows with a large mean.
    vf q{};
    for (int64_t j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      const vf d = simd::load_n(xr + j, n) - mu;
      q += simd::lanes_below(n) ? d * d : vf{};
    }
    const float rs = 1.0f / std::sqrt(simd::hsum(q) * inv_h + eps);
    mean[r] = mu;
    rstd[r] = rs;
    for (int64_t j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      const vf xh = (simd::load_n(xr + j, n) - mu) * rs;
      simd::store_n(yr + j, xh * gain(w, j, n, 0.0f) + shift(b, j, n), n);
    }
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
    vf sg{}, sgx{};
    for (int64_t j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      const vf g = simd::load_n(dyr + j, n) * gain(w, j, n, 0.0f);  // 0 in padding lanes
      sg += g;
      sgx += g * ((simd::load_n(xr + j, n) - mu) * rs);
    }
    const float c1 = simd::hsum(sg) * inv_h, c2 = simd::hsum(sgx) * inv_h;
    for (int64_t j = 0; j < h; j += W) {
      const int n = lanes(h, j);
      const vf d = simd::load_n(dyr + j, n), xh = (simd::load_n(xr + j, n) - mu) * rs;
      simd::store_n(dxr + j, (d * gain(w, j, n, 0.0f) - c1 - xh * c2) * rs, n);
      if (pw) simd::store_n(pw + j, simd::load_n(pw + j, n) + d * xh, n);
      if (pb) simd::store_n(pb + j, simd::load_n(pb + j, n) + d, n);
    }
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
