/*
 * test_pgconn.c - the loop's nonblocking connection (worker/loop/pgconn.c)
 * on a real uv loop against a real PostgreSQL: connect and query, an error
 * result, a connection the server drops (the command in flight is failed,
 * on_down is told, it reconnects by itself), and a server that is not
 * there. Every test ends by closing its loop: uv_loop_close() == 0 proves
 * that no handle or request was left behind.
 *
 * The server: unit_pg.h.
 */
#include <criterion/criterion.h>
#include <criterion/hooks.h>
#include <criterion/new/assert.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libpq-fe.h>
#include <uv.h>

#include "loop/pgconn.h"
#include "unit_pg.h"

/* ---- one connection on one loop (test processes) ------------------------- */

struct t {
  uv_loop_t loop;
  uv_timer_t watchdog; /* ends a test that hangs, as a failure */
  struct pgr_pgconn pg;
  int ups, downs, failed, closed, timed_out, finishing;
  int results, nulls;
  char value[64];
  char sqlstate[6];
  int first_pid;
};

static void on_closed(struct pgr_pgconn *c) {
  ((struct t *)c->data)->closed++;
}

/* Close the connection and the watchdog: uv_run then returns. */
static void finish(struct t *t) {
  if (t->finishing++)
    return;
  uv_close((uv_handle_t *)&t->watchdog, NULL);
  pgr_pgconn_close(&t->pg, on_closed);
}

static void on_watchdog(uv_timer_t *h) {
  struct t *t = h->data;
  t->timed_out = 1;
  finish(t);
}

static void on_up(struct pgr_pgconn *c) {
  ((struct t *)c->data)->ups++;
}

static void on_down(struct pgr_pgconn *c, const char *why) {
  (void)why;
  ((struct t *)c->data)->downs++;
}

/* The loop, its watchdog and the connection, not started yet. */
static void prepare(struct t *t, const char *dsn, pgr_pgconn_event_cb up) {
  char err[256] = "";
  memset(t, 0, sizeof *t);
  cr_assert(eq(int, uv_loop_init(&t->loop), 0));
  cr_assert(eq(int, uv_timer_init(&t->loop, &t->watchdog), 0));
  t->watchdog.data = t;
  cr_assert(eq(int, uv_timer_start(&t->watchdog, on_watchdog, 30000, 0), 0));
  cr_assert(
      eq(int,
         pgr_pgconn_init(&t->loop, &t->pg, dsn, "pgr-unit", err, sizeof err),
         0),
      "%s", err);
  t->pg.data = t;
  t->pg.on_up = up;
  t->pg.on_down = on_down;
}

/* Runs the loop until the test's callbacks finish(); then it must close. */
static void run(struct t *t) {
  pgr_pgconn_start(&t->pg);
  uv_run(&t->loop, UV_RUN_DEFAULT);
  cr_expect(eq(int, t->timed_out, 0), "the test timed out");
  cr_expect(eq(int, t->closed, 1));
  cr_expect(eq(int, uv_loop_close(&t->loop), 0),
            "a handle or request outlived the connection");
}

static void start(struct t *t, const char *dsn, pgr_pgconn_event_cb up) {
  prepare(t, dsn, up);
  run(t);
}

/* Keeps the first row's first value and the SQLSTATE of an error. */
static void keep(struct t *t, const PGresult *res) {
  t->results++;
  if (res == NULL) {
    t->nulls++;
    return;
  }
  if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) > 0)
    snprintf(t->value, sizeof t->value, "%s", PQgetvalue(res, 0, 0));
  const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
  snprintf(t->sqlstate, sizeof t->sqlstate, "%s", st ? st : "");
}

/* ---- connect and query ----------------------------------------------------
 */

static void on_answer(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)arg;
  keep(c->data, res);
  finish(c->data);
}

static void ask_when_up(struct pgr_pgconn *c) {
  const char *params[1] = {"41"};
  on_up(c);
  cr_assert(eq(int, pgr_pgconn_ready(c), 1));
  cr_assert(
      eq(int,
         pgr_pgconn_query(c, "SELECT $1::int + 1", 1, params, on_answer, NULL),
         0));
}

Test(pgconn, connects_and_answers_a_query) {
  struct t t;
  start(&t, server_dsn(), ask_when_up);
  cr_expect(eq(int, t.ups, 1));
  cr_expect(eq(int, t.downs, 0));
  cr_expect(eq(int, t.results, 1));
  cr_expect(eq(str, t.value, "42"));
}

