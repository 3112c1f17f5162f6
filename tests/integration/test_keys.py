"""Task keys at scale and under races: one INSERT or COPY of 100,000 keyed
rows works at default server settings (the key trigger takes no lock in the
server's shared lock table), and the key rule stays race-free: while a task
with a key is queued or running, any other insert of that key (INSERT, COPY,
add_task) adds nothing and raises nothing, however many inserters race.

The basic key rules (skip while queued or running, add_task returns the
existing id, two racing single inserts) are in test_foundation.py.
"""

import io
import random
import threading

import psycopg2
import pytest

from pgr_fixtures import add_task, wait_until

N_BULK = 100_000


def _default_lock_table(db):
    # The old trigger held one advisory lock per keyed row until commit; the
    # shared lock table holds max_locks_per_transaction * max_connections
    # of them (64 * 200 on the test server), so 100,000 rows overflowed it.
    assert db.scalar("SHOW max_locks_per_transaction") == "64"


def _copy(conn, rows, columns="kind, key"):
    """COPY rows (tuples of text) into pgrunner.tasks over conn."""
    buf = io.StringIO("".join("\t".join(r) + "\n" for r in rows))
    with conn.cursor() as cur:
        cur.copy_expert(f"COPY pgrunner.tasks ({columns}) FROM STDIN", buf)


def _queued_per_key(db, like):
    return dict(db.query(
        "SELECT key, count(*) FROM pgrunner.tasks"
        " WHERE key LIKE %s AND state IN ('queued', 'running') GROUP BY key",
        (like,)))


def _waiting_on_lock(db, pid):
    return db.scalar("SELECT wait_event_type = 'Lock' FROM pg_stat_activity"
                     " WHERE pid = %s", (pid,))


# --- bulk -----------------------------------------------------------------------

def test_one_insert_select_of_100k_keyed_rows(mdb):
    _default_lock_table(mdb)
    with mdb.conn.cursor() as cur:
        cur.execute("INSERT INTO pgrunner.tasks (kind, key)"
                    " SELECT 'bulk', 'ins-' || g"
                    " FROM generate_series(1, %s) g", (N_BULK,))
        assert cur.rowcount == N_BULK
    assert mdb.scalar("SELECT count(DISTINCT key) FROM pgrunner.tasks"
                      " WHERE key LIKE 'ins-%%' AND state = 'queued'") == N_BULK
    # The keys are taken: inserting them all again adds nothing, still in
    # one statement, and add_task returns the existing id.
    with mdb.conn.cursor() as cur:
        cur.execute("INSERT INTO pgrunner.tasks (kind, key)"
                    " SELECT 'again', 'ins-' || g"
                    " FROM generate_series(1, %s) g", (N_BULK,))
        assert cur.rowcount == 0
    existing = mdb.scalar("SELECT id FROM pgrunner.tasks"
                          " WHERE key = 'ins-777'")
    assert add_task(mdb, "again", key="ins-777") == existing
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks") == N_BULK


def test_one_copy_of_100k_keyed_rows(mdb):
    _default_lock_table(mdb)
    conn = mdb.connect(autocommit=False)
    try:
        _copy(conn, (("bulk", f"copy-{i}") for i in range(N_BULK)))
        conn.commit()
    finally:
        conn.close()
    assert mdb.scalar("SELECT count(DISTINCT key) FROM pgrunner.tasks"
                      " WHERE key LIKE 'copy-%%' AND state = 'queued'") == N_BULK
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks") == N_BULK


def test_one_statement_with_a_key_twice_adds_one_task(mdb):
    # INSERT ... VALUES: the first row of the key wins.
    with mdb.conn.cursor() as cur:
        cur.execute("INSERT INTO pgrunner.tasks (kind, key, payload) VALUES"
                    " ('a', 'twice', '{\"n\": 1}'), ('a', 'other', '{}'),"
                    " ('a', 'twice', '{\"n\": 2}') RETURNING payload")
        assert [r[0] for r in cur.fetchall()] == [{"n": 1}, {}]
    # INSERT ... SELECT with every key three times, in a large statement.
    with mdb.conn.cursor() as cur:
        cur.execute("INSERT INTO pgrunner.tasks (kind, key)"
                    " SELECT 'a', 'sel-' || (g % 5000)"
                    " FROM generate_series(1, 15000) g")
        assert cur.rowcount == 5000
    # COPY with a repeated key.
    conn = mdb.connect(autocommit=False)
    try:
        _copy(conn, [("a", "cp-1", '{"n": 1}'), ("a", "cp-2", "{}"),
                     ("a", "cp-1", '{"n": 2}'), ("a", "cp-1", '{"n": 3}')],
              columns="kind, key, payload")
        conn.commit()
    finally:
        conn.close()
    assert mdb.query("SELECT payload FROM pgrunner.tasks WHERE key = 'cp-1'") \
        == [({"n": 1},)]
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key = 'twice'") == 1
    per_key = _queued_per_key(mdb, "%")
    assert len(per_key) == 2 + 5000 + 2
    assert set(per_key.values()) == {1}


