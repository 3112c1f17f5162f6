"""The foundation: `pgrunner migrate`, the pgrunner.tasks table, add_task,
key de-duplication, the wake-up NOTIFY trigger, cancel_task / retry_task,
and the command-line surface (add, cancel, retry, usage errors, --help,
--version, where the database comes from, password hygiene).

Everything runs against a real PostgreSQL (the `pg` fixture), through the
real `pgrunner` binary, psql and psycopg2. No worker runs in this file but
the one that shows a flag overriding a broken PGRUNNER_* variable.
"""

import glob
import json
import os
import re
import select
import subprocess
import threading
import time
import uuid

import psycopg2
import pytest

from pgr_fixtures import (ROOT, add_task, pgrunner_bin, run_pgrunner,
                          wait_until)

SECRET = "SeCrEt123"


def one_line(text):
    """True when text is exactly one non-empty line (a trailing newline is
    fine)."""
    s = text.strip("\n")
    return s.strip() != "" and "\n" not in s


def sql_versions():
    """Migration versions shipped in sql/ (NNNN_name.sql)."""
    out = set()
    for p in glob.glob(os.path.join(ROOT, "sql", "[0-9]*_*.sql")):
        out.add(int(os.path.basename(p).split("_", 1)[0]))
    return out


def task(db, tid):
    rows = db.query(
        "SELECT id, queue, kind, payload, priority, run_at, state, attempts,"
        " max_attempts, last_error, key, created_at, started_at, finished_at"
        " FROM pgrunner.tasks WHERE id = %s", (tid,))
    if not rows:
        return None
    names = ["id", "queue", "kind", "payload", "priority", "run_at", "state",
             "attempts", "max_attempts", "last_error", "key", "created_at",
             "started_at", "finished_at"]
    return dict(zip(names, rows[0]))


def ntasks(db):
    return db.scalar("SELECT count(*) FROM pgrunner.tasks")


# --- migrate ------------------------------------------------------------------

def test_migrate_twice_changes_nothing(db):
    r1 = run_pgrunner(["migrate", "--db", db.dsn])
    assert r1.returncode == 0, r1.stderr
    rows1 = db.query("SELECT version, name, applied_at FROM pgrunner.migrations"
                     " ORDER BY version")
    assert {r[0] for r in rows1} == sql_versions()
    objs1 = db.query(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = 'pgrunner'"
        " ORDER BY 1")
    db.query("INSERT INTO pgrunner.tasks (kind) VALUES ('keepme')")

    r2 = run_pgrunner(["migrate", "--db", db.dsn])
    assert r2.returncode == 0, r2.stderr
    rows2 = db.query("SELECT version, name, applied_at FROM pgrunner.migrations"
                     " ORDER BY version")
    assert rows2 == rows1
    objs2 = db.query(
        "SELECT c.relname, c.relkind FROM pg_class c JOIN pg_namespace n"
        " ON n.oid = c.relnamespace WHERE n.nspname = 'pgrunner'"
        " ORDER BY 1")
    assert objs2 == objs1
    # Data survives a second migrate.
    assert db.scalar("SELECT count(*) FROM pgrunner.tasks WHERE kind ="
                     " 'keepme'") == 1


def test_migrate_applies_a_version_below_the_highest_applied(db):
    """Migrations are numbered when work on them starts, so one can land
    after a higher one: a database that records a higher version still gets
    every version it lacks."""
    db.query("CREATE SCHEMA pgrunner;"
             "CREATE TABLE pgrunner.migrations (version int PRIMARY KEY,"
             " name text NOT NULL, applied_at timestamptz NOT NULL"
             " DEFAULT now());"
             "INSERT INTO pgrunner.migrations VALUES (9999, '9999_later')")
    r = run_pgrunner(["migrate", "--db", db.dsn])
    assert r.returncode == 0, r.stderr
    assert {v for (v,) in db.query("SELECT version FROM pgrunner.migrations")
            } == sql_versions() | {9999}
    assert db.scalar("SELECT to_regclass('pgrunner.tasks') IS NOT NULL")


