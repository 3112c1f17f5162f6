"""The plans of every statement pgrunner runs again and again, in the tables
users have: empty, a backlog, a week of retained history, a bulk insert
nobody analyzed, dead rows behind a long transaction.

Nothing here times anything. The server logs the plan of every statement
it executes (auto_explain, nested statements of the SQL functions
included), exactly as the real worker, `pgrunner status` and the SQL API
prepared and ran them, and the test reads those plans back and asserts their
shape: no statement reads pgrunner.tasks sequentially, through a bitmap of a
whole index, or sorts/hashes/aggregates all queued rows. Each index scan of
tasks is either a primary-key or key lookup, a scan of the running tasks
(bounded by the workers' concurrency), or stopped by a LIMIT with nothing
that consumes its whole input in between.

The database default is plan_cache_mode = force_generic_plan, so the
generic plans (what a prepared statement or a PL/pgSQL function settles on)
are the ones checked; one regime is also run with the default setting, where
the planner trusts statistics that a bulk insert has made stale.

The long-transaction test counts buffers (EXPLAIN ANALYZE's, also
deterministic): with the claim index full of entries that vacuum may not
remove, claims must not walk them.
"""

import glob
import json
import os
import time
import urllib.request

import pytest

from pgr_fixtures import (PgServer, create_db, free_port, run_pgrunner,
                          Worker, wait_until)

# What consumes its whole input: a LIMIT above one of these does not bound
# the scan below it.
BLOCKING = {"Sort", "Incremental Sort", "Hash", "Aggregate", "Materialize",
            "SetOp", "WindowAgg", "Unique", "Gather Merge"}
# The running tasks: few once vacuum has run, but while a long transaction
# holds it back the index keeps an entry for every task ever claimed. Only
# the periodic statements that look at all running tasks may scan it
# (recovery, give-back, status); a task's own statements use the key.
RUNNING_SCANNERS = ("NOT EXISTS (SELECT 1 FROM pgrunner.workers",
                    "t.worker_id = ANY (dead) AND t.state = 'running'",
                    "WHERE t.worker_id = w.id AND t.state = 'running'",
                    "t.worker_id = worker AND t.state = 'running'",
                    "WHERE t.state = 'running' GROUP BY",
                    "WHERE t.state = 'running' AND t.queue = q.name LIMIT",
                    "WHERE t.state = 'running' ORDER BY t.started_at")
LOOKUP_INDEXES = {"tasks_pkey", "tasks_key_idx", "tasks_serial_head_idx"}
# claim_limits (0015): only claims of a queue with limits run it.
CLAIM_LIMITS = "ORDER BY x.queue FOR UPDATE"


@pytest.fixture(scope="module")
def server():
    s = PgServer(extra_conf=(
        "logging_collector = on\n"
        "log_destination = 'jsonlog'\n"
        "log_directory = 'log'\n"
        "log_filename = 'server.log'\n"
        "log_min_messages = log\n"
        "shared_preload_libraries = 'auto_explain'\n"
        "auto_explain.log_min_duration = -1\n"
        "auto_explain.log_nested_statements = on\n"
        "auto_explain.log_format = json\n"
        "autovacuum = off\n"))
    s.logdir = os.path.join(s.data, "log")
    s.start()
    try:
        yield s
    finally:
        s.stop()


def fresh_db(server):
    d = create_db(server)
    r = run_pgrunner(["migrate", "--db", d.dsn])
    assert r.returncode == 0, r.stderr
    return d


def log_position(server):
    files = glob.glob(os.path.join(server.logdir, "*.json"))
    return {f: os.path.getsize(f) for f in files}


