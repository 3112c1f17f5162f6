/*
 * pool.h - the hand-off between the event-loop thread and the worker threads.
 *
 * Thread: pgr_pool_create/destroy on the main thread; pgr_pool_submit,
 * pgr_pool_take_done and pgr_pool_interrupt on the loop thread, where they
 * only take a mutex for a few instructions (never I/O); the worker threads
 * live in jobs/pool.c.
 *
 * Ownership: a struct pgr_claim is heap-allocated by the loop when it claims
 * a task. pgr_pool_submit() moves it to the pool ("the queue takes
 * ownership"); the worker thread fills in the outcome and moves it back
 * through the done list; the loop frees it with pgr_claim_free() after
 * pgr_pool_take_done() hands it over.
 */
#ifndef PGR_POOL_H
#define PGR_POOL_H

#include <stdint.h>
#include <sys/queue.h>

#include <uv.h>

#include "common.h"
#include "config.h"

enum pgr_done {
  PGR_DONE_SUCCEEDED = 0,
  PGR_DONE_RETRY,     /* failed; queued again at retry_at_ms */
  PGR_DONE_FAILED,    /* failed for good */
  PGR_DONE_CANCELLED, /* cancelled while running */
  PGR_DONE_REQUEUED,  /* interrupted at shutdown: queued, no attempt spent */
  PGR_DONE_LOST,      /* the task was no longer ours (recovered elsewhere) */
};

enum pgr_interrupt {
  PGR_INT_NONE = 0,
  PGR_INT_CANCEL = 1,   /* pgrunner.cancel_task() */
  PGR_INT_TIMEOUT = 2,  /* over its time limit */
  PGR_INT_SHUTDOWN = 3, /* shutdown deadline passed */
};

struct pgr_claim {
  STAILQ_ENTRY(pgr_claim) link; /* the pool's queues, the lists it returns */
  struct pgr_claim *prev;       /* the loop's in-flight list */
  int64_t id;
  int attempt;
  int max_attempts;
  int64_t worker_id;
  int timeout_s;   /* effective time limit */
  int queue_index; /* index into cfg->queues */
  char *kind;
  char *queue;
  char *payload;
  int priority;
  uint64_t claimed_us; /* monotonic */
  int interrupted;     /* loop side: an interrupt was already sent */

  /* Filled in by the worker thread. */
  enum pgr_done done;
  char *error;         /* last_error written, or NULL */
  int64_t retry_at_ms; /* wall clock, for PGR_DONE_RETRY */
  uint64_t started_us, finished_us;
};

/* A list of claims, oldest first. */
STAILQ_HEAD(pgr_claims, pgr_claim);

struct pgr_claim *pgr_claim_create(void);
void pgr_claim_free(struct pgr_claim *c);

struct pgr_pool;
struct pgr_handlers;

/*
 * Start cfg->concurrency threads. Each connects on its own (blocking, on its
 * own thread) and then waits for tasks. `wake` is signalled (uv_async_send)
 * whenever a claim is done.
 */
PGR_MUSTCHECK int pgr_pool_create(const struct pgr_config *cfg,
                                  const struct pgr_handlers *handlers,
                                  const char *appname, uv_async_t *wake,
                                  struct pgr_pool **out);
void pgr_pool_submit(struct pgr_pool *pool, struct pgr_claim *claim);
/* Move the whole done list, oldest first, to the end of *out. */
void pgr_pool_take_done(struct pgr_pool *pool, struct pgr_claims *out);
/*
 * Mark attempt `attempt` of task `id` interrupted for `why`. Returns the
 * backend pid of the connection running it (for the server-side interrupt),
 * or 0 if no thread runs it.
 */
int pgr_pool_interrupt(struct pgr_pool *pool, int64_t id, int attempt,
                       enum pgr_interrupt why);
/* When task `id` started on a thread (pgr_now_ms), 0 if it has not. */
uint64_t pgr_pool_running_since(struct pgr_pool *pool, int64_t id);
/* Move every submitted claim no thread has started to the end of *out
   (shutdown). */
void pgr_pool_take_pending(struct pgr_pool *pool, struct pgr_claims *out);
/*
 * Stop the threads once their queue is empty and join them (main thread).
 * A thread still busy after timeout_ms is left running: PGR_EIO, and the
 * pool is not freed (the caller exits the process).
 */
PGR_MUSTCHECK int pgr_pool_destroy(struct pgr_pool *pool, uint64_t timeout_ms);

#endif /* PGR_POOL_H */