@pytest.mark.parametrize("round_", range(3))
def test_migrate_concurrently_from_four_processes(db, round_):
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("PGRUNNER_") and k != "PGRUNNER_BIN":
            del env[k]
    env.pop("DATABASE_URL", None)
    procs = [subprocess.Popen([pgrunner_bin(), "migrate", "--db", db.dsn],
                              env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    rows = db.query("SELECT version, count(*) FROM pgrunner.migrations"
                    " GROUP BY version ORDER BY version")
    assert {v for v, _ in rows} == sql_versions()
    assert all(n == 1 for _, n in rows), rows
    # The schema is usable.
    assert db.scalar("SELECT pgrunner.add_task('noop')") is not None


# --- the tasks table ----------------------------------------------------------

def test_tasks_columns_types_and_defaults(mdb):
    cols = {r[0]: (r[1], r[2], r[3]) for r in mdb.query(
        "SELECT column_name, data_type, column_default, is_nullable"
        " FROM information_schema.columns"
        " WHERE table_schema = 'pgrunner' AND table_name = 'tasks'")}
    expect = {
        "id": "bigint", "queue": "text", "kind": "text", "payload": "jsonb",
        "priority": "integer", "run_at": "timestamp with time zone",
        "state": "text", "attempts": "integer", "max_attempts": "integer",
        "last_error": "text", "key": "text",
        "created_at": "timestamp with time zone",
        "started_at": "timestamp with time zone",
        "finished_at": "timestamp with time zone",
    }
    for name, typ in expect.items():
        assert name in cols, f"pgrunner.tasks has no column {name}"
        assert cols[name][0] == typ, (name, cols[name])
    assert cols["kind"][2] == "NO"


def test_plain_insert_gets_the_defaults(mdb):
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, payload)"
                 " VALUES ('thing', '{\"a\": 1}')")
    assert r.returncode == 0, r.stderr
    row = mdb.query(
        "SELECT queue, kind, payload, priority, state, attempts, max_attempts,"
        " last_error, key, created_at IS NOT NULL, created_at <= now(),"
        " run_at IS NOT NULL, run_at <= now(), started_at, finished_at"
        " FROM pgrunner.tasks")
    assert len(row) == 1
    (queue, kind, payload, priority, state, attempts, max_attempts, last_error,
     key, has_created, created_past, has_run_at, run_at_past, started,
     finished) = row[0]
    assert queue == "default"
    assert kind == "thing"
    assert payload == {"a": 1}
    assert priority == 0
    assert state == "queued"
    assert attempts == 0
    assert max_attempts == 5
    assert last_error is None and key is None
    assert has_created and created_past
    assert has_run_at and run_at_past
    assert started is None and finished is None

    # payload defaults to {} as well.
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind) VALUES ('bare')")
    assert r.returncode == 0, r.stderr
    assert mdb.scalar("SELECT payload FROM pgrunner.tasks WHERE kind ="
                      " 'bare'") == {}


@pytest.mark.parametrize("sql", [
    "INSERT INTO pgrunner.tasks (kind, state) VALUES ('x', 'bogus')",
    "INSERT INTO pgrunner.tasks (kind, state) VALUES ('x', 'QUEUED')",
    "INSERT INTO pgrunner.tasks (kind, attempts) VALUES ('x', -1)",
    "INSERT INTO pgrunner.tasks (kind) VALUES (NULL)",
])
def test_constraints_reject_bad_rows(mdb, sql):
    r = mdb.psql(sql, check=False)
    assert r.returncode != 0
    assert "violates" in r.stderr, r.stderr
    assert ntasks(mdb) == 0


def test_update_to_bad_state_rejected(mdb):
    tid = add_task(mdb, "x")
    r = mdb.psql(f"UPDATE pgrunner.tasks SET state = 'done' WHERE id = {tid}",
                 check=False)
    assert r.returncode != 0 and "check constraint" in r.stderr, r.stderr
    r = mdb.psql(f"UPDATE pgrunner.tasks SET attempts = -2 WHERE id = {tid}",
                 check=False)
    assert r.returncode != 0 and "check constraint" in r.stderr, r.stderr
    assert task(mdb, tid)["state"] == "queued"
    assert task(mdb, tid)["attempts"] == 0


# --- pgrunner add -------------------------------------------------------------

