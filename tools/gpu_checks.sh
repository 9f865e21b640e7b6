#!/usr/bin/env bash
# What this repo checks and times on a CUDA GPU, in one go, one log per step under OUT_DIR (default gpu_out/):
#   1. tests/test_gpu.py: our Triton kernels compiled for real against the XLA reference, and the sampler's greedy
#      tokens against transformers on the same GPU;
#   2. bench/decode.py --device gpu: prefill/decode vs transformers, 0.5B and 1.5B architectures, bf16;
#   3. bench/attention.py: the training kernels' TFLOP/s against cuDNN (what "auto" on GPU waits on);
#   4. fp32, and what may explain fp32 prefill's 0.33x on an H200 (TF32 allowed; XLA attention instead of ours);
#   5. the 0.5B at batch 64 and the streaming costs.
# Each step has its own time limit inside a total budget (BUDGET_S, default 560; one device call may run 600 s), so
# a step that hangs or fails does not cost the rest; the later steps are the ones skipped. Measured on an H200:
# ~12 s per test case (compiles; 16 cases), ~25-35 s per model and per batch size in bench/decode.py.
# Exit status: 0 if every step that ran passed.
#
#     bash tools/gpu_checks.sh [OUT_DIR] [BUDGET_S]
set -u
out=$(realpath -m "${1:-gpu_out}")
budget=${2:-560}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
py=${PYTHON:-python3}
failed=0

step() {  # step NAME LIMIT_S CMD...: run CMD with its output in OUT_DIR/NAME.log (at most 8 logs come back)
  local name=$1 limit=$2 left=$((budget - SECONDS))
  shift 2
  ((limit > left)) && limit=$left
  if ((limit < 20)); then echo "== $name: skipped (budget spent)"; return 0; fi
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit s)"
  grep -v "^WARNING\|^I0000\|^W0000" "$out/$name.log" | tail -n 30
  ((rc == 0)) || failed=1
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv
$py -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch',
torch.__version__, 'transformers', transformers.__version__, jax.devices())"

step gpu_tests 230 $py -m pytest -q -rfE --tb=short -p no:cacheprovider tests/test_gpu.py

dec=(bench/decode.py --device gpu --new_tokens 65 --repeats 3 --no_stream)
step decode_0.5b_bf16 80 $py "${dec[@]}" --model 0.5b --dtypes bfloat16 --batches 1,8
step decode_1.5b_bf16 90 $py "${dec[@]}" --model 1.5b --dtypes bfloat16 --batches 1,8
step attention 90 $py bench/attention.py
fp32=("${dec[@]}" --model 0.5b --dtypes float32 --batches 1)
step decode_0.5b_fp32 60 $py "${fp32[@]}"
step decode_0.5b_fp32_tf32 60 $py "${fp32[@]}" --matmul_precision default
step decode_0.5b_fp32_xla_attn 60 $py "${fp32[@]}" --attention_impl xla
step decode_0.5b_bf16_b64_stream 80 $py bench/decode.py --device gpu --new_tokens 65 --repeats 3 --model 0.5b \
  --dtypes bfloat16 --batches 64
echo "== total $SECONDS s"
exit $failed
