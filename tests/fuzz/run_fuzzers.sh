#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang
# (-fsanitize=fuzzer,address,undefined) in their own build dir and runs each
# for a bounded time from its seed corpus (tests/fuzz/corpus/<target>/).
# Fails if a build fails or any target finds a crash, leak, sanitizer report
# or broken invariant; the crashing input is left in <build-dir>/artifacts/.
#
# usage: run_fuzzers.sh [--build-only] [BUILD_DIR]   (default: <repo>/build-fuzz)
# env:   FUZZ_SECONDS   seconds per target (default 20)
#        FUZZ_TARGETS   space-separated subset (default: all three)
#        CC, CXX        clang compilers (default clang, clang++)
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
BUILD_ONLY=0
if [[ ${1:-} == --build-only ]]; then BUILD_ONLY=1; shift; fi
BUILD=${1:-$ROOT/build-fuzz}
SECONDS_EACH=${FUZZ_SECONDS:-20}
TARGETS=${FUZZ_TARGETS:-"safetensors_header wan_config request_validation"}
export CC=${CC:-clang} CXX=${CXX:-clang++}

if [[ ! -f "$BUILD/build.ninja" ]]; then
  cmake -S "$HERE" -B "$BUILD" -G Ninja -DCMAKE_C_COMPILER="$CC" -DCMAKE_CXX_COMPILER="$CXX" >/dev/null
fi
cmake --build "$BUILD" -j2
if [[ $BUILD_ONLY == 1 ]]; then exit 0; fi

failed=()
for t in $TARGETS; do
  bin="$BUILD/${t}_fuzz"
  work="$BUILD/corpus/$t"   # new inputs land here, never in the committed seeds
  mkdir -p "$work" "$BUILD/artifacts"
  echo "== fuzz $t for ${SECONDS_EACH}s"
  # -rss_limit_mb: headroom for ASan; -timeout: a single input taking longer is a bug.
  if ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
     "$bin" -max_total_time="$SECONDS_EACH" -timeout=10 -rss_limit_mb=2048 -max_len=4096 \
            -print_final_stats=1 -artifact_prefix="$BUILD/artifacts/${t}-" \
            "$work" "$HERE/corpus/$t" >"$BUILD/$t.log" 2>&1; then
    grep -E "^(Done|stat::number_of_executed_units)" "$BUILD/$t.log" || true
  else
    echo "!! $t failed; log: $BUILD/$t.log"
    tail -n 40 "$BUILD/$t.log"
    failed+=("$t")
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz: FAILED: ${failed[*]}"
  exit 1
fi
echo "fuzz: all targets ran ${SECONDS_EACH}s without a finding"
