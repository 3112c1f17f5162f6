"""Flow control (sql/0015_flow.sql, issue 16 items 1 and 2): one task at a
time per serial key, and per-queue limits that hold across every worker
(max_running, rate, pause).

Everything is read back from rows: start and end times that the tasks'
own SQL functions record with clock_timestamp(), the running count a task
sees from inside its transaction, the tasks' started_at. Nothing is timed;
waits have generous timeouts."""

import io
import threading
import time

import psycopg2
import pytest

from pgr_fixtures import add_task, wait_until

JOBS = """
  CREATE TABLE public.runs (task bigint, k text, n int, attempt int,
                            started timestamptz, ended timestamptz,
                            running int);
  -- Sleeps p.ms; records when it started and ended, and how many tasks
  -- of its queue were running when it started (its own included).
  CREATE FUNCTION pgrunner_jobs.step(p jsonb) RETURNS void
  LANGUAGE plpgsql AS $$
  DECLARE
    t0 timestamptz := clock_timestamp();
    seen int;
  BEGIN
    SELECT count(*) INTO seen FROM pgrunner.tasks
     WHERE queue = p->>'queue' AND state = 'running';
    PERFORM pg_sleep(coalesce((p->>'ms')::int, 0) / 1000.0);
    INSERT INTO public.runs VALUES (NULL, p->>'k', (p->>'n')::int, 1, t0,
                                    clock_timestamp(), seen);
  END $$;
"""


def setup_jobs(db):
    db.query(JOBS)


def runs(db, k=None):
    return db.query("SELECT k, n, started, ended, running FROM public.runs"
                    + (" WHERE k = %s" if k else "") + " ORDER BY started",
                    (k,) if k else None)


def heads(db, key):
    return db.scalar("SELECT count(*) FROM pgrunner.tasks WHERE serial_key = %s"
                     " AND state IN ('queued', 'running') AND NOT serial_held",
                     (key,))


def all_done(db, queue=None):
    return db.scalar("SELECT count(*) = 0 FROM pgrunner.tasks"
                     " WHERE state IN ('queued', 'running')"
                     + (" AND queue = %s" if queue else ""),
                     (queue,) if queue else None)


# --- 1. serial keys ------------------------------------------------------------

def test_serial_keys_run_one_at_a_time_in_order_across_three_workers(
        mdb, workers):
    setup_jobs(mdb)
    # Three keys, eight tasks each, priorities out of insertion order; six
    # tasks without a key. All inserted before any worker runs.
    prio = [3, -1, 0, 2, -1, 5, 0, 1]
    for k in ("a", "b", "c"):
        for n, p in enumerate(prio):
            add_task(mdb, "step", priority=p, serial_key=k,
                     payload={"k": k, "n": n, "ms": 60, "queue": "default"})
    for n in range(6):
        add_task(mdb, "step", payload={"k": "free", "n": n, "ms": 400,
                                       "queue": "default"})
    assert [heads(mdb, k) for k in ("a", "b", "c")] == [1, 1, 1]
    ws = [workers(mdb, "--concurrency", "3", "--poll-interval", "200")
          for _ in range(3)]
    wait_until(lambda: all_done(mdb), timeout=120, what="all tasks done")
    for w in ws:
        assert w.stop() == 0, w.output()
    expected = [n for n, _ in sorted(enumerate(prio),
                                     key=lambda x: (x[1], x[0]))]
    for k in ("a", "b", "c"):
        rs = runs(mdb, k)
        assert [r[1] for r in rs] == expected, (k, rs)
        for before, after in zip(rs, rs[1:]):
            assert before[3] <= after[2], (k, before, after)  # no overlap
    # The tasks without a key were not held back: some ran side by side.
    free = runs(mdb, "free")
    assert len(free) == 6
    assert any(a[3] > b[2] for a, b in zip(free, free[1:])), free
    assert mdb.scalar("SELECT count(*) FROM pgrunner.serial_keys") == 0


