/*
 * webdb.c - the HTTP thread's database connection.
 *
 * Thread: see webdb.h. Its statements read pgrunner's tables through
 * bounded index ranges only (PGR_PLANNER_SETTINGS), and statement_timeout
 * bounds what a slow server can cost a scrape.
 */
#include "web/webdb.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "common.h"
#include "db.h"

#define RETRY_AFTER_NS 1000000000ull
#define SESSION_SETTINGS                                                       \
  PGR_PLANNER_SETTINGS "; SET statement_timeout = 5000; "                      \
                       "SET default_transaction_read_only = on"

static char *conninfo_, *appname_;
static PGconn *conn_;
static uint64_t failed_at_;
static char failed_msg_[256];

void pgr_webdb_setup(const char *conninfo, const char *appname) {
  free(conninfo_);
  free(appname_);
  conninfo_ = conninfo ? pgr_strdup(conninfo) : NULL;
  appname_ = pgr_strdup(appname ? appname : "pgrunner/web");
}

PGconn *pgr_webdb_get(char *err, size_t errlen) {
  char msg[256];

  if (conn_ != NULL && PQstatus(conn_) == CONNECTION_OK)
    return conn_;
  pgr_webdb_broken();
  if (failed_at_ != 0 && uv_hrtime() - failed_at_ < RETRY_AFTER_NS) {
    snprintf(err, errlen, "%s", failed_msg_);
    return NULL;
  }
  if (pgr_db_connect(conninfo_, appname_, &conn_, msg, sizeof msg) != 0 ||
      pgr_db_command(conn_, SESSION_SETTINGS, msg, sizeof msg) != 0) {
    pgr_webdb_broken();
    failed_at_ = uv_hrtime();
    snprintf(failed_msg_, sizeof failed_msg_, "%s", msg);
    snprintf(err, errlen, "%s", msg);
    return NULL;
  }
  failed_at_ = 0;
  return conn_;
}

void pgr_webdb_broken(void) {
  if (conn_ != NULL)
    PQfinish(conn_);
  conn_ = NULL;
}

void pgr_webdb_close(void) {
  pgr_webdb_broken();
  free(conninfo_);
  free(appname_);
  conninfo_ = appname_ = NULL;
  failed_at_ = 0;
}