# --- racing inserters -------------------------------------------------------------

N_KEYS = 2000
CHUNK = 250
MODES = ["add_task", "insert", "copy", "add_task", "insert", "copy",
         "insert", "copy"]


def _race(mdb, phase):
    """8 connections insert the same N_KEYS keys at the same moment, each in
    its own random order of statements of CHUNK keys (each statement sorts
    its keys, see tasks_dedup in sql/0004_bulk_keys.sql); some by add_task,
    some by INSERT ... SELECT, some by COPY. Returns what add_task returned
    per key (one dict per add_task connection) and the errors."""
    keys = [f"race-{i:04d}" for i in range(N_KEYS)]
    barrier = threading.Barrier(len(MODES))
    errors = []
    returned = []

    def inserter(i, mode):
        rng = random.Random(phase * 100 + i)
        order = keys[:]
        rng.shuffle(order)
        chunks = [sorted(order[j:j + CHUNK])
                  for j in range(0, N_KEYS, CHUNK)]
        got = {}
        conn = mdb.connect(autocommit=True)
        try:
            barrier.wait(60)
            for chunk in chunks:
                if mode == "add_task":
                    with conn.cursor() as cur:
                        cur.execute(
                            "SELECT k, pgrunner.add_task(%s, key => k)"
                            " FROM unnest(%s::text[]) WITH ORDINALITY AS u(k, o)"
                            " ORDER BY o", (f"t{i}", chunk))
                        got.update(cur.fetchall())
                elif mode == "insert":
                    with conn.cursor() as cur:
                        cur.execute(
                            "INSERT INTO pgrunner.tasks (kind, key)"
                            " SELECT %s, k FROM unnest(%s::text[])"
                            " WITH ORDINALITY AS u(k, o) ORDER BY o",
                            (f"t{i}", chunk))
                else:
                    conn.autocommit = False
                    _copy(conn, ((f"t{i}", k) for k in chunk))
                    conn.commit()
                    conn.autocommit = True
        except Exception as e:  # reported by the test
            errors.append((mode, e))
        finally:
            conn.close()
        if mode == "add_task":
            returned.append(got)

    threads = [threading.Thread(target=inserter, args=(i, m))
               for i, m in enumerate(MODES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not any(t.is_alive() for t in threads)
    return keys, returned, errors


def _check_race(mdb, keys, returned, errors):
    assert errors == []
    queued = dict(mdb.query("SELECT key, id FROM pgrunner.tasks"
                            " WHERE key LIKE 'race-%%' AND state = 'queued'"))
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key LIKE 'race-%%' AND state = 'queued'") \
        == N_KEYS
    assert sorted(queued) == keys
    # Every add_task call returned the one queued task of its key.
    assert len(returned) == MODES.count("add_task")
    for got in returned:
        assert got == queued


def test_racing_inserters_of_the_same_keys(mdb):
    # Fresh keys: inserters meet on the key row's insertion.
    keys, returned, errors = _race(mdb, 1)
    _check_race(mdb, keys, returned, errors)
    first = dict(mdb.query("SELECT key, id FROM pgrunner.tasks"
                           " WHERE key LIKE 'race-%%'"))

    # Finished keys: their key rows exist, inserters meet on its row lock.
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded',"
              " finished_at = now() WHERE key LIKE 'race-%%'")
    keys, returned, errors = _race(mdb, 2)
    _check_race(mdb, keys, returned, errors)
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key LIKE 'race-%%'") == 2 * N_KEYS
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                      " WHERE key LIKE 'race-%%' AND state = 'queued'"
                      " AND id = ANY(%s)", (list(first.values()),)) == 0


# --- finished keys, deleted key rows ------------------------------------------------

@pytest.mark.parametrize("how", ["add_task", "insert", "copy"])
def test_a_finished_key_can_be_added_again(mdb, how):
    def insert(key):
        if how == "add_task":
            return add_task(mdb, "again", key=key)
        if how == "insert":
            return mdb.scalar("INSERT INTO pgrunner.tasks (kind, key)"
                              " VALUES ('again', %s) RETURNING id", (key,))
        conn = mdb.connect(autocommit=False)
        try:
            _copy(conn, [("again", key)])
            conn.commit()
        finally:
            conn.close()
        return mdb.scalar("SELECT max(id) FROM pgrunner.tasks WHERE key = %s",
                          (key,))

    for end in ("succeeded", "failed", "cancelled"):
        key = f"fin-{end}"
        first = insert(key)
        assert first is not None
        # Taken while queued or running.
        if how == "add_task":
            assert insert(key) == first
        else:
            insert(key)
        mdb.query("UPDATE pgrunner.tasks SET state = 'running', attempts = 1"
                  " WHERE id = %s", (first,))
        if how == "add_task":
            assert insert(key) == first
        else:
            insert(key)
        assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks"
                          " WHERE key = %s", (key,)) == 1
        # Free once finished.
        mdb.query("UPDATE pgrunner.tasks SET state = %s, finished_at = now()"
                  " WHERE id = %s", (end, first))
        second = insert(key)
        assert second is not None and second != first
        assert mdb.query("SELECT id, state FROM pgrunner.tasks WHERE key = %s"
                         " ORDER BY id", (key,)) \
            == [(first, end), (second, "queued")]
        assert mdb.scalar("SELECT count(*) FROM pgrunner.task_keys"
                          " WHERE key = %s", (key,)) == 1


