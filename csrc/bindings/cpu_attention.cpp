// torch binding of the CPU attention kernels: checks every argument, allocates outputs, and
// hands raw pointers and strides to csrc/cpu/attention_*.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "cpu/attention.h"

namespace {

using at::Tensor;
using fastlm::AttnParams;
using fastlm::AttnStrides;
using fastlm::DType;

DType dtype_of(const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, "fastlm_cpu attention: q has dtype ", t.scalar_type(),
                         "; use float32, bfloat16 or float16");
  }
}

void check_tensor(const Tensor& t, const char* name, int64_t dim, const Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm_cpu attention: ", name, " must be a CPU tensor, got ",
              t.device());
  TORCH_CHECK(t.dim() == dim, "fastlm_cpu attention: ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "fastlm_cpu attention: ", name,
              " has dtype ", t.scalar_type(), " but q has ", like.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "fastlm_cpu attention: ", name, " must be contiguous");
}

AttnStrides dense(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
AttnStrides packed(const Tensor& t) { return {0, t.stride(1), t.stride(0)}; }

AttnParams base_params(const Tensor& q, const Tensor& k, int64_t heads_q, int64_t heads_kv,
                       double scale, int64_t wl, int64_t wr, bool causal, double softcap) {
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, "fastlm_cpu attention: query heads (",
              heads_q, ") must be a multiple of key/value heads (", heads_kv, ")");
  TORCH_CHECK(wl >= -1 && wr >= -1, "fastlm_cpu attention: window sizes must be >= -1");
  AttnParams p{};
  p.heads_q = static_cast<int>(heads_q);
  p.heads_kv = static_cast<int>(heads_kv);
  p.head_dim = static_cast<int>(q.size(-1));
  p.scale = static_cast<float>(scale);
  p.softcap = static_cast<float>(softcap);
  p.window_left = static_cast<int>(wl);
  p.window_right = causal ? 0 : static_cast<int>(wr);
  return p;
}

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& mask, bool causal, double scale,
                               int64_t wl, int64_t wr, double softcap) {
  check_tensor(q, "q", 4, q);
  check_tensor(k, "k", 4, q);
  check_tensor(v, "v", 4, q);
  TORCH_CHECK(k.sizes() == v.sizes(), "fastlm_cpu attention: k and v shapes differ: ", k.sizes(),
              " vs ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3),
              "fastlm_cpu attention: q ", q.sizes(), " and k ", k.sizes(),
              " must agree in batch and head dim");
  AttnParams p = base_params(q, k, q.size(1), k.size(1), scale, wl, wr, causal, softcap);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  if (mask.has_value()) {
    const Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == q.size(0) &&
                    m.size(1) == k.size(2) && m.is_contiguous() && m.device().is_cpu(),
                "fastlm_cpu attention: key_padding_mask must be a contiguous CPU bool tensor of "
                "shape (batch, seqlen_k) = (", q.size(0), ", ", k.size(2), "), got ",
                m.scalar_type(), " ", m.sizes());
    p.key_padding_mask = m.data_ptr<bool>();
  }
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.q = dense(q), p.k = dense(k), p.v = dense(v), p.o = dense(out);
  p.lse = {lse.stride(0), lse.stride(1), lse.stride(2)};
  fastlm::attention_fwd_cpu(p, dtype_of(q), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                            out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

void check_saved(const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q,
                 int64_t lse_dim) {
  check_tensor(dout, "dout", q.dim(), q);
  check_tensor(out, "out", q.dim(), q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(),
              "fastlm_cpu attention: dout and out must have q's shape ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == lse_dim && lse.is_contiguous(),
              "fastlm_cpu attention: lse must be a contiguous float32 tensor from the forward");
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                       const std::optional<Tensor>& mask, bool causal,
                                       double scale, int64_t wl, int64_t wr, double softcap,
                                       bool /*deterministic: always*/) {
  check_saved(dout, out, lse, q, 3);
  AttnParams p = base_params(q, k, q.size(1), k.size(1), scale, wl, wr, causal, softcap);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  if (mask.has_value()) p.key_padding_mask = mask->data_ptr<bool>();
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  p.q = dense(q), p.k = dense(k), p.v = dense(v), p.o = dense(out);
  p.lse = {lse.stride(0), lse.stride(1), lse.stride(2)};
  fastlm::attention_bwd_cpu(p, dtype_of(q), dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                            v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(),
                            dk.data_ptr(), dv.data_ptr());
  return {dq, dk, dv};
}

AttnParams varlen_params(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& cu_q,
                         const Tensor& cu_k, double scale, int64_t wl, int64_t wr, bool causal,
                         double softcap) {
  check_tensor(q, "q", 3, q);
  check_tensor(k, "k", 3, q);
  check_tensor(v, "v", 3, q);
  for (const Tensor* cu : {&cu_q, &cu_k})
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() &&
                    cu->device().is_cpu(),
                "fastlm_cpu attention: cu_seqlens must be contiguous 1-D int32 CPU tensors");
  TORCH_CHECK(cu_q.numel() == cu_k.numel() && cu_q.numel() >= 2,
              "fastlm_cpu attention: cu_seqlens_q and cu_seqlens_k need the same N+1 >= 2 entries");
  AttnParams p = base_params(q, k, q.size(1), k.size(1), scale, wl, wr, causal, softcap);
  p.batch = static_cast<int>(cu_q.numel() - 1);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.q = packed(q), p.k = packed(k), p.v = packed(v), p.o = p.q;
  return p;
}

std::tuple<Tensor, Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& cu_q, const Tensor& cu_k, int64_t /*max_q*/,
                                      int64_t /*max_k*/, bool causal, double scale, int64_t wl,
                                      int64_t wr, double softcap) {
  AttnParams p = varlen_params(q, k, v, cu_q, cu_k, scale, wl, wr, causal, softcap);
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));  // (H, T)
  p.lse = {0, lse.stride(0), lse.stride(1)};
  fastlm::attention_fwd_cpu(p, dtype_of(q), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                            out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, int64_t /*max_q*/,
    int64_t /*max_k*/, bool causal, double scale, int64_t wl, int64_t wr, double softcap,
    bool /*deterministic: always*/) {
  check_saved(dout, out, lse, q, 2);
  AttnParams p = varlen_params(q, k, v, cu_q, cu_k, scale, wl, wr, causal, softcap);
  p.lse = {0, lse.stride(0), lse.stride(1)};
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  fastlm::attention_bwd_cpu(p, dtype_of(q), dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                            v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(), dq.data_ptr(),
                            dk.data_ptr(), dv.data_ptr());
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal, "
        "float scale, int window_left, int window_right, float softcap) -> (Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? key_padding_mask, bool causal, float scale, int window_left, int window_right, "
        "float softcap, bool deterministic) -> (Tensor, Tensor, Tensor)");
  m.def("attention_varlen_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, "
        "Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
        "int window_left, int window_right, float softcap) -> (Tensor, Tensor)");
  m.def("attention_varlen_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, "
        "int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
        "float softcap, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) {
  m.impl("attention_fwd", &fwd);
  m.impl("attention_bwd", &bwd);
  m.impl("attention_varlen_fwd", &varlen_fwd);
  m.impl("attention_varlen_bwd", &varlen_bwd);
}
