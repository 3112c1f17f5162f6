/*
 * attempt.c - one attempt of one task = one transaction, on a worker thread:
 * its course from start to record (the statements are pipeline.c's, a C
 * handler's turn is handler_run.c's, the session conn.c's).
 *
 * Thread: worker threads only (blocking libpq; PGR_ASSERT_OFF_LOOP guards).
 *
 * The attempt's transaction:
 *   BEGIN;
 *   SELECT pgrunner.lock_attempt(id, attempt, worker);      -- lock + verify
 *   <the handler's work>
 *   SELECT pgrunner.complete_attempt(id, attempt, worker, output);  -- mark
 *   COMMIT;
 * A SQL-function task sends all of it as one pipeline (one round trip), its
 * call being the output argument of the mark (pgr_call_complete_fmt); a C
 * handler's attempt is two: the opening pair, then the closing pair. The
 * built-in noop needs no transaction block: its attempt is the single
 * UPDATE that marks it, itself a transaction.
 *
 * A failed attempt is rolled back and then recorded by
 * pgrunner.finish_attempt() in a transaction of its own. When the
 * connection drops mid-attempt the outcome of COMMIT is unknown: after
 * reconnecting we read the row; if our attempt committed it says succeeded,
 * and otherwise the attempt is recorded as failed, so a task is neither lost
 * nor completed twice.
 *
 * Nothing an attempt needs outlives its transaction, so these connections
 * work through a transaction pooler (PgBouncer pool_mode=transaction):
 * there every statement is unnamed (stmt.c says when they are named
 * instead, and why that is safe), and the time limit and the
 * dead-client check are set with set_config(..., true) inside each
 * attempt's transaction rather than once per session. The backend running
 * an attempt is whichever the pooler lent it, so its pid (for the loop's
 * pg_cancel_backend) is read in the attempt's first statement, not at
 * connect (behind a pooler PQbackendPID() is not a server pid at all).
 *
 * "Dropped" means any session we cannot vouch for: closed, a FATAL error
 * (the server ends the session after it, but libpq may not have read the
 * end yet), a pipeline not read back whole, a ROLLBACK that did not run.
 * Such a session is never used again: the attempt is found out and
 * recorded on a fresh one, since a task left running under a live worker
 * is one that recovery never touches.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db.h"
#include "jobs/attempt.h"
#include "log.h"

static const char finish_sql[] =
    "SELECT new_state, run_at_ms FROM pgrunner.finish_attempt($1::bigint,"
    " $2::int, $3::bigint, $4, $5, $6::jsonb,"
    " $7::bigint * interval '1 millisecond')";

static const char check_sql[] =
    "SELECT state, attempts, worker_id FROM pgrunner.tasks WHERE id = $1";

/* last_error is kept whole and printable: control characters other than
   newline and tab become spaces, and bytes that are not UTF-8 (which the
   server would refuse, losing the record) become '?'. */
static char *printable(const char *msg) {
  struct pgr_buf b;
  const unsigned char *p = (const unsigned char *)(msg ? msg : "");
  const unsigned char *end = p + strlen((const char *)p);
  pgr_buf_init(&b);
  while (*p) {
    size_t n = pgr_utf8_len(p, (size_t)(end - p));
    if (n == 0) {
      pgr_buf_addc(&b, '?');
      p++;
    } else if (n == 1 &&
               ((*p < 0x20 && *p != '\n' && *p != '\t') || *p == 0x7f)) {
      pgr_buf_addc(&b, ' ');
      p++;
    } else {
      pgr_buf_add(&b, (const char *)p, n);
      p += n;
    }
  }
  /* A message ends without the trailing newline libpq adds (a carriage
     return became a space above). */
  pgr_trim_end(b.data);
  return b.data;
}

/* `no handler for kind "K"`, with K kept on one line whatever a producer
   put in it: control characters come out as C-style escapes (a raw
   newline in last_error would end a line of `status`, or of a log, in the
   middle), and so does a backslash, so that an escape is never ambiguous. */
char *pgr_no_handler_msg(const char *kind) {
  struct pgr_buf b;
  pgr_buf_init(&b);
  pgr_buf_add(&b, "no handler for kind \"", 21);
  for (const unsigned char *p = (const unsigned char *)kind; *p; p++) {
    char esc[8];
    if (*p == '\\') {
      pgr_buf_add(&b, "\\\\", 2);
    } else if (*p == '\n') {
      pgr_buf_add(&b, "\\n", 2);
    } else if (*p == '\r') {
      pgr_buf_add(&b, "\\r", 2);
    } else if (*p == '\t') {
      pgr_buf_add(&b, "\\t", 2);
    } else if (*p < 0x20 || *p == 0x7f) {
      snprintf(esc, sizeof esc, "\\x%02x", *p);
      pgr_buf_add(&b, esc, 4);
    } else {
      pgr_buf_addc(&b, (char)*p);
    }
  }
  pgr_buf_addc(&b, '"');
  return b.data;
}

