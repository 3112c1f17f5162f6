/*
 * db.c - blocking database helpers for worker threads and commands.
 *
 * Thread: never the event-loop thread (PGR_ASSERT_OFF_LOOP in each).
 */
#include "db.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "conninfo.h"
#include "log.h"

int pgr_db_connect(const char *conninfo, const char *appname, PGconn **out,
                   char *errbuf, size_t errlen) {
  struct pgr_conninfo ci;
  PGconn *conn = NULL;
  int rc;

  PGR_ASSERT_OFF_LOOP();
  *out = NULL;
  if ((rc = pgr_conninfo_parse(conninfo, appname, &ci, errbuf, errlen)) != 0)
    return rc;
  conn = PQconnectdbParams(ci.keywords, ci.values, 0);
  if (conn == NULL) {
    snprintf(errbuf, errlen, "out of memory connecting");
    rc = PGR_ECONN;
    goto out;
  }
  if (PQstatus(conn) != CONNECTION_OK) {
    char *safe = pgr_redact(conninfo, PQerrorMessage(conn));
    pgr_trim_end(safe);
    snprintf(errbuf, errlen, "could not connect to the database: %s", safe);
    free(safe);
    PQfinish(conn);
    conn = NULL;
    rc = PGR_ECONN;
    goto out;
  }
  PQsetNoticeProcessor(conn, pgr_log_pq_notice, NULL);
  *out = conn;
out:
  pgr_conninfo_free(&ci);
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
