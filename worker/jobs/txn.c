/*
 * txn.c - one attempt of one task = one transaction, on a worker thread.
 *
 * Thread: worker threads only (blocking libpq; PGR_ASSERT_OFF_LOOP guards).
 *
 * The attempt's transaction:
 *   BEGIN;
 *   SELECT pgrunner.lock_attempt(id, attempt, worker);      -- lock + verify
 *   <the handler's work>
 *   SELECT pgrunner.complete_attempt(id, attempt, worker);  -- mark, timed
 *   COMMIT;
 * A SQL-function task sends all of it as one pipeline (one round trip); a C
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
 * Nothing outlives a transaction on these connections, so they work
 * through a transaction pooler (PgBouncer pool_mode=transaction): every
 * statement is unnamed (PQsendQueryParams; a named prepared statement would
 * live on one server connection of the pool), and the time limit and the
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
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db.h"
#include "health.h"
#include "jobs/internal.h"
#include "log.h"

enum attempt_result {
  A_OK = 0,
  A_RETRY,     /* handler failed, retryable */
  A_PERMANENT, /* handler failed for good */
  A_LOST,      /* the attempt is no longer ours */
  A_CONNLOST,  /* the connection dropped: outcome to be found out */
  A_CANCELLED, /* a cancel request was found before the handler ran */
};

struct attempt {
  enum attempt_result r;
  char *msg; /* whole, printable, valid UTF-8; owned; never NULL */
  char state[6]; /* SQLSTATE of the statement that failed, or "" */
};

static const char lock_sql[] =
    "SELECT pgrunner.lock_attempt($1::bigint, $2::int, $3::bigint)";
static const char complete_sql[] =
    "SELECT pgrunner.complete_attempt($1::bigint, $2::int, $3::bigint)";
static const char noop_sql[] =
    "SELECT pgrunner.complete_noop($1::bigint, $2::int, $3::bigint)";
static const char finish_sql[] =
    "SELECT new_state, run_at_ms FROM pgrunner.finish_attempt($1::bigint,"
    " $2::int, $3::bigint, $4, $5)";
/* The attempt's settings, first in its transaction (see the top). The
   server notices a client that died in the middle of a long query within a
   second with client_connection_check_interval, which servers before 14 do
   not have. */
static const char settings_sql[] =
    "SELECT pg_backend_pid(), set_config('statement_timeout', $1, true)";
static const char settings14_sql[] =
    "SELECT pg_backend_pid(), set_config('statement_timeout', $1, true),"
    " set_config('client_connection_check_interval', '1000', true)";
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
  /* A message ends without the trailing newline libpq adds. */
  while (b.len > 0 && (b.data[b.len - 1] == '\n' || b.data[b.len - 1] == ' '))
    b.data[--b.len] = '\0';
  return b.data;
}

/* `no handler for kind "K"`, with K kept on one line whatever a producer
   put in it: control characters come out as C-style escapes (a raw
   newline in last_error would end a line of `status`, or of a log, in the
   middle), and so does a backslash, so that an escape is never ambiguous. */
static char *no_handler_msg(const char *kind) {
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

static void set_msg(struct attempt *a, enum attempt_result r, const char *msg) {
  a->r = r;
  free(a->msg);
  a->msg = printable(msg);
}

static const char *sqlstate_of(const PGresult *res) {
  const char *s = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  return s ? s : "";
}

/* An error after which the server ends the session (a terminated backend,
   a shutdown), whether or not libpq has seen the socket close yet. */
static int session_ending(const PGresult *res) {
  const char *sev =
      res ? PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED) : NULL;
  return sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0);
}

/* Can this session, after a statement that failed with `res`, be used
   for anything more? Not if it is closed or closing, or still in a
   pipeline (where plain commands cannot run). */
static int session_lost(PGconn *conn, const PGresult *res) {
  return res == NULL || PQstatus(conn) != CONNECTION_OK ||
         PQpipelineStatus(conn) != PQ_PIPELINE_OFF || session_ending(res);
}

