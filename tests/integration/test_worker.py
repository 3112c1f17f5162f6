"""The worker, `pgrunner work`: claiming and running tasks (noop and
SQL-function kinds), failures, retries with backoff, unknown kinds and
attempts at injection through the kind, delayed tasks, priority order,
per-queue caps, several workers on one database, graceful shutdown, option
validation, an unmigrated database, and `pgrunner status`.

Real PostgreSQL, the real binary. Waits are generous (the test machine is
small and busy); nothing asserts how fast something happened beyond "within
a few seconds" where the contract promises far better.
"""

import json
import random
import re
import signal
import subprocess
import time
import types
from datetime import datetime

import pytest

from pgr_fixtures import add_task as add, run_pgrunner, wait_until

# --- helpers ----------------------------------------------------------------


def mkfunc(db, name, body, schema="pgrunner_jobs", declare=""):
    """CREATE FUNCTION schema.name(payload jsonb) RETURNS void in plpgsql."""
    db.query(f"CREATE FUNCTION {schema}.{name}(payload jsonb) RETURNS void"
             f" LANGUAGE plpgsql AS $f$ {declare} BEGIN {body} END $f$")


def row(db, tid):
    r = db.query("SELECT state, attempts, last_error, started_at, finished_at,"
                 " run_at, worker_id FROM pgrunner.tasks WHERE id = %s", (tid,))
    if not r:
        return None
    return dict(zip(["state", "attempts", "last_error", "started_at",
                     "finished_at", "run_at", "worker_id"], r[0]))


def state(db, tid):
    return db.scalar("SELECT state FROM pgrunner.tasks WHERE id = %s", (tid,))


def wait_state(db, tid, want, timeout=60):
    try:
        wait_until(lambda: state(db, tid) == want, timeout=timeout,
                   interval=0.05, what=f"task {tid} to be {want}")
    except AssertionError as e:
        raise AssertionError(f"{e}; it is {row(db, tid)}") from None


def count(db, where="true"):
    return db.scalar(f"SELECT count(*) FROM pgrunner.tasks WHERE {where}")


def log_lines(w, msg, tid=None):
    """The worker's log lines with msg="..." (and task=ID)."""
    out = []
    for ln in w.output().splitlines():
        if f'msg="{msg}"' not in ln:
            continue
        if tid is not None and not re.search(rf"(^|\s)task={tid}(\s|$)", ln):
            continue
        out.append(ln)
    return out


def wait_registered(db, n=1, timeout=60):
    wait_until(lambda: db.scalar("SELECT count(*) FROM pgrunner.workers") >= n,
               timeout=timeout, interval=0.05,
               what=f"{n} worker(s) to register")


def wait_in_handler(db, fn, timeout=60):
    """Until a session is inside a call of pgrunner_jobs.<fn>."""
    wait_until(lambda: db.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
        " AND pid <> pg_backend_pid() AND query LIKE %s",
        (f"%pgrunner_jobs%{fn}%",)) > 0,
        timeout=timeout, interval=0.05, what=f"a running {fn} job")


def max_overlap(intervals):
    """Largest number of [start, end] intervals open at one instant."""
    ev = []
    for s, e in intervals:
        ev.append((s, 1))
        ev.append((e, -1))
    ev.sort(key=lambda x: (x[0], x[1]))  # an end before a start at a tie
    cur = best = 0
    for _, d in ev:
        cur += d
        best = max(best, cur)
    return best


# --- running tasks ------------------------------------------------------------

def test_bulk_insert_of_1000_noop_tasks(mdb, workers):
    # A long fallback poll: only the notification can wake the worker.
    w = workers(mdb, "--poll-interval", "3600000")
    wait_registered(mdb)
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind)"
                 " SELECT 'noop' FROM generate_series(1, 1000)")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: count(mdb, "state = 'succeeded'") == 1000,
               timeout=180, interval=0.2, what="1000 succeeded tasks")
    rows = mdb.query(
        "SELECT state, attempts, count(*), bool_and(started_at IS NOT NULL),"
        " bool_and(finished_at IS NOT NULL), bool_and(finished_at >= started_at),"
        " bool_and(started_at >= created_at), bool_and(last_error IS NULL)"
        " FROM pgrunner.tasks GROUP BY 1, 2")
    assert rows == [("succeeded", 1, 1000, True, True, True, True, True)]
    assert w.stop() == 0
    # Every attempt logged its start and its end, and nothing was lost at
    # exit.
    out = w.output()
    started = re.findall(r'msg="task started" .*?task=(\d+)', out)
    done = re.findall(r'msg="task succeeded" .*?task=(\d+)', out)
    assert len(started) == 1000 and len(set(started)) == 1000
    assert sorted(done) == sorted(started)


