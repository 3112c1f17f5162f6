/*
 * janitor.c - periodic maintenance on a connection of its own: the
 * heartbeat (which also runs recovery and the schedules, one worker at a
 * time) and retention.
 *
 * Thread: LOOP THREAD ONLY. Every query goes through pgconn.c's
 * nonblocking queue.
 *
 * Why a second connection: a connection runs one statement at a time, and
 * a claim queued behind a heartbeat's recovery or a retention batch would
 * leave worker threads idle while tasks wait. The claim connection
 * (listener.c, claim.c) carries only LISTEN, the claims and what must be
 * ordered with them: the registration and giving back tasks a lost claim
 * left running (registry.c).
 * A worker therefore holds --concurrency + 2 connections. Both loop-side
 * connections hold a shared session advisory lock keyed by the worker id,
 * taken before anything else on the connection (so before it registers):
 * recovery takes a worker for dead when it can take that key exclusively
 * (see sql/0013_roles.sql). Either connection alone keeps the worker alive
 * while the other reconnects.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "loop/internal.h"

#define RELEASE_EVERY_TICKS 5
/* Recovery of running tasks whose worker has no row at all (see
   pgrunner.recover in 0005): once a minute, the first a few seconds in. */
#define SWEEP_EVERY_TICKS 60
#define SWEEP_AT_TICK 5
/* Retention deletes in batches this size, one after another while a batch
   comes back full, so it keeps up with any rate the worker reaches. */
#define PRUNE_BATCH 5000
#define PRUNE_EVERY_MS 5000
/* Task outcomes go to pgrunner.queue_stats this often (0012). */
#define STATS_EVERY_TICKS 10

static struct pgr_loop *loop_of(struct pgr_pgconn *c) {
  return c->data;
}

static void queues_literal(const struct pgr_config *cfg, struct pgr_buf *b) {
  pgr_buf_addc(b, '{');
  for (size_t i = 0; i < cfg->nqueues; i++) {
    if (i)
      pgr_buf_addc(b, ',');
    pgr_buf_add_array_elem(b, cfg->queues[i].name);
  }
  pgr_buf_addc(b, '}');
}

/* A heartbeat's or a sweep's answer: 0 and the tasks it recovered are
   logged, or -1 (the failure logged, or the connection gone). */
static int recovery_result(PGresult *res, const char *failed) {
  if (!pgr_pgconn_result_ok(res, PGRES_TUPLES_OK, PGR_LEVEL_ERROR, failed))
    return -1;
  int recovered = atoi(PQgetvalue(res, 0, 0));
  if (recovered > 0)
    pgr_warn("recovered tasks of dead workers", PGR_LI("tasks", recovered));
  return 0;
}

static void on_heartbeat(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->heartbeat_busy = 0;
  if (recovery_result(res, "heartbeat failed") == 0)
    pgr_registry_on_heartbeat(l);
}

void pgr_janitor_heartbeat(struct pgr_loop *l, struct pgr_pgconn *c) {
  struct pgr_buf qs;
  char wid[32], pid[16], conc[16];

  if (l->heartbeat_busy || l->phase == PGR_PHASE_CLOSING ||
      !pgr_pgconn_ready(c))
    return;
  pgr_buf_init(&qs);
  queues_literal(l->cfg, &qs);
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  snprintf(pid, sizeof pid, "%d", (int)getpid());
  snprintf(conc, sizeof conc, "%d", l->cfg->concurrency);
  const char *params[6] = {wid, l->appname, l->hostname, pid, qs.data, conc};
  if (pgr_pgconn_query(c,
                       "SELECT pgrunner.heartbeat($1::bigint, $2, $3, $4::int,"
                       " $5::text[], $6::int, true)",
                       6, params, on_heartbeat, l) == 0)
    l->heartbeat_busy = 1;
  pgr_buf_free(&qs);
}

static void on_swept(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->sweep_busy = 0;
  (void)recovery_result(res, "recovery sweep failed");
}

static void sweep(struct pgr_loop *l) {
  char wid[32];
  const char *params[1] = {wid};
  if (l->sweep_busy || l->phase >= PGR_PHASE_DRAINING ||
      !pgr_pgconn_ready(&l->maint))
    return;
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  /* One worker at a time, as the heartbeat's recovery. */
  if (pgr_pgconn_query(&l->maint,
                       "SELECT CASE WHEN pg_try_advisory_xact_lock(1885827685,"
                       " 1) THEN pgrunner.recover(true, $1::bigint) ELSE 0 END",
                       1, params, on_swept, l) == 0)
    l->sweep_busy = 1;
}

