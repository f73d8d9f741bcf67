// torch binding of the CPU cross-entropy row kernel (csrc/cpu/cross_entropy.cpp), one chunk of
// the chunked linear + cross-entropy (fastlm/ops/cross_entropy.py does the matmuls). The
// logits are overwritten in place with the gradient when `grad` is set.
#include <torch/library.h>

#include "bindings/fused_common.h"
#include "cpu/cross_entropy.h"

namespace {

using at::Tensor;
using fastlm::fused::check_arg;

Tensor ce_rows(Tensor& logits, const Tensor& labels, const Tensor& row_scale,
               int64_t ignore_index, double smoothing, double softcap, bool grad) {
  check_arg(logits, "ce_rows", "logits", 2);
  check_arg(labels, "ce_rows", "labels", 1);
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.size(0) == rows,
              "fastlm_cpu ce_rows: labels must be int64 of shape (", rows, ",), got ",
              labels.scalar_type(), " ", labels.sizes());
  if (grad) {
    check_arg(row_scale, "ce_rows", "row_scale", 1);
    TORCH_CHECK(row_scale.scalar_type() == at::kFloat && row_scale.size(0) == rows,
                "fastlm_cpu ce_rows: row_scale must be float32 of shape (", rows, ",)");
  }
  TORCH_CHECK(vocab > 0, "fastlm_cpu ce_rows: the vocabulary (logits.size(1)) is empty");
  const int64_t* lab = labels.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(lab[r] == ignore_index || (lab[r] >= 0 && lab[r] < vocab),
                "fastlm_cpu ce_rows: labels[", r, "] = ", lab[r], " is outside [0, ", vocab,
                ") and is not ignore_index (", ignore_index, ")");
  }
  Tensor loss = at::empty({rows}, logits.options().dtype(at::kFloat));
  fastlm::fused::CeParams p{rows, vocab, ignore_index, static_cast<float>(smoothing),
                            static_cast<float>(softcap), grad};
  fastlm::fused::ce_rows_cpu(fastlm::fused::dt_of(logits, "ce_rows", "logits"), p,
                             logits.data_ptr(), lab, grad ? row_scale.data_ptr<float>() : nullptr,
                             loss.data_ptr<float>());
  return loss;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("ce_rows(Tensor(a!) logits, Tensor labels, Tensor row_scale, int ignore_index, "
        "float label_smoothing, float softcap, bool grad) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) { m.impl("ce_rows", &ce_rows); }