void pgr_attempt_set_msg(struct pgr_attempt *a, enum pgr_attempt_result r,
                         const char *msg) {
  a->r = r;
  free(a->msg);
  a->msg = printable(msg);
}

const char *pgr_sqlstate_of(const PGresult *res) {
  const char *s = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  return s ? s : "";
}

void pgr_attempt_ids(struct pgr_attempt_ids *t, const struct pgr_claim *c) {
  snprintf(t->id, sizeof t->id, "%lld", (long long)c->id);
  snprintf(t->att, sizeof t->att, "%d", c->attempt);
  snprintf(t->wid, sizeof t->wid, "%lld", (long long)c->worker_id);
}

/* SQLSTATE 57014 (query_canceled) is both the attempt's statement_timeout
   and a cancel request; only the message, in the server's language, names
   which. With no interrupt sent by this worker, the time limit is the one
   that had its full time: statement_timeout is armed after the attempt
   started, so it cannot fire sooner. A cancel before that is someone
   else's (or a stale one of ours); one after it counts as the time limit,
   which the watchdog would enforce anyway. */
static int statement_timed_out(const struct pgr_attempt *a,
                               const struct pgr_claim *c) {
  return strcmp(a->state, "57014") == 0 &&
         pgr_now_us() - c->started_us >= (uint64_t)c->timeout_s * 1000000u;
}

static int unsolicited_cancel(const struct pgr_attempt *a,
                              const struct pgr_claim *c) {
  return strcmp(a->state, "57014") == 0 && !statement_timed_out(a, c);
}

/* How many times a statement of the rare paths below is tried again after
   an error that is not the session's loss (a refusal, a lock timeout...),
   before the thread gives up on the attempt. */
#define FAULT_TRIES 5

/* Is the task's row our attempt, and in which state? On a fresh session
   if the current one is gone. Returns PGR_A_OK (our attempt committed),
   PGR_A_RETRY (still running as ours: nothing committed), PGR_A_LOST (someone
   else's now, or stopping). */
static enum pgr_attempt_result check_row(struct pgr_slot *s,
                                         const struct pgr_claim *c) {
  char id[32], err[1024];
  const char *params[1] = {id};
  int refused = 0;

  snprintf(id, sizeof id, "%lld", (long long)c->id);
  for (;;) {
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK ||
        PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF ||
        PQtransactionStatus(s->conn) != PQTRANS_IDLE) {
      if (pgr_slot_connect(s) != 0)
        return PGR_A_LOST; /* stopping: recovery will see to the task */
    }
    /* Unnamed, so planned for the table as it is now; a rare path. */
    PGresult *res =
        PQexecParams(s->conn, check_sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
      enum pgr_attempt_result r = PGR_A_LOST;
      if (PQntuples(res) == 1 && atoi(PQgetvalue(res, 0, 1)) == c->attempt &&
          atoll(PQgetvalue(res, 0, 2)) == c->worker_id) {
        const char *st = PQgetvalue(res, 0, 0);
        if (strcmp(st, "succeeded") == 0)
          r = PGR_A_OK;
        else if (strcmp(st, "running") == 0)
          r = PGR_A_RETRY;
      }
      PQclear(res);
      return r;
    }
    int lost = pgr_session_lost(s->conn, res);
    pgr_db_describe_error(res, s->conn, err, sizeof err);
    PQclear(res);
    if (lost) {
      if (pgr_slot_connect(s) != 0)
        return PGR_A_LOST;
    } else if (++refused >= FAULT_TRIES) {
      pgr_error("cannot read the task after a lost connection",
                PGR_LI("task", c->id), PGR_LS("error", err));
      return PGR_A_LOST;
    }
  }
}

/* After a dropped connection: did our attempt commit? The session that
   ran it is never reused (see the top of the file). */
static enum pgr_attempt_result find_out(struct pgr_slot *s,
                                        struct pgr_claim *c) {
  if (pgr_slot_connect(s) != 0)
    return PGR_A_LOST; /* stopping: recovery will see to the task */
  return check_row(s, c);
}

/* Record a failed attempt; sets c->done and c->retry_at_ms. A session that
   is lost meanwhile is replaced and the record tried again: it checks
   (task, state, attempt, worker), so a record that did commit before the
   reply was lost is not made twice. */
