"""pytest fixtures for pgrunner's integration tests.

A private PostgreSQL server per pytest process (initdb into a temporary
directory, a free port on 127.0.0.1; as root the server runs as the
`postgres` user), one fresh database per test, and helpers that run the real
`pgrunner` binary. Everything started here is stopped and removed afterwards,
whatever the outcome.
"""

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid

import psycopg2
import psycopg2.extensions
import pytest

PG_BIN = os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def pgrunner_bin():
    b = os.environ.get("PGRUNNER_BIN")
    if b:
        return b
    for cand in ("build-asan/pgrunner", "build/pgrunner"):
        p = os.path.join(ROOT, cand)
        if os.path.exists(p):
            return p
    raise RuntimeError("set PGRUNNER_BIN or build the project first")


def plugin_path():
    """tests/plugins/example_plugin.so of the same build as the binary (a
    sanitizer build's plugin does not load into a plain binary)."""
    p = os.environ.get("PGR_EXAMPLE_PLUGIN")
    if p:
        return p
    p = os.path.join(os.path.dirname(pgrunner_bin()), "tests",
                     "example_plugin.so")
    assert os.path.exists(p), "build the project first (example_plugin.so)"
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_pg_user():
    """Return a preexec/user argument: the server refuses to run as root."""
    return os.geteuid() == 0


class PgServer:
    def __init__(self, extra_conf="", env=None):
        self.extra_conf = extra_conf
        self.env = env  # the environment of initdb, pg_ctl and the server
        self.tmp = tempfile.mkdtemp(prefix="pgr-test-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.port = free_port()
        self.host = "127.0.0.1"
        self.user = "postgres"
        self.root = _as_pg_user()
        if self.root:
            pw = pwd.getpwnam("postgres")
            os.chown(self.tmp, pw.pw_uid, pw.pw_gid)
        else:
            self.user = pwd.getpwuid(os.geteuid()).pw_name

    def _run(self, args, **kw):
        if self.root:
            args = ["runuser", "-u", "postgres", "--"] + args
        return subprocess.run(args, check=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, cwd=self.tmp,
                              env=self.env, **kw)

    def start(self):
        self._run([os.path.join(PG_BIN, "initdb"), "-D", self.data,
                   "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8",
                   "-U", self.user])
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write("\nlisten_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.tmp}'\n"
                    "max_connections = 200\n"
                    "fsync = on\n"
                    "log_min_messages = warning\n" + self.extra_conf)
        self.pg_ctl("start", "-w", "-t", "60")

    def pg_ctl(self, *args):
        return self._run([os.path.join(PG_BIN, "pg_ctl"), "-D", self.data,
                          "-l", os.path.join(self.tmp, "server.log")]
                         + list(args))

    def stop(self):
        try:
            self.pg_ctl("stop", "-m", "immediate", "-w")
        except Exception:
            pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def dsn(self, dbname="postgres"):
        return (f"host={self.host} port={self.port} user={self.user} "
                f"dbname={dbname}")

    def url(self, dbname="postgres"):
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname="postgres", autocommit=True):
        c = psycopg2.connect(self.dsn(dbname))
        c.autocommit = autocommit
        return c


def _running_server():
    """Start a private server, hand it out, and always remove it."""
    server = PgServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg():
    yield from _running_server()


