/*
 * dashboard.c - a plain server-rendered dashboard: HTML built here, a small
 * script for the two actions, nothing fetched from elsewhere.
 *
 * Thread: the HTTP server's thread. Every read is bounded by an index range
 * and a LIMIT (the queue figures are gauges.c's; the chart reads
 * pgrunner.queue_stats, at most 60 rows per queue), so the page costs the
 * same on a table of any size; tests/integration/test_dashboard.py checks
 * the plans on a large table. Every database string is escaped
 * (pgr_html_text) and the page is served with a Content-Security-Policy that
 * runs no inline script, so a kind, payload or error holding HTML shows as
 * text.
 */
#include "web/dashboard.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "db.h"
#include "web/gauges.h"
#include "web/html.h"
#include "web/webdb.h"

#define MAX_ROWS 50

static const char app_css[] =
    "body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}"
    "h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}"
    "table{border-collapse:collapse}td,th{padding:.25em .7em;text-align:left;"
    "border-bottom:1px solid #ddd;vertical-align:top}"
    "th{background:#f4f4f4}td.n{text-align:right}"
    ".err{color:#a00;white-space:pre-wrap;max-width:50em}"
    "pre{background:#f6f6f6;padding:.6em;white-space:pre-wrap;max-width:60em}"
    "svg{background:#fafafa}.bar{fill:#4a7}.fail{fill:#c33}"
    "button{margin-right:.5em}.ro{color:#777}";

/* The actions: the token lives in this tab's sessionStorage and goes in a
 * header, never in a cookie, so another site cannot make the browser use
 * it. */
static const char app_js[] =
    "document.addEventListener('click', async function (e) {\n"
    "  var b = e.target.closest('button[data-action]');\n"
    "  if (!b) return;\n"
    "  var t = sessionStorage.getItem('pgrunner-token') ||\n"
    "          prompt('Admin token (PGRUNNER_ADMIN_TOKEN)');\n"
    "  if (!t) return;\n"
    "  var r = await fetch('/api/tasks/' + b.dataset.task + '/' +\n"
    "                      b.dataset.action,\n"
    "                      {method: 'POST', headers: {'X-Pgrunner-Token': "
    "t}});\n"
    "  var j = await r.json().catch(function () { return {}; });\n"
    "  if (r.ok) sessionStorage.setItem('pgrunner-token', t);\n"
    "  else sessionStorage.removeItem('pgrunner-token');\n"
    "  var out = document.getElementById('result');\n"
    "  out.textContent = r.ok ? (j.changed ? b.dataset.action + ': done'\n"
    "                                      : b.dataset.action + ': no "
    "change')\n"
    "                         : 'refused: ' + (j.error || r.status);\n"
    "  if (r.ok && j.changed) setTimeout(function () { location.reload(); },\n"
    "                                    300);\n"
    "});\n";

const char *pgr_dash_asset(const char *path, const char **ctype) {
  if (strcmp(path, "/app.js") == 0) {
    *ctype = "text/javascript; charset=utf-8";
    return app_js;
  }
  if (strcmp(path, "/app.css") == 0) {
    *ctype = "text/css; charset=utf-8";
    return app_css;
  }
  return NULL;
}

static void page_start(struct pgr_buf *b, const char *title) {
  pgr_buf_adds(b, "<!DOCTYPE html>\n<html lang=\"en\"><head>"
                  "<meta charset=\"utf-8\"><title>");
  pgr_html_text(b, title);
  pgr_buf_adds(b, "</title><link rel=\"stylesheet\" href=\"/app.css\">"
                  "<script src=\"/app.js\" defer></script></head><body>\n");
}

static void page_end(struct pgr_buf *b) {
  pgr_buf_adds(b, "<p id=\"result\" role=\"status\"></p></body></html>\n");
}

static int db_error(struct pgr_buf *b, const char *why) {
  page_start(b, "pgrunner: database unavailable");
  pgr_buf_adds(b, "<h1>pgrunner</h1><p class=\"err\">The database cannot be "
                  "read: ");
  pgr_html_text(b, why);
  pgr_buf_adds(b, "</p>");
  page_end(b);
  return 503;
}

/* A result cell: NULL shows as an empty cell. */
static void cell(struct pgr_buf *b, const PGresult *r, int row, int col,
                 const char *cls) {
  pgr_buf_adds(b, cls ? "<td class=\"" : "<td>");
  if (cls) {
    pgr_buf_adds(b, cls);
    pgr_buf_adds(b, "\">");
  }
  if (!PQgetisnull(r, row, col))
    pgr_html_text(b, PQgetvalue(r, row, col));
  pgr_buf_adds(b, "</td>");
}