def test_a_failed_attempt_waiting_for_its_retry_holds_its_key(mdb, workers):
    setup_jobs(mdb)
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'flaky',"
              " base => interval '2 seconds', jitter => 0)")
    mdb.query("""
      CREATE FUNCTION pgrunner_jobs.flaky(p jsonb) RETURNS void
      LANGUAGE plpgsql AS $$
      BEGIN
        IF (SELECT attempts FROM pgrunner.tasks WHERE id = (p->>'id')::bigint) = 1
        THEN RAISE EXCEPTION 'first attempt fails'; END IF;
        INSERT INTO public.runs VALUES ((p->>'id')::bigint, 'r', 0, 2,
                                        clock_timestamp(), clock_timestamp());
      END $$;""")
    first = mdb.scalar("INSERT INTO pgrunner.tasks (kind, serial_key, payload)"
                       " VALUES ('flaky', 'r', '{}') RETURNING id")
    mdb.query("UPDATE pgrunner.tasks SET payload = jsonb_build_object('id', id)"
              " WHERE id = %s", (first,))
    second = add_task(mdb, "step", serial_key="r",
                      payload={"k": "r", "n": 1, "queue": "default"})
    w = workers(mdb, "--concurrency", "4", "--poll-interval", "100")
    wait_until(lambda: mdb.query(
        "SELECT state, attempts FROM pgrunner.tasks WHERE id = %s",
        (first,))[0] == ("queued", 1), what="first attempt failed")
    # The retry is due in 2 s; meanwhile the second task of the key waits.
    for _ in range(5):
        st = mdb.query("SELECT state, attempts, serial_held"
                       " FROM pgrunner.tasks WHERE id = %s", (second,))[0]
        assert st == ("queued", 0, True), st
        if mdb.scalar("SELECT attempts FROM pgrunner.tasks WHERE id = %s",
                      (first,)) > 1:
            break
        time.sleep(0.2)
    wait_until(lambda: all_done(mdb), timeout=60, what="both done")
    assert w.stop() == 0, w.output()
    rs = mdb.query("SELECT n, started FROM public.runs ORDER BY started")
    assert [r[0] for r in rs] == [0, 1], rs
    assert mdb.scalar("SELECT started_at >= (SELECT finished_at FROM"
                      " pgrunner.tasks WHERE id = %s) FROM pgrunner.tasks"
                      " WHERE id = %s", (first, second))


def test_cancel_fail_delete_and_retry_release_the_next(mdb, workers):
    ids = [add_task(mdb, "noop", serial_key="x", queue="off") for _ in range(5)]

    def held():
        return [r[0] for r in mdb.query(
            "SELECT serial_held FROM pgrunner.tasks WHERE id = ANY (%s)"
            " ORDER BY id", (ids,))]

    assert held() == [False, True, True, True, True]
    # Cancelling a waiting task changes nothing for the head.
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (ids[2],))
    assert held()[:2] == [False, True]
    # Cancelling the head releases the next waiting one (not the cancelled).
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (ids[0],))
    assert heads(mdb, "x") == 1
    assert mdb.scalar("SELECT NOT serial_held FROM pgrunner.tasks"
                      " WHERE id = %s", (ids[1],))
    # Deleting the head releases the next.
    mdb.query("DELETE FROM pgrunner.tasks WHERE id = %s", (ids[1],))
    assert mdb.scalar("SELECT NOT serial_held FROM pgrunner.tasks"
                      " WHERE id = %s", (ids[3],))
    # A retried task joins the queue behind the head.
    assert mdb.scalar("SELECT pgrunner.retry_task(%s)", (ids[0],))
    assert mdb.scalar("SELECT serial_held FROM pgrunner.tasks WHERE id = %s",
                      (ids[0],))
    assert heads(mdb, "x") == 1
    # A head that fails for good releases the next: make ids[3] fail.
    mdb.query("UPDATE pgrunner.tasks SET kind = 'no_such_kind',"
              " max_attempts = 1 WHERE id = %s", (ids[3],))
    mdb.query("UPDATE pgrunner.tasks SET queue = 'flow'"
              " WHERE id = ANY (%s)", (ids,))
    w = workers(mdb, "--queues", "flow", "--poll-interval", "100")
    wait_until(lambda: all_done(mdb), timeout=60, what="the key drained")
    assert w.stop() == 0, w.output()
    states = dict(mdb.query("SELECT id, state FROM pgrunner.tasks"))
    assert states == {ids[0]: "succeeded", ids[2]: "cancelled",
                      ids[3]: "failed", ids[4]: "succeeded"}, states


