/*
 * admin.c - the operator commands: status, cancel, retry.
 *
 * Thread: main thread of the command (blocking).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>
#include <libpq-fe.h>

#include "cli.h"
#include "db.h"
#include "log.h"

static const char *states[] = {"queued", "running", "succeeded", "failed",
                               "cancelled"};

/*
 * Counts that cost the same whatever the table holds: each reads at most
 * STATUS_LIMIT index entries per queue and state (more queued tasks show
 * as "10000+"). Queued: per queue (the queues found by skipping through
 * tasks_claim_idx). Running: all of them (bounded by the live workers).
 * Finished states: among the STATUS_LIMIT most recent of each index, so a
 * full window means "at least". Rows: queue, state, count, capped.
 */
#define STATUS_LIMIT 10000
#define STR_(x) #x
#define STR(x) STR_(x)
static const char counts_sql[] =
    "WITH RECURSIVE qn AS ("
    "  (SELECT t.queue FROM pgrunner.tasks t"
    "    WHERE t.state = 'queued' AND NOT t.serial_held"
    "    ORDER BY t.queue LIMIT 1)"
    "  UNION ALL"
    "  SELECT (SELECT t.queue FROM pgrunner.tasks t"
    "           WHERE t.state = 'queued' AND NOT t.serial_held"
    "                 AND t.queue > qn.queue"
    "           ORDER BY t.queue LIMIT 1)"
    "    FROM qn WHERE qn.queue IS NOT NULL"
    "), done AS ("
    "  SELECT t.queue, t.state FROM pgrunner.tasks t"
    "   WHERE t.state = 'succeeded' ORDER BY t.finished_at DESC"
    "   LIMIT " STR(
        STATUS_LIMIT) ""
                      "), ended AS ("
                      "  SELECT t.queue, t.state FROM pgrunner.tasks t"
                      "   WHERE t.state IN ('failed', 'cancelled') ORDER BY "
                      "t.finished_at DESC"
                      "   LIMIT " STR(
                          STATUS_LIMIT) ""
                                        ") "
                                        "SELECT queue, state, n, capped FROM ("
                                        "  SELECT qn.queue, 'queued' AS state, "
                                        "least(c.n, " STR(
                                            STATUS_LIMIT) ") AS n,"
                                                          "         c.n > " STR(
                                                              STATUS_LIMIT) " A"
                                                                            "S "
                                                                            "ca"
                                                                            "pp"
                                                                            "ed"
                                                                            "  "
                                                                            "  "
                                                                            "FR"
                                                                            "OM"
                                                                            " q"
                                                                            "n "
                                                                            "CR"
                                                                            "OS"
                                                                            "S "
                                                                            "JO"
                                                                            "IN"
                                                                            " L"
                                                                            "AT"
                                                                            "ER"
                                                                            "AL"
                                                                            " ("
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "SE"
                                                                            "LE"
                                                                            "CT"
                                                                            " c"
                                                                            "ou"
                                                                            "nt"
                                                                            "(*"
                                                                            ") "
                                                                            "AS"
                                                                            " n"
                                                                            " F"
                                                                            "RO"
                                                                            "M "
                                                                            "(S"
                                                                            "EL"
                                                                            "EC"
                                                                            "T "
                                                                            "1 "
                                                                            "FR"
                                                                            "OM"
                                                                            " p"
                                                                            "gr"
                                                                            "un"
                                                                            "ne"
                                                                            "r."
                                                                            "ta"
                                                                            "sk"
                                                                            "s "
                                                                            "t"
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "WH"
                                                                            "ER"
                                                                            "E "
                                                                            "t."
                                                                            "st"
                                                                            "at"
                                                                            "e "
                                                                            "= "
                                                                            "'q"
                                                                            "ue"
                                                                            "ue"
                                                                            "d'"
                                                                            " A"
                                                                            "ND"
                                                                            " N"
                                                                            "OT"
                                                                            " t"
                                                                            ".s"
                                                                            "er"
                                                                            "ia"
                                                                            "l_"
                                                                            "he"
                                                                            "ld"
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "AN"
                                                                            "D "
                                                                            "t."
                                                                            "qu"
                                                                            "eu"
                                                                            "e "
                                                                            "= "
                                                                            "qn"
                                                                            ".q"
                                                                            "ue"
                                                                            "ue"
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "  "
                                                                            "LI"
                                                                            "MI"
                                                                            "T"
                                                                            " " STR(
                                                                                STATUS_LIMIT) " + 1) x) c"
                                                                                              "   WHERE qn.queue IS NOT NULL"
                                                                                              "  UNION ALL"
                                                                                              "  SELECT t.queue, 'running', count(*), false FROM pgrunner.tasks t"
                                                                                              "   WHERE t.state = 'running' GROUP BY t.queue"
                                                                                              "  UNION ALL"
                                                                                              "  SELECT d.queue, d.state, count(*),"
                                                                                              "         (SELECT count(*) FROM done) >= " STR(
                                                                                                  STATUS_LIMIT) ""
                                                                                                                "    FROM done d GROUP BY d.queue, d.state"
                                                                                                                "  UNION ALL"
                                                                                                                "  SELECT e.queue, e.state, count(*),"
                                                                                                                "         (SELECT count(*) FROM ended) >= " STR(
                                                                                                                    STATUS_LIMIT) ""
                                                                                                                                  "    FROM ended e GROUP BY e.queue, e.state"
                                                                                                                                  ") s ORDER BY queue, state";