@pytest.fixture(scope="session")
def german_pg():
    """A private server whose messages are in German, for tests that must
    not depend on the English text of a message. The locale is compiled
    with localedef (Debian `locales`) into the server's own directory and
    found through LOCPATH, so the machine needs no German locale."""
    server = PgServer("lc_messages = 'de_DE.UTF-8'\n")
    try:
        locales = os.path.join(server.tmp, "locale")
        os.mkdir(locales)
        subprocess.run(["localedef", "-i", "de_DE", "-f", "UTF-8",
                        os.path.join(locales, "de_DE.UTF-8")], check=True,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        server.env = dict(os.environ, LOCPATH=locales)
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def german_mdb(german_pg):
    """`mdb` on german_pg; checks first that the server speaks German."""
    d = new_db(german_pg)
    with pytest.raises(psycopg2.Error) as e:
        d.query("SELECT 1/0")
    assert "Division durch Null" in str(e.value), str(e.value)
    try:
        yield d
    finally:
        d.close()


class Db:
    """One fresh database of the private server."""

    def __init__(self, server, name):
        self.server = server
        self.name = name
        self.dsn = server.dsn(name)
        self.url = server.url(name)
        self._conn = None

    @property
    def conn(self):
        if self._conn is None or self._conn.closed:
            self._conn = self.server.connect(self.name)
        return self._conn

    def connect(self, autocommit=True):
        return self.server.connect(self.name, autocommit)

    def query(self, sql, args=None):
        with self.conn.cursor() as cur:
            cur.execute(sql, args)
            if cur.description is None:
                return None
            return cur.fetchall()

    def scalar(self, sql, args=None):
        rows = self.query(sql, args)
        return rows[0][0] if rows else None

    def psql(self, sql, check=True):
        return subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1",
                               "-d", self.dsn, "-c", sql],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, check=check)

    def close(self):
        if self._conn is not None and not self._conn.closed:
            self._conn.close()


def create_db(server):
    """Create a fresh, empty database on `server`; return a Db for it."""
    name = "t_" + uuid.uuid4().hex[:12]
    admin = server.connect()
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        admin.close()
    return Db(server, name)


@pytest.fixture
def db(pg):
    """A fresh, empty (not migrated) database."""
    d = create_db(pg)
    try:
        yield d
    finally:
        d.close()
        admin = pg.connect()
        try:
            with admin.cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{d.name}" WITH (FORCE)')
        finally:
            admin.close()


def add_task(db, kind, **kw):
    """SELECT pgrunner.add_task(kind, name => value, ...); returns the id."""
    args = ["%s"]
    vals = [kind]
    for k, v in kw.items():
        cast = {"payload": "::jsonb", "run_at": "::timestamptz"}.get(k, "")
        args.append(f"{k} => %s{cast}")
        vals.append(json.dumps(v) if k == "payload" else v)
    return db.scalar(f"SELECT pgrunner.add_task({', '.join(args)})", vals)


LSAN_SUPPRESSIONS = os.path.join(ROOT, "tests", "lsan.supp")
# What a sanitizer prints when it finds something (ASan, LSan, TSan, UBSan).
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer",
                   "WARNING: ThreadSanitizer", "runtime error:",
                   "SUMMARY: AddressSanitizer", "SUMMARY: ThreadSanitizer",
                   "SUMMARY: UndefinedBehaviorSanitizer")


def pgrunner_env(env=None):
    """The test's environment without any pgrunner configuration of the
    caller's, plus `env`. LeakSanitizer (on by default in an ASan build)
    gets the repository's suppressions for leaks inside libraries we do not
    own, unless the caller set LSAN_OPTIONS."""
    e = dict(os.environ)
    for k in list(e):
        if k.startswith("PGRUNNER_") and k != "PGRUNNER_BIN":
            del e[k]
    e.pop("DATABASE_URL", None)
    e.setdefault("LSAN_OPTIONS", f"suppressions={LSAN_SUPPRESSIONS}")
    if env:
        e.update(env)
    return e


def assert_no_sanitizer_report(text, what="pgrunner"):
    """A leak or ASan report fails the test even where the test did not
    look at the exit code (e.g. a worker it only killed at teardown)."""
    text = text or ""
    at = [text.find(m) for m in SANITIZER_MARKS if m in text]
    assert not at, f"{what}: sanitizer report:\n{text[min(at):][:6000]}"


def run_pgrunner(args, env=None, check=False, timeout=60, input=None):
    """Run the real binary to completion; return CompletedProcess (text)."""
    e = pgrunner_env(env)
    r = subprocess.run([pgrunner_bin()] + list(args), env=e,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, check=check, timeout=timeout, input=input)
    assert_no_sanitizer_report(r.stderr, "pgrunner " + " ".join(args[:1]))
    return r


