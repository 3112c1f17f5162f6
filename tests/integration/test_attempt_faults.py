"""A worker thread's session terminated in every phase of an attempt
(issue 12, "A killed connection strands tasks as running").

`pg_terminate_backend`, as a DBA or a failover does it, ends a worker
thread's session while it is at a chosen point of an attempt: before BEGIN
is processed (ended while idle, the end held by a TCP proxy until the
attempt's pipeline was sent), inside lock_attempt, inside the job (a SQL
function or a C handler of tests/plugins), inside complete_attempt, at
COMMIT (rolled back), at COMMIT after it committed locally (waiting for a
synchronous standby; its answer lost), and with a pipeline run but its Sync
held back by the proxy (after COMMIT, or after a C handler's opening
pair), where the FATAL arrives as the pipeline's last answer. Each point is
reached deterministically: the session blocks on a lock the test holds (an
advisory lock taken by a trigger or by the job, or the ACCESS EXCLUSIVE
lock on pgrunner.cancel_requests that lock_attempt reads), waits for a
standby that does not exist, or waits for the held Sync; the test finds it
in pg_locks / pg_stat_activity, checks which statement it is in,
terminates it and waits for it to be gone, and only then lets go.

Every task must end succeeded with its effect once (the effect tables have
a PRIMARY KEY on the task's key, so a second committed run could not
commit), an interrupted attempt counted, no task left running, and the
worker must never have failed to record an attempt.

The load variant terminates random worker-thread sessions every ~0.3 s
while several hundred tasks run.
"""

import json
import random
import re
import threading
import types

import pytest

from pgr_fixtures import wait_until
# The helpers of the other fault tests and of the plugin tests.
from test_faults import SANITIZER_MARKS, diag, wait
from test_plugin import plugin_path

SETUP_SQL = """
CREATE TABLE pgrunner_jobs.effects (k text PRIMARY KEY);
CREATE TABLE public.plugin_out (v text PRIMARY KEY, task bigint);

-- The SQL job: one row keyed by the task, then an optional short sleep
-- (the load variant's tasks take long enough to be hit mid-way).
CREATE FUNCTION pgrunner_jobs.effect(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.effects (k) VALUES (p->>'k');
  IF p ? 'sleep' THEN
    PERFORM pg_sleep((p->>'sleep')::float8);
  END IF;
END $$;

-- Inside the job: the job's own insert (the SQL function's, or the C
-- handler's through the task's connection) waits on advisory lock 3.
CREATE FUNCTION public.hold_job() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF (to_jsonb(NEW)->>(TG_ARGV[0])) LIKE 'job-%' THEN
    PERFORM pg_advisory_xact_lock(4242, 3);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER hold_job BEFORE INSERT ON pgrunner_jobs.effects
  FOR EACH ROW EXECUTE FUNCTION public.hold_job('k');
CREATE TRIGGER hold_job BEFORE INSERT ON public.plugin_out
  FOR EACH ROW EXECUTE FUNCTION public.hold_job('v');

-- At the completion: complete_attempt's UPDATE waits on advisory lock 1.
-- For 'commit_sent' the transaction's COMMIT waits for a synchronous
-- standby (the test names one that never comes).
CREATE FUNCTION public.hold_complete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.payload->>'hold' = 'complete' THEN
    PERFORM pg_advisory_xact_lock(4242, 1);
  ELSIF NEW.payload->>'hold' = 'commit_sent' THEN
    PERFORM set_config('synchronous_commit', 'on', true);
  END IF;
  RETURN NEW;
END $$;
CREATE TRIGGER hold_complete BEFORE UPDATE ON pgrunner.tasks
  FOR EACH ROW WHEN (OLD.state = 'running' AND NEW.state = 'succeeded')
  EXECUTE FUNCTION public.hold_complete();

-- At COMMIT: a deferred trigger, run by COMMIT, waits on advisory lock 2.
CREATE FUNCTION public.hold_commit() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  IF NEW.payload->>'hold' = 'commit' THEN
    PERFORM pg_advisory_xact_lock(4242, 2);
  END IF;
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER hold_commit AFTER UPDATE ON pgrunner.tasks
  DEFERRABLE INITIALLY DEFERRED
  FOR EACH ROW WHEN (OLD.state = 'running' AND NEW.state = 'succeeded')
  EXECUTE FUNCTION public.hold_commit();
"""

