// Fused multi-tensor AdamW for CUDA over raw pointers (no torch here).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastlm {
namespace cuda {

enum class AdamDType { f32, bf16, f16 };

struct AdamWTensor {
  void* param;
  const void* grad;
  float* master;  // fp32 master weights, or nullptr
  void* exp_avg;
  void* exp_avg_sq;
  int64_t numel;
};

// Scalars computed in double by the caller and rounded once, as in csrc/cpu/adamw.h.
struct AdamWHyper {
  float decay, step_size, lerp_a, beta2, one_minus_beta2, bias_correction2_sqrt, eps;
  float inv_grad_scale;  // used when the inv_grad_scale pointer is nullptr
  bool lerp_low;
};

// Steps every tensor in a few launches (tensors are packed into launches of up to
// kMaxTensors tensors and kMaxBlocks chunks). inv_grad_scale and found_inf are device
// pointers or nullptr: the scale is read on the device and a nonzero found_inf makes every
// block return before touching memory, so GradScaler's skip costs no host sync.
cudaError_t adamw_step_cuda(const AdamWTensor* tensors, int n_tensors, AdamDType param_dtype,
                            AdamDType state_dtype, const AdamWHyper& h,
                            const float* inv_grad_scale, const float* found_inf,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
