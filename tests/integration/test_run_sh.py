"""./run.sh, the README's first command, with nothing configured: it starts
the embedded PostgreSQL and a local mail catcher (aiosmtpd writing a
Maildir), and the README's first email example delivers a real message.
With PGRUNNER_SMTP_HOST set it sends there instead and starts no catcher.

The embedded data go to a temporary folder (PGRUNNER_DATA_DIR) on free
ports, and the binary under test is used (PGRUNNER_BIN) rather than a new
build; everything run.sh started is stopped at the end."""

import email
import email.policy
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile

import pytest

from pgr_fixtures import (PG_BIN, ROOT, free_port, pgrunner_bin,
                          pgrunner_env, wait_until)

README = os.path.join(ROOT, "README.md")


def readme_email_sql():
    """The SQL of the README's first psql one-liner that adds an email."""
    with open(README) as f:
        for line in f:
            if line.startswith("psql ") and "'email'" in line:
                argv = shlex.split(line)
                return argv[argv.index("-c") + 1]
    raise AssertionError("the README has no psql one-liner adding an email")


class RunSh:
    def __init__(self, data_dir, env, log_path):
        self.data_dir = data_dir
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [os.path.join(ROOT, "run.sh"), "--poll-interval", "200"],
            env=env, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)

    def output(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def stop(self):
        """SIGTERM the worker (run.sh exec'ed it); return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        finally:
            self._log.close()


@pytest.fixture
def run_sh_env(tmp_path):
    """Environment for ./run.sh with nothing configured but a private data
    folder and ports; stops what run.sh left running afterwards."""
    # The folder must be reachable by the postgres user (run.sh runs the
    # server as postgres when root): directly under /tmp.
    data_dir = tempfile.mkdtemp(prefix="pgr-run-sh-")
    os.chmod(data_dir, 0o755)
    env = pgrunner_env({"PGRUNNER_DATA_DIR": data_dir,
                        "PGRUNNER_PG_PORT": str(free_port()),
                        "PGRUNNER_CATCHER_PORT": str(free_port()),
                        "PGRUNNER_BIN": pgrunner_bin()})
    for k in ("PGHOST", "PGPORT", "PGDATABASE", "PGUSER"):
        env.pop(k, None)
    try:
        yield data_dir, env
    finally:
        pidfile = os.path.join(data_dir, "smtp.pid")
        if os.path.exists(pidfile):
            try:
                os.kill(int(open(pidfile).read()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
        data = os.path.join(data_dir, "data")
        if os.path.exists(os.path.join(data, "postmaster.pid")):
            cmd = [os.path.join(PG_BIN, "pg_ctl"), "-D", data, "-m", "fast",
                   "-w", "stop"]
            if os.geteuid() == 0:
                cmd = ["runuser", "-u", "postgres", "--"] + cmd
            subprocess.run(cmd, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        shutil.rmtree(data_dir, ignore_errors=True)


def maildir_messages(maildir):
    new = os.path.join(maildir, "new")
    if not os.path.isdir(new):
        return []
    out = []
    for name in sorted(os.listdir(new)):
        with open(os.path.join(new, name), "rb") as f:
            out.append(email.message_from_binary_file(
                f, policy=email.policy.default))
    return out


def psql(url, sql):
    r = subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", url, "-c",
                        sql], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def test_run_sh_delivers_the_readme_email_to_a_local_catcher(
        run_sh_env, smtp, tmp_path):
    data_dir, env = run_sh_env
    run = RunSh(data_dir, env, tmp_path / "run-sh.out")
    try:
        wait_until(lambda: "worker starting" in run.output()
                   or run.proc.poll() is not None, timeout=180,
                   what="./run.sh to start a worker")
        out = run.output()
        assert run.proc.poll() is None, out
        maildir = os.path.join(data_dir, "mail")
        # It says where mail lands and how to read it.
        assert f"{maildir}/new/" in out, out
        assert "read them with" in out, out
        url = re.search(r"using the embedded PostgreSQL: (\S+)", out).group(1)
        psql(url, readme_email_sql())
        msgs = wait_until(lambda: maildir_messages(maildir), timeout=60,
                          what="the README's email in the Maildir")
        assert len(msgs) == 1, msgs
        m = msgs[0]
        assert m["To"] == "ada@example.com"
        assert m["Subject"] == "Hello"
        assert m["From"] == "pgrunner@localhost"
        assert m.get_content().strip() == "It works."
        assert run.stop() == 0, run.output()

        # With PGRUNNER_SMTP_HOST set, that server gets the mail and no
        # catcher is involved (the embedded PostgreSQL is reused).
        catcher_pid = open(os.path.join(data_dir, "smtp.pid")).read()
        os.kill(int(catcher_pid), signal.SIGTERM)
        os.unlink(os.path.join(data_dir, "smtp.pid"))
        env2 = dict(env, PGRUNNER_MAIL_FROM="app@example.org", **smtp.env())
        run = RunSh(data_dir, env2, tmp_path / "run-sh-2.out")
        wait_until(lambda: "worker starting" in run.output()
                   or run.proc.poll() is not None, timeout=180,
                   what="./run.sh to start a worker again")
        out = run.output()
        assert f"email goes to 127.0.0.1:{smtp.port}" in out, out
        assert not os.path.exists(os.path.join(data_dir, "smtp.pid")), out
        psql(url, readme_email_sql())
        (sent,) = smtp.wait_for(1)
        assert sent.rcpt_tos == ["ada@example.com"]
        assert sent["From"] == "app@example.org"
        assert len(maildir_messages(maildir)) == 1
    finally:
        run.stop()
