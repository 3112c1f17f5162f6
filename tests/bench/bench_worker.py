#!/usr/bin/python3
"""Worker benchmark: throughput, insert-to-start latency and peak memory.

Starts its own PostgreSQL (durable settings: fsync and synchronous_commit
on), migrates a fresh database, then for each concurrency:

  throughput  bulk-insert N noop tasks, start `pgrunner work`, time until
              every task has succeeded (from the first started_at to the
              last finished_at, both taken by the database clock), and read
              the worker's peak RSS (VmHWM) and CPU time before stopping it;
  latency     with a worker idle, insert tasks one at a time every 20 ms
              (autocommit, so each insert is its own durable commit) and
              measure two spans:
                claim    started_at - created_at, database clock: the
                         insert's commit, the NOTIFY, and the claim's start;
                handler  client clock just before the INSERT is sent, to the
                         first statement of a SQL-function task's handler
                         (clock_timestamp() inside it): everything up to the
                         worker thread running the task, as graphile-worker's
                         latency figure in shared/bench/peers measures it.

With --limit it also runs pgbench on the same server with the per-task
transaction alone (BEGIN; lock the row; mark it; COMMIT as one pipeline on
a 2,000,000-row table), the ceiling a one-transaction-per-task worker can
reach on this machine, so figures taken on different days can be compared.

Usage: bench_worker.py [--tasks N] [--latency-tasks N]
                       [--concurrency 8,16,32] [--bin build/pgrunner]
                       [--reps N] [--limit]
Prints one line per figure. Not a test: it asserts nothing.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "support"))

from pgr_fixtures import (PG_BIN, PgServer, run_pgrunner,  # noqa: E402
                          pgrunner_bin)

# The per-task transaction alone, as pgbench runs it for --limit.
LIMIT_SETUP = """
DROP TABLE IF EXISTS limit_jobs;
CREATE TABLE limit_jobs (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                         state text NOT NULL DEFAULT 'queued',
                         payload jsonb NOT NULL DEFAULT '{}');
INSERT INTO limit_jobs (state) SELECT 'queued' FROM generate_series(1, 2000000);
CREATE INDEX limit_jobs_queued ON limit_jobs (id) WHERE state = 'queued';
VACUUM ANALYZE limit_jobs;
CHECKPOINT;
"""
LIMIT_SCRIPT = """\\set id random(1, 2000000)
\\startpipeline
BEGIN;
SELECT id FROM limit_jobs WHERE id = :id FOR UPDATE;
UPDATE limit_jobs SET state = 'done' WHERE id = :id;
COMMIT;
\\endpipeline
"""

# A SQL-function task that notes when its handler began.
LATENCY_SETUP = """
CREATE TABLE IF NOT EXISTS bench_latency (sent float8, began float8);
CREATE OR REPLACE FUNCTION pgrunner_jobs.bench_latency(p jsonb)
RETURNS void LANGUAGE sql AS $$
  INSERT INTO bench_latency
  VALUES ((p->>'sent')::float8, extract(epoch FROM clock_timestamp()))
