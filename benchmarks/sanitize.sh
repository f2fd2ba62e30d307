#!/usr/bin/env bash
# The C++ kernels under AddressSanitizer and UndefinedBehaviorSanitizer, on the CPU: copy the
# working tree to a scratch folder, build the extension there with AIM_EXT_SANITIZE=address,undefined,
# run the op tests against that build (every op, forward and backward, over the suite's fuzzed
# shapes, layouts, empty maps and refusals), then prove that a defect fails the run: inject an
# out-of-bounds write, then a signed overflow, into the merge kernel, rebuild, and check that the
# sanitizers stop each run with their report. Any report in the op tests fails the script.
#
# Usage: bash benchmarks/sanitize.sh [PYTEST_ARGS...]   (default: the op test files in OP_TESTS)
# Logs and the sanitizers' reports go to $OUT (default /tmp/aim-sanitize). The scratch tree is a
# temporary folder, or AIM_SANITIZE_TREE, which is kept: a second run there recompiles only the
# sources that changed. The checkout's own build (aim_ext/_C*.so) is not touched.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$repo/.venv/bin/python}
OUT=${OUT:-/tmp/aim-sanitize}
OP_TESTS=(tests/test_masked_merge.py tests/test_epilogue.py tests/test_mask_estimator.py
  tests/test_pooled_head.py tests/test_inference.py tests/test_concurrency.py tests/test_threads.py)
# The kernel the self-test breaks, and the test that must then die.
VICTIM=csrc/cpu/masked_merge_cpu.cpp
VICTIM_TEST=(tests/test_masked_merge.py -k "test_forward_matches_reference_exactly and cpu")
SANITIZE=address,undefined