@pytest.fixture
def mdb(db):
    """A fresh database migrated by `pgrunner migrate`."""
    r = run_pgrunner(["migrate", "--db", db.dsn])
    assert r.returncode == 0, r.stderr
    return db


class Worker:
    """A running `pgrunner work` process. `dsn` replaces the database's own
    connection string; `wrap` is a command line that runs the worker (it
    must exec it, so that signals reach the worker)."""

    def __init__(self, db, args, env, log_path, dsn=None, wrap=()):
        e = pgrunner_env(env)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            list(wrap) + [pgrunner_bin(), "work", "--db", dsn or db.dsn]
            + list(args),
            env=e, stdout=self._log, stderr=subprocess.STDOUT)
        self.pid = self.proc.pid

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, timeout=60):
        """SIGTERM and wait; return the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._log.close()

    def alive(self):
        return self.proc.poll() is None


@pytest.fixture
def workers(tmp_path):
    """Factory: workers(db, *args, env={}, dsn=None, wrap=()) starts a
    worker (see Worker); all are killed at the end of the test."""
    started = []

    def start(db, *args, env=None, dsn=None, wrap=()):
        w = Worker(db, args, env, tmp_path / f"worker{len(started)}.out",
                   dsn=dsn, wrap=wrap)
        started.append(w)
        return w

    yield start
    for w in started:
        if w.alive():
            w.kill()
    for i, w in enumerate(started):
        assert_no_sanitizer_report(w.output(), f"worker{i}")


def wait_until(pred, timeout=30.0, interval=0.02, what="condition"):
    """Poll pred() until it is truthy; fail the test after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# --- fault injection (used by tests/integration/test_faults.py) -------------


@pytest.fixture
def own_pg():
    """A private PostgreSQL server for one test, for tests that restart,
    stop or reconfigure it (the session-wide `pg` is shared)."""
    yield from _running_server()


def restart_pg(server, mode="fast"):
    """Restart a PgServer (`pg_ctl restart -m MODE -w`)."""
    server.pg_ctl("restart", "-m", mode, "-w", "-t", "60")


def password_role(server, db, role, password):
    """Create a superuser `role` that must log in over TCP with `password`
    (scram-sha-256 in pg_hba.conf), reload, and return a conninfo for it
    to `db` without the password. The reload is asynchronous: callers wait
    until a wrong password is refused."""
    db.query(f"CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}'")
    hba = os.path.join(server.data, "pg_hba.conf")
    with open(hba) as f:
        old = f.read()
    with open(hba, "w") as f:
        f.write(f"host all {role} 127.0.0.1/32 scram-sha-256\n" + old)
    server.pg_ctl("reload")
    return f"host=127.0.0.1 port={server.port} user={role} dbname={db.name}"


def new_db(server, migrate=True):
    """Create a fresh database on `server` (migrated unless told not to)
    and return a Db for it. The server's removal takes it away."""
    d = create_db(server)
    if migrate:
        r = run_pgrunner(["migrate", "--db", d.dsn])
        assert r.returncode == 0, r.stderr
    return d


# The protocol's Sync message: 'S' and its length, 4.
SYNC_MSG = b"S\x00\x00\x00\x04"