def plans_since(server, pos, dbname):
    """The plans auto_explain logged for dbname since pos."""
    out = []
    for f in glob.glob(os.path.join(server.logdir, "*.json")):
        with open(f, "rb") as fh:
            fh.seek(pos.get(f, 0))
            for line in fh:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if rec.get("dbname") != dbname:
                    continue
                msg = rec.get("message", "")
                i = msg.find("plan:")
                if not msg.startswith("duration:") or i < 0:
                    continue
                out.append(json.loads(msg[i + len("plan:"):]))
    return out


def explain_on(db, analyze=False):
    """Log the plan of every statement of db's new sessions."""
    for stmt in ("auto_explain.log_min_duration = 0",
                 f"auto_explain.log_analyze = {'on' if analyze else 'off'}",
                 f"auto_explain.log_buffers = {'on' if analyze else 'off'}",
                 "auto_explain.log_timing = off"):
        db.query(f'ALTER DATABASE "{db.name}" SET {stmt}')


def plan_mode(db, mode):
    db.query(f'ALTER DATABASE "{db.name}" SET plan_cache_mode = {mode}')


def nodes(plan, ancestors=()):
    yield plan, ancestors
    for child in plan.get("Plans", []):
        yield from nodes(child, ancestors + (plan,))


def bounded_by_limit(ancestors):
    for a in reversed(ancestors):
        if a["Node Type"] == "Limit":
            return True
        if a["Node Type"] in BLOCKING:
            return False
    return False


def violations(entry):
    """What in one logged plan reads more of tasks than it needs."""
    bad = []
    for node, anc in nodes(entry["Plan"]):
        if node.get("Relation Name") != "tasks":
            continue
        kind = node["Node Type"]
        index = node.get("Index Name")
        why = None
        if kind in ("Seq Scan", "Tid Range Scan", "Sample Scan"):
            why = "reads the whole table"
        elif kind == "Bitmap Heap Scan":
            cond = node.get("Recheck Cond", "")
            if not cond.startswith("(id = "):
                why = "bitmap scan of a whole index range"
        elif kind in ("Index Scan", "Index Only Scan"):
            if index == "tasks_running_idx":
                if not any(r in entry.get("Query Text", "")
                           for r in RUNNING_SCANNERS):
                    why = "a per-task statement scans the running tasks"
            elif index in LOOKUP_INDEXES and "Index Cond" in node:
                pass
            elif not bounded_by_limit(anc):
                why = f"scan of {index} not stopped by a LIMIT"
        if why:
            bad.append(f"{kind} on tasks ({index}): {why}\n  in: "
                       + entry.get("Query Text", "?")[:300])
    return bad


def statements_seen(plans):
    return {p.get("Query Text", "") for p in plans}


SETUP_KINDS = """
  CREATE OR REPLACE FUNCTION pgrunner_jobs.boom(p jsonb) RETURNS void
  LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'boom'; END $$;
  CREATE OR REPLACE FUNCTION pgrunner_jobs.fine(p jsonb) RETURNS void
  LANGUAGE sql AS $$ SELECT 1 $$;
"""


def some_of_each(db):
    """Tasks that take every path: no-op, SQL function, failure with retry,
    permanent failure, a key, a serial key, a running task whose worker is
    gone."""
    ids = [db.scalar("SELECT pgrunner.add_task('boom', priority => -5)"),
           db.scalar("SELECT pgrunner.add_task('no_such_kind', "
                     "priority => -5, key => 'k' || random())")]
    db.query("INSERT INTO pgrunner.tasks (kind, priority) "
             "SELECT k, -5 FROM unnest('{noop,fine}'::text[]) k, "
             "generate_series(1, 10)")
    # Tasks of one serial key (0015): the head look-up at insert, the
    # release of the next one at each end.
    db.query("INSERT INTO pgrunner.tasks (kind, priority, serial_key) "
             "SELECT 'noop', -5, 'each' FROM generate_series(1, 3)")
    db.query("INSERT INTO pgrunner.tasks (kind, state, attempts, worker_id,"
             " started_at) VALUES ('noop', 'running', 1, 42, now())")
    return ids


