"""Cancellation reaches the attempt it was meant for, and is never lost
(SPEC: cancel_task; issue 12). Real `pgrunner work`, real PostgreSQL.

Every race is staged with locks the test holds, never with timing:
  - a job (or a C handler's query) waits on an advisory lock the test holds,
    so the attempt stays inside its transaction for as long as the test
    wants, and finishes the moment the test lets go;
  - the worker's loop connection (LISTEN, claims, interrupts) is kept away
    by refusing connections to the database (ALLOW_CONNECTIONS false) and
    terminating it: the worker threads keep theirs, so the attempt goes on,
    and a cancel_task() in that window notifies nobody.
"""

import contextlib
import threading

import pytest

from pgr_fixtures import wait_until
from test_faults import add, finished, fw, loop_backend, registered, stop_ok, \
    task, wait, wait_task  # noqa: F401 (fw is a fixture)
from test_plugin import plugin_path

GATE = 4242  # the advisory lock the test holds to keep a job waiting

JOBS_SQL = f"""
CREATE TABLE pgrunner_jobs.done (k text PRIMARY KEY);
-- Writes its row, then waits until the test lets it go.
CREATE FUNCTION pgrunner_jobs.gated(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.done (k) VALUES (p->>'k');
  PERFORM pg_advisory_xact_lock_shared({GATE});
END $$;

-- Writes its row; the attempt's COMMIT then waits until the test lets it
-- go (a deferred trigger), after the success mark.
CREATE TABLE pgrunner_jobs.late (k text PRIMARY KEY);
CREATE FUNCTION pgrunner_jobs.late_gate() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_advisory_xact_lock_shared({GATE});
  RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER late_gate AFTER INSERT ON pgrunner_jobs.late
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
  EXECUTE FUNCTION pgrunner_jobs.late_gate();
CREATE FUNCTION pgrunner_jobs.commit_gated(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO pgrunner_jobs.late (k) VALUES (p->>'k');
END $$;
"""


def jobs(db):
    db.query(JOBS_SQL)
    return db


@contextlib.contextmanager
def gate(db):
    """Hold the gate on a connection of its own; released on exit (or by
    calling the yielded function earlier)."""
    conn = db.connect()
    cur = conn.cursor()
    cur.execute("SELECT pg_advisory_lock(%s)", (GATE,))
    held = [True]

    def release():
        if held[0]:
            cur.execute("SELECT pg_advisory_unlock(%s)", (GATE,))
            held[0] = False
    try:
        yield release
    finally:
        release()
        conn.close()


def waiting_at_gate(db, name):
    """Backend pids of worker `name`'s sessions waiting on the gate."""
    return [r[0] for r in db.query(
        "SELECT a.pid FROM pg_stat_activity a JOIN pg_locks l"
        "    ON l.pid = a.pid AND NOT l.granted AND l.locktype = 'advisory'"
        " WHERE a.application_name = %s AND l.objid = %s", (name, GATE))]


def done_rows(db, k):
    return db.query("SELECT k FROM pgrunner_jobs.done WHERE k = %s", (k,))


@contextlib.contextmanager
def loop_cut_off(db, w, name):
    """While inside: the worker's loop connection is gone and cannot come
    back (the database refuses new connections); its threads keep theirs."""
    # From another database: the server refuses to lock out the current one.
    admin = db.server.connect("postgres")
    admin.cursor().execute(
        f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS false')
    try:
        pid = wait(db, lambda: loop_backend(db, name), "the loop backend", w)
        assert db.scalar("SELECT pg_terminate_backend(%s)", (pid,)) is True
        wait(db, lambda: not db.query(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)),
            "the loop backend to be gone", w)
        yield
    finally:
        admin.cursor().execute(
            f'ALTER DATABASE "{db.name}" ALLOW_CONNECTIONS true')
        admin.close()


def start_gated(db, fw, *args, k="a"):
    """A worker with one thread, running a `gated` task that waits at the
    gate; returns (worker, name, task id, backend pid)."""
    w = fw(db, "--concurrency", "1", "--poll-interval", "200", *args)
    _, name = registered(db, w)
    tid = add(db, "gated", {"k": k})
    pid = wait(db, lambda: (waiting_at_gate(db, name) or [None])[0],
               "the job to wait at the gate", w)
    return w, name, tid, pid


# --- a cancel lost while the loop connection was down -------------------------


