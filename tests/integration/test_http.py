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
