// torch binding of the CUDA attention kernels (csrc/cuda/attention_*.cu): the same schemas
// and checks as the CPU binding (attention_args.h), plus what tensor cores need: fp16/bf16,
// head dim 64 or 128.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <tuple>

#include "bindings/attention_args.h"
#include "bindings/cuda_platform.h"
#include "cuda/attention.h"

namespace {

using at::Tensor;
using fastlm::AttnParams;
namespace fb = fastlm::binding;

const fb::Ctx kCuda{"fastlm_cuda", fb::kCudaDevice};

fastlm::DType kernel_dtype(const Tensor& q) {
  const fastlm::DType dt = fb::dtype_of(kCuda, q);
  TORCH_CHECK(dt != fastlm::DType::f32, "fastlm_cuda attention: q is float32; the tensor-core "
              "kernels take float16 or bfloat16 (use backend='triton' for float32)");
  TORCH_CHECK(q.size(-1) == 64 || q.size(-1) == 128, "fastlm_cuda attention: head dim ",
              q.size(-1), " is not compiled (64 and 128 are); use backend='triton'");
  return dt;
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fastlm_cuda attention: ", what, " failed: ",
              cudaGetErrorString(err));
}

// max_seqlen_* only sizes the grid: taken from the caller (reading cu_seqlens would cost a
// device sync), as FlashAttention does. Too small a value would skip rows, so it is checked
// by the Python wrapper, which computes it on the host when not given.
int max_len(int64_t given) {
  TORCH_CHECK(given >= 0, "fastlm_cuda attention: max_seqlen must be >= 0, got ", given);
  return static_cast<int>(given);
}

std::tuple<Tensor, Tensor> fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                               const std::optional<Tensor>& mask, bool causal, double scale,
                               int64_t wl, int64_t wr, double softcap) {
  AttnParams p = fb::dense_params(kCuda, q, k, v, mask, causal, scale, wl, wr, softcap);
  const fastlm::DType dt = kernel_dtype(q);
  const fb::CudaGuard guard(q.device());
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  p.lse = fb::dense_lse(lse);
  check_launch(fastlm::cuda::attention_fwd_cuda(
                   p, dt, p.seqlen_q, q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(),
                   lse.data_ptr<float>(), fb::current_stream()),
               "forward");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> run_bwd(AttnParams p, fastlm::DType dt, int max_q, int max_k,
                                           const Tensor& dout, const Tensor& q, const Tensor& k,
                                           const Tensor& v, const Tensor& out,
                                           const Tensor& lse) {
  const fb::CudaGuard guard(q.device());
  Tensor dq = at::empty_like(q), dk = at::empty_like(k), dv = at::empty_like(v);
  Tensor delta = at::empty_like(lse);
  check_launch(fastlm::cuda::attention_bwd_cuda(
                   p, dt, max_q, max_k, dout.data_ptr(), q.data_ptr(), k.data_ptr(),
                   v.data_ptr(), out.data_ptr(), lse.data_ptr<float>(),
                   delta.data_ptr<float>(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                   p.k, p.v, fb::current_stream()),
               "backward");
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor& dout, const Tensor& q, const Tensor& k,
                                       const Tensor& v, const Tensor& out, const Tensor& lse,
                                       const std::optional<Tensor>& mask, bool causal,
                                       double scale, int64_t wl, int64_t wr, double softcap,
                                       bool /*deterministic: always*/) {
  AttnParams p = fb::dense_params(kCuda, q, k, v, mask, causal, scale, wl, wr, softcap);
  fb::check_saved(kCuda, dout, out, lse, q, 3);
  p.lse = fb::dense_lse(lse);
  return run_bwd(p, kernel_dtype(q), p.seqlen_q, p.seqlen_k, dout, q, k, v, out, lse);
}

std::tuple<Tensor, Tensor> varlen_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                      const Tensor& cu_q, const Tensor& cu_k, int64_t max_q,
                                      int64_t max_k, bool causal, double scale, int64_t wl,
                                      int64_t wr, double softcap) {
  AttnParams p = fb::varlen_params(kCuda, q, k, v, cu_q, cu_k, scale, wl, wr, causal, softcap);
  const fastlm::DType dt = kernel_dtype(q);
  (void)max_k;
  const fb::CudaGuard guard(q.device());
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({q.size(1), q.size(0)}, q.options().dtype(at::kFloat));  // (H, T)
  p.lse = fb::varlen_lse(lse);
  check_launch(fastlm::cuda::attention_fwd_cuda(
                   p, dt, max_len(max_q), q.data_ptr(), k.data_ptr(), v.data_ptr(),
                   out.data_ptr(), lse.data_ptr<float>(), fb::current_stream()),
               "varlen forward");
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> varlen_bwd(
    const Tensor& dout, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
    const Tensor& lse, const Tensor& cu_q, const Tensor& cu_k, int64_t max_q, int64_t max_k,
    bool causal, double scale, int64_t wl, int64_t wr, double softcap,
    bool /*deterministic: always*/) {
  AttnParams p = fb::varlen_params(kCuda, q, k, v, cu_q, cu_k, scale, wl, wr, causal, softcap);
  fb::check_saved(kCuda, dout, out, lse, q, 2);
  p.lse = fb::varlen_lse(lse);
  return run_bwd(p, kernel_dtype(q), max_len(max_q), max_len(max_k), dout, q, k, v,
                 out, lse);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(FASTLM_CUDA_LIBRARY, m) { fastlm::binding::define_attention_ops(m); }

TORCH_LIBRARY_IMPL(FASTLM_CUDA_LIBRARY, FASTLM_CUDA_DISPATCH_KEY, m) {
  m.impl("attention_fwd", &fwd);
  m.impl("attention_bwd", &bwd);
  m.impl("attention_varlen_fwd", &varlen_fwd);
  m.impl("attention_varlen_bwd", &varlen_bwd);
}