def test_sql_function_job_commits_its_writes(mdb, workers):
    mdb.query("CREATE TABLE t (v text, n int)")
    mkfunc(mdb, "k", "INSERT INTO public.t VALUES (payload->>'v',"
                     " (payload->>'n')::int);")
    w = workers(mdb)
    tid = add(mdb, "k", payload={"v": "hello", "n": 7})
    wait_state(mdb, tid, "succeeded")
    assert mdb.query("SELECT v, n FROM t") == [("hello", 7)]
    r = row(mdb, tid)
    assert r["attempts"] == 1 and r["last_error"] is None
    assert r["started_at"] is not None and r["finished_at"] is not None
    # The plain psql INSERT route works as well.
    p = mdb.psql("INSERT INTO pgrunner.tasks (kind, payload) VALUES"
                 " ('k', '{\"v\": \"psql\", \"n\": 8}')")
    assert p.returncode == 0, p.stderr
    wait_until(lambda: count(mdb, "state = 'succeeded'") == 2, timeout=60,
               what="the psql task to succeed")
    assert sorted(mdb.query("SELECT v FROM t")) == [("hello",), ("psql",)]
    # The log line is written asynchronously, after the commit.
    wait_until(lambda: log_lines(w, "task succeeded", tid),
               what="the task succeeded log line")
    assert w.stop() == 0


def test_failing_job_rolls_back_and_retries_then_fails(mdb, workers):
    mdb.query("CREATE TABLE t (v text)")
    mkfunc(mdb, "boom", "INSERT INTO public.t VALUES ('partial');"
                        " RAISE EXCEPTION 'boom';")
    w = workers(mdb)
    tid = add(mdb, "boom", max_attempts=2)
    # Backoff after attempt 1 is 1 s x 0.5..1.5 jitter.
    wait_state(mdb, tid, "failed", timeout=90)
    r = row(mdb, tid)
    assert r["attempts"] == 2
    assert r["last_error"] == "boom"
    assert r["finished_at"] is not None
    assert mdb.scalar("SELECT count(*) FROM t") == 0
    # Log lines are written asynchronously, after the commit.
    wait_until(lambda: log_lines(w, "task failed", tid),
               what="the task failed log line")
    out = w.output().splitlines()
    retry = [i for i, ln in enumerate(out) if 'msg="task retry scheduled"' in ln
             and re.search(rf"\stask={tid}(\s|$)", ln)]
    failed = [i for i, ln in enumerate(out) if 'msg="task failed"' in ln
              and re.search(rf"\stask={tid}(\s|$)", ln)]
    assert len(retry) == 1, w.output()
    assert len(failed) == 1, w.output()
    assert retry[0] < failed[0]
    assert "level=warn" in out[retry[0]] and "level=warn" in out[failed[0]]
    assert "attempt=1" in out[retry[0]] and "attempt=2" in out[failed[0]]
    assert len(log_lines(w, "task started", tid)) == 2
    assert w.stop() == 0


def test_retry_waits_for_its_backoff(mdb, workers):
    """After a failed attempt the task is queued again with run_at in the
    future (exponential backoff), not retried at once."""
    mkfunc(mdb, "boom_slowly", "RAISE EXCEPTION 'nope %', payload->>'x';")
    w = workers(mdb)
    tid = add(mdb, "boom_slowly", payload={"x": "1"}, max_attempts=5)
    wait_until(lambda: row(mdb, tid)["attempts"] >= 1
               and state(mdb, tid) == "queued", timeout=60,
               what="the first failure")
    assert row(mdb, tid)["last_error"] == "nope 1"
    # The second attempt starts no earlier than 0.5 s after the first ended:
    # check from the log timestamps of the two attempts' lines.
    wait_until(lambda: len(log_lines(w, "task started", tid)) >= 2,
               timeout=60, what="the second attempt")
    ts = [re.search(r"ts=(\S+)", ln).group(1)
          for ln in log_lines(w, "task retry scheduled", tid)[:1]
          + log_lines(w, "task started", tid)[1:2]]
    t0, t1 = (datetime.fromisoformat(t.replace("Z", "+00:00")) for t in ts)
    assert (t1 - t0).total_seconds() >= 0.4, ts
    w.stop()


@pytest.mark.parametrize("long_msg", [
    "start-" + "x" * 6000 + "-end",
    "start-" + "\u00e9\u2713x" * 2000 + "-end",
], ids=["ascii", "multibyte"])
def test_long_last_error_is_whole(mdb, workers, long_msg):
    """SPEC 3: last_error is the failure's message, whole."""
    mkfunc(mdb, "long_error", "RAISE EXCEPTION '%', payload->>'m';")
    w = workers(mdb)
    tid = add(mdb, "long_error", payload={"m": long_msg}, max_attempts=1)
    wait_state(mdb, tid, "failed", timeout=30)
    assert row(mdb, tid)["last_error"] == long_msg
    w.stop()


def test_last_error_is_printable(mdb, workers):
    mkfunc(mdb, "ctrl_error",
           "RAISE EXCEPTION '%', 'a' || chr(1) || 'b' || chr(27) || 'c';")
    w = workers(mdb)
    tid = add(mdb, "ctrl_error", max_attempts=1)
    wait_state(mdb, tid, "failed")
    e = row(mdb, tid)["last_error"]
    assert e.startswith("a") and e.endswith("c") and "b" in e
    assert not any(ord(ch) < 0x20 or ord(ch) == 0x7f for ch in e), repr(e)
    w.stop()


