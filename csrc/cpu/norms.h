// RMSNorm and LayerNorm on the CPU over raw pointers (no torch here).
//
// x, y, dy, dx: (rows, hidden) contiguous, element type dt. weight/bias and every statistic are
// fp32: the caller upcasts the (hidden,) parameters once, which costs nothing next to the rows.
// Forward saves the per-row statistics so the backward never recomputes them.
#pragma once

#include <cstdint>

#include "cpu/fused_simd.h"

namespace fastlm::fused {

// y = x * rstd * (weight + offset), rstd = 1 / sqrt(mean(x^2) + eps). weight may be nullptr
// (then it is 1). rstd: (rows,) fp32, written.
void rms_norm_fwd_cpu(Dt dt, const void* x, const float* weight, void* y, float* rstd,
                      int64_t rows, int64_t hidden, float eps, float offset);

// dx written; dweight (hidden,) fp32 written (not accumulated into) unless nullptr.
void rms_norm_bwd_cpu(Dt dt, const void* dy, const void* x, const float* weight,
                      const float* rstd, void* dx, float* dweight, int64_t rows, int64_t hidden,
                      float offset);

// y = (x - mean) * rstd * weight + bias; weight/bias may be nullptr. mean, rstd: (rows,) fp32.
void layer_norm_fwd_cpu(Dt dt, const void* x, const float* weight, const float* bias, void* y,
                        float* mean, float* rstd, int64_t rows, int64_t hidden, float eps);

// dx written; dweight/dbias (hidden,) fp32 written unless nullptr.
void layer_norm_bwd_cpu(Dt dt, const void* dy, const void* x, const float* weight,
                        const float* mean, const float* rstd, void* dx, float* dweight,
                        float* dbias, int64_t rows, int64_t hidden);

}  // namespace fastlm::fused
