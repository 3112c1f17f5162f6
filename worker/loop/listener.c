/*
 * listener.c - what the loop does with its claim connection: LISTEN,
 * notifications, registration, claiming tasks, wake-up timers and giving
 * back tasks a lost claim left running (heartbeat and retention run on the
 * other connection: janitor.c).
 *
 * Thread: LOOP THREAD ONLY. Every query goes through pgconn.c's
 * nonblocking queue.
 *
 * A notification is a hint, not a delivery: after every (re)connect we
 * LISTEN again, register, and claim whatever is due; a fallback poll covers
 * notifications lost while the connection was down. The claim also returns
 * how long until the next queued task of our queues is due, which arms a
 * one-shot timer, so a delayed task starts on time without busy polling.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/migrations.h"
#include "connerr.h"
#include "health.h"
#include "log.h"
#include "loop/internal.h"
#include "metrics.h"

/*
 * $1 worker id, $2 queue names, $3 per-queue limits, $4 total, and per
 * queue a cursor: $5 priority, $6 run_at (as text), $7 id of the last task
 * this worker claimed from that queue, or the front of the queue.
 *
 * Every part is an index range that cannot grow with the table, whatever
 * the statistics say (the plan is generic: see setup_session):
 *   - per queue, two ordered scans of tasks_claim_idx, each under its LIMIT:
 *     tasks more urgent than the cursor's priority (they may arrive at any
 *     time), then the tasks after the cursor. The cursor is what keeps the
 *     claim cheap while something else holds back vacuum: the entries of
 *     the tasks we claimed before it stay in the index, dead but not yet
 *     removable, and a scan from the front would visit each of them;
 *   - the UPDATE finds its rows by primary key (= ANY of an array), never
 *     by a join that the planner may turn into a scan of the whole table;
 *   - the wake-up time is, per queue, the first entry of tasks_delayed_idx
 *     after now() (a task due later than its insertion has one; see 0005),
 *     or when a rate limit lets the next task start;
 *   - tasks waiting behind another of their serial key (serial_held) are
 *     not in tasks_claim_idx at all (0015);
 *   - queues with a row in pgrunner.queue_limits (0015): claim_limits
 *     locks those rows and cuts each queue's LIMIT to what max_running,
 *     the rate and a pause allow; lu records what was taken in the same
 *     rows. Without such a row it is one look-up in that small table.
 * UPDATE ... RETURNING has no order of its own, so the rows are sorted by
 * priority, run_at and id before they are handed out. Column 10 says which
 * scan found the row (2: after the cursor). The last row (id NULL) carries
 * the milliseconds until the next future task of our queues.
 */
