"""C handler plugins (SPEC section 4): --plugin PATH registers kinds whose
handlers run inside the task's transaction."""

import pytest

from pgr_fixtures import plugin_path, run_pgrunner, wait_until


def state(db, tid):
    return db.query("SELECT state, attempts, last_error FROM pgrunner.tasks "
                    "WHERE id = %s", (tid,))[0]


def test_c_handlers_commit_with_the_task_or_not_at_all(mdb, workers):
    mdb.query("CREATE TABLE plugin_out (v text, task bigint)")
    ok = mdb.scalar("SELECT pgrunner.add_task('c_insert', '{\"v\": \"hello\"}')")
    retry = mdb.scalar("SELECT pgrunner.add_task('c_retry', '{\"v\": \"nope\"}',"
                       " max_attempts => 1)")
    fail = mdb.scalar("SELECT pgrunner.add_task('c_fail', '{}')")
    w = workers(mdb, "--plugin", plugin_path())
    wait_until(lambda: all(state(mdb, t)[0] in ("succeeded", "failed")
                           for t in (ok, retry, fail)), what="plugin tasks done")
    assert state(mdb, ok)[0] == "succeeded"
    assert state(mdb, retry) == ("failed", 1, "plugin asked for a retry")
    assert state(mdb, fail) == ("failed", 1, "plugin refused: permanent")
    rows = [r[0] for r in mdb.query("SELECT v FROM plugin_out")]
    assert rows == ["hello"], "the retried attempt's write was rolled back"
    assert "plugin inserting" in w.output()
    assert w.stop() == 0


def test_a_missing_plugin_is_a_usage_error(mdb, tmp_path):
    r = run_pgrunner(["work", "--db", mdb.dsn, "--plugin",
                      str(tmp_path / "nothere.so")])
    assert r.returncode == 2
    assert "nothere.so" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def started(w, tid):
    return f'msg="task started" task={tid} ' in w.output()


def test_plugins_cannot_register_malformed_kinds(mdb, workers):
    """example_plugin.so refuses to load if the registry accepted "Bad
    Kind", "x;y" or a second "noop"; it loading at all is the check."""
    mdb.query("CREATE TABLE plugin_out (v text, task bigint)")
    tid = mdb.scalar("SELECT pgrunner.add_task('c_insert', '{\"v\": \"k\"}')")
    w = workers(mdb, "--plugin", plugin_path())
    wait_until(lambda: state(mdb, tid)[0] == "succeeded", what="c_insert")
    assert w.stop() == 0


def test_a_c_handler_over_its_time_limit_does_not_commit(mdb, workers):
    mdb.query("CREATE TABLE plugin_out (v text, task bigint)")
    tid = mdb.scalar("SELECT pgrunner.add_task('c_sleep', "
                     "'{\"v\": \"late\", \"sleep\": 4}', max_attempts => 1)")
    w = workers(mdb, "--plugin", plugin_path(), "--task-timeout", "1")
    # One read of the state: two could see "queued", then "running".
    wait_until(lambda: state(mdb, tid)[0] not in ("running", "queued"),
               timeout=60, what="the sleeping C task to end")
    st, attempts, err = state(mdb, tid)
    assert (st, attempts) == ("failed", 1), (st, attempts, err)
    assert "time limit" in err, err
    assert mdb.scalar("SELECT count(*) FROM plugin_out") == 0
    assert w.stop() == 0


def test_a_cancelled_c_handler_does_not_commit(mdb, workers):
    mdb.query("CREATE TABLE plugin_out (v text, task bigint)")
    w = workers(mdb, "--plugin", plugin_path())
    tid = mdb.scalar("SELECT pgrunner.add_task('c_sleep', "
                     "'{\"v\": \"c\", \"sleep\": 3}')")
    wait_until(lambda: started(w, tid), what="the C task to start")
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (tid,)) is True
    wait_until(lambda: state(mdb, tid)[0] == "cancelled", timeout=60,
               what="the task to be cancelled")
    assert mdb.scalar("SELECT count(*) FROM plugin_out") == 0
    assert w.stop() == 0


def test_shutdown_interrupts_a_c_handler_without_spending_it(mdb, workers):
    mdb.query("CREATE TABLE plugin_out (v text, task bigint)")
    w = workers(mdb, "--plugin", plugin_path(), "--shutdown-timeout", "1")
    tid = mdb.scalar("SELECT pgrunner.add_task('c_sleep', "
                     "'{\"v\": \"s\", \"sleep\": 4}')")
    wait_until(lambda: started(w, tid), what="the C task to start")
    assert w.stop() == 0
    assert state(mdb, tid)[:2] == ("queued", 0), state(mdb, tid)
    assert mdb.scalar("SELECT count(*) FROM plugin_out") == 0