def test_a_task_that_adds_the_next_task_of_its_own_key(mdb, workers):
    """The key's row is the task's own (its insert took it): its end does
    not wait for itself, and the task it added runs next."""
    setup_jobs(mdb)
    mdb.query("""
      CREATE FUNCTION pgrunner_jobs.chain(p jsonb) RETURNS void
      LANGUAGE plpgsql AS $$
      BEGIN
        INSERT INTO public.runs VALUES (NULL, 'chain', (p->>'n')::int, 1,
                                        clock_timestamp(), clock_timestamp());
        IF (p->>'n')::int < 3 THEN
          PERFORM pgrunner.add_task('chain', serial_key => 'chain',
            payload => jsonb_build_object('n', (p->>'n')::int + 1));
        END IF;
      END $$;""")
    add_task(mdb, "chain", serial_key="chain", payload={"n": 0})
    w = workers(mdb, "--concurrency", "2", "--poll-interval", "100")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                                  " WHERE state = 'succeeded'") == 4,
               timeout=60, what="the chain ran")
    assert w.stop() == 0, w.output()
    assert [r[1] for r in runs(mdb, "chain")] == [0, 1, 2, 3]


def test_a_new_task_that_sorts_first_takes_the_place_of_an_unstarted_head(mdb):
    late = add_task(mdb, "noop", serial_key="p", queue="off", priority=5)
    early = add_task(mdb, "noop", serial_key="p", queue="off", priority=-5)
    assert mdb.query("SELECT id, serial_held FROM pgrunner.tasks ORDER BY id"
                     ) == [(late, True), (early, False)]


def test_bulk_inserts_of_100k_rows_with_one_key_and_with_many(mdb):
    with mdb.conn.cursor() as cur:
        cur.execute("INSERT INTO pgrunner.tasks (kind, queue, serial_key)"
                    " SELECT 'noop', 'off', 'one' FROM generate_series(1, 100000)")
        assert cur.rowcount == 100000
        cur.execute("INSERT INTO pgrunner.tasks (kind, queue, serial_key)"
                    " SELECT 'noop', 'off', 'k' || (g % 1000)"
                    " FROM generate_series(1, 100000) g")
        assert cur.rowcount == 100000
    assert heads(mdb, "one") == 1
    assert mdb.scalar("SELECT min(id) FROM pgrunner.tasks"
                      " WHERE serial_key = 'one'") == mdb.scalar(
        "SELECT id FROM pgrunner.tasks WHERE serial_key = 'one'"
        " AND NOT serial_held")
    assert mdb.query("SELECT count(DISTINCT serial_key), count(*)"
                     " FROM pgrunner.tasks WHERE serial_key LIKE 'k%%'"
                     " AND NOT serial_held") == [(1000, 1000)]
    # COPY, and more tasks of a key that already has a head.
    conn = mdb.connect(autocommit=False)
    try:
        buf = io.StringIO("".join(f"noop\toff\tone\n" for _ in range(20000)))
        conn.cursor().copy_expert(
            "COPY pgrunner.tasks (kind, queue, serial_key) FROM STDIN", buf)
        conn.commit()
    finally:
        conn.close()
    assert heads(mdb, "one") == 1


