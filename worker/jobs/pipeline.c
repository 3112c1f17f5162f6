/*
 * pipeline.c - an attempt's transaction on the wire: BEGIN, the settings
 * and the lock; the SQL call and the success mark; COMMIT. Sent as
 * pipelines of the statements stmt.c names (prepared on a session of the
 * thread's own, unnamed through a transaction pooler).
 *
 * Thread: worker threads only.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/attempt.h"

/* A SQL-function task's call and success mark, one statement: the job's
   return value ($4 is the payload) becomes the output argument of
   complete_attempt. The call is in a select list, as a plain `SELECT f(x)`
   would be, so a function returning a set or an anonymous record works as
   before; one row gives its value as jsonb (to_jsonb), none or void gives
   NULL, several (a set-returning function) a JSON array of them. The job's
   SQL runs in this outer statement, with the server's settings, not with
   the planner settings pgrunner's own functions carry. Two %s: the jobs
   schema and the function, both quoted identifiers. */
const char pgr_call_complete_fmt[] =
    "SELECT pgrunner.complete_attempt($1::bigint, $2::int, $3::bigint,"
    " (SELECT CASE WHEN count(*) <= 1 THEN (array_agg(o))[1]"
    " ELSE jsonb_agg(o) END"
    " FROM (SELECT CASE WHEN pg_typeof(r.v) <> 'void'::regtype"
    " THEN to_jsonb(r.v) END AS o"
    " FROM (SELECT %s.%s($4::jsonb) AS v) r) x))";

/*
 * Collect the results of a pipeline of `n` commands plus its sync.
 * Returns the index of the first failed command (its message in a->msg,
 * its SQLSTATE in state), n if all succeeded, or -1 if the connection broke.
 * The result of command `settings` (PGR_STMT_SETTINGS) publishes the backend's
 * pid; the boolean of command `value`, if >= 0, goes to *truth.
 */
