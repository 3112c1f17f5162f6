/*
 * jobs/internal.h - private to the worker-thread side (jobs/).
 *
 * Thread: worker threads, except where a field says "under pool->mu", which
 * the loop thread also reads or writes through pool.h's functions.
 */
#ifndef PGR_JOBS_INTERNAL_H
#define PGR_JOBS_INTERNAL_H

#include <libpq-fe.h>
#include <uv.h>

#include "config.h"
#include "handlers.h"
#include "pool.h"

struct pgr_pool;

/* How many SQL tasks' kinds a session keeps a call statement for (stmt.c). */
#define PGR_STMT_CALLS 16

/* One worker thread and the connection it owns. */
struct pgr_slot {
  struct pgr_pool *pool;
  int index;
  uv_thread_t thread;
  PGconn *conn; /* owned by this thread */
  /* What stmt.c prepared on conn: bits of enum pgr_stmt_id, those that
     would not prepare, and the SQL tasks' kinds (owned), by number. */
  unsigned stmt_prepared, stmt_failed;
  char *calls[PGR_STMT_CALLS];
  int ncalls;
  /* under pool->mu */
  int backend_pid;
  int64_t current;
  int current_attempt; /* the attempt of current: an interrupt names one */
  uint64_t since_ms;   /* when current started */
  enum pgr_interrupt interrupt;
};

struct pgr_pool {
  const struct pgr_config *cfg;
  const struct pgr_handlers *handlers;
  char *appname;
  uv_async_t *wake;
  uv_mutex_t mu;
  uv_cond_t cv;            /* a claim was submitted, or stopping */
  uv_cond_t stop_cv;       /* stopping (wakes threads waiting to reconnect) */
  uv_cond_t exit_cv;       /* a thread ended */
  int exited;              /* threads that ended */
  struct pgr_claims queue; /* submitted, not started */
  struct pgr_claims done;  /* done, not yet taken by the loop */
  int stopping;
  int connected;
  int prepare; /* the threads' sessions may hold named statements (stmt.c) */
  struct pgr_slot *slots;
  int nslots;
};

/* attempt.c: run one attempt of `c` on the slot's connection, start to end. */
void pgr_attempt_run(struct pgr_slot *s, struct pgr_claim *c);
/* conn.c: connect (or reconnect) the slot, retrying with backoff until it
   works or the pool stops. 0 when connected. */
int pgr_slot_connect(struct pgr_slot *s);

/* stmt.c: may the threads' sessions hold named statements (no --listen-db
   apart)? */
int pgr_stmt_may_prepare(const struct pgr_config *cfg);
/* stmt.c: forget the session's statements, for a new session (or at the
   thread's end). */
void pgr_stmt_reset(struct pgr_slot *s);

/* pool.c: 1 once the pool is stopping. */
int pgr_pool_stopping(struct pgr_pool *p);
/* pool.c: sleep up to ms, or less if the pool stops; 1 if stopping. */
int pgr_pool_wait(struct pgr_pool *p, uint64_t ms);

/* pool.c: the interrupt requested for the slot's current task. */
enum pgr_interrupt pgr_slot_interrupt(struct pgr_slot *s);

#endif /* PGR_JOBS_INTERNAL_H */
