"""Fixtures of the stack's tests: they run in the `tests` container of
docker-compose.yml, beside PostgreSQL, the SMTP catcher and the worker
replicas, and talk to them over the compose network.

- `db`: a psycopg2 connection (autocommit) made from DATABASE_URL and
  PGPASSWORD, the same variables the workers get;
- `docker`: the Docker API (dockerapi.Docker) through the mounted socket;
- `stack`: the worker containers of this compose project, and helpers to
  map a database session to the replica that opened it.

The `record` job (pgrunner_jobs.record) is created here: it writes the
task's token and the worker's identity (its application_name,
pgrunner/<hex id>) into stack_test.runs, whose UNIQUE token column makes a
second committed run of one task impossible to miss, then sleeps for the
payload's `sleep` seconds.
"""

import os
import socket
import time
import uuid

import psycopg2
import pytest

from dockerapi import Docker

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS stack_test;
CREATE TABLE IF NOT EXISTS stack_test.runs (
  token  text PRIMARY KEY,
  worker text NOT NULL,
  at     timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE OR REPLACE FUNCTION pgrunner_jobs.record(payload jsonb)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO stack_test.runs (token, worker)
  VALUES (payload->>'token', current_setting('application_name'));
  PERFORM pg_sleep(coalesce((payload->>'sleep')::float8, 0));
END
$$;
"""


def wait_until(what, fn, timeout=120, interval=0.2):
    """Polls fn until it returns a true value, which it returns. The timeout
    only keeps a broken stack from hanging the run."""
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %ds waiting for %s"
                                 % (timeout, what))
        time.sleep(interval)


@pytest.fixture(scope="session")
def db():
    conn = wait_until("PostgreSQL",
                      lambda: _try_connect(os.environ["DATABASE_URL"]), 60)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(SCHEMA_SQL)
    yield conn
    conn.close()


def _try_connect(dsn):
    try:
        return psycopg2.connect(dsn, application_name="stack-tests")
    except psycopg2.OperationalError:
        return None


def query(db, sql, args=None):
    with db.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchall() if cur.description else None


@pytest.fixture
def token():
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def docker():
    return Docker(os.environ.get("DOCKER_SOCKET", "/var/run/docker.sock"))


class Stack:
    """The worker replicas of the compose project this container is part of
    (found from this container's own labels)."""

    def __init__(self, docker):
        self.docker = docker
        me = docker.inspect(socket.gethostname())
        self.project = me["Config"]["Labels"]["com.docker.compose.project"]

    def workers(self, all=False):
        return self.docker.containers(
            {"com.docker.compose.project": self.project,
             "com.docker.compose.service": "worker"}, all=all)

    def ip(self, cid):
        nets = self.docker.inspect(cid)["NetworkSettings"]["Networks"]
        return next(n["IPAddress"] for n in nets.values() if n["IPAddress"])

    def container_at(self, addr):
        """The worker container whose address is addr (a session's
        client_addr)."""
        for c in self.workers():
            if self.ip(c["Id"]) == addr:
                return c["Id"]
        raise AssertionError("no worker container has address %s" % addr)

    def health(self, cid):
        h = self.docker.inspect(cid)["State"].get("Health")
        return h["Status"] if h else None

    def wait_healthy(self, cid, timeout=120):
        wait_until("container %s healthy" % cid[:12],
                   lambda: self.health(cid) == "healthy", timeout)

    def restart_stopped(self):
        """Starts again every worker replica a test stopped or killed, and
        waits until all are healthy, so each test starts with the full
        stack."""
        for c in self.workers(all=True):
            if c["State"] != "running":
                self.docker.start(c["Id"])
        for c in self.workers():
            self.wait_healthy(c["Id"])


@pytest.fixture(scope="session")
def stack(docker):
    return Stack(docker)


@pytest.fixture
def full_stack(stack):
    """Every worker replica up and healthy before and after the test."""
    stack.restart_stopped()
    assert len(stack.workers()) >= 2, "the stack runs two or more workers"
    yield stack
    stack.restart_stopped()


def pytest_terminal_summary(terminalreporter):
    stats = terminalreporter.stats
    passed = len(stats.get("passed", []))
    failed = len(stats.get("failed", [])) + len(stats.get("error", []))
    terminalreporter.write_line("STACK RESULT: %d passed, %d failed"
                                % (passed, failed))
