#!/usr/bin/env bash
# aim-bench on one H100/H200 within one short lease, the newest figures first:
#   build the extension (sm_90 only; the merge kernels' four files in parallel, nvcc on every
#   CPU), check that the CUDA kernels load; sparse masked inference (the Triton kernels' CUDA
#   tests, their crossover against the dense branch at batch 256 and 1 in bf16, maps 7x7 to 56x56
#   at 10-50% active, the fused models at batch 256 with dense and sparse branches, and sparse at
#   batch 1 in CUDA graphs); the fused models at batch 1 in CUDA graphs (the mask
#   estimator op against its modules, its tests, its crossover, a kernel-time profile), the fused
#   training step's tests and its eager and captured steps at batch 64, the fused models at batch
#   256 (dense and sparse branches), aim-bench batch 1 (eager, CUDA graphs) and 256 (eager), the
#   CUDA tests of the ops and the concurrent branches, where the time goes at batch 1
#   (profile_overhead.py), batch 1 on one stream, then,
#   while time is left: compiled training steps, a training profile, torch.compile with CUDA
#   graphs and AOTInductor at batch 1, and the ops benchmark.
# Every step has a time limit and all of them share BUDGET seconds (default 450); a step that
# would start with under 20 s left is skipped and says so. Logs, results.json/.md/.png and the
# profiles go to $OUT/results.tgz (rewritten after every step, so a cut-off run still returns
# what it finished; the device tool returns at most 8 files) and the summary to $OUT/summary.md.
# Set AIM_EXT_COMMIT to the commit: the tree travels to the GPU machine with a .git that may be
# a stale copy (a run at 2ea2429 reported ddd888d from it).
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" /tmp/aim-gpu-bench
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
BUDGET=${BUDGET:-450}
WORK=$(mktemp -d /tmp/aim-gpu-bench.XXXX)
declare -a summary

step() {  # step NAME LIMIT COMMAND...: run with a limit inside the budget, log to $WORK/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 20 ]; then
    summary+=("| $name | skipped: budget spent | |")
    printf '%s\n' "${summary[@]}" >"$WORK/summary.md"
    return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  LAST_RC=$rc
  local result=ok
  [ $rc -eq 124 ] && result="TIMED OUT (${limit} s)"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && result="FAILED ($rc)"
  summary+=("| $name | $result | $((SECONDS - start)) s |")
  echo "== $name: $result"
  [ $rc -ne 0 ] && tail -n 25 "$WORK/$name.log"
  printf '%s\n' "${summary[@]}" >"$WORK/summary.md"
  tar czf "$OUT/results.tgz" -C "$WORK" .
  return 0
}

