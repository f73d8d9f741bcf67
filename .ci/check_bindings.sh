#!/usr/bin/env bash
# Syntax-check the CUDA torch bindings (csrc/bindings/cuda_*.cpp) on a machine whose torch is a
# CPU build. Those files include c10/cuda headers; the CPU wheel lacks one generated header
# (c10/cuda/impl/cuda_cmake_macros.h), so we supply a stand-in with the single macro it defines
# and point at the CUDA toolkit's own headers. Nothing is linked or run: -fsyntax-only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
shopt -s nullglob
files=(csrc/bindings/cuda_*.cpp)
if [ ${#files[@]} -eq 0 ]; then echo "check_bindings: no CUDA binding files"; exit 0; fi
cuda_home=${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")")}
[ -f "$cuda_home/include/cuda_runtime_api.h" ] || cuda_home=/usr/local/cuda
if [ ! -f "$cuda_home/include/cuda_runtime_api.h" ]; then
  echo "check_bindings: CUDA headers not found; skipping (set CUDA_HOME)"; exit 0
fi
shim=$(mktemp -d)
trap 'rm -rf "$shim"' EXIT
mkdir -p "$shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$shim/c10/cuda/impl/cuda_cmake_macros.h"
incs=$($PY -c "import torch.utils.cpp_extension as c; print(' '.join('-I'+p for p in c.include_paths()))")
status=0
for f in "${files[@]}"; do
  if g++ -std=c++20 -fsyntax-only -Wall $incs -I"$shim" -I"$cuda_home/include" -Icsrc "$f"; then
    echo "check_bindings: OK   $f"
  else
    echo "check_bindings: FAIL $f"; status=1
  fi
done
exit $status
