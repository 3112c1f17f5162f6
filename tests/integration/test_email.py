"""The `email` job kind end to end: a real worker (`pgrunner work`), a real
PostgreSQL (tests/support/pgr_fixtures.py) and a real SMTP server
(tests/support/smtp_fixtures.py, aiosmtpd), one database per test.

aiosmtpd cannot be told to refuse the greeting, EHLO or HELO; for those
replies a small scripted SMTP server (ScriptedSmtp, below) listens on a
real socket instead."""

import json
import socketserver
import threading

import pytest

from pgr_fixtures import run_pgrunner, wait_until

MAIL_FROM = "pgrunner@example.org"
MSGID_DOMAIN = "test.example"


def add_email(db, payload, max_attempts=None):
    """Add an email task with a plain INSERT; return its id."""
    if max_attempts is None:
        return db.scalar("INSERT INTO pgrunner.tasks (kind, payload) "
                         "VALUES ('email', %s) RETURNING id",
                         (json.dumps(payload),))
    return db.scalar("INSERT INTO pgrunner.tasks (kind, payload, max_attempts)"
                     " VALUES ('email', %s, %s) RETURNING id",
                     (json.dumps(payload), max_attempts))


def task(db, tid):
    state, attempts, last_error = db.query(
        "SELECT state, attempts, last_error FROM pgrunner.tasks WHERE id = %s",
        (tid,))[0]
    return {"state": state, "attempts": attempts, "last_error": last_error}


def wait_task(db, tid, pred, worker, what, timeout=60):
    """Wait until pred(task row) holds; on timeout show the row and the
    worker's output."""
    def check():
        t = task(db, tid)
        return t if pred(t) else None

    try:
        return wait_until(check, timeout=timeout, what=what)
    except AssertionError as e:
        raise AssertionError(f"{e}\ntask: {task(db, tid)}\nworker output:\n"
                             f"{worker.output()[-4000:]}") from None


def finished(db, tid, worker, timeout=60):
    return wait_task(db, tid,
                     lambda t: t["state"] in ("succeeded", "failed",
                                              "cancelled"),
                     worker, f"task {tid} to finish", timeout)


def start_worker(workers, db, server, **env):
    e = server.env(PGRUNNER_MAIL_FROM=MAIL_FROM,
                   PGRUNNER_MESSAGE_ID_DOMAIN=MSGID_DOMAIN)
    e.update({k: str(v) for k, v in env.items()})
    return workers(db, "--poll-interval", "200", env=e)


def start_worker_without_msgid_domain(workers, db, server, **env):
    """A worker as operators run it by default: PGRUNNER_MAIL_FROM, but no
    PGRUNNER_MESSAGE_ID_DOMAIN (start_worker sets one)."""
    e = server.env(PGRUNNER_MAIL_FROM=MAIL_FROM)
    e.update({k: str(v) for k, v in env.items()})
    return workers(db, "--poll-interval", "200", env=e)


def retry_now(db, tid):
    """Make a queued task due now instead of after its backoff."""
    db.query("UPDATE pgrunner.tasks SET run_at = now() "
             "WHERE id = %s AND state = 'queued'", (tid,))


def test_plain_message_arrives_with_envelope_and_headers(mdb, smtp, workers):
    w = start_worker(workers, mdb, smtp)
    tid = add_email(mdb, {"to": "Ann Smith <ann@example.com>",
                          "subject": "Hello there",
                          "text": "Hi Ann,\nsee you.\n"})
    t = finished(mdb, tid, w)
    assert t["state"] == "succeeded", t
    (m,) = smtp.wait_for(1)
    assert m.mail_from == MAIL_FROM
    assert m.rcpt_tos == ["ann@example.com"]
    assert m["From"] == MAIL_FROM
    assert m["To"] == "Ann Smith <ann@example.com>"
    assert m["Subject"] == "Hello there"
    assert m["Message-ID"] == f"<pgrunner.{tid}@{MSGID_DOMAIN}>"
    assert m["Date"] is not None and m["Date"].datetime is not None
    assert m["MIME-Version"] == "1.0"
    assert m.msg.get_content_type() == "text/plain"
    assert m.msg.get_content_charset() == "utf-8"
    assert m.msg.get_content() == "Hi Ann,\nsee you.\n"
    assert f"task={tid}" in w.output()


