// The Python module shell of each extension. The ops themselves are registered by the
// TORCH_LIBRARY_FRAGMENT blocks in the cpu_*.cpp / cuda_*.cpp binding files when the library
// is loaded, so this file only gives a prebuilt (setup.py) extension its PyInit symbol.
#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastlm kernels; the ops live under torch.ops.fastlm_cpu / torch.ops.fastlm_cuda";
}