static const char claim_sql[] =
    "WITH q AS ("
    "  SELECT * FROM unnest($2::text[], $3::int[], $5::int[],"
    "                       $6::timestamptz[], $7::bigint[])"
    "           AS q(name, lim, cp, cr, ci)"
    "), lm AS MATERIALIZED ("
    "  SELECT m.* FROM pgrunner.claim_limits($2::text[], $3::int[]) m"
    "   WHERE EXISTS (SELECT 1 FROM pgrunner.queue_limits l"
    "                  WHERE l.queue = ANY ($2::text[]))"
    "), ql AS ("
    "  SELECT q.name, least(q.lim, coalesce(lm.allow, q.lim)) AS lim,"
    "         q.cp, q.cr, q.ci"
    "    FROM q LEFT JOIN lm ON lm.queue = q.name"
    "), c AS ("
    "  SELECT x.id, x.scan, x.priority, x.run_at"
    "    FROM ql AS q CROSS JOIN LATERAL ("
    "    SELECT * FROM ("
    "      SELECT * FROM (SELECT t.id, 1 AS scan, t.priority, t.run_at"
    "         FROM pgrunner.tasks t"
    "        WHERE t.state = 'queued' AND NOT t.serial_held"
    "          AND t.queue = q.name"
    "          AND t.priority < q.cp AND t.run_at <= now()"
    "        ORDER BY t.priority, t.run_at, t.id"
    "        LIMIT q.lim FOR UPDATE SKIP LOCKED) b1"
    "      UNION ALL"
    "      SELECT * FROM (SELECT t.id, 2 AS scan, t.priority, t.run_at"
    "         FROM pgrunner.tasks t"
    "        WHERE t.state = 'queued' AND NOT t.serial_held"
    "          AND t.queue = q.name"
    "          AND (t.priority, t.run_at, t.id) > (q.cp, q.cr, q.ci)"
    "          AND t.run_at <= now()"
    "        ORDER BY t.priority, t.run_at, t.id"
    "        LIMIT q.lim FOR UPDATE SKIP LOCKED) b2"
    "    ) b LIMIT q.lim"
    "  ) x"
    "  ORDER BY x.priority, x.run_at, x.id LIMIT $4"
    "), u AS ("
    "  UPDATE pgrunner.tasks t SET state = 'running',"
    "         attempts = t.attempts + 1, started_at = now(), worker_id = $1,"
    "         finished_at = NULL"
    "   WHERE t.id = ANY (ARRAY(SELECT c.id FROM c))"
    "  RETURNING t.id, t.queue, t.kind, t.payload::text, t.attempts,"
    "            t.max_attempts, t.timeout_seconds, t.priority,"
    "            t.run_at"
    "), lu AS ("
    "  UPDATE pgrunner.queue_limits l"
    "     SET running_ids = CASE WHEN m.running IS NOT NULL"
    "                            THEN m.running || s.ids END,"
    "         rate_base = coalesce(m.rate_base, l.rate_base),"
    "         rate_counts = CASE WHEN m.rate_slot IS NULL THEN l.rate_counts"
    "                       ELSE m.rate_counts[:m.rate_slot - 1]"
    "                            || (m.rate_counts[m.rate_slot] + s.n)"
    "                            || m.rate_counts[m.rate_slot + 1:] END"
    "    FROM lm m, (SELECT u.queue, array_agg(u.id) AS ids, count(*)::int AS n"
    "                  FROM u GROUP BY u.queue) s"
    "   WHERE l.queue = m.queue AND s.queue = m.queue"
    ") "
    "SELECT id, queue, kind, payload, attempts, max_attempts,"
    "       timeout_seconds, priority, NULL::float8, run_at::text, scan "
    "  FROM (SELECT u.*, c.scan FROM u JOIN c ON c.id = u.id"
    "         ORDER BY u.priority, u.run_at, u.id) s "
    "UNION ALL "
    "SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    "       ceil(extract(epoch FROM least((SELECT min(n.run_at) FROM q"
    "                                 CROSS JOIN LATERAL ("
    "                                  SELECT t.run_at FROM pgrunner.tasks t"
    "                                   WHERE t.state = 'queued'"
    "                                     AND t.run_at > t.created_at"
    "                                     AND t.queue = q.name"
    "                                     AND t.run_at > now()"
    "                                   ORDER BY t.run_at LIMIT 1) n),"
    "                                (SELECT min(lm.wake_at) FROM lm))"
    "                              - now()) * 1000),"
    "       NULL, NULL";

static struct pgr_loop *loop_of(struct pgr_pgconn *c) {
  return c->data;
}

static int queue_index(const struct pgr_config *cfg, const char *name) {
  for (size_t i = 0; i < cfg->nqueues; i++)
    if (strcmp(cfg->queues[i].name, name) == 0)
      return (int)i;
  return -1;
}

static void on_wake_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, wake_timer);
  l->wake_at_ms = 0;
  l->more = 1;
  pgr_listener_claim(l);
}

void pgr_listener_wake_at(struct pgr_loop *l, int64_t in_ms) {
  uint64_t now = uv_now(&l->loop);
  if (in_ms <= 0) {
    l->more = 1;
    return;
  }
  uint64_t at = now + (uint64_t)in_ms;
  if (l->wake_at_ms != 0 && l->wake_at_ms <= at)
    return;
  l->wake_at_ms = at;
  uv_timer_start(&l->wake_timer, on_wake_timer, (uint64_t)in_ms, 0);
}

static void on_claimed(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  int got = 0;
  (void)pc;

  l->claiming = 0;
  if (res == NULL)
    return; /* connection lost; on_up claims again */
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("claim failed", PGR_LS("error", m ? m : "unknown error"));
    pgr_health_claim_failed(m);
    return;
  }
  pgr_metrics_claim_succeeded();
  pgr_health_claim_ok();
  int n = PQntuples(res);
  for (int i = 0; i < n; i++) {
    if (PQgetisnull(res, i, 0)) {
      if (!PQgetisnull(res, i, 8))
        pgr_listener_wake_at(l, (int64_t)atof(PQgetvalue(res, i, 8)));
      continue;
    }
    struct pgr_claim *c = pgr_claim_create();
    c->id = atoll(PQgetvalue(res, i, 0));
    c->queue = pgr_strdup(PQgetvalue(res, i, 1));
    c->kind = pgr_strdup(PQgetvalue(res, i, 2));
    c->payload = pgr_strdup(PQgetvalue(res, i, 3));
    c->attempt = atoi(PQgetvalue(res, i, 4));
    c->max_attempts = atoi(PQgetvalue(res, i, 5));
    c->timeout_s = PQgetisnull(res, i, 6) ? l->cfg->task_timeout_s
                                          : atoi(PQgetvalue(res, i, 6));
    c->priority = atoi(PQgetvalue(res, i, 7));
    c->worker_id = l->worker_id;
    c->queue_index = queue_index(l->cfg, c->queue);
    /* Rows come in claim order, so the last one found after a queue's
       cursor moves it. One found before it (more urgent) leaves it: moving
       back would make every later claim walk the entries in between. */
    if (c->queue_index >= 0 && atoi(PQgetvalue(res, i, 10)) == 2) {
      struct pgr_cursor *cur = &l->cursors[c->queue_index];
      const char *at = PQgetvalue(res, i, 9);
      if (strlen(at) < sizeof cur->run_at) {
        cur->set = 1;
        cur->priority = c->priority;
        strcpy(cur->run_at, at);
        cur->id = c->id;
      }
    }
    pgr_dispatch_submit(l, c);
    got++;
  }
  /* A full batch means more may be waiting. */
  if (got >= l->claim_asked)
    l->more = 1;
  pgr_debug("claimed", PGR_LI("tasks", got));
  if (l->more)
    pgr_listener_claim(l);
}

/* How often a claim starts from the front of every queue all the same: a
   task can land behind a cursor (inserted with an old run_at, or given
   back by another worker's claim that rolled back), and this bounds how
   long it waits. Under a long transaction elsewhere such a claim walks
   every dead entry, so not more often than this. */
#define SWEEP_EVERY_MS 1000

static void reset_cursors(struct pgr_loop *l) {
  for (size_t i = 0; i < l->cfg->nqueues; i++)
    l->cursors[i].set = 0;
}

void pgr_listener_claim(struct pgr_loop *l) {
  const struct pgr_config *cfg = l->cfg;
  struct pgr_buf names, limits, prios, ats, ids;
  char wid[32], total[16];
  int free_slots, any = 0;

  if (l->shutting_down || !l->registered || !pgr_pgconn_ready(&l->pg))
    return;
  if (l->claiming || l->releasing) {
    l->more = 1;
    return;
  }
  /* Claim only for idle threads. Claiming ahead would save each thread a
     claim round trip between tasks (about 15 % more no-op tasks/s), but a
     task claimed ahead is 'running' before any thread runs it, and it runs
     before a more urgent task that arrives in the meantime: SPEC's
     priority order and --concurrency as the count of running tasks would
     both break. */
  free_slots = cfg->concurrency - l->ninflight;
  if (free_slots <= 0)
    return;
  uint64_t now = uv_now(&l->loop);
  if (now - l->swept_ms >= SWEEP_EVERY_MS) {
    l->swept_ms = now;
    reset_cursors(l);
  }

  pgr_buf_init(&names);
  pgr_buf_init(&limits);
  pgr_buf_init(&prios);
  pgr_buf_init(&ats);
  pgr_buf_init(&ids);
  for (size_t i = 0; i < cfg->nqueues; i++) {
    const struct pgr_cursor *cur = &l->cursors[i];
    int lim = free_slots;
    if (cfg->queues[i].cap > 0 &&
        cfg->queues[i].cap - l->queue_running[i] < lim)
      lim = cfg->queues[i].cap - l->queue_running[i];
    if (lim <= 0)
      continue;
    const char *sep = any ? "," : "{";
    pgr_buf_printf(&names, "%s", sep);
    pgr_buf_add_array_elem(&names, cfg->queues[i].name);
    pgr_buf_printf(&limits, "%s%d", sep, lim);
    if (cur->set) {
      pgr_buf_printf(&prios, "%s%d", sep, cur->priority);
      pgr_buf_printf(&ats, "%s", sep);
      pgr_buf_add_array_elem(&ats, cur->run_at);
      pgr_buf_printf(&ids, "%s%lld", sep, (long long)cur->id);
    } else {
      /* The front: before any task that can exist. */
      pgr_buf_printf(&prios, "%s-2147483648", sep);
      pgr_buf_printf(&ats, "%s-infinity", sep);
      pgr_buf_printf(&ids, "%s-9223372036854775808", sep);
    }
    any = 1;
  }
  if (any) {
    pgr_buf_addc(&names, '}');
    pgr_buf_addc(&limits, '}');
    pgr_buf_addc(&prios, '}');
    pgr_buf_addc(&ats, '}');
    pgr_buf_addc(&ids, '}');
    const char *params[7] = {wid,   names.data, limits.data, total,
                             prios.data, ats.data, ids.data};
    snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
    snprintf(total, sizeof total, "%d", free_slots);
    l->more = 0;
    l->claim_asked = free_slots;
    if (pgr_pgconn_execute(&l->pg, "pgr_claim", 7, params, on_claimed, l) == 0)
      l->claiming = 1;
  }
  pgr_buf_free(&names);
  pgr_buf_free(&limits);
  pgr_buf_free(&prios);
  pgr_buf_free(&ats);
  pgr_buf_free(&ids);
}

static void release_unknown(struct pgr_loop *l);

/* The ids of the tasks our threads hold, as an array literal (initialises
   b; the caller frees it). */
static void inflight_ids(struct pgr_loop *l, struct pgr_buf *b) {
  int first = 1;
  pgr_buf_init(b);
  pgr_buf_addc(b, '{');
  for (struct pgr_claim *c = l->inflight; c; c = c->prev) {
    pgr_buf_printf(b, first ? "%lld" : ",%lld", (long long)c->id);
    first = 0;
  }
  pgr_buf_addc(b, '}');
}

/* A heartbeat succeeded (janitor.c): the worker's row exists. On a new
   connection, what is left before the first claim is giving back what a
   lost claim may have left running under our name. */
void pgr_listener_on_heartbeat(struct pgr_loop *l) {
  if (!l->registered && !l->releasing && l->session_ready)
    release_unknown(l);
}

static void on_released(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->releasing = 0;
  if (res == NULL)
    return;
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("cannot release unknown tasks", PGR_LS("error", m ? m : "?"));
    return; /* the next heartbeat tries again */
  }
  int n = atoi(PQgetvalue(res, 0, 0));
  if (n > 0)
    pgr_warn("gave back tasks whose claim was lost with the connection",
             PGR_LI("tasks", n));
  if (l->registered) {
    if (l->more)
      pgr_listener_claim(l);
    return;
  }
  l->registered = 1;
  l->registered_ms = uv_now(&l->loop);
  l->more = 1;
  pgr_info("worker registered", PGR_LS("worker", l->appname),
           PGR_LI("concurrency", l->cfg->concurrency));
  pgr_listener_claim(l);
}