/* ---- an error result, and the connection goes on --------------------------
 */

static void on_second(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)arg;
  struct t *t = c->data;
  t->results++;
  if (res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK)
    snprintf(t->value, sizeof t->value, "%s", PQgetvalue(res, 0, 0));
  finish(t);
}

static void on_error(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)arg;
  keep(c->data, res);
  /* Queued behind nothing: the connection is still usable. */
  if (pgr_pgconn_query(c, "SELECT 'after'", 0, NULL, on_second, NULL) != 0)
    finish(c->data);
}

static void divide_by_zero_when_up(struct pgr_pgconn *c) {
  on_up(c);
  cr_assert(
      eq(int, pgr_pgconn_query(c, "SELECT 1/0", 0, NULL, on_error, NULL), 0));
}

Test(pgconn, an_error_result_reaches_its_callback_and_the_session_goes_on) {
  struct t t;
  start(&t, server_dsn(), divide_by_zero_when_up);
  cr_expect(eq(str, t.sqlstate, "22012"));
  cr_expect(eq(int, t.results, 2));
  cr_expect(eq(str, t.value, "after"));
  cr_expect(eq(int, t.downs, 0));
}

/* ---- a dropped connection ------------------------------------------------ */

static void on_pid(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)arg;
  struct t *t = c->data;
  keep(t, res);
  finish(t);
}

static void on_killed(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)arg;
  struct t *t = c->data;
  /* The session ended under the command: NULL, or the server's FATAL. */
  t->results++;
  if (res == NULL || PQresultStatus(res) != PGRES_TUPLES_OK)
    t->nulls++;
}

static void on_first_pid(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)arg;
  struct t *t = c->data;
  cr_assert(res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK);
  t->first_pid = atoi(PQgetvalue(res, 0, 0));
  /* The backend ends its own session, as a crash or an administrator's
     pg_terminate_backend would. */
  cr_assert(eq(int,
               pgr_pgconn_query(c,
                                "SELECT pg_terminate_backend("
                                "pg_backend_pid())",
                                0, NULL, on_killed, NULL),
               0));
}

static void kill_then_reconnect(struct pgr_pgconn *c) {
  struct t *t = c->data;
  on_up(c);
  if (t->ups == 1) {
    cr_assert(eq(int,
                 pgr_pgconn_query(c, "SELECT pg_backend_pid()", 0, NULL,
                                  on_first_pid, NULL),
                 0));
  } else {
    /* Back by itself: a new session answers. */
    cr_assert(eq(
        int,
        pgr_pgconn_query(c, "SELECT pg_backend_pid()", 0, NULL, on_pid, NULL),
        0));
  }
}

Test(pgconn, a_dropped_connection_fails_its_command_and_comes_back) {
  struct t t;
  start(&t, server_dsn(), kill_then_reconnect);
  cr_expect(eq(int, t.ups, 2), "it reconnected by itself");
  cr_expect(eq(int, t.downs, 1), "on_down once");
  cr_expect(eq(int, t.nulls, 1), "the command in flight failed");
  cr_expect(eq(int, t.results, 2));
  cr_expect(t.first_pid > 0 && atoi(t.value) > 0 &&
                atoi(t.value) != t.first_pid,
            "a new backend (%d, then %s)", t.first_pid, t.value);
}

/* ---- nobody there -------------------------------------------------------- */

static void on_connect_failed(struct pgr_pgconn *c, int kind, const char *why) {
  (void)kind;
  (void)why;
  struct t *t = c->data;
  t->failed++;
  /* It would retry by itself; closing from the callback stops that. */
  finish(t);
}

static void never_up(struct pgr_pgconn *c) {
  on_up(c);
  finish(c->data);
}

Test(pgconn, a_server_that_is_not_there_is_reported_and_can_be_closed) {
  struct t t;
  char dsn[128];
  snprintf(dsn, sizeof dsn, "host=127.0.0.1 port=%d dbname=x connect_timeout=5",
           free_port());
  prepare(&t, dsn, never_up);
  t.pg.on_connect_failed = on_connect_failed;
  run(&t);
  cr_expect(eq(int, t.failed, 1));
  cr_expect(eq(int, t.ups, 0));
  cr_expect(not(eq(str, t.pg.last_error, "")), "a reason was kept");
}
