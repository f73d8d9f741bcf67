#!/usr/bin/env bash
# GPU proof in one device call: build the CUDA extensions, run the GPU tests, then the
# benchmarks behind the issues' GPU targets, each stage time-boxed so that whatever finishes
# comes back under $OUT even when the call's limit cuts the rest.
#
#   bash benchmarks/gpu_wheels.sh                       # here: deepspeed/datasets/liger wheels
#   device run, carry [".whl"]:
#     . .whl/prelude.sh && bash benchmarks/gpu_proof.sh            # every stage, in order
#     . .whl/prelude.sh && bash benchmarks/gpu_proof.sh model train # chosen stages
#
# Stages, in priority order (correctness before speed):
#   env        nvidia-smi, versions
#   build      fastlm's CUDA extensions (JIT, once; later stages reuse the cache)
#   tests      pytest -m "gpu and not slow" (CUDA + Triton kernels, patched models, fp16
#              trainer)
#   attention  bf16, head dim 128, causal, S = 4k..16k (issue 3: >= 1.0x best SDPA, 450 TFLOP/s)
#   adamw      fused multi-tensor step vs torch fused/foreach and DeepSpeed (issue 4)
#   model      Llama 1B (llama-1b preset), seq 2048, bf16: patched vs HF SDPA and Liger (issue 7)
#   train      GPT-2 124M, seq 1024, bf16: fastlm trainer vs HF Trainer, MFU (issue 6)
#   packed     Llama 1B, 8 sequences packed a row (position ids restarting): segment ids in
#              fastlm's kernels vs HF SDPA with its block-diagonal mask (issue 7)
#   bigtests   pytest -m "gpu and slow": tensors past 2^31 elements (~45 GB), one at a time
#
# Environment: OUT (default ./gpu-proof-out), BUDGET_S (seconds for all stages, default 560:
# the device call's limit is 600), DEVICE (default cuda), SMALL=1 (tiny sizes: a dry run of
# every command on any machine, e.g. DEVICE=cpu SMALL=1 on the CPU).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-proof-out}
BUDGET_S=${BUDGET_S:-560}
DEVICE=${DEVICE:-cuda}
SMALL=${SMALL:-0}
PY=${PYTHON:-python3}
RES="$OUT/benchmarks/results"
LOGS="$OUT/logs"
mkdir -p "$RES" "$LOGS"
export FASTLM_CACHE_DIR=${FASTLM_CACHE_DIR:-$PWD/.cache/fastlm}
export MAX_JOBS=${MAX_JOBS:-16}
export PYTHONUNBUFFERED=1
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(env build tests attention adamw model train packed bigtests)

gpu_tag() {  # result-file suffix naming the card: h200, h100, ... (cpu in a dry run)
  if [ "$DEVICE" = cuda ] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($NF)}'
  else
    echo cpu
  fi
}
TAG=$(gpu_tag)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

# run NAME EST_S MAX_S CMD...: skipped when fewer than EST_S seconds are left; cut at MAX_S
# (or at what is left of the budget); output in logs/NAME.log; one summary line.
run() {
  local name=$1 est=$2 max=$3
  shift 3
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt "$est" ]; then
    echo "$name: skipped (${left}s left of ${BUDGET_S}s, needs ~${est}s)" | tee -a "$SUMMARY"
    return
  fi
  [ "$max" -gt "$((left - 5))" ] && max=$((left - 5))
  local t0=$SECONDS
  echo "== $name (up to ${max}s): $*"
  timeout --signal=INT --kill-after=10 "$max" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  local how="rc $rc"
  [ "$rc" -eq 124 ] && how="cut at ${max}s"
  echo "$name: $how in $((SECONDS - t0))s" | tee -a "$SUMMARY"
  tail -n 4 "$LOGS/$name.log"
}

if [ "$SMALL" = 1 ]; then
  ATT=(--seqlens 128,256 --dtypes fp32 --batch 1 --heads 2 --head-dim 64 --repeat 2)
  ADAM=(--sizes 1 --repeat 2)
  MODEL=(--preset tiny-llama --seqlens 64 --batch 1 --repeat 1 --min-seconds 0)
  TRAIN=(--preset tiny-gpt2 --block-size 64 --micro-batch 2 --steps 3 --warmup 1 --precision fp32)
  PACKED=(--preset tiny-llama --packed 4 --seqlens 64 --batch 1 --repeat 1 --min-seconds 0)