def test_concurrent_inserters_of_one_key_make_one_head(mdb):
    errors = []

    def insert(n):
        try:
            c = mdb.connect()
            try:
                for _ in range(20):
                    c.cursor().execute(
                        "INSERT INTO pgrunner.tasks (kind, queue, serial_key)"
                        " SELECT 'noop', 'off', 'race'"
                        " FROM generate_series(1, %s)", (n,))
            finally:
                c.close()
        except Exception as e:  # reported below
            errors.append(e)

    ts = [threading.Thread(target=insert, args=(n,)) for n in (1, 5, 50, 3)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors, errors
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks") == 20 * 59
    assert heads(mdb, "race") == 1


# --- 2. queue limits -----------------------------------------------------------

def test_max_running_holds_across_three_workers(mdb, workers):
    setup_jobs(mdb)
    mdb.query("SELECT pgrunner.set_queue_limit('lim', max_running => 2)")
    for n in range(24):
        add_task(mdb, "step", queue="lim",
                 payload={"k": "lim", "n": n, "ms": 150, "queue": "lim"})
    ws = [workers(mdb, "--queues", "lim", "--concurrency", "4",
                  "--poll-interval", "100") for _ in range(3)]
    wait_until(lambda: all_done(mdb, "lim"), timeout=120, what="lim drained")
    for w in ws:
        assert w.stop() == 0, w.output()
    seen = [r[4] for r in runs(mdb, "lim")]
    assert len(seen) == 24
    assert max(seen) <= 2, seen
    # The running count reads the same rows the limit is about.
    assert max(seen) >= 1


def test_max_running_counts_what_already_runs(mdb, workers):
    """A limit set while tasks run counts them (set_queue_limit waits for
    claims in flight and takes the running tasks as they are)."""
    setup_jobs(mdb)
    for n in range(3):
        add_task(mdb, "step", queue="pre",
                 payload={"k": "pre", "n": n, "ms": 1500, "queue": "pre"})
    w = workers(mdb, "--queues", "pre", "--concurrency", "3",
                "--poll-interval", "100")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                                  " WHERE state = 'running'") == 3,
               what="three running")
    mdb.query("SELECT pgrunner.set_queue_limit('pre', max_running => 1)")
    for n in range(3, 6):
        add_task(mdb, "step", queue="pre",
                 payload={"k": "pre", "n": n, "ms": 0, "queue": "pre"})
    wait_until(lambda: all_done(mdb, "pre"), timeout=60, what="pre drained")
    assert w.stop() == 0, w.output()
    rs = runs(mdb, "pre")
    # Each later task ran alone (the count includes itself), after the
    # three that ran when the limit was set had ended.
    assert [r[4] for r in rs if r[1] >= 3] == [1, 1, 1], rs
    assert min(r[2] for r in rs if r[1] >= 3) >= max(
        r[3] for r in rs if r[1] < 3), rs


def test_rate_limit_holds_in_every_window_and_wakes_workers(mdb, workers):
    mdb.query("SELECT pgrunner.set_queue_limit('rl', rate => '4/2s')")
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue)"
              " SELECT 'noop', 'rl' FROM generate_series(1, 14)")
    # No polling to speak of: a freed window must wake the workers.
    ws = [workers(mdb, "--queues", "rl", "--concurrency", "4",
                  "--poll-interval", "600000") for _ in range(3)]
    wait_until(lambda: all_done(mdb, "rl"), timeout=120, what="rl drained")
    for w in ws:
        assert w.stop() == 0, w.output()
    starts = [r[0] for r in mdb.query(
        "SELECT extract(epoch FROM started_at)::float8 FROM pgrunner.tasks"
        " ORDER BY started_at")]
    assert len(starts) == 14
    # No window (t - 2 s, t] holds 5 starts.
    for a, b in zip(starts, starts[4:]):
        assert b - a >= 2.0, starts


