// torch binding of the CPU bf16 x bf16 -> fp32 matmul (c = a b, or c += a b) (csrc/cpu/bf16_matmul.cpp).
// Registered only in builds with AVX-512 BF16; bf16_matmul_amx() tells fastlm/ops whether it
// runs on AMX tiles (without them torch's fp32 GEMM is as fast, and the op is not used).
#include <torch/library.h>

#include <ATen/ATen.h>

#include "cpu/bf16_gemm.h"
#include "cpu/bf16_matmul.h"

#if defined(FASTLM_DPBF16)
namespace {

using at::Tensor;

fastlm::MatView view_of(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastlm_cpu bf16_matmul_acc_: ", name,
              " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, "fastlm_cpu bf16_matmul_acc_: ", name,
              " must be bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2, "fastlm_cpu bf16_matmul_acc_: ", name, " must be 2-D, got shape ",
              t.sizes());
  // a size-1 dimension's stride is never used: read such a matrix as row-major
  const int64_t s1 = t.size(1) == 1 ? 1 : t.stride(1);
  const int64_t s0 = t.size(0) == 1 && s1 != 1 ? 1 : t.stride(0);
  TORCH_CHECK(s0 == 1 || s1 == 1, "fastlm_cpu bf16_matmul_acc_: ", name,
              " needs a unit stride in one dimension, got strides ", t.strides(),
              " (call .contiguous() first)");
  return {reinterpret_cast<const fastlm::bf16*>(t.data_ptr()), s0, s1};
}

void matmul_acc(Tensor& c, const Tensor& a, const Tensor& b, bool accumulate) {
  const fastlm::MatView av = view_of(a, "a"), bv = view_of(b, "b");
  TORCH_CHECK(a.size(1) == b.size(0), "fastlm_cpu bf16_matmul_acc_: a is ", a.sizes(),
              " and b is ", b.sizes(), ": inner sizes differ");
  TORCH_CHECK(c.device().is_cpu() && c.scalar_type() == at::kFloat && c.dim() == 2 &&
                  c.size(0) == a.size(0) && c.size(1) == b.size(1) && c.stride(1) == 1,
              "fastlm_cpu bf16_matmul_acc_: c must be a float32 CPU matrix of shape (",
              a.size(0), ", ", b.size(1), ") with unit column stride, got ", c.scalar_type(),
              " ", c.sizes(), " strides ", c.strides());
  fastlm::bf16_matmul_acc_cpu(a.size(0), b.size(1), a.size(1), av, bv, c.data_ptr<float>(),
                              c.stride(0), accumulate);
}

bool uses_amx() { return fastlm::bf16_matmul_uses_amx(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastlm_cpu, m) {
  m.def("bf16_matmul_acc_(Tensor(a!) c, Tensor a, Tensor b, bool accumulate) -> ()");
  m.def("bf16_matmul_amx() -> bool", &uses_amx);  // no tensors to dispatch on: one kernel
}

TORCH_LIBRARY_IMPL(fastlm_cpu, CPU, m) { m.impl("bf16_matmul_acc_", &matmul_acc); }
#endif