static void task_link(struct pgr_buf *b, const PGresult *r, int row, int col) {
  pgr_buf_adds(b, "<td><a href=\"/task/");
  pgr_html_text(b, PQgetvalue(r, row, col));
  pgr_buf_adds(b, "\">");
  pgr_html_text(b, PQgetvalue(r, row, col));
  pgr_buf_adds(b, "</a></td>");
}

static void heading_row(struct pgr_buf *b, const char *const *names) {
  pgr_buf_adds(b, "<table><tr>");
  for (; *names; names++) {
    pgr_buf_adds(b, "<th>");
    pgr_buf_adds(b, *names);
    pgr_buf_adds(b, "</th>");
  }
  pgr_buf_adds(b, "</tr>\n");
}

/* Every queue worth showing: those given, those with queued tasks (a skip
 * scan of tasks_claim_idx, one probe per queue), those with outcomes in the
 * last hour. */
static const char queues_sql[] =
    "SELECT coalesce(array_agg(DISTINCT n ORDER BY n), '{}')::text FROM ("
    " (WITH RECURSIVE q(name) AS ("
    "    (SELECT t.queue FROM pgrunner.tasks t"
    "      WHERE t.state = 'queued' AND NOT t.serial_held"
    "      ORDER BY t.queue LIMIT 1)"
    "    UNION ALL"
    "    SELECT (SELECT t.queue FROM pgrunner.tasks t"
    "             WHERE t.state = 'queued' AND NOT t.serial_held"
    "                   AND t.queue > q.name"
    "             ORDER BY t.queue LIMIT 1)"
    "      FROM q WHERE q.name IS NOT NULL)"
    "  SELECT name FROM q WHERE name IS NOT NULL LIMIT 200)"
    " UNION ALL SELECT s.queue FROM pgrunner.queue_stats s"
    "   WHERE s.minute > now() - interval '1 hour'"
    " UNION ALL SELECT unnest($1::text[])) x(n)";

static const char chart_sql[] =
    "SELECT s.queue, (extract(epoch FROM date_trunc('minute', now()) -"
    "                s.minute) / 60)::int, s.succeeded, s.failed, s.retried"
    "  FROM pgrunner.queue_stats s"
    " WHERE s.minute > date_trunc('minute', now()) - interval '60 minutes'"
    "   AND s.queue = ANY ($1::text[])";

static const char running_sql[] =
    "SELECT t.id, t.queue, t.kind, t.attempts, t.worker_id::text,"
    "       round(extract(epoch FROM now() - t.started_at)::numeric, 1)"
    "  FROM pgrunner.tasks t WHERE t.state = 'running'"
    " ORDER BY t.started_at LIMIT 50";

static const char failures_sql[] =
    "SELECT t.id, t.queue, t.kind, t.attempts, t.max_attempts,"
    "       to_char(t.finished_at, 'YYYY-MM-DD HH24:MI:SS TZ'), t.last_error"
    "  FROM pgrunner.tasks t"
    " WHERE t.state IN ('failed', 'cancelled') AND t.state = 'failed'"
    " ORDER BY t.finished_at DESC LIMIT 20";

static const char workers_sql[] =
    "SELECT w.id::text, w.name, w.host, w.pid, array_to_string(w.queues, ','),"
    "       w.concurrency,"
    "       round(extract(epoch FROM now() - w.heartbeat_at)::numeric, 1)"
    "  FROM pgrunner.workers w ORDER BY w.name LIMIT 100";

static const char schedules_sql[] =
    "SELECT s.name, s.cron, s.kind, s.queue,"
    "       to_char(s.next_run_at, 'YYYY-MM-DD HH24:MI:SS TZ'),"
    "       to_char(s.last_run_at, 'YYYY-MM-DD HH24:MI:SS TZ')"
    "  FROM pgrunner.schedules s ORDER BY s.name LIMIT 100";

