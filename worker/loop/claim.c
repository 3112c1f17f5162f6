/*
 * claim.c - claiming tasks for the idle worker threads, on the loop's claim
 * connection, and the wake-up timer for the next delayed task.
 *
 * Thread: LOOP THREAD ONLY. Every query goes through pgconn.c's
 * nonblocking queue.
 *
 * The claim also returns how long until the next queued task of our queues
 * is due, which arms a one-shot timer, so a delayed task starts on time
 * without busy polling.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "health.h"
#include "log.h"
#include "loop/internal.h"
#include "metrics.h"

/*
 * $1 worker id, $2 queue names, $3 per-queue limits, $4 total, and per
 * queue a cursor: $5 priority, $6 run_at (as text), $7 id of the last task
 * this worker claimed from that queue, or the front of the queue.
 *
 * Every part is an index range that cannot grow with the table, whatever
 * the statistics say (the plan is generic: see setup_session):
 *   - per queue, two ordered scans of tasks_claim_idx, each under its LIMIT:
 *     tasks more urgent than the cursor's priority (they may arrive at any
 *     time), then the tasks after the cursor. The cursor is what keeps the
 *     claim cheap while something else holds back vacuum: the entries of
 *     the tasks we claimed before it stay in the index, dead but not yet
 *     removable, and a scan from the front would visit each of them;
 *   - the UPDATE finds its rows by primary key (= ANY of an array), never
 *     by a join that the planner may turn into a scan of the whole table;
 *   - the wake-up time is, per queue, the first entry of tasks_delayed_idx
 *     after now() (a task due later than its insertion has one; see 0005),
 *     or when a rate limit lets the next task start;
 *   - tasks waiting behind another of their serial key (serial_held) are
 *     not in tasks_claim_idx at all (0015);
 *   - queues with a row in pgrunner.queue_limits (0015): claim_limits
 *     locks those rows and cuts each queue's LIMIT to what max_running,
 *     the rate and a pause allow; lu records what was taken in the same
 *     rows. Without such a row it is one look-up in that small table.
 * UPDATE ... RETURNING has no order of its own, so the rows are sorted by
 * priority, run_at and id before they are handed out. Column 10 says which
 * scan found the row (2: after the cursor). The last row (id NULL) carries
 * the milliseconds until the next future task of our queues.
 */
