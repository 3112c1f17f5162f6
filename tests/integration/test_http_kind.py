"""The `http` job kind (issue 16, item 4): one request per attempt with
libcurl, against a real HTTP server run by this test (http.server in a
thread, recording every request). 2xx succeeds; 408, 429, 5xx and no
answer retry (Retry-After honoured); other 4xx and redirects fail at once;
bad payloads fail at once without a request; the Idempotency-Key is the
same on every attempt."""

import email.utils
import http.server
import json
import re
import threading
import time
import urllib.parse

import pytest

from pgr_fixtures import free_port, run_pgrunner, wait_until

FINAL = ("succeeded", "failed", "cancelled")
# Requests go straight to the test's server even where a proxy is set.
NOPROXY = {"no_proxy": "*", "NO_PROXY": "*"}


class Recorder(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.requests = []
        self.counts = {}
        self.lock = threading.Lock()
        self.port = self.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"

    def to(self, path):
        return [r for r in self.requests if r["path"] == path]


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers by path: /status/CODE (?ra=SECONDS|date60, &body=TEXT),
    /flaky/N/CODE (CODE N times, then 200), /slow/SECONDS, /ok (JSON),
    /redirect, /big (40 KB of text)."""

    def log_message(self, *args):
        pass

    def _answer(self):
        n = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(n) if n else b""
        url = urllib.parse.urlsplit(self.path)
        q = dict(urllib.parse.parse_qsl(url.query))
        srv = self.server
        with srv.lock:
            srv.requests.append({"method": self.command, "path": url.path,
                                 "query": url.query,
                                 "headers": {k.lower(): v for k, v
                                             in self.headers.items()},
                                 "body": body})
            srv.counts[url.path] = srv.counts.get(url.path, 0) + 1
            count = srv.counts[url.path]
        parts = url.path.strip("/").split("/")
        status, ctype, out, extra = 200, "text/plain", b"", {}
        if parts[0] == "ok":
            ctype, out = "application/json", b'{"received": true, "n": 0.1}'
        elif parts[0] == "created":
            status, out = 201, b"made it"
        elif parts[0] == "status":
            status = int(parts[1])
            out = q.get("body", "no good").encode()
        elif parts[0] == "flaky":
            if count <= int(parts[1]):
                status, out = int(parts[2]), b"try later"
            else:
                status, out = 200, b"fine now"
        elif parts[0] == "slow":
            time.sleep(float(parts[1]))
            out = b"late"
        elif parts[0] == "redirect":
            status, extra = 302, {"Location": "/ok"}
        elif parts[0] == "big":
            out = b"x" * 40000
        ra = q.get("ra")
        if ra == "date60":
            extra["Retry-After"] = email.utils.formatdate(
                time.time() + 60, usegmt=True)
        elif ra:
            extra["Retry-After"] = ra
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(out)))
        for k, v in extra.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = \
        do_OPTIONS = _answer


@pytest.fixture
def web():
    srv = Recorder()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def add(db, payload, **kw):
    cols = ["kind", "payload"] + list(kw)
    vals = ["http", json.dumps(payload)] + list(kw.values())
    return db.scalar(
        f"INSERT INTO pgrunner.tasks ({', '.join(cols)}) VALUES "
        f"({', '.join(['%s'] * len(cols))}) RETURNING id", vals)


def row(db, tid):
    return db.query("SELECT state, attempts, last_error, output FROM "
                    "pgrunner.tasks WHERE id = %s", (tid,))[0]


def wait_final(db, ids, timeout=30):
    wait_until(lambda: all(row(db, t)[0] in FINAL for t in ids),
               timeout=timeout, what="http tasks to end")


def fast_retries(db):
    db.query("SELECT pgrunner.set_retry_policy(kind => 'http', "
             "base => interval '100 ms', cap => interval '10 s', jitter => 0)")


def test_a_2xx_answer_succeeds_with_status_and_body_as_output(mdb, workers,
                                                              web):
    post = add(mdb, {"url": web.base + "/ok",
                     "headers": {"X-Signature": "abc123"},
                     "body": {"amount": 0.1, "items": [1, 2]}})
    put = add(mdb, {"url": web.base + "/created", "method": "PUT",
                    "body": "plain words"})
    typed = add(mdb, {"url": web.base + "/created", "method": "PATCH",
                      "headers": {"content-type": "application/x-custom"},
                      "body": "a=1"})
    get = add(mdb, {"url": web.base + "/ok?x=1", "method": "GET"})
    big = add(mdb, {"url": web.base + "/big", "method": "GET"})
    w = workers(mdb, env=NOPROXY)
    wait_final(mdb, [post, put, typed, get, big])

    assert row(mdb, post) == ("succeeded", 1, None,
                              {"status": 200,
                               "body": {"received": True, "n": 0.1}})
    assert mdb.scalar("SELECT output->'body'->>'n' FROM pgrunner.tasks "
                      "WHERE id = %s", (post,)) == "0.1"
    assert row(mdb, put)[3] == {"status": 201, "body": "made it"}
    assert row(mdb, get)[0] == "succeeded"
    out = row(mdb, big)[3]
    assert out["status"] == 200 and out["truncated"] is True
    assert out["body"] == "x" * 16384

    r = web.to("/ok")
    posted = [x for x in r if x["method"] == "POST"][0]
    assert posted["headers"]["content-type"] == "application/json"
    assert posted["headers"]["idempotency-key"] == f"pgrunner-{post}"
    assert posted["headers"]["x-signature"] == "abc123"
    # The body is the payload's JSON as the database wrote it: 0.1 stays 0.1.
    assert json.loads(posted["body"]) == {"amount": 0.1, "items": [1, 2]}
    assert b"0.1" in posted["body"] and b"0.10000" not in posted["body"]
    got = [x for x in r if x["method"] == "GET"][0]
    assert got["query"] == "x=1" and got["body"] == b""
    created = web.to("/created")
    by_method = {x["method"]: x for x in created}
    assert by_method["PUT"]["body"] == b"plain words"
    assert by_method["PUT"]["headers"]["content-type"] == \
        "text/plain; charset=utf-8"
    assert by_method["PATCH"]["headers"]["content-type"] == \
        "application/x-custom"
    assert by_method["PATCH"]["headers"]["idempotency-key"] == \
        f"pgrunner-{typed}"

    log = w.output()
    assert re.search(rf'msg="http request succeeded" task={post} '
                     rf'method=POST url=http://127.0.0.1:{web.port}/ok '
                     r'status=200', log), log
    assert w.stop() == 0


def test_retryable_answers_retry_with_the_same_idempotency_key(mdb, workers,
                                                               web):
    fast_retries(mdb)
    ids = {code: add(mdb, {"url": f"{web.base}/flaky/2/{code}",
                           "body": {"code": code}})
           for code in (408, 429, 500, 503)}
    w = workers(mdb, env=NOPROXY)
    wait_final(mdb, ids.values())
    for code, tid in ids.items():
        assert row(mdb, tid) == ("succeeded", 3, None,
                                 {"status": 200, "body": "fine now"}), code
        reqs = web.to(f"/flaky/2/{code}")
        assert len(reqs) == 3
        keys = {x["headers"]["idempotency-key"] for x in reqs}
        assert keys == {f"pgrunner-{tid}"}, "one key across every retry"
        assert all(json.loads(x["body"]) == {"code": code} for x in reqs)
    log = w.output()
    assert re.search(r'msg="task retry scheduled" task=\d+ kind=http .*'
                     r'error="POST http://127\.0\.0\.1:\d+/flaky/2/503: '
                     r'HTTP 503: try later"', log), log
    assert w.stop() == 0


def test_retry_after_sets_the_retry_delay_up_to_the_policys_cap(mdb, workers,
                                                                web):
    # Without Retry-After these would be due again in 0.1 s (fast_retries).
    fast_retries(mdb)
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'http', "
              "cap => interval '1 hour')")
    secs = add(mdb, {"url": web.base + "/status/503?ra=120"})
    date = add(mdb, {"url": web.base + "/status/429?ra=date60"})
    capped_q = "capped"
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'http', queue => %s, "
              "base => interval '100 ms', cap => interval '20 s', "
              "jitter => 0)", (capped_q,))
    capped = add(mdb, {"url": web.base + "/status/503?ra=3600"},
                 queue=capped_q)
    w = workers(mdb, "--queues", f"default,{capped_q}", env=NOPROXY)
    wait_until(lambda: all(row(mdb, t)[1] == 1 and row(mdb, t)[0] == "queued"
                           for t in (secs, date, capped)),
               what="first attempts recorded")
    delay = {t: mdb.scalar("SELECT extract(epoch FROM run_at - now()) "
                           "FROM pgrunner.tasks WHERE id = %s", (t,))
             for t in (secs, date, capped)}
    assert 100 < delay[secs] <= 120, delay
    assert 40 < delay[date] <= 61, delay
    assert 10 < delay[capped] <= 20, delay
    assert "HTTP 503" in row(mdb, secs)[2]
    assert row(mdb, secs)[3] == {"status": 503, "body": "no good"}
    assert re.search(rf"task retry scheduled\" task={secs} .*retry_in_ms=1[01]\d\d\d\d ",
                     w.output()), w.output()
    assert w.stop() == 0


def test_other_4xx_and_redirects_fail_at_once(mdb, workers, web):
    fast_retries(mdb)
    ids = {p: add(mdb, {"url": web.base + p})
           for p in ("/status/400", "/status/404", "/redirect")}
    w = workers(mdb, env=NOPROXY)
    wait_final(mdb, ids.values())
    st, att, err, out = row(mdb, ids["/status/404"])
    assert (st, att) == ("failed", 1)
    assert err == f"POST http://127.0.0.1:{web.port}/status/404: HTTP 404: " \
                  "no good"
    assert out == {"status": 404, "body": "no good"}
    assert row(mdb, ids["/status/400"])[:2] == ("failed", 1)
    st, att, err, out = row(mdb, ids["/redirect"])
    assert (st, att, out["status"]) == ("failed", 1, 302)
    assert "HTTP 302" in err
    for p in ids:
        assert len(web.to(p)) == 1, p
    assert web.to("/ok") == [], "the redirect was not followed"
    assert w.stop() == 0


def test_no_answer_retries_and_the_password_never_shows(mdb, workers, web):
    fast_retries(mdb)
    closed = free_port()  # nothing listens there: connection refused
    refused = add(mdb, {"url": f"http://127.0.0.1:{closed}/hook"},
                  max_attempts=2)
    secret = add(mdb, {"url": f"http://ada:s3cr3t-pw@127.0.0.1:{web.port}"
                              "/status/500?token=t0k3n"}, max_attempts=2)
    w = workers(mdb, env=NOPROXY)
    wait_final(mdb, [refused, secret])
    st, att, err, out = row(mdb, refused)
    assert (st, att, out) == ("failed", 2, None)
    assert err.startswith(f"POST http://127.0.0.1:{closed}/hook: ")
    assert "onnect" in err, err
    st, att, err, out = row(mdb, secret)
    assert (st, att) == ("failed", 2)
    assert err == f"POST http://127.0.0.1:{web.port}/status/500: HTTP 500: " \
                  "no good"
    reqs = web.to("/status/500")
    assert len(reqs) == 2
    assert reqs[0]["headers"]["authorization"].startswith("Basic ")
    assert reqs[0]["query"] == "token=t0k3n"
    log = w.output()
    assert "s3cr3t-pw" not in log and "t0k3n" not in log
    assert "s3cr3t-pw" not in err and "t0k3n" not in err
    assert w.stop() == 0


def test_a_slow_answer_is_cut_at_the_tasks_time_limit(mdb, workers, web):
    tid = add(mdb, {"url": web.base + "/slow/30"}, timeout_seconds=1,
              max_attempts=1)
    w = workers(mdb, env=NOPROXY)
    wait_final(mdb, [tid], timeout=20)
    st, att, err, _ = row(mdb, tid)
    assert (st, att) == ("failed", 1)
    assert "time limit of 1 s" in err, err
    assert len(web.to("/slow/30")) == 1
    assert w.stop() == 0


def test_cancel_and_shutdown_abort_the_transfer(mdb, workers, web):
    cancelled = add(mdb, {"url": web.base + "/slow/60"})
    w = workers(mdb, "--shutdown-timeout", "1", env=NOPROXY)
    wait_until(lambda: len(web.to("/slow/60")) == 1, what="request sent")
    assert mdb.scalar("SELECT pgrunner.cancel_task(%s)", (cancelled,)) is True
    wait_final(mdb, [cancelled], timeout=20)
    assert row(mdb, cancelled)[:3] == ("cancelled", 1,
                                       "cancelled while running")

    stopped = add(mdb, {"url": web.base + "/slow/61"})
    wait_until(lambda: len(web.to("/slow/61")) == 1, what="request sent")
    assert w.stop(timeout=20) == 0
    # Interrupted by the shutdown: queued again, the attempt not spent.
    assert row(mdb, stopped)[:2] == ("queued", 0)


BAD = [
    ({"method": "POST"}, '"url" is missing'),
    ({"url": "ftp://127.0.0.1/x"}, '"url" must use http or https, not ftp'),
    ({"url": "file:///etc/passwd"}, '"url" must use http or https, not file'),
    ({"url": "127.0.0.1/x"}, '"url" must start with http:// or https://'),
    ({"url": 7}, '"url" must be a string, not a number'),
    ({"url": "http://h/x", "method": "FETCH"},
     '"method" "FETCH" is not one of GET, HEAD, POST, PUT, PATCH, DELETE, '
     'OPTIONS'),
    ({"url": "http://h/x", "headers": ["X: y"]},
     '"headers" must be an object of strings, not an array'),
    ({"url": "http://h/x", "headers": {"X-A": 1}},
     "header X-A must be a string, not a number"),
    ({"url": "http://h/x", "headers": {"X-A": "v\r\nX-Evil: 1"}},
     "header X-A has a control character (CR, LF...) in its value"),
    ({"url": "http://h/x", "headers": {"X-A\r\nX-Evil": "1"}},
     'header name "X-A??X-Evil" has a character not allowed in a header '
     "name (CR, LF, space, colon...)"),
    ({"url": "http://h/x", "headers": {"Idempotency-Key": "mine"}},
     "header Idempotency-Key is set by pgrunner"),
    ({"url": "http://h/x", "method": "GET", "body": "x"},
     'a GET request takes no "body"'),
    ({"url": "http://h/x", "timeout": 3},
     'unknown key "timeout" (expected url, method, headers, body)'),
]


def test_a_bad_payload_fails_at_once_without_a_request(mdb, workers, web):
    fast_retries(mdb)
    ids = [add(mdb, p) for p, _ in BAD]
    arr = mdb.scalar("INSERT INTO pgrunner.tasks (kind, payload) VALUES "
                     "('http', '[]') RETURNING id")
    w = workers(mdb, env=NOPROXY)
    wait_final(mdb, ids + [arr])
    for tid, (payload, why) in zip(ids, BAD):
        assert row(mdb, tid) == ("failed", 1, "invalid http payload: " + why,
                                 None), payload
    assert row(mdb, arr)[2] == \
        "invalid http payload: payload must be an object, not an array"
    assert web.requests == []
    assert w.stop() == 0


def test_the_allow_list_admits_only_the_hosts_it_names(mdb, workers, web):
    named = add(mdb, {"url": f"http://LOCALHOST:{web.port}/ok"})
    other = add(mdb, {"url": web.base + "/ok"})
    w = workers(mdb, env=dict(NOPROXY,
                              PGRUNNER_HTTP_ALLOW=" example.org, localhost "))
    wait_final(mdb, [named, other])
    assert row(mdb, named)[:2] == ("succeeded", 1)
    assert row(mdb, other) == (
        "failed", 1,
        "invalid http payload: host 127.0.0.1 is not in PGRUNNER_HTTP_ALLOW",
        None)
    assert len(web.to("/ok")) == 1
    assert w.stop() == 0

    r = run_pgrunner(["work", "--db", mdb.dsn],
                     env={"PGRUNNER_HTTP_ALLOW": "localhost:8080"})
    assert r.returncode == 2
    assert 'PGRUNNER_HTTP_ALLOW: "localhost:8080" is not a host name' in \
        r.stderr
