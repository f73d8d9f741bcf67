// CUDA emulation (csrc/emu): the host-side slice of <cuda_runtime.h> that fastlm's kernels and
// torch bindings use, for running csrc/cuda on a CPU in tests. See csrc/emu/README.md.
#pragma once

#include <cstddef>

#include "emu/types.h"

enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};

enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

struct CUstream_st;
using cudaStream_t = CUstream_st*;

namespace emu {
// The last launch error and its explanation (a real runtime only has the code).
cudaError_t& last_error();
const char*& last_error_text();
void set_max_dynamic_smem(const void* kernel, int bytes);
}  // namespace emu

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::last_error();
  emu::last_error() = cudaSuccess;
  return e;
}

// The emulator's own explanation when it has one: it names the rule a launch broke.
inline const char* cudaGetErrorString(cudaError_t e) {
  if (e != cudaSuccess && emu::last_error_text() != nullptr) return emu::last_error_text();
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure";
  }
}

template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize)
    emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
