/*
 * dispatch.c - the loop's side of the hand-off to the worker threads:
 * submit claimed attempts, take finished ones back, interrupt running ones.
 *
 * Thread: LOOP THREAD ONLY. pgr_pool_submit/take_done/interrupt hold the
 * pool's mutex for a few pointer moves and never wait for a worker.
 *
 * Interrupting a task whose handler is inside a query is done the
 * nonblocking way, on the loop's own connection (PQcancel would open a
 * blocking connection on this thread): pgrunner.interrupt_attempt() cancels
 * the backend's statement only while the backend is still inside that
 * attempt's transaction. The statement may wait in the connection's queue
 * behind a claim or a heartbeat while the thread finishes the attempt and
 * starts another on the same backend; that one is left alone (see
 * sql/0014_cancel.sql). The worker learns why from the flag set under the
 * pool's mutex.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "loop/internal.h"
#include "metrics.h"

/* Grace after the time limit before the watchdog steps in: the server's
   statement_timeout normally ends a SQL task first. */
#define WATCHDOG_GRACE_MS 1000
#define WATCHDOG_EVERY_MS 100

void pgr_dispatch_submit(struct pgr_loop *l, struct pgr_claim *c) {
  c->claimed_us = pgr_now_us();
  l->ninflight++;
  if (c->queue_index >= 0)
    l->queue_running[c->queue_index]++;
  pgr_metrics_task_started(c->queue, c->kind);
  pgr_metrics_set_running(l->ninflight);
  if (!uv_is_active((uv_handle_t *)&l->watchdog_timer))
    uv_timer_start(&l->watchdog_timer, pgr_dispatch_on_watchdog,
                   WATCHDOG_EVERY_MS, WATCHDOG_EVERY_MS);
  /* The in-flight list links through `prev`, newest first: `link` belongs
     to the pool's queues while a thread holds the claim. */
  c->prev = l->inflight;
  l->inflight = c;
  pgr_pool_submit(l->pool, c);
}

static void forget(struct pgr_loop *l, struct pgr_claim *c) {
  struct pgr_claim **pp = &l->inflight;
  while (*pp && *pp != c)
    pp = &(*pp)->prev;
  if (*pp)
    *pp = c->prev;
  c->prev = NULL;
  l->ninflight--;
  if (c->queue_index >= 0) {
    int cap = l->cfg->queues[c->queue_index].cap;
    /* A queue at its cap was left out of the claims since: the slot this
       frees may have work waiting, which no NOTIFY will announce. */
    if (cap > 0 && l->queue_running[c->queue_index] >= cap)
      l->more = 1;
    l->queue_running[c->queue_index]--;
  }
}

void pgr_dispatch_on_done(uv_async_t *a) {
  struct pgr_loop *l = pgr_container_of(a, struct pgr_loop, done_async);
  struct pgr_claims done = STAILQ_HEAD_INITIALIZER(done);
  struct pgr_claim *c;

  pgr_pool_take_done(l->pool, &done);
  while ((c = STAILQ_FIRST(&done)) != NULL) {
    STAILQ_REMOVE_HEAD(&done, link);
    forget(l, c);
    pgr_metrics_task_done(c->queue, c->kind, c->done,
                          (double)(c->finished_us - c->started_us) / 1e6);
    if (c->queue_index >= 0 && c->done <= PGR_DONE_FAILED)
      l->queue_done[c->queue_index][c->done]++;
    if (c->done == PGR_DONE_RETRY || c->done == PGR_DONE_REQUEUED)
      l->more = 1; /* the claim finds out when it is due */
    pgr_claim_free(c);
  }
  pgr_metrics_set_running(l->ninflight);
  if (l->ninflight == 0)
    uv_timer_stop(&l->watchdog_timer);
  if (l->phase >= PGR_PHASE_DRAINING)
    pgr_loop_maybe_finish(l);
  else if (l->more)
    pgr_claims_request(l);
}