# What must never appear in a worker's output.
NEVER = ("cannot record failed attempt", "no longer ours; dropped",
         "cannot exit pipeline mode",
         "not allowed in pipeline mode")

# The advisory lock (4242, n) each phase waits on.
ADVISORY = {"complete": 1, "commit": 2, "job": 3}

# The statement the terminated session must be in, per phase and kind.
STATEMENT = {
    "lock": "lock_attempt",
    "complete": "complete_attempt",
    "commit": "COMMIT",
    "commit_sent": "COMMIT",
    ("job", "sql"): "effect",
    ("job", "c"): "INSERT INTO plugin_out",
}


@pytest.fixture
def jdb(mdb):
    mdb.query(SETUP_SQL)
    return mdb


def check_output(w):
    out = w.output()
    for m in NEVER + SANITIZER_MARKS:
        assert m not in out, f"{m!r} in the worker's output:\n{out[-8000:]}"


def thread_pids(w):
    """The current backend pid of each worker thread, from the debug log."""
    pids = {}
    for t, pid in re.findall(
            r'msg="worker connected" thread=(\d+) backend_pid=(\d+)',
            w.output()):
        pids[int(t)] = int(pid)
    return pids


def start_worker(db, workers, concurrency, via=None):
    w = workers(via or db, "--concurrency", str(concurrency), "--poll-interval",
                "200", "--log-level", "debug", "--plugin", plugin_path())
    wait(db, lambda: len(thread_pids(w)) == concurrency and db.scalar(
        "SELECT count(*) FROM pgrunner.workers WHERE pid = %s", (w.pid,)),
        "the worker to register and its threads to connect", w)
    return w


def add(db, kind, payload, **cols):
    names = ["kind", "payload"] + list(cols)
    vals = [kind, json.dumps(payload)] + list(cols.values())
    return db.scalar(
        f"INSERT INTO pgrunner.tasks ({', '.join(names)}) VALUES "
        f"({', '.join(['%s'] * len(vals))}) RETURNING id", vals)


def blocked_on_advisory(db, n):
    """Worker sessions waiting for advisory lock (4242, n): [(pid, query)]."""
    return db.query(
        "SELECT l.pid, a.query FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND NOT l.granted"
        "   AND l.classid = 4242 AND l.objid = %s AND l.objsubid = 2"
        "   AND a.application_name LIKE 'pgrunner/%%'", (n,))


def blocked_on_cancel_requests(db):
    return db.query(
        "SELECT l.pid, a.query FROM pg_locks l"
        " JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'relation' AND NOT l.granted"
        "   AND l.relation = 'pgrunner.cancel_requests'::regclass"
        "   AND a.application_name LIKE 'pgrunner/%%'"
        "   AND a.query LIKE '%%lock_attempt%%'")


def waiting_for_standby(db):
    return db.query(
        "SELECT pid, query FROM pg_stat_activity"
        " WHERE wait_event = 'SyncRep'"
        "   AND application_name LIKE 'pgrunner/%%'")


def terminate(db, pid):
    """Terminate a session and wait until it is gone."""
    assert db.scalar("SELECT pg_terminate_backend(%s, 60000)", (pid,)) is True


@pytest.fixture
def no_standby(pg):
    """Commits that ask for it (synchronous_commit = on) wait for a standby
    that never connects; every other commit is local."""
    admin = pg.connect()

    def conf(sets):
        with admin.cursor() as cur:
            for k, v in sets:
                if v is None:
                    cur.execute(f"ALTER SYSTEM RESET {k}")
                else:
                    cur.execute(f"ALTER SYSTEM SET {k} = %s", (v,))
            cur.execute("SELECT pg_reload_conf()")

    def applied(v):
        # A session started after the postmaster reloaded sees the value;
        # by then the postmaster has signalled every running backend,
        # which applies it before its next command.
        c = pg.connect()
        try:
            with c.cursor() as cur:
                cur.execute("SHOW synchronous_standby_names")
                return cur.fetchone()[0] == v
        finally:
            c.close()

    conf([("synchronous_commit", "local"),
          ("synchronous_standby_names", "pgr_nobody")])
    wait_until(lambda: applied("pgr_nobody"), what="the reload")
    try:
        yield
    finally:
        conf([("synchronous_standby_names", None),
              ("synchronous_commit", None)])
        wait_until(lambda: applied(""), what="the reload")
        admin.close()