def test_pause_and_resume(mdb, workers):
    setup_jobs(mdb)
    assert mdb.scalar("SELECT pgrunner.pause_queue('pz')")
    assert not mdb.scalar("SELECT pgrunner.pause_queue('pz')")
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue)"
              " SELECT 'noop', 'pz' FROM generate_series(1, 5)")
    w = workers(mdb, "--queues", "pz,other", "--poll-interval", "50")
    # The worker claims (another queue's task runs) but takes nothing of pz.
    add_task(mdb, "noop", queue="other")
    wait_until(lambda: all_done(mdb, "other"), what="other done")
    time.sleep(1.0)
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks WHERE queue = 'pz'"
                      " AND state = 'queued' AND attempts = 0") == 5
    # A running task finishes while its queue is paused.
    add_task(mdb, "step", queue="pz2",
             payload={"k": "pz2", "n": 0, "ms": 800, "queue": "pz2"})
    w2 = workers(mdb, "--queues", "pz2", "--poll-interval", "600000")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                                  " WHERE queue = 'pz2' AND state = 'running'"
                                  ) == 1, what="pz2 running")
    assert mdb.scalar("SELECT pgrunner.pause_queue('pz2')")
    wait_until(lambda: all_done(mdb, "pz2"), what="pz2 finished")
    # Resuming wakes the workers at once (poll 10 minutes: the notification).
    add_task(mdb, "noop", queue="pz2")
    time.sleep(0.5)
    assert not all_done(mdb, "pz2")
    assert mdb.scalar("SELECT pgrunner.resume_queue('pz2')")
    wait_until(lambda: all_done(mdb, "pz2"), timeout=30, what="pz2 resumed")
    assert mdb.scalar("SELECT pgrunner.resume_queue('pz')")
    assert not mdb.scalar("SELECT pgrunner.resume_queue('pz')")
    wait_until(lambda: all_done(mdb, "pz"), timeout=30, what="pz resumed")
    assert mdb.scalar("SELECT count(*) FROM pgrunner.queue_limits") == 0
    for x in (w, w2):
        assert x.stop() == 0, x.output()


def test_limits_can_be_changed_and_removed(mdb):
    r = mdb.query("SELECT max_running, rate FROM pgrunner.set_queue_limit("
                  "'q', max_running => 3, rate => ' 100 / 1m ')")
    assert r == [(3, "100/1m")]
    assert mdb.query("SELECT rate FROM pgrunner.set_queue_limit('q',"
                     " rate => '7/s')") == [("7/1s",)]
    assert mdb.query("SELECT max_running, rate, paused"
                     " FROM pgrunner.queue_limits") == [(None, "7/1s", False)]
    assert mdb.query("SELECT rate FROM pgrunner.set_queue_limit('q',"
                     " rate => '7/120s')") == [("7/2m",)]
    assert mdb.query("SELECT rate FROM pgrunner.set_queue_limit('q',"
                     " rate => '1/24h')") == [("1/24h",)]
    assert mdb.scalar("SELECT pgrunner.drop_queue_limit('q')")
    assert not mdb.scalar("SELECT pgrunner.drop_queue_limit('q')")
    assert mdb.scalar("SELECT count(*) FROM pgrunner.queue_limits") == 0
    # A pause outlives a removed limit.
    mdb.query("SELECT pgrunner.set_queue_limit('q', max_running => 1)")
    mdb.query("SELECT pgrunner.pause_queue('q')")
    mdb.query("SELECT pgrunner.drop_queue_limit('q')")
    assert mdb.query("SELECT max_running, rate, paused"
                     " FROM pgrunner.queue_limits") == [(None, None, True)]


