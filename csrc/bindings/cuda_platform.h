// What the CUDA bindings (cuda_*.cpp) need from the CUDA side of torch, in one place, so the
// same binding code also builds against the CUDA emulator (csrc/emu, FASTLM_CUDA_EMU), where
// the kernels run on CPU tensors: tests then cover binding and kernels without a GPU.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime.h>

#ifdef FASTLM_CUDA_EMU
#define FASTLM_CUDA_LIBRARY fastlm_cuda_emu
#define FASTLM_CUDA_DISPATCH_KEY CPU
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTLM_CUDA_LIBRARY fastlm_cuda
#define FASTLM_CUDA_DISPATCH_KEY CUDA
#endif

namespace fastlm {
namespace binding {

#ifdef FASTLM_CUDA_EMU
constexpr at::DeviceType kCudaDevice = at::kCPU;
struct CudaGuard {
  explicit CudaGuard(at::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
#else
constexpr at::DeviceType kCudaDevice = at::kCUDA;
using CudaGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

}  // namespace binding
}  // namespace fastlm
