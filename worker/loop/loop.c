/*
 * loop.c - owns the uv_loop_t of `pgrunner work`: start-up, signals and the
 * shutdown sequence.
 *
 * Thread: LOOP THREAD ONLY (the main thread while uv_run runs).
 *
 * Shutdown (SIGTERM/SIGINT): stop claiming; let running attempts finish for
 * --shutdown-timeout seconds; then interrupt them (they roll back and are
 * queued again without spending an attempt); deregister; close every
 * handle; uv_run returns; the worker threads are joined; exit 0.
 * A second signal skips the grace period.
 */
#include "loop/loop.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "health.h"
#include "log.h"
#include "loop/internal.h"
#include "metrics.h"
#include "web/http.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/lsan_interface.h>
#endif

/* After the grace period and the interrupt, how long we still wait for a
   handler that ignores it (a C handler deep in its own code). */
#define HARD_STOP_MS 15000
/* After the loop has stopped, how long the worker threads have to end. */
#define JOIN_TIMEOUT_MS 5000

/* Exit at once, leaving a worker thread that will not stop (it owns its
   slot, the pool and the config) to the process's end. _exit() skips
   LeakSanitizer's check at exit, so the ASan build runs it here: what the
   stuck thread still uses is reachable from it, not a leak. */
static void exit_abandoning_threads(void) {
#if defined(__SANITIZE_ADDRESS__)
  __lsan_do_leak_check();
#endif
  _exit(1);
}

static void on_closed(uv_handle_t *h) {
  (void)h;
}

static void close_open(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, on_closed);
}

static void on_pg_closed(struct pgr_pgconn *c) {
  (void)c;
}

static void close_all(struct pgr_loop *l) {
  uv_timer_stop(&l->wake_timer);
  uv_close((uv_handle_t *)&l->wake_timer, on_closed);
  uv_timer_stop(&l->gather_timer);
  uv_close((uv_handle_t *)&l->gather_timer, on_closed);
  uv_close((uv_handle_t *)&l->poll_timer, on_closed);
  uv_close((uv_handle_t *)&l->heartbeat_timer, on_closed);
  uv_close((uv_handle_t *)&l->prune_timer, on_closed);
  uv_close((uv_handle_t *)&l->watchdog_timer, on_closed);
  uv_close((uv_handle_t *)&l->shutdown_timer, on_closed);
  uv_close((uv_handle_t *)&l->sigterm, on_closed);
  uv_close((uv_handle_t *)&l->sigint, on_closed);
  uv_close((uv_handle_t *)&l->sighup, on_closed);
  uv_close((uv_handle_t *)&l->done_async, on_closed);
  pgr_pgconn_close(&l->pg, on_pg_closed);
  pgr_pgconn_close(&l->maint, on_pg_closed);
}

static void on_deregistered(struct pgr_pgconn *c, PGresult *res, void *arg) {
  (void)c;
  (void)res;
  close_all(arg);
}

void pgr_loop_maybe_finish(struct pgr_loop *l) {
  if (l->phase != PGR_PHASE_DRAINING || l->ninflight > 0)
    return;
  l->phase = PGR_PHASE_CLOSING;
  char wid[32];
  const char *params[1] = {wid};
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  if (pgr_pgconn_query(&l->pg, "DELETE FROM pgrunner.workers WHERE id = $1", 1,
                       params, on_deregistered, l) != 0)
    close_all(l);
}

static void on_hard_stop(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, shutdown_timer);
  pgr_error("tasks did not stop after being interrupted; exiting anyway "
            "(other workers will recover them)",
            PGR_LI("running", l->ninflight));
  pgr_log_stop();
  exit_abandoning_threads();
}

static void on_shutdown_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, shutdown_timer);
  if (l->ninflight > 0) {
    pgr_warn("shutdown timeout reached; interrupting running tasks",
             PGR_LI("running", l->ninflight));
    l->interrupted_all = 1;
    pgr_dispatch_interrupt_all(l, PGR_INT_SHUTDOWN);
    uv_timer_start(&l->shutdown_timer, on_hard_stop, HARD_STOP_MS, 0);
  }
}

