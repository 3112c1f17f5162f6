/*
 * listener.c - the loop's claim connection: connecting and reconnecting,
 * LISTEN and the notifications, the session's settings, and the fallback
 * poll. The claims themselves are claim.c's; registration and the schema
 * check registry.c's; heartbeat and retention run on the other connection
 * (janitor.c).
 *
 * Thread: LOOP THREAD ONLY. Every query goes through pgconn.c's
 * nonblocking queue.
 *
 * A notification is a hint, not a delivery: after every (re)connect we
 * LISTEN again, register, and claim whatever is due; a fallback poll covers
 * notifications lost while the connection was down.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "connerr.h"
#include "health.h"
#include "log.h"
#include "loop/internal.h"

static struct pgr_loop *loop_of(struct pgr_pgconn *c) {
  return c->data;
}

static void on_setup(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  (void)pgr_pgconn_result_ok(res, PGRES_COMMAND_OK, PGR_LEVEL_ERROR,
                             "connection set-up failed");
}

void pgr_listener_on_up(struct pgr_pgconn *c) {
  struct pgr_loop *l = loop_of(c);
  pgr_info("database connected", PGR_LS("worker", l->appname));
  pgr_health_loop_up();
  if (l->phase == PGR_PHASE_CLOSING)
    return;
  /* Prepared statements and LISTEN die with the session: redo both on
     every connect. The schema check runs first, so a database that was
     never migrated gets a clear message rather than a failed PREPARE. */
  pgr_registry_check_schema(l);
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
  if (l->phase != PGR_PHASE_STARTING || kind == PGR_CONNERR_RETRY)
    return;
  pgr_error("cannot connect to the database; not retrying",
            PGR_LS("error", why), PGR_LS("class", pgr_connerr_name(kind)));
  pgr_loop_fail(l, 1); /* SPEC section 9: each of these is exit 1 */
}

/* A setting we can do without (plan_cache_mode is PostgreSQL 12+). */
static void on_optional_setup(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  (void)pgr_pgconn_result_ok(res, PGRES_COMMAND_OK, PGR_LEVEL_DEBUG,
                             "optional session setting refused");
}

static void on_pending_cancels(struct pgr_pgconn *pc, PGresult *res,
                               void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  /* Lost again: the next connection looks again. */
  if (!pgr_pgconn_result_ok(res, PGRES_TUPLES_OK, PGR_LEVEL_ERROR,
                            "cannot read pending cancel requests"))
    return;
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
  pgr_registry_inflight_ids(l, &known);
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
     Only our own statements run here, each written so that its generic
     plan reads bounded index ranges (test_plans checks them), so the claim
     is planned once instead of at every call (its array parameters
     otherwise keep the planner on custom plans, which cost more CPU than
     the claim itself). */
  if (pgr_janitor_hold_liveness(l, c) != 0 ||
      pgr_pgconn_query(c,
                       "SET synchronous_commit = off; "
                       "LISTEN pgrunner; LISTEN pgrunner_cancel",
                       0, NULL, on_setup, l) != 0 ||
      pgr_pgconn_query(c, "SET plan_cache_mode = force_generic_plan", 0, NULL,
                       on_optional_setup, l) != 0 ||
      pgr_pgconn_query(c, PGR_PLANNER_SETTINGS, 0, NULL, on_setup, l) != 0 ||
      pgr_pgconn_prepare(c, "pgr_claim", pgr_claim_sql, on_setup, l) != 0)
    return;
  reread_cancels(l);
  l->session = PGR_SESSION_SET_UP;
  /* Register (heartbeat) on this connection: the claims that follow must
     find the worker's row, or recovery would take their tasks back. */
  pgr_janitor_heartbeat(l, c);
}

void pgr_listener_on_down(struct pgr_pgconn *c, const char *why) {
  struct pgr_loop *l = loop_of(c);
  l->session = PGR_SESSION_DOWN;
  l->releasing = 0;
  l->claiming = 0;
  pgr_session_probe_on_down(l);
  pgr_claims_reset(l);
  l->schema_checking = 0;
  pgr_health_loop_down(why);
  pgr_warn("database connection lost; reconnecting", PGR_LS("error", why));
  if (l->phase >= PGR_PHASE_DRAINING)
    pgr_loop_maybe_finish(l);
}

void pgr_listener_on_notify(struct pgr_pgconn *c, const char *channel,
                            const char *payload) {
  struct pgr_loop *l = loop_of(c);
  if (pgr_session_probe_on_notify(l, channel))
    return;
  if (strcmp(channel, "pgrunner") == 0) {
    if (pgr_config_queue_index(l->cfg, payload) < 0)
      return;
    l->more = 1;
    pgr_claims_request(l);
  } else if (strcmp(channel, "pgrunner_cancel") == 0) {
    int64_t id = atoll(payload);
    if (id > 0)
      pgr_dispatch_interrupt(l, id, PGR_INT_CANCEL);
  }
}

static void on_poll_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, poll_timer);
  l->more = 1;
  pgr_claims_request(l);
}

void pgr_listener_start_timers(struct pgr_loop *l) {
  uint64_t poll = (uint64_t)l->cfg->poll_interval_ms;
  uv_timer_start(&l->poll_timer, on_poll_timer, poll, poll);
}
