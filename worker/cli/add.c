/*
 * add.c - `pgrunner add KIND [PAYLOAD] [options]`: add one task through
 * pgrunner.add_task() and print its id.
 *
 * Thread: main thread of the command (blocking).
 *
 * The payload was already validated as JSON by config.c before we get here,
 * so bad JSON never reaches the database.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "cli.h"
#include "db.h"
#include "log.h"

static const char add_sql[] = "SELECT pgrunner.add_task("
                              " kind => $1,"
                              " payload => $2::jsonb,"
                              " queue => coalesce($3, 'default'),"
                              " run_at => coalesce($4::timestamptz,"
                              "                    now() + "
                              "coalesce($5::float8, 0) * interval '1 second'),"
                              " priority => coalesce($6::int, 0),"
                              " max_attempts => $7::int,"
                              " key => $8)";

int pgr_cmd_add(const struct pgr_config *cfg) {
  PGconn *conn = NULL;
  PGresult *res = NULL;
  char err[2048];
  char sqlstate[6] = "";
  char delay[64], prio[32], maxa[32];
  const char *params[8];
  int rc;

  snprintf(delay, sizeof delay, "%.6f", cfg->add_delay_s);
  snprintf(prio, sizeof prio, "%d", cfg->add_priority);
  snprintf(maxa, sizeof maxa, "%d", cfg->add_max_attempts);
  params[0] = cfg->add_kind;
  params[1] = cfg->add_payload;
  params[2] = cfg->add_queue;
  params[3] = cfg->add_run_at;
  params[4] = cfg->add_delay_s >= 0 ? delay : NULL;
  params[5] = cfg->add_has_priority ? prio : NULL;
  params[6] = cfg->add_max_attempts > 0 ? maxa : NULL;
  params[7] = cfg->add_key;

  if ((rc = pgr_db_connect(cfg->db, "pgrunner add", &conn, err, sizeof err)) !=
      0)
    goto out;
  res = pgr_db_exec(conn, add_sql, 8, params, err, sizeof err, sqlstate);
  if (res == NULL) {
    /* Class 22 is "data exception": the user's --run-at or payload. */
    rc = strncmp(sqlstate, "22", 2) == 0 ? PGR_EUSAGE : PGR_EDB;
    goto out;
  }
  printf("%s\n", PQgetvalue(res, 0, 0));
  fflush(stdout);
  /* Exactly the fields SPEC section 7 shows for this line. */
  pgr_info("task added", PGR_LI("task", atoll(PQgetvalue(res, 0, 0))),
           PGR_LS("kind", cfg->add_kind));
out:
  if (rc != 0)
    pgr_error("add failed", PGR_LS("error", err));
  PQclear(res);
  PQfinish(conn);
  return rc;
}
