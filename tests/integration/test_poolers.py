"""pgrunner behind a real PgBouncer (Debian's pgbouncer), as users deploy it.

The loop's connections (LISTEN and the claims, the maintenance connection)
need a session: a direct connection or a session pool, chosen with
--listen-db. The worker threads' connections may go through a transaction
pool: nothing they do outlives a transaction. A transaction pooler on the
listening connection makes `work` exit 1 at start, naming it.
"""

import pytest

from pgr_fixtures import (add_task as add, plugin_path, run_pgrunner,
                          wait_until)


def sql_job(db, name, body):
    """A SQL-function kind: pgrunner_jobs.name(payload jsonb) in plpgsql."""
    db.query(f"CREATE FUNCTION pgrunner_jobs.{name}(payload jsonb)"
             f" RETURNS void LANGUAGE plpgsql AS $f$ BEGIN {body} END $f$")


def states(db, ids):
    return dict(db.query("SELECT id, state FROM pgrunner.tasks"
                         " WHERE id = ANY(%s)", (ids,)))


def wait_all(db, ids, want="succeeded", timeout=120):
    try:
        wait_until(lambda: all(s == want for s in states(db, ids).values()),
                   timeout=timeout, interval=0.1,
                   what=f"{len(ids)} tasks to be {want}")
    except AssertionError as e:
        left = sorted((i, s) for i, s in states(db, ids).items() if s != want)
        raise AssertionError(f"{e}; {len(left)} not yet, such as {left[:5]}") \
            from None


def effects(db):
    """How many rows each task's function wrote, by payload number."""
    return dict(db.query("SELECT n, count(*) FROM effects GROUP BY n"))


def test_session_pool_for_every_connection(pg, mdb, workers, pgbouncer):
    bouncer = pgbouncer(pg, pool_mode="session", pool_size=20)
    mdb.query("CREATE TABLE effects (n int)")
    sql_job(mdb, "write_row",
            "INSERT INTO public.effects VALUES ((payload->>'n')::int);")
    sql_job(mdb, "long_one", "PERFORM pg_sleep(600);")
    ids = [add(mdb, "write_row", payload={"n": i}) for i in range(30)]
    ids += [add(mdb, "noop") for _ in range(30)]

    w = workers(mdb, "--db", bouncer.dsn(mdb.name), "--concurrency", "4")
    wait_all(mdb, ids)
    assert effects(mdb) == {i: 1 for i in range(30)}

    # A running task is interrupted on the server connection it runs on:
    # behind a pooler the client's own backend pid (PQbackendPID) is the
    # pooler's invention, and cancelling that reaches nothing.
    tid = add(mdb, "long_one")
    wait_until(lambda: mdb.scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
        " AND query LIKE '%pgrunner_jobs%long_one%'"
        " AND pid <> pg_backend_pid()") > 0, timeout=60, what="long_one")
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
    wait_all(mdb, [tid], "cancelled", timeout=60)
    assert w.stop() == 0


def test_worker_threads_through_a_transaction_pool(pg, mdb, workers,
                                                   pgbouncer):
    # Fewer server connections than threads: attempts of different threads
    # take turns on the same server connections.
    bouncer = pgbouncer(pg, pool_mode="transaction", pool_size=2)
    mdb.query("CREATE TABLE effects (n int)")
    mdb.query("CREATE TABLE plugin_out (v text, task bigint)")
    sql_job(mdb, "write_row",
            "INSERT INTO public.effects VALUES ((payload->>'n')::int);")
    sql_job(mdb, "sleepy", "PERFORM pg_sleep(60);")
    ids = []
    for i in range(100):
        ids.append(add(mdb, "write_row", payload={"n": i}))
        ids.append(add(mdb, "noop"))
        # A C handler: its statements run between the attempt's two
        # pipelines, in the same transaction.
        ids.append(add(mdb, "c_insert", payload={"v": str(i)}))
    # Its own time limit, which must hold in its own transaction.
    slow = add(mdb, "sleepy", max_attempts=1)
    mdb.query("UPDATE pgrunner.tasks SET timeout_seconds = 1 WHERE id = %s",
              (slow,))

    w = workers(mdb, "--db", bouncer.dsn(mdb.name), "--listen-db", mdb.dsn,
                "--concurrency", "6", "--plugin", plugin_path())
    wait_all(mdb, ids, timeout=180)
    assert effects(mdb) == {i: 1 for i in range(100)}
    assert sorted(mdb.query("SELECT v::int FROM plugin_out")) == \
        [(i,) for i in range(100)]
    assert mdb.scalar("SELECT max(attempts) FROM pgrunner.tasks"
                      " WHERE id = ANY(%s)", (ids,)) == 1
    wait_all(mdb, [slow], "failed", timeout=60)
    assert "time limit" in mdb.scalar(
        "SELECT last_error FROM pgrunner.tasks WHERE id = %s", (slow,))
    assert "prepared statement" not in w.output()
    assert w.stop() == 0
    # The commands through the same pool.
    for args in (["migrate"], ["add", "noop"], ["status"],
                 ["retry", str(slow)], ["cancel", str(slow)]):
        r = run_pgrunner(args + ["--db", bouncer.dsn(mdb.name)])
        assert r.returncode == 0, (args, r.stderr)
    assert states(mdb, [slow]) == {slow: "cancelled"}

    # Nothing the worker or the commands did stays behind on the pool's
    # server connections: two open transactions hold both of them.
    held = [bouncer.connect(mdb.name) for _ in range(2)]
    try:
        seen = set()
        for c in held:
            c.autocommit = False
            with c.cursor() as cur:
                cur.execute("SELECT pg_backend_pid(),"
                            " current_setting('statement_timeout'),"
                            " current_setting('client_connection_check_interval'),"
                            " current_setting('enable_seqscan'),"
                            " (SELECT count(*) FROM pg_prepared_statements)")
                pid, *left = cur.fetchone()
            seen.add(pid)
            assert left == ["0", "0", "on", 0]
        assert len(seen) == 2
    finally:
        for c in held:
            c.close()


@pytest.mark.parametrize("option", ["--db", "--listen-db"])
def test_transaction_pool_on_the_listening_connection_exits_1(
        pg, mdb, workers, pgbouncer, option):
    bouncer = pgbouncer(pg, pool_mode="transaction", pool_size=20)
    tid = add(mdb, "noop")
    # --db alone: the listening connection defaults to it.
    w = workers(mdb, option, bouncer.dsn(mdb.name))
    assert w.proc.wait(60) == 1
    out = w.output()
    assert "transaction pooler" in out and "--listen-db" in out, out
    # It stopped before registering or claiming anything.
    assert mdb.scalar("SELECT count(*) FROM pgrunner.workers") == 0
    assert states(mdb, [tid]) == {tid: "queued"}


@pytest.mark.parametrize("how", ["flag", "env"])
def test_malformed_listen_db_ends_work_with_exit_1(mdb, how):
    bad = "host=127.0.0.1 password=hunter2 oops"
    args = ["work", "--db", mdb.dsn]
    env = None
    if how == "flag":
        args += ["--listen-db", bad]
    else:
        env = {"PGRUNNER_LISTEN_DB": bad}
    r = run_pgrunner(args, env=env, timeout=30)
    assert r.returncode == 1, r.stderr
    lines = [x for x in r.stderr.strip().splitlines()
             if not x.startswith("ts=")]
    assert len(lines) == 1, r.stderr
    named = "--listen-db" if how == "flag" else "PGRUNNER_LISTEN_DB"
    assert named in lines[0] and "invalid connection string" in lines[0]
    assert "hunter2" not in r.stderr + r.stdout
