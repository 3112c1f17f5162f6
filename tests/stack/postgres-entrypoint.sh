#!/bin/bash
# postgres-entrypoint.sh - the stack's PostgreSQL: at the first start,
# creates the cluster in $PGDATA with the user, password and database given
# by POSTGRES_USER, POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE) and
# POSTGRES_DB, as the official image does; then runs the server, listening
# on every address, password (SCRAM) authentication over TCP.
#
# Runs as the postgres user. The password comes from the environment at run
# time and is never written into the image.
set -euo pipefail

if [[ ${1:-} != postgres ]]; then
  exec "$@"
fi

user=${POSTGRES_USER:-postgres}
db=${POSTGRES_DB:-$user}
if [[ -n ${POSTGRES_PASSWORD_FILE:-} ]]; then
  POSTGRES_PASSWORD=$(<"$POSTGRES_PASSWORD_FILE")
fi
unset POSTGRES_PASSWORD_FILE

if [[ ! -s $PGDATA/PG_VERSION ]]; then
  if [[ -z ${POSTGRES_PASSWORD:-} ]]; then
    echo "postgres-entrypoint: POSTGRES_PASSWORD is not set" >&2
    exit 1
  fi
  pwfile=$(mktemp)
  trap 'rm -f "$pwfile"' EXIT
  printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
  initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" --encoding=UTF8 \
    --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
  if [[ $db != postgres ]]; then
    # Single-user mode: no server, no socket, nothing to wait for.
    printf 'CREATE DATABASE "%s" OWNER "%s";\n' "${db//\"/\"\"}" \
      "${user//\"/\"\"}" | postgres --single -j -D "$PGDATA" postgres >/dev/null
  fi
  echo "postgres-entrypoint: created cluster with database \"$db\""
fi
unset POSTGRES_PASSWORD

shift
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"