static int stop_connecting(void *arg) {
  return pgr_pool_stopping(arg);
}

int pgr_txn_connect(struct pgr_slot *s) {
  struct pgr_pool *p = s->pool;
  char err[1024];
  uint64_t backoff = 100;
  PGconn *conn;

  PGR_ASSERT_OFF_LOOP();
  if (s->conn) {
    PQfinish(s->conn);
    s->conn = NULL;
    uv_mutex_lock(&p->mu);
    p->connected--;
    uv_mutex_unlock(&p->mu);
  }
  for (;;) {
    if (pgr_pool_stopping(p))
      return PGR_ECONN;
    if (pgr_db_connect_until(p->cfg->db, p->appname, stop_connecting, p,
                             &conn, err, sizeof err, NULL) == 0)
      break;
    if (pgr_pool_stopping(p))
      return PGR_ECONN;
    pgr_health_thread_failed(s->index, err);
    /* Every thread retries; one of them speaks for all at warn. */
    pgr_log(s->index == 0 ? PGR_LEVEL_WARN : PGR_LEVEL_DEBUG,
            "worker connection failed; retrying", PGR_LI("thread", s->index),
            PGR_LS("error", err), PGR_LI("retry_ms", backoff));
    if (pgr_pool_wait(p, backoff))
      return PGR_ECONN;
    backoff = backoff * 2 > 5000 ? 5000 : backoff * 2;
  }
  pgr_health_thread_connected(s->index);

  uv_mutex_lock(&p->mu);
  s->conn = conn;
  p->connected++;
  uv_mutex_unlock(&p->mu);
  /* Behind a pooler this pid is the pooler's own; the attempt reads the
     real one (send_settings). Logged for tests that pick a session. */
  pgr_debug("worker connected", PGR_LI("thread", s->index),
            PGR_LI("backend_pid", PQbackendPID(conn)));
  return 0;
}

/* The backend running the slot's attempt, or 0 between attempts. */
static void set_backend_pid(struct pgr_slot *s, int pid) {
  uv_mutex_lock(&s->pool->mu);
  s->backend_pid = pid;
  uv_mutex_unlock(&s->pool->mu);
}

/* Queue the attempt's settings statement (settings_sql) in the pipeline.
   `tmo` is the time limit in ms, as text. */
static int send_settings(PGconn *conn, const char *const tmo[1]) {
  const char *sql =
      PQserverVersion(conn) >= 140000 ? settings14_sql : settings_sql;
  return PQsendQueryParams(conn, sql, 1, NULL, tmo, NULL, NULL, 0);
}

/* Run one simple command outside a pipeline; errors go to a->msg. */
static int command(PGconn *conn, const char *sql) {
  PGresult *res = PQexec(conn, sql);
  int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
  PQclear(res);
  return ok ? 0 : PGR_EDB;
}

/* An attempt's identity as the text parameters ($1 task, $2 attempt,
   $3 worker) of every statement that checks or records it. */
struct attempt_ids {
  char id[32], att[16], wid[32];
};

static void attempt_ids(struct attempt_ids *t, const struct pgr_claim *c) {
  snprintf(t->id, sizeof t->id, "%lld", (long long)c->id);
  snprintf(t->att, sizeof t->att, "%d", c->attempt);
  snprintf(t->wid, sizeof t->wid, "%lld", (long long)c->worker_id);
}

/*
 * Collect the results of a pipeline of `n` commands plus its sync.
 * Returns the index of the first failed command (its message in a->msg,
 * its SQLSTATE in state), n if all succeeded, or -1 if the connection broke.
 * The result of command `settings` (send_settings) publishes the backend's
 * pid; the boolean of command `value`, if >= 0, goes to *truth.
 */