/* 60 one-minute bars, newest on the right: succeeded up, failed in red. */
static void chart(struct pgr_buf *b, const PGresult *stats, const char *queue) {
  long long ok[60] = {0}, bad[60] = {0}, top = 1;
  for (int i = 0; i < PQntuples(stats); i++) {
    int ago = atoi(PQgetvalue(stats, i, 1));
    if (strcmp(PQgetvalue(stats, i, 0), queue) != 0 || ago < 0 || ago >= 60)
      continue;
    ok[ago] += atoll(PQgetvalue(stats, i, 2));
    bad[ago] += atoll(PQgetvalue(stats, i, 3)) + atoll(PQgetvalue(stats, i, 4));
  }
  for (int i = 0; i < 60; i++)
    if (ok[i] + bad[i] > top)
      top = ok[i] + bad[i];
  pgr_buf_adds(b, "<svg width=\"240\" height=\"40\" role=\"img\">"
                  "<title>tasks per minute, last hour</title>");
  for (int i = 0; i < 60; i++) {
    int x = (59 - i) * 4, h_ok = (int)(ok[i] * 40 / top),
        h_bad = (int)(bad[i] * 40 / top);
    if (h_ok > 0)
      pgr_buf_printf(b,
                     "<rect class=\"bar\" x=\"%d\" y=\"%d\" width=\"3\" "
                     "height=\"%d\"></rect>",
                     x, 40 - h_ok, h_ok);
    if (h_bad > 0)
      pgr_buf_printf(b,
                     "<rect class=\"fail\" x=\"%d\" y=\"%d\" width=\"3\" "
                     "height=\"%d\"></rect>",
                     x, 40 - h_ok - h_bad, h_bad);
  }
  pgr_buf_adds(b, "</svg>");
}

int pgr_dash_index(const char *const *queues, size_t nqueues, int admin,
                   struct pgr_buf *out) {
  char err[512], sqlstate[6];
  struct pgr_buf arr;
  PGresult *qs = NULL, *g = NULL, *st = NULL, *run = NULL, *fail = NULL,
           *wk = NULL, *sch = NULL;
  PGconn *conn = pgr_webdb_get(err, sizeof err);
  int status = 200;

  if (conn == NULL)
    return db_error(out, err);
  pgr_buf_init(&arr);
  pgr_buf_add_array(&arr, queues, nqueues);
  const char *p1[1] = {arr.data};
  if ((qs = pgr_db_exec(conn, queues_sql, 1, p1, err, sizeof err, sqlstate)) ==
      NULL)
    goto failed;
  const char *all = PQgetvalue(qs, 0, 0);
  const char *p2[1] = {all};
  if ((g = pgr_gauges_query(conn, all, err, sizeof err)) == NULL ||
      (st = pgr_db_exec(conn, chart_sql, 1, p2, err, sizeof err, sqlstate)) ==
          NULL ||
      (run = pgr_db_exec(conn, running_sql, 0, NULL, err, sizeof err,
                         sqlstate)) == NULL ||
      (fail = pgr_db_exec(conn, failures_sql, 0, NULL, err, sizeof err,
                          sqlstate)) == NULL ||
      (wk = pgr_db_exec(conn, workers_sql, 0, NULL, err, sizeof err,
                        sqlstate)) == NULL ||
      (sch = pgr_db_exec(conn, schedules_sql, 0, NULL, err, sizeof err,
                         sqlstate)) == NULL)
    goto failed;

  page_start(out, "pgrunner");
  pgr_buf_adds(out, "<h1>pgrunner</h1>\n");
  if (!admin)
    pgr_buf_adds(out, "<p class=\"ro\">Read-only: set PGRUNNER_ADMIN_TOKEN "
                      "to allow retry and cancel.</p>\n");

  static const char *const qh[] = {"queue",
                                   "queued",
                                   "due",
                                   "oldest due (s)",
                                   "running",
                                   "failed, last hour",
                                   "per minute, last hour",
                                   NULL};
  pgr_buf_adds(out, "<h2>Queues</h2>\n");
  heading_row(out, qh);
  for (int i = 0; i < PQntuples(g); i++) {
    long long queued = atoll(PQgetvalue(g, i, 1)),
              later = atoll(PQgetvalue(g, i, 2));
    pgr_buf_adds(out, "<tr class=\"queue\">");
    cell(out, g, i, 0, "name");
    pgr_buf_printf(out, "<td class=\"n\">%lld</td><td class=\"n\">%lld</td>",
                   queued, queued > later ? queued - later : 0);
    pgr_buf_printf(out, "<td class=\"n\">%.1f</td>",
                   PQgetisnull(g, i, 3) ? 0.0 : atof(PQgetvalue(g, i, 3)));
    cell(out, g, i, 4, "n");
    cell(out, g, i, 5, "n");
    pgr_buf_adds(out, "<td>");
    chart(out, st, PQgetvalue(g, i, 0));
    pgr_buf_adds(out, "</td></tr>\n");
  }
  pgr_buf_adds(out, "</table>\n");

  static const char *const rh[] = {"task",   "queue",   "kind", "attempt",
                                   "worker", "age (s)", NULL};
  pgr_buf_printf(out, "<h2>Running (%d%s)</h2>\n", PQntuples(run),
                 PQntuples(run) == MAX_ROWS ? " shown" : "");
  heading_row(out, rh);
  for (int i = 0; i < PQntuples(run); i++) {
    pgr_buf_adds(out, "<tr class=\"running\">");
    task_link(out, run, i, 0);
    for (int c = 1; c <= 5; c++)
      cell(out, run, i, c, c == 3 || c == 5 ? "n" : NULL);
    pgr_buf_adds(out, "</tr>\n");
  }
  pgr_buf_adds(out, "</table>\n");

  static const char *const fh[] = {"task",     "queue",      "kind", "attempts",
                                   "finished", "last error", NULL};
  static const char *const fha[] = {
      "task", "queue", "kind", "attempts", "finished", "last error", "", NULL};
  pgr_buf_adds(out, "<h2>Recent failures</h2>\n");
  heading_row(out, admin ? fha : fh);
  for (int i = 0; i < PQntuples(fail); i++) {
    pgr_buf_adds(out, "<tr class=\"failure\">");
    task_link(out, fail, i, 0);
    cell(out, fail, i, 1, NULL);
    cell(out, fail, i, 2, NULL);
    pgr_buf_adds(out, "<td class=\"n\">");
    pgr_html_text(out, PQgetvalue(fail, i, 3));
    pgr_buf_adds(out, "/");
    pgr_html_text(out, PQgetvalue(fail, i, 4));
    pgr_buf_adds(out, "</td>");
    cell(out, fail, i, 5, NULL);
    cell(out, fail, i, 6, "err");
    if (admin) {
      pgr_buf_adds(out, "<td><button data-action=\"retry\" data-task=\"");
      pgr_html_text(out, PQgetvalue(fail, i, 0));
      pgr_buf_adds(out, "\">Retry</button></td>");
    }
    pgr_buf_adds(out, "</tr>\n");
  }
  pgr_buf_adds(out, "</table>\n");

  static const char *const wh[] = {"worker",
                                   "name",
                                   "host",
                                   "pid",
                                   "queues",
                                   "concurrency",
                                   "heartbeat age (s)",
                                   NULL};
  pgr_buf_adds(out, "<h2>Workers</h2>\n");
  heading_row(out, wh);
  for (int i = 0; i < PQntuples(wk); i++) {
    pgr_buf_adds(out, "<tr class=\"worker\">");
    for (int c = 0; c < 7; c++)
      cell(out, wk, i, c, c == 3 || c >= 5 ? "n" : NULL);
    pgr_buf_adds(out, "</tr>\n");
  }
  pgr_buf_adds(out, "</table>\n");

  static const char *const sh[] = {"schedule", "cron",     "kind", "queue",
                                   "next run", "last run", NULL};
  pgr_buf_adds(out, "<h2>Schedules</h2>\n");
  heading_row(out, sh);
  for (int i = 0; i < PQntuples(sch); i++) {
    pgr_buf_adds(out, "<tr class=\"schedule\">");
    for (int c = 0; c < 6; c++)
      cell(out, sch, i, c, NULL);
    pgr_buf_adds(out, "</tr>\n");
  }
  pgr_buf_adds(out, "</table>\n");
  page_end(out);
  goto out;

failed:
  if (PQstatus(conn) != CONNECTION_OK)
    pgr_webdb_broken();
  pgr_buf_reset(out);
  status = db_error(out, err);
out:
  PQclear(qs);
  PQclear(g);
  PQclear(st);
  PQclear(run);
  PQclear(fail);
  PQclear(wk);
  PQclear(sch);
  pgr_buf_free(&arr);
  return status;
}