static void finish(struct pgr_slot *s, struct pgr_claim *c, const char *outcome,
                   const char *error, const char *output, int64_t retry_ms) {
  struct pgr_attempt_ids t;
  char delay[32];
  const char *params[7] = {
      t.id, t.att, t.wid, outcome, error, output, retry_ms >= 0 ? delay : NULL};

  pgr_attempt_ids(&t, c);
  snprintf(delay, sizeof delay, "%lld", (long long)retry_ms);
  int refused = 0;
  for (;;) {
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK ||
        PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF ||
        PQtransactionStatus(s->conn) != PQTRANS_IDLE) {
      if (pgr_slot_connect(s) != 0) {
        c->done = PGR_DONE_LOST; /* stopping: recovery will see to it */
        return;
      }
    }
    PGresult *res =
        PQexecParams(s->conn, finish_sql, 7, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
      if (PQntuples(res) == 0) {
        /* Not running as ours: someone else's now, or our attempt did
           commit after all (a COMMIT whose session was dropped can still
           complete while we reconnect). */
        c->done =
            check_row(s, c) == PGR_A_OK ? PGR_DONE_SUCCEEDED : PGR_DONE_LOST;
      } else {
        const char *st = PQgetvalue(res, 0, 0);
        c->retry_at_ms = atoll(PQgetvalue(res, 0, 1));
        if (strcmp(st, "failed") == 0)
          c->done = PGR_DONE_FAILED;
        else if (strcmp(st, "cancelled") == 0)
          c->done = PGR_DONE_CANCELLED;
        else if (strcmp(outcome, "requeue") == 0)
          c->done = PGR_DONE_REQUEUED;
        else
          c->done = PGR_DONE_RETRY;
      }
      PQclear(res);
      return;
    }
    char err[1024];
    int lost = pgr_session_lost(s->conn, res);
    pgr_db_describe_error(res, s->conn, err, sizeof err);
    PQclear(res);
    if (lost) {
      pgr_warn("database connection lost while recording a failed attempt; "
               "reconnecting",
               PGR_LI("task", c->id), PGR_LS("error", err));
      if (pgr_slot_connect(s) != 0) {
        c->done = PGR_DONE_LOST;
        return;
      }
      continue;
    }
    pgr_error("cannot record failed attempt", PGR_LI("task", c->id),
              PGR_LS("error", err));
    /* Never leave the task running under a live worker (recovery would
       not touch it): record the failure with a message the server
       cannot refuse. */
    if (refused++ == 0) {
      params[4] = "the failure message could not be stored; see the "
                  "worker's log";
      continue;
    }
    if (refused >= FAULT_TRIES) {
      c->done = PGR_DONE_LOST;
      return;
    }
  }
}

/* The attempt's closing log line (SPEC section 7). */
static void log_end(const struct pgr_claim *c) {
  int64_t ms = (int64_t)(c->finished_us - c->started_us) / 1000;
  switch (c->done) {
  case PGR_DONE_SUCCEEDED:
    pgr_info("task succeeded", PGR_LI("task", c->id), PGR_LS("kind", c->kind),
             PGR_LS("queue", c->queue), PGR_LI("attempt", c->attempt),
             PGR_LI("duration_ms", ms));
    break;
  case PGR_DONE_RETRY:
    pgr_warn("task retry scheduled", PGR_LI("task", c->id),
             PGR_LS("kind", c->kind), PGR_LS("queue", c->queue),
             PGR_LI("attempt", c->attempt), PGR_LI("duration_ms", ms),
             PGR_LI("retry_in_ms", c->retry_at_ms - pgr_wall_ms()),
             PGR_LS("error", c->error));
    break;
  case PGR_DONE_FAILED:
    pgr_warn("task failed", PGR_LI("task", c->id), PGR_LS("kind", c->kind),
             PGR_LS("queue", c->queue), PGR_LI("attempt", c->attempt),
             PGR_LI("duration_ms", ms), PGR_LS("error", c->error));
    break;
  case PGR_DONE_CANCELLED:
    pgr_warn("task cancelled", PGR_LI("task", c->id), PGR_LS("kind", c->kind),
             PGR_LS("queue", c->queue), PGR_LI("attempt", c->attempt),
             PGR_LI("duration_ms", ms));
    break;
  case PGR_DONE_REQUEUED:
    pgr_warn("task interrupted; queued again", PGR_LI("task", c->id),
             PGR_LS("kind", c->kind), PGR_LS("queue", c->queue),
             PGR_LI("attempt", c->attempt), PGR_LI("duration_ms", ms));
    break;
  case PGR_DONE_LOST:
    pgr_warn("task attempt no longer ours; dropped", PGR_LI("task", c->id),
             PGR_LS("kind", c->kind), PGR_LI("attempt", c->attempt));
    break;
  }
}