def test_job_calling_a_missing_function_is_not_no_handler(mdb, workers):
    mkfunc(mdb, "calls_missing", "PERFORM public.nosuch_fn_xyz(1);")
    w = workers(mdb)
    tid = add(mdb, "calls_missing", max_attempts=1)
    wait_state(mdb, tid, "failed")
    err = row(mdb, tid)["last_error"]
    assert "nosuch_fn_xyz" in err and "no handler" not in err, err
    w.stop()


def test_unknown_kind_fails_at_once(mdb, workers):
    w = workers(mdb)
    tid = add(mdb, "nope", max_attempts=5)
    wait_state(mdb, tid, "failed")
    r = row(mdb, tid)
    assert r["attempts"] == 1
    assert r["last_error"] == 'no handler for kind "nope"'
    # The log line is written asynchronously, after the commit.
    wait_until(lambda: log_lines(w, "task failed", tid),
               what="the task failed log line")
    assert not log_lines(w, "task retry scheduled", tid)
    assert w.stop() == 0


def test_kind_cannot_inject_or_reach_other_functions(mdb, workers):
    mdb.query("CREATE TABLE t (v text)")
    mdb.query("INSERT INTO t VALUES ('precious')")
    mdb.query("CREATE TABLE marker (who text)")
    # Functions a hostile kind might try to reach; each leaves a mark.
    mkfunc(mdb, "f", "INSERT INTO public.marker VALUES ('public.f');",
           schema="public")
    mkfunc(mdb, "only_in_public",
           "INSERT INTO public.marker VALUES ('public.only_in_public');",
           schema="public")
    mkfunc(mdb, '"Upper"',
           "INSERT INTO public.marker VALUES ('pgrunner_jobs.Upper');")
    mkfunc(mdb, '"Upper"',
           "INSERT INTO public.marker VALUES ('public.Upper');",
           schema="public")
    mkfunc(mdb, "k", "INSERT INTO public.marker VALUES ('pgrunner_jobs.k');")
    mkfunc(mdb, "a" * 63,
           "INSERT INTO public.marker VALUES ('pgrunner_jobs.a63');")
    mdb.query("CREATE SCHEMA other")
    mkfunc(mdb, "k", "INSERT INTO public.marker VALUES ('other.k');",
           schema="other")
    kinds = [
        "x; drop table t",
        "x(null); drop table t; --",
        "pg_sleep(10)--",
        "pg_sleep",
        '"quoted"',
        '"k"',
        "Upper",
        "K",
        "public.f",
        "f",
        "only_in_public",
        "other.k",
        "pgrunner_jobs.k",
        "k ",
        " k",
        "k()",
        "a" * 64,
        "tasks",
        "add_task",
    ]
    ids = {k: add(mdb, k, max_attempts=3) for k in kinds}
    w = workers(mdb, "--concurrency", "4")
    wait_until(lambda: count(mdb, "state = 'failed'") == len(kinds),
               timeout=90, interval=0.1, what="every hostile kind to fail")
    bad = []
    for k, tid in ids.items():
        r = row(mdb, tid)
        if (r["state"], r["attempts"], r["last_error"]) != (
                "failed", 1, f'no handler for kind "{k}"'):
            bad.append((k, r["state"], r["attempts"], r["last_error"]))
    assert not bad, bad
    assert mdb.query("SELECT who FROM marker") == []
    assert mdb.query("SELECT v FROM t") == [("precious",)]
    assert w.stop() == 0


def test_jobs_schema_option_picks_the_schema(mdb, workers):
    mdb.query("CREATE TABLE marker (who text)")
    mdb.query("CREATE SCHEMA myjobs")
    mkfunc(mdb, "k", "INSERT INTO public.marker VALUES ('myjobs.k');",
           schema="myjobs")
    mkfunc(mdb, "k", "INSERT INTO public.marker VALUES ('pgrunner_jobs.k');")
    mkfunc(mdb, "only_default",
           "INSERT INTO public.marker VALUES ('pgrunner_jobs.only_default');")
    w = workers(mdb, "--jobs-schema", "myjobs")
    t1 = add(mdb, "k")
    t2 = add(mdb, "only_default")
    wait_state(mdb, t1, "succeeded")
    wait_state(mdb, t2, "failed")
    assert row(mdb, t2)["last_error"] == 'no handler for kind "only_default"'
    assert mdb.query("SELECT who FROM marker") == [("myjobs.k",)]
    assert w.stop() == 0


