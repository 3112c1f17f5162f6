"""The dashboard in a real browser (Debian's headless chromium over the
DevTools protocol), served by `pgrunner web` and by a working worker, on a
real database."""

import http.client
import os
import subprocess
import time
import types

import pytest

from pgr_fixtures import (add_task as add, assert_no_sanitizer_report,
                          free_port, pgrunner_bin,
                          pgrunner_env, wait_until)

import browser as browser_mod  # noqa: E402  (tests/support)

HOSTILE = "<img src=x onerror=\"window.pwned=1\">"


@pytest.fixture
def browser():
    b = browser_mod.Browser()
    yield b
    b.close()


class Web:
    def __init__(self, db, token=None, healthz=200):
        self.port = free_port()
        env = pgrunner_env()
        if token:
            env["PGRUNNER_ADMIN_TOKEN"] = token
        self.proc = subprocess.Popen(
            [pgrunner_bin(), "web", "--db", db.dsn, "--listen",
             f"127.0.0.1:{self.port}"], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(lambda: self.request("GET", "/healthz")[0] == healthz,
                   timeout=30, what="pgrunner web up")

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method, path, headers=None):
        try:
            c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            c.request(method, path, headers=headers or {})
            r = c.getresponse()
            out = (r.status, dict(r.getheaders()), r.read().decode())
            c.close()
            return out
        except OSError:
            return (0, {}, "")

    def stop(self):
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        assert_no_sanitizer_report(out.decode("utf-8", "replace"), "web")
        return self.proc.returncode


def failed_task(db, kind="mail_out", error="boom"):
    return db.scalar(
        "INSERT INTO pgrunner.tasks (kind, queue, state, attempts, "
        "max_attempts, finished_at, last_error) VALUES "
        "(%s, 'mail', 'failed', 3, 3, now(), %s) RETURNING id", (kind, error))


def test_page_without_its_database_says_so(db):
    """The database gone: the page answers 503 with the reason, and the
    web process frees what the page had begun (LeakSanitizer in the ASan
    build)."""
    gone = types.SimpleNamespace(dsn=db.server.dsn("no_such_database"))
    web = Web(gone, healthz=503)
    try:
        status, _, body = web.request("GET", "/")
        assert status == 503 and "database cannot be read" in body, body
    finally:
        assert web.stop() == 0


def test_page_renders_queues_and_failures_as_text(mdb, browser):
    for _ in range(3):
        add(mdb, "noop", queue="reports", run_at="2999-01-01T00:00:00Z")
    add(mdb, HOSTILE, queue="q" + HOSTILE, payload={"html": HOSTILE})
    tid = failed_task(mdb, error="SMTP said " + HOSTILE)
    web = Web(mdb)
    try:
        browser.goto(web.url("/"))
        rows = browser.eval(
            "[...document.querySelectorAll('tr.queue')].map("
            "r => [...r.cells].slice(0, 3).map(c => c.textContent))")
        assert ["reports", "3", "0"] in rows
        assert ["q" + HOSTILE, "1", "1"] in rows
        failures = browser.eval(
            "[...document.querySelectorAll('tr.failure')].map("
            "r => r.cells[0].textContent + '|' + r.cells[5].textContent)")
        assert f"{tid}|SMTP said {HOSTILE}" in failures
        # The markup in names, payloads and errors is text: no element was
        # made of it, nothing ran.
        assert browser.eval("document.querySelectorAll('img').length") == 0
        assert browser.eval("window.pwned === undefined")
        assert browser.eval("document.querySelector('.ro') !== null"), \
            "without a token the page says it is read-only"
        assert browser.eval(
            "document.querySelectorAll('button[data-action]').length") == 0

        browser.goto(web.url(f"/task/{tid}"))
        assert browser.eval("document.querySelector('h1').textContent") \
            == f"Task {tid}"
        assert HOSTILE in browser.eval("document.body.textContent")
        assert browser.eval("document.querySelectorAll('img').length") == 0
        status, headers, _ = web.request("GET", "/")
        assert "script-src 'self'" in headers["Content-Security-Policy"]
        assert web.request("GET", "/task/999999999")[0] == 404
        assert web.request("GET", "/task/1%3Bdrop")[0] == 404
        # Without PGRUNNER_ADMIN_TOKEN every action is refused.
        status, _, body = web.request("POST", f"/api/tasks/{tid}/retry",
                                      {"X-Pgrunner-Token": "anything"})
        assert status == 403 and "read-only" in body
        assert mdb.scalar("SELECT state FROM pgrunner.tasks WHERE id = %s",
                          (tid,)) == "failed"
    finally:
        assert web.stop() == 0


def test_retry_from_the_page_needs_the_token(mdb, browser):
    tid = failed_task(mdb)
    web = Web(mdb, token="s3cret-token")
    try:
        browser.goto(web.url(f"/task/{tid}"))
        # A wrong token: refused, nothing changes.
        browser.eval("sessionStorage.setItem('pgrunner-token', 'wrong')")
        browser.eval("document.querySelector("
                     "'button[data-action=retry]').click()")
        wait_until(lambda: "refused" in (browser.eval(
            "document.getElementById('result').textContent") or ""),
            what="the page reports the refusal")
        assert mdb.scalar("SELECT state FROM pgrunner.tasks WHERE id = %s",
                          (tid,)) == "failed"
        # The right one: the task is queued again, in the database.
        browser.eval("sessionStorage.setItem('pgrunner-token', "
                     "'s3cret-token')")
        browser.eval("document.querySelector("
                     "'button[data-action=retry]').click()")
        wait_until(lambda: mdb.scalar(
            "SELECT state FROM pgrunner.tasks WHERE id = %s", (tid,))
            == "queued", what="the task queued again")
        assert mdb.scalar("SELECT attempts FROM pgrunner.tasks WHERE id = %s",
                          (tid,)) == 0
        # Cancel the queued task over the API; no token, no cancel.
        assert web.request("POST", f"/api/tasks/{tid}/cancel")[0] == 403
        status, _, body = web.request("POST", f"/api/tasks/{tid}/cancel",
                                      {"X-Pgrunner-Token": "s3cret-token"})
        assert status == 200 and '"changed":true' in body
        assert mdb.scalar("SELECT state FROM pgrunner.tasks WHERE id = %s",
                          (tid,)) == "cancelled"
        # A GET cannot act (no cross-site link can), nor can a form post
        # without the header.
        assert web.request("GET", f"/api/tasks/{tid}/retry")[0] == 404
        if os.environ.get("PGR_SCREENSHOT"):
            failed_task(mdb, error="connection refused by mail.example.com")
            browser.goto(web.url("/"))
            browser.screenshot(os.environ["PGR_SCREENSHOT"])
    finally:
        assert web.stop() == 0


def test_worker_serves_the_dashboard_and_counts_per_minute(mdb, workers,
                                                           browser):
    port = free_port()
    workers(mdb, "--metrics-listen", f"127.0.0.1:{port}")
    for _ in range(5):
        add(mdb, "noop")
    # Outcomes reach pgrunner.queue_stats within ten seconds.
    wait_until(lambda: mdb.scalar(
        "SELECT coalesce(sum(succeeded), 0) FROM pgrunner.queue_stats "
        "WHERE queue = 'default'") == 5, timeout=30,
        what="five successes recorded per minute")
    browser.goto(f"http://127.0.0.1:{port}/")
    assert browser.eval("document.querySelectorAll('tr.worker').length") == 1
    assert browser.eval(
        "document.querySelectorAll('tr.queue svg rect.bar').length") >= 1