void pgr_attempt_run(struct pgr_slot *s, struct pgr_claim *c) {
  struct pgr_pool *p = s->pool;
  struct pgr_attempt a;
  const struct pgr_handler *h;
  char *call_sql = NULL;

  PGR_ASSERT_OFF_LOOP();
  a.r = PGR_A_OK;
  a.msg = pgr_strdup("");
  a.state[0] = '\0';
  a.output = NULL;
  a.retry_ms = -1;
  a.from_mark = 0;
  c->started_us = pgr_now_us();
  pgr_info("task started", PGR_LI("task", c->id), PGR_LS("kind", c->kind),
           PGR_LS("queue", c->queue), PGR_LI("attempt", c->attempt));

  if (!pgr_slot_conn_alive(s->conn) && pgr_slot_connect(s) != 0) {
    c->done = PGR_DONE_LOST;
    goto out;
  }

  h = pgr_handlers_find(p->handlers, c->kind);
  if (h && h->noop && c->timeout_s == p->cfg->task_timeout_s) {
    pgr_pipeline_noop(s, c, &a);
  } else if (h) {
    pgr_handler_run(s, c, h, &a);
  } else if (pgr_valid_kind(c->kind)) {
    char *schema = PQescapeIdentifier(s->conn, p->cfg->jobs_schema,
                                      strlen(p->cfg->jobs_schema));
    char *fn = PQescapeIdentifier(s->conn, c->kind, strlen(c->kind));
    PGR_ASSERT(schema && fn);
    call_sql = pgr_asprintf(pgr_call_complete_fmt, schema, fn);
    PQfreemem(schema);
    PQfreemem(fn);
    pgr_pipeline_run(s, c, call_sql, PGR_PIPE_OPEN | PGR_PIPE_CLOSE, &a);
  } else {
    char *m = pgr_no_handler_msg(c->kind);
    pgr_attempt_set_msg(&a, PGR_A_PERMANENT, m);
    free(m);
  }

  if (a.r == PGR_A_CONNLOST) {
    pgr_warn("database connection lost during a task", PGR_LI("task", c->id));
    a.r = find_out(s, c);
    pgr_attempt_set_msg(&a, a.r, "database connection lost during the attempt");
  }

  enum pgr_interrupt why = pgr_slot_interrupt(s);
  char tmsg[128];
  const char *msg = a.msg;
  switch (a.r) {
  case PGR_A_OK:
    c->done = PGR_DONE_SUCCEEDED;
    break;
  case PGR_A_LOST:
    c->done = PGR_DONE_LOST;
    break;
  case PGR_A_CANCELLED:
    msg = "cancelled";
    finish(s, c, "cancel", msg, NULL, -1);
    break;
  case PGR_A_RETRY:
  case PGR_A_PERMANENT:
    if (why == PGR_INT_CANCEL) {
      msg = "cancelled while running";
      finish(s, c, "cancel", msg, NULL, -1);
    } else if (why == PGR_INT_SHUTDOWN) {
      finish(s, c, "requeue", "", NULL, -1);
    } else if (why == PGR_INT_NONE && unsolicited_cancel(&a, c)) {
      /* Nobody here asked (no cancel, time limit or shutdown for this
         attempt): a stale interrupt meant for an attempt that has ended, or
         someone else's pg_cancel_backend. Not the task's fault: it runs
         again at once, and the attempt is not counted. */
      pgr_warn("task's statement cancelled, not by this worker; queued again",
               PGR_LI("task", c->id), PGR_LI("attempt", c->attempt));
      finish(s, c, "requeue", "", NULL, -1);
    } else if (why == PGR_INT_TIMEOUT || statement_timed_out(&a, c)) {
      snprintf(tmsg, sizeof tmsg, "task exceeded its time limit of %d s",
               c->timeout_s);
      msg = tmsg;
      finish(s, c, "retry", msg, NULL, -1);
    } else {
      finish(s, c, a.r == PGR_A_PERMANENT ? "permanent" : "retry", msg,
             a.output, a.retry_ms);
    }
    break;
  case PGR_A_CONNLOST:
    PGR_ASSERT(0);
  }
  if (c->done != PGR_DONE_SUCCEEDED && c->done != PGR_DONE_LOST &&
      c->done != PGR_DONE_REQUEUED)
    c->error = pgr_strdup(msg);
out:
  pgr_slot_set_backend_pid(s, 0);
  c->finished_us = pgr_now_us();
  log_end(c);
  free(call_sql);
  free(a.msg);
  free(a.output);
}
