#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, from the repo's root:
#   OUT=some/dir [BUDGET_S=900] [TESTS_S=240] bash benchmarks/gpu_check.sh [STEP...]
# STEPs (default: all, in this order):
#   tests           tests/test_gpu.py (cuDNN, Pallas, blockwise against float32 xla; errors kept
#                   in test_gpu.xml) next to the attention test files written on CPU; XLA's
#                   autotuning off (it only picks faster kernels), one test at most 60 s
#   train_step      python -m benchmarks.train_step: gpt2-small, bfloat16, T=1024, batch 16,
#                   against the nanoGPT-style PyTorch peer under torch.compile
#   attention       python -m benchmarks.attention: causal forward+backward, H=64, every backend
#                   of ours next to flax, jax.nn (xla, cudnn) and torch SDPA, over
#                   ATTENTION_LENGTHS and ATTENTION_DTYPES, blockwise also with smaller tiles
#   train_step_xla  the train step again with attention_impl='xla' (peer eager: no compile)
# On one H200 (2026-12, results/gpu_check-h200.log): tests ~2 min (four tests of
# test_backends.py assume a CPU and fail on a GPU), train_step ~2 min, attention ~2 min per dtype
# at five lengths, all ~9 min. Each step has a time limit and the whole ends by BUDGET_S;
# everything lands in $OUT (gpu_check.log, test_gpu.xml, the benchmarks' JSON, written after
# every length, and PNG). Copy the results you keep to benchmarks/results/.
set -u
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
STEPS=${*:-tests train_step attention train_step_xla}
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # several processes share the GPU
DEADLINE=$((SECONDS + ${BUDGET_S:-900}))
start=$SECONDS

left() { echo $((DEADLINE - SECONDS)); }
limit() { local l; l=$(left); echo $((l < $1 ? l : $1)); }
wanted() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME SECONDS COMMAND...: run with a limit, output into the log
  local name=$1 secs; secs=$(limit "$2"); shift 2
  wanted "$name" || return 0
  if [ "$secs" -lt 20 ]; then echo "== $name skipped: $(left) s left" | tee -a "$LOG"; return; fi
  echo "== $name (limit ${secs}s, $(left)s left): $*" | tee -a "$LOG"
  timeout -k 5 "$secs" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name exit ${PIPESTATUS[0]} after $((SECONDS - start)) s" | tee -a "$LOG"
}

# The benchmarks' device name (benchmarks.attention.device_name): 'NVIDIA H200' -> 'h200'.
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr 'A-Z' 'a-z' |
         sed 's/^nvidia //; s/ /-/g')
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import jax, flax, optax, torch; d = jax.devices()[0]
print(d, d.device_kind, getattr(d, "compute_capability", None), "jax", jax.__version__,
      "flax", flax.__version__, "optax", optax.__version__, "torch", torch.__version__)'
} 2>&1 | tee -a "$LOG"

if wanted tests; then  # the GPU file and the three attention files at once (they time nothing)
  secs=$(limit ${TESTS_S:-240})
  echo "== tests (limit ${secs}s)" | tee -a "$LOG"
  PYTEST=(python3 -m pytest --tb=short -p no:cacheprovider --timeout=60)
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout -k 5 "$secs" "${PYTEST[@]}" -v -n 6 \
    -o junit_family=xunit1 --junitxml="$OUT/test_gpu.xml" tests/test_gpu.py >"$OUT/t1" 2>&1 &
  XLA_FLAGS=--xla_gpu_autotune_level=0 timeout -k 5 "$secs" "${PYTEST[@]}" -q -n 8 \
    tests/test_backends.py tests/test_blockwise.py tests/test_attention.py >"$OUT/t2" 2>&1
  echo "== attention test files exit $?" >>"$OUT/t2"
  wait
  for f in t1 t2; do tail -c 80000 "$OUT/$f" >>"$LOG"; rm -f "$OUT/$f"; done
  echo "== tests done after $((SECONDS - start)) s" | tee -a "$LOG"
fi

TRAIN=(python3 -m benchmarks.train_step --preset gpt2-small --seq-len 1024 --dtype bfloat16
       --batch 16 --out "$OUT")
step train_step 180 "${TRAIN[@]}"

# shellcheck disable=SC2086  # the lists are word-split on purpose
step attention 240 python3 -m benchmarks.attention \
  --lengths ${ATTENTION_LENGTHS:-1024 2048 4096 8192 16384} \
  --dtypes ${ATTENTION_DTYPES:-float32 bfloat16} --head-dims 64 --modes fwd+bwd \
  --causal causal --blocks 128x128 512x512 --rounds 5 --out "$OUT/attention-$DEVICE.json"

step train_step_xla 100 "${TRAIN[@]}" --attention-impl xla --no-torch-compile --steps 6
rm -f "$OUT"/train_step-*attention-xla*.png
echo "== done after $((SECONDS - start)) s" | tee -a "$LOG"
