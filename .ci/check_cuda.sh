#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu for sm_80 and sm_90 (compile only: nothing CUDA runs in CI).
# The kernels are plain CUDA over raw pointers, so they need no torch headers here.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda: nvcc not found; skipping the CUDA compile check"; exit 0
fi
shopt -s nullglob
files=(csrc/cuda/*.cu)
if [ ${#files[@]} -eq 0 ]; then echo "check_cuda: no .cu files"; exit 0; fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
status=0
for f in "${files[@]}"; do
  if nvcc -std=c++17 -O3 -c -I csrc \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -o "$out/$(basename "$f").o" "$f"; then
    echo "check_cuda: OK   $f (sm_80, sm_90)"
  else
    echo "check_cuda: FAIL $f"; status=1
  fi
done
exit $status
