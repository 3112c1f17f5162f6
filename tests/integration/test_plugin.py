"""C handler plugins (SPEC section 4): --plugin PATH registers kinds whose
handlers run inside the task's transaction."""

import glob
import os

import pytest

from pgr_fixtures import pgrunner_bin, run_pgrunner, wait_until


def plugin_path():
    p = os.environ.get("PGR_EXAMPLE_PLUGIN")
    if p:
        return p
    # The plugin of the same build as the binary (a sanitizer build's plugin
    # does not load into a plain binary).
    found = glob.glob(os.path.join(os.path.dirname(pgrunner_bin()), "tests",
                                   "example_plugin.so"))
    assert found, "build the project first (example_plugin.so)"
    return found[0]


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