$$;
"""


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values, p):
    """Nearest-rank percentile of a sorted list."""
    return values[min(len(values) - 1,
                      max(0, int(round(p / 100 * len(values) + 0.5)) - 1))]


def start_worker(dsn, conc, extra=()):
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    return subprocess.Popen(
        [pgrunner_bin(), "work", "--db", dsn, "--concurrency", str(conc),
         "--log-level", "warn"] + list(extra),
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def throughput(pg, db, n, conc):
    c = pg.connect(db)
    cur = c.cursor()
    cur.execute("TRUNCATE pgrunner.tasks")
    cur.execute("VACUUM ANALYZE pgrunner.tasks")
    cur.execute("INSERT INTO pgrunner.tasks (kind) "
                "SELECT 'noop' FROM generate_series(1, %s)", (n,))
    cur.execute("CHECKPOINT")
    w = start_worker(pg.dsn(db), conc)
    t0 = time.monotonic()
    while True:
        # An index probe, not a count: the poll must not compete for CPU.
        cur.execute("SELECT NOT EXISTS (SELECT 1 FROM pgrunner.tasks "
                    "WHERE state IN ('queued', 'running'))")
        if cur.fetchone()[0]:
            break
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"tasks still not done after 600 s")
        time.sleep(0.05)
    rss = peak_rss_kib(w.pid)
    cpu = cpu_seconds(w.pid)
    w.send_signal(signal.SIGTERM)
    rc = w.wait(60)
    cur.execute("SELECT count(*) FILTER (WHERE state = 'succeeded'), "
                "extract(epoch FROM max(finished_at) - min(started_at))"
                " FROM pgrunner.tasks")
    done, secs = cur.fetchone()
    if done != n:
        raise RuntimeError(f"{done}/{n} tasks succeeded")
    secs = float(secs)
    c.close()
    return n / secs, secs, rss, cpu * 1e6 / n, rc


def latency(pg, db, n, conc):
    c = pg.connect(db)
    cur = c.cursor()
    cur.execute("TRUNCATE pgrunner.tasks")
    cur.execute(LATENCY_SETUP)
    cur.execute("TRUNCATE bench_latency")
    w = start_worker(pg.dsn(db), conc)
    time.sleep(1.5)  # registered and idle
    for _ in range(4 * conc):  # warm-up: each connection has run both kinds
        cur.execute("INSERT INTO pgrunner.tasks (kind, payload) VALUES "
                    "('noop', '{}'), ('bench_latency', '{\"sent\": 0}')")
        time.sleep(0.02)
    time.sleep(0.5)
    cur.execute("SELECT coalesce(max(id), 0) FROM pgrunner.tasks")
    first = cur.fetchone()[0]
    cur.execute("TRUNCATE bench_latency")
    for i in range(2 * n):
        # Alternate: noop tasks for the claim span, SQL-function tasks for
        # the handler span, each inserted alone while the worker idles.
        if i % 2 == 0:
            cur.execute("INSERT INTO pgrunner.tasks (kind) VALUES ('noop')")
        else:
            cur.execute("INSERT INTO pgrunner.tasks (kind, payload) "
                        "VALUES ('bench_latency', "
                        "jsonb_build_object('sent', %s::float8))",
                        (time.time(),))
        time.sleep(0.02)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cur.execute("SELECT count(*) FROM pgrunner.tasks WHERE id > %s AND "
                    "state = 'succeeded'", (first,))
        if cur.fetchone()[0] >= 2 * n:
            break
        time.sleep(0.05)
    cur.execute("SELECT extract(epoch FROM started_at - created_at) * 1000 "
                "FROM pgrunner.tasks WHERE id > %s AND kind = 'noop' "
                "AND state = 'succeeded' ORDER BY 1", (first,))
    claim = [float(r[0]) for r in cur.fetchall()]
    cur.execute("SELECT (began - sent) * 1000 FROM bench_latency ORDER BY 1")
    handler = [float(r[0]) for r in cur.fetchall()]
    rss = peak_rss_kib(w.pid)
    w.send_signal(signal.SIGTERM)
    w.wait(60)
    c.close()
    if len(claim) != n or len(handler) != n:
        raise RuntimeError(f"latency: {len(claim)} noop and {len(handler)} "
                           f"handler samples of {n}")
    return claim, handler, rss


# pgrunner's own success mark of a no-op task, alone: every client marks
# 'running' rows of its own (ids client_id, client_id + C, ... from :base),
# as a worker's threads would after their claims, with no claim and no
# worker. Each task needs this statement in a transaction after its claim's,
# so its rate bounds the worker's on the same table. -D n=0 -D c=C.
MARK_SCRIPT = """\\set n :n + 1
\\set id :n * :c + :client_id
SELECT pgrunner.complete_noop(:id, 1, 1);
"""


def pgbench_limit(pg, db, clients, seconds=10, script=LIMIT_SCRIPT,
                  defines=()):
    """tx/s of the per-task transaction alone, one pipeline per task (or
    of `script`, with pgbench -D `defines`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    os.chmod(f.name, 0o644)
    try:
        out = subprocess.run(
            [os.path.join(PG_BIN, "pgbench"), "-h", pg.host, "-p",
             str(pg.port), "-U", pg.user, "-n", "-M", "prepared", "-c",
             str(clients), "-j", "2", "-T", str(seconds), "-f", f.name]
            + [x for d in defines for x in ("-D", d)] + [db],
            check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    for line in out.splitlines():
        if line.startswith("tps = "):
            return float(line.split()[2])
    raise RuntimeError("pgbench printed no tps:\n" + out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=50000)
    ap.add_argument("--latency-tasks", type=int, default=300)
    ap.add_argument("--concurrency", default="8,16,32")
    ap.add_argument("--bin")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--limit", action="store_true",
                    help="also run pgbench with the per-task transaction")
    args = ap.parse_args()
    if args.bin:
        os.environ["PGRUNNER_BIN"] = os.path.abspath(args.bin)
    concs = [int(x) for x in args.concurrency.split(",")]

    pg = PgServer()
    pg.start()
    try:
        admin = pg.connect()
        admin.cursor().execute("CREATE DATABASE bench")
        admin.close()
        r = run_pgrunner(["migrate", "--db", pg.dsn("bench"),
                          "--log-level", "warn"])
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        c = pg.connect("bench")
        cur = c.cursor()
        cur.execute("SHOW synchronous_commit")
        sc = cur.fetchone()[0]
        cur.execute("SHOW fsync")
        fs = cur.fetchone()[0]
        c.close()
        print(f"# pgrunner {pgrunner_bin()}; PostgreSQL on 127.0.0.1, "
              f"fsync={fs} synchronous_commit={sc}; {os.cpu_count()} cores")
        for rep in range(args.reps):
            for conc in concs:
                rate, secs, rss, cpu_us, rc = throughput(pg, "bench",
                                                         args.tasks, conc)
                print(f"throughput concurrency={conc} tasks={args.tasks} "
                      f"seconds={secs:.2f} jobs_per_s={rate:.0f} "
                      f"peak_rss_kib={rss} worker_cpu_us_per_task="
                      f"{cpu_us:.0f} exit={rc}", flush=True)
        claim, handler, rss = latency(pg, "bench", args.latency_tasks,
                                      concs[0])
        for name, lat in (("claim", claim), ("handler", handler)):
            print(f"latency {name} concurrency={concs[0]} tasks={len(lat)} "
                  f"p50_ms={pct(lat, 50):.2f} p95_ms={pct(lat, 95):.2f} "
                  f"p99_ms={pct(lat, 99):.2f} "
                  f"mean_ms={statistics.mean(lat):.2f} peak_rss_kib={rss}",
                  flush=True)
        if args.limit:
            c = pg.connect("bench")
            for stmt in LIMIT_SETUP.split(";"):  # VACUUM: one at a time
                if stmt.strip():
                    c.cursor().execute(stmt)
            c.close()
            for conc in concs:
                tps = pgbench_limit(pg, "bench", conc)
                print(f"limit pgbench one-pipeline-per-task clients={conc} "
                      f"tx_per_s={tps:.0f}", flush=True)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
