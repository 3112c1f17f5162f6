/*
 * listener.c - what the loop does with its database connection: LISTEN,
 * notifications, claiming tasks, wake-up timers, heartbeat and retention.
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

#include "cli/cli.h"
#include "log.h"
#include "loop/internal.h"
#include "metrics.h"

/*
 * $1 worker id, $2 queue names, $3 per-queue limits, $4 total.
 * UPDATE ... RETURNING has no order of its own, so the rows are sorted
 * by priority, run_at and id before they are handed out. The last row (id NULL)
 * carries the milliseconds until the next future task of our queues.
 */
static const char claim_sql[] =
    "WITH q AS ("
    "  SELECT * FROM unnest($2::text[], $3::int[]) AS q(name, lim)"
    "), c AS ("
    "  SELECT t.id FROM q CROSS JOIN LATERAL ("
    "    SELECT t.id, t.priority, t.run_at FROM pgrunner.tasks t"
    "     WHERE t.state = 'queued' AND t.queue = q.name AND t.run_at <= now()"
    "     ORDER BY t.priority, t.run_at, t.id"
    "     LIMIT q.lim FOR UPDATE SKIP LOCKED) t"
    "  ORDER BY t.priority, t.run_at, t.id LIMIT $4"
    "), u AS ("
    "  UPDATE pgrunner.tasks t SET state = 'running',"
    "         attempts = t.attempts + 1, started_at = now(), worker_id = $1,"
    "         finished_at = NULL"
    "    FROM c WHERE t.id = c.id"
    "  RETURNING t.id, t.queue, t.kind, t.payload::text, t.attempts,"
    "            t.max_attempts, t.timeout_seconds, t.priority,"
    "            t.run_at"
    ") "
    "SELECT id, queue, kind, payload, attempts, max_attempts,"
    "       timeout_seconds, priority, NULL::float8 "
    "  FROM (SELECT * FROM u ORDER BY priority, run_at, id) s "
    "UNION ALL "
    "SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    "       ceil(extract(epoch FROM (SELECT min(t.run_at)"
    "                                  FROM pgrunner.tasks t"
    "                                 WHERE t.state = 'queued'"
    "                                   AND t.attempts >= 0"
    "                                   AND t.queue = ANY($2::text[])"
    "                                   AND t.run_at > now()) - now())"
    "            * 1000)";

static const char heartbeat_sql[] =
    "SELECT pgrunner.heartbeat($1::bigint, $2, $3, $4::int, $5::text[],"
    " $6::int)";

static struct pgr_loop *loop_of(struct pgr_pgconn *c) {
  return c->data;
}

/* Append a text[] literal element, double-quoted and escaped. */
static void array_elem(struct pgr_buf *b, const char *s) {
  pgr_buf_addc(b, '"');
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      pgr_buf_addc(b, '\\');
    pgr_buf_addc(b, *s);
  }
  pgr_buf_addc(b, '"');
}

static void queues_literal(const struct pgr_config *cfg, struct pgr_buf *b) {
  pgr_buf_addc(b, '{');
  for (size_t i = 0; i < cfg->nqueues; i++) {
    if (i)
      pgr_buf_addc(b, ',');
    array_elem(b, cfg->queues[i].name);
  }
  pgr_buf_addc(b, '}');
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
    return;
  }
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

void pgr_listener_claim(struct pgr_loop *l) {
  const struct pgr_config *cfg = l->cfg;
  struct pgr_buf names, limits;
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

  pgr_buf_init(&names);
  pgr_buf_init(&limits);
  pgr_buf_addc(&names, '{');
  pgr_buf_addc(&limits, '{');
  for (size_t i = 0; i < cfg->nqueues; i++) {
    int lim = free_slots;
    if (cfg->queues[i].cap > 0 &&
        cfg->queues[i].cap - l->queue_running[i] < lim)
      lim = cfg->queues[i].cap - l->queue_running[i];
    if (lim <= 0)
      continue;
    if (any) {
      pgr_buf_addc(&names, ',');
      pgr_buf_addc(&limits, ',');
    }
    array_elem(&names, cfg->queues[i].name);
    pgr_buf_printf(&limits, "%d", lim);
    any = 1;
  }
  pgr_buf_addc(&names, '}');
  pgr_buf_addc(&limits, '}');
  if (any) {
    const char *params[4] = {wid, names.data, limits.data, total};
    snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
    snprintf(total, sizeof total, "%d", free_slots);
    l->more = 0;
    l->claim_asked = free_slots;
    if (pgr_pgconn_execute(&l->pg, "pgr_claim", 4, params, on_claimed, l) == 0)
      l->claiming = 1;
  }
  pgr_buf_free(&names);
  pgr_buf_free(&limits);
}

static void release_unknown(struct pgr_loop *l);

static void on_heartbeat(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->heartbeat_busy = 0;
  if (res == NULL)
    return;
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("heartbeat failed", PGR_LS("error", m ? m : "unknown error"));
    return;
  }
  int recovered = atoi(PQgetvalue(res, 0, 0));
  if (recovered > 0)
    pgr_warn("recovered tasks of dead workers", PGR_LI("tasks", recovered));
  if (!l->registered && !l->releasing)
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
  int first = 1;

  pgr_buf_init(&known);
  pgr_buf_addc(&known, '{');
  for (struct pgr_claim *c = l->inflight; c; c = c->prev) {
    pgr_buf_printf(&known, first ? "%lld" : ",%lld", (long long)c->id);
    first = 0;
  }
  pgr_buf_addc(&known, '}');
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  const char *params[2] = {wid, known.data};
  if (pgr_pgconn_query(&l->pg,
                       "SELECT pgrunner.release_unknown($1::bigint,"
                       " $2::bigint[])",
                       2, params, on_released, l) == 0)
    l->releasing = 1;
  pgr_buf_free(&known);
}

void pgr_listener_heartbeat(struct pgr_loop *l) {
  struct pgr_buf qs;
  char wid[32], pid[16], conc[16];

  if (l->heartbeat_busy || l->closing || !pgr_pgconn_ready(&l->pg))
    return;
  pgr_buf_init(&qs);
  queues_literal(l->cfg, &qs);
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  snprintf(pid, sizeof pid, "%d", (int)getpid());
  snprintf(conc, sizeof conc, "%d", l->cfg->concurrency);
  const char *params[6] = {wid, l->appname, l->hostname, pid, qs.data, conc};
  if (pgr_pgconn_execute(&l->pg, "pgr_heartbeat", 6, params, on_heartbeat, l) ==
      0)
    l->heartbeat_busy = 1;
  pgr_buf_free(&qs);
}

static void setup_session(struct pgr_loop *l);

static void on_schema_checked(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  if (res == NULL)
    return;
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    pgr_error("the pgrunner schema is missing from the database: run "
              "`pgrunner migrate`");
    l->exit_code = 1;
    uv_kill(getpid(), SIGTERM);
    return;
  }
  int have = atoi(PQgetvalue(res, 0, 0));
  if (have < pgr_migrate_latest()) {
    pgr_error("the pgrunner schema is out of date: run `pgrunner migrate`",
              PGR_LI("schema_version", have),
              PGR_LI("needed_version", pgr_migrate_latest()));
    l->exit_code = 1;
    uv_kill(getpid(), SIGTERM);
    return;
  }
  setup_session(l);
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
  pgr_metrics_set_db_up(1);
  if (l->closing)
    return;
  /* Prepared statements and LISTEN die with the session: redo both on
     every connect. The schema check runs first, so a database that was
     never migrated gets a clear message rather than a failed PREPARE. */
  if (pgr_pgconn_query(c,
                       "SELECT coalesce(max(version), 0) "
                       "FROM pgrunner.migrations",
                       0, NULL, on_schema_checked, l) != 0)
    pgr_debug("connection dropped before the schema check");
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

static void setup_session(struct pgr_loop *l) {
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
  if (pgr_pgconn_query(c,
                       "SET synchronous_commit = off; "
                       "LISTEN pgrunner; LISTEN pgrunner_cancel",
                       0, NULL, on_setup, l) != 0 ||
      pgr_pgconn_query(c, "SET plan_cache_mode = force_generic_plan", 0, NULL,
                       on_optional_setup, l) != 0 ||
      pgr_pgconn_prepare(c, "pgr_claim", claim_sql, on_setup, l) != 0 ||
      pgr_pgconn_prepare(c, "pgr_heartbeat", heartbeat_sql, on_setup, l) != 0)
    return;
  pgr_listener_heartbeat(l);
}

void pgr_listener_on_down(struct pgr_pgconn *c, const char *why) {
  struct pgr_loop *l = loop_of(c);
  l->registered = 0;
  l->releasing = 0;
  l->claiming = 0;
  l->heartbeat_busy = 0;
  l->prune_busy = 0;
  pgr_metrics_set_db_up(0);
  pgr_warn("database connection lost; reconnecting", PGR_LS("error", why));
  if (l->shutting_down)
    pgr_loop_maybe_finish(l);
}

void pgr_listener_on_notify(struct pgr_pgconn *c, const char *channel,
                            const char *payload) {
  struct pgr_loop *l = loop_of(c);
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

#define RELEASE_EVERY_TICKS 5

static void on_heartbeat_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, heartbeat_timer);
  pgr_listener_heartbeat(l);
  if (++l->ticks % RELEASE_EVERY_TICKS == 0 && l->registered && !l->claiming &&
      !l->releasing && !l->shutting_down && pgr_pgconn_ready(&l->pg))
    release_unknown(l);
}

