/*
 * stmt.c - the statements a worker thread sends for its attempts: named
 * prepared statements on a session of its own, unnamed ones through a
 * transaction pooler.
 *
 * Thread: worker threads only (blocking libpq on the slot's connection).
 *
 * A named prepared statement lives on one server session. Behind a
 * transaction pooler (PgBouncer pool_mode=transaction) the next
 * transaction may run on another server connection, where the name does
 * not exist, so there every statement is unnamed and parsed, analysed and
 * planned again at each use. That costs more than the no-op's whole
 * success mark, and more still for a SQL task's five statements.
 *
 * The threads' connections are known to be sessions when they use the
 * very conninfo the loop's two connections use (no --listen-db of its
 * own): the loop checks at start that those reach one server backend for
 * the whole session, and `work` exits before any attempt if they do not
 * (session.c). With a --listen-db of their own, the threads' --db may be a
 * transaction pool, and their statements stay unnamed.
 *
 * A statement is prepared on the session the first time it is needed,
 * before the attempt's pipeline starts (PQprepare cannot run inside one);
 * one that fails to prepare (its function missing, say) is sent unnamed,
 * and fails there the way it always did. A prepared plan the server can no
 * longer use as it is (a migration changed a function's result type:
 * SQLSTATE 0A000), or a name the session lost (26000), makes the slot
 * forget them all (pgr_stmt_check_error): the attempt that met it fails
 * and is retried as any failed attempt, and the next one prepares afresh.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/attempt.h"
#include "log.h"

/* Each named after its enum pgr_stmt_id. */
static const struct {
  const char *name;
  const char *sql;
  int nparams;
} fixed[PGR_STMT_FIXED] = {
    [PGR_STMT_NOOP] = {"pgr_0",
                       "SELECT pgrunner.complete_noop($1::bigint, $2::int,"
                       " $3::bigint)",
                       3},
    /* The attempt's settings (pipeline.c says why each is there). The
       server notices a client that died in the middle of a long query
       within a second with client_connection_check_interval, which servers
       before 14 do not have (settings13_sql). */
    [PGR_STMT_SETTINGS] = {"pgr_1",
                           "SELECT pg_backend_pid(),"
                           " set_config('statement_timeout', $1, true),"
                           " set_config('client_connection_check_interval',"
                           " '1000', true)",
                           1},
    [PGR_STMT_LOCK] = {"pgr_2",
                       "SELECT pgrunner.lock_attempt($1::bigint, $2::int,"
                       " $3::bigint)",
                       3},
    [PGR_STMT_COMPLETE] = {"pgr_3",
                           "SELECT pgrunner.complete_attempt($1::bigint,"
                           " $2::int, $3::bigint, $4::jsonb)",
                           4},
};

static const char settings13_sql[] =
    "SELECT pg_backend_pid(), set_config('statement_timeout', $1, true)";

static const char *sql_of(PGconn *conn, enum pgr_stmt_id id) {
  if (id == PGR_STMT_SETTINGS && PQserverVersion(conn) < 140000)
    return settings13_sql;
  return fixed[id].sql;
}

int pgr_stmt_may_prepare(const struct pgr_config *cfg) {
  return cfg->listen_db == NULL || strcmp(cfg->listen_db, cfg->db) == 0;
}

void pgr_stmt_reset(struct pgr_slot *s) {
  s->stmt_prepared = 0;
  s->stmt_failed = 0;
  for (int i = 0; i < s->ncalls; i++)
    free(s->calls[i]);
  s->ncalls = 0;
}

/* Prepare `sql` as `name` on the slot's session: 0, or -1 if the server
   refused it (the statement is then sent unnamed). */
static int prepare(struct pgr_slot *s, const char *name, const char *sql,
                   int nparams) {
  PGresult *res = PQprepare(s->conn, name, sql, nparams, NULL);
  int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
  if (!ok)
    pgr_debug("statement not prepared; sending it unnamed",
              PGR_LI("thread", s->index), PGR_LS("statement", name),
              PGR_LS("error", PQresultErrorMessage(res)));
  PQclear(res);
  return ok ? 0 : -1;
}

void pgr_stmt_prepare(struct pgr_slot *s, enum pgr_stmt_id id) {
  unsigned bit = 1u << id;

  if (!s->pool->prepare || s->conn == NULL ||
      ((s->stmt_prepared | s->stmt_failed) & bit) ||
      PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF)
    return;
  if (prepare(s, fixed[id].name, sql_of(s->conn, id), fixed[id].nparams) == 0)
    s->stmt_prepared |= bit;
  else
    s->stmt_failed |= bit;
}

int pgr_stmt_send(struct pgr_slot *s, enum pgr_stmt_id id,
                  const char *const *params) {
  if (s->stmt_prepared & (1u << id))
    return PQsendQueryPrepared(s->conn, fixed[id].name, fixed[id].nparams,
                               params, NULL, NULL, 0);
  return PQsendQueryParams(s->conn, sql_of(s->conn, id), fixed[id].nparams,
                           NULL, params, NULL, NULL, 0);
}

PGresult *pgr_stmt_exec(struct pgr_slot *s, enum pgr_stmt_id id,
                        const char *const *params) {
  if (s->stmt_prepared & (1u << id))
    return PQexecPrepared(s->conn, fixed[id].name, fixed[id].nparams, params,
                          NULL, NULL, 0);
  return PQexecParams(s->conn, sql_of(s->conn, id), fixed[id].nparams, NULL,
                      params, NULL, NULL, 0);
}

/* The name of SQL-task call statement `i`. */
static void call_name(char name[32], int i) {
  snprintf(name, 32, "pgr_call_%d", i);
}

int pgr_stmt_prepare_call(struct pgr_slot *s, const char *kind,
                          const char *sql) {
  char name[32];
  for (int i = 0; i < s->ncalls; i++)
    if (strcmp(s->calls[i], kind) == 0)
      return i;
  /* A worker serves a handful of kinds; past that they go unnamed rather
     than hold a statement per kind for the session's life. */
  if (!s->pool->prepare || s->conn == NULL || s->ncalls >= PGR_STMT_CALLS ||
      PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF)
    return -1;
  call_name(name, s->ncalls);
  if (prepare(s, name, sql, 4) != 0)
    return -1;
  s->calls[s->ncalls] = pgr_strdup(kind);
  return s->ncalls++;
}

int pgr_stmt_send_call(struct pgr_slot *s, int call, const char *sql,
                       const char *const *params) {
  char name[32];
  if (call >= 0) {
    call_name(name, call);
    return PQsendQueryPrepared(s->conn, name, 4, params, NULL, NULL, 0);
  }
  return PQsendQueryParams(s->conn, sql, 4, NULL, params, NULL, NULL, 0);
}

void pgr_stmt_check_error(struct pgr_slot *s, const char *sqlstate) {
  if ((s->stmt_prepared == 0 && s->ncalls == 0) ||
      (strcmp(sqlstate, "0A000") != 0 && strcmp(sqlstate, "26000") != 0))
    return;
  pgr_warn("forgetting the session's prepared statements",
           PGR_LI("thread", s->index), PGR_LS("sqlstate", sqlstate));
  /* The names go with them; a session that cannot run this is reconnected
     by the next attempt's liveness check. */
  if (PQpipelineStatus(s->conn) == PQ_PIPELINE_OFF &&
      PQtransactionStatus(s->conn) == PQTRANS_IDLE)
    (void)pgr_slot_command(s->conn, "DEALLOCATE ALL");
  pgr_stmt_reset(s);
}
