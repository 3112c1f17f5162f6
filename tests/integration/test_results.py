"""Task results (issue 16, item 3): a SQL-function job's return value and a C
handler's output are stored in pgrunner.tasks.output with the task's end;
pgrunner.wait_task(id, timeout) returns (state, output, last_error) once the
task has ended; retry_task clears the output."""

import html
import threading
import urllib.request

import psycopg2
import pytest

from pgr_fixtures import free_port, plugin_path, wait_until

JOBS = """
CREATE SCHEMA IF NOT EXISTS pgrunner_jobs;
CREATE TABLE side (v text);
CREATE FUNCTION pgrunner_jobs.r_jsonb(p jsonb) RETURNS jsonb
LANGUAGE sql AS $$ INSERT INTO side VALUES ('jsonb');
                   SELECT jsonb_build_object('echo', p, 'n', 1) $$;
CREATE FUNCTION pgrunner_jobs.r_int(p jsonb) RETURNS int
LANGUAGE sql AS $$ SELECT (p->>'n')::int * 2 $$;
CREATE FUNCTION pgrunner_jobs.r_text(p jsonb) RETURNS text
LANGUAGE sql AS $$ SELECT 'hello ' || (p->>'who') $$;
CREATE FUNCTION pgrunner_jobs.r_void(p jsonb) RETURNS void
LANGUAGE plpgsql AS $$ BEGIN INSERT INTO side VALUES ('void'); END $$;
CREATE FUNCTION pgrunner_jobs.r_null(p jsonb) RETURNS int
LANGUAGE sql AS $$ SELECT NULL::int $$;
CREATE FUNCTION pgrunner_jobs.r_set(p jsonb) RETURNS SETOF int
LANGUAGE sql AS $$ SELECT generate_series(1, 3) $$;
CREATE FUNCTION pgrunner_jobs.r_record(p jsonb, OUT a int, OUT b text)
LANGUAGE sql AS $$ SELECT 7, 'seven' $$;
CREATE FUNCTION pgrunner_jobs.r_fail(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN INSERT INTO side VALUES ('fail');
  RAISE EXCEPTION 'no result today'; END $$;
-- pgrunner's own SQLSTATEs raised by a job are the job's failure, not a
-- lost or cancelled attempt (the job runs in the success mark's statement).
CREATE FUNCTION pgrunner_jobs.r_pr001(p jsonb) RETURNS jsonb
LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'mine' USING ERRCODE = 'PR001';
END $$;
CREATE FUNCTION pgrunner_jobs.r_slow(p jsonb) RETURNS jsonb
LANGUAGE sql AS $$ SELECT pg_sleep((p->>'sleep')::float8);
                   SELECT '{"slept": true}'::jsonb $$;
"""

FINAL = ("succeeded", "failed", "cancelled")


def row(db, tid):
    return db.query("SELECT state, attempts, last_error, output "
                    "FROM pgrunner.tasks WHERE id = %s", (tid,))[0]


def add(db, kind, payload="{}", **kw):
    extra = "".join(f", {k} => {v}" for k, v in kw.items())
    return db.scalar(f"SELECT pgrunner.add_task(%s, %s::jsonb{extra})",
                     (kind, payload))


def wait_final(db, ids):
    wait_until(lambda: all(row(db, t)[0] in FINAL for t in ids),
               what="tasks to end")


def test_a_sql_jobs_return_value_is_stored_as_its_output(mdb, workers):
    mdb.query(JOBS)
    t = {
        "jsonb": add(mdb, "r_jsonb", '{"a": [1, 2]}'),
        "int": add(mdb, "r_int", '{"n": 21}'),
        "text": add(mdb, "r_text", '{"who": "ada"}'),
        "void": add(mdb, "r_void"),
        "null": add(mdb, "r_null"),
        "set": add(mdb, "r_set"),
        "record": add(mdb, "r_record"),
        "fail": add(mdb, "r_fail", max_attempts=1),
        "pr001": add(mdb, "r_pr001", max_attempts=1),
    }
    port = free_port()
    w = workers(mdb, "--metrics-listen", f"127.0.0.1:{port}")
    wait_final(mdb, t.values())
    assert row(mdb, t["jsonb"]) == ("succeeded", 1, None,
                                    {"echo": {"a": [1, 2]}, "n": 1})
    assert row(mdb, t["int"])[3] == 42
    assert row(mdb, t["text"])[3] == "hello ada"
    assert row(mdb, t["void"])[:2] == ("succeeded", 1)
    assert row(mdb, t["void"])[3] is None, "void gives NULL, not \"\""
    assert row(mdb, t["null"]) == ("succeeded", 1, None, None)
    assert row(mdb, t["set"])[3] == [1, 2, 3]
    assert row(mdb, t["record"])[3] == {"a": 7, "b": "seven"}
    assert row(mdb, t["fail"]) == ("failed", 1, "no result today", None)
    assert row(mdb, t["pr001"]) == ("failed", 1, "mine", None)
    # What the jobs wrote committed with their success, and only then.
    assert sorted(r[0] for r in mdb.query("SELECT v FROM side")) == \
        ["jsonb", "void"]
    out = w.output()
    assert f"task={t['pr001']}" in out and "no longer ours" not in out
    # The dashboard's task page shows the output (escaped, pretty-printed).
    with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/task/{t['text']}", timeout=30) as r:
        page = html.unescape(r.read().decode())
    assert '<pre id="output">"hello ada"</pre>' in page
    assert w.stop() == 0