PHASES = ["begin", "lock", "job", "complete", "commit", "commit_sent",
          "sync", "open_sync"]


# A SQL task's attempt is one pipeline: its "open_sync" is "sync".
@pytest.mark.parametrize("phase,kind", [
    (p, k) for p in PHASES for k in ("sql", "c")
    if (p, k) != ("open_sync", "sql")])
def test_session_terminated_in_each_phase(jdb, workers, request, tcp_proxy,
                                          pg, kind, phase):
    db = jdb
    if phase == "commit_sent":
        request.getfixturevalue("no_standby")
    proxy = tcp_proxy(pg.host, pg.port)
    via = types.SimpleNamespace(dsn=f"host=127.0.0.1 port={proxy.port} "
                                f"user={pg.user} dbname={db.name}")
    w = start_worker(db, workers, 1, via)
    key = f"{phase}-{kind}"
    payload = {"k": key, "v": key, "hold": phase}
    task_kind = "effect" if kind == "sql" else "c_insert"
    holder = db.connect()
    hc = holder.cursor()
    try:
        if phase == "begin":
            # Before BEGIN is processed: the session ends while the thread
            # waits for work, but the thread hears of it only after it
            # sent the attempt's pipeline (the proxy holds the server's
            # FATAL until then), as when a termination and an attempt
            # cross on the wire.
            (pid,) = thread_pids(w).values()
            port = db.scalar("SELECT client_port FROM pg_stat_activity"
                             " WHERE pid = %s", (pid,))
            proxy.hold(port)
            terminate(db, pid)
            find = None
        elif phase == "lock":
            hc.execute("BEGIN")
            hc.execute("LOCK TABLE pgrunner.cancel_requests IN ACCESS "
                       "EXCLUSIVE MODE")
            find = lambda: blocked_on_cancel_requests(db)
        elif phase == "commit_sent":
            find = lambda: waiting_for_standby(db)
        elif phase in ("sync", "open_sync"):
            # sync: after COMMIT, before the Sync that closes the pipeline:
            # the attempt committed, and its session ends before it
            # answers (its results and the FATAL arrive together).
            # open_sync: the same after a C handler's opening pipeline
            # (BEGIN and the lock): nothing committed.
            (pid,) = thread_pids(w).values()
            port = db.scalar("SELECT client_port FROM pg_stat_activity"
                             " WHERE pid = %s", (pid,))
            proxy.hold_sync(port, marker=b"COMMIT" if phase == "sync"
                            else b"lock_attempt")
            find = None
        else:
            hc.execute("SELECT pg_advisory_lock(4242, %s)",
                       (ADVISORY[phase],))
            find = lambda: blocked_on_advisory(db, ADVISORY[phase])
        tid = add(db, task_kind, payload, max_attempts=3)
        if phase == "sync":
            wait(db, lambda: proxy.sync_is_held(port) and db.scalar(
                "SELECT state = 'succeeded' FROM pgrunner.tasks"
                " WHERE id = %s", (tid,)), "the attempt to commit", w)
        if phase == "open_sync":
            # Its last statement ran: it waits for the next message.
            wait(db, lambda: proxy.sync_is_held(port) and db.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = %s"
                " AND query LIKE '%%lock_attempt%%'"
                " AND wait_event = 'ClientRead'", (pid,)),
                "the lock to be taken", w)
        if phase in ("sync", "open_sync"):
            terminate(db, pid)
            proxy.hold_sync(port, False)
        if phase == "begin":
            wait(db, lambda: proxy.held_from_client(port) > 0,
                 "the attempt to be sent", w)
            proxy.hold(port, False, up=False)  # the FATAL, then the end
        if find is not None:
            rows = wait(db, find, f"a worker session held in {phase}", w)
            assert len(rows) == 1, rows
            pid, query = rows[0]
            expect = STATEMENT.get((phase, kind), STATEMENT.get(phase))
            assert expect in query, (phase, query)
            terminate(db, pid)
    finally:
        holder.close()  # ends the session: its locks go

    t = wait(db, lambda: db.query(
        "SELECT state, attempts, last_error FROM pgrunner.tasks"
        " WHERE id = %s AND state <> 'running' AND state <> 'queued'",
        (tid,)), f"task {tid} to end", w, timeout=90)[0]
    effect = ("SELECT count(*) FROM pgrunner_jobs.effects WHERE k = %s"
              if kind == "sql" else
              "SELECT count(*) FROM public.plugin_out WHERE v = %s")
    assert t[0] == "succeeded", (t, diag(db, w))
    assert db.scalar(effect, (key,)) == 1
    # A COMMIT that went through spends one attempt; anything else is
    # one failed attempt, then one that succeeds.
    assert t[1] == (1 if phase in ("commit_sent", "sync") else 2), t
    assert db.scalar("SELECT count(*) FROM pgrunner.tasks"
                     " WHERE state = 'running'") == 0
    if phase not in ("commit_sent", "sync"):
        assert "database connection lost during a task" in w.output()
    # The worker goes on with a healthy session.
    tid2 = add(db, task_kind, {"k": key + "-after", "v": key + "-after"})
    wait(db, lambda: db.scalar(
        "SELECT state = 'succeeded' FROM pgrunner.tasks WHERE id = %s",
        (tid2,)), "the next task", w)
    assert w.stop(timeout=90) == 0
    check_output(w)