def test_a_deleted_key_row_does_not_free_a_taken_key(mdb):
    first = add_task(mdb, "a", key="gone")
    mdb.query("DELETE FROM pgrunner.task_keys WHERE key = 'gone'")
    assert add_task(mdb, "a", key="gone") == first
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, key) VALUES ('a', 'gone')")
    assert r.returncode == 0, r.stderr
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks") == 1
    assert mdb.scalar("SELECT count(*) FROM pgrunner.task_keys") == 1


def _in_thread(db, sql, result):
    def run():
        conn = db.connect(autocommit=True)
        try:
            result["pid"] = conn.get_backend_pid()
            with conn.cursor() as cur:
                cur.execute(sql)
                row = cur.fetchone() if cur.description else None
                result["id"] = row[0] if row else None
        except Exception as e:  # reported by the test
            result["error"] = e
        finally:
            conn.close()
    t = threading.Thread(target=run)
    t.start()
    wait_until(lambda: "pid" in result or "error" in result, timeout=30,
               what="the inserter to connect")
    return t


@pytest.mark.parametrize("holder_ends", ["commit", "rollback"])
def test_key_row_deleted_while_inserts_wait_on_it(mdb, holder_ends):
    """The key row exists (a finished task used the key). A holder inserts
    the key and holds its row; a deleter (retention) waits to delete it;
    two more inserters wait behind them. Whatever order they are woken in,
    exactly one task of the key ends up queued, and nobody errs."""
    done = add_task(mdb, "a", key="k")
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded',"
              " finished_at = now() WHERE id = %s", (done,))
    holder = mdb.connect(autocommit=False)
    deleter = mdb.connect(autocommit=False)
    try:
        hcur = holder.cursor()
        hcur.execute("SELECT pgrunner.add_task('holder', key => 'k')")
        held = hcur.fetchone()[0]
        assert held != done

        dres = {}

        def delete():
            try:
                with deleter.cursor() as cur:
                    cur.execute("DELETE FROM pgrunner.task_keys"
                                " WHERE key = 'k'")
                    dres["n"] = cur.rowcount
            except Exception as e:  # reported by the test
                dres["error"] = e

        dt = threading.Thread(target=delete)
        dt.start()
        wait_until(lambda: _waiting_on_lock(mdb, deleter.get_backend_pid()),
                   timeout=30, what="the delete to wait for the holder")
        r1, r2 = {}, {}
        t1 = _in_thread(mdb, "SELECT pgrunner.add_task('second', key => 'k')",
                        r1)
        wait_until(lambda: _waiting_on_lock(mdb, r1["pid"]), timeout=30,
                   what="the second inserter to wait")
        t2 = _in_thread(mdb, "INSERT INTO pgrunner.tasks (kind, key)"
                             " VALUES ('third', 'k') RETURNING id", r2)
        wait_until(lambda: _waiting_on_lock(mdb, r2["pid"]), timeout=30,
                   what="the third inserter to wait")

        if holder_ends == "commit":
            holder.commit()
        else:
            holder.rollback()
        dt.join(60)
        assert not dt.is_alive()
        assert "error" not in dres, dres.get("error")
        assert dres["n"] == 1
        deleter.commit()
        t1.join(60)
        t2.join(60)
        assert not t1.is_alive() and not t2.is_alive()
        assert "error" not in r1, r1.get("error")
        assert "error" not in r2, r2.get("error")

        queued = mdb.query("SELECT id, kind FROM pgrunner.tasks"
                           " WHERE key = 'k' AND state = 'queued'")
        assert len(queued) == 1
        (qid, kind), = queued
        if holder_ends == "commit":
            assert qid == held
            assert r1["id"] == held and r2["id"] is None
        else:
            assert kind in ("second", "third")
            assert r1["id"] == qid
            assert r2["id"] in (None, qid)
        # The waiters found the row deleted and inserted it again.
        assert mdb.scalar("SELECT count(*) FROM pgrunner.task_keys"
                          " WHERE key = 'k'") == 1
    finally:
        holder.close()
        deleter.close()


