/*
 * registry.c - who this worker is to the database: the schema check at
 * start and after, the registration that precedes the first claim on a
 * connection, and the give-back of tasks a lost claim left running under
 * our name.
 *
 * Thread: LOOP THREAD ONLY. Every query goes through pgconn.c's
 * nonblocking queue.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/migrations.h"
#include "health.h"
#include "log.h"
#include "loop/internal.h"

static void release_unknown(struct pgr_loop *l);

/* The ids of the tasks our threads hold, as an array literal (initialises
   b; the caller frees it). */
void pgr_registry_inflight_ids(struct pgr_loop *l, struct pgr_buf *b) {
  int first = 1;
  pgr_buf_init(b);
  pgr_buf_addc(b, '{');
  for (struct pgr_claim *c = l->inflight; c; c = c->prev) {
    pgr_buf_printf(b, first ? "%lld" : ",%lld", (long long)c->id);
    first = 0;
  }
  pgr_buf_addc(b, '}');
}

/* A heartbeat succeeded (janitor.c): the worker's row exists. On a new
   connection, what is left before the first claim is giving back what a
   lost claim may have left running under our name. */
void pgr_registry_on_heartbeat(struct pgr_loop *l) {
  if (l->session == PGR_SESSION_SET_UP && !l->releasing)
    release_unknown(l);
}

static void on_released(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  l->releasing = 0;
  if (!pgr_pgconn_result_ok(res, PGRES_TUPLES_OK, PGR_LEVEL_ERROR,
                            "cannot release unknown tasks"))
    return; /* the next heartbeat tries again */
  int n = atoi(PQgetvalue(res, 0, 0));
  if (n > 0)
    pgr_warn("gave back tasks whose claim was lost with the connection",
             PGR_LI("tasks", n));
  if (l->session == PGR_SESSION_REGISTERED) {
    if (l->more)
      pgr_claims_request(l);
    return;
  }
  l->session = PGR_SESSION_REGISTERED;
  l->registered_ms = uv_now(&l->loop);
  l->more = 1;
  pgr_info("worker registered", PGR_LS("worker", l->appname),
           PGR_LI("concurrency", l->cfg->concurrency));
  pgr_claims_request(l);
}

/*
 * Before the first claim on a connection, and every few seconds after: a
 * claim may have committed while its answer was lost with the previous
 * connection (the server may even commit it after we reconnected, when the
 * old session finds out it is orphaned); those tasks are ours in the table
 * but unknown to us, and recovery will not touch them (we are alive). Give
 * back every running task of ours that we do not hold. Only sent while no
 * claim is queued or in flight (and claims wait for it), so everything we
 * do hold is in l->inflight.
 */
static void release_unknown(struct pgr_loop *l) {
  struct pgr_buf known;
  char wid[32];

  pgr_registry_inflight_ids(l, &known);
  snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
  const char *params[2] = {wid, known.data};
  if (pgr_pgconn_query(&l->pg,
                       "SELECT pgrunner.release_unknown($1::bigint,"
                       " $2::bigint[])",
                       2, params, on_released, l) == 0)
    l->releasing = 1;
  pgr_buf_free(&known);
}

/*
 * At start a schema that is missing or behind ends the worker (exit 1): no
 * waiting heals it. Once the worker has run, it is reported by /healthz
 * instead and checked again every heartbeat tick (janitor.c), so a worker
 * whose database was restored from an old backup says so and resumes by
 * itself after `pgrunner migrate`.
 */
static void on_schema_checked(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  int need = pgr_migrate_latest();
  int have = -1;
  (void)pc;
  l->schema_checking = 0;
  if (res == NULL)
    return;
  if (PQresultStatus(res) == PGRES_TUPLES_OK)
    have = atoi(PQgetvalue(res, 0, 0));
  pgr_health_schema(have < 0 ? 0 : have, need);
  if (have < need) {
    l->schema_behind = 1;
    if (l->phase != PGR_PHASE_STARTING) {
      pgr_log(l->schema_logged ? PGR_LEVEL_DEBUG : PGR_LEVEL_ERROR,
              "the pgrunner schema is behind: run `pgrunner migrate`",
              PGR_LI("schema_version", have < 0 ? 0 : have),
              PGR_LI("needed_version", need));
      l->schema_logged = 1;
      return;
    }
    if (have < 0)
      pgr_error("the pgrunner schema is missing from the database: run "
                "`pgrunner migrate`");
    else
      pgr_error("the pgrunner schema is out of date: run `pgrunner migrate`",
                PGR_LI("schema_version", have), PGR_LI("needed_version", need));
    pgr_loop_fail(l, 1);
    return;
  }
  l->schema_behind = 0;
  l->schema_logged = 0;
  if (l->phase == PGR_PHASE_STARTING)
    l->phase = PGR_PHASE_RUNNING;
  if (l->probe == PGR_PROBE_PASSED)
    pgr_listener_setup_session(l);
  else if (l->probe == PGR_PROBE_NONE)
    pgr_session_probe_start(l);
}

void pgr_registry_check_schema(struct pgr_loop *l) {
  if (l->schema_checking || l->phase == PGR_PHASE_CLOSING ||
      !pgr_pgconn_ready(&l->pg))
    return;
  if (pgr_pgconn_query(&l->pg,
                       "SELECT coalesce(max(version), 0) "
                       "FROM pgrunner.migrations",
                       0, NULL, on_schema_checked, l) != 0) {
    pgr_debug("connection dropped before the schema check");
    return;
  }
  l->schema_checking = 1;
}

void pgr_registry_recheck_schema(struct pgr_loop *l) {
  if (l->schema_behind && l->session == PGR_SESSION_DOWN)
    pgr_registry_check_schema(l);
}

/* Every few seconds, while no claim is in flight, for a minute after each
   registration: see release_unknown. A claim orphaned by a lost connection
   commits, if ever, soon after the connection went; later the look-up
   would only cost time (behind a long transaction it walks an entry for
   every task this worker claimed). */
#define RELEASE_FOR_MS 60000

void pgr_registry_release_unknown(struct pgr_loop *l) {
  if (l->session == PGR_SESSION_REGISTERED && !l->claiming && !l->releasing &&
      l->phase < PGR_PHASE_DRAINING &&
      uv_now(&l->loop) - l->registered_ms <= RELEASE_FOR_MS &&
      pgr_pgconn_ready(&l->pg))
    release_unknown(l);
}
