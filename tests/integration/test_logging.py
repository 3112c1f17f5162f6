"""Logging (SPEC section 7): one file for every process's lines, each line
whole; nothing lost at exit; SIGHUP reopens; hostile clients are harmless."""

import json
import os
import re
import signal
import socket
import stat
import time

import pytest

from pgr_fixtures import run_pgrunner, wait_until

PAIR = re.compile(r'([A-Za-z_][A-Za-z0-9_.-]*)=("(?:[^"\\]|\\.)*"|[^ ]*)')


def logfmt(line):
    """Parse one logfmt line strictly: the whole line must be key=value
    pairs separated by single spaces."""
    out = {}
    pos = 0
    while pos < len(line):
        m = PAIR.match(line, pos)
        assert m, f"not logfmt at {pos}: {line!r}"
        k, v = m.group(1), m.group(2)
        if v.startswith('"'):
            v = json.loads(v)
        out[k] = v
        pos = m.end()
        if pos < len(line):
            assert line[pos] == " ", f"bad separator in {line!r}"
            pos += 1
    return out


def read_lines(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data == b"" or data.endswith(b"\n"), "the file ends with a whole line"
    return data.decode("utf-8").splitlines()


def records(path):
    return [logfmt(l) for l in read_lines(path)]


def worker_ready(logpath):
    def ready():
        if not os.path.exists(logpath):
            return False
        return any(r.get("msg") == "worker registered"
                   for r in records(logpath))
    return ready


def test_worker_and_add_share_one_file(mdb, workers, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    logfile = d / "pgrunner.log"
    w = workers(mdb, "--log-dir", str(d))
    wait_until(worker_ready(logfile), what="worker registered in the log file")
    sock = d / "pgrunner.sock"
    st = os.stat(sock)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, "the socket is private"

    r = run_pgrunner(["add", "noop", "--db", mdb.dsn, "--log-dir", str(d)])
    assert r.returncode == 0, r.stderr
    tid = r.stdout.strip()

    def has_all():
        recs = records(logfile)
        msgs = {(x.get("msg"), x.get("proc")) for x in recs
                if x.get("task") == tid}
        return {("task added", "add"), ("task started", "worker"),
                ("task succeeded", "worker")} <= msgs
    wait_until(has_all, what="add's and the worker's lines for the task")
    assert w.stop() == 0
    for rec in records(logfile):
        assert {"ts", "level", "proc", "pid", "msg"} <= set(rec), rec
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
    added = [x for x in records(logfile) if x.get("msg") == "task added"][0]
    assert added["kind"] == "noop" and added["level"] == "info"
    done = [x for x in records(logfile) if x.get("msg") == "task succeeded"
            and x.get("task") == tid][0]
    assert done["kind"] == "noop" and done["queue"] == "default"
    assert done["attempt"] == "1" and "duration_ms" in done
    assert int(done["pid"]) == w.pid


def test_commands_append_themselves_when_no_worker_listens(mdb, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    for _ in range(3):
        r = run_pgrunner(["add", "noop", "--db", mdb.dsn, "--log-dir", str(d)])
        assert r.returncode == 0, r.stderr
    recs = records(d / "pgrunner.log")
    assert [x["msg"] for x in recs].count("task added") == 3


def test_every_record_is_written_before_exit(mdb, workers, tmp_path):
    n = 20000
    d = tmp_path / "logs"
    d.mkdir()
    mdb.query("INSERT INTO pgrunner.tasks (kind) "
              "SELECT 'noop' FROM generate_series(1, %s)", (n,))
    w = workers(mdb, "--log-dir", str(d), "--concurrency", "8")
    wait_until(lambda: mdb.scalar("SELECT count(*) FROM pgrunner.tasks "
                                  "WHERE state = 'succeeded'") == n,
               timeout=300, interval=0.2, what="20,000 tasks done")
    assert w.stop() == 0
    lines = read_lines(d / "pgrunner.log")
    ok = {logfmt(l)["task"] for l in lines if 'msg="task succeeded"' in l}
    ids = {str(r[0]) for r in mdb.query("SELECT id FROM pgrunner.tasks")}
    assert ok == ids, f"{len(ids - ok)} task succeeded lines missing"


def test_sighup_reopens_the_file(mdb, workers, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    logfile = d / "pgrunner.log"
    w = workers(mdb, "--log-dir", str(d))
    wait_until(worker_ready(logfile), what="worker registered")
    os.rename(logfile, d / "pgrunner.log.1")
    w.signal(signal.SIGHUP)
    wait_until(lambda: os.path.exists(logfile), what="a new log file")
    tid = run_pgrunner(["add", "noop", "--db", mdb.dsn]).stdout.strip()
    wait_until(lambda: any(x.get("msg") == "task succeeded" and
                           x.get("task") == tid for x in records(logfile)),
               what="new lines in the new file")
    old = read_lines(d / "pgrunner.log.1")
    assert not any(f"task={tid} " in l for l in old)
    assert w.stop() == 0


def test_garbage_on_the_socket_harms_nothing(mdb, workers, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    logfile = d / "pgrunner.log"
    w = workers(mdb, "--log-dir", str(d))
    wait_until(worker_ready(logfile), what="worker registered")
    payloads = [b"\x00\xff\xfe garbage\n", b"not json at all\n",
                b'{"msg": 5}\n', b"x" * 200000 + b"\n",
                b'{"ts":"2026-01-01T00:00:00.000Z","level":"info","msg":"half',
                b"\n\n\r\n"]
    for p in payloads:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(d / "pgrunner.sock"))
        try:
            s.sendall(p)
        except OSError:
            pass
        s.close()
    tid = run_pgrunner(["add", "noop", "--db", mdb.dsn, "--log-dir",
                        str(d)]).stdout.strip()
    wait_until(lambda: any(x.get("msg") == "task succeeded" and
                           x.get("task") == tid for x in records(logfile)),
               what="the worker still logging")
    assert w.alive()
    for l in read_lines(logfile):
        logfmt(l)  # every line whole and parseable
        assert "garbage" not in l and "half" not in l
    assert w.stop() == 0


def test_json_format_lines_parse(mdb, workers, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    logfile = d / "pgrunner.log"
    w = workers(mdb, "--log-dir", str(d), "--log-format", "json")

    def registered():
        if not os.path.exists(logfile):
            return False
        return any(json.loads(l).get("msg") == "worker registered"
                   for l in read_lines(logfile))
    wait_until(registered, what="worker registered")
    r = run_pgrunner(["add", "noop", "--db", mdb.dsn, "--log-dir", str(d)])
    tid = int(r.stdout)

    def done():
        return any(json.loads(l).get("msg") == "task succeeded" and
                   json.loads(l).get("task") == tid
                   for l in read_lines(logfile))
    wait_until(done, what="task succeeded as JSON")
    assert w.stop() == 0
    for l in read_lines(logfile):
        rec = json.loads(l)
        assert {"ts", "level", "proc", "pid", "msg"} <= set(rec)
        assert isinstance(rec["pid"], int)
    ok = [json.loads(l) for l in read_lines(logfile)
          if json.loads(l).get("task") == tid]
    assert any(x["msg"] == "task added" and x["proc"] == "add" for x in ok)
    s = [x for x in ok if x["msg"] == "task succeeded"][0]
    assert isinstance(s["duration_ms"], int) and s["attempt"] == 1


def test_a_second_worker_shares_the_directory_without_stealing_it(
        mdb, workers, tmp_path):
    """A second worker on the same --log-dir leaves the first one's socket
    alone and sends its lines to it: one file holds both workers' lines."""
    d = tmp_path / "logs"
    d.mkdir()
    w1 = workers(mdb, "--log-dir", str(d))
    wait_until(worker_ready(d / "pgrunner.log"), what="worker registered")
    ino = os.stat(d / "pgrunner.sock").st_ino
    w2 = workers(mdb, "--log-dir", str(d))
    wait_until(lambda: {x.get("pid") for x in records(d / "pgrunner.log")
                        if x.get("msg") == "worker registered"}
               >= {str(w1.pid), str(w2.pid)},
               what="both workers' lines in the one file")
    assert w1.alive() and w2.alive()
    assert os.stat(d / "pgrunner.sock").st_ino == ino, "socket replaced"
    assert w2.stop() == 0
    assert w1.stop() == 0


def test_a_stale_socket_is_replaced(mdb, workers, tmp_path):
    d = tmp_path / "logs"
    d.mkdir()
    w1 = workers(mdb, "--log-dir", str(d))
    wait_until(worker_ready(d / "pgrunner.log"), what="worker registered")
    w1.kill()  # SIGKILL leaves the socket file behind
    assert os.path.exists(d / "pgrunner.sock")
    w2 = workers(mdb, "--log-dir", str(d))
    wait_until(lambda: sum(1 for x in records(d / "pgrunner.log")
                           if x.get("msg") == "worker registered") >= 2,
               what="the second worker serving the same directory")
    assert w2.stop() == 0