mkdir -p "$OUT" && rm -rf "$OUT"/reports* "$OUT"/*.log
if [ -n "${AIM_SANITIZE_TREE:-}" ]; then
  scratch=$(mkdir -p "$AIM_SANITIZE_TREE" && cd "$AIM_SANITIZE_TREE" && pwd)
else
  scratch=$(mktemp -d /tmp/aim-sanitize-tree.XXXXXX)
  trap 'rm -rf "$scratch"' EXIT
fi
declare -a summary
failed=0

record() {  # record NAME OK(0/1) SECONDS DETAIL
  summary+=("| $1 | $([ "$2" = 1 ] && echo ok || echo FAILED) | $3 s | $4 |")
  [ "$2" = 1 ] || failed=1
}

build() {  # build LOG: (re)build the scratch tree's extension; ninja recompiles changed files only
  (cd "$scratch" && AIM_EXT_SANITIZE=$SANITIZE MAX_JOBS=${MAX_JOBS:-2} "$PY" setup.py build_ext --inplace) >"$1" 2>&1
}

sanitized() {  # sanitized REPORTS COMMAND...: run in the scratch tree with the sanitizer runtimes
  local reports=$1; shift
  mkdir -p "$reports"
  # Both runtimes come first (python is not instrumented; libubsan also loads libstdc++ before
  # ASan starts, without which ASan's __cxa_throw interceptor fails at the first C++ exception).
  # Leaks off: Python and torch keep their allocations to the end. A report aborts the process
  # (exit 134, where a failed test exits 1). ASan writes its reports to files in REPORTS, so those
  # of subprocesses whose output a test captures are kept; UBSan's go to stderr.
  (cd "$scratch" && env LD_PRELOAD="$runtimes" PYTHONPATH="$scratch" PYTHONMALLOC=malloc \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_odr_violation=0:log_path=$reports/asan" \
    UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1" \
    "$@")
}

# pytest in one process; --capture=sys leaves file descriptor 2 alone, so that a report written
# there reaches the log instead of dying inside pytest's capture.
PYTEST=(-m pytest -p no:xdist -p no:cacheprovider -o addopts= --capture=sys -q)

reports_in() {  # reports_in REPORTS LOG: the sanitizer reports in the folder's files and the log
  cat "$1"/* "$2" 2>/dev/null | grep -E "ERROR: AddressSanitizer|runtime error:"
}

# The working tree as it is (tracked files and untracked ones git does not ignore), no builds.
git -C "$repo" ls-files -z --cached --others --exclude-standard |
  (cd "$repo" && tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$scratch" -xf -
commit="$(git -C "$repo" rev-parse --short HEAD)$(git -C "$repo" diff --quiet HEAD || echo ' with uncommitted changes')"
echo "scratch tree $scratch, commit $commit"

start=$SECONDS
build "$OUT/build.log"
built=$?
so=$(ls "$scratch"/aim_ext/_C*.so 2>/dev/null | head -n 1)
if [ $built -ne 0 ] || [ -z "$so" ]; then
  record build 0 $((SECONDS - start)) "no extension built: see $OUT/build.log"
  tail -n 30 "$OUT/build.log"
  printf '%s\n' "${summary[@]}"
  exit 1
fi
runtimes=$(ldd "$so" | awk '/libasan|libubsan/ {print $3}' | tr '\n' ' ')
record build 1 $((SECONDS - start)) "$(grep -o 'aim_ext build: .*' "$OUT/build.log"); runtimes: $runtimes"

# The tests must load the scratch build, and it must be the sanitized one.
sanitized "$OUT/reports-check" "$PY" -c "
import aim_ext, aim_ext._C as C, aim_ext.ops as ops
assert aim_ext.__file__.startswith('$scratch/'), aim_ext.__file__
assert C.__file__ == '$so', C.__file__
assert ops.kernels_available()['cpu'], ops.kernels_available()
print('aim_ext from', aim_ext.__file__, 'kernels', ops.kernels_available())
" >"$OUT/check.log" 2>&1
ok=$?
cat "$OUT/check.log"
record "loads the sanitized build" $([ $ok -eq 0 ] && echo 1 || echo 0) 0 "$(tail -n 1 "$OUT/check.log")"

tests=("$@")
[ ${#tests[@]} -gt 0 ] || tests=("${OP_TESTS[@]}")
start=$SECONDS
sanitized "$OUT/reports-tests" "$PY" "${PYTEST[@]}" -ra --tb=short --durations=10 "${tests[@]}" \
  >"$OUT/tests.log" 2>&1
rc=$?
reports=$(reports_in "$OUT/reports-tests" "$OUT/tests.log" | wc -l)
result=$(grep -E "passed|failed|error" "$OUT/tests.log" | tail -n 1)
record "op tests" $([ $rc -eq 0 ] && [ "$reports" -eq 0 ] && echo 1 || echo 0) $((SECONDS - start)) \
  "exit $rc, $reports sanitizer reports; ${result:-no pytest summary (the process died)}"
tail -n 25 "$OUT/tests.log"
for report in "$OUT"/reports-tests/*; do [ -f "$report" ] && head -n 40 "$report"; done
grep -A 30 "runtime error:" "$OUT/tests.log" | head -n 60

# The self-test: each injected defect must stop the victim test with the expected report.
cp "$scratch/$VICTIM" "$scratch/$VICTIM.orig"
inject() {  # inject NAME SED_SCRIPT EXPECTED: break VICTIM with SED_SCRIPT, rebuild, expect EXPECTED
  local name=$1 script=$2 expected=$3 start=$SECONDS
  sed "$script" "$scratch/$VICTIM.orig" >"$scratch/$VICTIM"
  if cmp -s "$scratch/$VICTIM" "$scratch/$VICTIM.orig"; then
    record "self-test: $name" 0 0 "the injection no longer matches $VICTIM"
    return
  fi
  if ! build "$OUT/build-$name.log"; then
    record "self-test: $name" 0 $((SECONDS - start)) "the injected build failed: see $OUT/build-$name.log"
    return
  fi
  sanitized "$OUT/reports-$name" "$PY" "${PYTEST[@]}" -x "${VICTIM_TEST[@]}" >"$OUT/self-test-$name.log" 2>&1
  local rc=$?
  local found
  found=$(reports_in "$OUT/reports-$name" "$OUT/self-test-$name.log" | head -n 1)
  record "self-test: $name" $([ $rc -eq 134 ] && grep -q "$expected" <<<"$found" && echo 1 || echo 0) \
    $((SECONDS - start)) "exit $rc; ${found:-no report}"
}
# The mask's loop runs one element past the end: a read of the pre-activation, a write of the mask.
inject out-of-bounds 's/for (int64_t i = 0; i < g.N \* HW; ++i) mask\[i\]/for (int64_t i = 0; i <= g.N * HW; ++i) mask[i]/' \
  "heap-buffer-overflow"
# A signed 64-bit overflow on the way to the mask's first element.
inject signed-overflow 's/^\(  for (int64_t i = 0; i < g.N \* HW; ++i) mask\[i\].*\)$/\1\n  { volatile int64_t big = INT64_MAX; mask[0] = static_cast<scalar_t>(big + g.N > 0 ? 1 : 0); }/' \
  "signed integer overflow"
# The kept tree's next build must recompile the victim, whatever the mtimes say.
cp "$scratch/$VICTIM.orig" "$scratch/$VICTIM" && rm -f "$scratch/$VICTIM.orig"
find "$scratch/build" -name "$(basename "$VICTIM" .cpp).o" -delete

echo
echo "Sanitizers ($SANITIZE) on the CPU kernels, commit $commit"
echo "| step | result | time | detail |"
echo "|---|---|---|---|"
printf '%s\n' "${summary[@]}"
exit $failed
