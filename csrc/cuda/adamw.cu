// Multi-tensor AdamW: each launch carries a table of up to kMaxTensors tensors and a map from
// block to (tensor, chunk) in its kernel parameters, so many small tensors cost one launch
// instead of one each. Every thread handles kPerThread consecutive elements of its chunk.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/adamw.h"

namespace fastlm {
namespace cuda {
namespace {

constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;
constexpr int kThreads = 256;
constexpr int kChunk = 16384;  // elements per block: 64 per thread, enough to hide latency

// Kernel parameters are limited to 4 KiB: 24 tensors x 48 B + 320 x (2 + 4) B = 3 KiB. The
// chunk index is 32-bit: 16-bit capped a tensor at 1G elements (65536 chunks), and ZeRO's flat
// partition on one GPU is the whole model.
struct Launch {
  AdamWTensor t[kMaxTensors];
  uint16_t block_tensor[kMaxBlocks];
  uint32_t block_chunk[kMaxBlocks];
};
static_assert(sizeof(Launch) <= 4096, "kernel parameters are limited to 4 KiB");

__device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void store(float* p, int64_t i, float x) { p[i] = x; }
__device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float x) { p[i] = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(__half* p, int64_t i, float x) { p[i] = __float2half_rn(x); }

template <typename P, typename S>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Launch l, AdamWHyper h,
                                                         const float* inv_scale_ptr,
                                                         const float* found_inf) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // overflowed step: skip
  const float inv_scale = inv_scale_ptr != nullptr ? *inv_scale_ptr : h.inv_grad_scale;
  const AdamWTensor& t = l.t[l.block_tensor[blockIdx.x]];
  const int64_t begin = static_cast<int64_t>(l.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(begin + kChunk, t.numel);
  P* p = static_cast<P*>(t.param);
  const P* g = static_cast<const P*>(t.grad);
  S* m = static_cast<S*>(t.exp_avg);
  S* v = static_cast<S*>(t.exp_avg_sq);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    // The operation order of torch.optim.AdamW (see csrc/cpu/adamw.cpp).
    const float gi = load(g, i) * inv_scale;
    float pi = t.master != nullptr ? t.master[i] : load(p, i);
    pi = __fmul_rn(pi, h.decay);
    const float m0 = load(m, i);
    const float mi = __fmaf_rn(h.lerp_a, __fsub_rn(gi, m0), h.lerp_low ? m0 : gi);
    const float vi = __fmaf_rn(__fmul_rn(h.one_minus_beta2, gi), gi, __fmul_rn(load(v, i), h.beta2));
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), h.bias_correction2_sqrt), h.eps);
    pi = __fadd_rn(pi, __fdiv_rn(__fmul_rn(-h.step_size, mi), denom));
    store(m, i, mi);
    store(v, i, vi);
    if (t.master != nullptr) t.master[i] = pi;
    store(p, i, pi);
  }
}

template <typename P, typename S>
cudaError_t run(const AdamWTensor* tensors, int n, const AdamWHyper& h, const float* inv_scale,
                const float* found_inf, cudaStream_t stream) {
  Launch l{};
  int nt = 0, nb = 0;
  auto flush = [&]() -> cudaError_t {
    if (nb > 0) adamw_kernel<P, S><<<nb, kThreads, 0, stream>>>(l, h, inv_scale, found_inf);
    nt = nb = 0;
    return cudaGetLastError();
  };
  for (int i = 0; i < n; ++i) {
    if (tensors[i].numel == 0) continue;
    const int64_t chunks = (tensors[i].numel + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || nt == 0) {  // its first chunk, or the rest of it after a flush
        if (nt == kMaxTensors) {
          cudaError_t e = flush();
          if (e != cudaSuccess) return e;
        }
        l.t[nt++] = tensors[i];
      }
      if (c > 0xffffffffLL) return cudaErrorInvalidValue;  // > 70T elements in one tensor
      l.block_tensor[nb] = static_cast<uint16_t>(nt - 1);
      l.block_chunk[nb] = static_cast<uint32_t>(c);
      if (++nb == kMaxBlocks) {
        cudaError_t e = flush();
        if (e != cudaSuccess) return e;
      }
    }
  }
  return flush();
}

template <typename P>
cudaError_t by_state(const AdamWTensor* t, int n, AdamDType state, const AdamWHyper& h,
                     const float* inv_scale, const float* found_inf, cudaStream_t s) {
  if (state == AdamDType::bf16) return run<P, __nv_bfloat16>(t, n, h, inv_scale, found_inf, s);
  return run<P, float>(t, n, h, inv_scale, found_inf, s);
}

}  // namespace

cudaError_t adamw_step_cuda(const AdamWTensor* tensors, int n_tensors, AdamDType param_dtype,
                            AdamDType state_dtype, const AdamWHyper& h,
                            const float* inv_grad_scale, const float* found_inf,
                            cudaStream_t stream) {
  switch (param_dtype) {
    case AdamDType::f32:
      return by_state<float>(tensors, n_tensors, state_dtype, h, inv_grad_scale, found_inf, stream);
    case AdamDType::bf16:
      return by_state<__nv_bfloat16>(tensors, n_tensors, state_dtype, h, inv_grad_scale, found_inf, stream);
    case AdamDType::f16:
      return by_state<__half>(tensors, n_tensors, state_dtype, h, inv_grad_scale, found_inf, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fastlm