def test_cancel_sent_while_the_loop_is_down_is_found_after_reconnect(mdb, fw):
    db = jobs(mdb)
    with gate(db):
        w, name, tid, _ = start_gated(db, fw)
        with loop_cut_off(db, w, name):
            # Nobody listens: this notification is lost.
            assert db.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
        # The loop reconnects and looks the request up by itself; the job is
        # still waiting at the gate, so only an interrupt can end it.
        t = wait_task(db, tid, lambda t: t["state"] != "running",
                      "the task to be interrupted", w, timeout=60)
        assert t["state"] == "cancelled" and t["attempts"] == 1, t
    assert done_rows(db, "a") == []
    assert db.scalar("SELECT count(*) FROM pgrunner.cancel_requests") == 0
    tid2 = add(db, "gated", {"k": "b"})
    assert finished(db, tid2, w)["state"] == "succeeded"
    stop_ok(w)


# --- completion refuses a task with a cancel request --------------------------


def test_attempt_that_completes_after_cancel_returned_true_ends_cancelled(
        mdb, fw):
    db = jobs(mdb)
    with gate(db) as release:
        w, name, tid, _ = start_gated(db, fw)
        with loop_cut_off(db, w, name):
            assert db.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
            # No interrupt can reach the job: let it run to its end.
            release()
            t = finished(db, tid, w)
    assert t["state"] == "cancelled" and t["attempts"] == 1, t
    assert done_rows(db, "a") == [], "the cancelled attempt's write committed"
    assert db.scalar("SELECT count(*) FROM pgrunner.cancel_requests") == 0
    stop_ok(w)


def test_c_handler_that_completes_after_cancel_returned_true_ends_cancelled(
        mdb, fw):
    db = jobs(mdb)
    # c_insert writes through the task's transaction; the trigger makes that
    # write wait at the gate.
    db.query(f"""
        CREATE TABLE plugin_out (v text, task bigint);
        CREATE FUNCTION plugin_out_gate() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_advisory_xact_lock_shared({GATE});
          RETURN NEW;
        END $$;
        CREATE TRIGGER plugin_out_gate BEFORE INSERT ON plugin_out
          FOR EACH ROW EXECUTE FUNCTION plugin_out_gate();
    """)
    with gate(db) as release:
        w = fw(db, "--concurrency", "1", "--poll-interval", "200",
               "--plugin", plugin_path())
        _, name = registered(db, w)
        tid = add(db, "c_insert", {"v": "x"})
        wait(db, lambda: waiting_at_gate(db, name),
             "the handler to wait at the gate", w)
        with loop_cut_off(db, w, name):
            assert db.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
            release()
            t = finished(db, tid, w)
    assert t["state"] == "cancelled" and t["attempts"] == 1, t
    assert db.query("SELECT v FROM plugin_out") == []
    stop_ok(w)


def test_cancel_during_the_attempts_commit_tells_the_truth(mdb, fw):
    """cancel_task() called while an attempt is committing its success: it
    either waits and answers false (the task succeeded), or answers true
    and the task ends cancelled; never true for a task that succeeds."""
    db = jobs(mdb)
    with gate(db) as release:
        w = fw(db, "--concurrency", "1", "--poll-interval", "200")
        _, name = registered(db, w)
        tid = add(db, "commit_gated", {"k": "a"})
        wait(db, lambda: waiting_at_gate(db, name),
             "the attempt's COMMIT to wait at the gate", w)
        answer = {}
        conn = db.connect()  # opened now: the database will refuse new ones

        def cancel():
            with conn.cursor() as cur:
                cur.execute("SELECT pgrunner.cancel_task(%s)", (tid,))
                answer["cancelled"] = cur.fetchone()[0]
        with loop_cut_off(db, w, name):
            th = threading.Thread(target=cancel)
            th.start()
            # Either it answered at once, or it waits for the commit.
            wait(db, lambda: not th.is_alive() or db.query(
                "SELECT 1 FROM pg_locks WHERE locktype = 'advisory'"
                " AND classid = 1885827686 AND NOT granted"),
                "cancel_task to answer or wait", w)
            release()
            th.join(60)
            assert not th.is_alive()
            t = finished(db, tid, w)
        conn.close()
    if answer["cancelled"]:
        assert t["state"] == "cancelled", (answer, t)
        assert db.query("SELECT k FROM pgrunner_jobs.late") == []
    else:
        assert t["state"] == "succeeded", (answer, t)
    # This test lets the commit go only once cancel_task waits: so false.
    assert answer["cancelled"] is False
    assert db.scalar("SELECT count(*) FROM pgrunner.cancel_requests") == 0
    stop_ok(w)


# --- an interrupt reaches only its own attempt --------------------------------


