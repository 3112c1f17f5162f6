"""A schedule fires through a running worker's heartbeat, exactly once per
slot even with two workers."""

from pgr_fixtures import wait_until


def test_due_schedule_fires_once_with_two_workers(mdb, workers):
    mdb.query("CREATE TABLE ran (id bigserial, at timestamptz DEFAULT now())")
    mdb.query("CREATE FUNCTION pgrunner_jobs.tick(p jsonb) RETURNS void "
              "LANGUAGE sql AS $$ INSERT INTO ran DEFAULT VALUES $$")
    mdb.query("SELECT pgrunner.add_schedule('yearly', '0 0 1 1 *', "
              "'tick')")
    w1 = workers(mdb)
    w2 = workers(mdb)
    # Both are up and compete for the slot (and neither is stopped while
    # it is still starting, before it handles SIGTERM).
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.workers")
               == 2, what="both workers registered")
    # Make the slot due now (a yearly cron cannot fire again during the test).
    mdb.query("UPDATE pgrunner.schedules SET next_run_at = now() - "
              "interval '3 minutes'")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM ran") >= 1,
               what="the scheduled task ran")
    wait_until(lambda: mdb.scalar(
        "SELECT count(*) FROM pgrunner.tasks WHERE state <> 'succeeded'") == 0,
        what="all scheduled tasks done")
    # Three missed slots collapse into one catch-up task.
    assert mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                      "WHERE kind = 'tick'") == 1
    nxt = mdb.scalar("SELECT next_run_at > now() FROM pgrunner.schedules")
    assert nxt, "the next slot is in the future"
    assert w1.stop() == 0 and w2.stop() == 0
