#!/usr/bin/env bash
# aim-bench on an H100/H200 for the targets of the benchmark issue (bf16, channels_last):
# batch 1 in eager, CUDA graphs and AOTInductor; batch 256 in eager and torch.compile; the
# training step at batch 64, eager and compiled. Builds the extension first (as gpu_check.sh).
# Results go to $OUT/bench_b1, $OUT/bench_b256 and $OUT/bench_train (results.json, .md, .png).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" /tmp/aim-gpu-bench
BENCH=("$PY" -m aim_ext.cli.bench --device cuda --families convnext_tiny,resnet50 --dtypes bfloat16)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
"$PY" setup.py build_ext --inplace >"$OUT/build.log" 2>&1 || { tail -n 30 "$OUT/build.log"; exit 1; }
timeout 240 "${BENCH[@]}" --batch-sizes 1 --runtimes eager,cudagraphs,aoti --no-train \
  --out "$OUT/bench_b1" >"$OUT/bench_b1.log" 2>&1
timeout 240 "${BENCH[@]}" --batch-sizes 256 --runtimes eager,compile --no-train \
  --out "$OUT/bench_b256" >"$OUT/bench_b256.log" 2>&1
timeout 240 "${BENCH[@]}" --runtimes eager --batch-sizes 1 --train-runtimes eager,compile --train-batch 64 \
  --out "$OUT/bench_train" >"$OUT/bench_train.log" 2>&1
for part in b1 b256 train; do
  echo "== $part"; grep -E "^\|" "$OUT/bench_$part.log" || tail -n 20 "$OUT/bench_$part.log"
done
