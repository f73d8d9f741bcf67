// torch binding of the CPU fused AdamW step: checks the tensor lists, cuts them into
// equal-sized slices for the threads, and runs csrc/cpu/adamw.cpp over them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/adamw.h"

namespace {

using at::Tensor;
using fastlm::AdamDType;

AdamDType to_adam_dtype(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return AdamDType::f32;
    case at::kBFloat16: return AdamDType::bf16;
    case at::kHalf: return AdamDType::f16;
    default: TORCH_CHECK(false, "fastlm_cpu adamw: ", what, " has unsupported dtype ",
                         t.scalar_type(), "; use float32, bfloat16 or float16");
  }
}

void check_same(const Tensor& t, const Tensor& p, const char* what, size_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == p.numel(),
              "fastlm_cpu adamw: ", what, "[", i, "] must be a contiguous CPU tensor with ",
              p.numel(), " elements like params[", i, "]");
}

// Elements per slice of a pass over `tensors`: ~4 slices per thread, at least 16K elements
// each (below that, scheduling costs more than the memory traffic it splits); multiples of 64
// keep slices cache-line aligned.
int64_t slice_elems(at::TensorList tensors) {
  const int64_t threads = std::max(1, at::get_num_threads());
  int64_t total = 0;
  for (const Tensor& t : tensors) total += t.numel();
  const int64_t slice = std::max<int64_t>(16384, (total + threads * 4 - 1) / (threads * 4));
  return (slice + 63) / 64 * 64;
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList masters, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step,
                double inv_grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fastlm_cpu adamw: params, grads, exp_avgs, exp_avg_sqs must have equal lengths");
  TORCH_CHECK(masters.empty() || masters.size() == n,
              "fastlm_cpu adamw: masters must be empty or one per param");
  TORCH_CHECK(step >= 1, "fastlm_cpu adamw: step must be >= 1, got ", step);
  const int64_t slice = slice_elems(params);
  std::vector<fastlm::AdamWSlice> slices;
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.is_contiguous(), "fastlm_cpu adamw: params[", i,
                "] must be a contiguous CPU tensor");
    check_same(grads[i], p, "grads", i);
    check_same(exp_avgs[i], p, "exp_avgs", i);
    check_same(exp_avg_sqs[i], p, "exp_avg_sqs", i);
    TORCH_CHECK(grads[i].scalar_type() == p.scalar_type(), "fastlm_cpu adamw: grads[", i,
                "] has dtype ", grads[i].scalar_type(), " but its param has ", p.scalar_type());
    const AdamDType state = to_adam_dtype(exp_avgs[i], "exp_avgs");
    TORCH_CHECK(state != AdamDType::f16 && exp_avg_sqs[i].scalar_type() == exp_avgs[i].scalar_type(),
                "fastlm_cpu adamw: optimizer states must both be float32 or both bfloat16");
    float* master = nullptr;
    if (!masters.empty()) {
      check_same(masters[i], p, "masters", i);
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat, "fastlm_cpu adamw: masters[", i,
                  "] must be float32");
      master = masters[i].data_ptr<float>();
    }
    for (int64_t b = 0; b < p.numel(); b += slice) {
      slices.push_back({p.data_ptr(), grads[i].data_ptr(), master, exp_avgs[i].data_ptr(),
                        exp_avg_sqs[i].data_ptr(), to_adam_dtype(p, "params"), state, b,
                        std::min(p.numel(), b + slice)});
    }
  }
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  fastlm::AdamWHyper h{};
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.step_size = static_cast<float>(lr / bc1);
  h.beta1 = static_cast<float>(beta1);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(bc2));
  h.eps = static_cast<float>(eps);
  h.inv_grad_scale = static_cast<float>(inv_grad_scale);
  fastlm::adamw_step_cpu(slices.data(), static_cast<int64_t>(slices.size()), h);
}

// sqrt(sum of squares) over every element of every tensor, as an fp32 0-d tensor: the total
// 2-norm gradient clipping needs, in one threaded pass (accumulated in double).
Tensor total_norm(at::TensorList tensors) {
  const int64_t slice = slice_elems(tensors);
  std::vector<fastlm::GradSlice> slices;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), "fastlm_cpu total_norm: tensors[", i,
                "] must be a contiguous CPU tensor");
    const AdamDType dt = to_adam_dtype(t, "tensors");
    for (int64_t b = 0; b < t.numel(); b += slice)
      slices.push_back({t.data_ptr(), dt, b, std::min(t.numel(), b + slice)});
  }
  const double sq = fastlm::sum_squares_cpu(slices.data(), static_cast<int64_t>(slices.size()));
  return at::scalar_tensor(std::sqrt(sq), at::TensorOptions().dtype(at::kFloat));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("total_norm(Tensor[] tensors) -> Tensor");
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, int step, float inv_grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("adamw_step_", &adamw_step);
  m.impl("total_norm", &total_norm);
}
