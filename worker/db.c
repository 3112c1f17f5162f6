/*
 * db.c - blocking database helpers for worker threads and commands.
 *
 * Thread: never the event-loop thread (PGR_ASSERT_OFF_LOOP in each).
 */
#include "db.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "connerr.h"
#include "conninfo.h"
#include "log.h"

/* How often a connecting thread looks at its stop condition. */
#define STOP_CHECK_MS 200

/*
 * Drive PQconnectPoll with poll(2) rather than calling PQconnectdbParams:
 * libpq's blocking connect cannot be stopped (a server that accepts TCP and
 * never answers holds it for connect_timeout, forever by default), and its
 * error carries no SQLSTATE unless verbose messages were asked for before
 * the server answered.
 */
int pgr_db_connect_until(const char *conninfo, const char *appname,
                         pgr_db_stop_fn stop, void *arg, PGconn **out,
                         char *errbuf, size_t errlen, int *kind) {
  struct pgr_conninfo ci;
  PGconn *conn = NULL;
  PostgresPollingStatusType st = PGRES_POLLING_WRITING;
  const char *why = NULL;
  int rc;

  PGR_ASSERT_OFF_LOOP();
  *out = NULL;
  if (kind)
    *kind = PGR_CONNERR_RETRY;
  if ((rc = pgr_conninfo_parse(conninfo, appname, &ci, errbuf, errlen)) != 0) {
    if (kind)
      *kind = PGR_CONNERR_CONFIG;
    return rc;
  }
  uint64_t limit = pgr_connect_timeout_ms(&ci);
  uint64_t until = limit ? pgr_now_ms() + limit : 0;
  conn = PQconnectStartParams(ci.keywords, ci.values, 0);
  if (conn == NULL) {
    snprintf(errbuf, errlen, "out of memory connecting");
    rc = PGR_ECONN;
    goto out;
  }
  pgr_connerr_watch(conn);
  if (PQstatus(conn) == CONNECTION_BAD)
    st = PGRES_POLLING_FAILED;
  while (st != PGRES_POLLING_OK && st != PGRES_POLLING_FAILED) {
    if (stop && stop(arg)) {
      why = "stopping";
      break;
    }
    uint64_t now = pgr_now_ms();
    if (until && now >= until) {
      why = "timeout expired"; /* libpq's words for connect_timeout */
      break;
    }
    int wait = STOP_CHECK_MS;
    if (until && until - now < (uint64_t)wait)
      wait = (int)(until - now);
    /* libpq: "If PQconnectPoll(conn) last returned PGRES_POLLING_READING,
       wait until the socket is ready to read ... then call
       PQconnectPoll(conn) again." */
    struct pollfd pfd = {
        .fd = PQsocket(conn),
        .events = st == PGRES_POLLING_READING ? POLLIN : POLLOUT,
    };
    int n = poll(&pfd, 1, wait);
    if (n < 0 && errno != EINTR) {
      why = "cannot wait for the connection's socket";
      break;
    }
    if (n > 0)
      st = PQconnectPoll(conn);
  }
  if (st != PGRES_POLLING_OK) {
    char msg[1024];
    int k = pgr_connerr_classify(why ? why : PQerrorMessage(conn),
                                 why ? 0 : PQconnectionNeedsPassword(conn), msg,
                                 sizeof msg);
    if (kind)
      *kind = k;
    char *safe = pgr_redact(conninfo, msg);
    snprintf(errbuf, errlen, "%s", safe);
    free(safe);
    PQfinish(conn);
    conn = NULL;
    rc = PGR_ECONN;
    goto out;
  }
  pgr_connerr_unwatch(conn);
  PQsetNoticeProcessor(conn, pgr_log_pq_notice, NULL);
  *out = conn;
out:
  pgr_conninfo_free(&ci);
  return rc;
}

int pgr_db_connect(const char *conninfo, const char *appname, PGconn **out,
                   char *errbuf, size_t errlen) {
  char err[1024];
  int rc = pgr_db_connect_until(conninfo, appname, NULL, NULL, out, err,
                                sizeof err, NULL);
  if (rc == PGR_ECONN)
    snprintf(errbuf, errlen, "could not connect to the database: %s", err);
  else if (rc != 0)
    snprintf(errbuf, errlen, "%s", err);
  return rc;
}

int pgr_db_schema_missing(const char *sqlstate) {
  return sqlstate &&
         (strcmp(sqlstate, "3F000") == 0 || strcmp(sqlstate, "42P01") == 0 ||
          strcmp(sqlstate, "42883") == 0);
}

void pgr_db_describe_error(const PGresult *res, PGconn *conn, char *buf,
                           size_t len) {
  const char *primary =
      res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
  const char *detail =
      res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
  const char *hint = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_HINT) : NULL;
  const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
  char tmp[1024];

  if (primary == NULL) {
    snprintf(tmp, sizeof tmp, "%s",
             conn ? PQerrorMessage(conn) : "unknown error");
    pgr_trim_end(tmp);
    primary = tmp;
  }
  if (pgr_db_schema_missing(state) && strstr(primary, "pgrunner")) {
    snprintf(buf, len,
             "%s (the pgrunner schema is missing or out of date: "
             "run `pgrunner migrate`)",
             primary);
    return;
  }
  snprintf(buf, len, "%s%s%s%s%s", primary, detail ? " DETAIL: " : "",
           detail ? detail : "", hint ? " HINT: " : "", hint ? hint : "");
}

PGresult *pgr_db_exec(PGconn *conn, const char *sql, int nparams,
                      const char *const *params, char *errbuf, size_t errlen,
                      char sqlstate[6]) {
  PGresult *res;
  ExecStatusType st;

  PGR_ASSERT_OFF_LOOP();
  if (sqlstate)
    sqlstate[0] = '\0';
  /* No parameters: the simple protocol, which runs several statements. */
  res = nparams == 0
            ? PQexec(conn, sql)
            : PQexecParams(conn, sql, nparams, NULL, params, NULL, NULL, 0);
  st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
  if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK)
    return res;
  pgr_db_describe_error(res, conn, errbuf, errlen);
  if (sqlstate && res) {
    const char *s = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (s)
      snprintf(sqlstate, 6, "%.5s", s);
  }
  PQclear(res);
  return NULL;
}

int pgr_db_command(PGconn *conn, const char *sql, char *errbuf, size_t errlen) {
  PGresult *res = pgr_db_exec(conn, sql, 0, NULL, errbuf, errlen, NULL);
  if (res == NULL)
    return PGR_EDB;
  PQclear(res);
  return 0;
}