def test_cli_add_prints_id_and_row_matches(mdb):
    r = run_pgrunner(["add", "send_report", '{"to": ["a@b.c"], "n": 3}',
                      "--db", mdb.dsn, "--queue", "reports",
                      "--run-at", "2030-01-02 03:04:05+00",
                      "--priority", "-7", "--max-attempts", "9",
                      "--key", "report-42"])
    assert r.returncode == 0, r.stderr
    assert re.fullmatch(r"\d+\n", r.stdout), repr(r.stdout)
    tid = int(r.stdout)
    t = task(mdb, tid)
    assert t is not None
    assert t["kind"] == "send_report"
    assert t["payload"] == {"to": ["a@b.c"], "n": 3}
    assert t["queue"] == "reports"
    assert mdb.scalar("SELECT run_at = '2030-01-02 03:04:05+00'::timestamptz"
                      " FROM pgrunner.tasks WHERE id = %s", (tid,))
    assert t["priority"] == -7
    assert t["max_attempts"] == 9
    assert t["key"] == "report-42"
    assert t["state"] == "queued" and t["attempts"] == 0
    assert ntasks(mdb) == 1
    # SPEC 7: `pgrunner add` logs msg="task added" task=ID kind=K.
    line = [ln for ln in r.stderr.splitlines() if 'msg="task added"' in ln]
    assert line, r.stderr
    assert re.search(rf"\btask={tid}\b", line[0]) and "kind=send_report" in \
        line[0], line[0]


def test_cli_add_defaults_and_delay(mdb):
    r = run_pgrunner(["add", "noop", "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    t = task(mdb, int(r.stdout))
    assert (t["queue"], t["payload"], t["priority"], t["max_attempts"],
            t["key"], t["state"]) == ("default", {}, 0, 5, None, "queued")
    assert mdb.scalar("SELECT run_at <= now() FROM pgrunner.tasks"
                      " WHERE id = %s", (t["id"],))

    r = run_pgrunner(["add", "noop", "[1, 2]", "--delay", "100",
                      "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    tid = int(r.stdout)
    assert task(mdb, tid)["payload"] == [1, 2]
    # run_at = the insert's now() + 100 s, created_at = the same now().
    delay = mdb.scalar("SELECT extract(epoch FROM run_at - created_at)"
                       " FROM pgrunner.tasks WHERE id = %s", (tid,))
    assert 99 <= float(delay) <= 101, delay


def test_cli_add_with_key_prints_existing_id(mdb):
    r1 = run_pgrunner(["add", "noop", "--key", "same", "--db", mdb.dsn])
    r2 = run_pgrunner(["add", "noop", '{"other": true}', "--key", "same",
                       "--db", mdb.dsn])
    assert r1.returncode == 0 and r2.returncode == 0, (r1.stderr, r2.stderr)
    assert int(r1.stdout) == int(r2.stdout)
    assert ntasks(mdb) == 1


# --- add_task -----------------------------------------------------------------

def test_add_task_named_arguments(mdb):
    tid = mdb.scalar(
        "SELECT pgrunner.add_task('mail', payload => '{\"x\": 1}',"
        " queue => 'q1', run_at => '2031-05-06 07:08:09+00',"
        " priority => 3, max_attempts => 2, key => 'k1')")
    t = task(mdb, tid)
    assert t["kind"] == "mail" and t["payload"] == {"x": 1}
    assert t["queue"] == "q1" and t["priority"] == 3
    assert t["max_attempts"] == 2 and t["key"] == "k1"
    assert t["state"] == "queued" and t["attempts"] == 0
    assert mdb.scalar("SELECT run_at = '2031-05-06 07:08:09+00'::timestamptz"
                      " FROM pgrunner.tasks WHERE id = %s", (tid,))

    # Names in another order, some left out.
    tid2 = mdb.scalar("SELECT pgrunner.add_task('other', key => 'k2',"
                      " priority => -1)")
    t2 = task(mdb, tid2)
    assert (t2["queue"], t2["payload"], t2["priority"], t2["max_attempts"],
            t2["key"]) == ("default", {}, -1, 5, "k2")

    # Only the kind.
    tid3 = mdb.scalar("SELECT pgrunner.add_task('bare')")
    t3 = task(mdb, tid3)
    assert (t3["queue"], t3["payload"], t3["priority"], t3["max_attempts"],
            t3["key"], t3["state"]) == ("default", {}, 0, 5, None, "queued")
    assert len({tid, tid2, tid3}) == 3


def test_key_dedup_while_queued_or_running(mdb):
    first = add_task(mdb, "a", key="user-1", payload={"v": 1})
    # add_task returns the existing id and adds nothing.
    assert add_task(mdb, "a", key="user-1", payload={"v": 2}) == first
    assert add_task(mdb, "b", key="user-1", queue="other") == first
    # A plain INSERT adds nothing either (and does not fail).
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, key) VALUES ('a', 'user-1')")
    assert r.returncode == 0, r.stderr
    assert ntasks(mdb) == 1
    assert task(mdb, first)["payload"] == {"v": 1}

    # Another key is independent; NULL keys never collide.
    other = add_task(mdb, "a", key="user-2")
    assert other != first
    n1 = add_task(mdb, "a")
    n2 = add_task(mdb, "a")
    assert n1 != n2
    assert ntasks(mdb) == 4

    # Running still holds the key.
    mdb.query("UPDATE pgrunner.tasks SET state = 'running', attempts = 1"
              " WHERE id = %s", (first,))
    assert add_task(mdb, "a", key="user-1") == first
    assert ntasks(mdb) == 4

    # Once it succeeded the key is free again.
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded',"
              " finished_at = now() WHERE id = %s", (first,))
    again = add_task(mdb, "a", key="user-1")
    assert again != first
    assert task(mdb, again)["state"] == "queued"
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key = 'user-1'") == 2

    # Within one multi-row statement the first row of a key wins.
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, key) SELECT 'bulk',"
                 " 'bulk-' || (g % 10) FROM generate_series(1, 100) g")
    assert r.returncode == 0, r.stderr
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key LIKE 'bulk-%'") == 10

    # A cancelled or failed one does not hold it either.
    mdb.query("UPDATE pgrunner.tasks SET state = 'cancelled' WHERE id = %s",
              (again,))
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, key) VALUES ('a', 'user-1')")
    assert r.returncode == 0, r.stderr
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key = 'user-1' AND state = 'queued'") == 1


