"""Fault tolerance end to end: real `pgrunner work` processes, a real
PostgreSQL (tests/support/pgr_fixtures.py), and real faults: kill -9 and
SIGSTOP of workers, a PostgreSQL restart under load, connections cut by a
TCP proxy or terminated by the server, time limits, cancellation, a
database that refuses the worker, and malformed input.

What each test checks is the SPEC's promise (sections 3-5): no task lost,
none completed twice, partial writes of an interrupted attempt never
committed, the worker keeps running. "Exactly once" is checked through the
jobs' own writes: every SQL job below inserts one row keyed by the task into
a table with a PRIMARY KEY, so a second committed execution could not
succeed (its insert would fail) and a lost one leaves no row.

No timing assertions: every wait is generous (a busy 2-core machine), and
the only time bound asserted is the SPEC's 30 s for picking up the tasks of a
killed worker. The workers' output is scanned for sanitizer reports at the
end of each test (PGRUNNER_BIN may be an ASan/UBSan or TSan build).
"""

import json
import os
import random
import re
import signal
import time
import types

import psycopg2
import pytest

from pgr_fixtures import SANITIZER_MARKS, free_port, new_db, password_role, \
    restart_pg, wait_until, run_pgrunner, PgServer, Db

# The jobs every test may use. `slow` is the job of the brief: insert a row
# keyed by the payload's "k" (the PRIMARY KEY makes a second committed
# execution impossible), then sleep. `held` sleeps only while the control
# row says so, so a first attempt can hang while a retry goes through.
JOBS_SQL = """
CREATE TABLE pgrunner_jobs.done (
  k   text PRIMARY KEY,
  app text NOT NULL,
  at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE FUNCTION pgrunner_jobs.slow(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.done (k, app)
  VALUES (p->>'k', current_setting('application_name'));
  PERFORM pg_sleep(coalesce((p->>'sleep')::float8, 3));
END $$;

CREATE TABLE pgrunner_jobs.ctl (hold boolean NOT NULL);
INSERT INTO pgrunner_jobs.ctl VALUES (false);
CREATE FUNCTION pgrunner_jobs.held(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.done (k, app)
  VALUES (p->>'k', current_setting('application_name'));
  IF (SELECT hold FROM pgrunner_jobs.ctl) THEN
    PERFORM pg_sleep(60);
  END IF;
END $$;

-- A job that swallows the server's statement_timeout once (SQLSTATE
-- 57014) and sleeps on, so only the worker's watchdog can stop it.
CREATE FUNCTION pgrunner_jobs.stubborn(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.done (k, app)
  VALUES (p->>'k', current_setting('application_name'));
  BEGIN
    PERFORM pg_sleep(coalesce((p->>'sleep')::float8, 5));
  EXCEPTION WHEN query_canceled THEN
    NULL;
  END;
  PERFORM pg_sleep(coalesce((p->>'sleep')::float8, 5));
END $$;

-- Records what it was given.
CREATE TABLE pgrunner_jobs.shapes (
  task_k text, typ text, len int, digest text
);
CREATE FUNCTION pgrunner_jobs.shape(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.shapes
  VALUES (CASE WHEN jsonb_typeof(p) = 'object' THEN p->>'k' END,
          jsonb_typeof(p), length(p::text), md5(p::text));
END $$;

-- A job that ends its own session, as a crashing backend would.
CREATE FUNCTION pgrunner_jobs.suicide(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.done (k, app)
  VALUES (p->>'k', current_setting('application_name'));
  PERFORM pg_terminate_backend(pg_backend_pid());
END $$;

CREATE FUNCTION pgrunner_jobs.raises(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '%', p->>'msg';
END $$;
"""


# --- helpers ----------------------------------------------------------------


@pytest.fixture
def fw(workers):
    """`workers`, plus a check of every worker's output for sanitizer
    reports and crashes once the test is over."""
    started = []

    def start(db, *args, env=None):
        w = workers(db, *args, env=env)
        started.append(w)
        return w

    yield start
    reports = []
    for w in started:
        out = w.output()
        if any(m in out for m in SANITIZER_MARKS):
            reports.append(f"--- worker pid {w.pid} ---\n{out[-8000:]}")
    assert not reports, "sanitizer report in worker output:\n" + \
        "\n".join(reports)


def jobs(db):
    db.query(JOBS_SQL)
    return db


def safe(f, default=None):
    """Run a query helper, treating a broken connection (the server is
    restarting) as `default`."""
    try:
        return f()
    except psycopg2.Error:
        return default


def add(db, kind, payload, **cols):
    """INSERT one task; returns its id."""
    names = ["kind", "payload"] + list(cols)
    vals = [kind, payload if isinstance(payload, str) else json.dumps(payload)]
    vals += list(cols.values())
    return db.scalar(
        f"INSERT INTO pgrunner.tasks ({', '.join(names)}) VALUES "
        f"({', '.join(['%s'] * len(vals))}) RETURNING id", vals)


