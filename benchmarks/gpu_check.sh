#!/usr/bin/env bash
# One command for an H100/H200 machine: build the extension there, run the whole test suite
# (the CUDA cases included), run compute-sanitizer memcheck, racecheck and synccheck on a small
# case, time the one-op mask estimator against its modules (benchmarks/estimator_crossover.py),
# the ops against the eager and compiled references (benchmarks/bench_ops.py) and the sparse
# branch against the dense one (benchmarks/sparse_crossover.py), print a summary.
# Logs go to $OUT (the device tool's output folder) or /tmp/aim-gpu-check.
set -uo pipefail
source "$(dirname "$0")/gpu_env.sh" /tmp/aim-gpu-check
declare -a summary

step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, record status and time
  local name=$1; shift
  local start=$SECONDS
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  summary+=("| $name | $([ $rc -eq 0 ] && echo ok || echo "FAILED ($rc)") | $((SECONDS - start)) s |")
  if [ "$name" = tests ]; then  # every failure, with its short traceback
    sed -n '/^=* FAILURES =*$/,$p' "$OUT/$name.log" | tail -n 150
  fi
  tail -n 15 "$OUT/$name.log"
  return 0
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
step build "$PY" setup.py build_ext --inplace
step info "$PY" -m aim_ext info
step tests "$PY" -m pytest -q -p no:cacheprovider --tb=short tests --junitxml="$OUT/tests.xml"
step memcheck timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" benchmarks/memcheck_case.py
step racecheck timeout 300 compute-sanitizer --tool racecheck --error-exitcode 3 "$PY" benchmarks/memcheck_case.py
step synccheck timeout 300 compute-sanitizer --tool synccheck --error-exitcode 3 "$PY" benchmarks/memcheck_case.py
step estimator_crossover timeout 240 "$PY" benchmarks/estimator_crossover.py --device cuda --dtype bfloat16 \
  --json "$OUT/estimator_crossover.json"
step crossover timeout 240 "$PY" benchmarks/sparse_crossover.py --device cuda --batch 256 --dtype bfloat16 \
  --json "$OUT/sparse_crossover.json"
step bench_ops timeout 420 "$PY" benchmarks/bench_ops.py --json "$OUT/bench_ops.json"
step bench_ops_cl timeout 240 "$PY" benchmarks/bench_ops.py --channels-last --no-compile --repeats 30 \
  --shapes 256,256,28,28,14,14 --json "$OUT/bench_ops_channels_last.json"

echo
echo "GPU check on $(cut -d, -f1 "$OUT/gpu.txt"), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
echo "| step | result | time |"
echo "|---|---|---|"
printf '%s\n' "${summary[@]}"
grep -E "passed|failed" "$OUT/tests.log" | tail -n 1
echo
grep -E "^\|" "$OUT/bench_ops.log" || true
grep -E "^\|" "$OUT/crossover.log" || true
grep -E "^\|" "$OUT/estimator_crossover.log" || true
# Fail the command when any step failed.
! printf '%s\n' "${summary[@]}" | grep -q FAILED
