#!/usr/bin/env bash
# Run a pgrunner worker from a fresh Debian 12 machine, in one command:
# installs what is missing, builds, starts a local PostgreSQL under
# .pgdata/ when no database is configured, starts a local mail catcher when
# no SMTP server is configured, migrates, and runs a worker.
#
#   ./run.sh [pgrunner work options...]
#
# A database is "configured" when DATABASE_URL, PGRUNNER_DB or PGHOST is set;
# otherwise the embedded one is used (port 54329, socket in .pgdata/).
# An SMTP server is configured when PGRUNNER_SMTP_HOST is set; otherwise
# aiosmtpd (Debian's python3-aiosmtpd) listens on 127.0.0.1:54325 and
# writes every message it gets into the Maildir .pgdata/mail/, and the
# worker sends there as PGRUNNER_MAIL_FROM (default pgrunner@localhost).
# Ctrl-C stops the worker and leaves the embedded PostgreSQL and the catcher
# running for the next run; stop them with
#   pg_ctl -D .pgdata/data stop   (as the postgres user when root)
#   kill "$(cat .pgdata/smtp.pid)"
#
# For tests and side-by-side copies: PGRUNNER_DATA_DIR (instead of
# .pgdata), PGRUNNER_PG_PORT (54329), PGRUNNER_CATCHER_PORT (54325), and
# PGRUNNER_BIN (run this binary instead of building build/pgrunner).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
DATA_DIR=${PGRUNNER_DATA_DIR:-$ROOT/.pgdata}
PG_PORT=${PGRUNNER_PG_PORT:-54329}
CATCHER_PORT=${PGRUNNER_CATCHER_PORT:-54325}

PACKAGES="build-essential cmake pkg-config libpq-dev libuv1-dev libesmtp-dev libmicrohttpd-dev libcurl4-openssl-dev
  libjansson-dev libssl-dev libcriterion-dev postgresql-15
  postgresql-client-15 python3 python3-aiosmtpd"
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo_ apt-get update -q
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends $missing
fi

if [ -n "${PGRUNNER_BIN:-}" ]; then
  PGRUNNER=$PGRUNNER_BIN
else
  cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_TESTS=OFF \
    >/dev/null
  cmake --build build -j"$(nproc)" >/dev/null
  PGRUNNER=build/pgrunner
fi

if [ -z "${DATABASE_URL:-}${PGRUNNER_DB:-}${PGHOST:-}" ]; then
  PGBIN=/usr/lib/postgresql/15/bin
  DATA="$DATA_DIR/data"
  as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
  }
  mkdir -p "$DATA_DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$DATA_DIR"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$DATA" --auth=trust -E UTF8 --locale=C.UTF-8 \
      -U postgres >/dev/null
    cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$DATA_DIR'
CONF
  fi
  if ! as_pg "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$DATA_DIR/server.log" -w start \
      >/dev/null
  fi
  export DATABASE_URL="postgresql://postgres@127.0.0.1:$PG_PORT/postgres"
  echo "pgrunner: using the embedded PostgreSQL: $DATABASE_URL"
fi

if [ -z "${PGRUNNER_SMTP_HOST:-}" ]; then
  # A local catcher, so that email tasks deliver somewhere real: aiosmtpd's
  # Mailbox handler writes each message into a Maildir (new/ holds one file
  # per message). Kept running between runs, like the embedded database.
  MAILDIR="$DATA_DIR/mail"
  mkdir -p "$MAILDIR/tmp" "$MAILDIR/new" "$MAILDIR/cur"
  pidfile="$DATA_DIR/smtp.pid"
  if ! { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }; then
    nohup /usr/bin/python3 -m aiosmtpd -n -l "127.0.0.1:$CATCHER_PORT" \
      -c aiosmtpd.handlers.Mailbox "$MAILDIR" \
      >>"$DATA_DIR/smtp.log" 2>&1 </dev/null &
    echo $! >"$pidfile"
    for _ in $(seq 100); do
      (exec 3<>"/dev/tcp/127.0.0.1/$CATCHER_PORT") 2>/dev/null && break
      kill -0 "$(cat "$pidfile")" 2>/dev/null || break
      sleep 0.1
    done
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$CATCHER_PORT") 2>/dev/null; then
      echo "pgrunner: the mail catcher did not start; see $DATA_DIR/smtp.log" >&2
      exit 1
    fi
  fi
  export PGRUNNER_SMTP_HOST=127.0.0.1 PGRUNNER_SMTP_PORT=$CATCHER_PORT
  export PGRUNNER_MAIL_FROM=${PGRUNNER_MAIL_FROM:-pgrunner@localhost}
  echo "pgrunner: no PGRUNNER_SMTP_HOST: email goes to a local catcher on"
  echo "  127.0.0.1:$CATCHER_PORT, one file per message in $MAILDIR/new/"
  echo "  read them with: cat $MAILDIR/new/*   (or: mutt -f $MAILDIR)"
  echo "  stop it with: kill \$(cat $pidfile)"
else
  echo "pgrunner: email goes to $PGRUNNER_SMTP_HOST:${PGRUNNER_SMTP_PORT:-25}"
fi

# GnuTLS (pulled in by libpq through libldap) initialises itself when it is
# loaded unless told not to; pgrunner never uses it. Saves ~750 KiB RSS.
export GNUTLS_NO_IMPLICIT_INIT=1
"$PGRUNNER" migrate
# The README's examples, with this run's database (in an unquoted here-doc
# a backslash before " stays, as the shell line needs it).
cat <<EOF
pgrunner: add a task from another shell, e.g.
  psql "${DATABASE_URL:-}" -c "INSERT INTO pgrunner.tasks (kind) VALUES ('noop')"
  psql "${DATABASE_URL:-}" -c "INSERT INTO pgrunner.tasks (kind, payload) VALUES ('email', '{\"to\": \"ada@example.com\", \"subject\": \"Hello\", \"text\": \"It works.\"}')"
EOF
exec "$PGRUNNER" work "$@"
