#!/usr/bin/env bash
# What this repo checks and times on a CUDA GPU, in one go, one log per step under OUT_DIR (default gpu_out/):
#   1. tests/test_gpu.py: our Triton kernels compiled for real against the XLA reference, and the sampler's greedy
#      tokens against transformers on the same GPU;
#   2. bench/decode.py --device gpu: prefill/decode vs transformers, 0.5B and 1.5B architectures, bf16 (then fp32,
#      and the XLA attention instead of our kernels, as time allows);
#   3. bench/attention.py: the training kernels' TFLOP/s against cuDNN.
# Each step has its own time limit inside a total budget (BUDGET_S, default 480), so a step that hangs or fails does
# not cost the rest.
#
#     bash bench/gpu_checks.sh [OUT_DIR] [BUDGET_S]
set -u
cd "$(dirname "$0")/.."
out=${1:-gpu_out}
budget=${2:-480}
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
torch.__version__, 'transformers', transformers.__version__, jax.devices())"; } >"$out/env.log" 2>&1
cat "$out/env.log"

step gpu_tests 150 $py -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_gpu.py

dec=(bench/decode.py --device gpu --batches 1,8,64 --new_tokens 65 --repeats 3)
step decode_0.5b_bf16 100 $py "${dec[@]}" --model 0.5b --dtypes bfloat16 ||
  step decode_0.5b_bf16_xla 90 $py "${dec[@]}" --model 0.5b --dtypes bfloat16 --attention_impl xla --no_stream
step decode_1.5b_bf16 110 $py "${dec[@]}" --model 1.5b --dtypes bfloat16 --no_stream
step attention 70 $py bench/attention.py
step decode_0.5b_fp32 80 $py "${dec[@]}" --model 0.5b --dtypes float32 --no_stream
[ -s "$out/decode_0.5b_bf16_xla.log" ] ||
  step decode_0.5b_bf16_xla 80 $py "${dec[@]}" --model 0.5b --dtypes bfloat16 --attention_impl xla --no_stream
echo "== total $SECONDS s"
