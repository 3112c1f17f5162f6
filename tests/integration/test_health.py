"""Health tells the truth; start-up fails fast on what waiting cannot heal;
shutdown ends in every state (SPEC "Health tells the truth", issue 12).

Real PostgreSQL, the real binary, and fake servers written here: one that
accepts TCP and never answers, one that accepts and closes at once.
"""

import os
import pwd
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from pgr_fixtures import (add_task, free_port, new_db, password_role,
                          run_pgrunner, wait_until)

SHUTDOWN_TIMEOUT = 2
# Generous: the bound under test is the shutdown timeout plus what a thread
# needs to notice (a fraction of a second); this margin only keeps a slow
# machine from failing the test.
MARGIN = 30


def healthz(port):
    """(status, body) of GET /healthz, or (None, error) if nobody answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz",
                                    timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def wait_health(port, status, contains="", timeout=60):
    def ok():
        s, body = healthz(port)
        return (s, body) if s == status and contains in body else None
    try:
        return wait_until(ok, timeout=timeout, interval=0.1,
                          what=f"/healthz {status} {contains!r}")
    except AssertionError:
        raise AssertionError(f"/healthz is {healthz(port)}, wanted {status} "
                             f"with {contains!r}")


class FakeServer:
    """A TCP server on 127.0.0.1 that accepts every connection and then
    either never answers ("silent": the socket stays open, unread) or
    closes it at once ("closing")."""

    def __init__(self, mode):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.held = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            if self.mode == "closing":
                c.close()
            else:
                self.held.append(c)

    def close(self):
        self._stop = True
        self.sock.close()
        for c in self.held:
            c.close()


@pytest.fixture
def fake_server():
    made = []

    def make(mode):
        s = FakeServer(mode)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def start_worker(workers, dsn, *args, env=None):
    ns = type("D", (), {"dsn": dsn})()
    return workers(ns, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT), *args,
                   env=env)


def wait_exit(w, timeout):
    try:
        return w.proc.wait(timeout)
    except Exception:
        raise AssertionError(f"the worker did not exit within {timeout}s:\n"
                             f"{w.output()[-3000:]}")


# --- shutdown is bounded ----------------------------------------------------


@pytest.mark.parametrize("mode,extra,reason", [
    # A server that never answers: the loop's own time limit ends each
    # attempt, and /healthz says so.
    ("silent", "connect_timeout=2", "timeout expired"),
    # The user asked for no time limit at all: shutdown still ends.
    ("silent", "connect_timeout=0", ""),
    # A server that hangs up at once.
    ("closing", "", "server closed the connection"),
])
def test_shutdown_ends_while_connecting(workers, fake_server, mode, extra,
                                        reason):
    fake = fake_server(mode)
    mport = free_port()
    w = start_worker(workers, f"host=127.0.0.1 port={fake.port} "
                     f"user=postgres dbname=x sslmode=disable {extra}",
                     "--concurrency", "2", "--metrics-listen",
                     f"127.0.0.1:{mport}")
    # The loop's two connections and both threads' are at the server.
    wait_until(lambda: fake.accepted >= 4 or not w.alive(), timeout=60,
               what="every connection attempt reached the fake server")
    assert w.alive(), w.output()
    status, body = wait_health(mport, 503, reason)
    assert body.startswith("database connection down"), body
    assert "\n" not in body.rstrip("\n"), body
    w.signal(signal.SIGTERM)
    rc = wait_exit(w, SHUTDOWN_TIMEOUT + MARGIN)
    assert rc == 0, w.output()


# --- /healthz tells why -----------------------------------------------------


def worker_backends(admin, dbname):
    with admin.cursor() as cur:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE datname = %s AND application_name LIKE"
                    " 'pgrunner/%%'", (dbname,))
        return cur.rowcount


def allow_connections(admin, dbname, on):
    with admin.cursor() as cur:
        cur.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS '
                    f'{"true" if on else "false"}')


def test_healthz_reports_loop_down_and_threads_that_cannot_connect(
        pg, mdb, workers):
    mport = free_port()
    w = start_worker(workers, mdb.dsn, "--concurrency", "1",
                     "--poll-interval", "200", "--metrics-listen",
                     f"127.0.0.1:{mport}")
    admin = pg.connect()
    try:
        # Healthy, and the thread has its connection (it ran a task).
        tid = add_task(mdb, "noop")
        wait_until(lambda: mdb.scalar("SELECT state FROM pgrunner.tasks"
                                      " WHERE id = %s", (tid,))
                   == "succeeded", timeout=60, what="the first task")
        wait_health(mport, 200, "ok")

        # The database refuses new connections and the worker's are gone:
        # the loop cannot reconnect, and /healthz says why.
        allow_connections(admin, mdb.name, False)
        worker_backends(admin, mdb.name)
        _, body = wait_health(mport, 503, "database connection down")
        wait_health(mport, 503, "not currently accepting connections")

        # The loop is back; the thread does not know its connection died
        # until it gets a task.
        allow_connections(admin, mdb.name, True)
        wait_health(mport, 200, "ok")

        # Refused again: the loop keeps its connection, the thread cannot
        # reconnect for the next task.
        allow_connections(admin, mdb.name, False)
        tid = add_task(mdb, "noop")
        _, body = wait_health(mport, 503, "no worker thread can connect: ")
        assert "not currently accepting connections" in body, body
        assert "\n" not in body.rstrip("\n"), body

        # Healed: the thread connects, the task runs, 200 again.
        allow_connections(admin, mdb.name, True)
        wait_until(lambda: mdb.scalar("SELECT state FROM pgrunner.tasks"
                                      " WHERE id = %s", (tid,))
                   == "succeeded", timeout=60, what="the second task")
        wait_health(mport, 200, "ok")
    finally:
        allow_connections(admin, mdb.name, True)
        admin.close()
    assert w.stop() == 0, w.output()


def test_healthz_reports_a_schema_behind(pg, db, workers):
    # At start, a schema missing ends the worker: nothing to wait for.
    w = start_worker(workers, db.dsn, "--concurrency", "1")
    assert wait_exit(w, 60) == 1, w.output()
    assert "pgrunner migrate" in w.output()
    r = run_pgrunner(["migrate", "--db", db.dsn])
    assert r.returncode == 0, r.stderr
    mdb = db

    # Once the worker has run, a schema behind is reported, not fatal.
    mport = free_port()
    w = start_worker(workers, mdb.dsn, "--concurrency", "1",
                     "--metrics-listen", f"127.0.0.1:{mport}")
    wait_health(mport, 200, "ok")
    need = mdb.scalar("SELECT max(version) FROM pgrunner.migrations")
    mdb.query("CREATE TABLE public.saved AS SELECT * FROM"
              " pgrunner.migrations WHERE version > 4")
    mdb.query("DELETE FROM pgrunner.migrations WHERE version > 4")
    admin = pg.connect()
    try:
        worker_backends(admin, mdb.name)
    finally:
        admin.close()
    wait_health(mport, 503, f"schema behind: have 4, need {need}")
    assert w.alive(), w.output()
    mdb.query("INSERT INTO pgrunner.migrations SELECT * FROM public.saved")
    wait_health(mport, 200, "ok")
    tid = add_task(mdb, "noop")
    wait_until(lambda: mdb.scalar("SELECT state FROM pgrunner.tasks WHERE"
                                  " id = %s", (tid,)) == "succeeded",
               timeout=60, what="a task after the schema is current again")
    assert w.stop() == 0, w.output()


def test_healthz_reports_failing_claims(mdb, workers):
    mport = free_port()
    w = start_worker(workers, mdb.dsn, "--concurrency", "1",
                     "--poll-interval", "200", "--metrics-listen",
                     f"127.0.0.1:{mport}")
    wait_health(mport, 200, "ok")
    mdb.query("""
        CREATE FUNCTION public.no_claims() RETURNS trigger LANGUAGE plpgsql
        AS $$ BEGIN RAISE EXCEPTION 'claims are broken here'; END $$;
        CREATE TRIGGER no_claims BEFORE UPDATE ON pgrunner.tasks
          FOR EACH ROW WHEN (NEW.state = 'running')
          EXECUTE FUNCTION public.no_claims();""")
    tid = add_task(mdb, "noop")
    _, body = wait_health(mport, 503, "claims failing: ")
    assert "claims are broken here" in body, body
    mdb.query("DROP TRIGGER no_claims ON pgrunner.tasks")
    wait_until(lambda: mdb.scalar("SELECT state FROM pgrunner.tasks WHERE"
                                  " id = %s", (tid,)) == "succeeded",
               timeout=60, what="the task once claims work")
    wait_health(mport, 200, "ok")
    assert w.stop() == 0, w.output()


# --- start-up: what waiting cannot heal ends the worker -----------------------


def test_unknown_database_exits_1_at_start(pg, workers):
    w = start_worker(workers, pg.dsn("no_such_db_here"), "--concurrency", "2")
    rc = wait_exit(w, 60)
    out = w.output()
    assert rc == 1, out
    assert "no_such_db_here" in out and "does not exist" in out, out
    assert "not retrying" in out, out


def test_malformed_conninfo_value_exits_1_at_start(pg, workers):
    # Parses as a connection string; libpq refuses the value when it starts
    # connecting. SPEC section 9: a malformed conninfo is an error waiting
    # cannot heal, exit 1 naming the cause.
    w = start_worker(workers, pg.dsn() + " sslmode=sometimes",
                     "--concurrency", "2")
    rc = wait_exit(w, 60)
    out = w.output()
    assert rc == 1, out
    assert "sslmode" in out, out


def test_wrong_password_exits_1_at_start(own_pg, workers):
    db = new_db(own_pg)
    right, wrong = "Right-pw-3141", "Wrong-pw-2718"
    base = password_role(own_pg, db, "hpw", right)
    wait_until(lambda: "password" in run_pgrunner(
        ["status", "--db", f"{base} password={wrong}"]).stderr,
        timeout=30, interval=0.2, what="pg_hba reload")

    w = start_worker(workers, f"{base} password={wrong}", "--concurrency", "2")
    rc = wait_exit(w, 60)
    out = w.output()
    assert rc == 1, out
    assert "password authentication failed" in out, out
    assert wrong not in out, out

    # No password at all: libpq says one is needed; as permanent.
    w = start_worker(workers, base, "--concurrency", "2",
                     env={"PGPASSFILE": "/nonexistent"})
    assert wait_exit(w, 60) == 1, w.output()

    # The set-up is real: the right password works.
    good = start_worker(workers, f"{base} password={right}")
    tid = add_task(db, "noop")
    wait_until(lambda: db.scalar("SELECT state FROM pgrunner.tasks WHERE"
                                 " id = %s", (tid,)) == "succeeded",
               timeout=60, what="the task with the right password")
    assert good.stop() == 0, good.output()
    db.close()


def test_wrong_certificate_authority_exits_1_at_start(own_pg, workers,
                                                      tmp_path):
    # The server's certificate is self-signed; the worker trusts another CA.
    def self_signed(name):
        crt, key = own_pg.tmp + f"/{name}.crt", own_pg.tmp + f"/{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048",
                        "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", crt], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if own_pg.root:
            pw = pwd.getpwnam("postgres")
            for f in (crt, key):
                os.chown(f, pw.pw_uid, pw.pw_gid)
        os.chmod(key, 0o600)
        return crt, key

    crt, key = self_signed("server")
    other_ca, _ = self_signed("other")
    db = new_db(own_pg)
    with open(os.path.join(own_pg.data, "postgresql.conf"), "a") as f:
        f.write(f"\nssl = on\nssl_cert_file = '{crt}'\n"
                f"ssl_key_file = '{key}'\n")
    own_pg.pg_ctl("reload")
    base = (f"host=127.0.0.1 port={own_pg.port} user={own_pg.user} "
            f"dbname={db.name} sslmode=verify-full")
    wait_until(lambda: run_pgrunner(["status", "--db", f"{base} "
                                     f"sslrootcert={crt}"]).returncode == 0,
               timeout=30, interval=0.2, what="TLS on the server")

    w = start_worker(workers, f"{base} sslrootcert={other_ca}",
                     "--concurrency", "2")
    rc = wait_exit(w, 60)
    out = w.output()
    assert rc == 1, out
    assert "certificate verify failed" in out, out

    # The set-up is real: the right CA works.
    good = start_worker(workers, f"{base} sslrootcert={crt}")
    tid = add_task(db, "noop")
    wait_until(lambda: db.scalar("SELECT state FROM pgrunner.tasks WHERE"
                                 " id = %s", (tid,)) == "succeeded",
               timeout=60, what="the task over verified TLS")
    assert good.stop() == 0, good.output()
    db.close()
