#!/usr/bin/python3
"""Worker throughput in the table states production reaches (issue 11).

bench_worker.py measures a fresh table. This benchmark starts one private,
durable PostgreSQL (fsync and synchronous_commit on, initdb defaults
otherwise), migrates a fresh database, and measures one `pgrunner work
--concurrency C` on noop tasks in each regime below. Every regime starts
from a TRUNCATEd pgrunner.tasks, is set up, CHECKPOINTed, and then a worker
is started:

  small            N_small (20,000) queued, after VACUUM ANALYZE: the
                   baseline every ratio divides by;
  backlog          300,000 queued, after VACUUM ANALYZE;
  retained         1,000,000 succeeded rows (finished_at spread over the
                   last 7 days, ascending with id, as retention keeps them)
                   + N_small queued, after ANALYZE;
  bulk-no-analyze  the worker runs idle on the empty (VACUUM ANALYZEd)
                   table; then 300,000 rows in one INSERT ... SELECT, no
                   ANALYZE; measured from the insert's commit;
  copy-no-analyze  the same with 100,000 rows by psycopg2's
                   copy_expert("COPY pgrunner.tasks (kind) FROM STDIN");
  long-tx          VACUUM ANALYZE of the empty table, then a second session
                   runs BEGIN; SELECT txid_current(); and stays idle in
                   transaction until the regime ends (holding back vacuum);
                   a worker runs 100,000 tasks to completion (their dead
                   versions stay in the table and the claim index); then
                   N_small queued, VACUUM ANALYZE (it removes nothing),
                   CHECKPOINT, and a new worker is measured.

The machine's speed drifts within minutes, and the small regime's 20,000
tasks take only a few seconds, so one small run is a noisy baseline for
regimes measured minutes later. Unless --no-adjacent, the small regime is
run again right before each other regime, and each regime's ratio to that
adjacent run is printed too (ratio_to_small_before_it), next to its ratio
to the first small run.

Tasks/s of a regime, by the database clock: the tasks whose finished_at
lies in [t0, t0 + window] divided by the span covered, where t0 is the
first started_at of the measured tasks (the insert's commit for the
*-no-analyze regimes) and the span is the window, or up to the last
finished_at when the tasks ran out first. The worker is stopped after the
window; big regimes are not run to completion. After each regime every
measured task must be succeeded or still queued (none lost, failed or
stranded in running), and all succeeded when they ran out: else it raises.

--limit also runs pgbench with the per-task transaction alone at the same
concurrency (bench_worker.py's LIMIT_SETUP / LIMIT_SCRIPT, in a database of
its own) right after the small regime, and prints the small regime's ratio
to it. Then, in the same database (migrated), pgbench with pgrunner's own
success mark of a no-op alone (MARK_SCRIPT) on 'running' rows, no claim
and no worker: a task needs that statement in a transaction after its
claim's, so mark / limit bounds small / limit.

The steady phase (issue 11, item 5; skip with --steady-seconds 0): a
producer thread inserts noop tasks every 10 ms at an offered rate of half
the small regime's tasks/s (--offered to override) while a worker runs.
Completions/s over a "before" window (30 s); then a session holding an xid
(BEGIN; SELECT txid_current();) stays idle in transaction for
--steady-seconds (120 s): completions/s during it and pgrunner.tasks'
n_dead_tup at its end (pg_stat_user_tables as read then; the statistics
lag by about a second); then it commits, the producer stops 2 s later, and
drain_seconds_after is the time from the commit until no task is queued or
running (so it is at least about 2 s; "none" if that did not happen within
--drain-timeout). It also prints the rate the producer actually inserted
in each window (inserted_*_per_s), n_dead_tup before the long transaction
and the backlog at its end.

--statements loads pg_stat_statements (a server restart; off by default to
keep the server's defaults) and prints, per regime, the calls and mean time
of the worker's claim statement.

Usage: bench_regimes.py [--bin build/pgrunner] [--concurrency 16]
           [--window 20] [--limit] [--steady-seconds 120] [--offered N]
           [--quick] [--regimes small,backlog,...] [--statements]
Not a test: it asserts nothing about speed.
"""