def _waiting_on_lock(db, pid):
    return db.scalar("SELECT wait_event_type = 'Lock' FROM pg_stat_activity"
                     " WHERE pid = %s", (pid,))


@pytest.mark.parametrize("how", ["add_task", "insert"])
@pytest.mark.parametrize("first_ends", ["commit", "rollback"])
def test_key_dedup_is_race_free(mdb, how, first_ends):
    if how == "add_task":
        sql = "SELECT pgrunner.add_task('race', key => 'the-key')"
    else:
        sql = ("INSERT INTO pgrunner.tasks (kind, key) VALUES"
               " ('race', 'the-key') RETURNING id")
    c1 = mdb.connect(autocommit=False)
    c2 = mdb.connect(autocommit=False)
    try:
        cur1 = c1.cursor()
        cur1.execute(sql)
        id1 = cur1.fetchone()[0]
        result = {}

        def second():
            try:
                cur2 = c2.cursor()
                cur2.execute(sql)
                row = cur2.fetchone()
                result["id"] = row[0] if row else None
                c2.commit()
            except Exception as e:  # reported by the main thread
                result["error"] = e

        t = threading.Thread(target=second)
        t.start()
        # The second insert must wait for the first transaction.
        wait_until(lambda: _waiting_on_lock(mdb, c2.get_backend_pid()),
                   timeout=30, what="the second insert to wait on a lock")
        assert t.is_alive()
        if first_ends == "commit":
            c1.commit()
        else:
            c1.rollback()
        t.join(60)
        assert not t.is_alive()
        assert "error" not in result, result.get("error")
        n = mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                       " WHERE key = 'the-key'")
        assert n == 1
        only = mdb.scalar("SELECT id FROM pgrunner.tasks WHERE key = 'the-key'")
        if first_ends == "commit":
            assert only == id1
            if how == "add_task":
                assert result["id"] == id1
            else:
                assert result["id"] is None
        else:
            assert only == result["id"] and only != id1
    finally:
        c1.close()
        c2.close()


# --- the wake-up notification -------------------------------------------------

def _collect_notifies(conn, sentinel, timeout=60):
    """Read notifications on conn until the sentinel payload arrives."""
    got = []
    deadline = time.monotonic() + timeout
    while True:
        conn.poll()
        while conn.notifies:
            n = conn.notifies.pop(0)
            if n.channel == "pgrunner" and n.payload == sentinel:
                return got
            got.append((n.channel, n.payload))
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("sentinel notification never arrived")
        select.select([conn], [], [], min(left, 1.0))


