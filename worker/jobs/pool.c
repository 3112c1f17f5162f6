/*
 * pool.c - N worker threads, each owning one blocking database connection.
 *
 * DESIGN: this is where the two sides of pgrunner meet.
 *
 *   loop thread                         worker threads
 *   -----------                         --------------
 *   pgr_pool_submit(claim)  --mutex-->  queue --cond--> take, run the
 *                                       attempt (jobs/attempt.c, may block)
 *   on wake: pgr_pool_take_done() <--  done list + uv_async_send(wake)
 *
 * The loop never waits for a worker: submit and take only hold the mutex
 * for a few pointer moves. uv_async_send() coalesces, so the loop swaps the
 * whole done list out in one go (libuv's uv__work_done does the same).
 * Own threads rather than uv_queue_work: libuv's pool is shared with DNS and
 * fs work and gives no affinity, while each worker needs its own PGconn.
 *
 * Thread: see pool.h for which function runs where.
 */
#include <stdlib.h>
#include <string.h>

#include "jobs/internal.h"
#include "log.h"

struct pgr_claim *pgr_claim_create(void) {
  return pgr_calloc(1, sizeof(struct pgr_claim));
}

void pgr_claim_free(struct pgr_claim *c) {
  if (c == NULL)
    return;
  free(c->kind);
  free(c->queue);
  free(c->payload);
  free(c->error);
  free(c);
}

enum pgr_interrupt pgr_slot_interrupt(struct pgr_slot *s) {
  enum pgr_interrupt why;
  uv_mutex_lock(&s->pool->mu);
  why = s->interrupt;
  uv_mutex_unlock(&s->pool->mu);
  return why;
}

static void worker_main(void *arg) {
  struct pgr_slot *s = arg;
  struct pgr_pool *p = s->pool;

  if (pgr_slot_connect(s) != 0)
    pgr_debug("worker thread stopping before it connected");
  for (;;) {
    struct pgr_claim *c;

    uv_mutex_lock(&p->mu);
    while (STAILQ_EMPTY(&p->queue) && !p->stopping)
      uv_cond_wait(&p->cv, &p->mu);
    c = STAILQ_FIRST(&p->queue);
    if (c == NULL) { /* stopping and nothing left */
      uv_mutex_unlock(&p->mu);
      break;
    }
    STAILQ_REMOVE_HEAD(&p->queue, link);
    s->current = c->id;
    s->current_attempt = c->attempt;
    s->since_ms = pgr_now_ms();
    s->interrupt = PGR_INT_NONE;
    uv_mutex_unlock(&p->mu);

    pgr_attempt_run(s, c);

    uv_mutex_lock(&p->mu);
    s->current = 0;
    s->interrupt = PGR_INT_NONE;
    STAILQ_INSERT_TAIL(&p->done, c, link);
    uv_mutex_unlock(&p->mu);
    uv_async_send(p->wake);
  }
  if (s->conn) {
    PQfinish(s->conn);
    s->conn = NULL;
  }
  pgr_stmt_reset(s);
  uv_mutex_lock(&p->mu);
  p->exited++;
  uv_mutex_unlock(&p->mu);
  uv_cond_signal(&p->exit_cv);
}

int pgr_pool_create(const struct pgr_config *cfg,
                    const struct pgr_handlers *handlers, const char *appname,
                    uv_async_t *wake, struct pgr_pool **out) {
  struct pgr_pool *p = pgr_calloc(1, sizeof *p);
  int i;

  p->cfg = cfg;
  p->handlers = handlers;
  p->appname = pgr_strdup(appname);
  p->wake = wake;
  p->prepare = pgr_stmt_may_prepare(cfg);
  STAILQ_INIT(&p->queue);
  STAILQ_INIT(&p->done);
  PGR_ASSERT(uv_mutex_init(&p->mu) == 0);
  PGR_ASSERT(uv_cond_init(&p->cv) == 0);
  PGR_ASSERT(uv_cond_init(&p->stop_cv) == 0);
  PGR_ASSERT(uv_cond_init(&p->exit_cv) == 0);
  p->nslots = cfg->concurrency;
  p->slots = pgr_calloc((size_t)p->nslots, sizeof *p->slots);
  for (i = 0; i < p->nslots; i++) {
    p->slots[i].pool = p;
    p->slots[i].index = i;
    if (uv_thread_create(&p->slots[i].thread, worker_main, &p->slots[i]) != 0)
      pgr_fatal(__FILE__, __LINE__, "cannot start worker thread %d", i);
  }
  *out = p;
  return 0;
}

