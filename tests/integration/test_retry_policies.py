"""Retry policies (sql/0011_retry_policies.sql): max_attempts, base delay,
cap and jitter per kind and per queue, set with
pgrunner.set_retry_policy(); a task's own max_attempts wins; the email
kind's default outlasts a day-long outage of its mail server.

Everything here reads rows: the policy table, the tasks' max_attempts, and
the run_at that a failed attempt was given (finish_attempt's backoff)."""

import io

import psycopg2
import pytest

from pgr_fixtures import add_task, run_pgrunner, wait_until

DAY = 86400.0


def policy(db, kind, queue):
    cols = ("max_attempts", "base", "cap", "jitter", "policy_kind",
            "policy_queue", "built_in")
    row = db.query("SELECT max_attempts, extract(epoch FROM base)::float8,"
                   " extract(epoch FROM cap)::float8, jitter, policy_kind,"
                   " policy_queue, built_in"
                   " FROM pgrunner.retry_policy(%s, %s)", (kind, queue))[0]
    return dict(zip(cols, row))


def max_attempts(db, tid):
    return db.scalar("SELECT max_attempts FROM pgrunner.tasks WHERE id = %s",
                     (tid,))


def test_the_email_default_outlasts_a_day_long_outage(mdb):
    p = policy(mdb, "email", "default")
    assert not p["built_in"] and p["policy_kind"] == "email"
    # Every delay between two attempts at the low end of its jitter.
    low = sum(min(p["base"] * 2 ** (k - 1), p["cap"]) * (1 - p["jitter"])
              for k in range(1, p["max_attempts"]))
    assert low > DAY, (p, low)
    # A plain INSERT of an email gets that many attempts; other kinds keep
    # the built-in 5 (the column's old default).
    tid = mdb.scalar("INSERT INTO pgrunner.tasks (kind, payload) VALUES"
                     " ('email', '{\"to\": \"a@example.com\"}') RETURNING id")
    assert max_attempts(mdb, tid) == p["max_attempts"]
    other = mdb.scalar("INSERT INTO pgrunner.tasks (kind) VALUES ('noop')"
                       " RETURNING id")
    assert max_attempts(mdb, other) == 5
    assert policy(mdb, "noop", "default") == {
        "max_attempts": 5, "base": 1.0, "cap": 3600.0, "jitter": 0.5,
        "policy_kind": None, "policy_queue": None, "built_in": True}


def test_precedence_kind_and_queue_then_kind_then_queue(mdb):
    mdb.query("SELECT pgrunner.set_retry_policy(max_attempts => 6)")
    mdb.query("SELECT pgrunner.set_retry_policy(queue => 'mail',"
              " max_attempts => 7)")
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'report',"
              " max_attempts => 8)")
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'report',"
              " queue => 'mail', max_attempts => 9)")
    cases = {("report", "mail"): 9, ("report", "default"): 8,
             ("thumb", "mail"): 7, ("thumb", "default"): 6}
    for (kind, queue), n in cases.items():
        assert policy(mdb, kind, queue)["max_attempts"] == n, (kind, queue)
        tid = add_task(mdb, kind, queue=queue)
        assert max_attempts(mdb, tid) == n, (kind, queue)
    # One statement with rows of several scopes, as a COPY would bring.
    mdb.query("INSERT INTO pgrunner.tasks (kind, queue) VALUES"
              " ('report', 'mail'), ('thumb', 'mail'), ('report', 'mail'),"
              " ('report', 'default'), ('thumb', 'default')")
    got = mdb.query("SELECT kind, queue, max_attempts FROM pgrunner.tasks"
                    " ORDER BY id DESC LIMIT 5")
    assert [r[2] for r in reversed(got)] == [9, 7, 9, 8, 6]
    assert mdb.scalar("SELECT pgrunner.drop_retry_policy(kind => 'report',"
                      " queue => 'mail')") is True
    assert mdb.scalar("SELECT pgrunner.drop_retry_policy(kind => 'report',"
                      " queue => 'mail')") is False
    assert policy(mdb, "report", "mail")["max_attempts"] == 8