BENCH=("$PY" -m aim_ext.cli.bench --device cuda --families convnext_tiny,resnet50 --dtypes bfloat16)
PROFILE=("$PY" benchmarks/profile_overhead.py --dtype bfloat16)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$WORK/gpu.txt"
export AIM_EXT_COMMIT=${AIM_EXT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
step build 170 "$PY" setup.py build_ext --inplace
step kernels 30 "$PY" -c "import aim_ext.ops as o, sys; a = o.kernels_available(); print(a); sys.exit(0 if a['cuda'] else 1)"
# Without the kernels every figure would be the reference path's: stop (the rest are skipped).
[ "${LAST_RC:-1}" -ne 0 ] && BUDGET=0
# Sparse masked inference: the Triton kernels' CUDA tests (graph capture with new masks, no host
# synchronisation, the same bits on every replay), the feature branch alone (dense against sparse,
# kernel time at batch 256, the crossover table for AIM.sparse_inference="auto"), then the whole
# fused models, both sides fused, dense and sparse branches at batch 256 and sparse at batch 1.
step tests_sparse 150 "$PY" -m pytest -q -p no:cacheprovider --tb=short -k cuda \
  tests/test_pooled_head_triton.py tests/test_pooled_head.py
step sparse_crossover_b256 120 "$PY" benchmarks/sparse_crossover.py --device cuda --dtype bfloat16 --batch 256 \
  --fractions 0.1,0.25,0.5 --rounds 10 --json "$WORK/sparse_crossover_b256.json"
step sparse_crossover_b1 60 "$PY" benchmarks/sparse_crossover.py --device cuda --dtype bfloat16 --batch 1 \
  --fractions 0.1,0.25,0.5 --rounds 10 --json "$WORK/sparse_crossover_b1.json"
step bench_fused_b256 90 "${BENCH[@]}" --batch-sizes 256 --runtimes eager --no-train --fuse --sparse off \
  --out "$WORK/bench_fused_b256"
step bench_fused_sparse_b256 90 "${BENCH[@]}" --batch-sizes 256 --runtimes eager --no-train --fuse --sparse on \
  --out "$WORK/bench_fused_sparse_b256"
step bench_fused_sparse_b1 60 "${BENCH[@]}" --batch-sizes 1 --runtimes cudagraphs --no-train --fuse --sparse on \
  --out "$WORK/bench_fused_sparse_b1"
# Batch 1 in a CUDA graph, both sides fused: the mask estimators as the op chooses (its two-launch
# kernel for the top stage), then as modules, side by side; the estimator's CUDA tests and crossover.
step bench_fused_b1 60 "${BENCH[@]}" --families convnext_tiny,resnet50,mobilenetv2_100 --batch-sizes 1 \
  --runtimes cudagraphs --no-train --fuse --out "$WORK/bench_fused_b1"
step bench_fused_b1_modules 60 "${BENCH[@]}" --families convnext_tiny,resnet50,mobilenetv2_100 --batch-sizes 1 \
  --runtimes cudagraphs --no-train --fuse --estimator modules --out "$WORK/bench_fused_b1_modules"
step tests_estimator 60 "$PY" -m pytest -q -p no:cacheprovider -n 8 --tb=short -k cuda \
  tests/test_mask_estimator.py tests/test_feature_branch.py
step estimator_crossover 45 "$PY" benchmarks/estimator_crossover.py --device cuda --dtype bfloat16 --rounds 20 \
  --json "$WORK/estimator_crossover.json"
step profile_fused_b1 30 "${PROFILE[@]}" --model convnext_tiny --stop-stages 2,1 --batch 1 --fuse \
  --out "$WORK/profile_fused_b1.md"
# The training step at batch 64 in bf16, eager and captured into a CUDA graph (the compiled step,
# slow to compile, comes later): the training-step targets, and the captured step's CUDA tests.
step tests_train_step 90 "$PY" -m pytest -q -p no:cacheprovider --tb=short -m "not slow" tests/test_train_step.py
step bench_train 150 "${BENCH[@]}" --runtimes "" --train-runtimes eager,cuda-graph --train-batch 64 \
  --out "$WORK/bench_train"
step tests_pooled 90 "$PY" -m pytest -q -p no:cacheprovider -n 8 --tb=short -k cuda tests/test_inference.py
step bench_b1 60 "${BENCH[@]}" --batch-sizes 1 --runtimes eager,cudagraphs --no-train --out "$WORK/bench_b1"
step bench_b256 60 "${BENCH[@]}" --batch-sizes 256 --runtimes eager --no-train --out "$WORK/bench_b256"
step tests 75 "$PY" -m pytest -q -p no:cacheprovider -n 8 --tb=short -k "cuda or concurrent" \
  tests/test_concurrency.py tests/test_masked_merge.py tests/test_epilogue.py
step profile_convnext_b1 30 "${PROFILE[@]}" --model convnext_tiny --stop-stages 2,1 --batch 1 \
  --out "$WORK/profile_convnext_b1.md"
step bench_b1_one_stream 30 "${BENCH[@]}" --batch-sizes 1 --runtimes cudagraphs --no-train \
  --no-concurrent-branches --out "$WORK/bench_b1_one_stream"
step profile_resnet_b1 25 "${PROFILE[@]}" --model resnet50 --stop-stages 3 --batch 1 \
  --out "$WORK/profile_resnet_b1.md"
step profile_train 45 "${PROFILE[@]}" --model convnext_tiny --stop-stages 2 --train-batch 64 --reps 20 \
  --out "$WORK/profile_train.md"
step profile_convnext_b256 30 "${PROFILE[@]}" --model convnext_tiny --stop-stages 1 --batch 256 --eager \
  --reps 10 --out "$WORK/profile_convnext_b256.md"
step bench_train_compiled 240 "${BENCH[@]}" --runtimes "" --train-runtimes compile --train-batch 64 \
  --out "$WORK/bench_train_compiled"
step bench_b1_compiled 200 "${BENCH[@]}" --families convnext_tiny --batch-sizes 1 \
  --runtimes compile-cudagraphs,aoti --no-train --out "$WORK/bench_b1_compiled"
step bench_ops 90 "$PY" benchmarks/bench_ops.py --no-compile --repeats 30 --json "$WORK/bench_ops.json"

echo
echo "aim-bench on $(cut -d, -f1 "$WORK/gpu.txt"), commit ${AIM_EXT_COMMIT:-unknown}"
echo "| step | result | time |"
echo "|---|---|---|"
cat "$WORK/summary.md"
cp "$WORK/summary.md" "$OUT/summary.md"
grep -hE "[0-9]+ (passed|failed)" "$WORK/tests.log" | tail -n 1
grep -hE "[0-9]+ (passed|failed)" "$WORK/tests_sparse.log" | tail -n 1
for log in "$WORK"/sparse_crossover_b256.log "$WORK"/sparse_crossover_b1.log; do
  [ -f "$log" ] && { echo "$(basename "$log" .log):"; grep -hE "^(\||device)" "$log"; }
done
"$PY" - "$WORK" <<'PYTHON'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*/results.json")):
    for r in json.loads(path.read_text())["rows"]:
        ms = f"{r['median_ms']:.3f}" if r["status"] == "ok" else r["status"][:60]
        ratio = r.get("overhead_ratio")
        fastest = r.get("ratio_to_fastest_vanilla")
        print(f"{path.parent.name} | {r['kind']} | {r['model']} | {r['runtime']} | b{r['batch']} | {ms} | "
              f"{'' if ratio is None else f'{ratio:.3f}'} | {'' if fastest is None else f'{fastest:.3f}'}")
PYTHON