/* What report_stats sent; on success it counts as reported. */
struct stats_sent {
  struct pgr_loop *l;
  uint64_t (*sent)[3];
};

static void on_stats(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct stats_sent *s = arg;
  struct pgr_loop *l = s->l;
  (void)pc;
  l->stats_busy = 0;
  if (res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK)
    memcpy(l->queue_reported, s->sent, l->cfg->nqueues * sizeof *s->sent);
  else if (res != NULL)
    pgr_warn(
        "recording task counts failed",
        PGR_LS("error", PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                            ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY)
                            : "unknown error"));
  free(s->sent);
  free(s);
}

/* Report the outcomes counted since the last report that went through; a
   failed report is folded into the next one. */
static void report_stats(struct pgr_loop *l) {
  const struct pgr_config *cfg = l->cfg;
  struct pgr_buf arr[4];
  int any = 0;

  if (l->stats_busy || !pgr_pgconn_ready(&l->maint))
    return;
  for (size_t i = 0; i < cfg->nqueues; i++)
    for (int k = 0; k < 3; k++)
      any |= l->queue_done[i][k] != l->queue_reported[i][k];
  if (!any)
    return;
  for (int k = 0; k < 4; k++) {
    pgr_buf_init(&arr[k]);
    pgr_buf_addc(&arr[k], '{');
  }
  static const int outcome[3] = {PGR_DONE_SUCCEEDED, PGR_DONE_FAILED,
                                 PGR_DONE_RETRY};
  for (size_t i = 0; i < cfg->nqueues; i++) {
    for (int k = 0; k < 4; k++)
      if (i > 0)
        pgr_buf_addc(&arr[k], ',');
    pgr_buf_add_array_elem(&arr[0], cfg->queues[i].name);
    for (int k = 0; k < 3; k++)
      pgr_buf_printf(&arr[k + 1], "%llu",
                     (unsigned long long)(l->queue_done[i][outcome[k]] -
                                          l->queue_reported[i][outcome[k]]));
  }
  for (int k = 0; k < 4; k++)
    pgr_buf_addc(&arr[k], '}');
  struct stats_sent *s = pgr_calloc(1, sizeof *s);
  s->l = l;
  s->sent = pgr_malloc(cfg->nqueues * sizeof *s->sent);
  memcpy(s->sent, l->queue_done, cfg->nqueues * sizeof *s->sent);
  const char *params[4] = {arr[0].data, arr[1].data, arr[2].data, arr[3].data};
  if (pgr_pgconn_query(&l->maint,
                       "SELECT pgrunner.record_stats($1::text[], $2::bigint[], "
                       "$3::bigint[], $4::bigint[])",
                       4, params, on_stats, s) == 0) {
    l->stats_busy = 1;
  } else {
    free(s->sent);
    free(s);
  }
  for (int k = 0; k < 4; k++)
    pgr_buf_free(&arr[k]);
}

static void on_heartbeat_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, heartbeat_timer);
  /* Nothing before the claim connection is known to be a session: the
     check needs it idle (session.c). */
  if (l->probe != PGR_PROBE_PASSED)
    return;
  /* Until the claim connection has registered, the heartbeat goes there:
     that is the registration. After that it stays off the claims' way. */
  struct pgr_pgconn *c =
      l->session == PGR_SESSION_REGISTERED && pgr_pgconn_ready(&l->maint)
          ? &l->maint
          : &l->pg;
  pgr_janitor_heartbeat(l, c);
  pgr_registry_recheck_schema(l);
  if (++l->ticks % RELEASE_EVERY_TICKS == 0)
    pgr_registry_release_unknown(l);
  if (l->ticks % SWEEP_EVERY_TICKS == SWEEP_AT_TICK)
    sweep(l);
  if (l->ticks % STATS_EVERY_TICKS == 0)
    report_stats(l);
}

static void prune(struct pgr_loop *l);

static void on_pruned(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->prune_busy = 0;
  if (!pgr_pgconn_result_ok(res, PGRES_TUPLES_OK, PGR_LEVEL_ERROR,
                            "retention pruning failed"))
    return;
  int n = atoi(PQgetvalue(res, 0, 0));
  if (n > 0)
    pgr_debug("pruned succeeded tasks", PGR_LI("tasks", n));
  l->pruned += n;
  if (n >= PRUNE_BATCH) {
    prune(l); /* a full batch: more to go, now */
    return;
  }
  if (l->pruned > 0)
    pgr_info("pruned succeeded tasks", PGR_LI("tasks", l->pruned));
  l->pruned = 0;
}