def test_a_c_handler_sets_its_output_through_the_plugin_api(mdb, workers):
    ok = add(mdb, "c_output", '{"output": {"x": [1, 2], "f": 0.1}}')
    scalar = add(mdb, "c_output", '{"output": "just text"}')
    failed = add(mdb, "c_output",
                 '{"output": {"why": "kept"}, "fail": true}')
    w = workers(mdb, "--plugin", plugin_path())
    wait_final(mdb, [ok, scalar, failed])
    # The handler also checked that text that is not JSON was refused.
    assert row(mdb, ok) == ("succeeded", 1, None, {"x": [1, 2], "f": 0.1})
    assert mdb.scalar("SELECT output::text FROM pgrunner.tasks WHERE id = %s",
                      (ok,)) == '{"f": 0.1, "x": [1, 2]}'
    assert row(mdb, scalar)[3] == "just text"
    assert row(mdb, failed) == ("failed", 1, "plugin failed, output kept",
                                {"why": "kept"})
    assert w.stop() == 0

    # retry_task: queued again, with the old attempt's output gone.
    assert mdb.scalar("SELECT pgrunner.retry_task(%s)", (failed,)) is True
    assert row(mdb, failed) == ("queued", 0, "plugin failed, output kept",
                                None)


def test_wait_task_returns_the_final_state_output_and_error(mdb, workers):
    mdb.query(JOBS)
    slow = add(mdb, "r_slow", '{"sleep": 1}')
    bad = add(mdb, "r_fail", max_attempts=1, run_at="now() + interval '1 s'")
    results = {}

    def waiter(name, tid):
        c = mdb.connect()
        try:
            with c.cursor() as cur:
                cur.execute("SELECT * FROM pgrunner.wait_task(%s, "
                            "interval '60 s')", (tid,))
                results[name] = cur.fetchone()
        finally:
            c.close()

    threads = [threading.Thread(target=waiter, args=a)
               for a in (("slow", slow), ("bad", bad))]
    for th in threads:
        th.start()
    w = workers(mdb)
    for th in threads:
        th.join(90)
    assert results["slow"] == ("succeeded", {"slept": True}, None)
    assert results["bad"] == ("failed", None, "no result today")
    assert w.stop() == 0


def test_wait_task_times_out_with_the_current_state(mdb):
    tid = add(mdb, "noop")  # no worker runs
    assert mdb.query("SELECT * FROM pgrunner.wait_task(%s, interval "
                     "'300 ms')", (tid,))[0] == ("queued", None, None)
    # Named arguments as documented; zero reads once.
    assert mdb.query("SELECT state FROM pgrunner.wait_task(id => %s, "
                     "timeout => interval '0 s')", (tid,))[0] == ("queued",)
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
    assert mdb.query("SELECT * FROM pgrunner.wait_task(%s)",
                     (tid,))[0] == ("cancelled", None, None)


def test_wait_task_refuses_an_unknown_id_and_bad_arguments(mdb):
    with pytest.raises(psycopg2.Error) as e:
        mdb.query("SELECT * FROM pgrunner.wait_task(987654321)")
    assert e.value.pgcode == "P0002"
    assert "no task with id 987654321" in e.value.pgerror
    tid = add(mdb, "noop")
    with pytest.raises(psycopg2.Error) as e:
        mdb.query("SELECT * FROM pgrunner.wait_task(%s, interval '-1 s')",
                  (tid,))
    assert e.value.pgcode == "22023"
    c = mdb.connect(autocommit=False)
    try:
        c.set_session(isolation_level="REPEATABLE READ")
        with pytest.raises(psycopg2.Error) as e:
            c.cursor().execute("SELECT * FROM pgrunner.wait_task(%s)", (tid,))
        assert "needs READ COMMITTED" in e.value.pgerror
    finally:
        c.close()


def test_a_producer_may_wait_for_its_task(mdb):
    tid = add(mdb, "noop")
    c = mdb.connect(autocommit=False)
    try:
        cur = c.cursor()
        cur.execute("SET ROLE pgrunner_producer")
        cur.execute("SELECT state FROM pgrunner.wait_task(%s, interval '0')",
                    (tid,))
        assert cur.fetchone() == ("queued",)
    finally:
        c.close()
