#!/usr/bin/python3
"""Worker benchmark: throughput, insert-to-start latency and peak memory.

Starts its own PostgreSQL (durable settings: fsync and synchronous_commit
on), migrates a fresh database, then for each concurrency:

  throughput  bulk-insert N noop tasks, start `pgrunner work`, time until
              every task has succeeded (from the first started_at to the
              last finished_at, both taken by the database clock), and read
              the worker's peak RSS (VmHWM) before stopping it;
  latency     with a worker idle, insert tasks one at a time every 20 ms and
              measure started_at - created_at (the claim's transaction start
              minus the insert's), which covers the insert's commit, the
              NOTIFY, the claim and the hand-off to a thread.

Usage: bench_worker.py [--tasks N] [--latency-tasks N] [--concurrency 8,32]
                       [--bin build/pgrunner]
Prints one line per figure. Not a test: it asserts nothing.
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "support"))

from pgr_fixtures import PgServer, run_pgrunner, pgrunner_bin  # noqa: E402


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return -1


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
        cur.execute("SELECT count(*) FROM pgrunner.tasks "
                    "WHERE state = 'succeeded'")
        done = cur.fetchone()[0]
        if done >= n:
            break
        if time.monotonic() - t0 > 600:
            raise RuntimeError(f"only {done}/{n} tasks done after 600 s")
        time.sleep(0.05)
    rss = peak_rss_kib(w.pid)
    w.send_signal(signal.SIGTERM)
    rc = w.wait(60)
    cur.execute("SELECT extract(epoch FROM max(finished_at) - min(started_at))"
                " FROM pgrunner.tasks")
    secs = float(cur.fetchone()[0])
    c.close()
    return n / secs, secs, rss, rc


def latency(pg, db, n, conc):
    c = pg.connect(db)
    cur = c.cursor()
    cur.execute("TRUNCATE pgrunner.tasks")
    w = start_worker(pg.dsn(db), conc)
    time.sleep(1.5)  # registered and idle
    for _ in range(20):  # warm-up
        cur.execute("INSERT INTO pgrunner.tasks (kind) VALUES ('noop')")
        time.sleep(0.02)
    time.sleep(0.5)
    cur.execute("SELECT coalesce(max(id), 0) FROM pgrunner.tasks")
    first = cur.fetchone()[0]
    for _ in range(n):
        cur.execute("INSERT INTO pgrunner.tasks (kind) VALUES ('noop')")
        time.sleep(0.02)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        cur.execute("SELECT count(*) FROM pgrunner.tasks WHERE id > %s AND "
                    "state = 'succeeded'", (first,))
        if cur.fetchone()[0] >= n:
            break
        time.sleep(0.05)
    cur.execute("SELECT extract(epoch FROM started_at - created_at) * 1000 "
                "FROM pgrunner.tasks WHERE id > %s ORDER BY 1", (first,))
    lat = [float(r[0]) for r in cur.fetchall()]
    rss = peak_rss_kib(w.pid)
    w.send_signal(signal.SIGTERM)
    w.wait(60)
    c.close()

    def pct(p):
        return lat[min(len(lat) - 1, int(round(p / 100 * len(lat) + 0.5)) - 1)]
    return pct(50), pct(95), pct(99), statistics.mean(lat), rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", type=int, default=50000)
    ap.add_argument("--latency-tasks", type=int, default=300)
    ap.add_argument("--concurrency", default="8,32")
    ap.add_argument("--bin")
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    if args.bin:
        os.environ["PGRUNNER_BIN"] = os.path.abspath(args.bin)

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
        for conc in [int(x) for x in args.concurrency.split(",")]:
            for rep in range(args.reps):
                rate, secs, rss, rc = throughput(pg, "bench", args.tasks, conc)
                print(f"throughput concurrency={conc} tasks={args.tasks} "
                      f"seconds={secs:.2f} jobs_per_s={rate:.0f} "
                      f"peak_rss_kib={rss} exit={rc}", flush=True)
        for conc in [int(x) for x in args.concurrency.split(",")][:1]:
            p50, p95, p99, mean, rss = latency(pg, "bench", args.latency_tasks,
                                               conc)
            print(f"latency concurrency={conc} tasks={args.latency_tasks} "
                  f"p50_ms={p50:.2f} p95_ms={p95:.2f} p99_ms={p99:.2f} "
                  f"mean_ms={mean:.2f} peak_rss_kib={rss}", flush=True)
    finally:
        pg.stop()


if __name__ == "__main__":
    main()