/*
 * Before the first claim on a connection, and every few seconds after: a
 * claim may have committed while its answer was lost with the previous
 * connection (the server may even commit it after we reconnected, when the
 * old session finds out it is orphaned); those tasks are ours in the table
 * but unknown to us, and recovery will not touch them (we are alive). Give
 * back every running task of ours that we do not hold. Only sent while no
 * claim is queued or in flight (and claims wait for it), so everything we
 * do hold is in l->inflight.
 */
static void release_unknown(struct pgr_loop *l) {
  struct pgr_buf known;
  char wid[32];

  inflight_ids(l, &known);
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  const char *params[2] = {wid, known.data};
  if (pgr_pgconn_query(&l->pg,
                       "SELECT pgrunner.release_unknown($1::bigint,"
                       " $2::bigint[])",
                       2, params, on_released, l) == 0)
    l->releasing = 1;
  pgr_buf_free(&known);
}


/*
 * At start a schema that is missing or behind ends the worker (exit 1): no
 * waiting heals it. Once the worker has run, it is reported by /healthz
 * instead and checked again every heartbeat tick (janitor.c), so a worker
 * whose database was restored from an old backup says so and resumes by
 * itself after `pgrunner migrate`.
 */
static void on_schema_checked(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  int need = pgr_migrate_latest();
  int have = -1;
  (void)pc;
  l->schema_checking = 0;
  if (res == NULL)
    return;
  if (PQresultStatus(res) == PGRES_TUPLES_OK)
    have = atoi(PQgetvalue(res, 0, 0));
  pgr_health_schema(have < 0 ? 0 : have, need);
  if (have < need) {
    l->schema_behind = 1;
    if (l->started) {
      pgr_log(l->schema_logged ? PGR_LEVEL_DEBUG : PGR_LEVEL_ERROR,
              "the pgrunner schema is behind: run `pgrunner migrate`",
              PGR_LI("schema_version", have < 0 ? 0 : have),
              PGR_LI("needed_version", need));
      l->schema_logged = 1;
      return;
    }
    if (have < 0)
      pgr_error("the pgrunner schema is missing from the database: run "
                "`pgrunner migrate`");
    else
      pgr_error("the pgrunner schema is out of date: run `pgrunner migrate`",
                PGR_LI("schema_version", have), PGR_LI("needed_version", need));
    pgr_loop_fail(l, 1);
    return;
  }
  l->schema_behind = 0;
  l->schema_logged = 0;
  l->started = 1;
  if (l->probe == PGR_PROBE_PASSED)
    pgr_listener_setup_session(l);
  else if (l->probe == PGR_PROBE_NONE)
    pgr_session_probe_start(l);
}