def task(db, tid):
    rows = db.query("SELECT state, attempts, last_error, worker_id "
                    "FROM pgrunner.tasks WHERE id = %s", (tid,))
    if not rows:
        return None
    s, a, e, w = rows[0]
    return {"state": s, "attempts": a, "last_error": e, "worker_id": w}


def done_rows(db, k):
    return db.query("SELECT app FROM pgrunner_jobs.done WHERE k = %s", (k,))


def diag(db, *ws):
    """Text for a failed wait: the tasks' states and the workers' output."""
    parts = []
    try:
        parts.append("tasks by state: " + repr(db.query(
            "SELECT state, attempts, count(*) FROM pgrunner.tasks "
            "GROUP BY 1, 2 ORDER BY 1, 2")))
        parts.append("workers: " + repr(db.query(
            "SELECT id, name, pid, heartbeat_at FROM pgrunner.workers")))
        parts.append("sessions: " + repr(db.query(
            "SELECT pid, application_name, state, wait_event, "
            "left(query, 60) FROM pg_stat_activity "
            "WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()")))
    except psycopg2.Error as e:
        parts.append(f"(database not reachable: {e})")
    for w in ws:
        parts.append(f"--- worker pid {w.pid} (alive={w.alive()}) ---\n"
                     + w.output()[-6000:])
    return "\n".join(parts)


def wait(db, pred, what, *ws, timeout=60.0, interval=0.05):
    try:
        return wait_until(lambda: safe(pred), timeout=timeout,
                          interval=interval, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{diag(db, *ws)}") from None


def wait_task(db, tid, pred, what, *ws, timeout=60.0):
    return wait(db, lambda: (lambda t: t if t and pred(t) else None)(
        task(db, tid)), what, *ws, timeout=timeout)


def finished(db, tid, *ws, timeout=60.0):
    return wait_task(db, tid, lambda t: t["state"] in (
        "succeeded", "failed", "cancelled"), f"task {tid} to finish", *ws,
        timeout=timeout)


def registered(db, w, timeout=60.0):
    """Wait until worker process w is in pgrunner.workers; (id, name)."""
    return wait(db, lambda: (db.query(
        "SELECT id, name FROM pgrunner.workers WHERE pid = %s",
        (w.pid,)) or [None])[0], f"worker {w.pid} to register", w,
        timeout=timeout)


def sleeping_in(db, name):
    """Backend pids of sessions of worker `name` inside pg_sleep."""
    return [r[0] for r in db.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
        "AND wait_event = 'PgSleep'", (name,))]


def starts(w, tid):
    """How many attempts of task tid worker w started."""
    return len(re.findall(rf'msg="task started" task={tid} ', w.output()))


def stop_ok(w, db=None):
    rc = w.stop(timeout=90)
    assert rc == 0, f"worker exit code {rc}\n{w.output()[-6000:]}"


# --- 1. kill -9 in the middle of a task --------------------------------------


def test_kill9_mid_task_is_finished_once_by_another_worker(mdb, fw):
    db = jobs(mdb)
    a = fw(db, "--concurrency", "2", "--poll-interval", "200")
    a_id, a_name = registered(db, a)
    tid = add(db, "slow", {"k": "one", "sleep": 3})
    wait_task(db, tid, lambda t: t["state"] == "running"
              and t["worker_id"] == a_id, "task running on A", a)
    # A's attempt has inserted its row and is inside pg_sleep.
    wait(db, lambda: sleeping_in(db, a_name), "A's job to sleep", a)
    b = fw(db, "--concurrency", "2", "--poll-interval", "200")
    b_id, b_name = registered(db, b)

    a.kill()
    # SPEC: another worker runs it within 30 s.
    wait_task(db, tid, lambda t: t["attempts"] == 2 and t["worker_id"] != a_id
              and t["state"] != "queued" or t["state"] == "succeeded",
              "the task to be picked up again after kill -9", b, timeout=30)
    t = finished(db, tid, b)
    assert t["state"] == "succeeded" and t["attempts"] == 2, t
    # The killed attempt's insert never committed: one row, written by B.
    assert done_rows(db, "one") == [(b_name,)]
    assert starts(b, tid) == 1, b.output()[-3000:]
    assert db.scalar("SELECT count(*) FROM pgrunner.workers "
                     "WHERE id = %s", (a_id,)) == 0, "dead worker forgotten"
    assert "recovered tasks of dead workers" in b.output()
    stop_ok(b)


