#!/usr/bin/env bash
# What this repo checks and times on a CUDA GPU, in one go, one log per step under OUT_DIR (default gpu_out/):
#   1. tests/test_gpu.py: our Triton kernels compiled for real against the XLA reference, and the sampler's greedy
#      tokens against transformers on the same GPU;
#   2. bench/decode.py --device gpu: prefill/decode vs transformers, 0.5B and 1.5B architectures, bf16, then fp32
#      and what may explain fp32 prefill's 0.33x on an H200 (TF32 allowed; XLA attention instead of our kernels);
#   3. bench/attention.py: the training kernels' TFLOP/s against cuDNN;
#   4. the XLA attention instead of our kernels in bf16 decode.
# Each step has its own time limit inside a total budget (BUDGET_S, default 540; one device call may run 600 s), so
# a step that hangs or fails does not cost the rest, and the later steps are the ones skipped. On an H200 the tests
# took ~12 s per case (compiles), a decode step's model ~25-35 s per batch size.
#
#     bash bench/gpu_checks.sh [OUT_DIR] [BUDGET_S]
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
budget=${2:-540}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}

step() {  # step NAME LIMIT_S CMD...: run CMD with its output in OUT_DIR/NAME.log; its exit status (124: timed out)
  local name=$1 limit=$2 left=$((budget - SECONDS))
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 20)); then echo "== $name: skipped (budget spent)"; return 99; fi
  local t0=$SECONDS
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)"
  grep -v "^WARNING\|^I0000\|^W0000" "$out/$name.log" | tail -n 30
  return $rc
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  $py -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch',
torch.__version__, 'transformers', transformers.__version__, jax.devices())"; } 2>&1  # stdout only: a device
# call brings back at most 8 files, one per step below

step gpu_tests 220 $py -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_gpu.py

dec=(bench/decode.py --device gpu --new_tokens 65 --repeats 3)
step decode_0.5b_bf16 110 $py "${dec[@]}" --model 0.5b --dtypes bfloat16 --batches 1,8,64
step decode_1.5b_bf16 110 $py "${dec[@]}" --model 1.5b --dtypes bfloat16 --batches 1,8 --no_stream
fp32=("${dec[@]}" --model 0.5b --dtypes float32 --batches 1 --no_stream)
step decode_0.5b_fp32 70 $py "${fp32[@]}"
step decode_0.5b_fp32_tf32 70 $py "${fp32[@]}" --matmul_precision default
step decode_0.5b_fp32_xla_attn 70 $py "${fp32[@]}" --attention_impl xla
step attention 90 $py bench/attention.py
step decode_0.5b_bf16_xla_attn 70 $py "${dec[@]}" --model 0.5b --dtypes bfloat16 --batches 1,8 --attention_impl xla \
  --no_stream
echo "== total $SECONDS s"