static int pipeline_results(struct pgr_slot *s, int n, int settings, int value,
                            int *truth, struct attempt *a, char state[6]) {
  PGconn *conn = s->conn;
  int failed = n;
  state[0] = '\0';
  for (int i = 0; i < n; i++) {
    PGresult *res;
    while ((res = PQgetResult(conn)) != NULL) {
      ExecStatusType st = PQresultStatus(res);
      if (session_ending(res)) {
        PQclear(res);
        return -1;
      }
      if (st == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        if (i == settings)
          set_backend_pid(s, atoi(PQgetvalue(res, 0, 0)));
        if (i == value)
          *truth = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
      }
      if (st == PGRES_FATAL_ERROR && failed == n) {
        const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        failed = i;
        snprintf(state, 6, "%.5s", sqlstate_of(res));
        set_msg(a, A_RETRY, m ? m : PQerrorMessage(conn));
      }
      PQclear(res);
    }
    if (PQstatus(conn) == CONNECTION_BAD)
      return -1;
  }
  /* The sync. */
  PGresult *res = PQgetResult(conn);
  if (res == NULL || PQresultStatus(res) != PGRES_PIPELINE_SYNC) {
    PQclear(res);
    return -1;
  }
  PQclear(res);
  return failed;
}

/* A pipeline that could not be sent or read back whole: what the server
   did with it is unknown, and the session, still in pipeline mode with
   results pending, can run nothing more (not even ROLLBACK). The attempt
   is found out on a fresh session. */
static void pipeline_broken(struct attempt *a) { a->r = A_CONNLOST; }

/* What one pipeline of an attempt carries (run_pipeline). */
enum {
  PIPE_OPEN = 1,  /* BEGIN, the settings, the lock */
  PIPE_CLOSE = 2, /* the success mark and COMMIT */
};

/*
 * Send `parts` of the attempt's transaction, with an optional SQL call
 * between them, as one pipeline and read it back. A SQL-function task is
 * one OPEN|CLOSE pipeline; a C handler runs between an OPEN and a CLOSE.
 */
static void run_pipeline(struct pgr_slot *s, struct pgr_claim *c,
                         const char *call_sql, int parts, struct attempt *a) {
  PGconn *conn = s->conn;
  struct attempt_ids t;
  char tmo[32], state[6];
  const char *attempt_params[3] = {t.id, t.att, t.wid};
  const char *tmo_params[1] = {tmo};
  const char *call_params[1] = {c->payload};
  int n = 0, step_settings = -1, step_lock = -1, step_call = -1,
      step_complete = -1, step_commit = -1;

  attempt_ids(&t, c);
  snprintf(tmo, sizeof tmo, "%lld", (long long)c->timeout_s * 1000);

  if (PQenterPipelineMode(conn) != 1)
    goto broken;
  if (parts & PIPE_OPEN) {
    if (!PQsendQueryParams(conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0))
      goto broken;
    n++;
    /* The flush sends the pid back now, not after the task's work, so the
       loop can interrupt a SQL task while it runs. */
    if (!send_settings(conn, tmo_params) || !PQsendFlushRequest(conn))
      goto broken;
    step_settings = n++;
    if (!PQsendQueryParams(conn, lock_sql, 3, NULL, attempt_params, NULL, NULL,
                           0))
      goto broken;
    step_lock = n++;
  }
  if (call_sql) {
    if (!PQsendQueryParams(conn, call_sql, 1, NULL, call_params, NULL, NULL, 0))
      goto broken;
    step_call = n++;
  }
  if (parts & PIPE_CLOSE) {
    if (!PQsendQueryParams(conn, complete_sql, 3, NULL, attempt_params, NULL,
                           NULL, 0))
      goto broken;
    step_complete = n++;
    if (!PQsendQueryParams(conn, "COMMIT", 0, NULL, NULL, NULL, NULL, 0))
      goto broken;
    step_commit = n++;
  }
  if (!PQpipelineSync(conn))
    goto broken;
  int failed = pipeline_results(s, n, step_settings, -1, NULL, a, state);
  if (failed < 0)
    goto broken;
  PQexitPipelineMode(conn);
  if (failed == n) {
    a->r = A_OK;
    return;
  }
  memcpy(a->state, state, sizeof a->state);
  /* Anything but a failed COMMIT leaves an aborted transaction block; a
     session that cannot even roll back is not to be trusted further. */
  if (failed != step_commit && command(conn, "ROLLBACK") != 0) {
    a->r = A_CONNLOST;
    return;
  }
  if (strcmp(state, "PR001") == 0 &&
      (failed == step_lock || failed == step_complete)) {
    a->r = A_LOST;
  } else if (strcmp(state, "PR003") == 0 &&
             (failed == step_lock || failed == step_complete)) {
    /* Cancelled before the handler ran, or while it ran with no interrupt
       reaching it (the worker's connection to the notifications was
       down): either way cancel_task() has returned true. */
    a->r = A_CANCELLED;
  } else if (failed == step_call && strcmp(state, "42883") == 0) {
    /* Is it our function that is missing, or something it calls? */
    char q[512];
    char *lit_schema = PQescapeLiteral(conn, s->pool->cfg->jobs_schema,
                                       strlen(s->pool->cfg->jobs_schema));
    char *lit_kind = PQescapeLiteral(conn, c->kind, strlen(c->kind));
    snprintf(q, sizeof q,
             "SELECT to_regprocedure(format('%%I.%%I(jsonb)', %s, %s)) IS "
             "NULL",
             lit_schema ? lit_schema : "''", lit_kind ? lit_kind : "''");
    PQfreemem(lit_schema);
    PQfreemem(lit_kind);
    PGresult *res = PQexec(conn, q);
    if (PQresultStatus(res) == PGRES_TUPLES_OK &&
        strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
      char *m = no_handler_msg(c->kind);
      set_msg(a, A_PERMANENT, m);
      free(m);
    }
    PQclear(res);
  } else if (strcmp(state, "PR002") == 0) {
    /* A SQL job may raise SQLSTATE PR002 to fail for good. */
    a->r = A_PERMANENT;
  }
  return;
broken:
  pipeline_broken(a);
}

