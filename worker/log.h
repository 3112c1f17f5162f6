/*
 * log.h - the asynchronous logger.
 *
 * Thread: any thread may call pgr_log(); it formats the record on the
 * calling thread and hands it to a bounded in-memory queue, never waiting
 * for disk or socket I/O. One writer thread owned by this module drains the
 * queue to stderr, to DIR/pgrunner.log, and (for the worker) serves the
 * socket DIR/pgrunner.sock through which other pgrunner processes send their
 * records.
 *
 * Lifecycle: pgr_log_start() once in main, pgr_log_stop() once before exit;
 * stop writes every record queued before it and joins the writer.
 * Before start (and after stop) records go straight to stderr.
 *
 * Queue full (65536 records or 32 MiB, i.e. the disk has stalled): debug
 * records are dropped and counted (pgr_log_dropped(), reported in a warn
 * record); info, warn and error records are never dropped. A job or main
 * thread then waits up to 100 ms for room before queueing anyway; the
 * event-loop thread never waits.
 *
 * With a log dir, a client (serve = 0) hands its records to the worker over
 * DIR/pgrunner.sock, and its stop returns once the worker has written them;
 * with no worker listening it appends to DIR/pgrunner.log itself. The
 * worker writes client records whatever its own level (the client filtered
 * them by its own) and in its own format. Details: the DESIGN note in log.c.
 */
#ifndef PGR_LOG_H
#define PGR_LOG_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "pgrunner.h"

enum pgr_log_format {
  PGR_LOG_TEXT = 0, /* logfmt */
  PGR_LOG_JSON = 1, /* one JSON object a line */
};

enum pgr_log_field_type {
  PGR_LF_STR = 0,
  PGR_LF_INT = 1,
  PGR_LF_DBL = 2,
};

/* A key/value pair of a record. Strings are copied before pgr_log returns. */
struct pgr_log_field {
  const char *key;
  enum pgr_log_field_type type;
  union {
    const char *s;
    int64_t i;
    double d;
  } v;
};

#define PGR_LS(k, x)                                                           \
  { .key = (k), .type = PGR_LF_STR, .v.s = (x) }
#define PGR_LI(k, x)                                                           \
  { .key = (k), .type = PGR_LF_INT, .v.i = (int64_t)(x) }
#define PGR_LD(k, x)                                                           \
  { .key = (k), .type = PGR_LF_DBL, .v.d = (double)(x) }

struct pgr_log_options {
  const char *proc;     /* "worker", "add", "migrate", ... */
  enum pgr_level level; /* records below this are discarded */
  enum pgr_log_format format;
  const char *dir;  /* NULL: stderr only */
  int serve;        /* 1 (worker): own the file and the socket */
  int quiet_stderr; /* 1: do not copy records to stderr */
};

PGR_MUSTCHECK int pgr_log_start(const struct pgr_log_options *opts);
void pgr_log_stop(void);

/* Ask the writer to reopen DIR/pgrunner.log (SIGHUP). Never blocks. */
void pgr_log_reopen(void);

int pgr_log_enabled(enum pgr_level level);
void pgr_log_write(enum pgr_level level, const char *msg,
                   const struct pgr_log_field *fields, size_t nfields);

/* Debug records dropped because the queue was full. */
uint64_t pgr_log_dropped(void);

/*
 * Worker only: lines received on the log socket that were not written
 * because they were not valid records, were too long, or were cut off by
 * their sender disconnecting mid-line.
 */
uint64_t pgr_log_rejected(void);

/*
 * pgr_log(level, msg, PGR_LI("task", id), PGR_LS("kind", kind), ...)
 * The fields are evaluated only when the level is enabled.
 */
#define pgr_log(level, msg, ...)                                               \
  do {                                                                         \
    if (pgr_log_enabled(level)) {                                              \
      const struct pgr_log_field pgr_lf_[] = {{NULL, PGR_LF_STR, {NULL}},      \
                                              ##__VA_ARGS__};                  \
      pgr_log_write((level), (msg), pgr_lf_ + 1,                               \
                    sizeof(pgr_lf_) / sizeof(pgr_lf_[0]) - 1);                 \
    }                                                                          \
  } while (0)

#define pgr_debug(msg, ...) pgr_log(PGR_LEVEL_DEBUG, msg, ##__VA_ARGS__)
#define pgr_info(msg, ...) pgr_log(PGR_LEVEL_INFO, msg, ##__VA_ARGS__)
#define pgr_warn(msg, ...) pgr_log(PGR_LEVEL_WARN, msg, ##__VA_ARGS__)
#define pgr_error(msg, ...) pgr_log(PGR_LEVEL_ERROR, msg, ##__VA_ARGS__)

/* A libpq notice processor (PQsetNoticeProcessor): server notices, and
   the FATAL a server sends to an idle session it is about to close, go to
   the debug log rather than raw to stderr. Any thread. */
void pgr_log_pq_notice(void *arg, const char *msg);

#endif /* PGR_LOG_H */