const char pgr_claim_sql[] =
    "WITH q AS ("
    "  SELECT * FROM unnest($2::text[], $3::int[], $5::int[],"
    "                       $6::timestamptz[], $7::bigint[])"
    "           AS q(name, lim, cp, cr, ci)"
    "), lm AS MATERIALIZED ("
    "  SELECT m.* FROM pgrunner.claim_limits($2::text[], $3::int[]) m"
    "   WHERE EXISTS (SELECT 1 FROM pgrunner.queue_limits l"
    "                  WHERE l.queue = ANY ($2::text[]))"
    "), ql AS ("
    "  SELECT q.name, least(q.lim, coalesce(lm.allow, q.lim)) AS lim,"
    "         q.cp, q.cr, q.ci"
    "    FROM q LEFT JOIN lm ON lm.queue = q.name"
    "), c AS ("
    "  SELECT x.id, x.scan, x.priority, x.run_at"
    "    FROM ql AS q CROSS JOIN LATERAL ("
    "    SELECT * FROM ("
    "      SELECT * FROM (SELECT t.id, 1 AS scan, t.priority, t.run_at"
    "         FROM pgrunner.tasks t"
    "        WHERE t.state = 'queued' AND NOT t.serial_held"
    "          AND t.queue = q.name"
    "          AND t.priority < q.cp AND t.run_at <= now()"
    "        ORDER BY t.priority, t.run_at, t.id"
    "        LIMIT q.lim FOR UPDATE SKIP LOCKED) b1"
    "      UNION ALL"
    "      SELECT * FROM (SELECT t.id, 2 AS scan, t.priority, t.run_at"
    "         FROM pgrunner.tasks t"
    "        WHERE t.state = 'queued' AND NOT t.serial_held"
    "          AND t.queue = q.name"
    "          AND (t.priority, t.run_at, t.id) > (q.cp, q.cr, q.ci)"
    "          AND t.run_at <= now()"
    "        ORDER BY t.priority, t.run_at, t.id"
    "        LIMIT q.lim FOR UPDATE SKIP LOCKED) b2"
    "    ) b LIMIT q.lim"
    "  ) x"
    "  ORDER BY x.priority, x.run_at, x.id LIMIT $4"
    "), u AS ("
    "  UPDATE pgrunner.tasks t SET state = 'running',"
    "         attempts = t.attempts + 1, started_at = now(), worker_id = $1,"
    "         finished_at = NULL"
    "   WHERE t.id = ANY (ARRAY(SELECT c.id FROM c))"
    "  RETURNING t.id, t.queue, t.kind, t.payload::text, t.attempts,"
    "            t.max_attempts, t.timeout_seconds, t.priority,"
    "            t.run_at"
    "), lu AS ("
    "  UPDATE pgrunner.queue_limits l"
    "     SET running_ids = CASE WHEN m.running IS NOT NULL"
    "                            THEN m.running || s.ids END,"
    "         rate_base = coalesce(m.rate_base, l.rate_base),"
    "         rate_counts = CASE WHEN m.rate_slot IS NULL THEN l.rate_counts"
    "                       ELSE m.rate_counts[:m.rate_slot - 1]"
    "                            || (m.rate_counts[m.rate_slot] + s.n)"
    "                            || m.rate_counts[m.rate_slot + 1:] END"
    "    FROM lm m, (SELECT u.queue, array_agg(u.id) AS ids, count(*)::int AS n"
    "                  FROM u GROUP BY u.queue) s"
    "   WHERE l.queue = m.queue AND s.queue = m.queue"
    ") "
    "SELECT id, queue, kind, payload, attempts, max_attempts,"
    "       timeout_seconds, priority, NULL::float8, run_at::text, scan "
    "  FROM (SELECT u.*, c.scan FROM u JOIN c ON c.id = u.id"
    "         ORDER BY u.priority, u.run_at, u.id) s "
    "UNION ALL "
    "SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    "       ceil(extract(epoch FROM least((SELECT min(n.run_at) FROM q"
    "                                 CROSS JOIN LATERAL ("
    "                                  SELECT t.run_at FROM pgrunner.tasks t"
    "                                   WHERE t.state = 'queued'"
    "                                     AND t.run_at > t.created_at"
    "                                     AND t.queue = q.name"
    "                                     AND t.run_at > now()"
    "                                   ORDER BY t.run_at LIMIT 1) n),"
    "                                (SELECT min(lm.wake_at) FROM lm))"
    "                              - now()) * 1000),"
    "       NULL, NULL";

static void on_wake_timer(uv_timer_t *t) {
  struct pgr_loop *l = pgr_container_of(t, struct pgr_loop, wake_timer);
  l->wake_at_ms = 0;
  l->more = 1;
  pgr_claims_request(l);
}

void pgr_claims_wake_at(struct pgr_loop *l, int64_t in_ms) {
  uint64_t now = uv_now(&l->loop);
  if (in_ms <= 0) {
    l->more = 1;
    return;
  }
  uint64_t at = now + (uint64_t)in_ms;
  if (l->wake_at_ms != 0 && l->wake_at_ms <= at)
    return;
  l->wake_at_ms = at;
  uv_timer_start(&l->wake_timer, on_wake_timer, (uint64_t)in_ms, 0);
}

static void on_claimed(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  int got = 0;
  (void)pc;

  l->claiming = 0;
  if (res == NULL)
    return; /* connection lost; on_up claims again */
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
    pgr_error("claim failed", PGR_LS("error", m ? m : "unknown error"));
    pgr_health_claim_failed(m);
    return;
  }
  pgr_metrics_claim_succeeded();
  pgr_health_claim_ok();
  int n = PQntuples(res);
  for (int i = 0; i < n; i++) {
    if (PQgetisnull(res, i, 0)) {
      if (!PQgetisnull(res, i, 8))
        pgr_claims_wake_at(l, (int64_t)atof(PQgetvalue(res, i, 8)));
      continue;
    }
    struct pgr_claim *c = pgr_claim_create();
    c->id = atoll(PQgetvalue(res, i, 0));
    c->queue = pgr_strdup(PQgetvalue(res, i, 1));
    c->kind = pgr_strdup(PQgetvalue(res, i, 2));
    c->payload = pgr_strdup(PQgetvalue(res, i, 3));
    c->attempt = atoi(PQgetvalue(res, i, 4));
    c->max_attempts = atoi(PQgetvalue(res, i, 5));
    c->timeout_s = PQgetisnull(res, i, 6) ? l->cfg->task_timeout_s
                                          : atoi(PQgetvalue(res, i, 6));
    c->priority = atoi(PQgetvalue(res, i, 7));
    c->worker_id = l->worker_id;
    c->queue_index = pgr_config_queue_index(l->cfg, c->queue);
    /* Rows come in claim order, so the last one found after a queue's
       cursor moves it. One found before it (more urgent) leaves it: moving
       back would make every later claim walk the entries in between. */
    if (c->queue_index >= 0 && atoi(PQgetvalue(res, i, 10)) == 2) {
      struct pgr_cursor *cur = &l->cursors[c->queue_index];
      const char *at = PQgetvalue(res, i, 9);
      if (strlen(at) < sizeof cur->run_at) {
        cur->set = 1;
        cur->priority = c->priority;
        strcpy(cur->run_at, at);
        cur->id = c->id;
      }
    }
    pgr_dispatch_submit(l, c);
    got++;
  }
  /* A full batch means more may be waiting. */
  if (got >= l->claim_asked)
    l->more = 1;
  pgr_debug("claimed", PGR_LI("tasks", got));
  if (l->more)
    pgr_claims_request(l);
}

/* How often a claim starts from the front of every queue all the same: a
   task can land behind a cursor (inserted with an old run_at, or given
   back by another worker's claim that rolled back), and this bounds how
   long it waits. Under a long transaction elsewhere such a claim walks
   every dead entry, so not more often than this. */
#define SWEEP_EVERY_MS 1000

void pgr_claims_reset(struct pgr_loop *l) {
  for (size_t i = 0; i < l->cfg->nqueues; i++)
    l->cursors[i].set = 0;
}

#define GATHER_MS 1

static void claim(struct pgr_loop *l, int gather);

/* The wait for more idle threads is over: claim for those there are. */
static void on_gather_timer(uv_timer_t *t) {
  claim(pgr_container_of(t, struct pgr_loop, gather_timer), 0);
}

void pgr_claims_request(struct pgr_loop *l) {
  claim(l, 1);
}

/* `gather`: while few threads are idle, wait for more (see below). */
static void claim(struct pgr_loop *l, int gather) {
  const struct pgr_config *cfg = l->cfg;
  struct pgr_buf names, limits, prios, ats, ids;
  char wid[32], total[16];
  int free_slots, any = 0;

  if (l->phase >= PGR_PHASE_DRAINING || l->session != PGR_SESSION_REGISTERED ||
      !pgr_pgconn_ready(&l->pg))
    return;
  if (l->claiming || l->releasing) {
    l->more = 1;
    return;
  }
  /* Claim only for idle threads. Claiming ahead would save each thread a
     claim round trip between tasks (about 15 % more no-op tasks/s), but a
     task claimed ahead is 'running' before any thread runs it, and it runs
     before a more urgent task that arrives in the meantime: SPEC's
     priority order and --concurrency as the count of running tasks would
     both break. */
  free_slots = cfg->concurrency - l->ninflight;
  if (free_slots <= 0)
    return;
  /* Under a backlog threads free up one by one, and a claim for each
     would cost one claim statement per task, where one for a quarter of
     the threads costs about the same as one for a single thread. So while
     others still run, a claim waits up to GATHER_MS for more threads to
     free up (on a busy machine the idle ones cost nothing: the processors
     are busy with the rest). An idle worker claims at once: all its
     threads are free. */
  if (gather && free_slots < (cfg->concurrency + 3) / 4) {
    l->more = 1;
    if (!uv_is_active((uv_handle_t *)&l->gather_timer))
      PGR_ASSERT(
          uv_timer_start(&l->gather_timer, on_gather_timer, GATHER_MS, 0) == 0);
    return;
  }
  uv_timer_stop(&l->gather_timer);
  uint64_t now = uv_now(&l->loop);
  if (now - l->swept_ms >= SWEEP_EVERY_MS) {
    l->swept_ms = now;
    pgr_claims_reset(l);
  }

  pgr_buf_init(&names);
  pgr_buf_init(&limits);
  pgr_buf_init(&prios);
  pgr_buf_init(&ats);
  pgr_buf_init(&ids);
  for (size_t i = 0; i < cfg->nqueues; i++) {
    const struct pgr_cursor *cur = &l->cursors[i];
    int lim = free_slots;
    if (cfg->queues[i].cap > 0 &&
        cfg->queues[i].cap - l->queue_running[i] < lim)
      lim = cfg->queues[i].cap - l->queue_running[i];
    if (lim <= 0)
      continue;
    const char *sep = any ? "," : "{";
    pgr_buf_printf(&names, "%s", sep);
    pgr_buf_add_array_elem(&names, cfg->queues[i].name);
    pgr_buf_printf(&limits, "%s%d", sep, lim);
    if (cur->set) {
      pgr_buf_printf(&prios, "%s%d", sep, cur->priority);
      pgr_buf_printf(&ats, "%s", sep);
      pgr_buf_add_array_elem(&ats, cur->run_at);
      pgr_buf_printf(&ids, "%s%lld", sep, (long long)cur->id);
    } else {
      /* The front: before any task that can exist. */
      pgr_buf_printf(&prios, "%s-2147483648", sep);
      pgr_buf_printf(&ats, "%s-infinity", sep);
      pgr_buf_printf(&ids, "%s-9223372036854775808", sep);
    }
    any = 1;
  }
  if (any) {
    pgr_buf_addc(&names, '}');
    pgr_buf_addc(&limits, '}');
    pgr_buf_addc(&prios, '}');
    pgr_buf_addc(&ats, '}');
    pgr_buf_addc(&ids, '}');
    const char *params[7] = {wid,        names.data, limits.data, total,
                             prios.data, ats.data,   ids.data};
    snprintf(wid, sizeof wid, "%lld", (long long)l->worker_id);
    snprintf(total, sizeof total, "%d", free_slots);
    l->more = 0;
    l->claim_asked = free_slots;
    if (pgr_pgconn_execute(&l->pg, "pgr_claim", 7, params, on_claimed, l) == 0)
      l->claiming = 1;
  }
  pgr_buf_free(&names);
  pgr_buf_free(&limits);
  pgr_buf_free(&prios);
  pgr_buf_free(&ats);
  pgr_buf_free(&ids);
}