import argparse
import datetime
import io
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "support"))
sys.path.insert(0, HERE)

from pgr_fixtures import (PgServer, pgrunner_bin,  # noqa: E402
                          pgrunner_env, run_pgrunner)
from bench_worker import (LIMIT_SETUP, MARK_SCRIPT,  # noqa: E402
                          pgbench_limit)

DB = "bench"
LIMIT_DB = "bench_limit"
REGIMES = ["small", "backlog", "retained", "bulk-no-analyze",
           "copy-no-analyze", "long-tx"]

SIZES = {  # default, --quick
    "small": (20000, 20000),
    "backlog": (300000, 100000),
    "retained": (1000000, 200000),
    "bulk": (300000, 100000),
    "copy": (100000, 50000),
    "prerun": (100000, 20000),
}

INSERT_NOOP = ("INSERT INTO pgrunner.tasks (kind) "
               "SELECT 'noop' FROM generate_series(1, %s)")
# Cheap: each arm is an index probe on its partial index (or finds a row at
# once in a sequential scan when the table is full of such rows).
BACKLOG_EMPTY = ("NOT EXISTS (SELECT 1 FROM pgrunner.tasks "
                 "WHERE state = 'queued') AND NOT EXISTS (SELECT 1 FROM "
                 "pgrunner.tasks WHERE state = 'running')")


def secs(td):
    return td.total_seconds()


