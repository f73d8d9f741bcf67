// torch binding of the CPU rotary kernel (csrc/cpu/rotary.cpp). x may be any strided
// (B, H, S, D) view with contiguous features (e.g. HF's (B, S, H, D).transpose(1, 2)): the
// kernel follows its strides instead of copying it.
#include <torch/library.h>

#include "bindings/fused_common.h"
#include "cpu/rotary.h"

namespace {

using at::Tensor;

void check_table(const Tensor& t, const char* name, const Tensor& x) {
  fastlm::fused::check_arg(t, "rotary", name, 3);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "fastlm_cpu rotary: ", name,
              " must be float32 (the op upcasts it), got ", t.scalar_type());
  TORCH_CHECK((t.size(0) == 1 || t.size(0) == x.size(0)) && t.size(1) == x.size(2),
              "fastlm_cpu rotary: ", name, " must have shape (1 or batch, seqlen, rot_dim) = (",
              x.size(0), ", ", x.size(2), ", rot_dim), got ", t.sizes());
  TORCH_CHECK(t.size(2) % 2 == 0 && t.size(2) <= x.size(3), "fastlm_cpu rotary: ", name,
              " last dim (rot_dim = ", t.size(2), ") must be even and <= head_dim ", x.size(3));
}

Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin, bool inverse,
              bool interleaved) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "fastlm_cpu rotary: x must be a 4-D CPU "
              "tensor (batch, heads, seqlen, head_dim), got ", x.device(), " ", x.sizes());
  TORCH_CHECK(x.stride(3) == 1, "fastlm_cpu rotary: x's last dim must be contiguous");
  check_table(cos, "cos", x);
  check_table(sin, "sin", x);
  TORCH_CHECK(cos.sizes() == sin.sizes(), "fastlm_cpu rotary: cos and sin shapes differ: ",
              cos.sizes(), " vs ", sin.sizes());
  Tensor out = at::empty_like(x);
  fastlm::fused::RotaryParams p{};
  p.batch = x.size(0), p.heads = x.size(1), p.seqlen = x.size(2), p.head_dim = x.size(3);
  p.rot_dim = cos.size(2);
  p.xb = x.stride(0), p.xh = x.stride(1), p.xs = x.stride(2);
  p.ob = out.stride(0), p.oh = out.stride(1), p.os = out.stride(2);
  p.cos_b = cos.size(0) == 1 ? 0 : cos.stride(0);
  p.inverse = inverse;
  p.interleaved = interleaved;
  if (x.numel() == 0) return out;
  fastlm::fused::rotary_cpu(fastlm::fused::dt_of(x, "rotary", "x"), p, x.data_ptr(),
                            cos.data_ptr<float>(), sin.data_ptr<float>(), out.data_ptr());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool inverse, bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) { m.impl("rotary", &rotary); }
