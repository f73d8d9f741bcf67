// torch binding of the CUDA multi-tensor AdamW: checks the lists, then one call that packs the
// tensors into as few launches as the kernel's parameter table allows.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "bindings/cuda_platform.h"
#include "cuda/adamw.h"

namespace {

using at::Tensor;
using fastlm::cuda::AdamDType;
namespace fb = fastlm::binding;

AdamDType dtype_of(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return AdamDType::f32;
    case at::kBFloat16: return AdamDType::bf16;
    case at::kHalf: return AdamDType::f16;
    default: TORCH_CHECK(false, "fastlm_cuda adamw: ", what, " has unsupported dtype ",
                         t.scalar_type(), "; use float32, bfloat16 or float16");
  }
}

void adamw_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                at::TensorList exp_avg_sqs, at::TensorList masters, double lr, double beta1,
                double beta2, double eps, double weight_decay, int64_t step,
                double inv_grad_scale) {
  const size_t n = params.size();
  TORCH_CHECK(n > 0, "fastlm_cuda adamw: no parameters");
  TORCH_CHECK(grads.size() == n && exp_avgs.size() == n && exp_avg_sqs.size() == n,
              "fastlm_cuda adamw: params, grads, exp_avgs, exp_avg_sqs must have equal lengths");
  TORCH_CHECK(masters.empty() || masters.size() == n,
              "fastlm_cuda adamw: masters must be empty or one per param");
  TORCH_CHECK(step >= 1, "fastlm_cuda adamw: step must be >= 1, got ", step);
  const fb::CudaGuard guard(params[0].device());
  const AdamDType pdt = dtype_of(params[0], "params[0]");
  const AdamDType sdt = dtype_of(exp_avgs[0], "exp_avgs[0]");
  TORCH_CHECK(sdt != AdamDType::f16, "fastlm_cuda adamw: states must be float32 or bfloat16");
  std::vector<fastlm::cuda::AdamWTensor> tensors(n);
  for (size_t i = 0; i < n; ++i) {
    const Tensor& p = params[i];
    for (const Tensor* t : {&p, &grads[i], &exp_avgs[i], &exp_avg_sqs[i]}) {
      TORCH_CHECK(t->device().type() == fb::kCudaDevice && t->device() == p.device() && t->is_contiguous() &&
                      t->numel() == p.numel(),
                  "fastlm_cuda adamw: tensor ", i, " and its grad/states must be contiguous, on ",
                  p.device(), ", with ", p.numel(), " elements");
    }
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type() &&
                    grads[i].scalar_type() == p.scalar_type(),
                "fastlm_cuda adamw: params and grads of one call must share a dtype");
    TORCH_CHECK(exp_avgs[i].scalar_type() == exp_avgs[0].scalar_type() &&
                    exp_avg_sqs[i].scalar_type() == exp_avgs[0].scalar_type(),
                "fastlm_cuda adamw: states of one call must share a dtype");
    float* master = nullptr;
    if (!masters.empty()) {
      TORCH_CHECK(masters[i].scalar_type() == at::kFloat && masters[i].device().type() == fb::kCudaDevice &&
                      masters[i].is_contiguous() && masters[i].numel() == p.numel(),
                  "fastlm_cuda adamw: masters[", i, "] must be a contiguous float32 CUDA tensor");
      master = masters[i].data_ptr<float>();
    }
    tensors[i] = {p.data_ptr(), grads[i].data_ptr(), master, exp_avgs[i].data_ptr(),
                  exp_avg_sqs[i].data_ptr(), p.numel()};
  }
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  const double w1 = 1.0 - beta1;
  fastlm::cuda::AdamWHyper h{};
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  h.step_size = static_cast<float>(lr / bc1);
  h.lerp_low = w1 < 0.5;
  h.lerp_a = static_cast<float>(h.lerp_low ? w1 : -(1.0 - w1));
  h.beta2 = static_cast<float>(beta2);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  h.bias_correction2_sqrt = static_cast<float>(std::sqrt(bc2));
  h.eps = static_cast<float>(eps);
  h.inv_grad_scale = static_cast<float>(inv_grad_scale);
  const cudaError_t err = fastlm::cuda::adamw_step_cuda(
      tensors.data(), static_cast<int>(n), pdt, sdt, h, nullptr, nullptr,
      fb::current_stream());
  TORCH_CHECK(err == cudaSuccess, "fastlm_cuda adamw: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(FASTLM_CUDA_LIBRARY, m) {
  m.def("adamw_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] masters, float lr, float beta1, float beta2, "
        "float eps, float weight_decay, int step, float inv_grad_scale) -> ()");
}

TORCH_LIBRARY_IMPL(FASTLM_CUDA_LIBRARY, FASTLM_CUDA_DISPATCH_KEY, m) { m.impl("adamw_step_", &adamw_step); }
