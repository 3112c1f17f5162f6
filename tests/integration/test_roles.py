"""Who may do what: the roles `pgrunner migrate` sets up, and liveness that
another session cannot fake (sql/0013_roles.sql).

Real PostgreSQL, the real binary, real login roles: a producer login adds,
cancels, retries and reads status and may do nothing else; a worker login
runs `pgrunner work` end to end; a session of another login that names
itself like a killed worker (and even takes its liveness lock) does not keep
that worker's task from running elsewhere.
"""

import json
import uuid

import psycopg2
import psycopg2.errors
import pytest

from pgr_fixtures import run_pgrunner, wait_until
# The jobs, the sanitizer-checking worker factory and the waits of the
# fault tests.
from test_faults import (JOBS_SQL, fw, jobs, add, task, done_rows,  # noqa: F401
                         wait_task, finished, registered, sleeping_in, diag)


def login(db, *grants, superuser=False):
    """A fresh LOGIN role granted `grants`; returns (name, dsn)."""
    name = "r_" + uuid.uuid4().hex[:10]
    db.query(f'CREATE ROLE "{name}" LOGIN')
    for g in grants:
        db.query(f'GRANT {g} TO "{name}"')
    dsn = (f"host={db.server.host} port={db.server.port} user={name} "
           f"dbname={db.name}")
    return name, dsn


def connect(dsn, **kw):
    c = psycopg2.connect(dsn, **kw)
    c.autocommit = True
    return c


def scalar(conn, sql, args=None):
    with conn.cursor() as cur:
        cur.execute(sql, args)
        return cur.fetchone()[0] if cur.description else None


def test_migrate_creates_nologin_roles_idempotently(mdb):
    roles = mdb.query("SELECT rolname, rolcanlogin FROM pg_roles "
                      "WHERE rolname LIKE 'pgrunner\\_%' ORDER BY 1")
    assert roles == [("pgrunner_producer", False),
                     ("pgrunner_worker", False)], roles
    r = run_pgrunner(["migrate", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    assert "roles not set up" not in r.stderr + r.stdout


def test_producer_adds_cancels_retries_reads_status_and_nothing_else(mdb):
    _, dsn = login(mdb, "pgrunner_producer")
    p = connect(dsn)
    # Add: the SQL API, a plain INSERT, keys (0004's trigger) and the CLI.
    t1 = scalar(p, "SELECT pgrunner.add_task('noop', key => 'k1')")
    assert scalar(p, "SELECT pgrunner.add_task('noop', key => 'k1')") == t1
    t2 = scalar(p, "INSERT INTO pgrunner.tasks (kind, payload, key) "
                   "VALUES ('noop', '{}', 'k2') RETURNING id")
    r = run_pgrunner(["add", "noop", "--key", "k3", "--db", dsn])
    assert r.returncode == 0, r.stderr
    t3 = int(r.stdout.strip())
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                      "WHERE id IN (%s, %s, %s) AND state = 'queued'",
                      (t1, t2, t3)) == 3
    # Cancel and retry, through the CLI and SQL.
    r = run_pgrunner(["cancel", str(t1), "--db", dsn])
    assert r.returncode == 0, r.stderr
    assert scalar(p, "SELECT pgrunner.cancel_task(%s)", (t2,)) is True
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                      "WHERE id IN (%s, %s) AND state = 'cancelled'",
                      (t1, t2)) == 2
    r = run_pgrunner(["retry", str(t1), "--db", dsn])
    assert r.returncode == 0, r.stderr
    assert scalar(p, "SELECT pgrunner.retry_task(%s)", (t2,)) is True
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                      "WHERE id IN (%s, %s) AND state = 'queued'",
                      (t1, t2)) == 2
    # Status.
    for args in (["status"], ["status", "--json"]):
        r = run_pgrunner(args + ["--db", dsn])
        assert r.returncode == 0, (args, r.stderr)
    assert json.loads(run_pgrunner(["status", "--json", "--db", dsn]).stdout)
    # Nothing else: no direct state change, no worker's function, no
    # running task made up by hand.
    forbidden = [
        ("UPDATE pgrunner.tasks SET state = 'succeeded' WHERE id = %s", (t3,)),
        ("DELETE FROM pgrunner.tasks WHERE id = %s", (t3,)),
        ("INSERT INTO pgrunner.tasks (kind, state, worker_id) "
         "VALUES ('noop', 'running', 1)", None),
        ("SELECT pgrunner.recover()", None),
        ("SELECT pgrunner.recover(false)", None),
        ("SELECT pgrunner.prune('0s')", None),
        ("SELECT pgrunner.heartbeat(1, 'x', 'h', 1, '{default}', 1, true)",
         None),
        ("DELETE FROM pgrunner.workers", None),
        ("SELECT pgrunner.setup_roles()", None),
    ]
    for sql, args in forbidden:
        with pytest.raises(psycopg2.errors.InsufficientPrivilege):
            scalar(p, sql, args)
    assert mdb.scalar("SELECT state FROM pgrunner.tasks WHERE id = %s",
                      (t3,)) == "queued"
    p.close()