def test_kill9_on_the_last_attempt_fails_the_task(mdb, fw):
    db = jobs(mdb)
    a = fw(db, "--concurrency", "2", "--poll-interval", "200")
    a_id, a_name = registered(db, a)
    b = fw(db, "--concurrency", "2", "--poll-interval", "200",
           "--queues", "other")
    registered(db, b)  # alive, runs recovery, never claims this task
    tid = add(db, "slow", {"k": "last", "sleep": 5}, max_attempts=1)
    wait(db, lambda: sleeping_in(db, a_name), "A's job to sleep", a)
    a.kill()
    t = finished(db, tid, b, timeout=60)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert "worker died" in t["last_error"], t
    assert done_rows(db, "last") == []
    stop_ok(b)


# --- 2. PostgreSQL restart under load ---------------------------------------


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_postgres_restart_under_load_loses_and_doubles_nothing(own_pg, fw,
                                                               mode):
    db = jobs(new_db(own_pg))
    n = 2000
    # A poll interval of 10 minutes: after the restart, only LISTEN (resumed
    # on the new connection) and the catch-up claim can find work.
    w = fw(db, "--poll-interval", "600000")
    wid, _ = registered(db, w)
    db.query("INSERT INTO pgrunner.tasks (kind, payload) "
             "SELECT 'slow', jsonb_build_object('k', g::text, 'sleep', 0.002)"
             "  FROM generate_series(1, %s) g", (n,))
    wait(db, lambda: db.scalar("SELECT count(*) FROM pgrunner.tasks "
                               "WHERE state = 'succeeded'") >= 100,
         "some progress", w)
    before = db.scalar("SELECT count(*) FROM pgrunner.tasks "
                       "WHERE state = 'succeeded'")
    restart_pg(own_pg, mode)
    assert before < n, \
        f"the load finished before the restart ({before}); nothing tested"
    db.close()  # the old session died with the server

    wait(db, lambda: db.scalar("SELECT count(*) FROM pgrunner.tasks "
                               "WHERE state = 'succeeded'") == n,
         f"all {n} tasks to succeed after the restart", w, timeout=150)
    assert db.query("SELECT state, count(*) FROM pgrunner.tasks "
                    "GROUP BY 1") == [("succeeded", n)]
    assert db.scalar("SELECT count(*) FROM pgrunner_jobs.done") == n
    assert db.scalar("SELECT count(*) FROM pgrunner.tasks t WHERE NOT EXISTS"
                     " (SELECT 1 FROM pgrunner_jobs.done d "
                     "   WHERE d.k = t.payload->>'k')") == 0
    out = w.output()
    assert "database connection lost; reconnecting" in out, out[-4000:]
    # Same process, still alive, registered again, and still listening: a
    # new task runs at once although the fallback poll is 10 minutes away.
    assert w.alive(), out[-4000:]
    assert db.scalar("SELECT pid FROM pgrunner.workers WHERE id = %s",
                     (wid,)) == w.pid
    tid = add(db, "slow", {"k": "after", "sleep": 0})
    t = finished(db, tid, w, timeout=60)
    assert t["state"] == "succeeded", t
    stop_ok(w)


@pytest.mark.parametrize("mode", ["fast", "immediate"])
def test_restart_while_idle_spends_no_attempt(own_pg, fw, mode):
    """Every worker thread holds a connection the restart killed while it
    was idle. The first task each thread takes afterwards must run on a new
    connection, not fail on the dead one: with max_attempts=1 a spent
    attempt would leave the task failed."""
    db = jobs(new_db(own_pg))
    conc = 4
    w = fw(db, "--concurrency", str(conc), "--poll-interval", "200")
    _, name = registered(db, w)
    wait(db, lambda: db.scalar("SELECT count(*) FROM pg_stat_activity "
                               "WHERE application_name = %s", (name,))
         == conc + 2, "the loop's two and every thread to connect", w)
    restart_pg(own_pg, mode)
    db.close()  # the old session died with the server
    ids = [add(db, "slow", {"k": f"r{i}", "sleep": 0.2}, max_attempts=1)
           for i in range(2 * conc)]
    for tid in ids:
        t = finished(db, tid, w, timeout=90)
        assert t["state"] == "succeeded" and t["attempts"] == 1, \
            (t, w.output()[-4000:])
    assert db.scalar("SELECT count(*) FROM pgrunner_jobs.done") == 2 * conc
    assert "database connection lost during a task" not in w.output()
    stop_ok(w)


# --- 3. time limits ----------------------------------------------------------


# german_mdb: the server's statement_timeout is told by its SQLSTATE and the
# attempt's time, not by the English text of its message.
@pytest.mark.parametrize("database", ["mdb", "german_mdb"])
def test_task_timeout_fails_the_attempt_and_retries(database, request, fw):
    db = jobs(request.getfixturevalue(database))
    w = fw(db, "--task-timeout", "1", "--poll-interval", "200")
    tid = add(db, "slow", {"k": "t", "sleep": 5}, max_attempts=2)
    t = finished(db, tid, w, timeout=90)
    assert t["state"] == "failed" and t["attempts"] == 2, t
    assert "time limit" in t["last_error"], t
    assert done_rows(db, "t") == [], "an interrupted attempt committed"
    out = w.output()
    assert out.count("task started") >= 2 and "task retry scheduled" in out
    # The worker is fine afterwards.
    ok = add(db, "slow", {"k": "ok", "sleep": 0})
    assert finished(db, ok, w)["state"] == "succeeded"
    stop_ok(w)