static void check_schema(struct pgr_loop *l) {
  if (l->schema_checking || l->closing || !pgr_pgconn_ready(&l->pg))
    return;
  if (pgr_pgconn_query(&l->pg,
                       "SELECT coalesce(max(version), 0) "
                       "FROM pgrunner.migrations",
                       0, NULL, on_schema_checked, l) != 0) {
    pgr_debug("connection dropped before the schema check");
    return;
  }
  l->schema_checking = 1;
}

void pgr_listener_recheck_schema(struct pgr_loop *l) {
  if (l->schema_behind && !l->session_ready)
    check_schema(l);
}

static void on_setup(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  if (res && PQresultStatus(res) != PGRES_COMMAND_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("connection set-up failed",
              PGR_LS("error", m ? m : "unknown error"));
  }
}

void pgr_listener_on_up(struct pgr_pgconn *c) {
  struct pgr_loop *l = loop_of(c);
  pgr_info("database connected", PGR_LS("worker", l->appname));
  pgr_health_loop_up();
  if (l->closing)
    return;
  /* Prepared statements and LISTEN die with the session: redo both on
     every connect. The schema check runs first, so a database that was
     never migrated gets a clear message rather than a failed PREPARE. */
  check_schema(l);
}

/*
 * A connection attempt failed. Before the worker has ever run, an error
 * that waiting cannot heal (connerr.h: authentication, certificate, an
 * unknown database, a malformed connection string) ends it, so a service
 * manager sees the failure instead of a worker retrying forever. Later the
 * same errors are retried: a password rotated under a running worker may
 * be rotated back, and /healthz says what is wrong meanwhile.
 */
