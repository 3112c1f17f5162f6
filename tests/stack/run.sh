#!/bin/bash
# run.sh - the container test stack in one command: builds the worker image
# and the stack's images, brings up docker-compose.yml (PostgreSQL, the SMTP
# catcher, migrate, two worker replicas), runs its `tests` service, prints
# "N passed, N failed" and tears everything down, whatever the outcome.
#
# From a Debian 12 machine with nothing else: installs docker.io,
# docker-compose and debootstrap when they are missing; starts a private
# dockerd when no Docker daemon answers (and stops it at the end); uses
# debian:bookworm-slim when it is present or can be pulled, else builds a
# Debian base image locally with debootstrap.
#
# Environment (all optional):
#   PGR_STACK_STATE    where the private dockerd keeps its images, socket and
#                      logs, kept between runs as a build cache
#                      (/var/tmp/pgrunner-stack); delete it for a cold run
#   PGR_BASE_IMAGE     the Debian 12 base image to build on (skips the
#                      choice above)
#   PGR_BASE_TARBALL   a root tarball for the local base: imported when it
#                      exists, written after debootstrap when it does not
#   PGR_STACK_PROJECT  the compose project name (pgrunnerstack)
#   PGR_STACK_KEEP=1   leave the stack running (and a private dockerd
#                      too) for debugging; run.sh prints how to stop them
#
# Exit status: 0 when every stack test passed, 1 otherwise.
set -euo pipefail

if [[ $EUID -ne 0 ]]; then
  exec sudo --preserve-env "$0" "$@"
fi

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
state=${PGR_STACK_STATE:-/var/tmp/pgrunner-stack}
project=${PGR_STACK_PROJECT:-pgrunnerstack}
SECONDS=0