class Worker:
    """`pgrunner work`, its output in a file, always stopped."""

    def __init__(self, pg, conc, logdir, name):
        self.log_path = os.path.join(logdir, name + ".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [pgrunner_bin(), "work", "--db", pg.dsn(DB), "--concurrency",
             str(conc), "--log-level", "warn", "--shutdown-timeout", "5"],
            env=pgrunner_env(), stdout=self._log, stderr=subprocess.STDOUT)

    def check(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited with {self.proc.returncode}:"
                               f"\n{self.tail()}")

    def tail(self, n=20):
        with open(self.log_path, "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        return "\n".join(lines[-n:])

    def stop(self):
        """SIGTERM, 30 s, then SIGKILL. Returns the exit code (None if it
        had to be killed)."""
        rc = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                rc = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        else:
            rc = self.proc.returncode
        self._log.close()
        return rc


class Producer(threading.Thread):
    """Inserts noop tasks every `period` s so that `rate` tasks/s are
    offered on average (a late tick inserts what is due)."""

    def __init__(self, pg, rate, period=0.01):
        super().__init__(daemon=True)
        self.pg, self.rate, self.period = pg, rate, period
        self.stop_ev = threading.Event()
        self.sent = 0
        self.error = None

    def run(self):
        try:
            c = self.pg.connect(DB)
            cur = c.cursor()
            start = time.monotonic()
            tick = 0
            while not self.stop_ev.is_set():
                due = int(self.rate * (time.monotonic() - start)) - self.sent
                if due > 0:
                    cur.execute(INSERT_NOOP, (due,))
                    self.sent += due
                tick += 1
                self.stop_ev.wait(max(0.0, start + tick * self.period
                                      - time.monotonic()))
            c.close()
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self.stop_ev.set()
        self.join(30)
        if self.is_alive():
            raise RuntimeError("producer did not stop")
        if self.error:
            raise RuntimeError(f"producer failed: {self.error}")


class Bench:
    def __init__(self, args, pg, logdir):
        self.a, self.pg, self.logdir = args, pg, logdir
        self.c = pg.connect(DB)
        self.cur = self.c.cursor()
        self.workers = []
        self.holders = []  # idle-in-transaction sessions
        self.producer = None

    # -- helpers ---------------------------------------------------------
    def q(self, sql, args=None):
        self.cur.execute(sql, args)
        return self.cur.fetchall() if self.cur.description else None

    def one(self, sql, args=None):
        return self.q(sql, args)[0][0]

    def worker(self, name):
        w = Worker(self.pg, self.a.concurrency, self.logdir, name)
        self.workers.append(w)
        return w

    def stop_worker(self, w):
        self.workers.remove(w)
        return w.stop()

    def hold_xid(self):
        """A session idle in transaction holding an xid."""
        h = self.pg.connect(DB, autocommit=False)
        h.cursor().execute("SELECT txid_current()")
        self.holders.append(h)
        return h

    def release(self, h):
        self.holders.remove(h)
        h.commit()
        h.close()

    def close(self):
        if self.producer is not None:
            self.producer.stop_ev.set()
        for w in list(self.workers):
            w.stop()
        for h in self.holders:
            try:
                h.rollback()
                h.close()
            except Exception:
                pass
        self.c.close()

    def fresh(self):
        self.q("TRUNCATE pgrunner.tasks")
        if self.a.statements:
            self.q("SELECT pg_stat_statements_reset()")

    def wait_empty_backlog(self, w, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            w.check()
            if self.one("SELECT " + BACKLOG_EMPTY):
                return True
            time.sleep(0.2)
        return False

    def claim_stats(self):
        if not self.a.statements:
            return ""
        # The claim is the top-level statement that marks tasks running with
        # SKIP LOCKED (recover() and prune() are function calls at top level).
        r = self.q("SELECT sum(calls), sum(total_exec_time) / "
                   "nullif(sum(calls), 0) FROM pg_stat_statements "
                   "WHERE query ILIKE '%%SKIP LOCKED%%' "
                   "AND query ILIKE '%%started_at%%'")[0]
        calls = int(r[0] or 0)
        mean = f"{r[1]:.2f}" if r[1] is not None else "-"
        top = self.q("SELECT calls, total_exec_time, rows, "
                     "left(regexp_replace(query, '\\s+', ' ', 'g'), 70) "
                     "FROM pg_stat_statements "
                     "ORDER BY total_exec_time DESC LIMIT 14")
        for t in top:
            print(f"#   calls={t[0]} total_ms={t[1]:.0f} rows={t[2]} "
                  f"{t[3]}", flush=True)
        return f" claim_calls={calls} claim_mean_ms={mean}"

    # -- one measurement -------------------------------------------------
    def measure(self, name, w, boundary, n, t0=None):
        """Wait for the window (or for the tasks to run out), stop the
        worker, check no task was lost, and return tasks/s. The measured
        tasks are those with id > boundary (n of them). t0: the window's
        start (DB clock) if known; else the first started_at."""
        window = self.a.window
        launch = self.one("SELECT clock_timestamp()")
        hard = time.monotonic() + window + 90
        while True:
            w.check()
            now, first, empty = self.q(
                "SELECT clock_timestamp(), (SELECT started_at FROM "
                "pgrunner.tasks WHERE id = (SELECT min(id) FROM "
                "pgrunner.tasks WHERE id > %s)), " + BACKLOG_EMPTY,
                (boundary,))[0]
            start = t0 or first
            if empty:
                break
            if start is None and secs(now - launch) > window:
                break  # nothing started within a whole window
            if start is not None and secs(now - start) >= window + 0.2:
                break
            if time.monotonic() > hard:
                break
            time.sleep(0.25)
        rc = self.stop_worker(w)
        (total, ok, queued, bad, first, last) = self.q(
            "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'), "
            "count(*) FILTER (WHERE state = 'queued'), "
            "count(*) FILTER (WHERE state NOT IN ('succeeded', 'queued')), "
            "min(started_at), max(finished_at) "
            "FROM pgrunner.tasks WHERE id > %s", (boundary,))[0]
        if total != n or bad:
            raise RuntimeError(
                f"{name}: lost tasks: {total} rows of {n}, {ok} succeeded, "
                f"{queued} queued, {bad} in another state (worker exit {rc})")
        t0 = t0 or first
        if t0 is None or ok == 0:
            return 0.0, 0, 0.0, rc
        end = t0 + datetime.timedelta(seconds=window)
        if queued == 0 and last <= end:
            done, span = ok, secs(last - t0)
        else:
            done = self.one(
                "SELECT count(*) FROM pgrunner.tasks WHERE id > %s AND "
                "state = 'succeeded' AND finished_at BETWEEN %s AND %s",
                (boundary, t0, end))
            span = window
        if queued == 0 and ok != n:
            raise RuntimeError(f"{name}: ran out with {ok}/{n} succeeded")
        return (done / span if span > 0 else 0.0), done, span, rc

    def queued_regime(self, name, n, before=None, vacuum=True):
        """Set up (before(), then n queued, then [VACUUM] ANALYZE), then
        CHECKPOINT and measure a new worker from the first start."""
        if before:
            before()
        boundary = self.one("SELECT coalesce(max(id), 0) FROM pgrunner.tasks")
        self.q(INSERT_NOOP, (n,))
        self.q("VACUUM ANALYZE pgrunner.tasks" if vacuum
               else "ANALYZE pgrunner.tasks")
        self.q("CHECKPOINT")
        if self.a.statements:
            self.q("SELECT pg_stat_statements_reset()")
        w = self.worker(name)
        return self.measure(name, w, boundary, n)

    def bulk_regime(self, name, n, copy):
        """A worker idles on the empty table; one statement adds n rows;
        measured from its commit."""
        self.q("VACUUM ANALYZE pgrunner.tasks")
        self.q("CHECKPOINT")
        w = self.worker(name)
        time.sleep(2)  # registered, claimed nothing, idle
        w.check()
        if self.a.statements:
            self.q("SELECT pg_stat_statements_reset()")
        if copy:
            self.cur.copy_expert("COPY pgrunner.tasks (kind) FROM STDIN",
                                 io.StringIO("noop\n" * n))
        else:
            self.q(INSERT_NOOP, (n,))
        t0 = self.one("SELECT clock_timestamp()")  # just after the commit
        return self.measure(name, w, 0, n, t0=t0)

    # -- regimes -----------------------------------------------------------
    def run_regime(self, name, sizes):
        self.fresh()
        extra = ""
        if name == "small":
            r = self.queued_regime(name, sizes["small"])
        elif name == "backlog":
            r = self.queued_regime(name, sizes["backlog"])
        elif name == "retained":
            m = sizes["retained"]

            def history():
                # finished_at ascending with id over the last 7 days (an
                # hour's margin so that retention deletes none of them).
                self.q("INSERT INTO pgrunner.tasks (kind, state, attempts, "
                       "created_at, started_at, finished_at) "
                       "SELECT 'noop', 'succeeded', 1, f - interval '2 ms', "
                       "f - interval '1 ms', f FROM (SELECT now() - "
                       "(interval '7 days' - interval '1 hour') * "
                       "(1 - g::float8 / %s) AS f "
                       "FROM generate_series(1, %s) g) s", (m, m))
            r = self.queued_regime(name, sizes["small"], before=history,
                                   vacuum=False)
        elif name == "bulk-no-analyze":
            r = self.bulk_regime(name, sizes["bulk"], copy=False)
        elif name == "copy-no-analyze":
            r = self.bulk_regime(name, sizes["copy"], copy=True)
        elif name == "long-tx":
            holder = None

            def prerun():
                nonlocal holder, extra
                self.q("VACUUM ANALYZE pgrunner.tasks")
                holder = self.hold_xid()
                p = sizes["prerun"]
                self.q(INSERT_NOOP, (p,))
                w = self.worker(name + "-prerun")
                self.wait_empty_backlog(w, self.a.prerun_timeout)
                self.stop_worker(w)
                # Over its time budget: what did not run is deleted (dead
                # rows as well) and the line says how many ran.
                self.q("DELETE FROM pgrunner.tasks "
                       "WHERE state <> 'succeeded'")
                done = self.one("SELECT count(*) FROM pgrunner.tasks")
                extra = f" prerun_completed={done}/{p}"
            try:
                r = self.queued_regime(name, sizes["small"], before=prerun)
            finally:
                if holder is not None:
                    self.release(holder)
        else:
            raise ValueError(name)
        rate, done, span, rc = r
        return rate, (f" tasks_in_window={done} span_s={span:.1f}" + extra
                      + self.claim_stats())

    def limit_setup(self):
        admin = self.pg.connect()
        admin.cursor().execute(f"CREATE DATABASE {LIMIT_DB}")
        admin.close()
        r = run_pgrunner(["migrate", "--db", self.pg.dsn(LIMIT_DB),
                          "--log-level", "warn"])
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        c = self.pg.connect(LIMIT_DB)
        for stmt in LIMIT_SETUP.split(";") + [
                # Rows for MARK_SCRIPT to mark: running attempt 1 of
                # worker 1.
                "INSERT INTO pgrunner.tasks (kind, state, attempts,"
                " max_attempts, worker_id, started_at) SELECT 'noop',"
                " 'running', 1, 5, 1, now()"
                " FROM generate_series(1, 400000)",
                "VACUUM ANALYZE pgrunner.tasks", "CHECKPOINT"]:
            if stmt.strip():  # VACUUM: one at a time
                c.cursor().execute(stmt)
        c.close()

    def limit_run(self):
        """(the limit, the no-op's success mark alone), both tx/s."""
        conc = self.a.concurrency
        try:
            limit = pgbench_limit(self.pg, LIMIT_DB, conc)
            mark = pgbench_limit(self.pg, LIMIT_DB, conc, script=MARK_SCRIPT,
                                 defines=("n=0", f"c={conc}"))
            return limit, mark
        finally:
            admin = self.pg.connect()
            admin.cursor().execute(
                f"DROP DATABASE IF EXISTS {LIMIT_DB} WITH (FORCE)")
            admin.close()

    # -- steady load with a long transaction -------------------------------
    def steady(self, offered):
        a = self.a
        self.fresh()
        self.q("VACUUM ANALYZE pgrunner.tasks")
        self.q("CHECKPOINT")
        w = self.worker("steady")
        time.sleep(1.5)
        self.producer = Producer(self.pg, offered)
        self.producer.start()
        time.sleep(a.warmup)

        def window(seconds):
            t_a = self.one("SELECT clock_timestamp()")
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                w.check()
                if not self.producer.is_alive():
                    self.producer.stop()
                time.sleep(min(0.5, max(0.0, end - time.monotonic())))
            return t_a, self.one("SELECT clock_timestamp()")

        def dead():
            return self.one("SELECT n_dead_tup FROM pg_stat_user_tables "
                            "WHERE relid = 'pgrunner.tasks'::regclass")

        b0, b1 = window(a.before_seconds)
        dead_before = dead()
        holder = self.hold_xid()
        try:
            d0, d1 = window(a.steady_seconds)
            dead_end = dead()
            backlog_end = self.one(
                "SELECT count(*) FROM pgrunner.tasks "
                "WHERE state IN ('queued', 'running')")
        finally:
            self.release(holder)
        tx_end = self.one("SELECT clock_timestamp()")
        time.sleep(2)
        self.producer.stop()
        produced = self.producer.sent
        self.producer = None
        drained = None
        if self.wait_empty_backlog(w, a.drain_timeout):
            drained = secs(self.one("SELECT clock_timestamp()") - tx_end)
        rc = self.stop_worker(w)
        total, ok, queued, bad = self.q(
            "SELECT count(*), count(*) FILTER (WHERE state = 'succeeded'), "
            "count(*) FILTER (WHERE state = 'queued'), count(*) FILTER "
            "(WHERE state NOT IN ('succeeded', 'queued')) "
            "FROM pgrunner.tasks")[0]
        if total != produced or bad or (drained is not None
                                        and ok != produced):
            raise RuntimeError(
                f"steady: lost tasks: {total} rows of {produced} produced, "
                f"{ok} succeeded, {queued} queued, {bad} in another state "
                f"(worker exit {rc})")

        def rate(t_a, t_b, col="finished_at"):
            n = self.one(f"SELECT count(*) FROM pgrunner.tasks WHERE {col} "
                         "BETWEEN %s AND %s", (t_a, t_b))
            return n / secs(t_b - t_a)
        return dict(offered=offered, before=rate(b0, b1),
                    during=rate(d0, d1), ins_before=rate(b0, b1, "created_at"),
                    ins_during=rate(d0, d1, "created_at"),
                    dead_before=dead_before,
                    dead_end=dead_end, backlog_end=backlog_end,
                    drained=drained)


def main():
    ap = argparse.ArgumentParser(
        description="pgrunner throughput per production regime (issue 11)")
    ap.add_argument("--bin", help="pgrunner binary (else $PGRUNNER_BIN, "
                    "build-asan/pgrunner, build/pgrunner)")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--window", type=float, help="seconds measured per "
                    "regime (20; --quick 10)")
    ap.add_argument("--limit", action="store_true",
                    help="also run pgbench with the per-task transaction")
    ap.add_argument("--regimes", default=",".join(REGIMES),
                    help="comma-separated subset (small always runs)")
    ap.add_argument("--steady-seconds", type=float,
                    help="the long transaction of the steady phase (120; "
                    "--quick 30; 0 skips the phase)")
    ap.add_argument("--before-seconds", type=float,
                    help="the steady phase's window before it (30; "
                    "--quick 10)")
    ap.add_argument("--offered", type=float,
                    help="tasks/s offered in the steady phase (half the "
                    "small regime's)")
    ap.add_argument("--drain-timeout", type=float,
                    help="longest wait for the backlog to drain (90; "
                    "--quick 60)")
    ap.add_argument("--prerun-timeout", type=float,
                    help="time budget of long-tx's pre-run (90; --quick 30)")
    ap.add_argument("--quick", action="store_true",
                    help="smaller tables and windows, for a smoke run")
    ap.add_argument("--statements", action="store_true",
                    help="load pg_stat_statements and print claim costs")
    ap.add_argument("--no-adjacent", action="store_true",
                    help="skip the small run before each other regime")
    a = ap.parse_args()
    if a.bin:
        os.environ["PGRUNNER_BIN"] = os.path.abspath(a.bin)
    qi = 1 if a.quick else 0
    defaults = dict(window=(20, 10), steady_seconds=(120, 30),
                    before_seconds=(30, 10), drain_timeout=(90, 60),
                    prerun_timeout=(90, 30))
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v[qi])
    a.warmup = 5 if not a.quick else 3
    sizes = {k: v[qi] for k, v in SIZES.items()}
    regimes = [r for r in a.regimes.split(",") if r]
    for r in regimes:
        if r not in REGIMES:
            ap.error(f"unknown regime {r!r} (of {', '.join(REGIMES)})")
    regimes = ["small"] + [r for r in REGIMES if r in regimes
                           and r != "small"]

    def on_term(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)

    pg = PgServer()
    logdir = tempfile.mkdtemp(prefix="pgr-bench-regimes-")
    bench = None
    try:
        pg.start()
        if a.statements:
            with open(os.path.join(pg.data, "postgresql.conf"), "a") as f:
                f.write("shared_preload_libraries = 'pg_stat_statements'\npg_stat_statements.track = all\n")
            pg.pg_ctl("restart", "-w", "-t", "60")
        admin = pg.connect()
        admin.cursor().execute(f"CREATE DATABASE {DB}")
        admin.close()
        r = run_pgrunner(["migrate", "--db", pg.dsn(DB), "--log-level",
                          "warn"])
        if r.returncode != 0:
            raise RuntimeError(r.stderr)
        bench = Bench(a, pg, logdir)
        if a.statements:
            bench.q("CREATE EXTENSION pg_stat_statements")
        fs = bench.one("SHOW fsync")
        sc = bench.one("SHOW synchronous_commit")
        print(f"# pgrunner {pgrunner_bin()}; PostgreSQL "
              f"{bench.one('SHOW server_version')} on 127.0.0.1, fsync={fs} "
              f"synchronous_commit={sc}; {os.cpu_count()} cores; "
              f"concurrency={a.concurrency} window_s={a.window:g}; sizes "
              + " ".join(f"{k}={v}" for k, v in sizes.items()), flush=True)

        if a.limit:
            bench.limit_setup()
        results = []
        limit = None
        for name in regimes:
            adjacent = None
            if name != "small" and not a.no_adjacent:
                adjacent, _ = bench.run_regime("small", sizes)
                print(f"regime=small(again) tasks_per_s={adjacent:.0f}",
                      flush=True)
            rate, extra = bench.run_regime(name, sizes)
            results.append((name, rate, adjacent))
            base = results[0][1]
            ratio = f"{rate / base:.2f}" if base > 0 else "-"
            if adjacent:
                extra = f" ratio_to_small_before_it={rate / adjacent:.2f}" \
                    + extra
            print(f"regime={name} tasks_per_s={rate:.0f} "
                  f"ratio_to_small={ratio}{extra}", flush=True)
            if name == "small" and a.limit:
                limit, mark = bench.limit_run()
        base = results[0][1]
        if limit is not None:
            print(f"small_to_limit ratio={base / limit:.2f} "
                  f"limit_tx_per_s={limit:.0f} concurrency={a.concurrency}",
                  flush=True)
            print(f"mark_alone_to_limit ratio={mark / limit:.2f} "
                  f"mark_tx_per_s={mark:.0f} (the no-op's success mark "
                  f"alone; small / mark = {base / mark:.2f})", flush=True)
        print()
        print(f"| regime (`--concurrency {a.concurrency}`) | tasks/s "
              f"| ratio to small | small run just before it (tasks/s) "
              f"| ratio to that |")
        print("|---|---|---|---|---|")
        for name, rate, adjacent in results:
            ratio = f"{rate / base:.2f}" if base > 0 else "-"
            adj = (f"{adjacent:.0f} | {rate / adjacent:.2f}" if adjacent
                   else "- | -")
            print(f"| {name} | {rate:.0f} | {ratio} | {adj} |")
        if limit is not None:
            print(f"| pgbench limit, {a.concurrency} clients (tx/s) "
                  f"| {limit:.0f} | small / limit = {base / limit:.2f} "
                  f"| | |")
            print(f"| pgbench, the no-op's success mark alone (tx/s) "
                  f"| {mark:.0f} | mark / limit = {mark / limit:.2f} | | |")
        print(flush=True)

        if a.steady_seconds > 0:
            offered = a.offered if a.offered else base / 2
            if offered <= 0:
                raise RuntimeError("no offered rate: the small regime ran "
                                   "nothing; give --offered")
            s = bench.steady(offered)
            ratio = s["during"] / s["before"] if s["before"] > 0 else 0
            drained = (f"{s['drained']:.1f}" if s["drained"] is not None
                       else "none")
            print(f"steady offered_per_s={s['offered']:.0f} "
                  f"before_per_s={s['before']:.0f} "
                  f"during_per_s={s['during']:.0f} during_ratio={ratio:.2f} "
                  f"dead_tuples_at_end={s['dead_end']} "
                  f"drain_seconds_after={drained} "
                  f"long_tx_s={a.steady_seconds:g} "
                  f"dead_tuples_before={s['dead_before']} "
                  f"backlog_at_tx_end={s['backlog_end']} "
                  f"inserted_before_per_s={s['ins_before']:.0f} "
                  f"inserted_during_per_s={s['ins_during']:.0f}", flush=True)
            print()
            print("| offered/s | before/s | during/s | during ratio "
                  "| dead tuples at end | drain s after |")
            print("|---|---|---|---|---|---|")
            print(f"| {s['offered']:.0f} | {s['before']:.0f} "
                  f"| {s['during']:.0f} | {ratio:.2f} | {s['dead_end']} "
                  f"| {drained} |", flush=True)
    finally:
        if bench is not None:
            bench.close()
        pg.stop()
        import shutil
        shutil.rmtree(logdir, ignore_errors=True)


if __name__ == "__main__":
    main()