def test_to_cc_bcc_are_recipients_and_bcc_stays_hidden(mdb, smtp, workers):
    w = start_worker(workers, mdb, smtp)
    tid = add_email(mdb, {"to": ["a@example.com", "b@example.com"],
                          "cc": "c@example.com",
                          "bcc": ["hidden@example.com"],
                          "reply_to": "replies@example.com",
                          "from": "Sales <sales@example.org>",
                          "subject": "Team", "text": "x"})
    assert finished(mdb, tid, w)["state"] == "succeeded"
    (m,) = smtp.wait_for(1)
    assert m.mail_from == "sales@example.org"
    assert sorted(m.rcpt_tos) == ["a@example.com", "b@example.com",
                                  "c@example.com", "hidden@example.com"]
    assert m["To"] == "a@example.com, b@example.com"
    assert m["Cc"] == "c@example.com"
    assert m["Reply-To"] == "replies@example.com"
    assert m["From"] == "Sales <sales@example.org>"
    assert m["Bcc"] is None
    assert b"hidden" not in m.raw, "a Bcc address appears nowhere in the mail"


def test_html_and_text_arrive_as_multipart_alternative(mdb, smtp, workers):
    w = start_worker(workers, mdb, smtp)
    tid = add_email(mdb, {"to": "a@example.com", "subject": "Newsletter",
                          "text": "Plain version: caf\u00e9",
                          "html": "<h1>HTML version: caf\u00e9</h1>"})
    assert finished(mdb, tid, w)["state"] == "succeeded"
    (m,) = smtp.wait_for(1)
    assert m.msg.get_content_type() == "multipart/alternative"
    parts = list(m.msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain",
                                                     "text/html"]
    assert parts[0].get_content().strip() == "Plain version: caf\u00e9"
    assert parts[1].get_content().strip() == "<h1>HTML version: caf\u00e9</h1>"


def test_utf8_subject_and_names_round_trip(mdb, smtp, workers):
    subject = "Gr\u00fc\u00dfe aus K\u00f6ln \u2615 \u2014 " + "\u00e9" * 40
    w = start_worker(workers, mdb, smtp)
    tid = add_email(mdb, {"to": "J\u00fcrgen M\u00fcller <jm@example.com>",
                          "subject": subject,
                          "text": "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad"
                                  "\u30b9\u30c8"})
    assert finished(mdb, tid, w)["state"] == "succeeded"
    (m,) = smtp.wait_for(1)
    assert m["Subject"] == subject
    assert m["To"].addresses[0].display_name == "J\u00fcrgen M\u00fcller"
    assert m.msg.get_content().strip() == ("\u65e5\u672c\u8a9e\u306e\u30c6"
                                           "\u30ad\u30b9\u30c8")
    assert all(b < 128 for b in m.raw), "the message travels as 7-bit"
    assert all(len(line) <= 998 for line in m.raw.split(b"\r\n"))


def test_starttls_with_a_self_signed_certificate(mdb, smtp_server, workers,
                                                 tls_cert):
    # The server speaks TLS 1.3 and sends session tickets; one attempt each
    # and a short timeout, so a session that stalls fails the test (see
    # thread_tls_ctx() in worker/jobs/email.c).
    s = smtp_server(tls_cert=tls_cert.cert, tls_key=tls_cert.key,
                    require_starttls=True)
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_STARTTLS="require",
                     PGRUNNER_SMTP_TIMEOUT=5, SSL_CERT_FILE=tls_cert.cert)
    tids = [add_email(mdb, {"to": "a@example.com", "subject": f"tls {i}",
                            "text": "secret"}, max_attempts=1)
            for i in range(10)]
    for tid in tids:
        t = finished(mdb, tid, w)
        assert t["state"] == "succeeded", t
    msgs = s.wait_for(10)
    assert len(msgs) == 10 and all(m.tls for m in msgs)


def test_starttls_require_refuses_an_untrusted_certificate(mdb, smtp_server,
                                                           workers, tls_cert):
    s = smtp_server(tls_cert=tls_cert.cert, tls_key=tls_cert.key)
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_STARTTLS="require")
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=1)
    t = finished(mdb, tid, w)
    assert t["state"] == "failed"
    assert "certificate is not trusted" in t["last_error"], t
    assert s.messages() == []