def test_worker_login_runs_pgrunner_work_end_to_end(mdb, fw):
    db = jobs(mdb)
    # What the jobs touch is the application's to grant.
    db.query("GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA pgrunner_jobs "
             "TO pgrunner_worker")
    name, dsn = login(db, "pgrunner_worker")
    # A running task whose worker has no row: the once-a-minute sweep's.
    db.query("INSERT INTO pgrunner.tasks (kind, state, attempts, worker_id,"
             " started_at) VALUES ('noop', 'running', 1, 42, now())")
    orphan = db.scalar("SELECT max(id) FROM pgrunner.tasks")
    # A due schedule: the heartbeat fires it (INSERT as the worker).
    db.query("SELECT pgrunner.add_schedule('every', '* * * * *', 'noop')")
    db.query("UPDATE pgrunner.schedules SET next_run_at = now()")
    import types
    w = fw(types.SimpleNamespace(dsn=dsn), "--concurrency", "2",
           "--poll-interval", "200", "--retention", "1s")
    wid, wname = registered(db, w)
    assert db.scalar("SELECT login FROM pgrunner.workers WHERE id = %s",
                     (wid,)) == name
    ids = [add(db, "noop", {}), add(db, "slow", {"k": "a", "sleep": 0}),
           add(db, "raises", {"msg": "boom"}, max_attempts=2)]
    for tid in ids[:2]:
        t = finished(db, tid, w)
        assert t["state"] == "succeeded", t
    t = wait_task(db, ids[2], lambda t: t["state"] == "failed",
                  "the raising job to fail for good", w, timeout=60)
    assert t["attempts"] == 2 and "boom" in t["last_error"], t
    assert done_rows(db, "a") == [(wname,)]
    # Cancel a running task.
    tid = add(db, "slow", {"k": "c", "sleep": 30})
    wait_until(lambda: sleeping_in(db, wname), timeout=60,
               what="the job to sleep")
    assert db.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
    assert finished(db, tid, w)["state"] == "cancelled"
    # Recovery sweep, schedules, retention.
    t = finished(db, orphan, w, timeout=60)
    assert t["state"] == "succeeded" and t["attempts"] == 2, t
    # (Its task may be pruned already: retention is 1 s.)
    wait_until(lambda: db.scalar("SELECT last_run_at IS NOT NULL FROM "
                                 "pgrunner.schedules WHERE name = 'every'"),
               timeout=30, what="the schedule to fire")
    wait_until(lambda: "pruned succeeded tasks" in w.output(), timeout=60,
               what="retention to prune")
    out = w.output()
    for bad in ("permission denied", "heartbeat failed", "sweep failed",
                "retention pruning failed", "claim failed",
                "could not add its task", "liveness lock"):
        assert bad not in out, out[-4000:]
    assert w.stop() == 0, out[-4000:]


def worker_login_with_plain_grants(db):
    """A non-superuser login given the worker's privileges directly (not
    through pgrunner_worker), so the set-up means the same before 0013."""
    name = "w_" + uuid.uuid4().hex[:10]
    db.query(f'''
      CREATE ROLE "{name}" LOGIN;
      GRANT USAGE ON SCHEMA pgrunner, pgrunner_jobs TO "{name}";
      GRANT ALL ON ALL TABLES IN SCHEMA pgrunner, pgrunner_jobs TO "{name}";
      GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgrunner TO "{name}";
    ''')
    import types
    return types.SimpleNamespace(dsn=f"host={db.server.host} "
                                 f"port={db.server.port} user={name} "
                                 f"dbname={db.name}")


@pytest.mark.parametrize("takes_lock", [False, True],
                         ids=["application_name", "and_the_lock"])
