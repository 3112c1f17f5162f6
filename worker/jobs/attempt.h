/*
 * jobs/attempt.h - one attempt of one task, shared by the files that run
 * it: attempt.c (its course and its record), pipeline.c (its transaction
 * on the wire), handler_run.c (a C handler's turn in it) and conn.c (the
 * thread's session).
 *
 * Thread: worker threads only (blocking libpq; PGR_ASSERT_OFF_LOOP guards).
 */
#ifndef PGR_JOBS_ATTEMPT_H
#define PGR_JOBS_ATTEMPT_H

#include <stdint.h>

#include <libpq-fe.h>

#include "jobs/internal.h"

enum pgr_attempt_result {
  PGR_A_OK = 0,
  PGR_A_RETRY,     /* handler failed, retryable */
  PGR_A_PERMANENT, /* handler failed for good */
  PGR_A_LOST,      /* the attempt is no longer ours */
  PGR_A_CONNLOST,  /* the connection dropped: outcome to be found out */
  PGR_A_CANCELLED, /* a cancel request was found before the handler ran */
};

struct pgr_attempt {
  enum pgr_attempt_result r;
  char *msg;        /* whole, printable, valid UTF-8; owned; never NULL */
  char state[6];    /* SQLSTATE of the statement that failed, or "" */
  char *output;     /* a C handler's output (JSON text), owned, or NULL */
  int64_t retry_ms; /* a C handler's retry delay, or -1: the policy's */
  /* The failed statement's error was raised by complete_attempt itself,
     not by the job's function called in the same statement. */
  int from_mark;
};

/* An attempt's identity as the text parameters ($1 task, $2 attempt,
   $3 worker) of every statement that checks or records it. */
struct pgr_attempt_ids {
  char id[32], att[16], wid[32];
};

/* What one pipeline of an attempt carries (pgr_pipeline_run). */
enum {
  PGR_PIPE_OPEN = 1,  /* BEGIN, the settings, the lock */
  PGR_PIPE_CLOSE = 2, /* the success mark and COMMIT */
};

/* attempt.c */
/* An attempt's identity as the text parameters of its statements. */
void pgr_attempt_ids(struct pgr_attempt_ids *t, const struct pgr_claim *c);
/* Set the attempt's result and message (made whole and printable). */
void pgr_attempt_set_msg(struct pgr_attempt *a, enum pgr_attempt_result r,
                         const char *msg);
/* `no handler for kind "K"`, K escaped onto one line; the caller frees. */
char *pgr_no_handler_msg(const char *kind);
/* The result's SQLSTATE, or "". */
const char *pgr_sqlstate_of(const PGresult *res);

/* conn.c */
/* An error after which the server ends the session. */
int pgr_session_ending(const PGresult *res);
/* Can the session be used after a statement that failed with `res`? */
int pgr_session_lost(PGconn *conn, const PGresult *res);
/* The backend running the slot's attempt (for interrupts), 0 between. */
void pgr_slot_set_backend_pid(struct pgr_slot *s, int pid);
/* One simple command outside a pipeline: 0 or PGR_EDB. */
int pgr_slot_command(PGconn *conn, const char *sql);
/* Is the idle connection still there (no round trip)? */
int pgr_slot_conn_alive(PGconn *conn);

/* stmt.c: the attempt's statements, named on a session of the thread's
   own, unnamed through a transaction pooler. */
enum pgr_stmt_id {
  PGR_STMT_NOOP,     /* complete_noop: the no-op's whole attempt */
  PGR_STMT_SETTINGS, /* the backend's pid and the attempt's settings */
  PGR_STMT_LOCK,     /* lock_attempt */
  PGR_STMT_COMPLETE, /* complete_attempt with a C handler's output */
  PGR_STMT_FIXED
};
/* Prepare `id` on the session if it may be and is not yet (outside a
   pipeline); on failure it is sent unnamed. */
void pgr_stmt_prepare(struct pgr_slot *s, enum pgr_stmt_id id);
/* Queue statement `id` with its parameters: PQsend* result. */
int pgr_stmt_send(struct pgr_slot *s, enum pgr_stmt_id id,
                  const char *const *params);
/* Run statement `id` outside a pipeline: its result (PQexec*). */
PGresult *pgr_stmt_exec(struct pgr_slot *s, enum pgr_stmt_id id,
                        const char *const *params);
/* The call statement `sql` of a SQL task's kind, prepared on the session
   if it may be: its number, or -1 to send it unnamed. */
int pgr_stmt_prepare_call(struct pgr_slot *s, const char *kind,
                          const char *sql);
/* Queue call statement `call` (or `sql` unnamed if -1), 4 parameters. */
int pgr_stmt_send_call(struct pgr_slot *s, int call, const char *sql,
                       const char *const *params);
/* After a failed statement: a plan gone stale or a name lost makes the
   slot forget (and deallocate) its prepared statements. */
void pgr_stmt_check_error(struct pgr_slot *s, const char *sqlstate);

/* pipeline.c */
/* The call-and-mark statement of a SQL-function task: two %s, the jobs
   schema and the function, both quoted identifiers. */
extern const char pgr_call_complete_fmt[];
/* Send `parts` (PGR_PIPE_*) of the attempt's transaction as one pipeline. */
void pgr_pipeline_run(struct pgr_slot *s, struct pgr_claim *c,
                      const char *call_sql, int parts, struct pgr_attempt *a);
/* The built-in noop's attempt: the mark alone. */
void pgr_pipeline_noop(struct pgr_slot *s, struct pgr_claim *c,
                       struct pgr_attempt *a);

/* handler_run.c */
/* A C handler's attempt, between an opening and a closing pipeline. */
void pgr_handler_run(struct pgr_slot *s, struct pgr_claim *c,
                     const struct pgr_handler *h, struct pgr_attempt *a);

#endif /* PGR_JOBS_ATTEMPT_H */
