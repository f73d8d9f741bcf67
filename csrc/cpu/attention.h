// Flash-style attention on the CPU: forward and backward over raw pointers (no torch here).
//
// The parameter struct (common/attention_params.h) is shared with the CUDA kernels.
#pragma once

#include <cstdint>

#include "common/attention_params.h"

namespace fastlm {

// out and lse are written; rows that see no key get out = 0 and lse = +inf.
void attention_fwd_cpu(const AttnParams& p, DType dtype, const void* q, const void* k,
                       const void* v, void* out, float* lse);

// dk/dv are summed over the query heads sharing a kv head (GQA). Deterministic: each thread
// owns whole (sequence, kv head) units, so no two threads ever add into the same element.
void attention_bwd_cpu(const AttnParams& p, DType dtype, const void* dout, const void* q,
                       const void* k, const void* v, const void* out, const float* lse,
                       void* dq, void* dk, void* dv);

}  // namespace fastlm