void pgr_listener_on_connect_failed(struct pgr_pgconn *c, int kind,
                                    const char *why) {
  struct pgr_loop *l = loop_of(c);
  pgr_health_loop_down(why);
  if (l->started || l->shutting_down || kind == PGR_CONNERR_RETRY)
    return;
  pgr_error("cannot connect to the database; not retrying",
            PGR_LS("error", why), PGR_LS("class", pgr_connerr_name(kind)));
  pgr_loop_fail(l, 1); /* SPEC section 9: each of these is exit 1 */
}

/* A setting we can do without (plan_cache_mode is PostgreSQL 12+). */
static void on_optional_setup(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  if (res && PQresultStatus(res) != PGRES_COMMAND_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_debug("optional session setting refused",
              PGR_LS("error", m ? m : "unknown error"));
  }
}

static void on_pending_cancels(struct pgr_pgconn *pc, PGresult *res,
                               void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  if (res == NULL)
    return; /* lost again: the next connection looks again */
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("cannot read pending cancel requests",
              PGR_LS("error", m ? m : "?"));
    return;
  }
  for (int i = 0; i < PQntuples(res); i++)
    pgr_dispatch_interrupt(l, atoll(PQgetvalue(res, i, 0)), PGR_INT_CANCEL);
}

/*
 * A cancel_task() that committed while this connection was down sent its
 * notification to nobody. Once LISTEN is back (the query below is queued
 * after it, so nothing falls between the two), look up the requests of the
 * tasks our threads hold. Tasks not started yet need nothing: lock_attempt
 * and complete_attempt refuse a task with a request.
 */
