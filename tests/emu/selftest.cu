// Kernels that break CUDA's rules on purpose, and one that keeps them, to show the emulator
// (csrc/emu) reports each break; tests/test_cuda_emu.py translates, builds and runs this file.
// Prints "<case>: <outcome>" lines.
#include <cuda_runtime.h>
#include <mma.h>

#include <cmath>
#include <cstdio>

namespace {

constexpr int kN = 128;

// Every thread publishes its index, then reads its neighbour's; `sync` = with the barrier.
__global__ void neighbour(float* out, bool sync) {
  __shared__ float s[kN];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (sync) __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % kN];
}

// Lane sums over the warp with shuffles, and a dynamic shared memory round trip.
template <typename T>
__global__ void warp_sum(T* out, int extra) {
  extern __shared__ __align__(128) unsigned char smem[];
  T* buf = reinterpret_cast<T*>(smem);
  T v = static_cast<T>(threadIdx.x % 32 + extra);
  for (int m = 16; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  buf[threadIdx.x] = v;
  __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = buf[blockDim.x - 1 - threadIdx.x];
}

__global__ void diverged_barriers() {
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    __syncwarp();
  }
}

__global__ void overflow_smem(int bytes) {
  extern __shared__ unsigned char smem[];
  if (threadIdx.x == 0) smem[bytes] = 1;
}

__global__ void read_unwritten_smem(float* out) {
  extern __shared__ float fsmem[];
  out[threadIdx.x] = fsmem[threadIdx.x];
}

__global__ void misaligned_wmma(const __half* src) {
  nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major> a;
  nvcuda::wmma::load_matrix_sync(a, src + 1, 16);
}

void report(const char* name, cudaError_t launch) {
  const cudaError_t err = launch != cudaSuccess ? launch : cudaGetLastError();
  std::printf("%s: %s\n", name, err == cudaSuccess ? "ok" : cudaGetErrorString(err));
}

}  // namespace

int main() {
  float out[kN];
  neighbour<<<1, kN>>>(out, true);
  bool right = true;
  for (int i = 0; i < kN; ++i) right = right && out[i] == static_cast<float>((i + 1) % kN);
  std::printf("neighbour with barrier: %s\n", right ? "correct" : "wrong");
  neighbour<<<1, kN>>>(out, false);
  int nans = 0;
  for (float v : out) nans += std::isnan(v);
  std::printf("neighbour without barrier: %d NaN\n", nans);

  int sums[2 * 64];
  warp_sum<int><<<2, 64, 64 * sizeof(int)>>>(sums, 1);
  bool sums_right = true;
  for (int v : sums) sums_right = sums_right && v == 496 + 32;  // sum of 0..31, +1 each
  std::printf("shuffle sum: %s\n", sums_right ? "correct" : "wrong");

  diverged_barriers<<<1, 64>>>();
  report("diverged barriers", cudaSuccess);
  overflow_smem<<<1, 32, 1024>>>(1024);
  report("shared memory overflow", cudaSuccess);
  read_unwritten_smem<<<1, 32, 32 * sizeof(float)>>>(out);
  nans = 0;
  for (int i = 0; i < 32; ++i) nans += std::isnan(out[i]);
  std::printf("unwritten shared memory: %d NaN\n", nans);
  warp_sum<int><<<1, 64, 60 * 1024>>>(sums, 0);
  report("60 KiB without opt-in", cudaSuccess);
  cudaFuncSetAttribute(warp_sum<int>, cudaFuncAttributeMaxDynamicSharedMemorySize, 200 * 1024);
  warp_sum<int><<<1, 64, 200 * 1024>>>(sums, 0);
  report("200 KiB with opt-in", cudaSuccess);
  warp_sum<int><<<dim3(1, 70000), 64, 256>>>(sums, 0);
  report("grid y of 70000", cudaSuccess);
  alignas(64) __half tile[17 * 16] = {};
  misaligned_wmma<<<1, 32>>>(tile);
  report("misaligned wmma", cudaSuccess);
  return 0;
}