BAD = [
    ("SELECT pgrunner.set_queue_limit('q', max_running => 0)",
     "max_running must be at least 1"),
    ("SELECT pgrunner.set_queue_limit('q', max_running => -3)",
     "max_running must be at least 1"),
    ("SELECT pgrunner.set_queue_limit('q', rate => 'fast')",
     "rate must look like N/period"),
    ("SELECT pgrunner.set_queue_limit('q', rate => '10/1d')",
     "rate must look like N/period"),
    ("SELECT pgrunner.set_queue_limit('q', rate => '-1/1m')",
     "rate must look like N/period"),
    ("SELECT pgrunner.set_queue_limit('q', rate => '')",
     "rate must look like N/period"),
    ("SELECT pgrunner.set_queue_limit('q', rate => '0/1m')",
     "at least 1 start"),
    ("SELECT pgrunner.set_queue_limit('q', rate => '5/0s')",
     "at least 1 start"),
    ("SELECT pgrunner.set_queue_limit('q', rate => '5/25h')",
     "at most 24h"),
    ("SELECT pgrunner.set_queue_limit('', max_running => 1)",
     "a queue name is required"),
    ("SELECT pgrunner.set_queue_limit(NULL, max_running => 1)",
     "a queue name is required"),
    ("SELECT pgrunner.pause_queue('')", "a queue name is required"),
    ("SELECT pgrunner.resume_queue(NULL)", "a queue name is required"),
    ("SELECT pgrunner.drop_queue_limit('')", "a queue name is required"),
]


@pytest.mark.parametrize("sql,message", BAD)
def test_bad_input_is_refused_and_changes_nothing(mdb, sql, message):
    mdb.query("SELECT pgrunner.set_queue_limit('q', max_running => 2,"
              " rate => '10/1m')")
    before = mdb.query("SELECT * FROM pgrunner.queue_limits")
    with pytest.raises(psycopg2.Error) as e:
        mdb.query(sql)
    assert message in str(e.value), str(e.value)
    assert e.value.pgcode == "22023"
    assert mdb.query("SELECT * FROM pgrunner.queue_limits") == before


def test_an_empty_serial_key_is_refused(mdb):
    with pytest.raises(psycopg2.Error) as e:
        add_task(mdb, "noop", serial_key="")
    assert "tasks_serial_key_check" in str(e.value)
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks") == 0


def test_a_producer_adds_serial_tasks_and_may_not_change_limits(mdb):
    """pgrunner_producer inserts tasks with a serial key (the key's
    triggers run as their owner, also when a new task takes the place of
    an unstarted head) and cancels one; limits are the owner's."""
    name = "r_flow_producer"
    mdb.query(f'CREATE ROLE "{name}" LOGIN')
    mdb.query(f'GRANT pgrunner_producer TO "{name}"')
    p = psycopg2.connect(host=mdb.server.host, port=mdb.server.port,
                         user=name, dbname=mdb.name)
    p.autocommit = True
    try:
        with p.cursor() as cur:
            cur.execute("SELECT pgrunner.add_task('noop', queue => 'off',"
                        " priority => 5, serial_key => 'prod')")
            late = cur.fetchone()[0]
            cur.execute("INSERT INTO pgrunner.tasks (kind, queue, priority,"
                        " serial_key) VALUES ('noop', 'off', -5, 'prod')"
                        " RETURNING id")
            early = cur.fetchone()[0]
            cur.execute("SELECT pgrunner.cancel_task(%s)", (early,))
            assert cur.fetchone()[0] is True
            with pytest.raises(psycopg2.Error) as e:
                cur.execute("SELECT pgrunner.set_queue_limit('off',"
                            " max_running => 1)")
            assert e.value.pgcode == "42501"  # insufficient_privilege
    finally:
        p.close()
    assert mdb.query("SELECT id, state, serial_held FROM pgrunner.tasks"
                     " ORDER BY id") == [(late, "queued", False),
                                         (early, "cancelled", False)]
    assert mdb.scalar("SELECT count(*) FROM pgrunner.queue_limits") == 0