void pgr_pool_submit(struct pgr_pool *p, struct pgr_claim *c) {
  uv_mutex_lock(&p->mu);
  STAILQ_INSERT_TAIL(&p->queue, c, link);
  uv_mutex_unlock(&p->mu);
  /* Signalled after unlocking: a thread woken while we still held the
     mutex would only go back to sleep on it (two more context switches per
     hand-off, seen in strace). Every waiter re-checks the queue under the
     mutex, so no wake-up is lost. */
  uv_cond_signal(&p->cv);
}

void pgr_pool_take_done(struct pgr_pool *p, struct pgr_claims *out) {
  uv_mutex_lock(&p->mu);
  STAILQ_CONCAT(out, &p->done);
  uv_mutex_unlock(&p->mu);
}

int pgr_pool_interrupt(struct pgr_pool *p, int64_t id, int attempt,
                       enum pgr_interrupt why) {
  int pid = 0;
  uv_mutex_lock(&p->mu);
  for (int i = 0; i < p->nslots; i++) {
    struct pgr_slot *s = &p->slots[i];
    /* The next attempt of the same task may already run on another slot
       while the loop still holds this one's claim. */
    if (s->current == id && s->current_attempt == attempt) {
      /* A cancel outranks a shutdown or a timeout: the user asked. */
      if (s->interrupt == PGR_INT_NONE || why == PGR_INT_CANCEL)
        s->interrupt = why;
      pid = s->backend_pid;
      break;
    }
  }
  uv_mutex_unlock(&p->mu);
  return pid;
}

uint64_t pgr_pool_running_since(struct pgr_pool *p, int64_t id) {
  uint64_t since = 0;
  uv_mutex_lock(&p->mu);
  for (int i = 0; i < p->nslots; i++)
    if (p->slots[i].current == id)
      since = p->slots[i].since_ms;
  uv_mutex_unlock(&p->mu);
  return since;
}

void pgr_pool_take_pending(struct pgr_pool *p, struct pgr_claims *out) {
  uv_mutex_lock(&p->mu);
  STAILQ_CONCAT(out, &p->queue);
  uv_mutex_unlock(&p->mu);
}

int pgr_pool_stopping(struct pgr_pool *p) {
  int stopping;
  uv_mutex_lock(&p->mu);
  stopping = p->stopping;
  uv_mutex_unlock(&p->mu);
  return stopping;
}

int pgr_pool_wait(struct pgr_pool *p, uint64_t ms) {
  uint64_t until = uv_hrtime() + ms * 1000000;
  int stopping;
  uv_mutex_lock(&p->mu);
  while (!p->stopping) {
    uint64_t now = uv_hrtime();
    if (now >= until)
      break;
    /* stop_cv, not cv: a submit's single signal must wake an idle thread,
       never one that is waiting to reconnect. */
    (void)uv_cond_timedwait(&p->stop_cv, &p->mu, until - now);
  }
  stopping = p->stopping;
  uv_mutex_unlock(&p->mu);
  return stopping;
}

int pgr_pool_destroy(struct pgr_pool *p, uint64_t timeout_ms) {
  if (p == NULL)
    return 0;
  uint64_t until = uv_hrtime() + timeout_ms * 1000000;
  int all;
  uv_mutex_lock(&p->mu);
  p->stopping = 1;
  uv_cond_broadcast(&p->cv);
  uv_cond_broadcast(&p->stop_cv);
  while (p->exited < p->nslots) {
    uint64_t now = uv_hrtime();
    if (now >= until)
      break;
    (void)uv_cond_timedwait(&p->exit_cv, &p->mu, until - now);
  }
  all = p->exited == p->nslots;
  uv_mutex_unlock(&p->mu);
  /* A thread still running owns its slot, the pool and the config: leave
     them all to the process's exit. */
  if (!all)
    return PGR_EIO;
  for (int i = 0; i < p->nslots; i++)
    uv_thread_join(&p->slots[i].thread);
  /* Claims the loop never took back (it has stopped). */
  struct pgr_claim *c;
  while ((c = STAILQ_FIRST(&p->done)) != NULL) {
    STAILQ_REMOVE_HEAD(&p->done, link);
    pgr_claim_free(c);
  }
  free(p->slots);
  free(p->appname);
  uv_cond_destroy(&p->exit_cv);
  uv_cond_destroy(&p->stop_cv);
  uv_cond_destroy(&p->cv);
  uv_mutex_destroy(&p->mu);
  free(p);
  return 0;
}
