// torch binding of the CPU activation kernels (csrc/cpu/activations.cpp). `act` is the kernel's
// Act code: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation).
#include <torch/library.h>

#include <tuple>

#include "bindings/fused_common.h"
#include "cpu/activations.h"

namespace {

using at::Tensor;
using fastlm::fused::Act;
using fastlm::fused::check_arg;
using fastlm::fused::dt_of;

Act act_of(int64_t act, const char* op) {
  TORCH_CHECK(act >= 0 && act <= 2, "fastlm_cpu ", op, ": act must be 0 (silu), 1 (gelu) or 2 "
              "(gelu tanh), got ", act);
  return static_cast<Act>(act);
}

void check_same(const Tensor& t, const char* op, const char* name, const Tensor& like) {
  check_arg(t, op, name, -1, &like);
  TORCH_CHECK(t.sizes() == like.sizes(), "fastlm_cpu ", op, ": ", name, " has shape ", t.sizes(),
              " but expected ", like.sizes());
}

Tensor glu_fwd(const Tensor& gate, const Tensor& up, int64_t act) {
  check_arg(gate, "glu_fwd", "gate", -1);
  check_same(up, "glu_fwd", "up", gate);
  Tensor out = at::empty_like(gate);
  fastlm::fused::glu_fwd_cpu(dt_of(gate, "glu_fwd", "gate"), act_of(act, "glu_fwd"),
                             gate.data_ptr(), up.data_ptr(), out.data_ptr(), gate.numel());
  return out;
}

std::tuple<Tensor, Tensor> glu_bwd(const Tensor& dout, const Tensor& gate, const Tensor& up,
                                   int64_t act) {
  check_arg(gate, "glu_bwd", "gate", -1);
  check_same(up, "glu_bwd", "up", gate);
  check_same(dout, "glu_bwd", "dout", gate);
  Tensor dgate = at::empty_like(gate), dup = at::empty_like(up);
  fastlm::fused::glu_bwd_cpu(dt_of(gate, "glu_bwd", "gate"), act_of(act, "glu_bwd"),
                             dout.data_ptr(), gate.data_ptr(), up.data_ptr(), dgate.data_ptr(),
                             dup.data_ptr(), gate.numel());
  return {dgate, dup};
}

Tensor act_fwd(const Tensor& x, int64_t act) {
  check_arg(x, "act_fwd", "x", -1);
  Tensor y = at::empty_like(x);
  fastlm::fused::act_fwd_cpu(dt_of(x, "act_fwd", "x"), act_of(act, "act_fwd"), x.data_ptr(),
                             y.data_ptr(), x.numel());
  return y;
}

Tensor act_bwd(const Tensor& dy, const Tensor& x, int64_t act) {
  check_arg(x, "act_bwd", "x", -1);
  check_same(dy, "act_bwd", "dy", x);
  Tensor dx = at::empty_like(x);
  fastlm::fused::act_bwd_cpu(dt_of(x, "act_bwd", "x"), act_of(act, "act_bwd"), dy.data_ptr(),
                             x.data_ptr(), dx.data_ptr(), x.numel());
  return dx;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("glu_fwd(Tensor gate, Tensor up, int act) -> Tensor");
  m.def("glu_bwd(Tensor dout, Tensor gate, Tensor up, int act) -> (Tensor, Tensor)");
  m.def("act_fwd(Tensor x, int act) -> Tensor");
  m.def("act_bwd(Tensor dy, Tensor x, int act) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("glu_fwd", &glu_fwd);
  m.impl("glu_bwd", &glu_bwd);
  m.impl("act_fwd", &act_fwd);
  m.impl("act_bwd", &act_bwd);
}
