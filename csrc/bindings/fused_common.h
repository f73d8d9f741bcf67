// Argument checks shared by the bindings of the fused row/elementwise CPU kernels (norms,
// rotary, activations, cross entropy). Every message names the op and the argument.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cpu/fused_simd.h"

namespace fastlm::fused {

inline Dt dt_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dt::f32;
    case at::kBFloat16: return Dt::bf16;
    case at::kHalf: return Dt::f16;
    default:
      TORCH_CHECK(false, "fastlm_cpu ", op, ": ", name, " has dtype ", t.scalar_type(),
                  "; use float32, bfloat16 or float16");
  }
}

// A contiguous CPU tensor of `dim` dimensions (dim < 0: any) and, if `like` is given, its dtype.
inline void check_arg(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                      const at::Tensor* like = nullptr) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm_cpu ", op, ": ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(dim < 0 || t.dim() == dim, "fastlm_cpu ", op, ": ", name, " must be ", dim,
              "-D, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "fastlm_cpu ", op, ": ", name,
              " must be contiguous (call .contiguous() first)");
  if (like != nullptr) {
    TORCH_CHECK(t.scalar_type() == like->scalar_type(), "fastlm_cpu ", op, ": ", name,
                " has dtype ", t.scalar_type(), " but x has ", like->scalar_type());
  }
}

// An optional contiguous fp32 CPU vector of `size` elements, as a raw pointer (nullptr if absent).
inline const float* opt_vec(const std::optional<at::Tensor>& t, const char* op, const char* name,
                            int64_t size) {
  if (!t.has_value()) return nullptr;
  check_arg(*t, op, name, 1);
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->size(0) == size, "fastlm_cpu ", op, ": ",
              name, " must be a float32 vector of ", size, " elements, got ", t->scalar_type(),
              " ", t->sizes());
  return t->data_ptr<float>();
}

inline void check_stats(const at::Tensor& t, const char* op, const char* name, int64_t rows) {
  check_arg(t, op, name, 1);
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.size(0) == rows, "fastlm_cpu ", op, ": ", name,
              " must be the float32 (rows,) statistic saved by the forward, got ",
              t.scalar_type(), " ", t.sizes());
}

}  // namespace fastlm::fused
