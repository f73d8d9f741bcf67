#!/usr/bin/env bash
# What a GPU machine lacks, as wheels in .whl/ (git-ignored): the workplace's set (deepspeed,
# datasets and their needs, prelude.sh) plus Liger-Kernel, the drop-in peer of
# `fastlm bench model` (pure Python; its Triton kernels compile on the device).
# Run here, in the project root, with the project's venv active.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ../shared/gpu/wheels.sh
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "liger-kernel>=0.6"
echo "with liger: $(ls .whl/*.whl | wc -l) wheels, $(du -sh .whl | cut -f1)"
