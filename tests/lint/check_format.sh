#!/bin/sh
# check_format.sh - fails when a C file under worker/, include/, tests/unit/
# or tests/fuzz/ differs from what clang-format makes of it with the
# repository's .clang-format. It changes nothing: it names each file that
# differs, with the number of differing lines, and with -v shows the diff.
#
# Usage: check_format.sh [-v]
#   CLANG_FORMAT=clang-format-14 check_format.sh   another binary
# Exit 0 when every file matches, 1 when any differs, 2 when clang-format
# is missing. To fix a file: clang-format -i FILE.
set -u
cd "$(dirname "$0")/../.." || exit 2
verbose=0
[ "${1:-}" = "-v" ] && verbose=1
cf=${CLANG_FORMAT:-clang-format}
if ! command -v "$cf" >/dev/null 2>&1; then
  echo "check_format: $cf not found (Debian package clang-format)" >&2
  exit 2
fi
[ -f .clang-format ] || { echo "check_format: no .clang-format" >&2; exit 2; }

tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
files=0
bad=0
lines=0
# Tracked files and new ones not ignored, as they are in the working tree.
for f in $( (git ls-files --cached --others --exclude-standard -- \
               worker include tests/unit tests/fuzz 2>/dev/null ||
             find worker include tests/unit tests/fuzz -type f) |
           grep -E '\.[ch]$' | sort -u); do
  [ -f "$f" ] || continue
  files=$((files + 1))
  if ! "$cf" --style=file "$f" >"$tmp" 2>/dev/null; then
    echo "$f: clang-format failed"
    bad=$((bad + 1))
    continue
  fi
  if ! cmp -s "$f" "$tmp"; then
    n=$(diff "$f" "$tmp" | grep -c '^[<>]')
    echo "$f: $n lines differ"
    [ $verbose = 1 ] && diff -u "$f" "$tmp" | sed "s|$tmp|$f (clang-format)|"
    bad=$((bad + 1))
    lines=$((lines + n))
  fi
done
if [ $bad -gt 0 ]; then
  echo "check_format: $bad of $files files differ from clang-format" \
       "($lines lines); run: clang-format -i FILE"
  exit 1
fi
echo "check_format: $files files match clang-format"
exit 0
