#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what is
# missing, builds three ways and runs ctest.
#
#   build/       release build: unit tests and the loop lint
#   build-asan/  AddressSanitizer + UndefinedBehaviorSanitizer: unit tests and
#                every integration test (real PostgreSQL, real SMTP, the real
#                binary)
#   build-tsan/  ThreadSanitizer: the integration tests that exercise the
#                hand-off between the loop and the worker threads
#   build-fuzz/  clang + libFuzzer: a few seconds of each fuzz target
#
# A sanitizer report makes the worker abort, which fails the test that ran it.
# Usage: tests/run.sh [--quick]   (--quick: skip the TSan pass)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES="build-essential cmake pkg-config libpq-dev libuv1-dev libesmtp-dev libmicrohttpd-dev libcurl4-openssl-dev
  libjansson-dev libssl-dev libcriterion-dev
  postgresql-15 postgresql-client-15 python3 python3-pytest python3-psycopg2
  python3-aiosmtpd python3-websocket chromium openssl pgbouncer
  clang libclang-rt-14-dev clang-format locales"

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

missing=""
for p in $PACKAGES; do
  dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "== installing:$missing"
  sudo_ apt-get update -q
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends $missing
fi

jobs=$(nproc)
build() {
  local dir=$1; shift
  echo "== building $dir"
  cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo "$@" >/dev/null
  cmake --build "$dir" -j"$jobs" >/dev/null
}

build build
build build-asan -DPGR_SANITIZE=address
quick=0
[ "${1:-}" = "--quick" ] && quick=1
[ $quick = 1 ] || build build-tsan -DPGR_SANITIZE=thread

# LeakSanitizer is on: a leak in our code fails the test that ran it.
# tests/lsan.supp lists only leaks inside libraries we do not own.
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export LSAN_OPTIONS="suppressions=$PWD/tests/lsan.supp"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"

status=0
echo "== release build: unit tests and lint"
(cd build && ctest --output-on-failure -L unit) || status=1
echo "== format: every C file as clang-format writes it (tests/lint/check_format.sh)"
sh tests/lint/check_format.sh || status=1
echo "== fuzz targets: a short smoke run (tests/fuzz/run.sh)"
tests/fuzz/run.sh 7 || status=1
echo "== ASan+UBSan build: unit and integration tests"
(cd build-asan && ctest --output-on-failure -j"$jobs") || status=1
if [ $quick = 0 ]; then
  echo "== TSan build: worker integration tests"
  (cd build-tsan && ctest --output-on-failure -j"$jobs" \
     -R 'integration\.(test_worker|test_faults|test_attempt_faults|test_cancel|test_logging|test_http|test_http_kind|test_multihost|test_poolers|test_flow|test_prepared)$') || status=1
fi
exit $status