class TcpProxy:
    """A TCP proxy on 127.0.0.1 in front of one upstream address, whose
    connections a test can cut (both sides closed at once, as when a
    network path dies), freeze (bytes stop flowing, nothing is closed) and
    which can refuse new connections for a while."""

    def __init__(self, upstream_host, upstream_port):
        import threading
        self.upstream = (upstream_host, upstream_port)
        self.lock = threading.Lock()
        self.pairs = []
        self.refusing = False
        self.frozen = False
        self.held = set()        # hold(): (port, from_client) frozen
        self.held_bytes = {}     # port -> bytes from the client held
        self.sync_held = {}      # hold_sync(): port -> None or held bytes
        self.sync_marker = {}    # hold_sync(): port -> bytes to look for
        self.accepted = 0
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(128)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        import threading
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.refusing or self.closed:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            pair = (client, server)
            # The port the server sees as the client's (client_port in
            # pg_stat_activity): how a test names one connection.
            port = server.getsockname()[1]
            with self.lock:
                self.pairs.append(pair)
                self.accepted += 1
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump,
                                 args=(a, b, pair, port, a is client),
                                 daemon=True).start()

    def _pump(self, src, dst, pair, port, from_client):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_client and port in self.sync_held and \
                        self.sync_held[port] is None and \
                        data.endswith(SYNC_MSG) and \
                        self.sync_marker.get(port, b"COMMIT") in data:
                    # The pipeline passes, all but its closing Sync.
                    dst.sendall(data[:-len(SYNC_MSG)])
                    self.sync_held[port] = data[-len(SYNC_MSG):]
                    while port in self.sync_held and pair in self.pairs:
                        time.sleep(0.01)
                    data = data[-len(SYNC_MSG):]
                held = (port, from_client) in self.held
                if held and from_client:
                    with self.lock:
                        self.held_bytes[port] = \
                            self.held_bytes.get(port, 0) + len(data)
                # Frozen: hold what arrived (the sender's writes succeed,
                # nothing reaches the other side) until thawed or cut.
                while (self.frozen or (port, from_client) in self.held) \
                        and pair in self.pairs:
                    time.sleep(0.01)
                dst.sendall(data)
        except OSError:
            pass
        self._close_pair(pair)

    def _close_pair(self, pair):
        # Shut both sockets down before the pair leaves the list: a pump
        # holding data while frozen leaves its wait when the pair is gone,
        # and its send must then fail, not get through.
        for s in pair:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        with self.lock:
            if pair in self.pairs:
                self.pairs.remove(pair)
        for s in pair:
            try:
                s.close()
            except OSError:
                pass

    def connections(self):
        with self.lock:
            return len(self.pairs)

    def cut(self):
        """Close every open connection, both ways; return how many."""
        with self.lock:
            pairs = list(self.pairs)
        for p in pairs:
            self._close_pair(p)
        return len(pairs)

    def freeze(self, on=True):
        """While on, bytes are read from both sides but not passed on: a
        network path that went silent without closing."""
        self.frozen = on

    def hold(self, port, on=True, up=True, down=True):
        """freeze() for the one connection whose server-side port is
        `port` (pg_stat_activity.client_port), in the directions chosen:
        up (client to server), down (server to client)."""
        for d, chosen in ((True, up), (False, down)):
            if chosen and on:
                self.held.add((port, d))
            elif chosen:
                self.held.discard((port, d))

    def hold_sync(self, port, on=True, marker=b"COMMIT"):
        """On the connection of `port`, hold back the Sync that closes
        the next pipeline whose bytes contain `marker`: the server runs
        the pipeline but does not answer it (it answers at the Sync)."""
        if on:
            self.sync_marker[port] = marker
            self.sync_held[port] = None
        else:
            self.sync_held.pop(port, None)

    def sync_is_held(self, port):
        return self.sync_held.get(port) is not None

    def held_from_client(self, port):
        """Bytes the client sent on a held connection, not passed on."""
        with self.lock:
            return self.held_bytes.get(port, 0)

    def refuse(self, on=True):
        """While on, accept and at once close new connections."""
        self.refusing = on

    def close(self):
        self.closed = True
        try:
            self.listener.close()
        except OSError:
            pass
        self.cut()


@pytest.fixture
def tcp_proxy():
    """Factory: tcp_proxy(host, port) -> TcpProxy; all closed afterwards."""
    made = []

    def make(host, port):
        p = TcpProxy(host, port)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


@pytest.fixture(scope="module")
def module_mdb(pg):
    """One migrated database shared by the tests of a module that leave it
    as they found it (creating a database per test is slow on a busy
    machine). Dropped at the end of the module."""
    name = "t_mod_" + uuid.uuid4().hex[:10]
    admin = pg.connect()
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    d = Db(pg, name)
    try:
        r = run_pgrunner(["migrate", "--db", d.dsn])
        assert r.returncode == 0, r.stderr
        yield d
    finally:
        d.close()
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()
