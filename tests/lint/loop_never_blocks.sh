#!/bin/sh
# loop_never_blocks.sh - the ban list for code that runs on the event-loop
# thread (worker/loop/), in the style of curl's checksrc banfunc lists. The
# run-time twin of this check is PGR_ASSERT_OFF_LOOP().
#
# Usage: loop_never_blocks.sh PATH...  checks each file, and DIR/*.c and
#                                      DIR/*.h of each directory
#        loop_never_blocks.sh --rules  lists the rules
# Exit 0 when clean, 1 with one line per finding, 2 on bad usage.
#
# Calls are looked for in the code with comments and string literals
# blanked out (so a comment may name what it avoids), a name followed by
# "(" with no letter, digit or "_" before it (uv_getaddrinfo is not
# getaddrinfo). Includes are read from #include lines.
#
# Rules (each has a failing fixture in tests/lint/fixtures/<rule>/):
#   libc-lookup    name service lookups: DNS, NSS (they may wait on the
#                  network: getaddrinfo, gethostbyname, getpwnam, ...)
#   libc-file      file I/O (fopen, fread, fwrite, fgets, open, stat,
#                  dlopen, ...)
#   libc-sync      flushing to disk (fsync, fdatasync, sync, ...)
#   libc-sleep     sleep, usleep, nanosleep, clock_nanosleep, pause
#   libc-process   system, popen, pclose, wait, waitpid, ...
#   libc-wait      waiting on threads, locks or descriptors outside libuv
#                  (pthread_join, pthread_cond_wait, sem_wait, poll,
#                  select, epoll_wait, flock, ...)
#   uv-wait        uv_sleep, uv_cond_wait, uv_cond_timedwait,
#                  uv_thread_join, uv_sem_wait, uv_barrier_wait
#   uv-sync-request  a libuv request run synchronously: uv_fs_* with a NULL
#                  (or 0) callback as its last argument, uv_getaddrinfo and
#                  uv_getnameinfo with one as their third, uv_random with
#                  one as its sixth (calls may span lines)
#   pq-blocking    libpq calls that wait for the server: PQexec*,
#                  PQprepare, PQdescribe*, PQconnectdb*, PQsetdbLogin,
#                  PQreset, PQping*, PQcancel, PQgetCancel, PQfn,
#                  PQsetClientEncoding, PQencryptPasswordConn, ...
#   pq-getresult   PQgetResult( unless the same line or one of the three
#                  code lines above it tests "!PQisBusy(": only then can it
#                  not wait (libpq: PQgetResult blocks while PQisBusy)
#   blocking-header  #include of "db.h", "cli/cli.h", anything under
#                  "jobs/", or libesmtp.h: the blocking side's declarations
#   project-call   a call of a function declared in worker/db.h,
#                  worker/cli/cli.h or worker/jobs/*.h (read from those
#                  headers at each run), or of smtp_start_session
#
# An exception names its rule and gives a reason, on the line itself or in
# a comment alone on the line above:
#   foo(x); /* lint-ok(libc-file): before the loop starts */
# A bare "lint-ok", one for another rule or one without a reason exempts
# nothing.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
worker=$here/../../worker

if [ "${1:-}" = "--rules" ]; then
  sed -n 's/^#   \([a-z][a-z-]*\) .*/\1/p' "$0"
  exit 0
