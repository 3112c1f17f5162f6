#!/usr/bin/env bash
# Run a pgrunner worker from a fresh Debian 12 machine, in one command:
# installs what is missing, builds, starts a local PostgreSQL under
# .pgdata/ when no database is configured, migrates, and runs a worker.
#
#   ./run.sh [pgrunner work options...]
#
# A database is "configured" when DATABASE_URL, PGRUNNER_DB or PGHOST is set;
# otherwise the embedded one is used (port 54329, socket in .pgdata/).
# Ctrl-C stops the worker (and leaves the embedded PostgreSQL running; stop
# it with: pg_ctl -D .pgdata/data stop, as the postgres user when root).
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)

PACKAGES="build-essential cmake pkg-config libpq-dev libuv1-dev libesmtp-dev libmicrohttpd-dev
  libjansson-dev libssl-dev libcriterion-dev postgresql-15
  postgresql-client-15"
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=""
for p in $PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  sudo_ apt-get update -q
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends $missing
fi

cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo -DPGR_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" >/dev/null

if [ -z "${DATABASE_URL:-}${PGRUNNER_DB:-}${PGHOST:-}" ]; then
  PGBIN=/usr/lib/postgresql/15/bin
  DATA="$ROOT/.pgdata/data"
  as_pg() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
  }
  mkdir -p "$ROOT/.pgdata"
  [ "$(id -u)" = 0 ] && chown postgres "$ROOT/.pgdata"
  if [ ! -f "$DATA/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$DATA" --auth=trust -E UTF8 --locale=C.UTF-8 \
      -U postgres >/dev/null
    cat >> "$DATA/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = 54329
unix_socket_directories = '$ROOT/.pgdata'
CONF
  fi
  if ! as_pg "$PGBIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$ROOT/.pgdata/server.log" -w start \
      >/dev/null
  fi
  export DATABASE_URL="postgresql://postgres@127.0.0.1:54329/postgres"
  echo "pgrunner: using the embedded PostgreSQL: $DATABASE_URL"
fi

# GnuTLS (pulled in by libpq through libldap) initialises itself when it is
# loaded unless told not to; pgrunner never uses it. Saves ~750 KiB RSS.
export GNUTLS_NO_IMPLICIT_INIT=1
build/pgrunner migrate
echo "pgrunner: add a task from another shell, e.g."
echo "  psql \"${DATABASE_URL:-}\" -c \"INSERT INTO pgrunner.tasks (kind) VALUES ('noop')\""
exec build/pgrunner work "$@"