def queued_again(db, tid, worker):
    """Wait for a failed attempt that was retried; return the row."""
    return wait_task(db, tid, lambda t: t["attempts"] >= 1 and
                     t["last_error"] and t["state"] == "queued", worker,
                     "a failed attempt, queued again")


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_smtp_ca_file_trusts_a_private_ca(mdb, smtp_server, workers, tls_ca,
                                          host):
    """PGRUNNER_SMTP_CA_FILE is the trust store for the SMTP server: a
    certificate of a private CA verifies with it (by its DNS name or, for
    an address, its IP address name) and not without it."""
    cert, key = tls_ca.server_cert("mta", "DNS:localhost,IP:127.0.0.1")
    s = smtp_server(tls_cert=cert, tls_key=key, require_starttls=True)
    env = dict(PGRUNNER_SMTP_HOST=host, PGRUNNER_SMTP_STARTTLS="require",
               PGRUNNER_SMTP_TIMEOUT=5)
    w = start_worker(workers, mdb, s, **env)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"})
    t = queued_again(mdb, tid, w)
    assert "certificate is not trusted" in t["last_error"], t
    assert "unable to get local issuer certificate" in t["last_error"], t
    w.stop()
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_CA_FILE=tls_ca.cert,
                     **env)
    retry_now(mdb, tid)
    t = finished(mdb, tid, w)
    assert t["state"] == "succeeded", t
    (m,) = s.wait_for(1)
    assert m.tls is True


def test_an_ip_host_needs_the_ip_in_the_certificate(mdb, smtp_server,
                                                    workers, tls_ca):
    cert, key = tls_ca.server_cert("dns-only", "DNS:localhost")
    s = smtp_server(tls_cert=cert, tls_key=key, require_starttls=True)
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_STARTTLS="require",
                     PGRUNNER_SMTP_CA_FILE=tls_ca.cert,
                     PGRUNNER_SMTP_TIMEOUT=5)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"})
    t = queued_again(mdb, tid, w)
    assert "does not name the address 127.0.0.1" in t["last_error"], t
    assert '"localhost"' in t["last_error"], t
    assert s.messages() == []


@pytest.mark.parametrize("content,reason", [
    (None, "No such file or directory"),
    ("not a certificate\n", "no certificate"),
])
def test_a_bad_smtp_ca_file_is_refused_at_start(mdb, tmp_path, content,
                                                reason):
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_text(content)
    env = {"PGRUNNER_SMTP_HOST": "127.0.0.1",
           "PGRUNNER_SMTP_CA_FILE": str(path)}
    r = run_pgrunner(["work", "--db", mdb.dsn], env=env, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "PGRUNNER_SMTP_CA_FILE" in lines[0] and reason in lines[0], \
        r.stderr


def test_starttls_try_is_opportunistic(mdb, smtp_server, workers, tls_cert):
    s = smtp_server(tls_cert=tls_cert.cert, tls_key=tls_cert.key)
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_STARTTLS="try")
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"})
    assert finished(mdb, tid, w)["state"] == "succeeded"
    (m,) = s.wait_for(1)
    assert m.tls is True


def test_auth_with_a_test_user(mdb, smtp_server, workers):
    s = smtp_server(auth_user="mailer", auth_password="pa55-w0rd!")
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_USER="mailer",
                     PGRUNNER_SMTP_PASSWORD="pa55-w0rd!",
                     PGRUNNER_LOG_LEVEL="debug")
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"})
    assert finished(mdb, tid, w)["state"] == "succeeded"
    (m,) = s.wait_for(1)
    assert m.auth_login == "mailer"
    assert "pa55-w0rd!" not in w.output()


def test_auth_with_a_wrong_password_fails_the_task_at_once(mdb, smtp_server,
                                                         workers):
    s = smtp_server(auth_user="mailer", auth_password="right")
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_USER="mailer",
                     PGRUNNER_SMTP_PASSWORD="wrong-secret",
                     PGRUNNER_LOG_LEVEL="debug")
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=3)
    t = finished(mdb, tid, w)
    assert t["state"] == "failed", t
    assert t["attempts"] == 1, "a 535 spends no more attempts"
    assert "refused the login (AUTH)" in t["last_error"], t
    assert "535" in t["last_error"], t
    assert "wrong-secret" not in t["last_error"]
    assert s.messages() == []
    w.stop()
    assert "wrong-secret" not in w.output()


def test_a_550_fails_the_task_at_once(mdb, smtp_server, workers):
    s = smtp_server(rcpt_code=550)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "nobody@example.com", "text": "x"},
                    max_attempts=5)
    t = finished(mdb, tid, w)
    assert t["state"] == "failed", t
    assert t["attempts"] == 1, "a permanent failure spends no more attempts"
    assert "550" in t["last_error"] and "nobody@example.com" in t["last_error"]
    assert s.messages() == []