fi
[ $# -gt 0 ] || { echo "usage: loop_never_blocks.sh PATH... | --rules" >&2; exit 2; }

# Blank out comments and string/char literals, keeping columns and lines.
strip='
function strip(line,    out, i, n, c, q) {
  out = ""; n = length(line); i = 1
  while (i <= n) {
    c = substr(line, i, 1)
    if (incomment) {
      if (substr(line, i, 2) == "*/") { incomment = 0; out = out "  "; i += 2 }
      else { out = out " "; i++ }
      continue
    }
    if (substr(line, i, 2) == "/*") { incomment = 1; out = out "  "; i += 2; continue }
    if (substr(line, i, 2) == "//") break
    if (c == "\"" || c == "\047") {
      q = c; out = out c; i++
      while (i <= n && substr(line, i, 1) != q) {
        if (substr(line, i, 1) == "\\") { out = out " "; i++ }
        out = out " "; i++
      }
      out = out q; i++
      continue
    }
    out = out c; i++
  }
  return out
}'

# The blocking side's functions, from its headers (declarations only).
project=$(awk "$strip"'
  FNR == 1 { incomment = 0 }
  {
    s = strip($0)
    while (match(s, /pgr_[a-z0-9_]+[ \t]*\(/)) {
      name = substr(s, RSTART, RLENGTH)
      sub(/[ \t]*\($/, "", name)
      if (!(name in seen)) { seen[name] = 1; printf "%s%s", sep, name; sep = "|" }
      s = substr(s, RSTART + RLENGTH)
    }
  }' "$worker/db.h" "$worker/cli/cli.h" "$worker"/jobs/*.h)
[ -n "$project" ] || { echo "loop_never_blocks: no functions in $worker/db.h" >&2; exit 2; }

files=""
for p in "$@"; do
  [ "$p" = / ] || p=${p%/}
  if [ -d "$p" ]; then
    for f in "$p"/*.c "$p"/*.h; do [ -e "$f" ] && files="$files $f"; done
  elif [ -f "$p" ]; then
    files="$files $p"
  else
    echo "loop_never_blocks: no such file or directory: $p" >&2
    exit 2
  fi
done
[ -n "$files" ] || { echo "loop_never_blocks: no C files in $*" >&2; exit 2; }

# shellcheck disable=SC2086
awk -v project="$project" "$strip"'
function rule(name, names, why) {
  nrules++
  rname[nrules] = name
  rre[nrules] = "(^|[^A-Za-z0-9_])(" names ")[ \t]*\\("
  rwhy[nrules] = why
}
BEGIN {
  rule("libc-lookup", "getaddrinfo|gethostbyname|gethostbyname2|gethostbyname_r|gethostbyname2_r|gethostbyaddr|gethostbyaddr_r|getnameinfo|getservbyname|getservbyport|res_query|res_search|res_nquery|res_nsearch|getpwnam|getpwnam_r|getpwuid|getpwuid_r|getgrnam|getgrgid|getgrouplist",
       "a name lookup may wait on the network; resolve on the thread pool")
  rule("libc-file", "fopen|fdopen|freopen|fread|fwrite|fgets|getline|getdelim|fscanf|open|openat|creat|opendir|readdir|dlopen|stat|lstat|access|truncate|rename|unlink|mkdir|rmdir|realpath",
       "file I/O blocks; do it before the loop starts or off the loop")
  rule("libc-sync", "fsync|fdatasync|sync|syncfs|msync",
       "flushing to disk blocks")
  rule("libc-sleep", "sleep|usleep|nanosleep|clock_nanosleep|pause",
       "a sleep stops the loop; use a uv_timer_t")
  rule("libc-process", "system|popen|pclose|wait|waitpid|waitid|wait3|wait4",
       "running or waiting for a process blocks")
  rule("libc-wait", "pthread_join|pthread_cond_wait|pthread_cond_timedwait|sem_wait|sem_timedwait|poll|ppoll|select|pselect|epoll_wait|flock|lockf",
       "the loop waits only inside uv_run")
  rule("uv-wait", "uv_sleep|uv_cond_wait|uv_cond_timedwait|uv_thread_join|uv_sem_wait|uv_barrier_wait",
       "a blocking libuv primitive stops the loop")
  rule("pq-blocking", "PQexec|PQexecParams|PQexecPrepared|PQprepare|PQdescribePrepared|PQdescribePortal|PQclosePrepared|PQclosePortal|PQconnectdb|PQconnectdbParams|PQsetdbLogin|PQsetdb|PQreset|PQping|PQpingParams|PQcancel|PQgetCancel|PQrequestCancel|PQcancelBlocking|PQfn|PQsetClientEncoding|PQencryptPasswordConn|PQchangePassword|PQgetline|PQputline|PQputnbytes|PQendcopy",
       "a blocking libpq call; use PQsend*/PQconnectStart/PQconnectPoll")
  rule("project-call", project "|smtp_start_session",
       "a function of the blocking side (db.h, cli/cli.h, jobs/, libesmtp)")
  ok_re = "lint-ok\\([a-z-]+\\):[ \t]*[^ \t*]"
}
function report(line, r, why, text) {
  printf "%s:%d: [%s] %s\n    %s\n", file, line, r, why, text
  found++
}
function exempt_text(text, r) {
  return index(text, "lint-ok(" r "):") > 0 && match(text, ok_re)
}
# An exception on the line itself or alone on the line above.
function exempt(line, r) {
  return exempt_text(raw[line], r) ||
         (line > 1 && code[line - 1] ~ /^[ \t]*$/ && exempt_text(raw[line - 1], r))
}
# The argument at position pos (1-based; 0: the last) of the call whose
# "(" is at offset p of s; "" if the call does not close.
function arg(s, p, pos,    depth, i, c, n, a, cur) {
  depth = 0; n = 1; cur = ""
  for (i = p; i <= length(s); i++) {
    c = substr(s, i, 1)
    if (c == "(") { depth++; if (depth == 1) continue }
    else if (c == ")") {
      depth--
      if (depth == 0) { a[n] = cur; break }
    } else if (c == "," && depth == 1) { a[n++] = cur; cur = ""; continue }
    cur = cur c
  }
  if (depth != 0) return ""
  if (pos == 0) pos = n
  if (pos > n) return ""
  gsub(/[ \t\n]/, "", a[pos])
  return a[pos]
}
function check_file(    s, i, name, namepos, pre, line, base, rest, cb, pos, used) {
  s = ""
  for (i = 1; i <= nlines; i++) s = s code[i] "\n"
  base = 0
  while (match(s, /(^|[^A-Za-z0-9_])(uv_fs_[a-z_]+|uv_getaddrinfo|uv_getnameinfo|uv_random)[ \t\n]*\(/)) {
    namepos = substr(s, RSTART, 3) == "uv_" ? RSTART : RSTART + 1
    name = substr(s, namepos, RSTART + RLENGTH - namepos)
    sub(/[ \t\n]*\($/, "", name)
    pre = substr(s, 1, namepos - 1)
    line = base + gsub(/\n/, "", pre) + 1
    rest = substr(s, RSTART + RLENGTH - 1)
    used = substr(s, 1, RSTART + RLENGTH - 1)
    base += gsub(/\n/, "", used)
    s = substr(s, RSTART + RLENGTH)
    if (name ~ /^uv_fs_(event_|poll_|req_cleanup|get_)/) continue
    pos = name ~ /^uv_fs_/ ? 0 : name == "uv_random" ? 6 : 3
    cb = arg(rest, 1, pos)
    if ((cb == "NULL" || cb == "0") && !exempt(line, "uv-sync-request"))
      report(line, "uv-sync-request", name " without a callback runs synchronously", raw[line])
  }
}
FNR == 1 {
  if (NR > 1) check_file()
  incomment = 0; nlines = 0; file = FILENAME
}
{
  raw[FNR] = $0
  code[FNR] = strip($0)
  nlines = FNR
  c = code[FNR]
  if (c ~ /^[ \t]*#[ \t]*include/) {
    if ($0 ~ /include[ \t]*["<](\.\.\/)*(db\.h|cli\/cli\.h|jobs\/|libesmtp\.h)/ &&
        !exempt(FNR, "blocking-header"))
      report(FNR, "blocking-header", "a header of the blocking side", $0)
    next
  }
  for (r = 1; r <= nrules; r++)
    if (c ~ rre[r] && !exempt(FNR, rname[r]))
      report(FNR, rname[r], rwhy[r], $0)
  if (c ~ /(^|[^A-Za-z0-9_])PQgetResult[ \t]*\(/ && !exempt(FNR, "pq-getresult")) {
    guarded = 0
    for (k = FNR; k >= 1 && k >= FNR - 3; k--)
      if (code[k] ~ /![ \t]*PQisBusy[ \t]*\(/) guarded = 1
    if (!guarded)
      report(FNR, "pq-getresult", "PQgetResult waits unless !PQisBusy() was tested just above", $0)
  }
}
END {
  if (NR > 0) check_file()
  exit found ? 1 : 0
}' $files && status=0 || status=$?
if [ "$status" -eq 0 ]; then
  echo "loop_never_blocks: $(echo $files | wc -w) files clean"
else
  echo "loop_never_blocks: code that may block the event-loop thread"
fi
exit "$status"
