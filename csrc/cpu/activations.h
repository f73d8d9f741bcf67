// GELU and the gated units SwiGLU / GeGLU on the CPU over raw pointers (no torch here).
// All tensors are contiguous with n elements of type dt; math is fp32.
#pragma once

#include <cstdint>

#include "cpu/fused_simd.h"

namespace fastlm::fused {

enum class Act : int64_t {
  silu = 0,       // x * sigmoid(x)
  gelu = 1,       // x * Phi(x), the exact (erf) form
  gelu_tanh = 2,  // x/2 * (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
};

// out = act(gate) * up
void glu_fwd_cpu(Dt dt, Act act, const void* gate, const void* up, void* out, int64_t n);
// dgate = dout * up * act'(gate), dup = dout * act(gate)
void glu_bwd_cpu(Dt dt, Act act, const void* dout, const void* gate, const void* up, void* dgate,
                 void* dup, int64_t n);
// y = act(x); dx = dy * act'(x)
void act_fwd_cpu(Dt dt, Act act, const void* x, void* y, int64_t n);
void act_bwd_cpu(Dt dt, Act act, const void* dy, const void* x, void* dx, int64_t n);

}  // namespace fastlm::fused
