#!/bin/sh
# Fails if code that runs on the event-loop thread (worker/loop/) names a
# blocking call, in the spirit of curl's checksrc banfunc list. The run-time
# twin of this check is PGR_ASSERT_OFF_LOOP().
dir=${1:?usage: loop_never_blocks.sh DIR}
banned='PQexec\b|PQexecParams|PQexecPrepared|PQprepare\b|PQconnectdb|PQconnectdbParams|PQsetdbLogin|PQreset\(|PQping|PQcancel\(|PQgetCancel|smtp_start_session|\bsleep\(|usleep\(|nanosleep\(|fsync\(|"db\.h"|"jobs/'
hits=$(grep -nE "$banned" "$dir"/*.c "$dir"/*.h 2>/dev/null | grep -v 'lint-ok')
if [ -n "$hits" ]; then
  echo "blocking calls named in $dir (the loop thread must never block):"
  echo "$hits"
  exit 1
fi
echo "loop_never_blocks: $(ls "$dir"/*.c | wc -l) files clean"
