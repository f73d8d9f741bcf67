// Fused AdamW step on the CPU over raw pointers: one pass per element reads param, grad, m, v
// (and the fp32 master copy for bf16/fp16 params) and writes them back, instead of the
// 4-6 passes of an unfused step.
#pragma once

#include <cstdint>

namespace fastlm {

enum class AdamDType { f32, bf16, f16 };

// Scalars are computed in double by the caller and rounded once, as torch.optim.AdamW's
// Python-side scalars are, so fp32 results match it to the last bits.
struct AdamWHyper {
  float decay;                  // 1 - lr * weight_decay
  float step_size;              // lr / (1 - beta1^step)
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  float eps;
  float inv_grad_scale;         // gradients are multiplied by this first (1 = no scaling)
};

// One tensor's slice [begin, end). master is fp32 or nullptr (then the param is updated in
// place in its own dtype). exp_avg/exp_avg_sq are fp32 or bf16 (state_dtype).
struct AdamWSlice {
  void* param;
  const void* grad;
  float* master;
  void* exp_avg;
  void* exp_avg_sq;
  AdamDType param_dtype, state_dtype;
  int64_t begin, end;
};

void adamw_step_cpu(const AdamWSlice* slices, int64_t n_slices, const AdamWHyper& h);

// A slice [begin, end) of one gradient, for the norm that gradient clipping needs.
struct GradSlice {
  const void* data;
  AdamDType dtype;
  int64_t begin, end;
};

// Sum of squares over all slices: fp32 vector partials per 1K-element block, added into a
// double per slice, the slices then summed in order (the result does not depend on threads).
double sum_squares_cpu(const GradSlice* slices, int64_t n_slices);

}  // namespace fastlm
