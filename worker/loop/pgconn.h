/*
 * pgconn.h - one nonblocking PGconn driven by the libuv loop.
 *
 * Thread: LOOP THREAD ONLY. Nothing here blocks: the connection is opened
 * with PQconnectStartParams/PQconnectPoll; every host of the conninfo is
 * resolved first on libuv's thread pool (conntargets.h) and handed to
 * libpq as one host/hostaddr/port entry per address, so libpq's own lookup,
 * which would block, never runs here; queries go out with
 * PQsendQueryParams and come back through PQconsumeInput/PQisBusy.
 *
 * Commands are queued and sent one at a time; each one's callback gets its
 * result (an error result included) or NULL when the connection dropped
 * before it completed. On a drop the connection reconnects by itself with
 * jittered exponential backoff and calls on_up again.
 *
 * Ownership: the struct is owned by the caller and must outlive the close
 * callback. Parameters passed to pgr_pgconn_query() are copied. The
 * PGresult handed to a callback is freed after the callback returns.
 */
#ifndef PGR_PGCONN_H
#define PGR_PGCONN_H

#include <stdint.h>
#include <sys/queue.h>

#include <libpq-fe.h>
#include <uv.h>

#include "common.h"
#include "conninfo.h"
#include "pgrunner.h"

struct pgr_pgconn;
struct pgr_pgcmd;

typedef void (*pgr_pgconn_result_cb)(struct pgr_pgconn *c, PGresult *res,
                                     void *arg);
typedef void (*pgr_pgconn_event_cb)(struct pgr_pgconn *c);
typedef void (*pgr_pgconn_down_cb)(struct pgr_pgconn *c, const char *why);
typedef void (*pgr_pgconn_failed_cb)(struct pgr_pgconn *c, int kind,
                                     const char *why);
typedef void (*pgr_pgconn_notify_cb)(struct pgr_pgconn *c, const char *channel,
                                     const char *payload);

enum pgr_pgconn_state {
  PGR_PGC_DOWN = 0,  /* waiting to (re)connect */
  PGR_PGC_RESOLVING, /* hosts being resolved on the thread pool */
  PGR_PGC_CONNECTING,
  PGR_PGC_READY,
  PGR_PGC_CLOSING,
};

struct pgr_pgpoll;    /* a uv_poll_t on the current socket; freed on close */
struct pgr_pgresolve; /* a lookup on the thread pool; freed when it ends */

struct pgr_pgconn {
  uv_loop_t *loop;
  char *conninfo; /* for redaction */
  struct pgr_conninfo ci;
  PGconn *conn;
  enum pgr_pgconn_state state;
  struct pgr_pgpoll *poll;
  int events;
  uv_timer_t timer; /* backoff; while CONNECTING, the attempt's time limit */
  struct pgr_pgresolve *resolving; /* the lookup in flight, or NULL */
  char *skipped; /* hosts the last lookup could not resolve, or NULL */
  uint64_t backoff_ms;
  uint64_t connect_timeout_ms; /* one attempt; 0: no limit */
  uint64_t seed;
  STAILQ_HEAD(pgr_pgcmds, pgr_pgcmd) cmds;
  int busy; /* the first of cmds was sent; its results are coming */
  PGresult *result;
  int pending_closes;
  pgr_pgconn_event_cb close_cb;
  pgr_pgconn_event_cb on_up;
  pgr_pgconn_down_cb on_down;
  pgr_pgconn_notify_cb on_notify;
  /* An attempt failed; kind is an enum pgr_connerr (connerr.h). The
     connection retries by itself unless the callback closes it. */
  pgr_pgconn_failed_cb on_connect_failed;
  void *data;
  char last_error[512];
};

PGR_MUSTCHECK int pgr_pgconn_init(uv_loop_t *loop, struct pgr_pgconn *c,
                                  const char *conninfo, const char *appname,
                                  char *errbuf, size_t errlen);
void pgr_pgconn_start(struct pgr_pgconn *c);
/* Queue a query. PGR_ECONN (and no callback) if the connection is not up. */
PGR_MUSTCHECK int pgr_pgconn_query(struct pgr_pgconn *c, const char *sql,
                                   int nparams, const char *const *params,
                                   pgr_pgconn_result_cb cb, void *arg);
/* Prepare a statement on this connection (again after every reconnect:
   prepared statements die with their session), and run one. */
PGR_MUSTCHECK int pgr_pgconn_prepare(struct pgr_pgconn *c, const char *name,
                                     const char *sql, pgr_pgconn_result_cb cb,
                                     void *arg);
PGR_MUSTCHECK int pgr_pgconn_execute(struct pgr_pgconn *c, const char *name,
                                     int nparams, const char *const *params,
                                     pgr_pgconn_result_cb cb, void *arg);
int pgr_pgconn_ready(const struct pgr_pgconn *c);
/*
 * The start of most result callbacks: 1 if `res` has status `want`; 0 if
 * the connection dropped (res is NULL: on_down follows and says so) or the
 * statement failed, which is logged at `level` as `what`, with the
 * server's message as `error`.
 */
int pgr_pgconn_result_ok(const PGresult *res, ExecStatusType want,
                         enum pgr_level level, const char *what);
void pgr_pgconn_close(struct pgr_pgconn *c, pgr_pgconn_event_cb cb);

#endif /* PGR_PGCONN_H */
