// Per-row softmax cross-entropy and its gradient in one sweep over each logit row: the row is
// read once into a per-thread fp32 buffer (a 128k vocabulary is 512 KiB, L2-resident), and
// max, sum of exp, loss and gradient come from that buffer. PyTorch's unfused path (log_softmax,
// nll_loss, then their backward) reads and writes the full (rows, vocab) matrix 4-5 times.
#include "cpu/cross_entropy.h"

#include <omp.h>

#include <limits>
#include <vector>

namespace fastlm::fused {
namespace {

using simd::vf;
using simd::W;

inline int lanes(int64_t v, int64_t j) { return static_cast<int>(std::min<int64_t>(v - j, W)); }

struct RowStats {
  float max, sum_z;  // over the (soft-capped) logits
};

// z = capped logits into buf; returns their max and sum (padding lanes masked out).
template <typename T>
RowStats load_logits(const T* row, float* buf, int64_t v, float softcap) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf vmax = simd::splat(ninf), vsum{};
  for (int64_t j = 0; j < v; j += W) {
    const int n = lanes(v, j);
    vf z = simd::load_n(row + j, n);
    if (softcap > 0.0f) z = simd::tanh_any(z * (1.0f / softcap)) * softcap;
    simd::store_n(buf + j, z, n);
    const auto live = simd::lanes_below(n);
    vmax = simd::vmax(vmax, live ? z : simd::splat(ninf));
    vsum += live ? z : vf{};
  }
  return {simd::hmax(vmax), simd::hsum(vsum)};
}

// e[j] = exp(z[j] - max) (may alias z); returns the sum over the row.
inline float exp_and_sum(const float* z, float* e, int64_t v, float max) {
  vf acc{};
  for (int64_t j = 0; j < v; j += W) {
    const int n = lanes(v, j);
    const vf x = simd::exp_any(simd::load_n(z + j, n) - max);
    simd::store_n(e + j, x, n);
    acc += simd::lanes_below(n) ? x : vf{};
  }
  return simd::hsum(acc);
}

// grad[j] = scale * (e[j] / sum - eps / V - (1 - eps) [j == label]) * (1 - (z[j]/cap)^2 if capped)
template <typename T>
void write_grad(T* row, const float* z, const float* e, int64_t v, int64_t label, float inv_sum,
                float scale, const CeParams& p) {
  const float uniform = p.smoothing / static_cast<float>(v), inv_cap = 1.0f / p.softcap;
  for (int64_t j = 0; j < v; j += W) {
    const int n = lanes(v, j);
    vf g = simd::load_n(e + j, n) * inv_sum - uniform;
    if (label >= j && label < j + n) g[label - j] -= 1.0f - p.smoothing;
    if (p.softcap > 0.0f) {
      const vf t = simd::load_n(z + j, n) * inv_cap;
      g = g * (1.0f - t * t);
    }
    simd::store_n(row + j, g * scale, n);
  }
}

template <typename T>
void ce_rows(const CeParams& p, T* logits, const int64_t* labels, const float* row_scale,
             float* loss) {
  const int64_t v = p.vocab;
  // Softcapped gradients need z after the exps are taken, so they get a second buffer.
  const int64_t per_thread = (p.grad && p.softcap > 0.0f) ? 2 * v : v;
#pragma omp parallel if (p.rows * v >= kParallelMin)
  {
    std::vector<float> buf(per_thread);
    float* z = buf.data();
    float* e = (per_thread == 2 * v) ? z + v : z;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < p.rows; ++r) {
      T* row = logits + r * v;
      const int64_t label = labels[r];
      if (label == p.ignore_index) {
        loss[r] = 0.0f;
        if (p.grad) std::memset(static_cast<void*>(row), 0, v * sizeof(T));
        continue;
      }
      const RowStats st = load_logits(row, z, v, p.softcap);
      const float z_label = z[label];
      const float sum = exp_and_sum(z, e, v, st.max);
      const float lse = st.max + std::log(sum);
      // (1 - eps) * (lse - z_y) + eps * (lse - mean(z)): the smoothed target's cross-entropy
      loss[r] = lse - (1.0f - p.smoothing) * z_label - p.smoothing * (st.sum_z / v);
      if (p.grad) write_grad(row, z, e, v, label, 1.0f / sum, row_scale[r], p);
    }
  }
}

}  // namespace

void ce_rows_cpu(Dt dt, const CeParams& p, void* logits, const int64_t* labels,
                 const float* row_scale, float* loss) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    ce_rows(p, static_cast<T*>(logits), labels, row_scale, loss);
  });
}

}  // namespace fastlm::fused