say() { printf 'stack [%3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { say "error: $*"; exit 1; }

mkdir -p "$state"

# --- what is missing --------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >"$state/apt.log" 2>&1 ||
    { tail -20 "$state/apt.log" >&2; die "apt-get update failed"; }
  apt-get install -y -q --no-install-recommends "${need[@]}" \
    >>"$state/apt.log" 2>&1 ||
    { tail -20 "$state/apt.log" >&2; die "apt-get install failed"; }
fi
# The docker.io client matches its daemon; another `docker` may come first
# on PATH.
if [[ -x /usr/bin/docker ]]; then docker=/usr/bin/docker; else docker=docker; fi
export DOCKER=$docker
# The classic builder, for compose and the CLI alike: one build cache, and
# no dependence on buildx.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0

# --- teardown, whatever happens -------------------------------------------
dockerd_pid=
bridge_existed=1
compose_up=

compose=(docker-compose --project-name "$project"
  --file "$root/docker-compose.yml" --project-directory "$root")
# Long steps run in the background and are waited for: bash runs its INT and
# TERM traps during `wait`, not while a foreground command runs, so an
# interrupted run tears down at once. bg_pids: what cleanup ends first.
bg_pids=()

cleanup() {
  local rc=$?
  set +e
  if [[ -n ${PGR_STACK_KEEP:-} ]]; then
    say "PGR_STACK_KEEP: left running; stop with:"
    say "  DOCKER_HOST=${DOCKER_HOST:-} docker-compose -p $project down -v"
    [[ -n $dockerd_pid ]] && say "  kill $dockerd_pid   # the private dockerd"
    return
  fi
  for pid in "${bg_pids[@]}"; do kill "$pid" 2>/dev/null; done
  if [[ -n $compose_up ]]; then
    if ((rc != 0)); then
      "${compose[@]}" logs --no-color --timestamps >"$state/stack.log" 2>&1
      say "the stack's logs are in $state/stack.log; the workers' last lines:"
      "${compose[@]}" logs --no-color --tail=40 migrate worker >&2 2>/dev/null
    fi
    say "tearing the stack down"
    "${compose[@]}" down --volumes --remove-orphans --timeout 10 \
      >"$state/down.log" 2>&1 || { tail -5 "$state/down.log" >&2; rc=1; }
  fi
  # Images that this run's builds replaced; the tagged ones (and their
  # layers) stay as the cache of the next run.
  "$docker" image prune --force >/dev/null 2>&1
  if [[ -n $dockerd_pid ]]; then
    say "stopping the private dockerd (pid $dockerd_pid)"
    kill "$dockerd_pid" 2>/dev/null
    for _ in $(seq 150); do kill -0 "$dockerd_pid" 2>/dev/null || break
      sleep 0.2; done
    kill -0 "$dockerd_pid" 2>/dev/null && kill -9 "$dockerd_pid"
    wait "$dockerd_pid" 2>/dev/null
    if ((!bridge_existed)); then ip link delete docker0 2>/dev/null; fi
  fi
  say "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- a Docker daemon --------------------------------------------------------
if [[ -z ${DOCKER_HOST:-} ]] && ! "$docker" info >/dev/null 2>&1; then
  # A private daemon of an earlier run that was itself killed: stop it.
  if [[ -s $state/dockerd.pid ]]; then
    old=$(<"$state/dockerd.pid")
    if [[ $(cat "/proc/$old/comm" 2>/dev/null) == dockerd ]]; then
      say "stopping the dockerd (pid $old) a previous run left"
      kill "$old"
      for _ in $(seq 100); do [[ -d /proc/$old ]] || break; sleep 0.2; done
    fi
    rm -f "$state/dockerd.pid"
  fi
  ip link show docker0 >/dev/null 2>&1 || bridge_existed=0
  say "starting a private dockerd (data in $state)"
  dockerd --data-root "$state/data" --exec-root "$state/exec" \
    --pidfile "$state/dockerd.pid" --host "unix://$state/docker.sock" \
    >"$state/dockerd.log" 2>&1 &
  dockerd_pid=$!
  export DOCKER_HOST=unix://$state/docker.sock
fi
if [[ ${DOCKER_HOST:-} == unix://* ]]; then
  export PGR_DOCKER_SOCK=${DOCKER_HOST#unix://}
elif [[ -n ${DOCKER_HOST:-} ]]; then
  die "DOCKER_HOST=$DOCKER_HOST: the tests container needs the daemon's unix socket"
fi

if [[ -n $dockerd_pid ]]; then
  for _ in $(seq 300); do
    "$docker" info >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null ||
      { tail -20 "$state/dockerd.log" >&2; dockerd_pid=; die "dockerd exited"; }
    sleep 0.2
  done
  "$docker" info >/dev/null 2>&1 ||
    { tail -20 "$state/dockerd.log" >&2; die "dockerd did not come up"; }
fi

# A stack left behind by an interrupted run (volumes with another password).
compose_up=1
"${compose[@]}" down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true

# --- the base image ---------------------------------------------------------
if [[ -z ${PGR_BASE_IMAGE:-} ]]; then
  if "$docker" image inspect debian:bookworm-slim >/dev/null 2>&1 ||
    timeout 120 "$docker" pull -q debian:bookworm-slim >/dev/null 2>&1; then
    PGR_BASE_IMAGE=debian:bookworm-slim
  else
    PGR_BASE_IMAGE=pgrunner-base:bookworm
    if ! "$docker" image inspect "$PGR_BASE_IMAGE" >/dev/null 2>&1; then
      say "no registry: building $PGR_BASE_IMAGE with debootstrap"
      "$here/base-image.sh" "$PGR_BASE_IMAGE" "${PGR_BASE_TARBALL:-}" >&2
    fi
  fi
fi
export PGR_BASE_IMAGE
say "base image: $PGR_BASE_IMAGE"

# --- images -----------------------------------------------------------------
# The worker image (C build) and the stack's images (one shared apt layer,
# built by the first of them) build side by side.
say "building the images"
# Tagging the worker's build stage keeps it out of `image prune` (an untagged
# stage is dangling), so the next run finds its apt layer in the cache.
"${compose[@]}" build worker >"$state/build-worker.log" 2>&1 &
worker_build=$!
"${compose[@]}" build postgres smtp tests >"$state/build-stack.log" 2>&1 &
stack_build=$!
bg_pids+=("$worker_build" "$stack_build")
worker_rc=0 stack_rc=0
wait "$worker_build" || worker_rc=$?
if ((!worker_rc)); then
  "$docker" build -q --target build --build-arg "BASE_IMAGE=$PGR_BASE_IMAGE" \
    -t pgrunner-build-stage:local "$root" >>"$state/build-worker.log" 2>&1 &
  bg_pids+=($!)
  wait $! || worker_rc=$?
fi
wait "$stack_build" || stack_rc=$?
if ((stack_rc)); then
  tail -30 "$state/build-stack.log" >&2
  die "building the stack's images failed (log: $state/build-stack.log)"
fi
if ((worker_rc)); then
  tail -40 "$state/build-worker.log" >&2
  die "building the worker image failed (log: $state/build-worker.log)"
fi
say "worker image: $("$docker" image inspect -f '{{.Size}}' pgrunner:local |
  awk '{printf "%.1f MB", $1 / 1e6}')"

# --- the stack --------------------------------------------------------------
# A fresh password per run, given to PostgreSQL and the clients through the
# environment only.
POSTGRES_PASSWORD=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
export POSTGRES_PASSWORD
say "starting postgres, smtp, migrate and the workers"
"${compose[@]}" up --detach --no-build worker >"$state/up.log" 2>&1 &
bg_pids+=($!)
if ! wait $!; then
  tail -20 "$state/up.log" >&2
  die "the stack did not come up"
fi

say "running the stack's tests"
# --no-deps: the stack is up already (the tests wait for healthy workers).
"${compose[@]}" run --rm -T --no-deps tests >"$state/tests.log" 2>&1 &
tests_pid=$!
tail -n +1 -f --pid="$tests_pid" "$state/tests.log" &
bg_pids+=("$tests_pid" $!)
tests_rc=0
wait "$tests_pid" || tests_rc=$?
wait "${bg_pids[-1]}" || true
result=$(grep -Eo 'STACK RESULT: [0-9]+ passed, [0-9]+ failed' \
  "$state/tests.log" | tail -1 | sed 's/^STACK RESULT: //')
if [[ -z $result ]]; then
  die "the tests did not run to the end (exit $tests_rc)"
fi
echo "$result"
[[ $tests_rc -eq 0 && $result == *" 0 failed" ]]