def test_cancel_running_task_rolls_back(mdb, workers):
    mdb.query("CREATE TABLE t (v text)")
    mkfunc(mdb, "long_one", "INSERT INTO public.t VALUES ('partial');"
                            " PERFORM pg_sleep(60);")
    w = workers(mdb)
    tid = add(mdb, "long_one")
    wait_in_handler(mdb, "long_one")
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
    wait_state(mdb, tid, "cancelled", timeout=30)
    assert mdb.scalar("SELECT count(*) FROM t") == 0
    # The worker carries on.
    n = add(mdb, "noop")
    wait_state(mdb, n, "succeeded")
    assert state(mdb, tid) == "cancelled"
    assert w.stop() == 0


def test_password_never_in_worker_log(workers):
    secret = "SeCrEt123"
    fake = types.SimpleNamespace(
        dsn=f"postgresql://postgres:{secret}@127.0.0.1:1/x")
    w = workers(fake, "--concurrency", "2")
    wait_until(lambda: "connection failed" in w.output() or not w.alive(),
               timeout=30, what="a failed connection attempt")
    time.sleep(1.0)
    if w.alive():
        assert w.stop() == 0
    out = w.output()
    assert "127.0.0.1" in out, out
    assert secret not in out


def test_delayed_task_starts_at_its_run_at(mdb, workers):
    # A long fallback poll: the worker must wake on its own timer.
    w = workers(mdb, "--poll-interval", "3600000")
    wait_registered(mdb)
    tid = mdb.scalar("SELECT pgrunner.add_task('noop',"
                     " run_at => now() + interval '2 seconds')")
    time.sleep(0.5)
    assert state(mdb, tid) == "queued"
    wait_state(mdb, tid, "succeeded", timeout=60)
    ok, late = mdb.query("SELECT started_at >= run_at,"
                         " extract(epoch FROM started_at - run_at)"
                         " FROM pgrunner.tasks WHERE id = %s", (tid,))[0]
    assert ok, "started before its run_at"
    # The contract is 50 ms; allow a loaded machine plenty.
    assert float(late) < 5.0, late
    assert w.stop() == 0


def test_delayed_task_added_before_the_worker_starts(mdb, workers):
    tid = mdb.scalar("SELECT pgrunner.add_task('noop',"
                     " run_at => now() + interval '3 seconds')")
    w = workers(mdb, "--poll-interval", "3600000")
    wait_state(mdb, tid, "succeeded", timeout=60)
    ok, late = mdb.query("SELECT started_at >= run_at,"
                         " extract(epoch FROM started_at - run_at)"
                         " FROM pgrunner.tasks WHERE id = %s", (tid,))[0]
    assert ok and float(late) < 5.0, late
    w.stop()


def test_priority_then_run_at_then_id_order(mdb, workers):
    mdb.query("CREATE TABLE seen (seq bigserial PRIMARY KEY, task bigint)")
    mkfunc(mdb, "rec", "INSERT INTO public.seen (task)"
                       " VALUES ((payload->>'me')::bigint);")
    rnd = random.Random(12345)
    times = ["2020-01-01 00:00:00+00", "2020-01-01 00:00:01+00",
             "2021-06-01 12:00:00+00", "2024-01-01 00:00:00+00"]
    specs = [(rnd.choice([-5, 0, 0, 1, 3, 10]), rnd.choice(times))
             for _ in range(40)]
    ids = []
    for prio, run_at in specs:
        tid = mdb.scalar(
            "INSERT INTO pgrunner.tasks (kind, priority, run_at) VALUES"
            " ('rec', %s, %s) RETURNING id", (prio, run_at))
        mdb.query("UPDATE pgrunner.tasks SET payload = jsonb_build_object("
                  "'me', id) WHERE id = %s", (tid,))
        ids.append(tid)
    expect = [tid for tid, _ in sorted(
        zip(ids, specs), key=lambda x: (x[1][0], x[1][1], x[0]))]
    assert expect != sorted(ids)  # the test means something
    w = workers(mdb, "--concurrency", "1")
    wait_until(lambda: count(mdb, "state = 'succeeded'") == len(ids),
               timeout=120, interval=0.1, what="all tasks to run")
    got = [r[0] for r in mdb.query("SELECT task FROM seen ORDER BY seq")]
    assert got == expect
    assert w.stop() == 0



def test_an_urgent_task_overtakes_while_the_only_thread_is_busy(mdb,
                                                                 workers):
    """With one thread busy, a low-priority task and then an urgent one
    arrive: the urgent one runs first, and the database never shows more
    tasks running than there are threads."""
    mdb.query("CREATE TABLE seen (seq bigserial PRIMARY KEY, name text)")
    mkfunc(mdb, "rec", "INSERT INTO public.seen (name) VALUES"
                       " (payload->>'n'); PERFORM pg_sleep("
                       "coalesce((payload->>'s')::float8, 0));")
    w = workers(mdb, "--concurrency", "1")
    busy = add(mdb, "rec", payload={"n": "busy", "s": 2})
    wait_until(lambda: row(mdb, busy)["state"] == "running", what="busy")
    add(mdb, "rec", priority=10, payload={"n": "later"})
    time.sleep(0.3)  # let the worker see it, if it were to claim it early
    add(mdb, "rec", priority=-10, payload={"n": "urgent"})
    samples = []

    def done():
        samples.append(count(mdb, "state = 'running'"))
        return count(mdb, "state = 'succeeded'") == 3

    wait_until(done, timeout=60, interval=0.01, what="all three to run")
    got = [r[0] for r in mdb.query("SELECT name FROM seen ORDER BY seq")]
    assert got == ["busy", "urgent", "later"], got
    assert max(samples) <= 1, samples
    assert w.stop() == 0