static void begin_shutdown(struct pgr_loop *l, const char *why) {
  if (l->phase >= PGR_PHASE_DRAINING) {
    if (!l->interrupted_all && l->ninflight > 0) {
      pgr_warn("second signal: interrupting running tasks now");
      uv_timer_stop(&l->shutdown_timer);
      on_shutdown_timer(&l->shutdown_timer);
    }
    return;
  }
  l->phase = PGR_PHASE_DRAINING;
  pgr_info("shutting down", PGR_LS("reason", why),
           PGR_LI("running", l->ninflight),
           PGR_LI("timeout_s", l->cfg->shutdown_timeout_s));
  uv_timer_stop(&l->poll_timer);
  uv_timer_stop(&l->wake_timer);
  pgr_janitor_stop(l);
  pgr_dispatch_give_back(l);
  /* May fail only on a closing handle: the loop is ending anyway. */
  (void)uv_timer_start(&l->shutdown_timer, on_shutdown_timer,
                       (uint64_t)l->cfg->shutdown_timeout_s * 1000, 0);
  pgr_loop_maybe_finish(l);
}

void pgr_loop_fail(struct pgr_loop *l, int code) {
  if (l->exit_code == 0)
    l->exit_code = code;
  begin_shutdown(l, "error");
}

static void on_signal(uv_signal_t *s, int signum) {
  struct pgr_loop *l = s->data;
  if (signum == SIGHUP) {
    pgr_info("SIGHUP: reopening the log file");
    pgr_log_reopen();
    return;
  }
  begin_shutdown(l, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static int64_t random_id(void) {
  uint64_t v = 0;
  /* lint-ok(uv-sync-request): once, before the loop runs */
  if (uv_random(NULL, NULL, &v, sizeof v, 0, NULL) != 0)
    v = pgr_now_us() ^ ((uint64_t)getpid() << 32);
  return (int64_t)(v >> 1) | 1; /* positive, never 0 */
}

int pgr_loop_run(const struct pgr_config *cfg) {
  struct pgr_loop *l = pgr_calloc(1, sizeof *l);
  struct pgr_handlers *handlers = NULL;
  char err[1024];
  int rc = 0;
  int loop_ok = 0;

  l->cfg = cfg;
  l->worker_id = random_id();
  snprintf(l->appname, sizeof l->appname, "pgrunner/%016llx",
           (unsigned long long)l->worker_id);
  if (gethostname(l->hostname, sizeof l->hostname - 1) != 0)
    strcpy(l->hostname, "unknown");
  l->queue_running = pgr_calloc(cfg->nqueues, sizeof *l->queue_running);
  l->cursors = pgr_calloc(cfg->nqueues, sizeof *l->cursors);
  l->queue_done = pgr_calloc(cfg->nqueues, sizeof *l->queue_done);
  l->queue_reported = pgr_calloc(cfg->nqueues, sizeof *l->queue_reported);

  if (pgr_handlers_create(cfg, &handlers, err, sizeof err) != 0) {
    fprintf(stderr, "pgrunner: %s\n", err);
    rc = 2;
    goto out;
  }
  l->handlers = handlers;
  if (cfg->metrics_host) {
    /* The gauges are read on the HTTP server's thread, on a connection of
       its own: "/web" keeps it out of this worker's liveness. */
    char webname[sizeof l->appname + 8];
    const char **names = pgr_calloc(cfg->nqueues + 1, sizeof *names);
    for (size_t i = 0; i < cfg->nqueues; i++)
      names[i] = cfg->queues[i].name;
    snprintf(webname, sizeof webname, "%s/web", l->appname);
    pgr_http_set_database(cfg->db, webname, names, cfg->nqueues);
    pgr_http_enable_dashboard(0);
    free(names);
  }
  if (cfg->metrics_host && pgr_http_start(cfg->metrics_host, cfg->metrics_port,
                                          err, sizeof err) != 0) {
    fprintf(stderr, "pgrunner: --metrics-listen: %s\n", err);
    rc = 2;
    goto out;
  }

  PGR_ASSERT(uv_loop_init(&l->loop) == 0);
  loop_ok = 1;
  /* A malformed conninfo is an error waiting cannot heal: exit 1 now,
     naming it (SPEC section 9), rather than retry. The worker threads'
     conninfo is parsed only when they connect, so it is checked here. */
  if (cfg->listen_db) {
    struct pgr_conninfo ci;
    if (pgr_conninfo_parse(cfg->db, NULL, &ci, err, sizeof err) != 0) {
      fprintf(stderr, "pgrunner: --db: %s\n", err);
      rc = 1;
      goto out;
    }
    pgr_conninfo_free(&ci);
  }
  if (pgr_pgconn_init(&l->loop, &l->pg, pgr_config_listen_db(cfg), l->appname,
                      err, sizeof err) != 0) {
    const char *which =
        cfg->listen_db ? "--listen-db (PGRUNNER_LISTEN_DB)" : "--db";
    fprintf(stderr, "pgrunner: %s: %s\n", which, err);
    rc = 1;
    goto out;
  }
  l->pg.data = l;
  l->pg.on_up = pgr_listener_on_up;
  l->pg.on_down = pgr_listener_on_down;
  l->pg.on_notify = pgr_listener_on_notify;
  l->pg.on_connect_failed = pgr_listener_on_connect_failed;
  if (pgr_janitor_init(l, err, sizeof err) != 0) {
    fprintf(stderr, "pgrunner: %s\n", err);
    rc = 2;
    goto out;
  }

  PGR_ASSERT(uv_async_init(&l->loop, &l->done_async, pgr_dispatch_on_done) ==
             0);
  PGR_ASSERT(uv_timer_init(&l->loop, &l->wake_timer) == 0);
  PGR_ASSERT(uv_timer_init(&l->loop, &l->poll_timer) == 0);
  PGR_ASSERT(uv_timer_init(&l->loop, &l->gather_timer) == 0);
  PGR_ASSERT(uv_timer_init(&l->loop, &l->watchdog_timer) == 0);
  PGR_ASSERT(uv_timer_init(&l->loop, &l->shutdown_timer) == 0);
  PGR_ASSERT(uv_signal_init(&l->loop, &l->sigterm) == 0);
  PGR_ASSERT(uv_signal_init(&l->loop, &l->sigint) == 0);
  PGR_ASSERT(uv_signal_init(&l->loop, &l->sighup) == 0);
  l->sigterm.data = l->sigint.data = l->sighup.data = l;
  PGR_ASSERT(uv_signal_start(&l->sigterm, on_signal, SIGTERM) == 0);
  PGR_ASSERT(uv_signal_start(&l->sigint, on_signal, SIGINT) == 0);
  PGR_ASSERT(uv_signal_start(&l->sighup, on_signal, SIGHUP) == 0);
  /* main() held these from the start; one that came meanwhile is taken
     now, by the watchers above. */
  pgr_stop_signals_mask(SIG_UNBLOCK);

  pgr_health_reset(cfg->concurrency);
  PGR_ASSERT(pgr_pool_create(cfg, handlers, l->appname, &l->done_async,
                             &l->pool) == 0);

  pgr_info("worker starting", PGR_LS("worker", l->appname),
           PGR_LI("concurrency", cfg->concurrency),
           PGR_LI("queues", (int64_t)cfg->nqueues),
           PGR_LS("version", PGR_VERSION));
  pgr_mark_loop_thread();
  pgr_listener_start_timers(l);
  pgr_janitor_start(l);
  /* Last: a connection string libpq refuses at once fails the worker
     from inside this call, which closes every handle. */
  pgr_pgconn_start(&l->pg);
  uv_run(&l->loop, UV_RUN_DEFAULT);
  pgr_unmark_loop_thread();

  /* The loop is gone, and with it every timer: the join has a deadline of
     its own. Threads stop at once when idle, within a poll interval when
     connecting or waiting to retry; one that does not (a handler that
     ignored its interrupt) is left behind, and the process exits anyway. */
  rc = l->exit_code;
  if (pgr_pool_destroy(l->pool, JOIN_TIMEOUT_MS) != 0) {
    pgr_error("worker threads did not stop; exiting anyway (other workers "
              "will recover their tasks)");
    pgr_log_stop();
    exit_abandoning_threads();
  }
  l->pool = NULL;
  pgr_info("worker stopped", PGR_LI("exit_code", rc));
out:
  if (loop_ok) {
    /* Close whatever is still open (the early error paths). */
    uv_walk(&l->loop, close_open, NULL);
    uv_run(&l->loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&l->loop) != 0)
      pgr_warn("event loop closed with handles still open");
  }
  pgr_http_stop();
  pgr_handlers_destroy(handlers);
  free(l->queue_running);
  free(l->cursors);
  free(l->queue_done);
  free(l->queue_reported);
  free(l);
  return rc;
}