static const char task_sql[] =
    "SELECT t.id, t.queue, t.kind, t.state, t.priority, t.attempts,"
    "       t.max_attempts, jsonb_pretty(t.payload), t.last_error,"
    "       t.run_at, t.created_at, t.started_at, t.finished_at,"
    "       t.worker_id::text, t.key, t.timeout_seconds,"
    "       jsonb_pretty(t.output)"
    "  FROM pgrunner.tasks t WHERE t.id = $1::bigint";

/* A task id: digits only, so it is safe anywhere and parses as bigint. */
static int valid_id(const char *id) {
  size_t n = strlen(id);
  if (n == 0 || n > 19)
    return 0;
  for (size_t i = 0; i < n; i++)
    if (id[i] < '0' || id[i] > '9')
      return 0;
  return 1;
}

int pgr_dash_task(const char *id, int admin, struct pgr_buf *out) {
  static const char *const labels[] = {
      "id",          "queue",        "kind",     "state",      "priority",
      "attempts",    "max attempts", "payload",  "last error", "run at",
      "created",     "started",      "finished", "worker",     "key",
      "timeout (s)", "output"};
  char err[512], sqlstate[6];
  PGresult *r = NULL;
  PGconn *conn;
  int status = 200;

  if (!valid_id(id)) {
    page_start(out, "pgrunner: no such task");
    pgr_buf_adds(out, "<h1>No such task</h1>");
    page_end(out);
    return 404;
  }
  if ((conn = pgr_webdb_get(err, sizeof err)) == NULL)
    return db_error(out, err);
  const char *p[1] = {id};
  if ((r = pgr_db_exec(conn, task_sql, 1, p, err, sizeof err, sqlstate)) ==
      NULL) {
    if (PQstatus(conn) != CONNECTION_OK)
      pgr_webdb_broken();
    return db_error(out, err);
  }
  if (PQntuples(r) == 0) {
    page_start(out, "pgrunner: no such task");
    pgr_buf_adds(out, "<h1>No such task</h1><p><a href=\"/\">back</a></p>");
    page_end(out);
    status = 404;
    goto out;
  }
  page_start(out, "pgrunner: task");
  pgr_buf_adds(out, "<h1>Task ");
  pgr_html_text(out, id);
  pgr_buf_adds(out, "</h1><p><a href=\"/\">all queues</a></p>\n<table>");
  for (int c = 0; c < (int)PGR_ARRAY_LEN(labels); c++) {
    pgr_buf_adds(out, "<tr><th>");
    pgr_buf_adds(out, labels[c]);
    pgr_buf_adds(out, "</th>");
    if (c == 7 || (c == 16 && !PQgetisnull(r, 0, c))) {
      pgr_buf_adds(out, c == 7 ? "<td><pre id=\"payload\">"
                               : "<td><pre id=\"output\">");
      pgr_html_text(out, PQgetvalue(r, 0, c));
      pgr_buf_adds(out, "</pre></td>");
    } else {
      cell(out, r, 0, c, c == 8 ? "err" : NULL);
    }
    pgr_buf_adds(out, "</tr>\n");
  }
  pgr_buf_adds(out, "</table>\n");
  const char *state = PQgetvalue(r, 0, 3);
  if (admin) {
    pgr_buf_adds(out, "<p>");
    if (strcmp(state, "failed") == 0 || strcmp(state, "cancelled") == 0) {
      pgr_buf_adds(out, "<button data-action=\"retry\" data-task=\"");
      pgr_html_text(out, id);
      pgr_buf_adds(out, "\">Retry</button>");
    }
    if (strcmp(state, "queued") == 0 || strcmp(state, "running") == 0) {
      pgr_buf_adds(out, "<button data-action=\"cancel\" data-task=\"");
      pgr_html_text(out, id);
      pgr_buf_adds(out, "\">Cancel</button>");
    }
    pgr_buf_adds(out, "</p>\n");
  }
  page_end(out);
out:
  PQclear(r);
  return status;
}

