// CPU AdamW: all tensors of a parameter group in one OpenMP region, split into equal slices
// (see the binding), each processed in a single vectorised pass. (Non-temporal stores, which
// skip the read-for-ownership of the three written streams, were tried and measured 2x slower
// on the 2-core EPYC VM this was tuned on, so plain stores it is.)
#include "cpu/adamw.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_vec.h"

// No fused multiply-add here: torch.optim.AdamW rounds every product separately, and matching
// it bit for bit in fp32 is worth more than FMA speed in a loop bound by memory bandwidth.
#pragma GCC optimize("fp-contract=off")

namespace fastlm {
namespace {

// The same operation order as torch.optim.AdamW (decoupled decay first, then
// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)), so fp32 results agree to rounding.
template <typename P, typename S, bool kMaster>
void step_slice(const AdamWSlice& s, const AdamWHyper& h) {
  P* p = static_cast<P*>(s.param);
  const P* g = static_cast<const P*>(s.grad);
  S* m = static_cast<S*>(s.exp_avg);
  S* v = static_cast<S*>(s.exp_avg_sq);
  float* w = s.master;
  // torch's (vectorised) lerp(m, g, w): fma(w, g - m, m) for w < 0.5, else
  // fma(-(g - m), 1 - w, g): the one place torch itself uses a fused multiply-add.
  const bool lerp_low = h.one_minus_beta1 < 0.5f;
  // Both forms are fma(a, g - m, base): pick a outside the loop so the loop has no branch.
  const float lerp_a = lerp_low ? h.one_minus_beta1 : -(1.0f - h.one_minus_beta1);
#pragma omp simd
  for (int64_t i = s.begin; i < s.end; ++i) {
    const float gi = to_float(g[i]) * h.inv_grad_scale;
    float pi = kMaster ? w[i] : to_float(p[i]);
    pi *= h.decay;
    const float m0 = to_float(m[i]);
    const float diff = gi - m0;
    const float mi = std::fma(lerp_a, diff, lerp_low ? m0 : gi);
    // addcmul as ATen's CPU kernel compiles it: fma((value * g), g, v * beta2).
    const float vi = std::fma(h.one_minus_beta2 * gi, gi, to_float(v[i]) * h.beta2);
    const float denom = std::sqrt(vi) / h.bias_correction2_sqrt + h.eps;
    pi += (-h.step_size * mi) / denom;  // addcdiv's order: (value * t1) / t2
    m[i] = from_float<S>(mi);
    v[i] = from_float<S>(vi);
    if (kMaster) w[i] = pi;
    p[i] = from_float<P>(pi);
  }
}

template <typename P, typename S>
void dispatch_master(const AdamWSlice& s, const AdamWHyper& h) {
  if (s.master != nullptr) {
    step_slice<P, S, true>(s, h);
  } else {
    step_slice<P, S, false>(s, h);
  }
}

template <typename P>
void dispatch_state(const AdamWSlice& s, const AdamWHyper& h) {
  if (s.state_dtype == AdamDType::bf16) {
    dispatch_master<P, bf16>(s, h);
  } else {
    dispatch_master<P, float>(s, h);
  }
}

void step_any(const AdamWSlice& s, const AdamWHyper& h) {
  switch (s.param_dtype) {
    case AdamDType::f32: return dispatch_state<float>(s, h);
    case AdamDType::bf16: return dispatch_state<bf16>(s, h);
    case AdamDType::f16: return dispatch_state<fp16>(s, h);
  }
}

template <typename T>
double sum_squares_slice(const T* x, int64_t begin, int64_t end) {
  double total = 0.0;
  for (int64_t b = begin; b < end; b += 1024) {
    const int64_t e = std::min(end, b + 1024);
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t i = b; i < e; ++i) {
      const float v = to_float(x[i]);
      acc += v * v;
    }
    total += acc;
  }
  return total;
}

}  // namespace

double sum_squares_cpu(const GradSlice* slices, int64_t n_slices) {
  std::vector<double> partial(static_cast<size_t>(n_slices), 0.0);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_slices; ++i) {
    const GradSlice& s = slices[i];
    switch (s.dtype) {
      case AdamDType::f32:
        partial[i] = sum_squares_slice(static_cast<const float*>(s.data), s.begin, s.end);
        break;
      case AdamDType::bf16:
        partial[i] = sum_squares_slice(static_cast<const bf16*>(s.data), s.begin, s.end);
        break;
      case AdamDType::f16:
        partial[i] = sum_squares_slice(static_cast<const fp16*>(s.data), s.begin, s.end);
        break;
    }
  }
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

void adamw_step_cpu(const AdamWSlice* slices, int64_t n_slices, const AdamWHyper& h) {
  // Static schedule over equal-sized slices: every thread streams the same number of bytes,
  // and each thread touches the same memory every step (first-touch / NUMA friendly).
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n_slices; ++i) step_any(slices[i], h);
}

}  // namespace fastlm