/* The noop's attempt: the mark alone, one unnamed statement (its own
   transaction). It runs no handler, so it needs neither the time limit nor
   the backend's pid (nothing could be interrupted), and a cancel is refused
   by complete_noop itself. One statement instead of two is a fifth of a
   busy worker's cost per no-op task. */
static void run_noop(struct pgr_slot *s, struct pgr_claim *c,
                     struct attempt *a) {
  struct attempt_ids t;
  const char *params[3] = {t.id, t.att, t.wid};

  attempt_ids(&t, c);
  PGresult *res =
      PQexecParams(s->conn, noop_sql, 3, NULL, params, NULL, NULL, 0);
  if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
    /* false: not ours any more, or cancelled; finish_attempt() tells which
       (it records nothing for an attempt that is not ours). */
    a->r = strcmp(PQgetvalue(res, 0, 0), "t") == 0 ? A_OK : A_CANCELLED;
  } else if (session_lost(s->conn, res)) {
    a->r = A_CONNLOST;
  } else {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    set_msg(a, A_RETRY, m ? m : PQerrorMessage(s->conn));
    snprintf(a->state, sizeof a->state, "%.5s", sqlstate_of(res));
  }
  PQclear(res);
}

/* pgr_job callbacks for C handlers. */
struct job_priv {
  struct pgr_claim *claim;
  char *error;
};

static void job_log(struct pgr_job *job, enum pgr_level level,
                    const char *msg) {
  pgr_log(level, msg, PGR_LI("task", job->task->id),
          PGR_LS("kind", job->task->kind));
}

static void job_fail(struct pgr_job *job, const char *msg) {
  struct job_priv *jp = job->priv;
  free(jp->error);
  jp->error = pgr_strdup(msg ? msg : "");
}

