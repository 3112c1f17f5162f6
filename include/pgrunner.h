/*
 * pgrunner.h - the public handler and plugin API of pgrunner.
 *
 * Thread: handlers run on pgrunner's worker threads, never on the event-loop
 * thread, so a handler may block (run queries, talk to the network).
 *
 * A plugin is a shared object given with `pgrunner work --plugin PATH`. It
 * exports one function, pgr_plugin_init(), which registers handlers for job
 * kinds. Registration happens once at start; the registry is read-only after.
 *
 * Ownership: everything a handler receives (the task, its strings, the
 * connection, the logger) is owned by pgrunner and valid only for the duration
 * of the call. A handler must not COMMIT, ROLLBACK or close the connection:
 * pgrunner commits the handler's work together with the task's success, or
 * rolls all of it back.
 */
#ifndef PGRUNNER_H
#define PGRUNNER_H

#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * 2 added, at the ends of the structs (so a plugin built for 1 still works):
 * pgr_task.timeout_seconds and pgr_job's set_output, retry_after and
 * interrupted. A plugin built against 2 that may be loaded by an older
 * pgrunner checks reg->api_version >= 2 before it uses them.
 */
#define PGR_API_VERSION 2

/* One attempt of one task, as the handler sees it. */
struct pgr_task {
  int64_t id;
  const char *kind;
  const char *queue;
  const char *payload; /* the payload as JSON text, never NULL */
  int attempt;         /* 1 for the first attempt */
  int max_attempts;
  int timeout_seconds; /* the attempt's time limit (API 2) */
};

/* What a handler returns. */
enum pgr_outcome {
  PGR_SUCCESS = 0, /* commit the transaction; the task succeeded */
  PGR_RETRY = 1,   /* roll back; try again after backoff (if attempts remain) */
  PGR_PERMANENT =
      2, /* roll back; fail the task now, whatever attempts remain */
};

enum pgr_level {
  PGR_LEVEL_DEBUG = 0,
  PGR_LEVEL_INFO = 1,
  PGR_LEVEL_WARN = 2,
  PGR_LEVEL_ERROR = 3,
};

/*
 * The per-call context. `log` writes one record tagged with the task's id and
 * kind; it never blocks on I/O. `fail` records the failure message that goes
 * into the task's last_error (a copy is taken; the last call wins).
 *
 * API 2:
 * - `set_output` sets the attempt's output, stored in the task's `output`
 *   column (jsonb) with its success, in the same transaction, or with its
 *   failure. `json` is any JSON value as text (NULL: none). Returns 0, or a
 *   negative value, keeping the output as it was, if it is not valid JSON
 *   (UTF-8, no NUL, numbers within double precision). A copy is taken; the
 *   last call wins.
 * - `retry_after` asks that, if this attempt returns PGR_RETRY and attempts
 *   remain, the next one start `ms` milliseconds from now instead of after
 *   the retry policy's backoff (capped at the policy's cap).
 * - `interrupted` returns nonzero once the attempt has been interrupted
 *   (cancel_task, its time limit, the worker's shutdown deadline): a handler
 *   busy outside the database should then stop and return; its attempt
 *   rolls back whatever it returns.
 */
struct pgr_job {
  const struct pgr_task *task;
  PGconn *conn; /* inside the task's open transaction */
  void (*log)(struct pgr_job *job, enum pgr_level level, const char *msg);
  void (*fail)(struct pgr_job *job, const char *msg);
  void *priv; /* pgrunner's; do not touch */
  int (*set_output)(struct pgr_job *job, const char *json);
  void (*retry_after)(struct pgr_job *job, int64_t ms);
  int (*interrupted)(struct pgr_job *job);
};

typedef enum pgr_outcome (*pgr_handler_fn)(struct pgr_job *job, void *arg);

/*
 * The registry handed to pgr_plugin_init(). `add` returns 0, or a negative
 * value if the kind is invalid or already taken.
 */
struct pgr_registry {
  int api_version;
  int (*add)(struct pgr_registry *reg, const char *kind, pgr_handler_fn fn,
             void *arg);
  void *priv; /* pgrunner's; do not touch */
};

/* The one symbol a plugin exports. Return 0 on success. */
typedef int (*pgr_plugin_init_fn)(struct pgr_registry *reg);
#define PGR_PLUGIN_INIT_SYMBOL "pgr_plugin_init"

#ifdef __cplusplus
}
#endif

#endif /* PGRUNNER_H */