static const char workers_sql[] =
    "SELECT id, name, coalesce(host, ''), coalesce(pid, 0),"
    " array_to_string(queues, ','), coalesce(concurrency, 0),"
    " to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),"
    " extract(epoch FROM now() - heartbeat_at)::float8 "
    "FROM pgrunner.workers ORDER BY started_at";
static const char failures_sql[] =
    "SELECT id, kind, queue, attempts,"
    " to_char(finished_at AT TIME ZONE 'UTC', "
    "'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),"
    " coalesce(last_error, '') "
    "FROM pgrunner.tasks WHERE state = 'failed' "
    "ORDER BY finished_at DESC LIMIT 10"; /* tasks_ended_idx, backwards */

static int state_index(const char *s) {
  for (int i = 0; i < 5; i++)
    if (strcmp(states[i], s) == 0)
      return i;
  return -1;
}

static void print_text(PGresult *counts, PGresult *workers,
                       PGresult *failures) {
  printf("%-20s %10s %10s %10s %10s %10s\n", "QUEUE", "QUEUED", "RUNNING",
         "SUCCEEDED", "FAILED", "CANCELLED");
  int n = PQntuples(counts);
  int any_capped = 0;
  for (int i = 0; i < n;) {
    const char *q = PQgetvalue(counts, i, 0);
    char c[5][24];
    for (int s = 0; s < 5; s++)
      strcpy(c[s], "0");
    while (i < n && strcmp(PQgetvalue(counts, i, 0), q) == 0) {
      int s = state_index(PQgetvalue(counts, i, 1));
      int capped = PQgetvalue(counts, i, 3)[0] == 't';
      if (s >= 0)
        snprintf(c[s], sizeof c[s], "%lld%s", atoll(PQgetvalue(counts, i, 2)),
                 capped ? "+" : "");
      any_capped |= capped;
      i++;
    }
    printf("%-20s %10s %10s %10s %10s %10s\n", q, c[0], c[1], c[2], c[3], c[4]);
  }
  if (n == 0)
    printf("(no tasks)\n");
  if (any_capped)
    printf("(N+: at least N; status reads at most %d tasks per queue and "
           "state, and the %d most recent finished ones)\n",
           STATUS_LIMIT, STATUS_LIMIT);
  printf("\nWORKERS: %d live\n", PQntuples(workers));
  for (int i = 0; i < PQntuples(workers); i++)
    printf("  %s host=%s pid=%s queues=%s concurrency=%s started=%s "
           "heartbeat=%.1fs ago\n",
           PQgetvalue(workers, i, 1), PQgetvalue(workers, i, 2),
           PQgetvalue(workers, i, 3), PQgetvalue(workers, i, 4),
           PQgetvalue(workers, i, 5), PQgetvalue(workers, i, 6),
           atof(PQgetvalue(workers, i, 7)));
  printf("\nRECENT FAILURES:\n");
  if (PQntuples(failures) == 0)
    printf("  (none)\n");
  for (int i = 0; i < PQntuples(failures); i++) {
    const char *e = PQgetvalue(failures, i, 5);
    printf("  task=%s kind=%s queue=%s attempts=%s finished=%s error=%.*s%s\n",
           PQgetvalue(failures, i, 0), PQgetvalue(failures, i, 1),
           PQgetvalue(failures, i, 2), PQgetvalue(failures, i, 3),
           PQgetvalue(failures, i, 4), 200, e, strlen(e) > 200 ? "..." : "");
  }
}