def exercise(server, db, bulk_sql=None):
    """Run the real worker, the CLI and the SQL API against db with every
    plan logged; return the plans. With bulk_sql, the worker first runs on
    the table as it is (its sessions plan and cache their statements
    there), then bulk_sql runs, and only the plans from then on count."""
    explain_on(db)
    db.query(SETUP_KINDS)
    port = free_port()
    w = Worker(db, ["--concurrency", "2", "--poll-interval", "100",
                    "--retention", "3d", "--log-level", "warn",
                    "--metrics-listen", f"127.0.0.1:{port}"], None,
               os.path.join(server.tmp, f"worker-{db.name}.out"))
    try:
        if bulk_sql:
            for _ in range(3):  # past the five custom plans of each statement
                some_of_each(db)
                time.sleep(2)
            db.query(bulk_sql)
        pos = log_position(server)
        ids = some_of_each(db)
        time.sleep(6.5)  # heartbeats, recovery, give-back (5 s), prune (5 s)
        for _ in range(2):  # the gauges of /metrics and the dashboard
            with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
                assert b"pgrunner_gauges_up 1" in r.read()
            for page in ("/", f"/task/{ids[0]}"):
                with urllib.request.urlopen(
                        f"http://127.0.0.1:{port}{page}", timeout=30) as r:
                    assert r.status == 200
        for args in (["status"], ["status", "--json"],
                     ["add", "noop", "--key", "k2"],
                     ["cancel", str(ids[0])]):
            r = run_pgrunner(args + ["--db", db.dsn])
            assert r.returncode == 0, (args, r.stderr)
        # A session opened now, so that its plans are logged too.
        api = db.connect()
        try:
            cur = api.cursor()
            cur.execute("SELECT pgrunner.retry_task(%s)", (ids[1],))
            cur.execute("SELECT * FROM pgrunner.wait_task(%s, "
                        "interval '50 ms')", (ids[1],))
            # An insert of a serial key looks up the key's head (0015).
            for _ in range(2):
                cur.execute("SELECT pgrunner.add_task('noop',"
                            " serial_key => 'api')")
            cur.execute("SELECT pgrunner.release_unknown(42, '{}')")
            # What a worker's loop sends to interrupt an attempt.
            cur.execute("SELECT pgrunner.interrupt_attempt(%s, 1, 42,"
                        " pg_backend_pid())", (ids[0],))
            cur.execute("SELECT pgrunner.recover()")
        finally:
            api.close()
        time.sleep(1.5)
    finally:
        assert w.stop() == 0, w.output()
    plans = plans_since(server, pos, db.name)
    assert plans, "auto_explain logged nothing"
    return plans


def assert_plans(plans):
    seen = statements_seen(plans)
    # The statements this test is about did run and were logged.
    assert any("LIMIT q.lim FOR UPDATE SKIP LOCKED" in q for q in seen), \
        "no claim was logged"
    assert any("t.state = 'succeeded'" in q and "LIMIT batch" in q
               for q in seen), "retention never ran"
    assert any("NOT EXISTS (SELECT 1 FROM pgrunner.workers" in q
               for q in seen), "recovery never ran"
    assert any("ORDER BY t.priority LIMIT 1" in q for q in seen), \
        "the /metrics gauges never ran"
    assert any("ORDER BY t.finished_at DESC LIMIT 20" in q for q in seen), \
        "the dashboard never ran"
    bad = []
    for p in plans:
        for v in violations(p):
            if v not in bad:
                bad.append(v)
    assert not bad, "\n".join(bad)
    # The retry policy look-up (0011): every insert's trigger and every
    # retry run it, so it reads the policy table through its index.
    lookups = [p for p in plans
               if "FROM pgrunner.retry_policies p" in p.get("Query Text", "")]
    assert lookups, "no retry policy look-up was logged"
    for p in lookups:
        scans = [n for n, _ in nodes(p["Plan"])
                 if n.get("Relation Name") == "retry_policies"]
        assert scans and all(
            n["Node Type"] in ("Index Scan", "Index Only Scan")
            and n.get("Index Name") == "retry_policies_scope_idx"
            for n in scans), p


