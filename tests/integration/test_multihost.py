"""The worker on a connection string with several hosts or addresses:
libpq's multi-host form (host=a,b port=x,y), a service file and PGHOST/PGPORT
lists, a host name whose first address has no server,
target_session_attrs=read-write in front of a hot standby, and a failover
drill (a synchronous standby promoted while the primary stops under load).

Every worker here runs under tests/support/no_loop_lookup.c, an LD_PRELOAD
shim that aborts the process when the event-loop thread (the main thread)
asks getaddrinfo for a lookup: the loop resolves every host on libuv's
thread pool and hands libpq numeric addresses.

Real PostgreSQL servers, the real binary; a name that resolves to ::1 and
then 127.0.0.1 comes from a private /etc/hosts in a mount namespace
(unshare -m), so the machine's resolver is untouched.
"""

import os
import shutil
import subprocess

import pytest

from pgr_fixtures import (PG_BIN, PgServer, add_task, free_port, new_db,
                          wait_until)

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM_SRC = os.path.join(HERE, "..", "support", "no_loop_lookup.c")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    out = tmp_path_factory.mktemp("shim") / "no_loop_lookup.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", str(out),
                    SHIM_SRC, "-ldl"], check=True)
    return str(out)


def guarded(shim, env=None):
    """The environment of a worker under the shim. A sanitizer build wants
    its runtime first among the loaded libraries; the shim goes first, and
    is uninstrumented, so that check is off."""
    e = dict(env or {})
    e["LD_PRELOAD"] = shim
    asan = os.environ.get("ASAN_OPTIONS", "")
    e["ASAN_OPTIONS"] = (asan + ":" if asan else "") + \
        "verify_asan_link_order=0"
    return e


def succeeded(db, n):
    return db.scalar("SELECT count(*) FROM pgrunner.tasks"
                     " WHERE state = 'succeeded'") == n


def run_tasks(db, w, n=5):
    """Add n noop tasks and wait until they all succeeded."""
    for _ in range(n):
        add_task(db, "noop")
    try:
        wait_until(lambda: succeeded(db, n) or not w.alive(), timeout=90,
                   interval=0.1, what=f"{n} tasks to succeed")
    finally:
        out = w.output()
    assert "no_loop_lookup" not in out, out
    assert w.alive(), out
    assert succeeded(db, n), out


def closed_port():
    """A port on 127.0.0.1 where nothing listens."""
    return free_port()


@pytest.mark.parametrize("how", ["list", "service", "env"])
def test_first_host_down_then_tasks_run(mdb, workers, shim, tmp_path, how):
    srv = mdb.server
    down = closed_port()
    hosts, ports = "127.0.0.1,localhost", f"{down},{srv.port}"
    base = f"user={srv.user} dbname={mdb.name}"
    env = {}
    if how == "list":
        dsn = f"host={hosts} port={ports} {base}"
    elif how == "service":
        svc = tmp_path / "pg_service.conf"
        svc.write_text(f"[pgrmh]\nhost={hosts}\nport={ports}\n")
        env["PGSERVICEFILE"] = str(svc)
        dsn = f"service=pgrmh {base}"
    else:
        env.update(PGHOST=hosts, PGPORT=ports)
        dsn = base
    w = workers(mdb, dsn=dsn, env=guarded(shim, env))
    run_tasks(mdb, w)
    assert w.stop() == 0, w.output()