static void print_json(PGresult *counts, PGresult *workers,
                       PGresult *failures) {
  json_t *root = json_object();
  json_t *queues = json_object();
  json_t *ws = json_array();
  json_t *fs = json_array();
  json_t *totals = json_object();
  int exact = 1;

  for (int s = 0; s < 5; s++)
    json_object_set_new(totals, states[s], json_integer(0));
  for (int i = 0; i < PQntuples(counts); i++) {
    const char *q = PQgetvalue(counts, i, 0);
    const char *st = PQgetvalue(counts, i, 1);
    json_int_t c = atoll(PQgetvalue(counts, i, 2));
    if (PQgetvalue(counts, i, 3)[0] == 't')
      exact = 0;
    json_t *qo = json_object_get(queues, q);
    if (qo == NULL) {
      qo = json_object();
      for (int s = 0; s < 5; s++)
        json_object_set_new(qo, states[s], json_integer(0));
      json_object_set_new(queues, q, qo);
    }
    json_object_set_new(qo, st, json_integer(c));
    json_object_set_new(
        totals, st,
        json_integer(json_integer_value(json_object_get(totals, st)) + c));
  }
  /* Ids are bigint: as JSON numbers, jq and JavaScript would round those
     above 2^53 (every worker id is a random 63-bit number; a task id can
     be any bigint a producer inserts). They are strings, as in the
     database's own text form. */
  for (int i = 0; i < PQntuples(workers); i++)
    json_array_append_new(
        ws,
        json_pack("{s:s,s:s,s:s,s:i,s:s,s:i,s:s,s:f}", "id",
                  PQgetvalue(workers, i, 0), "name", PQgetvalue(workers, i, 1),
                  "host", PQgetvalue(workers, i, 2), "pid",
                  atoi(PQgetvalue(workers, i, 3)), "queues",
                  PQgetvalue(workers, i, 4), "concurrency",
                  atoi(PQgetvalue(workers, i, 5)), "started_at",
                  PQgetvalue(workers, i, 6), "heartbeat_age_s",
                  atof(PQgetvalue(workers, i, 7))));
  for (int i = 0; i < PQntuples(failures); i++)
    json_array_append_new(fs,
                          json_pack("{s:s,s:s,s:s,s:i,s:s,s:s}", "id",
                                    PQgetvalue(failures, i, 0), "kind",
                                    PQgetvalue(failures, i, 1), "queue",
                                    PQgetvalue(failures, i, 2), "attempts",
                                    atoi(PQgetvalue(failures, i, 3)),
                                    "finished_at", PQgetvalue(failures, i, 4),
                                    "last_error", PQgetvalue(failures, i, 5)));
  json_object_set_new(root, "queues", queues);
  json_object_set_new(root, "totals", totals);
  /* false: some counts are lower bounds (see counts_sql) */
  json_object_set_new(root, "counts_exact", json_boolean(exact));
  json_object_set_new(root, "count_limit", json_integer(STATUS_LIMIT));
  json_object_set_new(root, "workers", ws);
  json_object_set_new(root, "live_workers", json_integer(PQntuples(workers)));
  json_object_set_new(root, "recent_failures", fs);
  char *s = json_dumps(root, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
  printf("%s\n", s);
  free(s);
  json_decref(root);
}

int pgr_cmd_status(const struct pgr_config *cfg) {
  PGconn *conn = NULL;
  PGresult *counts = NULL, *workers = NULL, *failures = NULL;
  char err[2048];
  int rc;

  if ((rc = pgr_db_connect(cfg->db, "pgrunner status", &conn, err,
                           sizeof err)) != 0)
    goto out;
  /* One snapshot for the three queries. */
  if ((rc = pgr_db_command(conn,
                           "BEGIN ISOLATION LEVEL REPEATABLE READ READ "
                           "ONLY",
                           err, sizeof err)) != 0)
    goto out;
  if ((rc = pgr_db_command(conn, PGR_PLANNER_SETTINGS_LOCAL, err,
                           sizeof err)) != 0)
    goto out;
  rc = PGR_EDB;
  if ((counts = pgr_db_exec(conn, counts_sql, 0, NULL, err, sizeof err,
                            NULL)) == NULL)
    goto out;
  if ((workers = pgr_db_exec(conn, workers_sql, 0, NULL, err, sizeof err,
                             NULL)) == NULL)
    goto out;
  if ((failures = pgr_db_exec(conn, failures_sql, 0, NULL, err, sizeof err,
                              NULL)) == NULL)
    goto out;
  rc = 0;
  if (cfg->json)
    print_json(counts, workers, failures);
  else
    print_text(counts, workers, failures);
  fflush(stdout);
out:
  if (rc != 0)
    pgr_error("status failed", PGR_LS("error", err));
  PQclear(counts);
  PQclear(workers);
  PQclear(failures);
  PQfinish(conn);
  return rc;
}

/* cancel and retry differ only in the function and the words printed. */
static int task_call(const struct pgr_config *cfg, const char *what,
                     const char *sql, const char *done_msg) {
  PGconn *conn = NULL;
  PGresult *res = NULL;
  char err[2048];
  char sqlstate[6];
  char idbuf[32];
  const char *params[1] = {idbuf};
  char appname[64];
  int rc;

  snprintf(idbuf, sizeof idbuf, "%lld", (long long)cfg->task_id);
  snprintf(appname, sizeof appname, "pgrunner %s", what);
  if ((rc = pgr_db_connect(cfg->db, appname, &conn, err, sizeof err)) != 0)
    goto out;
  if ((rc = pgr_db_command(conn, "BEGIN", err, sizeof err)) != 0 ||
      (rc = pgr_db_command(conn, PGR_PLANNER_SETTINGS_LOCAL, err,
                           sizeof err)) != 0)
    goto out;
  res = pgr_db_exec(conn, sql, 1, params, err, sizeof err, sqlstate);
  if (res == NULL) {
    rc = PGR_EDB;
    if (strcmp(sqlstate, "P0002") == 0) {
      rc = PGR_ENOTFOUND;
      snprintf(err, sizeof err, "no task with id %s", idbuf);
    }
    goto out;
  }
  if ((rc = pgr_db_command(conn, "COMMIT", err, sizeof err)) != 0)
    goto out;
  if (strcmp(PQgetvalue(res, 0, 0), "t") == 0) {
    printf("%s\n", done_msg);
    pgr_info(done_msg, PGR_LI("task", cfg->task_id));
  } else {
    printf("task %s is %s; left as it is\n", idbuf, PQgetvalue(res, 0, 1));
  }
  fflush(stdout);
out:
  if (rc != 0) {
    char m[64];
    snprintf(m, sizeof m, "%s failed", what);
    pgr_error(m, PGR_LI("task", cfg->task_id), PGR_LS("error", err));
  }
  PQclear(res);
  PQfinish(conn);
  return rc;
}

int pgr_cmd_cancel(const struct pgr_config *cfg) {
  return task_call(cfg, "cancel",
                   "SELECT pgrunner.cancel_task($1::bigint),"
                   " (SELECT state FROM pgrunner.tasks WHERE id = $1::bigint)",
                   "task cancelled");
}

int pgr_cmd_retry(const struct pgr_config *cfg) {
  return task_call(cfg, "retry",
                   "SELECT pgrunner.retry_task($1::bigint),"
                   " (SELECT state FROM pgrunner.tasks WHERE id = $1::bigint)",
                   "task queued again");
}