static int pipeline_results(struct pgr_slot *s, int n, int settings, int value,
                            int *truth, struct pgr_attempt *a, char state[6]) {
  PGconn *conn = s->conn;
  int failed = n;
  state[0] = '\0';
  for (int i = 0; i < n; i++) {
    PGresult *res;
    while ((res = PQgetResult(conn)) != NULL) {
      ExecStatusType st = PQresultStatus(res);
      if (pgr_session_ending(res)) {
        PQclear(res);
        return -1;
      }
      if (st == PGRES_TUPLES_OK && PQntuples(res) == 1) {
        if (i == settings)
          pgr_slot_set_backend_pid(s, atoi(PQgetvalue(res, 0, 0)));
        if (i == value)
          *truth = strcmp(PQgetvalue(res, 0, 0), "t") == 0;
      }
      if (st == PGRES_FATAL_ERROR && failed == n) {
        const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
        const char *ctx = PQresultErrorField(res, PG_DIAG_CONTEXT);
        failed = i;
        snprintf(state, 6, "%.5s", pgr_sqlstate_of(res));
        /* The context names the function, untranslated, whatever the
           server's language. */
        a->from_mark =
            ctx != NULL && strstr(ctx, "pgrunner.complete_attempt(") != NULL;
        pgr_attempt_set_msg(a, PGR_A_RETRY, m ? m : PQerrorMessage(conn));
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
static void pipeline_broken(struct pgr_attempt *a) {
  a->r = PGR_A_CONNLOST;
}

/*
 * Send `parts` of the attempt's transaction as one pipeline and read it
 * back. A SQL-function task is one OPEN|CLOSE pipeline whose success mark
 * is `call_sql` (pgr_call_complete_fmt: the call and the mark in one
 * statement); a C handler runs between an OPEN and a CLOSE, whose mark
 * stores a->output.
 */
void pgr_pipeline_run(struct pgr_slot *s, struct pgr_claim *c,
                      const char *call_sql, int parts, struct pgr_attempt *a) {
  PGconn *conn = s->conn;
  struct pgr_attempt_ids t;
  char tmo[32], state[6];
  const char *attempt_params[3] = {t.id, t.att, t.wid};
  const char *tmo_params[1] = {tmo};
  const char *complete_params[4] = {t.id, t.att, t.wid,
                                    call_sql ? c->payload : a->output};
  int n = 0, step_settings = -1, step_lock = -1, step_complete = -1,
      step_commit = -1, call = -1;

  pgr_attempt_ids(&t, c);
  snprintf(tmo, sizeof tmo, "%lld", (long long)c->timeout_s * 1000);

  /* Prepared (stmt.c) before the transaction: a statement that fails to
     prepare inside it would abort it. The closing half of a C handler's
     attempt uses what its opening half prepared. */
  if (parts & PGR_PIPE_OPEN) {
    pgr_stmt_prepare(s, PGR_STMT_SETTINGS);
    pgr_stmt_prepare(s, PGR_STMT_LOCK);
    if (call_sql)
      call = pgr_stmt_prepare_call(s, c->kind, call_sql);
    else
      pgr_stmt_prepare(s, PGR_STMT_COMPLETE);
  }
  if (PQenterPipelineMode(conn) != 1)
    goto broken;
  if (parts & PGR_PIPE_OPEN) {
    if (!PQsendQueryParams(conn, "BEGIN", 0, NULL, NULL, NULL, NULL, 0))
      goto broken;
    n++;
    /* The flush sends the pid back now, not after the task's work, so the
       loop can interrupt a SQL task while it runs. */
    if (!pgr_stmt_send(s, PGR_STMT_SETTINGS, tmo_params) ||
        !PQsendFlushRequest(conn))
      goto broken;
    step_settings = n++;
    if (!pgr_stmt_send(s, PGR_STMT_LOCK, attempt_params))
      goto broken;
    step_lock = n++;
  }
  if (parts & PGR_PIPE_CLOSE) {
    if (!(call_sql ? pgr_stmt_send_call(s, call, call_sql, complete_params)
                   : pgr_stmt_send(s, PGR_STMT_COMPLETE, complete_params)))
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
    a->r = PGR_A_OK;
    return;
  }
  memcpy(a->state, state, sizeof a->state);
  /* Anything but a failed COMMIT leaves an aborted transaction block; a
     session that cannot even roll back is not to be trusted further. */
  if (failed != step_commit && pgr_slot_command(conn, "ROLLBACK") != 0) {
    a->r = PGR_A_CONNLOST;
    return;
  }
  pgr_stmt_check_error(s, state);
  /* A SQL task's job runs in its mark's statement: the job's own PR001 or
     PR003 is a plain failure. */
  int ours = failed == step_lock ||
             (failed == step_complete && (call_sql == NULL || a->from_mark));
  if (strcmp(state, "PR001") == 0 && ours) {
    a->r = PGR_A_LOST;
  } else if (strcmp(state, "PR003") == 0 && ours) {
    /* Cancelled before the handler ran, or while it ran with no interrupt
       reaching it (the worker's connection to the notifications was
       down): either way cancel_task() has returned true. */
    a->r = PGR_A_CANCELLED;
  } else if (call_sql && failed == step_complete &&
             strcmp(state, "42883") == 0) {
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
      char *m = pgr_no_handler_msg(c->kind);
      pgr_attempt_set_msg(a, PGR_A_PERMANENT, m);
      free(m);
    }
    PQclear(res);
  } else if (strcmp(state, "PR002") == 0) {
    /* A SQL job may raise SQLSTATE PR002 to fail for good. */
    a->r = PGR_A_PERMANENT;
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
void pgr_pipeline_noop(struct pgr_slot *s, struct pgr_claim *c,
                       struct pgr_attempt *a) {
  struct pgr_attempt_ids t;
  const char *params[3] = {t.id, t.att, t.wid};

  pgr_attempt_ids(&t, c);
  pgr_stmt_prepare(s, PGR_STMT_NOOP);
  PGresult *res = pgr_stmt_exec(s, PGR_STMT_NOOP, params);
  if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1) {
    /* false: not ours any more, or cancelled; finish_attempt() tells which
       (it records nothing for an attempt that is not ours). */
    a->r = strcmp(PQgetvalue(res, 0, 0), "t") == 0 ? PGR_A_OK : PGR_A_CANCELLED;
  } else if (pgr_session_lost(s->conn, res)) {
    a->r = PGR_A_CONNLOST;
  } else {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_attempt_set_msg(a, PGR_A_RETRY, m ? m : PQerrorMessage(s->conn));
    snprintf(a->state, sizeof a->state, "%.5s", pgr_sqlstate_of(res));
    pgr_stmt_check_error(s, a->state);
  }
  PQclear(res);
}