def test_per_task_timeout_overrides_the_default(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--task-timeout", "300", "--concurrency", "1",
           "--poll-interval", "200")
    tid = add(db, "slow", {"k": "short", "sleep": 5}, max_attempts=1,
              timeout_seconds=1)
    t = finished(db, tid, w, timeout=60)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert "time limit" in t["last_error"] and "1 s" in t["last_error"], t
    assert done_rows(db, "short") == []
    # The override was local to that task: on the same (single) connection
    # a task longer than 1 s under the default limit succeeds, and so does
    # one with a roomy limit of its own.
    a = add(db, "slow", {"k": "long", "sleep": 2})
    b = add(db, "slow", {"k": "roomy", "sleep": 1.5}, timeout_seconds=30)
    assert finished(db, a, w)["state"] == "succeeded", task(db, a)
    assert finished(db, b, w)["state"] == "succeeded", task(db, b)
    stop_ok(w)


def test_watchdog_stops_a_job_that_swallows_statement_timeout(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--task-timeout", "1", "--poll-interval", "200")
    tid = add(db, "stubborn", {"k": "s", "sleep": 20}, max_attempts=1)
    # Without the watchdog the job would succeed after 40 s.
    t = finished(db, tid, w, timeout=60)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert "time limit" in t["last_error"], t
    assert done_rows(db, "s") == []
    assert "task over its time limit; interrupting" in w.output()
    stop_ok(w)


# --- 4. cancellation ---------------------------------------------------------


def test_cancel_a_running_task(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--concurrency", "2", "--poll-interval", "200")
    _, name = registered(db, w)
    tid = add(db, "slow", {"k": "c", "sleep": 30})
    wait_task(db, tid, lambda t: t["state"] == "running", "running", w)
    wait(db, lambda: sleeping_in(db, name), "the job to sleep", w)
    assert db.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
    # Interrupted, not left to finish its 30 s sleep and succeed.
    t = finished(db, tid, w, timeout=60)
    assert t["state"] == "cancelled", t
    assert t["attempts"] == 1, t
    assert done_rows(db, "c") == [], "the cancelled attempt's write committed"
    assert db.scalar("SELECT count(*) FROM pgrunner.cancel_requests") == 0
    # A finished task cannot be cancelled again.
    assert db.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is False
    # The worker keeps running other tasks.
    ids = [add(db, "slow", {"k": f"o{i}", "sleep": 0.01}) for i in range(20)]
    for i in ids:
        assert finished(db, i, w)["state"] == "succeeded", task(db, i)
    assert w.alive()
    stop_ok(w)


# --- 5. random kill -9s of several workers -----------------------------------


def test_random_kills_of_three_workers_run_every_task_once(mdb, fw):
    db = jobs(mdb)
    n = 600
    args = ("--concurrency", "4", "--poll-interval", "200")
    live = [fw(db, *args) for _ in range(3)]
    for w in live:
        registered(db, w)
    # A SQL task's whole transaction is one pipeline: a worker killed after
    # sending it does not stop the server from committing it. Only a task
    # still running when the server notices the dead client (within the
    # 1 s client_connection_check_interval) is rolled back and recovered,
    # so one task in ten sleeps 2 s: most of the threads' time, so the kills
    # hit some.
    db.query("INSERT INTO pgrunner.tasks (kind, payload) "
             "SELECT 'slow', jsonb_build_object('k', g::text, 'sleep',"
             "       CASE WHEN g %% 10 = 0 THEN 2.0 ELSE 0.05 END)"
             "  FROM generate_series(1, %s) g", (n,))
    seed = os.environ.get("PGR_FAULT_SEED") or str(random.randrange(1 << 30))
    print(f"kill schedule seed: PGR_FAULT_SEED={seed}")
    rng = random.Random(seed)
    killed, all_workers = 0, list(live)
    for _ in range(6):
        time.sleep(rng.uniform(1.0, 2.0))
        left = db.scalar("SELECT count(*) FROM pgrunner.tasks "
                         "WHERE state <> 'succeeded'")
        if left == 0:
            break
        victim = rng.choice(live)
        victim.kill()
        killed += 1
        live.remove(victim)
        w = fw(db, *args)
        live.append(w)
        all_workers.append(w)
    assert killed >= 3, "the load finished before the kills; nothing tested"

    wait(db, lambda: db.scalar("SELECT count(*) FROM pgrunner.tasks "
                               "WHERE state = 'succeeded'") == n,
         f"all {n} tasks to succeed", *live, timeout=300)
    assert db.query("SELECT state, count(*) FROM pgrunner.tasks "
                    "GROUP BY 1") == [("succeeded", n)]
    assert db.scalar("SELECT count(*) FROM pgrunner_jobs.done") == n
    assert db.scalar("SELECT count(DISTINCT k) FROM pgrunner_jobs.done") == n
    recovered = db.scalar("SELECT count(*) FROM pgrunner.tasks "
                          "WHERE attempts > 1")
    assert recovered > 0, "no kill hit a running task; nothing tested"
    # The dead are forgotten; only the live remain registered.
    pids = {w.pid for w in live}
    wait(db, lambda: {r[0] for r in db.query(
        "SELECT pid FROM pgrunner.workers")} == pids,
        "only live workers registered", *live)
    for w in live:
        stop_ok(w)


# --- 6. a database that refuses the worker -----------------------------------


@pytest.mark.parametrize("form", ["keywords", "url"])
def test_unreachable_database_is_retried_with_a_clear_warning(fw, form):
    port = free_port()
    secret = "Sekr3t-pw-917"
    dsn = (f"host=127.0.0.1 port={port} user=postgres password={secret} "
           f"dbname=nowhere" if form == "keywords" else
           f"postgresql://postgres:{secret}@127.0.0.1:{port}/nowhere")
    w = fw(types.SimpleNamespace(dsn=dsn), "--concurrency", "2")
    wait_until(lambda: w.output().count(
        "database connection failed; retrying") >= 3 or not w.alive(),
        timeout=60, what="three connection attempts")
    out = w.output()
    assert w.alive(), f"the worker gave up:\n{out}"
    assert secret not in out, f"password in the output:\n{out}"
    assert re.search(r"refused|could not connect|connection to server", out,
                     re.I), out
    assert str(port) in out, "the warning should say where it tried"
    stop_ok(w)
    assert secret not in w.output()


def test_database_that_comes_up_later_is_used(fw, tmp_path):
    server = PgServer()
    try:
        name = "later"
        dsn = (f"host=127.0.0.1 port={server.port} user={server.user} "
               f"dbname={name}")
        w = fw(types.SimpleNamespace(dsn=dsn), "--concurrency", "2",
               "--poll-interval", "200")
        wait_until(lambda: w.output().count("connection failed") >= 2
                   or not w.alive(), timeout=60, what="failed attempts")
        assert w.alive(), w.output()
        # The worker must never see the server without the database (an
        # unknown database at start ends it: exit 1), nor the database
        # unmigrated: build it, with a task in it, on another port, then
        # move the server to the port the worker tries.
        port = server.port
        server.port = free_port()
        server.start()
        db = new_db(server)
        jobs(db)
        add(db, "slow", {"k": "late", "sleep": 0})
        db.close()
        server.connect().cursor().execute(
            f'ALTER DATABASE "{db.name}" RENAME TO "{name}"')
        server.pg_ctl("stop", "-m", "fast", "-w")
        with open(os.path.join(server.data, "postgresql.conf"), "a") as f:
            f.write(f"\nport = {port}\n")
        server.port = port
        server.pg_ctl("start", "-w", "-t", "60")
        db = Db(server, name)
        tid = db.scalar("SELECT id FROM pgrunner.tasks")
        t = finished(db, tid, w, timeout=90)
        assert t["state"] == "succeeded", t
        stop_ok(w)
        db.close()
    finally:
        server.stop()


def test_wrong_password_fails_clearly_without_the_password(own_pg, fw):
    db = new_db(own_pg)
    jobs(db)
    right, wrong = "Right-pw-5521", "Wrong-pw-7730"
    base = password_role(own_pg, db, "pwuser", right)

    def password_checked():
        r = run_pgrunner(["migrate", "--db", f"{base} password={wrong}"])
        return r if "password" in r.stderr else None

    r = wait_until(password_checked, timeout=30, interval=0.2,
                   what="pg_hba reload")
    # A one-shot command fails with the server's reason, not the password.
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "password authentication failed" in r.stderr, r.stderr
    assert wrong not in r.stderr + r.stdout

    # The worker: a clear message, never the password, and exit 1 at start
    # (waiting cannot heal it: SPEC "Health tells the truth").
    w = fw(types.SimpleNamespace(dsn=f"{base} password={wrong}"),
           "--concurrency", "2")
    wait_until(lambda: not w.alive(), timeout=60, what="the worker exits")
    assert w.proc.returncode == 1, w.output()
    out = w.output()
    assert "password authentication failed" in out, out
    assert wrong not in out, out

    # The set-up is real: the right password works.
    good = fw(types.SimpleNamespace(dsn=f"{base} password={right}"),
              "--poll-interval", "200")
    tid = add(db, "slow", {"k": "pw", "sleep": 0})
    assert finished(db, tid, good)["state"] == "succeeded"
    assert right not in good.output()
    stop_ok(good)


# --- 7. bad input ------------------------------------------------------------


def test_odd_payloads_reach_a_sql_job_intact(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--poll-interval", "200")
    big = {"k": "big", "blob": "x" * (1024 * 1024),
           "uni": "\u00e9\u2028\U0001F600 \"q\" \\ \t"}
    payloads = ["[1, 2, {\"k\": 3}]", "\"just a string\"", "42", "null",
                "[]", json.dumps(big),
                json.dumps({"k": "deep", "d": [[[[[[[[[[1]]]]]]]]]]})]
    ids = [add(db, "shape", p) for p in payloads]
    for tid in ids:
        t = finished(db, tid, w, timeout=90)
        assert t["state"] == "succeeded", (t, task(db, tid))
    got = db.query("SELECT typ, count(*) FROM pgrunner_jobs.shapes "
                   "GROUP BY 1 ORDER BY 1")
    assert got == [("array", 2), ("null", 1), ("number", 1), ("object", 2),
                   ("string", 1)], got
    # The megabyte arrived byte for byte.
    assert db.scalar(
        "SELECT s.digest = md5(t.payload::text) AND s.len > 1048576 "
        "FROM pgrunner_jobs.shapes s, pgrunner.tasks t "
        "WHERE s.task_k = 'big' AND t.payload->>'k' = 'big'") is True
    stop_ok(w)


def test_bad_kinds_and_raising_jobs_fail_with_the_reason(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--poll-interval", "200")
    bad_name = add(db, 'x"; DROP TABLE pgrunner.tasks; --', {})
    missing = add(db, "no_such_job", {})
    outside = add(db, "pg_sleep", {})  # exists, but not in the jobs schema
    raising = add(db, "raises", {"msg": "boom\x01\nline2\ttab " + "y" * 5000},
                  max_attempts=1)
    for tid, reason in ((bad_name, "no handler for kind"),
                        (missing, 'no handler for kind "no_such_job"'),
                        (outside, 'no handler for kind "pg_sleep"')):
        t = finished(db, tid, w)
        assert t["state"] == "failed" and t["attempts"] == 1, t
        assert reason in t["last_error"], t
    t = finished(db, raising, w)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert t["last_error"].startswith("boom"), t
    assert "\x01" not in t["last_error"], "last_error must be printable"
    assert "y" * 5000 in t["last_error"] or len(t["last_error"]) > 1000, t
    assert db.scalar("SELECT count(*) FROM pgrunner.tasks") == 4
    stop_ok(w)


@pytest.mark.parametrize("payload,reason", [
    ('{"to": 5}', '"to"'),
    ('[1, 2]', ""),
    ('"a@example.com"', ""),
])
def test_wrong_shaped_email_fails_at_once(mdb, fw, smtp, payload, reason):
    w = fw(mdb, "--poll-interval", "200",
           env=smtp.env(PGRUNNER_MAIL_FROM="pgrunner@example.org"))
    tid = add(mdb, "email", payload)
    t = finished(mdb, tid, w)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert t["last_error"] and reason in t["last_error"], t
    assert smtp.messages() == []
    # The worker is unharmed.
    ok = add(mdb, "email", {"to": "ok@example.com", "text": "fine"})
    assert finished(mdb, ok, w)["state"] == "succeeded", task(mdb, ok)
    stop_ok(w)


# --- 8. a long healthy task is never stolen ----------------------------------


def test_long_healthy_task_is_not_stolen(mdb, fw):
    db = jobs(mdb)
    a = fw(db, "--concurrency", "2", "--poll-interval", "200")
    a_id, a_name = registered(db, a)
    tid = add(db, "slow", {"k": "long", "sleep": 8})
    wait(db, lambda: sleeping_in(db, a_name), "the job to sleep", a)
    b = fw(db, "--concurrency", "2", "--poll-interval", "200")
    registered(db, b)
    t = finished(db, tid, a, b, timeout=90)
    assert t["state"] == "succeeded" and t["attempts"] == 1, t
    assert done_rows(db, "long") == [(a_name,)]
    for w in (a, b):
        assert "recovered tasks" not in w.output(), w.output()[-3000:]
        assert starts(w, tid) == (1 if w is a else 0), w.output()[-3000:]
        stop_ok(w)


# --- more connection faults --------------------------------------------------


def loop_backend(db, name):
    """The backend of worker `name`'s loop connection (the one that
    listens and claims; the other loop connection heartbeats and prunes)."""
    rows = db.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
        "AND (query LIKE 'WITH q AS%%' OR query LIKE '%%LISTEN%%'"
        "     OR query LIKE '%%pgrunner.release_unknown(%%')",
        (name,))
    return rows[0][0] if len(rows) == 1 else None


def test_loop_connection_killed_mid_task_steals_nothing(mdb, fw):
    db = jobs(mdb)
    a = fw(db, "--concurrency", "2", "--poll-interval", "200")
    a_id, a_name = registered(db, a)
    b = fw(db, "--concurrency", "2", "--poll-interval", "200")
    registered(db, b)
    tid = add(db, "slow", {"k": "lc", "sleep": 6})
    wait_task(db, tid, lambda t: t["worker_id"] is not None, "claimed", a, b)
    owner_id = task(db, tid)["worker_id"]
    owner, owner_name = (a, a_name) if owner_id == a_id else \
        (b, db.scalar("SELECT name FROM pgrunner.workers WHERE id = %s",
                      (owner_id,)))
    wait(db, lambda: sleeping_in(db, owner_name), "the job to sleep", owner)
    pid = wait(db, lambda: loop_backend(db, owner_name),
               "the loop backend", owner)
    assert db.scalar("SELECT pg_terminate_backend(%s)", (pid,)) is True
    t = finished(db, tid, a, b, timeout=60)
    assert t["state"] == "succeeded" and t["attempts"] == 1, t
    assert done_rows(db, "lc") == [(owner_name,)]
    # The owner reconnected and registered again, and keeps working.
    wait(db, lambda: "database connection lost; reconnecting" in
         owner.output() and owner.output().count("worker registered") >= 2,
         "the owner to re-register", owner)
    b.stop() if owner is a else a.stop()
    tid2 = add(db, "slow", {"k": "lc2", "sleep": 0})
    assert finished(db, tid2, owner)["state"] == "succeeded"
    stop_ok(owner)


def test_task_connection_killed_mid_task_is_retried_once(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--concurrency", "2", "--poll-interval", "200")
    _, name = registered(db, w)
    tid = add(db, "slow", {"k": "tc", "sleep": 4})
    pids = wait(db, lambda: sleeping_in(db, name), "the job to sleep", w)
    assert db.scalar("SELECT pg_terminate_backend(%s)", (pids[0],)) is True
    t = finished(db, tid, w, timeout=90)
    assert t["state"] == "succeeded" and t["attempts"] == 2, t
    assert done_rows(db, "tc") == [(name,)]
    assert "database connection lost during a task" in w.output()
    stop_ok(w)


def test_connection_cut_during_a_claim_loses_no_task(mdb, fw, tcp_proxy, pg):
    """The claim commits in the database but its answer never reaches the
    worker (the network path dies in between). The claimed task must still
    run: SPEC 'No task is lost'. A trigger makes the claim slow enough to
    cut the connection at that moment."""
    db = jobs(mdb)
    db.query("""
      CREATE FUNCTION pgrunner_jobs.slow_claim() RETURNS trigger
      LANGUAGE plpgsql AS $$
      BEGIN
        IF OLD.state = 'queued' AND NEW.state = 'running'
           AND NEW.payload->>'slowclaim' = 'yes' THEN
          PERFORM pg_sleep(3);
        END IF;
        RETURN NEW;
      END $$;
      CREATE TRIGGER slow_claim BEFORE UPDATE ON pgrunner.tasks
        FOR EACH ROW EXECUTE FUNCTION pgrunner_jobs.slow_claim();
    """)
    proxy = tcp_proxy(pg.host, pg.port)
    dsn = f"host=127.0.0.1 port={proxy.port} user={pg.user} dbname={db.name}"
    w = fw(types.SimpleNamespace(dsn=dsn), "--concurrency", "2",
           "--poll-interval", "200")
    _, name = registered(db, w)
    tid = add(db, "slow", {"k": "cut", "sleep": 0, "slowclaim": "yes"})
    wait(db, lambda: db.query(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = %s "
        "AND wait_event = 'PgSleep' AND query LIKE 'WITH q AS%%'", (name,)),
        "the claim to be in the database", w)
    assert proxy.cut() >= 1
    t = finished(db, tid, w, timeout=60)
    assert t["state"] == "succeeded", t
    assert done_rows(db, "cut") == [(name,)]
    stop_ok(w)


def test_stopped_worker_task_is_taken_over_after_stale_heartbeat(mdb, fw):
    """A worker that stops responding (SIGSTOP: a hung machine) keeps its
    sessions open, so only the 30 s heartbeat rule can declare it dead. Its
    task then runs elsewhere, and when it wakes up it neither completes the
    task a second time nor dies."""
    db = jobs(mdb)
    db.query("UPDATE pgrunner_jobs.ctl SET hold = true")
    a = fw(db, "--concurrency", "2", "--poll-interval", "200")
    a_id, a_name = registered(db, a)
    tid = add(db, "held", {"k": "h"})
    wait(db, lambda: sleeping_in(db, a_name), "A's job to hang", a)
    b = fw(db, "--concurrency", "2", "--poll-interval", "200")
    b_id, b_name = registered(db, b)
    a.signal(signal.SIGSTOP)
    try:
        db.query("UPDATE pgrunner_jobs.ctl SET hold = false")
        t = finished(db, tid, b, timeout=120)
        assert t["state"] == "succeeded" and t["attempts"] == 2, t
        assert t["worker_id"] == b_id, t
        assert done_rows(db, "h") == [(b_name,)]
    finally:
        a.signal(signal.SIGCONT)
    # A wakes up: its sessions were ended; it reconnects and carries on.
    wait(db, lambda: a.output().count("worker registered") >= 2,
         "A to register again", a, timeout=60)
    # Its own attempt, when it learns of it, is recognised as no longer its.
    wait(db, lambda: re.search(rf'no longer ours; dropped" task={tid} ',
                               a.output()),
         "A to drop its stale attempt", a, timeout=60)
    assert task(db, tid)["state"] == "succeeded"
    assert done_rows(db, "h") == [(b_name,)]
    stop_ok(b)
    tid2 = add(db, "held", {"k": "h2"})
    assert finished(db, tid2, a)["state"] == "succeeded"
    assert done_rows(db, "h2") == [(a_name,)]
    stop_ok(a)


def test_commit_whose_answer_is_lost_counts_once(mdb, fw, tcp_proxy, pg):
    """The attempt's COMMIT goes through but the network path dies before
    the worker hears so. After reconnecting it must find the attempt
    committed: succeeded once, not retried, not run again."""
    db = jobs(mdb)
    proxy = tcp_proxy(pg.host, pg.port)
    dsn = f"host=127.0.0.1 port={proxy.port} user={pg.user} dbname={db.name}"
    w = fw(types.SimpleNamespace(dsn=dsn), "--concurrency", "1",
           "--poll-interval", "200")
    _, name = registered(db, w)
    tid = add(db, "slow", {"k": "uc", "sleep": 2})
    wait(db, lambda: sleeping_in(db, name), "the job to sleep", w)
    proxy.freeze()
    try:
        # The whole transaction was sent as one pipeline: it commits while
        # its answers are held by the proxy.
        wait_task(db, tid, lambda t: t["state"] == "succeeded",
                  "the attempt to commit", w)
        proxy.cut()
    finally:
        proxy.freeze(False)
    wait(db, lambda: re.search(rf'msg="task succeeded" task={tid} ',
                               w.output()),
         "the worker to find the attempt committed", w)
    t = task(db, tid)
    assert t["state"] == "succeeded" and t["attempts"] == 1, t
    assert done_rows(db, "uc") == [(name,)]
    out = w.output()
    assert "database connection lost during a task" in out, out[-3000:]
    assert starts(w, tid) == 1, out[-3000:]
    tid2 = add(db, "slow", {"k": "uc2", "sleep": 0})
    assert finished(db, tid2, w)["state"] == "succeeded"
    stop_ok(w)


def test_tasks_added_while_cut_off_run_after_reconnect(mdb, fw, tcp_proxy,
                                                       pg):
    """Notifications sent while the worker's connection is down are lost;
    the worker must catch up on reconnecting (the fallback poll is 10
    minutes away)."""
    db = jobs(mdb)
    proxy = tcp_proxy(pg.host, pg.port)
    dsn = f"host=127.0.0.1 port={proxy.port} user={pg.user} dbname={db.name}"
    w = fw(types.SimpleNamespace(dsn=dsn), "--concurrency", "2",
           "--poll-interval", "600000")
    registered(db, w)
    proxy.refuse()
    proxy.cut()
    db.query("INSERT INTO pgrunner.tasks (kind, payload) "
             "SELECT 'slow', jsonb_build_object('k', g::text, 'sleep', 0)"
             "  FROM generate_series(1, 50) g")
    wait_until(lambda: "database connection failed; retrying" in w.output(),
               timeout=60, what="a refused reconnect")
    proxy.refuse(False)
    wait(db, lambda: db.scalar("SELECT count(*) FROM pgrunner.tasks "
                               "WHERE state = 'succeeded'") == 50,
         "the 50 tasks to run after the reconnect", w, timeout=120)
    assert db.scalar("SELECT count(*) FROM pgrunner_jobs.done") == 50
    stop_ok(w)


def test_job_that_kills_its_own_session(mdb, fw):
    db = jobs(mdb)
    w = fw(db, "--concurrency", "2", "--poll-interval", "200")
    tid = add(db, "suicide", {"k": "x"}, max_attempts=2)
    t = finished(db, tid, w, timeout=90)
    assert t["state"] == "failed" and t["attempts"] == 2, t
    assert "connection" in t["last_error"], t
    assert done_rows(db, "x") == []
    assert w.alive()
    tid2 = add(db, "slow", {"k": "y", "sleep": 0})
    assert finished(db, tid2, w)["state"] == "succeeded"
    stop_ok(w)