static void reread_cancels(struct pgr_loop *l) {
  struct pgr_buf known;

  if (l->inflight == NULL)
    return;
  inflight_ids(l, &known);
  const char *params[1] = {known.data};
  if (pgr_pgconn_query(&l->pg,
                       "SELECT c.task_id FROM pgrunner.cancel_requests c"
                       " WHERE c.task_id = ANY ($1::bigint[])",
                       1, params, on_pending_cancels, l) != 0)
    pgr_debug("connection dropped before reading cancel requests");
  pgr_buf_free(&known);
}

void pgr_listener_setup_session(struct pgr_loop *l) {
  struct pgr_pgconn *c = &l->pg;
  /* What this connection commits is never a promise to a user: a claim
     lost in a server crash leaves the task queued, a lost heartbeat or
     recovery is redone a second later, and a task's own success commits on
     its worker thread's connection, durably, flushing our earlier records
     with it. So these commits need not wait for their own WAL flush.
     Only our own statements run here, and each has one good plan whatever
     its parameters, so the claim is planned once instead of at every call
     (its array parameters otherwise keep the planner on custom plans, which
     cost more CPU than the claim itself). */
  if (pgr_janitor_hold_liveness(l, c) != 0 ||
      pgr_pgconn_query(c,
                       "SET synchronous_commit = off; "
                       "LISTEN pgrunner; LISTEN pgrunner_cancel",
                       0, NULL, on_setup, l) != 0 ||
      pgr_pgconn_query(c, "SET plan_cache_mode = force_generic_plan", 0, NULL,
                       on_optional_setup, l) != 0 ||
      pgr_pgconn_query(c, PGR_PLANNER_SETTINGS, 0, NULL, on_setup, l) != 0 ||
      pgr_pgconn_prepare(c, "pgr_claim", claim_sql, on_setup, l) != 0)
    return;
  reread_cancels(l);
  l->session_ready = 1;
  /* Register (heartbeat) on this connection: the claims that follow must
     find the worker's row, or recovery would take their tasks back. */
  pgr_janitor_heartbeat(l, c);
}

void pgr_listener_on_down(struct pgr_pgconn *c, const char *why) {
  struct pgr_loop *l = loop_of(c);
  l->registered = 0;
  l->releasing = 0;
  l->claiming = 0;
  l->session_ready = 0;
  pgr_session_probe_on_down(l);
  reset_cursors(l);
  l->schema_checking = 0;
  pgr_health_loop_down(why);
  pgr_warn("database connection lost; reconnecting", PGR_LS("error", why));
  if (l->shutting_down)
    pgr_loop_maybe_finish(l);
}

void pgr_listener_on_notify(struct pgr_pgconn *c, const char *channel,
                            const char *payload) {
  struct pgr_loop *l = loop_of(c);
  if (pgr_session_probe_on_notify(l, channel))
    return;
  if (strcmp(channel, "pgrunner") == 0) {
    if (queue_index(l->cfg, payload) < 0)
      return;
    l->more = 1;
    pgr_listener_claim(l);
  } else if (strcmp(channel, "pgrunner_cancel") == 0) {
    int64_t id = atoll(payload);
    if (id > 0)
      pgr_dispatch_interrupt(l, id, PGR_INT_CANCEL);
  }
}

static void on_poll_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, poll_timer);
  l->more = 1;
  pgr_listener_claim(l);
}

/* Every few seconds, while no claim is in flight, for a minute after each
   registration: see release_unknown. A claim orphaned by a lost connection
   commits, if ever, soon after the connection went; later the look-up
   would only cost time (behind a long transaction it walks an entry for
   every task this worker claimed). */
#define RELEASE_FOR_MS 60000

void pgr_listener_release_unknown(struct pgr_loop *l) {
  if (l->registered && !l->claiming && !l->releasing && !l->shutting_down &&
      uv_now(&l->loop) - l->registered_ms <= RELEASE_FOR_MS &&
      pgr_pgconn_ready(&l->pg))
    release_unknown(l);
}

void pgr_listener_start_timers(struct pgr_loop *l) {
  uint64_t poll = (uint64_t)l->cfg->poll_interval_ms;
  uv_timer_start(&l->poll_timer, on_poll_timer, poll, poll);
}