def test_spoofing_session_does_not_strand_a_killed_workers_task(mdb, fw,
                                                                takes_lock):
    """Kill -9 a worker in the middle of a long task, then open a session of
    another login with its application_name (and, in the second case, its
    liveness lock too). The task must be given back and run by the other
    worker all the same. Before 0013 the name alone kept the worker 'alive'
    until its heartbeat was 30 s old, and then its recovery could not
    terminate the other login's session: the heartbeat failed for ever."""
    db = jobs(mdb)
    wdb = worker_login_with_plain_grants(db)
    a = fw(wdb, "--concurrency", "2", "--poll-interval", "200")
    a_id, a_name = registered(db, a)
    tid = add(db, "slow", {"k": "s", "sleep": 600})
    wait_task(db, tid, lambda t: t["state"] == "running"
              and t["worker_id"] == a_id, "the task running on A", a)
    wait_until(lambda: sleeping_in(db, a_name), timeout=60,
               what="A's job to sleep")
    _, spoof_dsn = login(db)
    a.kill()
    spoof = connect(spoof_dsn, application_name=a_name)
    try:
        if takes_lock:
            scalar(spoof, "SELECT pg_advisory_lock_shared(%s::bigint)",
                   (a_id,))
        # The killed worker's own sessions are gone; only the spoof is left.
        wait_until(lambda: db.scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (a_name,)) == 1, timeout=60, what="A's sessions to end")
        db.query("UPDATE pgrunner.tasks SET payload = '{\"k\": \"s\", "
                 "\"sleep\": 0}' WHERE id = %s", (tid,))
        b = fw(wdb, "--concurrency", "2", "--poll-interval", "200")
        b_id, b_name = registered(db, b)
        t = finished(db, tid, b, timeout=120)
        assert t["state"] == "succeeded" and t["attempts"] == 2, \
            (t, diag(db, b))
        assert t["worker_id"] == b_id, t
        assert done_rows(db, "s") == [(b_name,)]
        assert "heartbeat failed" not in b.output(), b.output()[-4000:]
        assert scalar(spoof, "SELECT 1") == 1  # left alone
    finally:
        spoof.close()
    assert b.stop() == 0



def test_every_second_recovery_reads_no_activity_or_lock_view(mdb, fw):
    """The heartbeat's recovery finds a killed worker dead without reading
    pg_stat_activity or pg_locks (a scan of every backend, each second, on
    a busy server): in a database where the worker's login may read
    neither, a killed worker is still forgotten, and no heartbeat fails."""
    db = jobs(mdb)
    db.query("REVOKE SELECT ON pg_catalog.pg_stat_activity FROM PUBLIC;"
             "REVOKE SELECT ON pg_catalog.pg_locks FROM PUBLIC")
    wdb = worker_login_with_plain_grants(db)
    a = fw(wdb, "--concurrency", "1", "--poll-interval", "200")
    a_id, _ = registered(db, a)
    b = fw(wdb, "--concurrency", "1", "--poll-interval", "200")
    registered(db, b)
    a.kill()
    wait_until(lambda: db.scalar("SELECT count(*) FROM pgrunner.workers "
                                 "WHERE id = %s", (a_id,)) == 0,
               timeout=120, what="the killed worker to be forgotten")
    tid = add(db, "slow", {"k": "after", "sleep": 0})
    assert finished(db, tid, b)["state"] == "succeeded"
    out = b.output()
    assert "heartbeat failed" not in out, out[-4000:]
    assert b.stop() == 0, out[-4000:]

def test_migrate_without_createrole_warns_and_a_later_run_grants(own_pg):
    """On a server where the roles do not exist yet, the schema's owner
    without CREATEROLE migrates all the same (exit 0, a warning naming the
    roles); once someone created them, its next migrate grants."""
    admin = own_pg.connect()
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE owner LOGIN")
        cur.execute("CREATE DATABASE app OWNER owner")
    dsn = f"host={own_pg.host} port={own_pg.port} user=owner dbname=app"
    r = run_pgrunner(["migrate", "--db", dsn])
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "roles not set up" in out, out
    assert "pgrunner_producer, pgrunner_worker" in out, out
    assert "CREATEROLE" in out, out
    with admin.cursor() as cur:
        cur.execute("CREATE ROLE pgrunner_producer NOLOGIN;"
                    "CREATE ROLE pgrunner_worker NOLOGIN")
    r = run_pgrunner(["migrate", "--db", dsn])
    assert r.returncode == 0, r.stderr
    assert "roles not set up" not in r.stdout + r.stderr
    app = own_pg.connect("app")
    with app.cursor() as cur:
        cur.execute("SELECT has_function_privilege('pgrunner_producer',"
                    " 'pgrunner.cancel_task(bigint)', 'EXECUTE'),"
                    " has_table_privilege('pgrunner_worker', 'pgrunner.tasks',"
                    " 'UPDATE'),"
                    " has_function_privilege('public', "
                    " 'pgrunner.recover(boolean)', 'EXECUTE')")
        assert cur.fetchone() == (True, True, False)
    app.close()
    admin.close()