def test_per_queue_caps(mdb, workers):
    mdb.query("CREATE TABLE runs (queue text, n int, started timestamptz,"
              " ended timestamptz)")
    mkfunc(mdb, "slow",
           "INSERT INTO public.runs VALUES (payload->>'q',"
           " (payload->>'n')::int, clock_timestamp(), NULL);"
           " PERFORM pg_sleep((payload->>'s')::float8);"
           " UPDATE public.runs SET ended = clock_timestamp()"
           "  WHERE queue = payload->>'q' AND n = (payload->>'n')::int;")
    for i in range(20):
        add(mdb, "slow", queue="a", payload={"q": "a", "n": i, "s": 0.3})
    for i in range(6):
        add(mdb, "slow", queue="b", payload={"q": "b", "n": i, "s": 1.0})
    unserved = [add(mdb, "noop", queue="c") for _ in range(3)]
    w = workers(mdb, "--queues", "a:2,b", "--concurrency", "8")
    samples = []

    def done():
        samples.append(count(mdb, "queue = 'a' AND state = 'running'"))
        return count(mdb, "queue IN ('a', 'b') AND state = 'succeeded'") == 26

    wait_until(done, timeout=180, interval=0.01, what="queues a and b done")
    assert max(samples) <= 2, samples
    a_iv = mdb.query("SELECT started, ended FROM runs WHERE queue = 'a'")
    b_iv = mdb.query("SELECT started, ended FROM runs WHERE queue = 'b'")
    assert len(a_iv) == 20 and len(b_iv) == 6
    assert max_overlap(a_iv) == 2, "queue a: cap 2 not used or exceeded"
    assert max_overlap(b_iv) >= 3, "queue b has no cap of its own"
    # Queue c is not served by this worker.
    time.sleep(1.0)
    for tid in unserved:
        r = row(mdb, tid)
        assert (r["state"], r["attempts"], r["started_at"]) == (
            "queued", 0, None)
    assert w.stop() == 0



def test_a_capped_queue_does_not_wait_for_the_poll(mdb, workers):
    """When a task of a queue at its cap ends, the worker claims the next
    one of that queue at once: no NOTIFY announces it, and the fallback
    poll here is ten minutes away."""
    w = workers(mdb, "--queues", "default,capped:1", "--concurrency", "2",
                "--poll-interval", "600000")
    wait_until(lambda: count(mdb, "true") == 0 and mdb.scalar(
        "SELECT count(*) FROM pgrunner.workers") == 1, what="registered")
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue) "
              "SELECT 'noop', 'capped' FROM generate_series(1, 6)")
    wait_until(lambda: count(mdb, "state = 'succeeded'") == 6, timeout=60,
               what="all six capped tasks (one NOTIFY for the insert)")
    assert w.stop() == 0


def test_three_workers_share_5000_tasks_exactly_once(mdb, workers):
    mdb.query("CREATE TABLE done (n int UNIQUE NOT NULL)")
    mkfunc(mdb, "once", "INSERT INTO public.done VALUES"
                        " ((payload->>'n')::int);")
    ws = [workers(mdb) for _ in range(3)]
    wait_registered(mdb, 3)
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, payload)"
                 " SELECT 'once', jsonb_build_object('n', g)"
                 " FROM generate_series(1, 5000) g")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: count(mdb, "state NOT IN ('queued', 'running')")
               == 5000, timeout=400, interval=0.25, what="5000 finished tasks")
    assert mdb.query("SELECT state, attempts, count(*) FROM pgrunner.tasks"
                     " GROUP BY 1, 2") == [("succeeded", 1, 5000)]
    assert mdb.scalar("SELECT count(*) FROM done") == 5000
    assert mdb.scalar("SELECT count(DISTINCT n) FROM done") == 5000
    assert mdb.scalar("SELECT min(n) = 1 AND max(n) = 5000 FROM done")
    nworkers = mdb.scalar("SELECT count(DISTINCT worker_id)"
                          " FROM pgrunner.tasks")
    assert nworkers > 1, "only one worker took part"
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks WHERE worker_id"
                      " IS NULL") == 0
    for w in ws:
        assert w.stop() == 0
    started = []
    for w in ws:
        started += re.findall(r'msg="task started" .*?task=(\d+)', w.output())
    assert len(started) == 5000 and len(set(started)) == 5000


# --- shutdown -------------------------------------------------------------------

