/*
 * example_plugin.c - a C handler plugin, built as a shared object and loaded
 * by the integration tests with `pgrunner work --plugin PATH`. It shows the
 * whole API of include/pgrunner.h:
 *
 *   c_insert   writes payload->>'v' into plugin_out(v) through the task's own
 *              transaction (commits with the task's success, or not at all)
 *   c_retry    writes a row, then asks for a retry (the row must vanish)
 *   c_fail     fails for good with a message
 *   c_sleep    writes a row, then sleeps payload->>'sleep' seconds outside
 *              the database (a handler nothing can pre-empt) and succeeds
 *   c_output   sets the task's output to payload->'output' (API 2), after
 *              checking that text that is not JSON is refused; succeeds, or
 *              with "fail": true fails for good (the output is kept)
 *
 * Thread: handlers run on pgrunner's worker threads and may block.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "pgrunner.h"

static enum pgr_outcome insert_row(struct pgr_job *job) {
  const char *params[1] = {job->task->payload};
  PGresult *res = PQexecParams(job->conn,
                               "INSERT INTO plugin_out (v, task) "
                               "SELECT $1::jsonb->>'v', 0",
                               1, NULL, params, NULL, NULL, 0);
  int ok = PQresultStatus(res) == PGRES_COMMAND_OK;
  if (!ok)
    job->fail(job, PQresultErrorMessage(res));
  PQclear(res);
  return ok ? PGR_SUCCESS : PGR_RETRY;
}

static enum pgr_outcome c_insert(struct pgr_job *job, void *arg) {
  (void)arg;
  job->log(job, PGR_LEVEL_INFO, "plugin inserting");
  return insert_row(job);
}

static enum pgr_outcome c_retry(struct pgr_job *job, void *arg) {
  (void)arg;
  if (insert_row(job) != PGR_SUCCESS)
    return PGR_RETRY;
  job->fail(job, "plugin asked for a retry");
  return PGR_RETRY;
}

static enum pgr_outcome c_fail(struct pgr_job *job, void *arg) {
  (void)arg;
  job->fail(job, "plugin refused: permanent");
  return PGR_PERMANENT;
}

static enum pgr_outcome c_sleep(struct pgr_job *job, void *arg) {
  (void)arg;
  if (insert_row(job) != PGR_SUCCESS)
    return PGR_RETRY;
  /* The payload is JSON; a crude read of "sleep": N is enough here. */
  const char *p = strstr(job->task->payload, "\"sleep\"");
  double secs = p ? strtod(strchr(p, ':') + 1, NULL) : 1.0;
  struct timespec ts = {(time_t)secs,
                        (long)((secs - (double)(time_t)secs) * 1e9)};
  while (nanosleep(&ts, &ts) != 0)
    ;
  return PGR_SUCCESS;
}

static enum pgr_outcome c_output(struct pgr_job *job, void *arg) {
  const char *params[1] = {job->task->payload};
  enum pgr_outcome o = PGR_RETRY;
  (void)arg;
  PGresult *res = PQexecParams(job->conn,
                               "SELECT $1::jsonb->'output',"
                               " coalesce(($1::jsonb->>'fail')::boolean, false)",
                               1, NULL, params, NULL, NULL, 0);
  if (PQresultStatus(res) != PGRES_TUPLES_OK) {
    job->fail(job, PQresultErrorMessage(res));
    goto out;
  }
  if (job->set_output(job, "{\"not\": json") == 0 ||
      job->set_output(job, "\"\\u0000\"") == 0) {
    job->fail(job, "set_output accepted text that is not JSON");
    o = PGR_PERMANENT;
    goto out;
  }
  if (job->set_output(job, PQgetisnull(res, 0, 0) ? NULL
                                                  : PQgetvalue(res, 0, 0)) != 0) {
    job->fail(job, "set_output refused the payload's output");
    o = PGR_PERMANENT;
    goto out;
  }
  if (strcmp(PQgetvalue(res, 0, 1), "t") == 0) {
    job->fail(job, "plugin failed, output kept");
    o = PGR_PERMANENT;
    goto out;
  }
  o = PGR_SUCCESS;
out:
  PQclear(res);
  return o;
}

int pgr_plugin_init(struct pgr_registry *reg) {
  /* Built for API 2 (c_output uses set_output). */
  if (reg->api_version < PGR_API_VERSION)
    return -1;
  if (reg->add(reg, "c_output", c_output, NULL) != 0 ||
      reg->add(reg, "c_insert", c_insert, NULL) != 0 ||
      reg->add(reg, "c_retry", c_retry, NULL) != 0 ||
      reg->add(reg, "c_fail", c_fail, NULL) != 0 ||
      reg->add(reg, "c_sleep", c_sleep, NULL) != 0)
    return -1;
  /* Kinds follow the SQL kinds' rule, [a-z_][a-z0-9_]*: the registry must
     refuse these (the tests rely on this plugin loading at all). */
  if (reg->add(reg, "Bad Kind", c_fail, NULL) == 0 ||
      reg->add(reg, "x;y", c_fail, NULL) == 0 ||
      reg->add(reg, "noop", c_fail, NULL) == 0)
    return -1;
  return 0;
}