def test_a_550_after_data_fails_the_task_at_once(mdb, smtp_server, workers):
    s = smtp_server(data_code=554)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"})
    t = finished(mdb, tid, w)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert "554" in t["last_error"], t


def test_a_4xx_is_retried(mdb, smtp_server, workers):
    s = smtp_server(rcpt_code=451)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=5)
    t = wait_task(mdb, tid, lambda t: t["attempts"] >= 1 and t["last_error"]
                  and t["state"] == "queued", w, "a deferred attempt")
    assert "451" in t["last_error"], t
    assert s.messages() == []


def test_a_server_that_is_down_then_up_gets_the_mail_once(mdb, smtp_server,
                                                         workers):
    s = smtp_server(start=False)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "subject": "patience",
                          "text": "x"}, max_attempts=20)
    t = wait_task(mdb, tid, lambda t: t["attempts"] >= 1 and t["last_error"]
                  and t["state"] == "queued", w, "a failed connection")
    assert "Connection refused" in t["last_error"], t
    s.start()
    retry_now(mdb, tid)
    t = finished(mdb, tid, w)
    assert t["state"] == "succeeded", t
    msgs = s.wait_for(1)
    assert len(msgs) == 1, "delivered exactly once"
    assert msgs[0]["Message-ID"] == f"<pgrunner.{tid}@{MSGID_DOMAIN}>"
    attempts = t["attempts"]
    w.stop()
    assert len(s.messages()) == 1
    assert task(mdb, tid)["attempts"] == attempts


def test_an_outage_longer_than_the_old_schedule_delivers_once(
        mdb, smtp_server, workers):
    """The mail server stays down for longer than the whole schedule of
    the old default (5 attempts, 1 + 2 + 4 + 8 s), then comes back: the
    email kind's policy (here a short one, as set_retry_policy() makes it)
    keeps the task queued, and the message arrives once, with the
    Message-ID it had on every attempt."""
    mdb.query("SELECT pgrunner.set_retry_policy(kind => 'email',"
              " max_attempts => 20, base => interval '1 second',"
              " cap => interval '2 seconds')")
    s = smtp_server(start=False)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "subject": "outage",
                          "text": "x"})
    assert mdb.scalar("SELECT max_attempts FROM pgrunner.tasks"
                      " WHERE id = %s", (tid,)) == 20
    wait_until(lambda: mdb.scalar(
        "SELECT attempts > 5 AND state = 'queued'"
        " AND now() - created_at > interval '16 seconds'"
        " FROM pgrunner.tasks WHERE id = %s", (tid,)),
        timeout=90, what="a queued task, past the old schedule")
    t = task(mdb, tid)
    assert "Connection refused" in t["last_error"], t
    s.start()
    t = finished(mdb, tid, w)
    assert t["state"] == "succeeded", t
    assert t["attempts"] > 5, t
    msgs = s.wait_for(1)
    w.stop()
    msgs = s.messages()
    assert len(msgs) == 1, "delivered exactly once"
    assert msgs[0]["Message-ID"] == f"<pgrunner.{tid}@{MSGID_DOMAIN}>"
    assert msgs[0]["Subject"] == "outage"


def test_a_retry_resends_the_same_message_id(mdb, smtp_server, workers):
    s = smtp_server(data_code=451)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=20)
    wait_task(mdb, tid, lambda t: t["attempts"] >= 1 and t["last_error"]
              and t["state"] == "queued", w, "a deferred attempt")
    s.stop()
    s.start(data_code=None)
    retry_now(mdb, tid)
    assert finished(mdb, tid, w)["state"] == "succeeded"
    (m,) = s.wait_for(1)
    assert m["Message-ID"] == f"<pgrunner.{tid}@{MSGID_DOMAIN}>"


def test_message_id_defaults_to_the_senders_domain(mdb, smtp, workers):
    """Without PGRUNNER_MESSAGE_ID_DOMAIN the Message-ID's domain is the
    sender's, not the worker's host name: every worker (another container,
    another replica) that retries the task sends the same Message-ID."""
    w = start_worker_without_msgid_domain(workers, mdb, smtp)
    default = add_email(mdb, {"to": "a@example.com", "text": "x"})
    own = add_email(mdb, {"to": "b@example.com", "text": "y",
                          "from": "Sales <sales@shop.example.net>"})
    assert finished(mdb, default, w)["state"] == "succeeded"
    assert finished(mdb, own, w)["state"] == "succeeded"
    ids = {m.rcpt_tos[0]: m["Message-ID"] for m in smtp.wait_for(2)}
    assert ids == {"a@example.com": f"<pgrunner.{default}@example.org>",
                   "b@example.com": f"<pgrunner.{own}@shop.example.net>"}