def _namespace_resolves(hosts_file, name):
    """The addresses `name` has inside a mount namespace whose /etc/hosts
    is hosts_file, in getaddrinfo's order; None without such namespaces."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return None
    code = ("import socket,sys; print(' '.join(a[4][0] for a in"
            " socket.getaddrinfo(sys.argv[1], 1, type=socket.SOCK_STREAM)))")
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        'mount --bind "$1" /etc/hosts && shift && exec "$@"',
                        "sh", str(hosts_file), "/usr/bin/python3", "-c", code,
                        name], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True)
    if r.returncode != 0:
        return None
    return r.stdout.split()


def test_name_whose_first_address_has_no_server(mdb, workers, shim,
                                                 tmp_path):
    # The server listens on 127.0.0.1 only; the name resolves to ::1 first.
    # libpq tries every address of a host, so the worker threads connect;
    # the loop's connection must too, or no task is ever claimed.
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n::1 pgr-mh-db\n"
                     "127.0.0.1 pgr-mh-db\n")
    order = _namespace_resolves(hosts, "pgr-mh-db")
    if order is None:
        pytest.skip("needs root and unshare -m for a private /etc/hosts")
    assert order == ["::1", "127.0.0.1"], order
    srv = mdb.server
    wrap = ["unshare", "-m", "sh", "-c",
            'mount --bind "$1" /etc/hosts && shift && exec "$@"', "sh",
            str(hosts)]
    w = workers(mdb, dsn=f"host=pgr-mh-db port={srv.port} user={srv.user}"
                f" dbname={mdb.name}", env=guarded(shim), wrap=wrap)
    run_tasks(mdb, w)
    assert w.stop() == 0, w.output()


@pytest.fixture
def standby_of():
    """Factory: standby_of(server) starts a hot standby of a PgServer
    (pg_basebackup -R) on its own port; all are removed afterwards."""
    made = []

    def make(primary):
        s = PgServer()
        made.append(s)
        s._run([os.path.join(PG_BIN, "pg_basebackup"), "-D", s.data,
                "-h", primary.host, "-p", str(primary.port),
                "-U", primary.user, "-R", "-X", "stream", "-c", "fast"])
        with open(os.path.join(s.data, "postgresql.conf"), "a") as f:
            f.write(f"\nport = {s.port}\n"
                    f"unix_socket_directories = '{s.tmp}'\n"
                    "hot_standby = on\n")
        s.pg_ctl("start", "-w", "-t", "60")
        return s

    yield make
    for s in made:
        s.stop()


def test_read_write_skips_a_standby(own_pg, standby_of, workers, shim):
    # The database exists before the base backup, so the standby has it.
    d = new_db(own_pg)
    sb = standby_of(own_pg)
    c = sb.connect(d.name)
    with c.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        assert cur.fetchone()[0] is True
    c.close()
    # The standby comes first: libpq must pass it over for the primary, on
    # the loop's connection as on the worker threads'.
    dsn = (f"host=localhost,127.0.0.1 port={sb.port},{own_pg.port}"
           f" user={own_pg.user} dbname={d.name}"
           " target_session_attrs=read-write")
    w = workers(d, dsn=dsn, env=guarded(shim))
    run_tasks(d, w)
    # The worker's sessions are on the primary, none stayed on the standby.
    sessions = ("SELECT count(*) FROM pg_stat_activity"
                " WHERE application_name LIKE 'pgrunner/%'")
    assert d.scalar(sessions) >= 2
    c = sb.connect(d.name)
    with c.cursor() as cur:
        cur.execute(sessions)
        assert cur.fetchone()[0] == 0
    c.close()
    assert w.stop() == 0, w.output()
    d.close()


# --- a failover drill ---------------------------------------------------------

DRILL_JOBS = """
CREATE TABLE pgrunner_jobs.done (k text PRIMARY KEY, app text NOT NULL);
CREATE FUNCTION pgrunner_jobs.effect(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  -- The PRIMARY KEY makes a second committed run impossible to miss: it
  -- would fail, and the count of rows is the count of effects.
  INSERT INTO pgrunner_jobs.done (k, app)
  VALUES (p->>'k', current_setting('application_name'));
  PERFORM pg_sleep(0.002);
END $$;
"""


def scalar_on(server, dbname, sql):
    c = server.connect(dbname)
    try:
        with c.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()[0]
    finally:
        c.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_failover_to_a_promoted_standby_runs_every_task_once(
        own_pg, standby_of, workers, shim, mode):
    primary = own_pg
    d = new_db(primary)
    d.query(DRILL_JOBS)
    sb = standby_of(primary)
    # Synchronous replication: a commit the worker saw is on the standby.
    d.query("ALTER SYSTEM SET synchronous_standby_names = '*'")
    d.query("SELECT pg_reload_conf()")
    wait_until(lambda: d.scalar("SELECT sync_state FROM pg_stat_replication")
               == "sync", timeout=60, what="the standby to be synchronous")
    n = 2000
    dsn = (f"host=127.0.0.1,localhost port={primary.port},{sb.port}"
           f" user={primary.user} dbname={d.name}"
           " target_session_attrs=read-write")
    w = workers(d, "--poll-interval", "1000", dsn=dsn, env=guarded(shim))
    d.query("INSERT INTO pgrunner.tasks (kind, payload)"
            " SELECT 'effect', jsonb_build_object('k', g::text)"
            " FROM generate_series(1, %s) g", (n,))
    done = ("SELECT count(*) FROM pgrunner.tasks"
            " WHERE state = 'succeeded'")
    wait_until(lambda: d.scalar(done) >= 100 or not w.alive(), timeout=120,
               what="some progress before the failover")
    assert w.alive(), w.output()[-4000:]
    before = d.scalar(done)
    d.close()
    # The failover: the primary goes away under load, the standby is
    # promoted; the worker's next connection attempts skip the dead host.
    primary.pg_ctl("stop", "-m", mode, "-w")
    sb.pg_ctl("promote", "-w", "-t", "60")
    assert before < n, f"the load finished first ({before}); nothing tested"
    try:
        wait_until(lambda: scalar_on(sb, d.name, done) == n or not w.alive(),
                   timeout=300, interval=0.2,
                   what=f"all {n} tasks to succeed on the new primary")
    finally:
        out = w.output()
    assert w.alive(), out[-4000:]
    assert "no_loop_lookup" not in out, out[-4000:]
    assert scalar_on(sb, d.name, done) == n, out[-4000:]
    assert scalar_on(sb, d.name, "SELECT count(*) FROM pgrunner_jobs.done") \
        == n
    assert scalar_on(sb, d.name,
                     "SELECT count(*) FROM pgrunner.tasks t WHERE NOT EXISTS"
                     " (SELECT 1 FROM pgrunner_jobs.done x"
                     "  WHERE x.k = t.payload->>'k')") == 0
    assert "database connection lost" in out, out[-4000:]
    assert w.stop() == 0, w.output()[-4000:]
