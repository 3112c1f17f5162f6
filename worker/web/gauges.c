/*
 * gauges.c - queue depth, age, running, recent failures and live workers,
 * for /metrics.
 *
 * Thread: the HTTP server's thread. Every read is a bounded index range, so a
 * scrape costs the same on a table of a thousand rows or ten million:
 *   - queued: tasks_claim_idx, counted up to PGR_GAUGE_CAP;
 *   - not yet due: tasks_delayed_idx from now on, up to the cap (due is
 *     queued minus those);
 *   - oldest due: per priority present in the queue (a skip scan of
 *     tasks_claim_idx, one probe per distinct priority), the first run_at;
 *   - running: tasks_running_idx, up to the cap;
 *   - failed in the last hour: tasks_ended_idx from an hour ago;
 *   - live workers: the workers table (one row per worker).
 * tests/integration/test_plans.py checks these plans on large tables.
 */
#include "web/gauges.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "db.h"
#include "metrics.h"
#include "web/webdb.h"

static const char gauges_sql[] =
    "SELECT q.name,"
    " (SELECT count(*) FROM (SELECT 1 FROM pgrunner.tasks t"
    "   WHERE t.state = 'queued' AND NOT t.serial_held"
    "         AND t.queue = q.name LIMIT $2) x),"
    " (SELECT count(*) FROM (SELECT 1 FROM pgrunner.tasks t"
    "   WHERE t.state = 'queued' AND NOT t.serial_held AND t.queue = q.name"
    "     AND t.run_at > t.created_at AND t.run_at > now() LIMIT $2) x),"
    " (WITH RECURSIVE p(pr) AS ("
    "    (SELECT t.priority FROM pgrunner.tasks t"
    "      WHERE t.state = 'queued' AND NOT t.serial_held AND t.queue = q.name"
    "      ORDER BY t.priority LIMIT 1)"
    "    UNION ALL"
    "    SELECT (SELECT t.priority FROM pgrunner.tasks t"
    "             WHERE t.state = 'queued' AND NOT t.serial_held"
    "                   AND t.queue = q.name"
    "               AND t.priority > p.pr ORDER BY t.priority LIMIT 1)"
    "      FROM p WHERE p.pr IS NOT NULL)"
    "  SELECT extract(epoch FROM now() - min((SELECT t.run_at"
    "           FROM pgrunner.tasks t"
    "          WHERE t.state = 'queued' AND NOT t.serial_held"
    "                AND t.queue = q.name"
    "            AND t.priority = p.pr AND t.run_at <= now()"
    "          ORDER BY t.run_at LIMIT 1)))"
    "    FROM p WHERE p.pr IS NOT NULL),"
    " (SELECT count(*) FROM (SELECT 1 FROM pgrunner.tasks t"
    "   WHERE t.state = 'running' AND t.queue = q.name LIMIT $2) x),"
    " (SELECT count(*) FROM (SELECT 1 FROM pgrunner.tasks t"
    "   WHERE t.state IN ('failed', 'cancelled') AND t.state = 'failed'"
    "     AND t.queue = q.name"
    "     AND t.finished_at > now() - interval '1 hour' LIMIT $2) x)"
    "  FROM unnest($1::text[]) AS q(name)";

PGresult *pgr_gauges_query(PGconn *conn, const char *queues, char *err,
                           size_t errlen) {
  char cap[16], sqlstate[6];
  snprintf(cap, sizeof cap, "%d", PGR_GAUGE_CAP);
  const char *params[2] = {queues, cap};
  return pgr_db_exec(conn, gauges_sql, 2, params, err, errlen, sqlstate);
}

static const char workers_sql[] =
    "SELECT count(*) FROM pgrunner.workers w"
    " WHERE w.heartbeat_at > now() - interval '30 seconds'";

static void header(struct pgr_buf *b, const char *name, const char *help) {
  pgr_buf_printf(b, "# HELP %s %s\n# TYPE %s gauge\n", name, help, name);
}

static void series(struct pgr_buf *b, const char *name, const char *queue,
                   const char *value) {
  pgr_buf_printf(b, "%s{queue=\"", name);
  pgr_metrics_add_label_value(b, queue);
  pgr_buf_printf(b, "\"} %s\n", value);
}

void pgr_gauges_render(const char *const *queues, size_t nqueues,
                       struct pgr_buf *out) {
  static const struct {
    const char *name, *help;
  } g[] = {
      {"pgrunner_queue_queued", "Tasks queued, due or not (capped)."},
      {"pgrunner_queue_due", "Tasks queued whose run_at has come (capped)."},
      {"pgrunner_queue_oldest_due_age_seconds",
       "Age of the oldest due task's run_at; 0 when none is due."},
      {"pgrunner_queue_running", "Tasks running, in all workers (capped)."},
      {"pgrunner_queue_failed_last_hour",
       "Tasks that failed for good in the last hour (capped)."},
  };
  char err[256], sqlstate[6];
  struct pgr_buf arr;
  PGresult *rows = NULL, *live = NULL;
  PGconn *conn = pgr_webdb_get(err, sizeof err);

  pgr_buf_init(&arr);
  if (conn == NULL)
    goto out;
  pgr_buf_add_array(&arr, queues, nqueues);
  rows = pgr_gauges_query(conn, arr.data, err, sizeof err);
  if (rows != NULL)
    live = pgr_db_exec(conn, workers_sql, 0, NULL, err, sizeof err, sqlstate);
  if (rows == NULL || live == NULL) {
    if (PQstatus(conn) != CONNECTION_OK)
      pgr_webdb_broken();
    goto out;
  }

  int n = PQntuples(rows);
  for (size_t k = 0; k < PGR_ARRAY_LEN(g); k++) {
    header(out, g[k].name, g[k].help);
    for (int i = 0; i < n; i++) {
      const char *q = PQgetvalue(rows, i, 0);
      long long queued = atoll(PQgetvalue(rows, i, 1));
      long long later = atoll(PQgetvalue(rows, i, 2));
      char v[64];
      switch (k) {
      case 0:
        snprintf(v, sizeof v, "%lld", queued);
        break;
      case 1:
        snprintf(v, sizeof v, "%lld", queued > later ? queued - later : 0);
        break;
      case 2:
        snprintf(v, sizeof v, "%.3f",
                 PQgetisnull(rows, i, 3) ? 0.0 : atof(PQgetvalue(rows, i, 3)));
        break;
      default:
        snprintf(v, sizeof v, "%s", PQgetvalue(rows, i, (int)k + 1));
      }
      series(out, g[k].name, q, v);
    }
  }
  header(out, "pgrunner_workers_live",
         "Workers whose heartbeat is under 30 s old.");
  pgr_buf_printf(out, "pgrunner_workers_live %s\n", PQgetvalue(live, 0, 0));
out:
  header(out, "pgrunner_gauges_up",
         "1 if the queue gauges above could be read from the database.");
  pgr_buf_printf(out, "pgrunner_gauges_up %d\n", live != NULL);
  PQclear(rows);
  PQclear(live);
  pgr_buf_free(&arr);
}