def test_a_hung_server_does_not_hold_the_worker(mdb, smtp_server, workers):
    s = smtp_server(hang=True)
    w = start_worker(workers, mdb, s, PGRUNNER_SMTP_TIMEOUT=1)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=1)
    t = finished(mdb, tid, w)
    assert t["state"] == "failed", t
    assert "did not answer within 1 s" in t["last_error"], t


def test_header_injection_fails_and_sends_nothing(mdb, smtp, workers):
    w = start_worker(workers, mdb, smtp)
    bad = add_email(mdb, {"to": "a@example.com",
                          "subject": "Hi\r\nBcc: x@example.com",
                          "text": "x"})
    t = finished(mdb, bad, w)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert "CR or LF" in t["last_error"], t
    # The worker is fine and the server works: a good task goes through,
    # and it is the only message the server ever saw.
    good = add_email(mdb, {"to": "b@example.com", "text": "ok"})
    assert finished(mdb, good, w)["state"] == "succeeded"
    msgs = smtp.wait_for(1)
    assert [m.rcpt_tos for m in msgs] == [["b@example.com"]]


@pytest.mark.parametrize("payload,reason", [
    ('{"to": 42}', '"to" must be a string or an array of strings'),
    ('{"to": "not-an-address"}', "not a valid email address"),
    ('{"subject": "nobody to send to"}', "no recipient"),
    ('{"to": "a@example.com", "headers": {"X-A": "1\\nX-B: 2"}}',
     "CR or LF"),
])
def test_bad_payloads_fail_with_the_reason(mdb, smtp, workers, payload,
                                           reason):
    w = start_worker(workers, mdb, smtp)
    r = mdb.psql("INSERT INTO pgrunner.tasks (kind, payload) "
                 f"VALUES ('email', '{payload}')")
    assert r.returncode == 0, r.stderr
    tid = mdb.scalar("SELECT max(id) FROM pgrunner.tasks")
    t = finished(mdb, tid, w)
    assert t["state"] == "failed" and t["attempts"] == 1, t
    assert reason in t["last_error"], t
    assert smtp.messages() == [], "the task finished without a connection"


@pytest.mark.parametrize("var,value,reason", [
    ("PGRUNNER_SMTP_HOST", "mail.example.com:2525", "PGRUNNER_SMTP_PORT"),
    ("PGRUNNER_SMTP_HELO", "not a domain", "is not a domain name"),
    ("PGRUNNER_MESSAGE_ID_DOMAIN", "bad_domain!", "is not a domain name"),
    ("PGRUNNER_MAIL_FROM", "not-an-address", "not a valid email address"),
    ("PGRUNNER_MAIL_FROM", "a@example.com\r\nBcc: x@example.com", "CR or LF"),
    ("PGRUNNER_SMTP_PASSWORD", "Sekr3t" * 50, "longer than 255 bytes"),
])
def test_bad_smtp_settings_are_refused_at_start(mdb, var, value, reason):
    """A typo in the SMTP settings stops the worker at once with a one-line
    reason (exit 2) instead of failing every email task later."""
    env = {"PGRUNNER_SMTP_HOST": "127.0.0.1", var: value}
    r = run_pgrunner(["work", "--db", mdb.dsn], env=env, timeout=30)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and var in lines[0] and reason in lines[0], \
        r.stderr
    assert "Sekr3t" not in r.stderr
    assert mdb.scalar("SELECT count(*) FROM pgrunner.workers") == 0