static void run_c_handler(struct pgr_slot *s, struct pgr_claim *c,
                          const struct pgr_handler *h, struct attempt *a) {
  struct pgr_task task = {c->id,      c->kind,    c->queue,
                          c->payload, c->attempt, c->max_attempts};
  struct job_priv jp = {c, NULL};
  struct pgr_job job = {&task, s->conn, job_log, job_fail, &jp};

  run_pipeline(s, c, NULL, PIPE_OPEN, a);
  if (a->r != A_OK)
    return;
  enum pgr_outcome o = h->fn(&job, h->arg);
  /* The handler had the session: it may have been terminated under it
     (its own statement then failed), or left in a pipeline. */
  if (PQstatus(s->conn) != CONNECTION_OK ||
      PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF ||
      PQtransactionStatus(s->conn) == PQTRANS_ACTIVE) {
    a->r = A_CONNLOST;
    goto out;
  }
  /* A handler busy outside the database cannot be stopped mid-way, but an
     attempt interrupted meanwhile (time limit, cancel, shutdown) must not
     commit when the handler finally returns: it rolls back, and the caller
     records the interruption as it does for SQL tasks. */
  if (o == PGR_SUCCESS && pgr_slot_interrupt(s) != PGR_INT_NONE) {
    set_msg(a, A_RETRY, "interrupted while the handler ran");
    if (command(s->conn, "ROLLBACK") != 0)
      a->r = A_CONNLOST;
    goto out;
  }
  if (o == PGR_SUCCESS && PQtransactionStatus(s->conn) == PQTRANS_INTRANS) {
    run_pipeline(s, c, NULL, PIPE_CLOSE, a);
    goto out;
  }
  if (o == PGR_SUCCESS) {
    /* The handler left the transaction (committed, aborted or failed). */
    set_msg(a, A_RETRY, "handler left its transaction in an unusable state");
  } else {
    set_msg(a, o == PGR_PERMANENT ? A_PERMANENT : A_RETRY,
            jp.error ? jp.error : "handler failed");
  }
  if (command(s->conn, "ROLLBACK") != 0)
    a->r = A_CONNLOST;
out:
  free(jp.error);
}

/* SQLSTATE 57014 (query_canceled) is both the attempt's statement_timeout
   and a cancel request; only the message, in the server's language, names
   which. With no interrupt sent by this worker, the time limit is the one
   that had its full time: statement_timeout is armed after the attempt
   started, so it cannot fire sooner. A cancel before that is someone
   else's (or a stale one of ours); one after it counts as the time limit,
   which the watchdog would enforce anyway. */
static int statement_timed_out(const struct attempt *a,
                               const struct pgr_claim *c) {
  return strcmp(a->state, "57014") == 0 &&
         pgr_now_us() - c->started_us >= (uint64_t)c->timeout_s * 1000000u;
}

static int unsolicited_cancel(const struct attempt *a,
                              const struct pgr_claim *c) {
  return strcmp(a->state, "57014") == 0 && !statement_timed_out(a, c);
}

/* How many times a statement of the rare paths below is tried again after
   an error that is not the session's loss (a refusal, a lock timeout...),
   before the thread gives up on the attempt. */
#define FAULT_TRIES 5

/* Is the task's row our attempt, and in which state? On a fresh session
   if the current one is gone. Returns A_OK (our attempt committed),
   A_RETRY (still running as ours: nothing committed), A_LOST (someone
   else's now, or stopping). */
static enum attempt_result check_row(struct pgr_slot *s,
                                     const struct pgr_claim *c) {
  char id[32], err[1024];
  const char *params[1] = {id};
  int refused = 0;

  snprintf(id, sizeof id, "%lld", (long long)c->id);
  for (;;) {
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK ||
        PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF ||
        PQtransactionStatus(s->conn) != PQTRANS_IDLE) {
      if (pgr_txn_connect(s) != 0)
        return A_LOST; /* stopping: recovery will see to the task */
    }
    /* Unnamed, so planned for the table as it is now; a rare path. */
    PGresult *res =
        PQexecParams(s->conn, check_sql, 1, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
      enum attempt_result r = A_LOST;
      if (PQntuples(res) == 1 && atoi(PQgetvalue(res, 0, 1)) == c->attempt &&
          atoll(PQgetvalue(res, 0, 2)) == c->worker_id) {
        const char *st = PQgetvalue(res, 0, 0);
        if (strcmp(st, "succeeded") == 0)
          r = A_OK;
        else if (strcmp(st, "running") == 0)
          r = A_RETRY;
      }
      PQclear(res);
      return r;
    }
    int lost = session_lost(s->conn, res);
    pgr_db_describe_error(res, s->conn, err, sizeof err);
    PQclear(res);
    if (lost) {
      if (pgr_txn_connect(s) != 0)
        return A_LOST;
    } else if (++refused >= FAULT_TRIES) {
      pgr_error("cannot read the task after a lost connection",
                PGR_LI("task", c->id), PGR_LS("error", err));
      return A_LOST;
    }
  }
}