def test_sigterm_lets_the_running_task_finish(mdb, workers):
    mdb.query("CREATE TABLE t (v text)")
    mkfunc(mdb, "two_secs", "INSERT INTO public.t VALUES ('written');"
                            " PERFORM pg_sleep(2);")
    w = workers(mdb)
    tid = add(mdb, "two_secs")
    wait_in_handler(mdb, "two_secs")
    w.signal(signal.SIGTERM)
    assert w.proc.wait(60) == 0
    r = row(mdb, tid)
    assert r["state"] == "succeeded" and r["attempts"] == 1
    assert mdb.query("SELECT v FROM t") == [("written",)]
    # The log line is written asynchronously, after the commit.
    wait_until(lambda: log_lines(w, "task succeeded", tid),
               what="the task succeeded log line")


def test_sigterm_with_shutdown_timeout_interrupts_and_requeues(mdb, workers):
    mdb.query("CREATE TABLE t (v text)")
    mkfunc(mdb, "forever", "INSERT INTO public.t VALUES ('partial');"
                           " PERFORM pg_sleep(30);")
    w = workers(mdb, "--shutdown-timeout", "1")
    tid = add(mdb, "forever")
    wait_in_handler(mdb, "forever")
    t0 = time.monotonic()
    w.signal(signal.SIGTERM)
    try:
        rc = w.proc.wait(20)
    except subprocess.TimeoutExpired:
        pytest.fail("worker still running 20 s after SIGTERM with "
                    "--shutdown-timeout 1")
    assert rc == 0, w.output()
    assert time.monotonic() - t0 < 20
    r = row(mdb, tid)
    assert r["state"] == "queued", r
    assert r["attempts"] == 0, r
    assert r["worker_id"] is None
    assert mdb.scalar("SELECT count(*) FROM t") == 0
    # Nobody is left holding the task: a new worker takes it (and we stop
    # that one the same way).
    mdb.query("CREATE OR REPLACE FUNCTION pgrunner_jobs.forever(payload"
              " jsonb) RETURNS void LANGUAGE plpgsql AS $f$ BEGIN"
              " INSERT INTO public.t VALUES ('second'); END $f$")
    w2 = workers(mdb)
    wait_state(mdb, tid, "succeeded")
    assert row(mdb, tid)["attempts"] == 1
    assert mdb.query("SELECT v FROM t") == [("second",)]
    assert w2.stop() == 0


def test_sigint_idle_worker_exits_0(mdb, workers):
    w = workers(mdb)
    wait_registered(mdb)
    w.signal(signal.SIGINT)
    assert w.proc.wait(30) == 0
    # A clean exit removes the worker from the live list.
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.workers")
               == 0, timeout=10, what="the worker row to go")


# --- configuration --------------------------------------------------------------

BAD_WORK_OPTIONS = [
    (["--concurrency", "0"], None),
    (["--concurrency", "abc"], None),
    (["--concurrency", "-2"], None),
    (["--concurrency", ""], None),
    (["--queues", ""], None),
    (["--queues", "a:0"], None),
    (["--queues", "a:x"], None),
    (["--queues", "a,,b"], None),
    (["--poll-interval", "x"], None),
    (["--log-level", "loud"], None),
    (["--log-format", "xml"], None),
    (["--retention", "7x"], None),
    (["--retention", "-1d"], None),
    (["--task-timeout", "0"], None),
    (["--shutdown-timeout", "soon"], None),
    (["--metrics-listen", "nonsense"], None),
    (["--metrics-listen", "127.0.0.1:99999"], None),
    (["--jobs-schema", "bad name"], None),
    (["--jobs-schema", "x;drop"], None),
    (["--log-dir", "/nonexistent"], None),
    (["--concurrency"], None),
    (["--bogus"], None),
    (["extra-arg"], None),
    ([], {"PGRUNNER_CONCURRENCY": "abc"}),
    ([], {"PGRUNNER_QUEUES": "a:0"}),
    ([], {"PGRUNNER_LOG_LEVEL": "loud"}),
    ([], {"PGRUNNER_RETENTION": "forever"}),
]


@pytest.mark.parametrize("args,env", BAD_WORK_OPTIONS,
                         ids=[" ".join(a) or repr(e)
                              for a, e in BAD_WORK_OPTIONS])