static void prune(struct pgr_loop *l) {
  char secs[32], batch[16];
  const char *params[2] = {secs, batch};
  if (l->prune_busy || l->phase >= PGR_PHASE_DRAINING ||
      l->probe != PGR_PROBE_PASSED || !pgr_pgconn_ready(&l->maint))
    return;
  snprintf(secs, sizeof secs, "%lld", (long long)l->cfg->retention_s);
  snprintf(batch, sizeof batch, "%d", PRUNE_BATCH);
  if (pgr_pgconn_query(&l->maint,
                       "SELECT pgrunner.prune(make_interval(secs => $1),"
                       " $2::int)",
                       2, params, on_pruned, l) == 0)
    l->prune_busy = 1;
}

static void on_prune_timer(uv_timer_t *t) {
  prune(pgr_container_of(t, struct pgr_loop, prune_timer));
}

static void on_setup(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  (void)pgr_pgconn_result_ok(res, PGRES_COMMAND_OK, PGR_LEVEL_DEBUG,
                             "maintenance connection setting refused");
}

static void on_liveness(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  (void)pgr_pgconn_result_ok(
      res, PGRES_TUPLES_OK, PGR_LEVEL_ERROR,
      "cannot take the worker's liveness lock; other workers may take this "
      "connection's absence for death");
}

int pgr_janitor_hold_liveness(struct pgr_loop *l, struct pgr_pgconn *c) {
  char wid[32];
  const char *params[1] = {wid};
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  /* Waits, at most for one recovery transaction, while another worker that
     took us for dead holds the key: it gives our tasks back first. */
  return pgr_pgconn_query(c, "SELECT pg_advisory_lock_shared($1::bigint)", 1,
                          params, on_liveness, l);
}

void pgr_janitor_setup(struct pgr_loop *l) {
  struct pgr_pgconn *c = &l->maint;
  /* Nothing here is a promise to a user: a lost heartbeat or recovery is
     redone a second later, a lost retention batch five seconds later. */
  if (pgr_janitor_hold_liveness(l, c) != 0 ||
      pgr_pgconn_query(c, "SET synchronous_commit = off", 0, NULL, on_setup,
                       l) != 0 ||
      pgr_pgconn_query(c, PGR_PLANNER_SETTINGS, 0, NULL, on_setup, l) != 0 ||
      pgr_pgconn_query(c, "SET plan_cache_mode = force_generic_plan", 0, NULL,
                       on_setup, l) != 0)
    return;
}

static void on_up(struct pgr_pgconn *c) {
  struct pgr_loop *l = loop_of(c);
  pgr_debug("maintenance connection up", PGR_LS("worker", l->appname));
  /* Session settings only on a session (session.c): through a transaction
     pooler they would stay behind on the pool's server connections. */
  if (l->probe == PGR_PROBE_PASSED)
    pgr_janitor_setup(l);
  else
    pgr_session_probe_notify(l);
}

static void on_down(struct pgr_pgconn *c, const char *why) {
  struct pgr_loop *l = loop_of(c);
  l->heartbeat_busy = 0;
  l->prune_busy = 0;
  l->sweep_busy = 0;
  pgr_debug("maintenance connection lost; reconnecting", PGR_LS("error", why));
}

int pgr_janitor_init(struct pgr_loop *l, char *err, size_t errlen) {
  /* The listening conninfo: the settings made in on_up are session state,
     and this connection's application_name is half of how recovery sees
     the worker alive, so it needs a session as the claim connection does. */
  if (pgr_pgconn_init(&l->loop, &l->maint, pgr_config_listen_db(l->cfg),
                      l->appname, err, errlen) != 0)
    return PGR_EINVAL;
  l->maint.data = l;
  l->maint.on_up = on_up;
  l->maint.on_down = on_down;
  PGR_ASSERT(uv_timer_init(&l->loop, &l->heartbeat_timer) == 0);
  PGR_ASSERT(uv_timer_init(&l->loop, &l->prune_timer) == 0);
  return 0;
}

void pgr_janitor_start(struct pgr_loop *l) {
  pgr_pgconn_start(&l->maint);
  PGR_ASSERT(
      uv_timer_start(&l->heartbeat_timer, on_heartbeat_timer, 1000, 1000) == 0);
  PGR_ASSERT(uv_timer_start(&l->prune_timer, on_prune_timer, 5000,
                            PRUNE_EVERY_MS) == 0);
}

void pgr_janitor_stop(struct pgr_loop *l) {
  uv_timer_stop(&l->prune_timer);
}