def test_rules_catch_a_bad_plan():
    """The checker itself can fail: a sequential scan, an unbounded index
    scan and a LIMIT above a sort are each reported."""
    seq = {"Plan": {"Node Type": "Seq Scan", "Relation Name": "tasks"}}
    unbounded = {"Plan": {"Node Type": "Limit", "Plans": [
        {"Node Type": "Sort", "Plans": [
            {"Node Type": "Index Scan", "Relation Name": "tasks",
             "Index Name": "tasks_claim_idx", "Index Cond": "(queue = 'a')"}]}]}}
    fine = {"Plan": {"Node Type": "Limit", "Plans": [
        {"Node Type": "LockRows", "Plans": [
            {"Node Type": "Index Scan", "Relation Name": "tasks",
             "Index Name": "tasks_claim_idx", "Index Cond": "(queue = 'a')"}]}]}}
    assert violations(seq)
    assert violations(unbounded)
    assert not violations(fine)


def test_plans_on_an_empty_table(server):
    db = fresh_db(server)
    db.query("VACUUM ANALYZE pgrunner.tasks")
    plans = exercise(server, db)
    assert_plans(plans)
    # A queue without limits costs the claim no call of claim_limits.
    assert not any(CLAIM_LIMITS in q for q in statements_seen(plans))


@pytest.mark.parametrize("mode", ["auto", "force_generic_plan"])
def test_plans_with_a_serial_key_backlog_and_queue_limits(server, mode):
    """100,000 tasks of one serial key wait behind their head (and 20,000
    of 1,000 keys), the queue has a max_running and a rate: the claim, the
    release of each key's next task and the limits read bounded ranges."""
    db = fresh_db(server)
    plan_mode(db, mode)
    db.query("INSERT INTO pgrunner.tasks (kind, serial_key) "
             "SELECT 'noop', 'one' FROM generate_series(1, 100000)")
    db.query("INSERT INTO pgrunner.tasks (kind, serial_key) "
             "SELECT 'noop', 'k' || (g % 1000) FROM generate_series(1, 20000) g")
    db.query("SELECT pgrunner.set_queue_limit('default', max_running => 2,"
             " rate => '100000/1s')")
    db.query("VACUUM ANALYZE pgrunner.tasks")
    plans = exercise(server, db)
    assert_plans(plans)
    seen = statements_seen(plans)
    for what, marker in (("claim_limits", CLAIM_LIMITS),
                         ("the running count",
                          "t.id = ANY (l.running_ids)"),
                         ("the release of a key's next task",
                          "ORDER BY x.priority, x.run_at, x.id LIMIT 1"),
                         ("the head look-up of an insert",
                          "t.id <> NEW.id")):
        assert any(marker in q for q in seen), f"{what} never ran"


@pytest.mark.parametrize("queued,mode", [(20000, "auto"), (300000, "auto"),
                                         (300000, "force_generic_plan")])
def test_plans_with_a_backlog(server, queued, mode):
    db = fresh_db(server)
    plan_mode(db, mode)
    db.query("INSERT INTO pgrunner.tasks (kind) "
             "SELECT 'noop' FROM generate_series(1, %s)", (queued,))
    db.query("VACUUM ANALYZE pgrunner.tasks")
    assert_plans(exercise(server, db))


def test_plans_with_a_week_of_retained_tasks(server):
    db = fresh_db(server)
    db.query("""
      INSERT INTO pgrunner.tasks (kind, state, attempts, created_at,
                                  started_at, finished_at)
      SELECT 'noop', 'succeeded', 1, f, f, f
        FROM (SELECT now() - (i * interval '604 ms') AS f
                FROM generate_series(1, 1000000) i) s""")
    db.query("INSERT INTO pgrunner.tasks (kind) "
             "SELECT 'noop' FROM generate_series(1, 20000)")
    db.query("ANALYZE pgrunner.tasks")
    assert_plans(exercise(server, db))


