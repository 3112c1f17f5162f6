/*
 * test_pool.c - the hand-off between the loop and the worker threads
 * (worker/jobs/pool.c) on a real uv loop, with real worker threads on real
 * connections to a real PostgreSQL (unit_pg.h): a claim submitted on the
 * loop comes back through the done list and the uv_async wake with the
 * task's row ended; an interrupt reaches the thread running the attempt
 * and names its backend; a claim no thread has started is taken back.
 * Every test ends with pgr_pool_destroy() == 0 and uv_loop_close() == 0:
 * no thread, handle or request was left behind.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>
#include <uv.h>

#include "cli/cli.h"
#include "config.h"
#include "handlers.h"
#include "pool.h"
#include "unit_pg.h"

struct fixture {
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t timer;
  struct pgr_config cfg;
  struct pgr_handlers *handlers;
  struct pgr_pool *pool;
  PGconn *db;
  int64_t worker_id;
  struct pgr_claim *done[4];
  int ndone;
  int want; /* stop the loop once this many claims are back */
};

static struct fixture F;

static PGresult *must(PGresult *res, ExecStatusType want) {
  cr_assert(PQresultStatus(res) == want, "%s",
            PQresultErrorMessage(res) ? PQresultErrorMessage(res) : "?");
  return res;
}

static void sql(const char *q) {
  PQclear(must(PQexec(F.db, q), PGRES_COMMAND_OK));
}

static char *scalar(const char *q) {
  PGresult *res = must(PQexec(F.db, q), PGRES_TUPLES_OK);
  char *v = strdup(PQgetvalue(res, 0, 0));
  PQclear(res);
  return v;
}

static void on_wake(uv_async_t *a) {
  (void)a;
  struct pgr_claims done = STAILQ_HEAD_INITIALIZER(done);
  struct pgr_claim *c;
  pgr_pool_take_done(F.pool, &done);
  while ((c = STAILQ_FIRST(&done)) != NULL) {
    STAILQ_REMOVE_HEAD(&done, link);
    cr_assert(F.ndone < 4);
    F.done[F.ndone++] = c;
  }
  if (F.ndone >= F.want)
    uv_stop(&F.loop);
}

static void on_timeout(uv_timer_t *t) {
  (void)t;
  uv_stop(&F.loop);
}

/* Run the loop until `n` claims are back (or 30 s have passed). */
static void run_until_done(int n) {
  F.want = n;
  cr_assert(uv_timer_start(&F.timer, on_timeout, 30000, 0) == 0);
  if (F.ndone < n)
    uv_run(&F.loop, UV_RUN_DEFAULT);
  uv_timer_stop(&F.timer);
  cr_assert(F.ndone >= n, "only %d of %d claims came back", F.ndone, n);
}

static void setup(int concurrency) {
  char err[256], conc[16];
  int applied = 0;
  memset(&F, 0, sizeof F);
  snprintf(conc, sizeof conc, "%d", concurrency);
  const char *argv[] = {"pgrunner",   "work",          "--db",
                        server_dsn(), "--concurrency", conc};
  cr_assert(pgr_config_parse(&F.cfg, 6, (char **)argv, err, sizeof err) == 0,
            "%s", err);
  cr_assert(pgr_handlers_create(&F.cfg, &F.handlers, err, sizeof err) == 0,
            "%s", err);
  F.db = PQconnectdb(server_dsn());
  cr_assert(PQstatus(F.db) == CONNECTION_OK, "%s", PQerrorMessage(F.db));
  cr_assert(pgr_migrate_conn(F.db, &applied, err, sizeof err) == 0, "%s", err);
  sql("CREATE OR REPLACE FUNCTION pgrunner_jobs.nap(p jsonb) RETURNS void"
      " LANGUAGE sql AS 'SELECT pg_sleep(60)'");
  char *wid = scalar("INSERT INTO pgrunner.workers (id, name)"
                     " SELECT coalesce(max(id), 0) + 1, 'unit/test_pool'"
                     " FROM pgrunner.workers RETURNING id");
  F.worker_id = atoll(wid);
  free(wid);
  cr_assert(uv_loop_init(&F.loop) == 0);
  cr_assert(uv_async_init(&F.loop, &F.wake, on_wake) == 0);
  cr_assert(uv_timer_init(&F.loop, &F.timer) == 0);
  cr_assert(pgr_pool_create(&F.cfg, F.handlers, "unit/test_pool", &F.wake,
                            &F.pool) == 0);
}

