"""The stack's integration tests: the worker image running as two or more
replicas against PostgreSQL and the SMTP catcher of docker-compose.yml.

Tasks are added the way a user adds them, with a plain INSERT; what ran is
read back from the database (stack_test.runs, pgrunner.tasks) and from the
catcher's Maildir.
"""

import email
import email.policy
import os
import subprocess
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import query, wait_until

METRICS_PORT = 9187


def psql(sql):
    """Runs sql with the psql client, as a user would, connecting with the
    same DATABASE_URL and PGPASSWORD as the workers; returns its rows."""
    out = subprocess.run(
        ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
         "-d", os.environ["DATABASE_URL"], "-c", sql],
        check=True, capture_output=True, text=True).stdout
    return [line.split("|") for line in out.splitlines() if line]


def insert_record_tasks(db, tokens, sleep=0.0):
    rows = query(db, """
        INSERT INTO pgrunner.tasks (kind, payload)
        SELECT 'record', jsonb_build_object('token', t, 'sleep', %s::float8)
          FROM unnest(%s::text[]) t
        RETURNING id""", (sleep, list(tokens)))
    return [r[0] for r in rows]


def task(db, tid):
    return query(db, """SELECT state, attempts, last_error
                          FROM pgrunner.tasks WHERE id = %s""", (tid,))[0]


def finished(db, ids):
    n = query(db, """SELECT count(*) FROM pgrunner.tasks
                      WHERE id = ANY(%s) AND state IN
                            ('succeeded', 'failed', 'cancelled')""",
              (ids,))[0][0]
    return n == len(ids)


def runs(db, token):
    return query(db, "SELECT worker FROM stack_test.runs WHERE token = %s",
                 (token,))


def sleeping_session(db, stack):
    """The worker session running the one `record` task that is in its
    pg_sleep: (application_name, container id), or None."""
    rows = query(db, """
        SELECT application_name, host(client_addr) FROM pg_stat_activity
         WHERE wait_event = 'PgSleep' AND application_name LIKE 'pgrunner/%'""")
    if len(rows) != 1:
        return None
    name, addr = rows[0]
    return name, stack.container_at(addr)


def http_get(ip, path):
    with urllib.request.urlopen("http://%s:%d%s" % (ip, METRICS_PORT, path),
                                timeout=10) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def test_workers_healthy_and_metrics_parse(full_stack):
    for c in full_stack.workers():
        cid = c["Id"]
        assert full_stack.health(cid) == "healthy"
        ip = full_stack.ip(cid)
        status, _, _ = http_get(ip, "/healthz")
        assert status == 200
        status, ctype, body = http_get(ip, "/metrics")
        assert status == 200
        assert ctype.startswith("text/plain"), ctype
        families = {f.name: f for f in text_string_to_metric_families(body)}
        assert families, "no metric in /metrics:\n" + body
        # The database connection is up, as /healthz said.
        up = families["pgrunner_db_up"].samples
        assert [x.value for x in up] == [1.0], up


def test_inserted_tasks_run_once_each_spread_over_replicas(db, full_stack,
                                                           token):
    tokens = ["spread-%s-%03d" % (token, i) for i in range(120)]
    # One plain INSERT from psql; a little work per task, so that every
    # replica gets a share.
    ids = [int(r[0]) for r in psql("""
        INSERT INTO pgrunner.tasks (kind, payload)
        SELECT 'record', jsonb_build_object(
                 'token', format('spread-%s-%%s', lpad(g::text, 3, '0')),
                 'sleep', 0.05)
          FROM generate_series(0, 119) g
        RETURNING id""" % token)]
    assert len(ids) == 120
    wait_until("120 record tasks finished", lambda: finished(db, ids))

    states = query(db, """SELECT state, attempts, count(*)
                            FROM pgrunner.tasks WHERE id = ANY(%s)
                           GROUP BY 1, 2""", (ids,))
    assert states == [("succeeded", 1, len(ids))]
    rows = query(db, """SELECT token, worker FROM stack_test.runs
                         WHERE token LIKE %s""", ("spread-%s-%%" % token,))
    assert sorted(r[0] for r in rows) == tokens
    workers = {r[1] for r in rows}
    assert all(w.startswith("pgrunner/") for w in workers), workers
    assert len(workers) >= 2, "all tasks ran on one replica: %s" % workers


def test_email_task_reaches_the_catcher(db, full_stack, token):
    subject = "stack test %s" % token
    tid = query(db, """
        INSERT INTO pgrunner.tasks (kind, payload)
        VALUES ('email', jsonb_build_object(
                  'to', %s, 'subject', %s,
                  'text', 'Sent by a pgrunner worker replica.'))
        RETURNING id""", ("rcpt-%s@example.test" % token, subject))[0][0]
    wait_until("email task finished", lambda: finished(db, [tid]))
    assert task(db, tid)[:2] == ("succeeded", 1), task(db, tid)

    maildir = os.environ.get("PGR_STACK_MAILDIR", "/maildir")

    def find():
        for sub in ("new", "cur"):
            d = os.path.join(maildir, sub)
            for name in os.listdir(d) if os.path.isdir(d) else []:
                with open(os.path.join(d, name), "rb") as f:
                    msg = email.message_from_binary_file(
                        f, policy=email.policy.default)
                if msg["Subject"] == subject:
                    return msg
        return None

    msg = wait_until("the message in the catcher's Maildir", find, 30)
    assert msg["To"] == "rcpt-%s@example.test" % token
    assert msg["X-RcptTo"] == "rcpt-%s@example.test" % token
    assert msg["Message-ID"], "no Message-ID"
    assert "Sent by a pgrunner worker replica." in msg.get_body(
        ("plain",)).get_content()


def test_killed_replica_task_finished_once_by_another(db, full_stack, token):
    tid = insert_record_tasks(db, ["kill-" + token], sleep=5)[0]
    name, cid = wait_until("the task in its pg_sleep",
                           lambda: sleeping_session(db, full_stack))
    # docker kill -s KILL: the replica dies in the middle of the task.
    full_stack.docker.kill(cid, "KILL")
    wait_until("the killed container to exit",
               lambda: not full_stack.docker.inspect(cid)["State"]["Running"],
               30)

    wait_until("the task to finish elsewhere", lambda: finished(db, [tid]),
               180)
    st, attempts, _ = task(db, tid)
    assert st == "succeeded", task(db, tid)
    # The killed attempt counted, and only the second one committed.
    assert attempts == 2, task(db, tid)
    done = runs(db, "kill-" + token)
    assert len(done) == 1
    assert done[0][0] != name, "the task's only run is the killed worker's"
    state = full_stack.docker.inspect(cid)["State"]
    assert state["ExitCode"] == 137, state


def test_sigterm_replica_finishes_its_task_and_exits_0(db, full_stack, token):
    tid = insert_record_tasks(db, ["term-" + token], sleep=3)[0]
    name, cid = wait_until("the task in its pg_sleep",
                           lambda: sleeping_session(db, full_stack))
    # docker stop / docker-compose stop: SIGTERM (the image's STOPSIGNAL),
    # SIGKILL only after 60 s.
    full_stack.docker.stop(cid, 60)
    state = full_stack.docker.inspect(cid)["State"]
    assert not state["Running"]
    assert state["ExitCode"] == 0, state
    assert not state["OOMKilled"]

    st, attempts, _ = task(db, tid)
    assert (st, attempts) == ("succeeded", 1), task(db, tid)
    assert runs(db, "term-" + token) == [(name,)]