class ScriptedSmtp:
    """A minimal SMTP server on a real socket of 127.0.0.1, for the replies
    aiosmtpd cannot be told to give. `replies` maps "GREETING" or a command
    verb ("EHLO", "HELO", ...) to the reply line to send, or to None to
    close the connection without a word. Other commands get "250 OK",
    DATA "354" and then "250" for the message, QUIT "221". It records the
    verbs it received and counts the messages it accepted."""

    def __init__(self, replies):
        self.replies = replies
        self.verbs = []
        self.messages = 0
        me = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 30

            def handle(self):
                me._session(self.rfile, self.wfile)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0),
                                                      Handler)
        self.server.daemon_threads = True
        self.host, self.port = self.server.server_address
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       daemon=True)
        self.thread.start()

    def _session(self, rfile, wfile):
        def say(line):
            if line is not None:
                wfile.write(line.encode("ascii") + b"\r\n")
            return line is not None

        if not say(self.replies.get("GREETING", "220 scripted ESMTP")):
            return
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().upper().decode("ascii",
                                                                 "replace")
            self.verbs.append(verb)
            if verb == "QUIT":
                say("221 Bye")
                return
            reply = self.replies.get(verb, "354 Go ahead" if verb == "DATA"
                                     else "250 OK")
            if not say(reply):
                return
            if verb == "DATA" and reply.startswith("354"):
                while line not in (b".\r\n", b""):
                    line = rfile.readline()
                done = self.replies.get(".", "250 Accepted")
                if done is not None and done.startswith("2"):
                    self.messages += 1
                if not say(done):
                    return

    def env(self, **extra):
        """Worker environment pointing at this server."""
        e = {"PGRUNNER_SMTP_HOST": self.host,
             "PGRUNNER_SMTP_PORT": str(self.port)}
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted_smtp():
    """Factory: scripted_smtp(**replies) -> a running ScriptedSmtp; every
    one is closed at the end of the test."""
    made = []

    def make(**replies):
        made.append(ScriptedSmtp(replies))
        return made[-1]

    try:
        yield make
    finally:
        for s in made:
            s.close()


@pytest.mark.parametrize("replies,code", [
    ({"GREETING": "554 5.3.2 No SMTP service here"}, "554 5.3.2"),
    ({"EHLO": "550 5.7.1 Client host rejected"}, "550 5.7.1"),
    ({"EHLO": "502 5.5.1 EHLO not implemented",
      "HELO": "554 5.7.1 Go away"}, "554 5.7.1"),
], ids=["greeting", "ehlo", "helo"])
def test_a_5xx_before_mail_fails_the_task_at_once(mdb, scripted_smtp,
                                                  workers, replies, code):
    """Every 5xx reply is permanent, not only those to MAIL, RCPT and
    DATA (SPEC 4)."""
    s = scripted_smtp(**replies)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=5)
    t = finished(mdb, tid, w)
    assert t["state"] == "failed", t
    assert t["attempts"] == 1, "a permanent failure spends no more attempts"
    assert code in t["last_error"], t
    assert "MAIL" not in s.verbs and s.messages == 0


@pytest.mark.parametrize("replies,reason", [
    ({"GREETING": "421 4.3.2 Busy, try again later"}, "421 4.3.2"),
    # libESMTP answers EHLO 502 with HELO; the server then hangs up. The
    # 502 it recovered from does not make the dropped connection permanent.
    ({"EHLO": "502 5.5.1 EHLO not implemented", "HELO": None},
     "closed the connection"),
], ids=["greeting-4xx", "drop-after-recovered-5xx"])
def test_a_4xx_or_a_drop_before_mail_is_retried(mdb, scripted_smtp, workers,
                                                replies, reason):
    s = scripted_smtp(**replies)
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=5)
    t = wait_task(mdb, tid, lambda t: t["attempts"] >= 1 and t["last_error"]
                  and t["state"] == "queued", w, "a failed attempt")
    assert reason in t["last_error"], t
    assert "502 5.5.1" not in t["last_error"], t  # (the port may hold "502")
    assert s.messages == 0


def test_a_5xx_that_helo_recovers_from_does_not_fail_the_task(
        mdb, scripted_smtp, workers):
    s = scripted_smtp(EHLO="502 5.5.1 EHLO not implemented")
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"},
                    max_attempts=1)
    t = finished(mdb, tid, w)
    assert t["state"] == "succeeded", t
    assert s.verbs[:2] == ["EHLO", "HELO"] and s.messages == 1


@pytest.mark.parametrize("where", ["GREETING", "EHLO", "MAIL", "RCPT", "DATA",
                                   "."])
def test_last_error_names_the_servers_reply(mdb, scripted_smtp, workers,
                                            where):
    """Greylisting, wherever the server answers with it: the attempt is
    retried and last_error carries the reply, code, enhanced code and
    text."""
    s = scripted_smtp(**{where: "450 4.7.1 <a@example.com>: greylisted,"
                                " try again in 5 minutes"})
    w = start_worker(workers, mdb, s)
    tid = add_email(mdb, {"to": "a@example.com", "text": "x"})
    t = queued_again(mdb, tid, w)
    assert ("450 4.7.1 <a@example.com>: greylisted, try again in 5 minutes"
            in t["last_error"]), t
    assert s.messages == 0