else
  # FlashAttention's benchmark shape: 16k tokens per batch, 2048 wide (16 heads of 128)
  ATT=(--seqlens 4096,8192,16384 --dtypes bf16 --batch 2 --heads 16 --head-dim 128
       --impls fastlm_cuda,fastlm_triton,sdpa_flash,sdpa_efficient,sdpa_cudnn --repeat 10)
  ADAM=(--sizes 10,100,1000 --tensors 8 --repeat 10)
  MODEL=(--preset llama-1b --seqlens 2048 --batch 4 --dtype bf16 --repeat 5 --min-seconds 5)
  TRAIN=(--preset gpt2-124m --block-size 1024 --micro-batch 8 --steps 20 --warmup 5
         --precision bf16)
  PACKED=(--preset llama-1b --packed 8 --seqlens 2048 --batch 4 --dtype bf16 --impls fastlm,sdpa
          --repeat 5 --min-seconds 5)
fi

for stage in "${STAGES[@]}"; do
  case $stage in
    env)
      run env 5 60 bash -c "nvidia-smi || true; $PY -c 'import torch, triton, transformers, \
sys; print(sys.version); print(torch.__version__, torch.version.cuda, triton.__version__, \
transformers.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"no gpu\")'; \
$PY -m pip list 2>/dev/null | grep -i -E '^(deepspeed|datasets|liger|flash)' || true"
      cp "$LOGS/env.log" "$OUT/env.txt" ;;
    build)
      run build 60 300 $PY -m fastlm.cli env --build ;;
    tests)
      # several workers where pytest-xdist is there (the GPU image has it): Triton's
      # compilations, not the GPU, bound the wall time of the GPU tests
      XDIST=()
      $PY -c "import xdist" 2>/dev/null && XDIST=(-n 4)
      run tests 60 300 $PY -m pytest -q -m "gpu and not slow" -p no:cacheprovider \
        "${XDIST[@]}" --junitxml="$OUT/gpu-tests.xml" tests ;;
    bigtests)
      # serially: each holds ~45 GB of the GPU (several workers at once would run out)
      run bigtests 60 150 $PY -m pytest -q -m "gpu and slow" -p no:cacheprovider \
        --junitxml="$OUT/gpu-bigtests.xml" tests ;;
    attention)
      run attention 60 150 $PY -m fastlm.cli bench attention --device "$DEVICE" "${ATT[@]}" \
        --out "$RES" --name "attention_$TAG" ;;
    adamw)
      run adamw 30 90 $PY -m fastlm.cli bench adamw --device "$DEVICE" "${ADAM[@]}" \
        --out "$RES" --name "adamw_$TAG" ;;
    model)
      run model 60 150 $PY -m fastlm.cli bench model --device "$DEVICE" "${MODEL[@]}" \
        --out "$RES" --name "model_llama_1b_$TAG" ;;
    train)
      run train 60 180 $PY -m fastlm.cli bench train "${TRAIN[@]}" \
        --out "$RES" --name "train_gpt2_124m_$TAG" ;;
    packed)
      run packed 60 150 $PY -m fastlm.cli bench model --device "$DEVICE" "${PACKED[@]}" \
        --out "$RES" --name "model_llama_1b_packed_$TAG" ;;
    *)
      echo "unknown stage $stage (env build tests attention adamw model train packed" \
        "bigtests)" | tee -a "$SUMMARY" ;;
  esac
done

echo
echo "== summary (${SECONDS}s; results under $RES, logs under $LOGS)"
cat "$SUMMARY"
# the tests' verdict line and the headline rows of each result, last: the reply carries the tail
for t in tests bigtests; do
  [ -f "$LOGS/$t.log" ] && grep -E "passed|failed|error" "$LOGS/$t.log" | tail -n 3
done
for md in "$RES"/*.md; do
  [ -f "$md" ] || continue
  echo "-- $(basename "$md")"
  grep -E "^\|" "$md" | grep -v -E "^\|[-| ]+\|$" | cut -c1-160 | head -n 16
done