def test_inserts_wait_for_an_uncommitted_key_row_delete(mdb):
    """A deleter removed the key row but has not committed; two inserters
    of the key wait for it, then exactly one of them adds a task."""
    done = add_task(mdb, "a", key="d")
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded',"
              " finished_at = now() WHERE id = %s", (done,))
    deleter = mdb.connect(autocommit=False)
    try:
        deleter.cursor().execute("DELETE FROM pgrunner.task_keys"
                                 " WHERE key = 'd'")
        r1, r2 = {}, {}
        t1 = _in_thread(mdb, "SELECT pgrunner.add_task('x', key => 'd')", r1)
        t2 = _in_thread(mdb, "SELECT pgrunner.add_task('y', key => 'd')", r2)
        for r in (r1, r2):
            wait_until(lambda: _waiting_on_lock(mdb, r["pid"]), timeout=30,
                       what="an inserter to wait for the delete")
        deleter.commit()
        t1.join(60)
        t2.join(60)
        assert "error" not in r1, r1.get("error")
        assert "error" not in r2, r2.get("error")
        queued = mdb.query("SELECT id FROM pgrunner.tasks"
                           " WHERE key = 'd' AND state = 'queued'")
        assert len(queued) == 1
        assert r1["id"] == r2["id"] == queued[0][0]
    finally:
        deleter.close()


# --- REPEATABLE READ ----------------------------------------------------------------

def test_repeatable_read_inserter_errs_rather_than_duplicates(mdb):
    """In REPEATABLE READ the check cannot see a same-key task committed
    after the transaction's snapshot: the insert fails (serialization
    failure or unique violation, retry the transaction) instead of being
    skipped, and never adds a second task. Without such a race it behaves
    as in READ COMMITTED."""
    rr = mdb.connect(autocommit=False)
    rr.set_session(isolation_level="REPEATABLE READ")
    try:
        # No race: skipped silently, add_task returns the existing id.
        first = add_task(mdb, "a", key="rr-old")
        cur = rr.cursor()
        cur.execute("SELECT pgrunner.add_task('b', key => 'rr-old')")
        assert cur.fetchone()[0] == first
        cur.execute("INSERT INTO pgrunner.tasks (kind, key)"
                    " VALUES ('b', 'rr-old')")
        assert cur.rowcount == 0
        rr.commit()

        for fresh in (True, False):
            key = f"rr-{fresh}"
            if not fresh:
                # The key row exists, from a finished task.
                old = add_task(mdb, "a", key=key)
                mdb.query("UPDATE pgrunner.tasks SET state = 'failed',"
                          " finished_at = now() WHERE id = %s", (old,))
            cur = rr.cursor()
            cur.execute("SELECT 1")  # takes the snapshot
            other = add_task(mdb, "a", key=key)  # commits after it
            with pytest.raises((psycopg2.errors.SerializationFailure,
                                psycopg2.errors.UniqueViolation)):
                cur.execute("SELECT pgrunner.add_task('b', key => %s)",
                            (key,))
            rr.rollback()
            # Retried, the transaction sees the task.
            cur = rr.cursor()
            cur.execute("SELECT pgrunner.add_task('b', key => %s)", (key,))
            assert cur.fetchone()[0] == other
            rr.commit()
            assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks WHERE"
                              " key = %s AND state = 'queued'", (key,)) == 1
    finally:
        rr.close()


def test_retention_deletes_the_key_rows_of_pruned_tasks(mdb):
    """pgrunner.prune (run by every worker) deletes a pruned task's key row
    with it, so task_keys does not grow with every key ever used; a key
    still held by a queued task keeps working."""
    mdb.query("INSERT INTO pgrunner.tasks (kind, key) "
              "SELECT 'noop', 'old' || g FROM generate_series(1, 50) g")
    mdb.query("INSERT INTO pgrunner.tasks (kind, key) VALUES ('noop', 'live')")
    mdb.query("UPDATE pgrunner.tasks SET state = 'succeeded', "
              "finished_at = now() - interval '2 days' WHERE key LIKE 'old%%'")
    assert mdb.scalar("SELECT count(*) FROM pgrunner.task_keys") == 51
    assert mdb.scalar("SELECT pgrunner.prune(interval '1 day', 20)") == 20
    assert mdb.scalar("SELECT pgrunner.prune(interval '1 day')") == 30
    assert mdb.scalar("SELECT array_agg(key) FROM pgrunner.task_keys") \
        == ["live"]
    # The freed keys can be used again, the held one still cannot.
    mdb.query("INSERT INTO pgrunner.tasks (kind, key) "
              "VALUES ('noop', 'old1'), ('noop', 'live')")
    assert _queued_per_key(mdb, "%") == {"old1": 1, "live": 1}
