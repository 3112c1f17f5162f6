#!/usr/bin/env bash
# Builds the libFuzzer targets (clang, -DPGR_FUZZ=ON, into build-fuzz/) and
# runs each for a bounded time. First every file under
# tests/fuzz/<target>/regressions/ (crashes found before, kept) and
# <target>/corpus/ is replayed; then the target fuzzes from its corpus,
# which stays read-only: new inputs go to a temporary directory. Any crash,
# broken invariant, leak, timeout or out-of-memory fails the run; the
# input that did it is kept under build-fuzz/artifacts/.
#
# Usage: tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#   tests/fuzz/run.sh 5            the CI smoke run
#   tests/fuzz/run.sh 600          the long run (README: Fuzzing)
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
shift || true
build=${PGR_FUZZ_BUILD:-build-fuzz}

CC=clang cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPGR_FUZZ=ON -DPGR_TESTS=OFF >/dev/null
cmake --build "$build" -j"$(nproc)" >/dev/null

if [ $# -gt 0 ]; then
  targets="$*"
else
  targets=$(cd tests/fuzz && ls -d */ | tr -d /)
fi

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$build/artifacts"
status=0
for t in $targets; do
  bin="$build/fuzz_$t"
  dir="tests/fuzz/$t"
  opts=(-timeout=10 -rss_limit_mb=2048 -max_len=8192
        -artifact_prefix="$build/artifacts/$t-")
  [ -f "$dir/dict" ] && opts+=(-dict="$dir/dict")
  log="$tmp/$t.log"
  # Replay: regressions and seeds, each input once.
  inputs=$(find "$dir/regressions" "$dir/corpus" -type f 2>/dev/null | sort || true)
  if [ -n "$inputs" ]; then
    # shellcheck disable=SC2086
    if ! "$bin" "${opts[@]}" $inputs >"$log" 2>&1; then
      echo "== fuzz $t: a kept input fails"; tail -40 "$log"; status=1
      continue
    fi
  fi
  mkdir -p "$tmp/$t"
  if "$bin" "${opts[@]}" -max_total_time="$secs" -print_final_stats=1 \
      "$tmp/$t" "$dir/corpus" >"$log" 2>&1; then
    echo "== fuzz $t: ok, $(grep -o 'stat::number_of_executed_units: *[0-9]*' \
      "$log" | grep -o '[0-9]*$') runs in ${secs}s"
  else
    echo "== fuzz $t: FAILED (input in $build/artifacts/)"; tail -40 "$log"
    status=1
  fi
done
exit $status