def test_notify_bulk_insert_is_bounded_per_queue(mdb):
    listener = mdb.connect()
    writer = mdb.connect()
    try:
        listener.cursor().execute("LISTEN pgrunner")
        cur = writer.cursor()
        cur.execute("INSERT INTO pgrunner.tasks (kind, queue)"
                    " SELECT 'noop', CASE WHEN g % 2 = 0 THEN 'bulk_a'"
                    " ELSE 'bulk_b' END FROM generate_series(1, 100000) g")
        assert cur.rowcount == 100000
        sentinel = "sentinel-" + uuid.uuid4().hex
        cur.execute("SELECT pg_notify('pgrunner', %s)", (sentinel,))
        got = _collect_notifies(listener, sentinel)
        pg_notes = [p for ch, p in got if ch == "pgrunner"]
        assert sorted(set(pg_notes)) == ["bulk_a", "bulk_b"], pg_notes
        assert len(pg_notes) <= 2, pg_notes
    finally:
        listener.close()
        writer.close()


def test_notify_single_insert_and_add_task(mdb):
    listener = mdb.connect()
    writer = mdb.connect()
    try:
        listener.cursor().execute("LISTEN pgrunner")
        cur = writer.cursor()
        cur.execute("INSERT INTO pgrunner.tasks (kind, queue) VALUES"
                    " ('noop', 'single_q')")
        sentinel = "sentinel-" + uuid.uuid4().hex
        cur.execute("SELECT pg_notify('pgrunner', %s)", (sentinel,))
        got = _collect_notifies(listener, sentinel)
        assert [p for ch, p in got if ch == "pgrunner"] == ["single_q"], got

        cur.execute("SELECT pgrunner.add_task('noop', queue => 'via_fn')")
        sentinel = "sentinel-" + uuid.uuid4().hex
        cur.execute("SELECT pg_notify('pgrunner', %s)", (sentinel,))
        got = _collect_notifies(listener, sentinel)
        assert [p for ch, p in got if ch == "pgrunner"] == ["via_fn"], got

        # The psql INSERT route wakes workers too.
        r = mdb.psql("INSERT INTO pgrunner.tasks (kind, payload) VALUES"
                     " ('noop', '{}')")
        assert r.returncode == 0, r.stderr
        sentinel = "sentinel-" + uuid.uuid4().hex
        cur.execute("SELECT pg_notify('pgrunner', %s)", (sentinel,))
        got = _collect_notifies(listener, sentinel)
        assert [p for ch, p in got if ch == "pgrunner"] == ["default"], got
    finally:
        listener.close()
        writer.close()


# --- cancel_task / retry_task -------------------------------------------------

def test_cancel_task_and_retry_task(mdb):
    q = add_task(mdb, "x")
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (q,)) is True
    t = task(mdb, q)
    assert t["state"] == "cancelled"
    # Cancelling a cancelled task changes nothing.
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (q,)) is False
    assert task(mdb, q)["state"] == "cancelled"

    # retry a cancelled one.
    assert mdb.scalar("SELECT pgrunner.retry_task(%s)", (q,)) is True
    t = task(mdb, q)
    assert t["state"] == "queued" and t["attempts"] == 0
    assert mdb.scalar("SELECT run_at <= now() FROM pgrunner.tasks"
                      " WHERE id = %s", (q,))

    # retry a failed one: attempts back to 0, queued now.
    f = add_task(mdb, "x", max_attempts=3,
                 run_at="2000-01-01 00:00:00+00")
    mdb.query("UPDATE pgrunner.tasks SET state = 'failed', attempts = 3,"
              " last_error = 'it broke', started_at = now(),"
              " finished_at = now() WHERE id = %s", (f,))
    assert mdb.scalar("SELECT pgrunner.retry_task(%s)", (f,)) is True
    t = task(mdb, f)
    assert t["state"] == "queued" and t["attempts"] == 0
    assert t["max_attempts"] == 3
    assert t["finished_at"] is None
    assert mdb.scalar("SELECT run_at > now() - interval '1 hour'"
                      " FROM pgrunner.tasks WHERE id = %s", (f,))

    # retry a queued one: false, unchanged.
    before = task(mdb, f)
    assert mdb.scalar("SELECT pgrunner.retry_task(%s)", (f,)) is False
    assert task(mdb, f) == before

    # retry a succeeded one: false, unchanged.
    s = add_task(mdb, "x")
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded', attempts = 1,"
              " finished_at = now() WHERE id = %s", (s,))
    before = task(mdb, s)
    assert mdb.scalar("SELECT pgrunner.retry_task(%s)", (s,)) is False
    assert task(mdb, s) == before
    # ... and cancel leaves it too.
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (s,)) is False
    assert task(mdb, s) == before


