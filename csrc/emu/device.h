// CUDA emulation: what kernel code sees. Included first by every csrc/cuda/*.cu translated for
// the emulator (fastlm/_cuda_emu.py), never by the real CUDA build.
//
// A block's threads run as cooperative fibers on one host thread, in thread order, each until
// it reaches a barrier (__syncthreads, __syncwarp, a shuffle, a WMMA load/store) or ends; so
// results are deterministic, and a barrier that some threads can never reach is reported as a
// deadlock instead of hanging.
#pragma once

#include <cmath>
#include <cstdint>

#include "cuda_runtime.h"
#include "emu/types.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

namespace emu {

struct Fiber;
void sync_block();
void sync_warp();
unsigned char* dynamic_smem();
void* static_smem(const char* site, size_t bytes);  // one declaration's memory in this block
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();
uint64_t exchange(uint64_t value, int src_lane);  // a warp shuffle of 64 bits
void fail(const char* what);                      // record a kernel error (first one wins)

// Runs kernel(args...) for every thread of every block; called by the launch expression the
// translator writes for `kernel<<<grid, block, smem, stream>>>(args...)`.
cudaError_t run_grid(const void* kernel, dim3 grid, dim3 block, size_t smem,
                     void (*body)(void*), void* closure);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;

  template <typename... A>
  void operator()(A&&... args) const {
    auto call = [&]() { kernel(args...); };  // each thread gets its own by-value parameters
    using Call = decltype(call);
    run_grid(reinterpret_cast<const void*>(kernel), grid, block, smem,
             [](void* c) { (*static_cast<Call*>(c))(); }, &call);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0,
                    cudaStream_t = nullptr) {
  static_assert((sizeof(P) + ... + 0) <= 4096, "kernel parameters exceed 4 KiB (sm_80's limit)");
  return {kernel, grid, block, smem};
}

template <typename T>
T shfl_xor(T value, int lane_mask) {
  static_assert(sizeof(T) <= 8, "shuffle of more than 64 bits");
  uint64_t raw = 0;
  std::memcpy(&raw, &value, sizeof(T));
  const int lane = static_cast<int>(thread_idx().x % 32);
  raw = exchange(raw, lane ^ lane_mask);
  T out;
  std::memcpy(&out, &raw, sizeof(T));
  return out;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
#define blockDim (::emu::block_dim())
#define gridDim (::emu::grid_dim())

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
  emu::sync_warp();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  if (mask != 0xffffffffu || width != 32) emu::fail("partial-warp shuffles are not emulated");
  return emu::shfl_xor(value, lane_mask);
}

template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

// Device math. The _rn intrinsics are exact IEEE operations (the translated sources are built
// with -ffp-contract=off, so a * b + c stays two roundings unless written as fmaf).
inline float __expf(float x) { return std::exp(x); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