def test_stale_interrupt_does_not_reach_another_attempt(mdb, fw):
    """The loop's interrupt for an attempt may run late, queued behind a
    claim or a heartbeat on the loop's connection, when the backend it names
    has moved on to another attempt. The statement the loop sends
    (pgrunner.interrupt_attempt) signals the backend only while it is inside
    the named attempt's transaction."""
    db = jobs(mdb)
    w = fw(db, "--concurrency", "2", "--poll-interval", "200")
    wid, name = registered(db, w)
    with gate(db):
        a = add(db, "gated", {"k": "a"})
        b = add(db, "gated", {"k": "b"})
        pids = wait(db, lambda: (lambda p: p if len(p) == 2 else None)(
            waiting_at_gate(db, name)), "both jobs to wait at the gate", w)
        # Which backend runs A, found independently of the worker's check:
        # the one holding the transaction lock of the xid that locked A's row.
        pa = db.scalar(
            "SELECT l.pid FROM pg_locks l, pgrunner.tasks t"
            " WHERE t.id = %s AND l.locktype = 'transactionid'"
            "   AND l.transactionid = t.xmax AND l.granted"
            "   AND l.mode = 'ExclusiveLock'", (a,))
        assert pa in pids
        pb = next(p for p in pids if p != pa)
        stale = [(a, 1, pb),   # A's interrupt on the backend running B
                 (b, 1, pa),   # and the other way round
                 (a, 2, pa)]   # an attempt of A that is not this one
        for tid, att, pid in stale:
            assert db.scalar(
                "SELECT pgrunner.interrupt_attempt(%s, %s, %s, %s)",
                (tid, att, wid, pid)) is False, (tid, att, pid)
        assert sorted(waiting_at_gate(db, name)) == sorted(pids)
    for tid in (a, b):
        t = finished(db, tid, w)
        assert t["state"] == "succeeded" and t["attempts"] == 1, t
    assert "not by this worker" not in w.output()
    stop_ok(w)


@pytest.mark.parametrize("database", ["mdb", "german_mdb"])
def test_interrupt_nobody_asked_for_spends_no_attempt(database, request, fw):
    """A cancel that lands on an attempt nobody wanted to interrupt (a stale
    one from the loop, or a DBA's pg_cancel_backend) is not the task's
    fault: it runs again and the attempt does not count, even on its last
    allowed attempt. Told by SQLSTATE, not by the English message: the
    german_mdb server words it in German."""
    db = jobs(request.getfixturevalue(database))
    w = fw(db, "--concurrency", "1", "--poll-interval", "200")
    _, name = registered(db, w)
    with gate(db):
        tid = add(db, "gated", {"k": "a"}, max_attempts=1)
        pid = wait(db, lambda: (waiting_at_gate(db, name) or [None])[0],
                   "the job to wait at the gate", w)
        assert db.scalar("SELECT pg_cancel_backend(%s)", (pid,)) is True
        wait(db, lambda: "not by this worker; queued again" in w.output(),
             "the worker to see the foreign cancel", w)
        # Back at the gate: a new attempt, and the task is not failed.
        wait(db, lambda: waiting_at_gate(db, name), "the retry to wait", w)
        assert task(db, tid)["state"] == "running"
    t = finished(db, tid, w)
    assert t["state"] == "succeeded" and t["attempts"] == 1, t
    assert done_rows(db, "a") == [("a",)]
    stop_ok(w)


# --- a cancel racing recovery -------------------------------------------------


def test_cancel_committed_while_recovery_requeues_the_task_is_honoured(
        mdb, fw):
    """cancel_task() finds the task running under a dead worker and records
    its request; recovery, which cannot see the uncommitted request, queues
    the task again; then the request commits. Retention must not throw the
    request away: the task's next attempt ends cancelled, not succeeded."""
    db = jobs(mdb)
    tid = db.scalar(
        "INSERT INTO pgrunner.tasks (kind, payload, state, attempts,"
        " worker_id, started_at) VALUES ('gated', '{\"k\": \"r\"}',"
        " 'running', 1, 42, now()) RETURNING id")
    conn = db.connect(autocommit=False)
    try:
        cur = conn.cursor()
        cur.execute("SELECT pgrunner.cancel_task(%s)", (tid,))
        assert cur.fetchone()[0] is True
        assert db.scalar("SELECT pgrunner.recover()") == 1
        assert task(db, tid)["state"] == "queued"
        conn.commit()
    finally:
        conn.close()
    db.scalar("SELECT pgrunner.prune('1 day')")
    w = fw(db, "--concurrency", "1", "--poll-interval", "200")
    t = finished(db, tid, w)
    assert t["state"] == "cancelled", t
    assert done_rows(db, "r") == []
    stop_ok(w)