@pytest.mark.parametrize("fn", ["cancel_task", "retry_task"])
def test_unknown_id_raises(mdb, fn):
    conn = mdb.connect()
    try:
        with pytest.raises(psycopg2.Error):
            conn.cursor().execute(f"SELECT pgrunner.{fn}(987654321)")
    finally:
        conn.close()


def test_cli_cancel_and_retry(mdb):
    tid = add_task(mdb, "x")
    r = run_pgrunner(["cancel", str(tid), "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    assert task(mdb, tid)["state"] == "cancelled"

    r = run_pgrunner(["retry", str(tid), "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    t = task(mdb, tid)
    assert t["state"] == "queued" and t["attempts"] == 0

    # retry on a queued task leaves it as it is.
    before = task(mdb, tid)
    r = run_pgrunner(["retry", str(tid), "--db", mdb.dsn])
    assert r.returncode == 0, r.stderr
    assert task(mdb, tid) == before

    # cancel / retry on a succeeded task leave it.
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded', attempts = 1,"
              " finished_at = now() WHERE id = %s", (tid,))
    before = task(mdb, tid)
    for cmd in ("cancel", "retry"):
        r = run_pgrunner([cmd, str(tid), "--db", mdb.dsn])
        assert r.returncode == 0, r.stderr
        assert task(mdb, tid) == before


@pytest.mark.parametrize("cmd", ["cancel", "retry"])
def test_cli_cancel_retry_unknown_and_bad_ids(mdb, cmd):
    add_task(mdb, "x")
    before = mdb.query("SELECT * FROM pgrunner.tasks ORDER BY id")
    r = run_pgrunner([cmd, "987654321", "--db", mdb.dsn])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "987654321" in r.stderr, r.stderr
    for bad in ("abc", "-3", "0", "1.5", ""):
        r = run_pgrunner([cmd, bad, "--db", mdb.dsn])
        assert r.returncode == 2, (bad, r.stdout, r.stderr)
        assert one_line(r.stderr), (bad, r.stderr)
    r = run_pgrunner([cmd, "--db", mdb.dsn])
    assert r.returncode == 2 and one_line(r.stderr), r.stderr
    assert mdb.query("SELECT * FROM pgrunner.tasks ORDER BY id") == before


# --- usage --------------------------------------------------------------------

@pytest.mark.parametrize("payload", ["{bad", "{\"a\": }", "[1, 2", "nope",
                                     "{\"a\": 1} trailing"])
def test_add_invalid_json_exits_2_and_adds_nothing(module_mdb, payload):
    before = ntasks(module_mdb)
    r = run_pgrunner(["add", "x", payload, "--db", module_mdb.dsn])
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert one_line(r.stderr), r.stderr
    assert "json" in r.stderr.lower(), r.stderr
    assert r.stdout == ""
    assert ntasks(module_mdb) == before


@pytest.mark.parametrize("args", [
    ["frobnicate"],
    ["ad", "noop"],
    ["add", "noop", "--bogus"],
    ["add", "noop", "--queues", "a"],
    ["work", "--priority", "1"],
    ["status", "--bogus"],
    ["migrate", "--json"],
    ["--bogus"],
    [],
    ["add"],
    ["add", "noop", "{}", "extra"],
    ["add", "noop", "--priority", "high"],
    ["add", "noop", "--max-attempts", "0"],
    ["add", "noop", "--delay", "soon"],
    ["add", "noop", "--delay", "5", "--run-at", "2030-01-01"],
    ["add", "noop", "--run-at", "not a time"],
])
def test_usage_errors_exit_2_with_one_line(module_mdb, args):
    before = ntasks(module_mdb)
    r = run_pgrunner(args + ["--db", module_mdb.dsn] if args else args,
                     timeout=30)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert one_line(r.stderr), (args, r.stderr)
    assert ntasks(module_mdb) == before


@pytest.mark.parametrize("args", [
    ["--help"], ["help"], ["work", "--help"], ["add", "--help"],
    ["status", "--help"], ["cancel", "--help"], ["retry", "--help"],
    ["migrate", "--help"],
])
def test_help_exits_0(args):
    # No database is needed for help.
    r = run_pgrunner(args, env={"PGHOST": "127.0.0.1", "PGPORT": "1"},
                     timeout=30)
    assert r.returncode == 0, (args, r.stderr)
    assert "usage" in r.stdout.lower(), r.stdout
    if len(args) == 2 and args[0] != "help":
        assert args[0] in r.stdout


def test_flags_override_invalid_environment_and_help_ignores_it(mdb,
                                                                 workers):
    bad = {"PGRUNNER_CONCURRENCY": "abc", "PGRUNNER_LOG_LEVEL": "loud"}
    # Help needs nothing from the environment.
    for args in (["work", "--help"], ["status", "--help"], ["--help"]):
        r = run_pgrunner(args, env=bad, timeout=30)
        assert r.returncode == 0, (args, r.stderr)
        assert "usage" in r.stdout.lower(), r.stdout
    # Without the flags, the variable is still refused, by name.
    r = run_pgrunner(["work", "--db", mdb.dsn], env=bad, timeout=30)
    assert r.returncode == 2 and one_line(r.stderr), r.stderr
    assert "PGRUNNER_" in r.stderr, r.stderr
    r = run_pgrunner(["status", "--db", mdb.dsn], env=bad, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "PGRUNNER_LOG_LEVEL" in r.stderr, r.stderr
    # With them, the variables are ignored: the worker runs a task.
    r = run_pgrunner(["status", "--log-level", "warn", "--db", mdb.dsn],
                     env=bad, timeout=30)
    assert r.returncode == 0, r.stderr
    w = workers(mdb, "--concurrency", "3", "--log-level", "info", env=bad)
    tid = add_task(mdb, "noop")
    wait_until(lambda: task(mdb, tid)["state"] == "succeeded", timeout=30,
               what="the worker runs the task")
    assert w.stop() == 0, w.output()


def test_command_help_differs_per_command():
    texts = {c: run_pgrunner([c, "--help"]).stdout
             for c in ("work", "add", "status")}
    assert "--concurrency" in texts["work"]
    assert "--priority" in texts["add"]
    assert "--json" in texts["status"]


def test_version_exits_0():
    r = run_pgrunner(["--version"], timeout=30)
    assert r.returncode == 0, r.stderr
    assert re.search(r"pgrunner \d+\.\d+", r.stdout), r.stdout


# --- where the database comes from; passwords ---------------------------------

@pytest.mark.parametrize("args", [
    ["migrate"], ["add", "noop"], ["status"], ["status", "--json"],
    ["cancel", "1"], ["retry", "1"],
])
@pytest.mark.parametrize("dbarg", [
    f"postgresql://postgres:{SECRET}@127.0.0.1:1/x",
    f"postgres://u:{SECRET}@127.0.0.1:1/x?sslmode=disable",
    f"host=127.0.0.1 port=1 user=postgres password={SECRET} dbname=x",
])
def test_password_never_printed(args, dbarg):
    r = run_pgrunner(args + ["--db", dbarg], timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert SECRET not in r.stdout and SECRET not in r.stderr, r.stderr
    assert r.stderr.strip(), "no error message"


@pytest.mark.parametrize("dbarg", [
    f"postgresql://postgres:{SECRET}@127.0.0.1:notaport/x",
    f"host=127.0.0.1 password={SECRET} bogus",
    f"host=127.0.0.1 password='{SECRET}",
    f"postgresql://postgres:{SECRET}@127.0.0.1:1/x?nosuchoption=1",
])
def test_password_never_printed_for_malformed_conninfo(dbarg):
    r = run_pgrunner(["add", "noop", "--db", dbarg], timeout=60)
    assert r.returncode in (1, 2), (r.stdout, r.stderr)
    assert SECRET not in r.stdout and SECRET not in r.stderr, r.stderr
    assert r.stderr.strip()


# libpq's own parse errors quote the offending token, which here is (a piece
# of) the password. Such a string is refused at once, so nothing hangs
# retrying: exit 2 (bad usage) for a command, exit 1 for `work` (SPEC 9: a
# malformed conninfo is an error waiting cannot heal).
@pytest.mark.parametrize("cmd", [["status"], ["work"]])
@pytest.mark.parametrize("dbarg", [
    f"postgresql://postgres:{SECRET}%zz@127.0.0.1:5432/postgres",
    f"postgresql://postgres:{SECRET}:a%zz@127.0.0.1:1/postgres",
    f"postgresql://postgres:a%zz@{SECRET}@127.0.0.1:1/postgres",
    f"postgresql://postgres@127.0.0.1:1/postgres?password={SECRET}%zz",
    f"postgresql://postgres@127.0.0.1:1/x?sslmode=disable&password={SECRET}%zz",
    f"host=127.0.0.1 password='{SECRET}%zz' bogus",
])
def test_password_never_printed_when_libpq_quotes_the_token(cmd, dbarg):
    r = run_pgrunner(cmd + ["--db", dbarg], timeout=30)
    assert r.returncode == (1 if cmd == ["work"] else 2), (r.stdout, r.stderr)
    assert SECRET not in r.stdout and SECRET not in r.stderr, r.stderr
    assert one_line(r.stderr), r.stderr


def test_password_with_an_at_sign_never_printed_in_part():
    # libpq ends the password at the first '@' and reads the rest as the
    # host name, which it then quotes in "could not translate host name".
    first, second = "FiRsTpArT7", "SeCoNdPaRt8"
    r = run_pgrunner(["status", "--db",
                      f"postgresql://postgres:{first}@{second}@127.0.0.1:1/x"],
                     timeout=60)
    assert r.returncode == 1, (r.stdout, r.stderr)
    out = r.stdout + r.stderr
    assert first not in out and second not in out, out
    assert r.stderr.strip(), "no error message"


def test_password_in_database_url_never_printed():
    r = run_pgrunner(["add", "noop"], env={
        "DATABASE_URL": f"postgresql://postgres:{SECRET}@127.0.0.1:1/x"},
        timeout=60)
    assert r.returncode == 1, r.stderr
    assert SECRET not in r.stdout + r.stderr


def test_database_url_used_without_db(mdb):
    # PGPORT points nowhere: only DATABASE_URL can lead to the database.
    r = run_pgrunner(["add", "noop", '{"via": "url"}'],
                     env={"DATABASE_URL": mdb.url, "PGHOST": "127.0.0.1",
                          "PGPORT": "1"})
    assert r.returncode == 0, r.stderr
    assert task(mdb, int(r.stdout))["payload"] == {"via": "url"}


def test_db_flag_wins_over_database_url(mdb):
    r = run_pgrunner(["add", "noop", '{"via": "flag"}', "--db", mdb.dsn],
                     env={"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/x"})
    assert r.returncode == 0, r.stderr
    assert task(mdb, int(r.stdout))["payload"] == {"via": "flag"}


def test_libpq_environment_used_without_db_or_url(mdb):
    srv = mdb.server
    env = {"PGHOST": srv.host, "PGPORT": str(srv.port), "PGUSER": srv.user,
           "PGDATABASE": mdb.name}
    r = run_pgrunner(["add", "noop", '{"via": "pgenv"}'], env=env)
    assert r.returncode == 0, r.stderr
    assert task(mdb, int(r.stdout))["payload"] == {"via": "pgenv"}
    r = run_pgrunner(["status", "--json"], env=env)
    assert r.returncode == 0, r.stderr
    json.loads(r.stdout)
    # And with PGPORT pointing nowhere the same command fails: the variables
    # really are what was used.
    env["PGPORT"] = "1"
    r = run_pgrunner(["add", "noop"], env=env)
    assert r.returncode == 1, r.stderr


# --- a database that was never migrated --------------------------------------

@pytest.mark.parametrize("args", [
    ["add", "noop"], ["add", "noop", "{}", "--key", "k"], ["status"],
    ["status", "--json"], ["cancel", "1"], ["retry", "1"],
])
def test_commands_on_unmigrated_database_say_migrate(db, args):
    r = run_pgrunner(args + ["--db", db.dsn])
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "pgrunner migrate" in r.stderr, r.stderr
    # Nothing was created behind our back.
    assert db.scalar("SELECT count(*) FROM pg_namespace"
                     " WHERE nspname = 'pgrunner'") == 0
