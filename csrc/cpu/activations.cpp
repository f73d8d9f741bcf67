// Activations and gated units in one pass: SwiGLU reads gate and up once and writes once
// (3 x n elements of traffic) where silu(gate) * up in PyTorch makes a temporary and a second
// pass (5 x n); its backward likewise produces both gradients from one read of dout/gate/up.
#include "cpu/activations.h"

#include <omp.h>

namespace fastlm::fused {
namespace {

using simd::vf;
using simd::W;

// act(x) and act'(x), both from one evaluation of the transcendental part. Lowp: the results
// are stored in 16 bits, so the sigmoid's exponential needs only ~3e-6 relative accuracy
// (simd::exp_neg_16bit; bf16 GELU-tanh forward 1.2x faster here).
template <Act A, bool Lowp = false>
inline void act_and_grad(vf x, vf& f, vf& df) {
  if constexpr (A == Act::silu) {
    vf s, oms;
    simd::sigmoid2<Lowp>(x, s, oms);
    f = x * s;
    df = s * (x * oms + 1.0f);
  } else if constexpr (A == Act::gelu) {
    // Phi(x) = erfc(-x / sqrt 2) / 2, phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    const vf cdf = simd::erfc_any(x * -0.70710678118654752f) * 0.5f;
    f = x * cdf;
    df = cdf + x * simd::exp_any(x * x * -0.5f) * 0.39894228040143268f;
  } else {
    // 1/2 (1 + tanh(u)) = sigmoid(2u): no tanh, and no cancellation for negative x.
    const float k0 = 0.79788456080286536f, k1 = 0.044715f;  // sqrt(2/pi)
    const vf x2 = x * x;
    vf s, oms;
    simd::sigmoid2<Lowp>((x + x * x2 * k1) * (2.0f * k0), s, oms);
    f = x * s;
    df = s + x * s * oms * (x2 * (3.0f * k1) + 1.0f) * (2.0f * k0);
  }
}

// Runs body(offset, lanes) over [0, n) in W-lane steps, blocks of 4096 elements per task.
template <typename Body>
void for_lanes(int64_t n, const Body& body) {
  constexpr int64_t kBlock = 4096;
  const int64_t blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n >= kParallelMin)
  for (int64_t blk = 0; blk < blocks; ++blk) {
    // A private copy of the closure: the kernels' 16-bit stores may alias anything, so with the
    // shared one GCC reloads every captured pointer after each store.
    Body local = body;
    const int64_t end = std::min(n, (blk + 1) * kBlock);
    for (int64_t i = blk * kBlock; i < end; i += W) local(i, static_cast<int>(std::min<int64_t>(end - i, W)));
  }
}

template <Act A, typename T>
void glu_fwd(const T* gate, const T* up, T* out, int64_t n) {
  for_lanes(n, [=](int64_t i, int m) {
    vf f, df;
    act_and_grad<A, sizeof(T) == 2>(simd::load_n(gate + i, m), f, df);
    simd::store_n(out + i, f * simd::load_n(up + i, m), m);
  });
}

template <Act A, typename T>
void glu_bwd(const T* dout, const T* gate, const T* up, T* dgate, T* dup, int64_t n) {
  for_lanes(n, [=](int64_t i, int m) {
    vf f, df;
    act_and_grad<A, sizeof(T) == 2>(simd::load_n(gate + i, m), f, df);
    const vf d = simd::load_n(dout + i, m);
    simd::store_n(dgate + i, d * simd::load_n(up + i, m) * df, m);
    simd::store_n(dup + i, d * f, m);
  });
}

template <Act A, typename T>
void act_fwd(const T* x, T* y, int64_t n) {
  for_lanes(n, [=](int64_t i, int m) {
    vf f, df;
    act_and_grad<A, sizeof(T) == 2>(simd::load_n(x + i, m), f, df);
    simd::store_n(y + i, f, m);
  });
}

template <Act A, typename T>
void act_bwd(const T* dy, const T* x, T* dx, int64_t n) {
  for_lanes(n, [=](int64_t i, int m) {
    vf f, df;
    act_and_grad<A, sizeof(T) == 2>(simd::load_n(x + i, m), f, df);
    simd::store_n(dx + i, simd::load_n(dy + i, m) * df, m);
  });
}

// Calls fn(std::integral_constant<Act, A>{}) for the runtime act, so kernels specialise on it.
template <typename Fn>
void with_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::silu: fn(std::integral_constant<Act, Act::silu>{}); break;
    case Act::gelu: fn(std::integral_constant<Act, Act::gelu>{}); break;
    case Act::gelu_tanh: fn(std::integral_constant<Act, Act::gelu_tanh>{}); break;
  }
}

}  // namespace

void glu_fwd_cpu(Dt dt, Act act, const void* gate, const void* up, void* out, int64_t n) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    with_act(act, [&](auto a) {
      glu_fwd<decltype(a)::value>(static_cast<const T*>(gate), static_cast<const T*>(up),
                                  static_cast<T*>(out), n);
    });
  });
}

void glu_bwd_cpu(Dt dt, Act act, const void* dout, const void* gate, const void* up, void* dgate,
                 void* dup, int64_t n) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    with_act(act, [&](auto a) {
      glu_bwd<decltype(a)::value>(static_cast<const T*>(dout), static_cast<const T*>(gate),
                                  static_cast<const T*>(up), static_cast<T*>(dgate),
                                  static_cast<T*>(dup), n);
    });
  });
}

void act_fwd_cpu(Dt dt, Act act, const void* x, void* y, int64_t n) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    with_act(act, [&](auto a) {
      act_fwd<decltype(a)::value>(static_cast<const T*>(x), static_cast<T*>(y), n);
    });
  });
}

void act_bwd_cpu(Dt dt, Act act, const void* dy, const void* x, void* dx, int64_t n) {
  dispatch(dt, [&](auto tag) {
    using T = decltype(tag);
    with_act(act, [&](auto a) {
      act_bwd<decltype(a)::value>(static_cast<const T*>(dy), static_cast<const T*>(x),
                                  static_cast<T*>(dx), n);
    });
  });
}

}  // namespace fastlm::fused
