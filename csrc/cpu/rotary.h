// Rotary position embedding on the CPU over raw pointers (no torch here).
//
// HF convention: with x = [x1, x2] split in halves of rot_dim / 2,
//   out = [x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2]   (= x * cos + rotate_half(x) * sin)
// Features [rot_dim, head_dim) pass through unchanged (partial rotary: GPT-NeoX, Phi).
// interleaved = true rotates adjacent pairs (x[2i], x[2i+1]) with cos/sin[2i], [2i+1] instead
// (Cohere, GLM: out[2i] = x[2i] c[2i] - x[2i+1] s[2i], out[2i+1] = x[2i+1] c[2i+1] + x[2i] s[2i+1]).
// inverse = true applies the transpose (rotation by -angle): the backward of the forward.
#pragma once

#include <cstdint>

#include "cpu/fused_simd.h"

namespace fastlm::fused {

struct RotaryParams {
  int64_t batch, heads, seqlen, head_dim, rot_dim;
  int64_t xb, xh, xs;  // element strides of x over batch, head, position; features contiguous
  int64_t ob, oh, os;  // the same for out
  int64_t cos_b;       // cos/sin (fp32, (batch or 1, seqlen, rot_dim)) batch stride, 0 = shared
  bool inverse;
  bool interleaved;
};

void rotary_cpu(Dt dt, const RotaryParams& p, const void* x, const float* cos, const float* sin,
                void* out);

}  // namespace fastlm::fused
