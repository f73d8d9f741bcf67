// Flash attention on NVIDIA tensor cores (sm_80+): forward and backward over raw pointers and
// a stream (no torch here), fp16 and bf16 inputs with fp32 accumulation, head dims 64 and 128.
// Semantics are the CPU kernels' (common/attention_params.h): GQA, bottom-right causal,
// sliding window, soft-capping, key padding mask, dense and varlen layouts; rows that see no
// key get out = 0 and lse = +inf.
#pragma once

#include <cuda_runtime.h>

#include "common/attention_params.h"

namespace fastlm {
namespace cuda {

// max_seqlen_q: the longest query sequence (dense: seqlen_q), sizes the grid.
cudaError_t attention_fwd_cuda(const AttnParams& p, DType dtype, int max_seqlen_q,
                               const void* q, const void* k, const void* v, void* out,
                               float* lse, cudaStream_t stream);

// Deterministic: dK/dV are owned by one block per (sequence, kv head, key block), which loops
// over the query heads of its group; dQ is recomputed per (sequence, query head, query block).
// delta_ws: fp32 workspace laid out like lse (rowsum(dout * out)).
cudaError_t attention_bwd_cuda(const AttnParams& p, DType dtype, int max_seqlen_q,
                               int max_seqlen_k, const void* dout, const void* q, const void* k,
                               const void* v, const void* out, const float* lse,
                               float* delta_ws, void* dq, void* dk, void* dv,
                               AttnStrides dk_strides, AttnStrides dv_strides,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace fastlm