/* After a dropped connection: did our attempt commit? The session that
   ran it is never reused (see the top of the file). */
static enum attempt_result find_out(struct pgr_slot *s, struct pgr_claim *c) {
  if (pgr_txn_connect(s) != 0)
    return A_LOST; /* stopping: recovery will see to the task */
  return check_row(s, c);
}

/* Record a failed attempt; sets c->done and c->retry_at_ms. A session that
   is lost meanwhile is replaced and the record tried again: it checks
   (task, state, attempt, worker), so a record that did commit before the
   reply was lost is not made twice. */
static void finish(struct pgr_slot *s, struct pgr_claim *c, const char *outcome,
                   const char *error) {
  struct attempt_ids t;
  const char *params[5] = {t.id, t.att, t.wid, outcome, error};

  attempt_ids(&t, c);
  int refused = 0;
  for (;;) {
    if (!s->conn || PQstatus(s->conn) != CONNECTION_OK ||
        PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF ||
        PQtransactionStatus(s->conn) != PQTRANS_IDLE) {
      if (pgr_txn_connect(s) != 0) {
        c->done = PGR_DONE_LOST; /* stopping: recovery will see to it */
        return;
      }
    }
    PGresult *res =
        PQexecParams(s->conn, finish_sql, 5, NULL, params, NULL, NULL, 0);
    if (PQresultStatus(res) == PGRES_TUPLES_OK) {
      if (PQntuples(res) == 0) {
        /* Not running as ours: someone else's now, or our attempt did
           commit after all (a COMMIT whose session was dropped can still
           complete while we reconnect). */
        c->done = check_row(s, c) == A_OK ? PGR_DONE_SUCCEEDED : PGR_DONE_LOST;
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
    int lost = session_lost(s->conn, res);
    pgr_db_describe_error(res, s->conn, err, sizeof err);
    PQclear(res);
    if (lost) {
      pgr_warn("database connection lost while recording a failed attempt; "
               "reconnecting", PGR_LI("task", c->id), PGR_LS("error", err));
      if (pgr_txn_connect(s) != 0) {
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

/*
 * Is this idle connection still there? A server that restarted (or
 * terminated the session) while the thread waited has closed the socket,
 * which then reads as end-of-file. Finding that out now, without a round
 * trip, means the attempt starts on a fresh connection instead of being
 * spent on a dead one. A peer that vanished without closing (a cut cable)
 * is only found when the attempt uses the connection, as before.
 */
static int conn_alive(PGconn *conn) {
  if (conn == NULL || PQstatus(conn) != CONNECTION_OK)
    return 0;
  /* Usually nothing is waiting. Otherwise it is the end of the stream,
     often after a FATAL message (libpq reads the two in separate calls),
     or a harmless message such as a parameter change: read until the
     socket is quiet or libpq reports the connection closed. */
  for (int i = 0; i < 4; i++) {
    struct pollfd pfd = {.fd = PQsocket(conn), .events = POLLIN};
    if (poll(&pfd, 1, 0) == 0)
      return 1;
    if (PQconsumeInput(conn) == 0 || PQstatus(conn) != CONNECTION_OK)
      return 0;
  }
  return 1;
}

void pgr_txn_run(struct pgr_slot *s, struct pgr_claim *c) {
  struct pgr_pool *p = s->pool;
  struct attempt a;
  const struct pgr_handler *h;
  char *call_sql = NULL;

  PGR_ASSERT_OFF_LOOP();
  a.r = A_OK;
  a.msg = pgr_strdup("");
  a.state[0] = '\0';
  c->started_us = pgr_now_us();
  pgr_info("task started", PGR_LI("task", c->id), PGR_LS("kind", c->kind),
           PGR_LS("queue", c->queue), PGR_LI("attempt", c->attempt));

  if (!conn_alive(s->conn) && pgr_txn_connect(s) != 0) {
    c->done = PGR_DONE_LOST;
    goto out;
  }

  h = pgr_handlers_find(p->handlers, c->kind);
  if (h && h->noop && c->timeout_s == p->cfg->task_timeout_s) {
    run_noop(s, c, &a);
  } else if (h) {
    run_c_handler(s, c, h, &a);
  } else if (pgr_valid_kind(c->kind)) {
    char *schema = PQescapeIdentifier(s->conn, p->cfg->jobs_schema,
                                      strlen(p->cfg->jobs_schema));
    char *fn = PQescapeIdentifier(s->conn, c->kind, strlen(c->kind));
    PGR_ASSERT(schema && fn);
    call_sql = pgr_asprintf("SELECT %s.%s($1::jsonb)", schema, fn);
    PQfreemem(schema);
    PQfreemem(fn);
    run_pipeline(s, c, call_sql, PIPE_OPEN | PIPE_CLOSE, &a);
  } else {
    char *m = no_handler_msg(c->kind);
    set_msg(&a, A_PERMANENT, m);
    free(m);
  }

  if (a.r == A_CONNLOST) {
    pgr_warn("database connection lost during a task", PGR_LI("task", c->id));
    a.r = find_out(s, c);
    set_msg(&a, a.r, "database connection lost during the attempt");
  }

  enum pgr_interrupt why = pgr_slot_interrupt(s);
  char tmsg[128];
  const char *msg = a.msg;
  switch (a.r) {
  case A_OK:
    c->done = PGR_DONE_SUCCEEDED;
    break;
  case A_LOST:
    c->done = PGR_DONE_LOST;
    break;
  case A_CANCELLED:
    msg = "cancelled";
    finish(s, c, "cancel", msg);
    break;
  case A_RETRY:
  case A_PERMANENT:
    if (why == PGR_INT_CANCEL) {
      msg = "cancelled while running";
      finish(s, c, "cancel", msg);
    } else if (why == PGR_INT_SHUTDOWN) {
      finish(s, c, "requeue", "");
    } else if (why == PGR_INT_NONE && unsolicited_cancel(&a, c)) {
      /* Nobody here asked (no cancel, time limit or shutdown for this
         attempt): a stale interrupt meant for an attempt that has ended, or
         someone else's pg_cancel_backend. Not the task's fault: it runs
         again at once, and the attempt is not counted. */
      pgr_warn("task's statement cancelled, not by this worker; queued again",
               PGR_LI("task", c->id), PGR_LI("attempt", c->attempt));
      finish(s, c, "requeue", "");
    } else if (why == PGR_INT_TIMEOUT || statement_timed_out(&a, c)) {
      snprintf(tmsg, sizeof tmsg, "task exceeded its time limit of %d s",
               c->timeout_s);
      msg = tmsg;
      finish(s, c, "retry", msg);
    } else {
      finish(s, c, a.r == A_PERMANENT ? "permanent" : "retry", msg);
    }
    break;
  case A_CONNLOST:
    PGR_ASSERT(0);
  }
  if (c->done != PGR_DONE_SUCCEEDED && c->done != PGR_DONE_LOST &&
      c->done != PGR_DONE_REQUEUED)
    c->error = pgr_strdup(msg);
out:
  set_backend_pid(s, 0);
  c->finished_us = pgr_now_us();
  log_end(c);
  free(call_sql);
  free(a.msg);
}
