// torch binding of the CPU attention kernels: checks every argument (attention_args.h),
// allocates outputs, and hands raw pointers and strides to csrc/cpu/attention_*.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "bindings/attention_args.h"
#include "cpu/attention.h"

namespace {

using at::Tensor;
using fastlm::AttnParams;
namespace fb = fastlm::binding;

const fb::Ctx kCpu{"fastlm_cpu", at::kCPU, /*any_strides=*/true};

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& mask, bool causal, double scale,
                               int64_t wl, int64_t wr, double softcap) {
  AttnParams p = fb::dense_params(kCpu, q, k, v, mask, causal, scale, wl, wr, softcap);
  // dense in q's dimension order: HF's transpose back to (B, S, H, D) is then a view
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.lse = fb::dense_lse(lse);
  p.o = fb::dense(out);
  fastlm::attention_fwd_cpu(p, fb::dtype_of(kCpu, q), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                            out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                       const std::optional<Tensor>& mask, bool causal,
                                       double scale, int64_t wl, int64_t wr, double softcap,
                                       bool /*deterministic: always*/) {
  AttnParams p = fb::dense_params(kCpu, q, k, v, mask, causal, scale, wl, wr, softcap);
  fb::check_saved(kCpu, dout, out, lse, q, 3);
  p.lse = fb::dense_lse(lse);
  p.o = fb::dense(out);  // out, dout and dq share one layout
  Tensor dq = fb::empty_as(out), dk = at::empty_like(k), dv = at::empty_like(v);
  p.dk = fb::dense(dk), p.dv = fb::dense(dv);
  fastlm::attention_bwd_cpu(p, fb::dtype_of(kCpu, q), dout.data_ptr(), q.data_ptr(),
                            k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                            dq.data_ptr(), dk.data_ptr(), dv.data_ptr());
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& cu_q, const Tensor& cu_k, int64_t /*max_q*/,
                                      int64_t /*max_k*/, bool causal, double scale, int64_t wl,
                                      int64_t wr, double softcap) {
  AttnParams p = fb::varlen_params(kCpu, q, k, v, cu_q, cu_k, scale, wl, wr, causal, softcap);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));  // (H, T)
  p.lse = fb::varlen_lse(lse);
  fastlm::attention_fwd_cpu(p, fb::dtype_of(kCpu, q), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                            out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, int64_t /*max_q*/,
    int64_t /*max_k*/, bool causal, double scale, int64_t wl, int64_t wr, double softcap,
    bool /*deterministic: always*/) {
  AttnParams p = fb::varlen_params(kCpu, q, k, v, cu_q, cu_k, scale, wl, wr, causal, softcap);
  fb::check_saved(kCpu, dout, out, lse, q, 2);
  p.lse = fb::varlen_lse(lse);
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  fastlm::attention_bwd_cpu(p, fb::dtype_of(kCpu, q), dout.data_ptr(), q.data_ptr(),
                            k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                            dq.data_ptr(), dk.data_ptr(), dv.data_ptr());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) { fastlm::binding::define_attention_ops(m); }

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("attention_fwd", &fwd);
  m.impl("attention_bwd", &bwd);
  m.impl("attention_varlen_fwd", &varlen_fwd);
  m.impl("attention_varlen_bwd", &varlen_bwd);
}