@pytest.mark.parametrize("mode", ["auto", "force_generic_plan"])
def test_plans_after_a_bulk_insert_into_a_running_worker(server, mode):
    """The worker's sessions planned their statements on an empty table;
    then 300,000 rows arrive in one INSERT and nobody runs ANALYZE."""
    db = fresh_db(server)
    plan_mode(db, mode)
    db.query("VACUUM ANALYZE pgrunner.tasks")  # statistics of an empty table
    assert_plans(exercise(server, db, bulk_sql=(
        "INSERT INTO pgrunner.tasks (kind) "
        "SELECT 'noop' FROM generate_series(1, 300000)")))


def claim_index_buffers(plan):
    """Buffers the claim's scans of tasks_claim_idx touched."""
    n = 0
    for node, _ in nodes(plan["Plan"]):
        if node.get("Index Name") == "tasks_claim_idx":
            n += node.get("Shared Hit Blocks", 0) + \
                node.get("Shared Read Blocks", 0)
    return n


def test_claims_skip_dead_entries_behind_a_long_transaction(server):
    """An idle transaction holding an xid keeps every claimed task's entry
    in tasks_claim_idx (dead, not removable). A claim from the front of
    the queue walks all of them; the worker's claims start after the last
    task it claimed, so only its periodic sweep does."""
    db = fresh_db(server)
    plan_mode(db, "force_generic_plan")
    holder = db.connect(autocommit=False)
    try:
        holder.cursor().execute("SELECT txid_current()")
        db.query("INSERT INTO pgrunner.tasks (kind) "
                 "SELECT 'noop' FROM generate_series(1, 30000)")
        w = Worker(db, ["--concurrency", "4", "--log-level", "warn"], None,
                   os.path.join(server.tmp, f"worker-{db.name}-1.out"))
        try:
            wait_until(lambda: db.scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM pgrunner.tasks "
                "WHERE state <> 'succeeded')"), timeout=300,
                what="30,000 tasks done")
        finally:
            assert w.stop() == 0, w.output()
        explain_on(db, analyze=True)
        pos = log_position(server)
        w = Worker(db, ["--concurrency", "4", "--log-level", "warn"], None,
                   os.path.join(server.tmp, f"worker-{db.name}-2.out"))
        try:
            time.sleep(1.5)
            started = time.monotonic()
            for _ in range(20):
                db.query("INSERT INTO pgrunner.tasks (kind) "
                         "SELECT 'noop' FROM generate_series(1, 100)")
                time.sleep(0.05)
            wait_until(lambda: db.scalar(
                "SELECT NOT EXISTS (SELECT 1 FROM pgrunner.tasks "
                "WHERE state <> 'succeeded')"), timeout=120,
                what="2,000 tasks done")
            seconds = time.monotonic() - started + 1.5
        finally:
            assert w.stop() == 0, w.output()
    finally:
        holder.rollback()
        holder.close()
    claims = [claim_index_buffers(p)
              for p in plans_since(server, pos, db.name)
              if "LIMIT q.lim FOR UPDATE SKIP LOCKED" in p.get("Query Text", "")]
    assert len(claims) >= 20, claims
    # 30,000 dead entries fill well over 100 index leaf pages; a claim that
    # starts after its cursor reads a handful.
    heavy = [b for b in claims if b > 100]
    light = [b for b in claims if b <= 20]
    # Front-of-queue sweeps: at most one a second, plus the first claim.
    assert len(heavy) <= seconds + 2, (len(heavy), seconds, sorted(claims))
    assert len(light) >= 0.8 * len(claims), sorted(claims)