def test_the_inserters_own_max_attempts_wins(mdb):
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'job',"
              " max_attempts => 30)")
    plain = mdb.scalar("INSERT INTO pgrunner.tasks (kind, max_attempts)"
                       " VALUES ('job', 3) RETURNING id")
    via_api = add_task(mdb, "job", max_attempts=2)
    by_policy = add_task(mdb, "job")
    assert [max_attempts(mdb, t) for t in (plain, via_api, by_policy)] == \
        [3, 2, 30]
    # COPY goes through the same trigger.
    conn = mdb.connect()
    try:
        conn.cursor().copy_expert(
            "COPY pgrunner.tasks (kind, max_attempts) FROM STDIN",
            io.StringIO("job\t4\njob\t\\N\n"))
    finally:
        conn.close()
    rows = mdb.query("SELECT max_attempts FROM pgrunner.tasks"
                     " ORDER BY id DESC LIMIT 2")
    assert [r[0] for r in reversed(rows)] == [4, 30]
    # pgrunner add without --max-attempts takes the policy, with it its own.
    r = run_pgrunner(["add", "job", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    assert max_attempts(mdb, int(r.stdout)) == 30
    r = run_pgrunner(["add", "job", "--max-attempts", "9", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    assert max_attempts(mdb, int(r.stdout)) == 9


def test_a_policy_change_applies_to_the_next_statement(mdb):
    """Within one client statement (a DO block), an INSERT after
    set_retry_policy() sees the new policy."""
    mdb.query("""
      DO $$
      BEGIN
        INSERT INTO pgrunner.tasks (kind) VALUES ('x');
        PERFORM pgrunner.set_retry_policy(kind => 'x', max_attempts => 12);
        INSERT INTO pgrunner.tasks (kind) VALUES ('x');
        PERFORM pgrunner.drop_retry_policy(kind => 'x');
        INSERT INTO pgrunner.tasks (kind) VALUES ('x');
      END $$""")
    rows = mdb.query("SELECT max_attempts FROM pgrunner.tasks ORDER BY id")
    assert [r[0] for r in rows] == [5, 12, 5]


def test_left_out_arguments_keep_the_current_values(mdb):
    row = mdb.query("SELECT max_attempts, base, cap, jitter FROM"
                    " pgrunner.set_retry_policy(kind => 'email',"
                    " max_attempts => 50)")[0]
    assert row[0] == 50
    p = policy(mdb, "email", "default")
    assert (p["base"], p["cap"], p["jitter"]) == (30.0, 3600.0, 0.2)
    # A new, narrower scope starts from what applied to it.
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'email',"
              " queue => 'bulk', base => interval '5 minutes')")
    p = policy(mdb, "email", "bulk")
    assert (p["max_attempts"], p["base"], p["cap"], p["jitter"]) == \
        (50, 300.0, 3600.0, 0.2)


@pytest.mark.parametrize("args,message", [
    ("kind => 'k', max_attempts => 0", "max_attempts must be at least 1"),
    ("kind => 'k', base => interval '0'", "base must be a positive interval"),
    ("kind => 'k', base => interval '-5 s'",
     "base must be a positive interval"),
    ("kind => 'k', base => interval '2 min', cap => interval '1 min'",
     "must be at least base"),
    ("kind => 'k', cap => interval '2 years'", "cap must be at most 1 year"),
    ("kind => 'k', jitter => 1.5", "jitter must be between 0 and 1"),
    ("kind => 'k', jitter => -0.1", "jitter must be between 0 and 1"),
    ("kind => 'k', jitter => 'NaN'", "jitter must be between 0 and 1"),
    ("kind => '', max_attempts => 3", "not an empty string"),
    ("queue => '', max_attempts => 3", "not an empty string"),
])
def test_bad_values_are_refused_and_change_nothing(mdb, args, message):
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'k',"
              " max_attempts => 4)")
    before = mdb.query("SELECT * FROM pgrunner.retry_policies ORDER BY 1, 2")
    with pytest.raises(psycopg2.Error) as e:
        mdb.query(f"SELECT pgrunner.set_retry_policy({args})")
    assert message in str(e.value), str(e.value)
    assert e.value.pgcode == "22023"
    mdb.conn.rollback()
    assert mdb.query("SELECT * FROM pgrunner.retry_policies"
                     " ORDER BY 1, 2") == before


def retry_delay(db, tid, attempt):
    """Run finish_attempt() on attempt `attempt` of task tid as a failed
    attempt of worker 1; return run_at - now() in seconds (one
    transaction, so now() is the instant finish_attempt used)."""
    conn = db.connect(autocommit=False)
    try:
        cur = conn.cursor()
        cur.execute("UPDATE pgrunner.tasks SET state = 'running',"
                    " attempts = %s, worker_id = 1 WHERE id = %s",
                    (attempt, tid))
        cur.execute("SELECT new_state FROM pgrunner.finish_attempt("
                    "%s, %s, 1, 'retry', 'boom')", (tid, attempt))
        state = cur.fetchone()[0]
        cur.execute("SELECT extract(epoch FROM run_at - now())::float8"
                    " FROM pgrunner.tasks WHERE id = %s", (tid,))
        delay = cur.fetchone()[0]
        conn.commit()
        return state, delay
    finally:
        conn.close()


def test_the_backoff_follows_the_policy(mdb):
    """A retry's run_at is least(base * 2^(attempt-1), cap) times a factor
    in [1 - jitter, 1 + jitter) after the failed attempt; after
    max_attempts the task fails."""
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'flaky',"
              " max_attempts => 6, base => interval '30 seconds',"
              " cap => interval '2 minutes', jitter => 0.1)")
    tid = add_task(mdb, "flaky")
    for attempt, nominal in ((1, 30), (2, 60), (3, 120), (4, 120),
                             (5, 120)):
        for _ in range(5):
            state, delay = retry_delay(mdb, tid, attempt)
            assert state == "queued"
            assert nominal * 0.9 <= delay < nominal * 1.1, (attempt, delay)
    state, _ = retry_delay(mdb, tid, 6)
    assert state == "failed"


def test_the_built_in_backoff_is_unchanged(mdb):
    """Kinds without a policy keep 1, 2, 4, 8 s times [0.5, 1.5)."""
    tid = add_task(mdb, "noop")
    for attempt, nominal in ((1, 1), (2, 2), (3, 4), (4, 8)):
        state, delay = retry_delay(mdb, tid, attempt)
        assert state == "queued"
        assert nominal * 0.5 <= delay < nominal * 1.5, (attempt, delay)
    assert retry_delay(mdb, tid, 5)[0] == "failed"


def test_a_policy_change_applies_to_the_next_retry(mdb):
    """The delays are read when a retry is scheduled; max_attempts was
    fixed when the task was inserted."""
    tid = add_task(mdb, "slowpoke")
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'slowpoke',"
              " max_attempts => 99, base => interval '1 hour',"
              " cap => interval '1 hour', jitter => 0)")
    state, delay = retry_delay(mdb, tid, 1)
    assert state == "queued" and delay == 3600.0
    assert max_attempts(mdb, tid) == 5
