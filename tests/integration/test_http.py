"""The worker's HTTP endpoint (--metrics-listen), served by libmicrohttpd:
the real binary on a real database, scraped over TCP."""

import http.client
import re

from pgr_fixtures import add_task as add, free_port, wait_until


def get(port, path, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read().decode()
    finally:
        c.close()


def up(port):
    try:
        return get(port, "/healthz")[0] == 200
    except OSError:
        return False


def test_metrics_and_healthz_of_a_working_worker(mdb, workers):
    port = free_port()
    w = workers(mdb, "--metrics-listen", f"127.0.0.1:{port}")
    wait_until(lambda: up(port), timeout=30, what="/healthz 200")
    for _ in range(7):
        add(mdb, "noop")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                                  "WHERE state = 'succeeded'") == 7,
               what="7 tasks done")

    def succeeded():
        body = get(port, "/metrics")[2]
        m = re.search(r'^pgrunner_tasks_succeeded_total\{queue="default",'
                      r'kind="noop"\} (\d+)$', body, re.M)
        return int(m.group(1)) if m else 0
    wait_until(lambda: succeeded() == 7, what="7 successes counted")

    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert headers["Cache-Control"] == "no-store"
    assert int(headers["Content-Length"]) == len(body.encode())
    status, _, body = get(port, "/healthz")
    assert (status, body) == (200, "ok\n")
    status, headers, body = get(port, "/metrics", "HEAD")
    assert status == 200 and body == ""
    assert int(headers["Content-Length"]) > 0
    assert get(port, "/nothing")[0] == 404
    status, headers, _ = get(port, "/metrics", "DELETE")
    assert status == 405 and headers["Allow"] == "GET, HEAD"

    # Stopping the worker closes the listener.
    w.stop()
    assert not up(port)


def gauge(body, name, queue=None):
    label = "" if queue is None else r'\{queue="%s"\}' % re.escape(queue)
    m = re.search(r"^%s%s (\S+)$" % (name, label), body, re.M)
    return float(m.group(1)) if m else None


def test_queue_gauges(mdb, workers):
    """Depth, due, oldest due age, running, recent failures and live
    workers, read from the database at each scrape."""
    mdb.psql("""
      CREATE FUNCTION pgrunner_jobs.hold(p jsonb) RETURNS void
      LANGUAGE sql AS $$ SELECT pg_advisory_xact_lock_shared(4242) $$;
    """)
    holder = mdb.connect()
    holder.cursor().execute("SELECT pg_advisory_lock(4242)")
    for _ in range(2):
        add(mdb, "hold")
    port = free_port()
    w = workers(mdb, "--queues", "default,later", "--concurrency", "2",
                "--metrics-listen", f"127.0.0.1:{port}")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                                  "WHERE state = 'running'") == 2,
               what="two held tasks running")
    for _ in range(3):
        add(mdb, "noop")
    for _ in range(4):
        add(mdb, "noop", queue="later", run_at="2999-01-01T00:00:00Z")
    mdb.psql("""
      INSERT INTO pgrunner.tasks (kind, queue, state, attempts, finished_at)
      VALUES ('noop', 'later', 'failed', 5, now());
      INSERT INTO pgrunner.tasks (kind, queue, state, attempts, finished_at)
      VALUES ('noop', 'later', 'failed', 5, now() - interval '2 hours');
    """)
    status, _, body = get(port, "/metrics")
    assert status == 200
    assert gauge(body, "pgrunner_gauges_up") == 1
    assert gauge(body, "pgrunner_queue_queued", "default") == 3
    assert gauge(body, "pgrunner_queue_due", "default") == 3
    assert gauge(body, "pgrunner_queue_running", "default") == 2
    assert gauge(body, "pgrunner_queue_oldest_due_age_seconds",
                 "default") > 0
    assert gauge(body, "pgrunner_queue_queued", "later") == 4
    assert gauge(body, "pgrunner_queue_due", "later") == 0
    assert gauge(body, "pgrunner_queue_oldest_due_age_seconds",
                 "later") == 0
    assert gauge(body, "pgrunner_queue_failed_last_hour", "later") == 1
    assert gauge(body, "pgrunner_queue_failed_last_hour", "default") == 0
    assert gauge(body, "pgrunner_workers_live") == 1
    assert gauge(body, "pgrunner_last_claim_age_seconds") >= 0

    holder.cursor().execute("SELECT pg_advisory_unlock(4242)")
    wait_until(lambda: gauge(get(port, "/metrics")[2],
                             "pgrunner_queue_queued", "default") == 0,
               what="default drained")
    body = get(port, "/metrics")[2]
    assert gauge(body, "pgrunner_queue_running", "default") == 0
    holder.close()
    w.stop()


def test_gauges_say_when_the_database_cannot_be_read(mdb, workers):
    port = free_port()
    workers(mdb, "--metrics-listen", f"127.0.0.1:{port}")
    wait_until(lambda: up(port), timeout=30, what="/healthz 200")
    # The HTTP thread's own connection (application_name .../web) dies;
    # the next scrape reconnects.
    mdb.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
             "WHERE application_name LIKE 'pgrunner/%/web'")
    wait_until(lambda: gauge(get(port, "/metrics")[2],
                             "pgrunner_gauges_up") == 1,
               what="gauges back after the connection was killed")
    mdb.psql("ALTER TABLE pgrunner.workers RENAME TO workers_gone")
    body = get(port, "/metrics")[2]
    assert gauge(body, "pgrunner_gauges_up") == 0
    assert gauge(body, "pgrunner_queue_queued", "default") is None
    assert "pgrunner_tasks_started_total" in body or "# HELP" in body
    mdb.psql("ALTER TABLE pgrunner.workers_gone RENAME TO workers")
