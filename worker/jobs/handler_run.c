/*
 * handler_run.c - a C handler's turn in an attempt: the pgr_job it is
 * handed (include/pgrunner.h) and what its outcome does to the
 * transaction around it.
 *
 * Thread: worker threads only; the handler runs on the slot's thread with
 * the attempt's transaction open on the slot's connection.
 */
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "jobs/attempt.h"
#include "log.h"

/* pgr_job callbacks for C handlers. */
struct job_priv {
  struct pgr_claim *claim;
  struct pgr_slot *slot;
  char *error;
  char *output;     /* valid JSON text, or NULL */
  int64_t retry_ms; /* -1: the policy's backoff */
};

static void job_log(struct pgr_job *job, enum pgr_level level,
                    const char *msg) {
  pgr_log(level, msg, PGR_LI("task", job->task->id),
          PGR_LS("kind", job->task->kind));
}

static void job_fail(struct pgr_job *job, const char *msg) {
  struct job_priv *jp = job->priv;
  free(jp->error);
  jp->error = pgr_strdup(msg ? msg : "");
}

/* The text is kept as given, not as jansson would write it back (which
   would print 0.1 as 0.10000000000000001): what jansson accepts (strict
   RFC 8259, UTF-8, no \u0000, numbers that fit a double) the server's
   jsonb accepts too, so a success is never refused for its output. */
static int job_set_output(struct pgr_job *job, const char *json) {
  struct job_priv *jp = job->priv;
  if (json != NULL) {
    json_error_t err;
    json_t *v = json_loads(json, JSON_DECODE_ANY, &err);
    if (v == NULL)
      return PGR_EINVAL;
    json_decref(v);
  }
  free(jp->output);
  jp->output = json ? pgr_strdup(json) : NULL;
  return 0;
}

static void job_retry_after(struct pgr_job *job, int64_t ms) {
  struct job_priv *jp = job->priv;
  jp->retry_ms = ms < 0 ? 0 : ms;
}

static int job_interrupted(struct pgr_job *job) {
  struct job_priv *jp = job->priv;
  return pgr_slot_interrupt(jp->slot) != PGR_INT_NONE;
}

void pgr_handler_run(struct pgr_slot *s, struct pgr_claim *c,
                     const struct pgr_handler *h, struct pgr_attempt *a) {
  struct pgr_task task = {c->id,      c->kind,         c->queue,    c->payload,
                          c->attempt, c->max_attempts, c->timeout_s};
  struct job_priv jp = {c, s, NULL, NULL, -1};
  struct pgr_job job = {
      &task, s->conn,        job_log,         job_fail,
      &jp,   job_set_output, job_retry_after, job_interrupted};

  pgr_pipeline_run(s, c, NULL, PGR_PIPE_OPEN, a);
  if (a->r != PGR_A_OK)
    return;
  enum pgr_outcome o = h->fn(&job, h->arg);
  /* The output goes with the success mark, or with the failure's record. */
  a->output = jp.output;
  jp.output = NULL;
  a->retry_ms = jp.retry_ms;
  /* The handler had the session: it may have been terminated under it
     (its own statement then failed), or left in a pipeline. */
  if (PQstatus(s->conn) != CONNECTION_OK ||
      PQpipelineStatus(s->conn) != PQ_PIPELINE_OFF ||
      PQtransactionStatus(s->conn) == PQTRANS_ACTIVE) {
    a->r = PGR_A_CONNLOST;
    goto out;
  }
  /* A handler busy outside the database cannot be stopped mid-way, but an
     attempt interrupted meanwhile (time limit, cancel, shutdown) must not
     commit when the handler finally returns: it rolls back, and the caller
     records the interruption as it does for SQL tasks. */
  if (o == PGR_SUCCESS && pgr_slot_interrupt(s) != PGR_INT_NONE) {
    pgr_attempt_set_msg(a, PGR_A_RETRY, "interrupted while the handler ran");
    if (pgr_slot_command(s->conn, "ROLLBACK") != 0)
      a->r = PGR_A_CONNLOST;
    goto out;
  }
  if (o == PGR_SUCCESS && PQtransactionStatus(s->conn) == PQTRANS_INTRANS) {
    pgr_pipeline_run(s, c, NULL, PGR_PIPE_CLOSE, a);
    goto out;
  }
  if (o == PGR_SUCCESS) {
    /* The handler left the transaction (committed, aborted or failed). */
    pgr_attempt_set_msg(a, PGR_A_RETRY,
                        "handler left its transaction in an unusable state");
  } else {
    pgr_attempt_set_msg(a, o == PGR_PERMANENT ? PGR_A_PERMANENT : PGR_A_RETRY,
                        jp.error ? jp.error : "handler failed");
  }
  if (pgr_slot_command(s->conn, "ROLLBACK") != 0)
    a->r = PGR_A_CONNLOST;
out:
  free(jp.error);
  free(jp.output);
}