def test_random_terminations_under_load(jdb, workers):
    db = jdb
    n_sql, n_c, conc = 1500, 500, 8
    w = start_worker(db, workers, conc)
    threads = set(thread_pids(w).values())
    loop_pids = {r[0] for r in db.query(
        "SELECT pid FROM pg_stat_activity WHERE application_name LIKE"
        " 'pgrunner/%%'")} - threads
    assert len(loop_pids) == 2, loop_pids

    db.query("INSERT INTO pgrunner.tasks (kind, payload, max_attempts)"
             " SELECT 'effect', jsonb_build_object('k', 's' || i), 1000"
             " FROM generate_series(1, %s) i", (n_sql,))
    db.query("INSERT INTO pgrunner.tasks (kind, payload, max_attempts)"
             " SELECT 'c_insert', jsonb_build_object('v', 'c' || i), 1000"
             " FROM generate_series(1, %s) i", (n_c,))

    stop = threading.Event()
    killed = []
    errors = []

    def killer():
        rng = random.Random(12)
        c = db.connect()
        try:
            while not stop.wait(0.1):
                with c.cursor() as cur:
                    cur.execute(
                        "SELECT pid FROM pg_stat_activity WHERE"
                        " application_name LIKE 'pgrunner/%%'"
                        " AND NOT pid = ANY(%s)", (list(loop_pids),))
                    pids = [r[0] for r in cur.fetchall()]
                    if pids:
                        pid = rng.choice(pids)
                        cur.execute("SELECT pg_terminate_backend(%s)", (pid,))
                        killed.append(pid)
        except Exception as e:  # reported by the test, not lost
            errors.append(e)
        finally:
            c.close()

    k = threading.Thread(target=killer)
    k.start()
    try:
        wait(db, lambda: db.scalar(
            "SELECT count(*) FROM pgrunner.tasks WHERE state = 'succeeded'")
            == n_sql + n_c or db.scalar(
            "SELECT count(*) FROM pgrunner.tasks WHERE state = 'failed'"),
            "every task to end", w, timeout=600)
    finally:
        stop.set()
        k.join()
    assert not errors, errors
    assert killed
    states = dict(db.query("SELECT state, count(*) FROM pgrunner.tasks"
                           " GROUP BY state"))
    assert states == {"succeeded": n_sql + n_c}, (states, diag(db, w))
    assert db.scalar("SELECT count(*) FROM pgrunner_jobs.effects") == n_sql
    assert db.scalar("SELECT count(*) FROM public.plugin_out") == n_c
    assert w.stop(timeout=90) == 0
    out = w.output()
    for m in ("cannot record failed attempt",) + SANITIZER_MARKS:
        assert m not in out, f"{m!r} in the worker's output:\n{out[-8000:]}"
