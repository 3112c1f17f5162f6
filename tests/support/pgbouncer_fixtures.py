"""pytest fixtures for a real PgBouncer (Debian's `pgbouncer`) in front of
the private PostgreSQL server.

`pgbouncer(server, pool_mode="transaction", pool_size=20)` starts one with
its own generated configuration on a free port of 127.0.0.1 (every database
name passes through to `server`), waits until it answers, and returns a
PgBouncer whose dsn(dbname) connects through it. As root it runs as the
`postgres` user (PgBouncer refuses to run as root). Every instance is
stopped by its pid when the test ends, whatever the outcome.
"""

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time

import psycopg2
import pytest

from pgr_fixtures import free_port

PGBOUNCER = os.environ.get("PGBOUNCER", "/usr/sbin/pgbouncer")


class PgBouncer:
    def __init__(self, server, pool_mode, pool_size):
        self.server = server
        self.pool_mode = pool_mode
        self.pool_size = pool_size
        self.host = "127.0.0.1"
        self.port = free_port()
        self.user = server.user
        self.tmp = tempfile.mkdtemp(prefix="pgr-test-pgbouncer-")
        self.ini = os.path.join(self.tmp, "pgbouncer.ini")
        self.log = os.path.join(self.tmp, "pgbouncer.log")
        self.proc = None

    def start(self):
        with open(os.path.join(self.tmp, "users.txt"), "w") as f:
            f.write(f'"{self.user}" ""\n')
        with open(self.ini, "w") as f:
            f.write(
                "[databases]\n"
                f"* = host={self.server.host} port={self.server.port}\n"
                "[pgbouncer]\n"
                f"listen_addr = {self.host}\n"
                f"listen_port = {self.port}\n"
                "unix_socket_dir =\n"
                "auth_type = trust\n"
                f"auth_file = {self.tmp}/users.txt\n"
                f"pool_mode = {self.pool_mode}\n"
                f"default_pool_size = {self.pool_size}\n"
                "max_client_conn = 500\n"
                f"logfile = {self.log}\n"
                "log_connections = 0\n"
                "log_disconnections = 0\n")
        kw = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            for name in os.listdir(self.tmp):
                os.chown(os.path.join(self.tmp, name), pw.pw_uid, pw.pw_gid)
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
            kw = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        # In the foreground: the pid we hold is PgBouncer's own.
        self.proc = subprocess.Popen([PGBOUNCER, "-q", self.ini],
                                     stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL,
                                     cwd=self.tmp, **kw)
        deadline = time.monotonic() + 30
        while True:
            try:
                psycopg2.connect(self.dsn(), connect_timeout=2).close()
                return self
            except psycopg2.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("pgbouncer did not start:\n"
                                       + self.log_text())
                time.sleep(0.05)

    def log_text(self):
        try:
            with open(self.log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def dsn(self, dbname="postgres"):
        return (f"host={self.host} port={self.port} user={self.user} "
                f"dbname={dbname}")

    def connect(self, dbname="postgres"):
        c = psycopg2.connect(self.dsn(dbname))
        c.autocommit = True
        return c

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # immediate shutdown
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture
def pgbouncer():
    """Factory: pgbouncer(server, pool_mode=..., pool_size=...) -> a running
    PgBouncer in front of `server`; all stopped afterwards."""
    made = []

    def make(server, pool_mode="transaction", pool_size=20):
        b = PgBouncer(server, pool_mode, pool_size)
        made.append(b)
        return b.start()

    yield make
    for b in made:
        b.stop()
