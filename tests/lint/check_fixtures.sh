#!/bin/sh
# check_fixtures.sh - the lint's own test: every rule of
# loop_never_blocks.sh has a fixture directory, every fixture file there
# fails the lint for that rule and no other, the accepted patterns in
# allowed/ pass, and so does the real worker/loop/.
# Usage: check_fixtures.sh [LOOP_DIR]   (default: worker/loop of this tree)
set -u
here=$(cd "$(dirname "$0")" && pwd)
lint=$here/loop_never_blocks.sh
loopdir=${1:-$here/../../worker/loop}
failed=0
fail() { echo "FAIL: $*"; failed=$((failed + 1)); }

rules=$(sh "$lint" --rules)
[ -n "$rules" ] || fail "the lint lists no rules"
for rule in $rules; do
  dir=$here/fixtures/$rule
  n=0
  for f in "$dir"/*.c; do
    [ -e "$f" ] || continue
    n=$((n + 1))
    out=$(sh "$lint" "$f" 2>&1)
    rc=$?
    if [ $rc -ne 1 ]; then
      fail "$rule: $f: exit $rc, want 1"; echo "$out"; continue
    fi
    if ! echo "$out" | grep -q "\[$rule\]"; then
      fail "$rule: $f: not reported under [$rule]"; echo "$out"; continue
    fi
    other=$(echo "$out" | grep -o '\[[a-z-]*\]' | grep -v "^\[$rule\]$" | sort -u)
    [ -z "$other" ] || { fail "$rule: $f: also reported $other"; echo "$out"; }
  done
  [ $n -gt 0 ] || fail "$rule: no fixture in $dir"
done
for d in "$here"/fixtures/*/; do
  r=$(basename "$d")
  echo "$rules" | grep -qx "$r" || fail "fixtures/$r names no rule of the lint"
done

out=$(sh "$lint" "$here/allowed" 2>&1) || { fail "allowed/ is rejected"; echo "$out"; }
out=$(sh "$lint" "$loopdir" 2>&1) || { fail "$loopdir is rejected"; echo "$out"; }

if [ $failed -gt 0 ]; then
  echo "check_fixtures: $failed failure(s)"
  exit 1
fi
echo "check_fixtures: $(echo $rules | wc -w) rules, each fixture fails for its rule; allowed/ and $loopdir pass"
