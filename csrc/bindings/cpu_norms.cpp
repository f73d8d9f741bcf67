// torch binding of the CPU RMSNorm/LayerNorm kernels (csrc/cpu/norms.cpp): checks, allocation,
// raw pointers. x is (rows, hidden); the Python op flattens leading dimensions first.
#include <torch/library.h>

#include <tuple>

#include "bindings/fused_common.h"
#include "cpu/norms.h"

namespace {

using at::Tensor;
using fastlm::fused::check_arg;
using fastlm::fused::check_stats;
using fastlm::fused::dt_of;
using fastlm::fused::opt_vec;

// An fp32 (hidden,) gradient buffer, or an empty tensor when that gradient is not wanted.
Tensor grad_buffer(bool wanted, const Tensor& x) {
  return at::empty({wanted ? x.size(1) : 0}, x.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor> rms_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                   double eps, double offset) {
  check_arg(x, "rms_norm_fwd", "x", 2);
  const float* w = opt_vec(weight, "rms_norm_fwd", "weight", x.size(1));
  Tensor y = at::empty_like(x);
  Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  fastlm::fused::rms_norm_fwd_cpu(dt_of(x, "rms_norm_fwd", "x"), x.data_ptr(), w, y.data_ptr(),
                                  rstd.data_ptr<float>(), x.size(0), x.size(1),
                                  static_cast<float>(eps), static_cast<float>(offset));
  return {y, rstd};
}

std::tuple<Tensor, Tensor> rms_bwd(const Tensor& dy, const Tensor& x,
                                   const std::optional<Tensor>& weight, const Tensor& rstd,
                                   double offset, bool weight_grad) {
  check_arg(x, "rms_norm_bwd", "x", 2);
  check_arg(dy, "rms_norm_bwd", "dy", 2, &x);
  TORCH_CHECK(dy.sizes() == x.sizes(), "fastlm_cpu rms_norm_bwd: dy must have x's shape");
  check_stats(rstd, "rms_norm_bwd", "rstd", x.size(0));
  const float* w = opt_vec(weight, "rms_norm_bwd", "weight", x.size(1));
  Tensor dx = at::empty_like(x), dw = grad_buffer(weight_grad && w, x);
  fastlm::fused::rms_norm_bwd_cpu(dt_of(x, "rms_norm_bwd", "x"), dy.data_ptr(), x.data_ptr(), w,
                                  rstd.data_ptr<float>(), dx.data_ptr(),
                                  dw.numel() ? dw.data_ptr<float>() : nullptr, x.size(0),
                                  x.size(1), static_cast<float>(offset));
  return {dx, dw};
}

std::tuple<Tensor, Tensor, Tensor> ln_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                          const std::optional<Tensor>& bias, double eps) {
  check_arg(x, "layer_norm_fwd", "x", 2);
  const float* w = opt_vec(weight, "layer_norm_fwd", "weight", x.size(1));
  const float* b = opt_vec(bias, "layer_norm_fwd", "bias", x.size(1));
  Tensor y = at::empty_like(x);
  Tensor mean = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty_like(mean);
  fastlm::fused::layer_norm_fwd_cpu(dt_of(x, "layer_norm_fwd", "x"), x.data_ptr(), w, b,
                                    y.data_ptr(), mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), x.size(0), x.size(1),
                                    static_cast<float>(eps));
  return {y, mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> ln_bwd(const Tensor& dy, const Tensor& x,
                                          const std::optional<Tensor>& weight, const Tensor& mean,
                                          const Tensor& rstd, bool weight_grad, bool bias_grad) {
  check_arg(x, "layer_norm_bwd", "x", 2);
  check_arg(dy, "layer_norm_bwd", "dy", 2, &x);
  TORCH_CHECK(dy.sizes() == x.sizes(), "fastlm_cpu layer_norm_bwd: dy must have x's shape");
  check_stats(mean, "layer_norm_bwd", "mean", x.size(0));
  check_stats(rstd, "layer_norm_bwd", "rstd", x.size(0));
  const float* w = opt_vec(weight, "layer_norm_bwd", "weight", x.size(1));
  Tensor dx = at::empty_like(x);
  Tensor dw = grad_buffer(weight_grad, x), db = grad_buffer(bias_grad, x);
  fastlm::fused::layer_norm_bwd_cpu(
      dt_of(x, "layer_norm_bwd", "x"), dy.data_ptr(), x.data_ptr(), w, mean.data_ptr<float>(),
      rstd.data_ptr<float>(), dx.data_ptr(), dw.numel() ? dw.data_ptr<float>() : nullptr,
      db.numel() ? db.data_ptr<float>() : nullptr, x.size(0), x.size(1));
  return {dx, dw, db};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("rms_norm_fwd(Tensor x, Tensor? weight, float eps, float offset) -> (Tensor, Tensor)");
  m.def("rms_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, float offset, "
        "bool weight_grad) -> (Tensor, Tensor)");
  m.def("layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
        "bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("rms_norm_fwd", &rms_fwd);
  m.impl("rms_norm_bwd", &rms_bwd);
  m.impl("layer_norm_fwd", &ln_fwd);
  m.impl("layer_norm_bwd", &ln_bwd);
}