int pgr_dash_action(const char *id, const char *action, struct pgr_buf *out) {
  char err[512], sqlstate[6];
  const char *sql;
  PGresult *r = NULL;
  PGconn *conn;

  if (strcmp(action, "retry") == 0)
    sql = "SELECT pgrunner.retry_task($1::bigint)";
  else if (strcmp(action, "cancel") == 0)
    sql = "SELECT pgrunner.cancel_task($1::bigint)";
  else {
    pgr_buf_adds(out, "{\"error\":\"unknown action\"}\n");
    return 404;
  }
  if (!valid_id(id)) {
    pgr_buf_adds(out, "{\"error\":\"no such task\"}\n");
    return 404;
  }
  if ((conn = pgr_webdb_get(err, sizeof err)) == NULL)
    goto unavailable;
  /* The session is read-only by default; an action is the one write. */
  if (pgr_db_command(conn, "BEGIN READ WRITE", err, sizeof err) != 0)
    goto failed;
  const char *p[1] = {id};
  r = pgr_db_exec(conn, sql, 1, p, err, sizeof err, sqlstate);
  if (r == NULL || pgr_db_command(conn, "COMMIT", err, sizeof err) != 0) {
    (void)pgr_db_command(conn, "ROLLBACK", err + 256, sizeof err - 256);
    goto failed;
  }
  pgr_buf_printf(out, "{\"ok\":true,\"changed\":%s}\n",
                 strcmp(PQgetvalue(r, 0, 0), "t") == 0 ? "true" : "false");
  PQclear(r);
  return 200;
failed:
  PQclear(r);
  if (PQstatus(conn) != CONNECTION_OK)
    pgr_webdb_broken();
unavailable:
  pgr_buf_adds(out, "{\"error\":\"the database refused: see the worker's "
                    "log\"}\n");
  return 503;
}
