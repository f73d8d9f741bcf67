// Argument checks and AttnParams construction shared by the CPU and CUDA attention bindings:
// both kernels take the same parameter struct, so they accept exactly the same tensors.
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>

#include "common/attention_params.h"

namespace fastlm {
namespace binding {

using at::Tensor;

struct Ctx {
  const char* ext;          // "fastlm_cpu" / "fastlm_cuda": error prefix
  at::DeviceType device;    // where every tensor must live
  // q/k/v with any strides but a contiguous head dim (HF's transposed (B, S, H, D)
  // projections, slices of a fused QKV projection) are read in place, and the outputs are
  // allocated dense in q's (k's, v's) dimension order (torch.empty_like), which is what the
  // fake implementations promise. The CPU kernels address every row through its strides;
  // the CUDA ones are only ever run on contiguous tensors (Python makes them so).
  bool any_strides = false;
};

inline DType dtype_of(const Ctx& c, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::f32;
    case at::kBFloat16: return DType::bf16;
    case at::kHalf: return DType::f16;
    default: TORCH_CHECK(false, c.ext, " attention: q has dtype ", t.scalar_type(),
                         "; use float32, bfloat16 or float16");
  }
}

inline void check_tensor(const Ctx& c, const Tensor& t, const char* name, int64_t dim,
                         const Tensor& like) {
  TORCH_CHECK(t.device().type() == c.device, c.ext, " attention: ", name, " must be on ",
              c.device, ", got ", t.device());
  TORCH_CHECK(t.dim() == dim, c.ext, " attention: ", name, " must be ", dim, "-D, got shape ",
              t.sizes());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), c.ext, " attention: ", name,
              " has dtype ", t.scalar_type(), " but q has ", like.scalar_type());
  if (c.any_strides && t.dim() == 4) {
    TORCH_CHECK((t.size(3) == 1 || t.stride(3) == 1) && t.stride(0) >= 0 && t.stride(1) >= 0 &&
                    t.stride(2) >= 0, c.ext, " attention: ", name, " must have a contiguous "
                "last dim and non-negative strides, got strides ", t.strides(),
                "; pass .contiguous()");
  } else {
    TORCH_CHECK(t.is_contiguous(), c.ext, " attention: ", name, " must be contiguous");
  }
}

// An output with exactly `like`'s strides (like: a dense tensor the kernels already address).
inline Tensor empty_as(const Tensor& like) {
  return at::empty_strided(like.sizes(), like.strides(), like.options());
}

inline AttnStrides dense(const Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }
inline AttnStrides packed(const Tensor& t) { return {0, t.stride(1), t.stride(0)}; }

inline AttnParams base_params(const Ctx& c, const Tensor& q, int64_t heads_q, int64_t heads_kv,
                              double scale, int64_t wl, int64_t wr, bool causal,
                              double softcap) {
  TORCH_CHECK(heads_kv > 0 && heads_q % heads_kv == 0, c.ext, " attention: query heads (",
              heads_q, ") must be a multiple of key/value heads (", heads_kv, ")");
  TORCH_CHECK(wl >= -1 && wr >= -1, c.ext, " attention: window sizes must be >= -1");
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

// Dense (B, H, S, D) q/k/v (+ optional (B, Sk) bool key padding mask).
inline AttnParams dense_params(const Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& mask, bool causal, double scale,
                               int64_t wl, int64_t wr, double softcap) {
  check_tensor(c, q, "q", 4, q);
  check_tensor(c, k, "k", 4, q);
  check_tensor(c, v, "v", 4, q);
  TORCH_CHECK(k.sizes() == v.sizes(), c.ext, " attention: k and v shapes differ: ", k.sizes(),
              " vs ", v.sizes());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), c.ext, " attention: q ",
              q.sizes(), " and k ", k.sizes(), " must agree in batch and head dim");
  AttnParams p = base_params(c, q, q.size(1), k.size(1), scale, wl, wr, causal, softcap);
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(2));
  p.seqlen_k = static_cast<int>(k.size(2));
  if (mask.has_value()) {
    const Tensor& m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 2 && m.size(0) == q.size(0) &&
                    m.size(1) == k.size(2) && m.is_contiguous() &&
                    m.device().type() == c.device,
                c.ext, " attention: key_padding_mask must be a contiguous bool tensor on ",
                c.device, " of shape (batch, seqlen_k) = (", q.size(0), ", ", k.size(2),
                "), got ", m.scalar_type(), " ", m.sizes(), " on ", m.device());
    p.key_padding_mask = m.data_ptr<bool>();
  }
  // o (out, dout, dq), dk and dv default to q's, k's and v's layouts; bindings that allocate
  // them in other layouts set them from the tensors they allocate
  p.q = dense(q), p.k = dense(k), p.v = dense(v), p.o = dense(q), p.dk = p.k, p.dv = p.v;
  return p;
}

// Packed varlen (T, H, D) q/k/v with int32 cu_seqlens (N + 1) on the same device.
inline AttnParams varlen_params(const Ctx& c, const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& cu_q, const Tensor& cu_k, double scale,
                                int64_t wl, int64_t wr, bool causal, double softcap) {
  check_tensor(c, q, "q", 3, q);
  check_tensor(c, k, "k", 3, q);
  check_tensor(c, v, "v", 3, q);
  for (const Tensor* cu : {&cu_q, &cu_k})
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->is_contiguous() &&
                    cu->device().type() == c.device,
                c.ext, " attention: cu_seqlens must be contiguous 1-D int32 tensors on ",
                c.device);
  TORCH_CHECK(cu_q.numel() == cu_k.numel() && cu_q.numel() >= 2, c.ext,
              " attention: cu_seqlens_q and cu_seqlens_k need the same N+1 >= 2 entries");
  AttnParams p = base_params(c, q, q.size(1), k.size(1), scale, wl, wr, causal, softcap);
  p.batch = static_cast<int>(cu_q.numel() - 1);
  p.cu_seqlens_q = cu_q.data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.data_ptr<int32_t>();
  p.q = packed(q), p.k = packed(k), p.v = packed(v), p.o = p.q, p.dk = p.k, p.dv = p.v;
  return p;
}

inline void check_saved(const Ctx& c, const Tensor& dout, const Tensor& out, const Tensor& lse,
                        const Tensor& q, int64_t lse_dim) {
  check_tensor(c, dout, "dout", q.dim(), q);
  check_tensor(c, out, "out", q.dim(), q);
  TORCH_CHECK(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), c.ext,
              " attention: dout and out must have q's shape ", q.sizes());
  // (a size-1 dim's stride is never used: Python passes such a dout as it is)
  bool same = true;
  for (int64_t d = 0; d < dout.dim(); ++d) same = same && (dout.size(d) == 1 || dout.stride(d) == out.stride(d));
  TORCH_CHECK(same, c.ext, " attention: dout must have out's strides ", out.strides(), ", got ",
              dout.strides());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == lse_dim && lse.is_contiguous() &&
                  lse.device().type() == c.device,
              c.ext, " attention: lse must be a contiguous float32 tensor from the forward");
}

// lse layouts: dense (B, H, Sq); varlen (H, T).
inline AttnStrides dense_lse(const Tensor& lse) {
  return {lse.stride(0), lse.stride(1), lse.stride(2)};
}
inline AttnStrides varlen_lse(const Tensor& lse) { return {0, lse.stride(0), lse.stride(1)}; }

// The op schemas, defined alike in fastlm_cpu and fastlm_cuda: one Python call signature.
inline void define_attention_ops(torch::Library& m) {
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

}  // namespace binding
}  // namespace fastlm