static void teardown(void) {
  cr_assert(pgr_pool_destroy(F.pool, 10000) == 0, "a worker thread is stuck");
  for (int i = 0; i < F.ndone; i++)
    pgr_claim_free(F.done[i]);
  uv_close((uv_handle_t *)&F.wake, NULL);
  uv_close((uv_handle_t *)&F.timer, NULL);
  uv_run(&F.loop, UV_RUN_DEFAULT);
  cr_assert(uv_loop_close(&F.loop) == 0, "a handle or request was left");
  pgr_handlers_destroy(F.handlers);
  pgr_config_free(&F.cfg);
  PQfinish(F.db);
}

/* A task of `kind` marked running as this worker's attempt 1, as a claim
   leaves it, and its claim. */
static struct pgr_claim *claimed(const char *kind) {
  char q[256];
  snprintf(q, sizeof q,
           "INSERT INTO pgrunner.tasks (kind, state, attempts, worker_id,"
           " started_at) VALUES ('%s', 'running', 1, %lld, now())"
           " RETURNING id",
           kind, (long long)F.worker_id);
  char *id = scalar(q);
  struct pgr_claim *c = pgr_claim_create();
  c->id = atoll(id);
  free(id);
  c->attempt = 1;
  c->max_attempts = 5;
  c->worker_id = F.worker_id;
  c->timeout_s = F.cfg.task_timeout_s;
  c->queue_index = 0;
  c->kind = strdup(kind);
  c->queue = strdup("default");
  c->payload = strdup("{}");
  return c;
}

static char *state_of(int64_t id) {
  char q[128];
  snprintf(q, sizeof q, "SELECT state FROM pgrunner.tasks WHERE id = %lld",
           (long long)id);
  return scalar(q);
}

/* Spin the loop until the thread running `id` has published its backend
   and the interrupt named it; returns that pid. */
static int interrupt_when_running(int64_t id) {
  for (int i = 0; i < 3000; i++) {
    int pid = pgr_pool_interrupt(F.pool, id, 1, PGR_INT_CANCEL);
    if (pid > 0)
      return pid;
    uv_run(&F.loop, UV_RUN_NOWAIT);
    uv_sleep(10);
  }
  cr_fatal("task %lld never ran on a thread", (long long)id);
  return 0;
}

static void cancel_backend(int pid) {
  char q[96];
  snprintf(q, sizeof q, "SELECT pg_cancel_backend(%d)", pid);
  char *ok = scalar(q);
  cr_assert(strcmp(ok, "t") == 0);
  free(ok);
}

Test(pool, a_claim_comes_back_through_the_done_list_with_its_task_ended) {
  setup(2);
  struct pgr_claim *c = claimed("noop");
  int64_t id = c->id;
  pgr_pool_submit(F.pool, c);
  run_until_done(1);
  cr_assert(F.done[0] == c);
  cr_assert(eq(int, c->done, PGR_DONE_SUCCEEDED));
  cr_assert(c->finished_us >= c->started_us && c->started_us > 0);
  char *st = state_of(id);
  cr_assert(eq(str, st, "succeeded"));
  free(st);
  cr_assert(eq(u64, pgr_pool_running_since(F.pool, id), 0));
  teardown();
}

Test(pool, an_interrupt_names_the_backend_and_the_attempt_ends_cancelled) {
  setup(1);
  struct pgr_claim *c = claimed("nap");
  int64_t id = c->id;
  pgr_pool_submit(F.pool, c);
  int pid = interrupt_when_running(id);
  cr_assert(pgr_pool_running_since(F.pool, id) > 0);
  /* Another attempt of the same task is not the one running. */
  cr_assert(eq(int, pgr_pool_interrupt(F.pool, id, 2, PGR_INT_CANCEL), 0));
  cancel_backend(pid);
  run_until_done(1);
  cr_assert(eq(int, c->done, PGR_DONE_CANCELLED));
  char *st = state_of(id);
  cr_assert(eq(str, st, "cancelled"));
  free(st);
  teardown();
}

Test(pool, a_claim_no_thread_started_is_taken_back) {
  setup(1);
  struct pgr_claim *busy = claimed("nap");
  struct pgr_claim *waiting = claimed("noop");
  int64_t busy_id = busy->id, waiting_id = waiting->id;
  pgr_pool_submit(F.pool, busy);
  int pid = interrupt_when_running(busy_id);
  pgr_pool_submit(F.pool, waiting);
  struct pgr_claims back = STAILQ_HEAD_INITIALIZER(back);
  pgr_pool_take_pending(F.pool, &back);
  struct pgr_claim *first = STAILQ_FIRST(&back);
  struct pgr_claim *second = STAILQ_NEXT(waiting, link);
  cr_assert(first == waiting);
  cr_assert(second == NULL);
  pgr_claim_free(waiting);
  cancel_backend(pid);
  run_until_done(1);
  cr_assert(F.done[0] == busy);
  /* The one taken back never ran: still as the claim left it. */
  char *st = state_of(waiting_id);
  cr_assert(eq(str, st, "running"));
  free(st);
  teardown();
}