static void on_cancel_sent(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)arg;
  if (!pgr_pgconn_result_ok(res, PGRES_TUPLES_OK, PGR_LEVEL_WARN,
                            "cannot interrupt task"))
    return;
  if (strcmp(PQgetvalue(res, 0, 0), "f") == 0) {
    /* Its thread had left the attempt (or not reached it yet: then
       lock_attempt or complete_attempt sees a cancel request). */
    pgr_debug("interrupt found no attempt to stop");
  }
}

static void interrupt_one(struct pgr_loop *l, struct pgr_claim *c,
                          enum pgr_interrupt why) {
  int pid = pgr_pool_interrupt(l->pool, c->id, c->attempt, why);
  c->interrupted = 1;
  if (pid > 0) {
    char id[32], att[16], wid[32], p[16];
    const char *params[4] = {id, att, wid, p};
    snprintf(id, sizeof id, "%lld", (long long)c->id);
    snprintf(att, sizeof att, "%d", c->attempt);
    snprintf(wid, sizeof wid, "%lld", (long long)c->worker_id);
    snprintf(p, sizeof p, "%d", pid);
    if (pgr_pgconn_query(&l->pg,
                         "SELECT pgrunner.interrupt_attempt($1::bigint,"
                         " $2::int, $3::bigint, $4::int)",
                         4, params, on_cancel_sent, l) != 0)
      pgr_warn("cannot interrupt task: database connection down",
               PGR_LI("task", c->id));
  }
}

void pgr_dispatch_interrupt(struct pgr_loop *l, int64_t id,
                            enum pgr_interrupt why) {
  for (struct pgr_claim *c = l->inflight; c; c = c->prev) {
    if (c->id == id) {
      pgr_info(why == PGR_INT_CANCEL ? "cancelling running task"
                                     : "interrupting task",
               PGR_LI("task", id));
      interrupt_one(l, c, why);
      return;
    }
  }
}

static void on_requeued(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_claim *c = arg;
  struct pgr_loop *l = pc->data;
  if (res && PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_warn("cannot give back an unstarted task", PGR_LI("task", c->id),
             PGR_LS("error", m ? m : "?"));
  }
  forget(l, c);
  pgr_claim_free(c);
  pgr_metrics_set_running(l->ninflight);
  pgr_loop_maybe_finish(l);
}

void pgr_dispatch_give_back(struct pgr_loop *l) {
  struct pgr_claims pending = STAILQ_HEAD_INITIALIZER(pending);
  struct pgr_claim *c;

  pgr_pool_take_pending(l->pool, &pending);
  while ((c = STAILQ_FIRST(&pending)) != NULL) {
    STAILQ_REMOVE_HEAD(&pending, link);
    char id[32], att[16], wid[32];
    const char *params[5] = {id, att, wid, "requeue", ""};
    snprintf(id, sizeof id, "%lld", (long long)c->id);
    snprintf(att, sizeof att, "%d", c->attempt);
    snprintf(wid, sizeof wid, "%lld", (long long)c->worker_id);
    /* If the connection is down, the task stays ours (running) until our
       sessions end and recovery gives it back. */
    if (pgr_pgconn_query(&l->pg,
                         "SELECT * FROM pgrunner.finish_attempt($1::bigint,"
                         " $2::int, $3::bigint, $4, $5)",
                         5, params, on_requeued, c) != 0) {
      forget(l, c);
      pgr_claim_free(c);
    }
  }
}

void pgr_dispatch_interrupt_all(struct pgr_loop *l, enum pgr_interrupt why) {
  for (struct pgr_claim *c = l->inflight; c; c = c->prev)
    interrupt_one(l, c, why);
}

void pgr_dispatch_on_watchdog(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, watchdog_timer);
  uint64_t now = pgr_now_ms();
  for (struct pgr_claim *c = l->inflight; c; c = c->prev) {
    if (c->interrupted)
      continue;
    /* The limit counts from the start on a thread, not from the claim. */
    uint64_t since = pgr_pool_running_since(l->pool, c->id);
    if (since &&
        now >= since + (uint64_t)c->timeout_s * 1000 + WATCHDOG_GRACE_MS) {
      pgr_warn("task over its time limit; interrupting", PGR_LI("task", c->id),
               PGR_LI("timeout_s", c->timeout_s));
      interrupt_one(l, c, PGR_INT_TIMEOUT);
    }
  }
}