static void on_pruned(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->prune_busy = 0;
  if (res == NULL)
    return;
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("retention pruning failed", PGR_LS("error", m ? m : "?"));
    return;
  }
  int n = atoi(PQgetvalue(res, 0, 0));
  if (n > 0)
    pgr_info("pruned succeeded tasks", PGR_LI("tasks", n));
  /* A full batch: more to go, soon. */
  if (n >= 10000)
    uv_timer_start(&l->prune_timer, l->prune_timer.timer_cb, 1000, 60000);
}

static void on_prune_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, prune_timer);
  char secs[32];
  const char *params[1] = {secs};
  if (l->prune_busy || l->shutting_down || !l->registered)
    return;
  snprintf(secs, sizeof secs, "%lld", (long long)l->cfg->retention_s);
  if (pgr_pgconn_query(&l->pg,
                       "SELECT pgrunner.prune(make_interval(secs => $1))", 1,
                       params, on_pruned, l) == 0)
    l->prune_busy = 1;
}

void pgr_listener_start_timers(struct pgr_loop *l) {
  uint64_t poll = (uint64_t)l->cfg->poll_interval_ms;
  uv_timer_start(&l->poll_timer, on_poll_timer, poll, poll);
  uv_timer_start(&l->heartbeat_timer, on_heartbeat_timer, 1000, 1000);
  uv_timer_start(&l->prune_timer, on_prune_timer, 5000, 60000);
}
