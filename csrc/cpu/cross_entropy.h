// The row kernel of the chunked linear + cross-entropy on the CPU (no torch here): for a chunk
// of logit rows it computes each row's loss and, in the same pass, overwrites the logits with
// d(loss)/d(logits) so the caller's two matmuls turn them into the hidden/weight gradients.
#pragma once

#include <cstdint>

#include "cpu/fused_simd.h"

namespace fastlm::fused {

struct CeParams {
  int64_t rows, vocab;
  int64_t ignore_index;  // rows with this label: loss 0, gradient 0
  float smoothing;       // label smoothing epsilon (target = (1 - eps) onehot + eps / vocab)
  float softcap;         // > 0: logits become softcap * tanh(logits / softcap) first
  bool grad;             // overwrite logits with row_scale[r] * dloss_r / dlogits_r
};

// logits: (rows, vocab) contiguous raw logits (bias included) of type dt; labels: (rows,) in
// [0, vocab) or ignore_index (checked by the caller); row_scale: (rows,) fp32, read when grad;
// loss: (rows,) fp32 written.
void ce_rows_cpu(Dt dt, const CeParams& p, void* logits, const int64_t* labels,
                 const float* row_scale, float* loss);

}  // namespace fastlm::fused
