"""Worker threads' statements (issue 11, worker/jobs/stmt.c): named prepared
statements on a session of the thread's own (--db is the conninfo whose
session the loop checked), unnamed ones when --listen-db is apart (--db may
then be a transaction pool, as test_poolers.py runs it); a prepared plan
gone stale is forgotten and the task is retried, not failed for good."""

import json

from pgr_fixtures import wait_until

# A SQL job that reports the prepared statements of the session it runs
# on: the thread's own.
NAMES_JOB = """
CREATE SCHEMA IF NOT EXISTS pgrunner_jobs;
CREATE FUNCTION pgrunner_jobs.prep_names(p jsonb) RETURNS jsonb
LANGUAGE sql AS $$
  SELECT coalesce(jsonb_agg(name ORDER BY name), '[]')
    FROM pg_prepared_statements
$$;
"""


def run_names_task(mdb, workers, *args):
    mdb.query(NAMES_JOB)
    tid = mdb.scalar("SELECT pgrunner.add_task('prep_names')")
    w = workers(mdb, "--concurrency", "1", *args)
    wait_until(lambda: mdb.scalar("SELECT state FROM pgrunner.tasks "
                                  "WHERE id = %s", (tid,)) == "succeeded",
               what="the task to succeed")
    w.stop()
    out = mdb.scalar("SELECT output FROM pgrunner.tasks WHERE id = %s",
                     (tid,))
    return out if isinstance(out, list) else json.loads(out)


def test_a_thread_on_the_checked_session_prepares_its_statements(mdb,
                                                                 workers):
    names = run_names_task(mdb, workers)
    # The settings, the lock and this kind's call-and-mark statement.
    assert {"pgr_1", "pgr_2", "pgr_call_0"} <= set(names), names


def test_threads_send_unnamed_statements_when_listen_db_is_apart(mdb,
                                                                 workers):
    # The same server by another conninfo: what --db reaches is then not
    # known to be a session (it could be a transaction pool).
    names = run_names_task(mdb, workers, "--listen-db",
                           mdb.dsn + " application_name=pgr_listen")
    assert names == [], names


def noop_returning_text(mdb):
    """complete_noop as the migrations left it, but returning text: a
    prepared statement calling the old one can no longer run as planned
    (SQLSTATE 0A000)."""
    src = mdb.scalar("SELECT pg_get_functiondef("
                     "'pgrunner.complete_noop(bigint, int, bigint)'"
                     "::regprocedure)")
    assert "RETURNS boolean" in src and "RETURN FOUND;" in src, src
    src = src.replace("RETURNS boolean", "RETURNS text").replace(
        "RETURN FOUND;", "RETURN CASE WHEN FOUND THEN 't' ELSE 'f' END;")
    return ("DROP FUNCTION pgrunner.complete_noop(bigint, int, bigint);\n"
            + src)


def test_a_stale_prepared_plan_is_forgotten_and_the_task_retried(mdb,
                                                                 workers):
    def state(tid):
        return mdb.scalar("SELECT state FROM pgrunner.tasks WHERE id = %s",
                          (tid,))

    w = workers(mdb, "--concurrency", "1")
    first = mdb.scalar("SELECT pgrunner.add_task('noop')")
    wait_until(lambda: state(first) == "succeeded", what="the first no-op")
    mdb.query(noop_returning_text(mdb))
    second = mdb.scalar("SELECT pgrunner.add_task('noop', max_attempts => 5)")
    # The first attempt meets the stale plan and is retried on a
    # statement prepared afresh.
    wait_until(lambda: mdb.scalar(
        "SELECT attempts FROM pgrunner.tasks WHERE id = %s", (second,)) >= 2
        or state(second) == "succeeded", what="a second attempt")
    mdb.query("UPDATE pgrunner.tasks SET run_at = now() "
              "WHERE id = %s AND state = 'queued'", (second,))
    mdb.query("NOTIFY pgrunner")
    wait_until(lambda: state(second) in ("succeeded", "failed"),
               what="the second no-op to end")
    w.stop()
    assert state(second) == "succeeded"
    attempts = mdb.scalar("SELECT attempts FROM pgrunner.tasks WHERE id = %s",
                          (second,))
    assert attempts == 2, attempts
    assert "forgetting the session's prepared statements" in w.output()
