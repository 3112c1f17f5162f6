/*
 * conn.c - a worker thread's session: connecting (with backoff, until it
 * works or the pool stops), and telling a session that can still be used
 * from one that cannot.
 *
 * Thread: worker threads only.
 */
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "db.h"
#include "health.h"
#include "jobs/attempt.h"
#include "log.h"

/* An error after which the server ends the session (a terminated backend,
   a shutdown), whether or not libpq has seen the socket close yet. */
int pgr_session_ending(const PGresult *res) {
  const char *sev =
      res ? PQresultErrorField(res, PG_DIAG_SEVERITY_NONLOCALIZED) : NULL;
  return sev && (strcmp(sev, "FATAL") == 0 || strcmp(sev, "PANIC") == 0);
}

/* Can this session, after a statement that failed with `res`, be used
   for anything more? Not if it is closed or closing, or still in a
   pipeline (where plain commands cannot run). */
int pgr_session_lost(PGconn *conn, const PGresult *res) {
  return res == NULL || PQstatus(conn) != CONNECTION_OK ||
         PQpipelineStatus(conn) != PQ_PIPELINE_OFF || pgr_session_ending(res);
}

static int stop_connecting(void *arg) {
  return pgr_pool_stopping(arg);
}

int pgr_slot_connect(struct pgr_slot *s) {
  struct pgr_pool *p = s->pool;
  char err[1024];
  uint64_t backoff = 100;
  PGconn *conn;

  PGR_ASSERT_OFF_LOOP();
  pgr_stmt_reset(s); /* they die with the session */
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
    if (pgr_db_connect_until(p->cfg->db, p->appname, stop_connecting, p, &conn,
                             err, sizeof err, NULL) == 0)
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
void pgr_slot_set_backend_pid(struct pgr_slot *s, int pid) {
  uv_mutex_lock(&s->pool->mu);
  s->backend_pid = pid;
  uv_mutex_unlock(&s->pool->mu);
}

/* Run one simple command outside a pipeline; errors go to a->msg. */
int pgr_slot_command(PGconn *conn, const char *sql) {
  PGresult *res = PQexec(conn, sql);
  int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
  PQclear(res);
  return ok ? 0 : PGR_EDB;
}

/*
 * Is this idle connection still there? A server that restarted (or
 * terminated the session) while the thread waited has closed the socket,
 * which then reads as end-of-file. Finding that out now, without a round
 * trip, means the attempt starts on a fresh connection instead of being
 * spent on a dead one. A peer that vanished without closing (a cut cable)
 * is only found when the attempt uses the connection, as before.
 */
int pgr_slot_conn_alive(PGconn *conn) {
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