def test_bad_work_options_exit_2(module_mdb, args, env):
    try:
        r = run_pgrunner(["work", "--db", module_mdb.dsn] + args, env=env,
                         timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{args} {env} was accepted: the worker kept running")
    assert r.returncode == 2, (r.stdout, r.stderr)
    err = r.stderr.strip("\n")
    assert err.strip() and "\n" not in err, r.stderr
    if env:
        assert list(env)[0] in err, err
    assert module_mdb.scalar("SELECT count(*) FROM pgrunner.workers") == 0


def _starting_line(w):
    lines = log_lines(w, "worker starting")
    return lines[0] if lines else None


def test_flag_wins_over_environment(mdb, workers):
    w = workers(mdb, "--concurrency", "2",
                env={"PGRUNNER_CONCURRENCY": "3"})
    line = wait_until(lambda: _starting_line(w), timeout=30,
                      what="the worker starting line")
    assert re.search(r"\sconcurrency=2(\s|$)", line), line
    wait_registered(mdb)
    assert mdb.scalar("SELECT concurrency FROM pgrunner.workers") == 2
    assert w.stop() == 0


def test_environment_used_without_flag(mdb, workers):
    w = workers(mdb, env={"PGRUNNER_CONCURRENCY": "3",
                          "PGRUNNER_QUEUES": "envq"})
    line = wait_until(lambda: _starting_line(w), timeout=30,
                      what="the worker starting line")
    assert re.search(r"\sconcurrency=3(\s|$)", line), line
    tid = add(mdb, "noop", queue="envq")
    wait_state(mdb, tid, "succeeded")
    assert w.stop() == 0


def test_work_on_unmigrated_database_exits_1(db):
    try:
        r = run_pgrunner(["work", "--db", db.dsn], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("worker kept running on a database never migrated")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "pgrunner migrate" in r.stderr, r.stderr
    assert db.scalar("SELECT count(*) FROM pg_namespace"
                     " WHERE nspname = 'pgrunner'") == 0


def test_work_on_out_of_date_schema_exits_1(mdb):
    mdb.query("DELETE FROM pgrunner.migrations WHERE version ="
              " (SELECT max(version) FROM pgrunner.migrations)")
    try:
        r = run_pgrunner(["work", "--db", mdb.dsn], timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("worker kept running on an out-of-date schema")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "pgrunner migrate" in r.stderr, r.stderr


# --- status -----------------------------------------------------------------

def test_status_counts_workers_and_failures(mdb, workers):
    # Tasks in queues no worker serves, in known states.
    for _ in range(3):
        add(mdb, "noop", queue="sa")
    s1 = add(mdb, "noop", queue="sa")
    s2 = add(mdb, "noop", queue="sb")
    c1 = add(mdb, "noop", queue="sb")
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded', attempts = 1,"
              " started_at = now(), finished_at = now() WHERE id IN (%s, %s)",
              (s1, s2))
    mdb.query("SELECT pgrunner.cancel_task(%s)", (c1,))
    w = workers(mdb)
    f = add(mdb, "nope")
    wait_state(mdb, f, "failed")
    wait_registered(mdb)

    r = run_pgrunner(["status", "--json", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    queues = st["queues"]
    for q, s, n in mdb.query("SELECT queue, state, count(*)"
                             " FROM pgrunner.tasks GROUP BY 1, 2"):
        assert queues[q][s] == n, (q, s, queues)
    assert queues["sa"].get("queued") == 3 and queues["sa"].get(
        "succeeded") == 1
    assert queues["sb"].get("cancelled") == 1
    assert queues["sb"].get("queued", 0) == 0
    assert queues["default"].get("failed") == 1
    assert st["live_workers"] >= 1
    fails = st["recent_failures"]
    hit = [x for x in fails if x["id"] == str(f)]
    assert hit and hit[0]["last_error"] == 'no handler for kind "nope"', fails

    r = run_pgrunner(["status", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "sa" in out and "sb" in out and "default" in out
    assert str(f) in out and 'no handler for kind "nope"' in out, out
    sa_line = [ln for ln in out.splitlines() if ln.split()[:1] == ["sa"]]
    assert sa_line and "3" in sa_line[0].split(), out

    assert w.stop() == 0
    r = run_pgrunner(["status", "--json", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["live_workers"] == 0


def test_status_json_ids_are_strings(mdb):
    """Worker ids are random 63-bit numbers and a task id may be any
    bigint: as JSON numbers, jq and JavaScript would round them (2^53 + 1
    reads back as 2^53), so `status --json` gives every id as a string."""
    big = 2**53 + 1
    mdb.query("INSERT INTO pgrunner.workers (id, name, host, pid, queues,"
              " concurrency) VALUES (%s, 'pgrunner/big', 'h', 1,"
              " '{default}', 1)", (big,))
    mdb.query("INSERT INTO pgrunner.tasks (id, kind, state, attempts,"
              " started_at, finished_at, last_error) VALUES (%s, 'x',"
              " 'failed', 1, now(), now(), 'boom')", (big + 2,))
    r = run_pgrunner(["status", "--json", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert [w["id"] for w in st["workers"]] == [str(big)], st["workers"]
    assert [f["id"] for f in st["recent_failures"]] == [str(big + 2)], st
    # What a JSON reader that turns numbers into doubles would see.
    assert str(big) in r.stdout and str(big + 2) in r.stdout


def test_no_handler_message_quotes_the_kind_on_one_line(mdb, workers):
    """last_error is printable (SPEC 3): a kind with a newline, a tab or
    another control character in it comes back escaped (and a backslash,
    so that escapes are not ambiguous), so the message stays one line
    wherever it is shown."""
    odd = 'a\nb\t"c"\\\x01'
    tid = mdb.scalar("INSERT INTO pgrunner.tasks (kind) VALUES (%s)"
                     " RETURNING id", (odd,))
    w = workers(mdb)
    wait_state(mdb, tid, "failed")
    err = row(mdb, tid)["last_error"]
    assert err == 'no handler for kind "a\\nb\\t"c"\\\\\\x01"', err
    assert all(ch >= " " for ch in err), repr(err)
    assert w.stop() == 0


def test_status_counts_are_bounded_and_say_so(mdb):
    """status reads at most 10,000 tasks per queue and state: exact below
    that, "10000+" (JSON: counts_exact false) above; running tasks are
    always exact."""
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue) "
              "SELECT 'noop', 'big' FROM generate_series(1, 10050)")
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue, state, attempts,"
              " started_at, finished_at) "
              "SELECT 'noop', q, 'succeeded', 1, now(), now() - g * interval"
              " '1 ms' FROM generate_series(1, 10500) g,"
              " unnest('{big,small}'::text[]) q")
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue) "
              "SELECT 'noop', 'small' FROM generate_series(1, 7)")
    r = run_pgrunner(["status", "--json", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["counts_exact"] is False and st["count_limit"] == 10000
    assert st["queues"]["big"]["queued"] == 10000
    assert st["queues"]["small"]["queued"] == 7
    # The 10,000 most recent succeeded tasks, across both queues.
    assert st["queues"]["big"]["succeeded"] + \
        st["queues"]["small"]["succeeded"] == 10000
    r = run_pgrunner(["status", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    big = [ln.split() for ln in r.stdout.splitlines()
           if ln.split()[:1] == ["big"]]
    small = [ln.split() for ln in r.stdout.splitlines()
             if ln.split()[:1] == ["small"]]
    assert big and big[0][1] == "10000+", r.stdout
    assert small and small[0][1] == "7", r.stdout
    assert "at least N" in r.stdout

    # Below the limit every count is exact and nothing says otherwise.
    mdb.query("DELETE FROM pgrunner.tasks WHERE queue = 'big' "
              "OR state = 'succeeded'")
    r = run_pgrunner(["status", "--json", "--db", mdb.dsn])
    st = json.loads(r.stdout)
    assert st["counts_exact"] is True and st["queues"]["small"]["queued"] == 7


def test_finished_at_is_when_the_handler_ended(mdb, workers):
    """finished_at is taken when the attempt ends, not when its transaction
    began: a handler that runs for a second shows a second between
    started_at and finished_at (a lower bound, not a speed check)."""
    mkfunc(mdb, "nap", "PERFORM pg_sleep(1.0);")
    tid = add(mdb, "nap")
    w = workers(mdb)
    wait_until(lambda: row(mdb, tid)["state"] == "succeeded", timeout=60,
               what="the nap task")
    took = mdb.scalar("SELECT extract(epoch FROM finished_at - started_at) "
                      "FROM pgrunner.tasks WHERE id = %s", (tid,))
    assert took >= 1.0, took
    assert w.stop() == 0


def test_a_running_task_whose_worker_has_no_row_is_recovered(mdb, workers):
    """Recovery at every heartbeat looks only at dead workers' tasks; a
    running task whose worker has no row at all (an older version, a row
    deleted by hand) is found by the once-a-minute sweep, the first a few
    seconds after a worker starts."""
    mdb.query("INSERT INTO pgrunner.tasks (kind, state, attempts, worker_id,"
              " started_at) VALUES ('noop', 'running', 1, 42, now())")
    tid = mdb.scalar("SELECT max(id) FROM pgrunner.tasks")
    w = workers(mdb)
    wait_state(mdb, tid, "succeeded", timeout=30)
    t = row(mdb, tid)
    assert t["attempts"] == 2, t
    assert w.stop() == 0


def test_a_dead_workers_row_goes_with_its_last_running_task(mdb, workers):
    """A dead worker's row stays until every one of its running tasks was
    given back, so a task still locked when recovery first looked is not
    forgotten."""
    mdb.query("INSERT INTO pgrunner.workers (id, name) VALUES (7, 'pgrunner/gone')")
    mdb.query("INSERT INTO pgrunner.tasks (kind, state, attempts, worker_id,"
              " started_at) VALUES ('noop', 'running', 1, 7, now())")
    tid = mdb.scalar("SELECT max(id) FROM pgrunner.tasks")
    holder = mdb.connect(autocommit=False)
    try:
        holder.cursor().execute("SELECT 1 FROM pgrunner.tasks WHERE id = %s "
                                "FOR UPDATE", (tid,))
        assert mdb.scalar("SELECT pgrunner.recover(false)") == 0
        assert mdb.scalar("SELECT count(*) FROM pgrunner.workers "
                          "WHERE id = 7") == 1
    finally:
        holder.rollback()
        holder.close()
    assert mdb.scalar("SELECT pgrunner.recover(false)") == 1
    assert mdb.scalar("SELECT count(*) FROM pgrunner.workers WHERE id = 7") == 0
    assert row(mdb, tid)["state"] == "queued"
