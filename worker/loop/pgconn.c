/*
 * pgconn.c - a nonblocking libpq connection on a uv_poll_t.
 *
 * Thread: LOOP THREAD ONLY; nothing here may block.
 *
 * One state enum, one place per transition:
 *   DOWN -> RESOLVING (all hosts, off the loop) -> CONNECTING -> READY
 *   -> DOWN ...
 * and CLOSING from anywhere. A drop fails the queued commands (callbacks
 * get NULL), tells the owner (on_down) and arms the backoff timer.
 */
#include "loop/pgconn.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connerr.h"
#include "conntargets.h"
#include "log.h"

enum cmd_kind {
  CMD_QUERY = 0, /* sql is the text */
  CMD_PREPARE,   /* sql is the text, name the statement */
  CMD_EXECUTE,   /* name is a prepared statement */
};

struct pgr_pgcmd {
  STAILQ_ENTRY(pgr_pgcmd) next;
  enum cmd_kind kind;
  char *name;
  char *sql;
  int nparams;
  char **params;
  pgr_pgconn_result_cb cb;
  void *arg;
};

/*
 * The handle polls its own duplicate of libpq's socket. libpq closes its
 * descriptor by itself the moment it reads end-of-file (inside
 * PQconsumeInput or PQgetResult), before we can stop polling it; a worker
 * thread connecting at that moment gets the same number, and epoll_ctl on
 * the old number would then watch that thread's socket (ThreadSanitizer
 * caught it when a proxy cut both connections at once). A duplicate stays
 * ours until the handle is closed.
 */
struct pgr_pgpoll {
  uv_poll_t handle;
  struct pgr_pgconn *owner;
  int fd;     /* libpq's descriptor number, to notice a new socket */
  int own_fd; /* our duplicate, the one polled; closed with the handle */
};

static void on_poll(uv_poll_t *h, int status, int events);
static void connect_step(struct pgr_pgconn *c);
static void lost(struct pgr_pgconn *c, const char *why);

static void cmd_free(struct pgr_pgcmd *cmd) {
  for (int i = 0; i < cmd->nparams; i++)
    free(cmd->params[i]);
  free(cmd->params);
  free(cmd->sql);
  free(cmd->name);
  free(cmd);
}

static void on_poll_closed(uv_handle_t *h) {
  struct pgr_pgpoll *p = h->data;
  struct pgr_pgconn *c = p->owner;
  close(p->own_fd);
  free(p);
  if (c && --c->pending_closes == 0 && c->state == PGR_PGC_CLOSING &&
      c->close_cb)
    c->close_cb(c);
}

/* Stop watching the socket and release the handle (freed on close). */
static void unwatch(struct pgr_pgconn *c) {
  if (c->poll == NULL)
    return;
  uv_poll_stop(&c->poll->handle);
  c->pending_closes++;
  uv_close((uv_handle_t *)&c->poll->handle, on_poll_closed);
  c->poll = NULL;
  c->events = 0;
}

/*
 * Watch PQsocket() for `events`. While connecting, libpq may close one
 * socket and open another (the next address) that can reuse the same fd
 * number, so `fresh` asks for a new handle rather than trusting the number.
 */
static int watch(struct pgr_pgconn *c, int events, int fresh) {
  int fd = PQsocket(c->conn);
  if (fd < 0)
    return PGR_ECONN;
  if (c->poll && (fresh || c->poll->fd != fd))
    unwatch(c);
  if (c->poll == NULL) {
    int own = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (own < 0)
      return PGR_ECONN;
    struct pgr_pgpoll *p = pgr_calloc(1, sizeof *p);
    p->owner = c;
    p->fd = fd;
    p->own_fd = own;
    p->handle.data = p;
    if (uv_poll_init(c->loop, &p->handle, own) != 0) {
      close(own);
      free(p);
      return PGR_ECONN;
    }
    c->poll = p;
    c->events = 0;
  }
  if (c->events != events) {
    if (uv_poll_start(&c->poll->handle, events, on_poll) != 0)
      return PGR_ECONN;
    c->events = events;
  }
  return 0;
}

static uint64_t jitter(struct pgr_pgconn *c, uint64_t ms) {
  /* xorshift: good enough to spread reconnects of many workers. */
  c->seed ^= c->seed << 13;
  c->seed ^= c->seed >> 7;
  c->seed ^= c->seed << 17;
  return ms / 2 + c->seed % (ms + 1);
}

static void on_retry_timer(uv_timer_t *t);

static void schedule_retry(struct pgr_pgconn *c) {
  uint64_t delay = jitter(c, c->backoff_ms);
  c->backoff_ms = c->backoff_ms * 2 > 10000 ? 10000 : c->backoff_ms * 2;
  c->state = PGR_PGC_DOWN;
  uv_timer_start(&c->timer, on_retry_timer, delay, 0);
}

static void connect_failed(struct pgr_pgconn *c, const char *why) {
  char *joined = NULL;
  if (c->conn && c->skipped) {
    /* libpq tried the hosts that resolved; say which ones did not. */
    char *w = pgr_strdup(why);
    pgr_trim_end(w);
    joined = pgr_asprintf("%s; %s", w, c->skipped);
    free(w);
    why = joined;
  }
  char msg[512];
  enum pgr_connerr kind = pgr_connerr_classify(
      why, c->conn ? PQconnectionNeedsPassword(c->conn) : 0, msg, sizeof msg);
  free(joined);
  char *safe = pgr_redact(c->conninfo, msg);
  snprintf(c->last_error, sizeof c->last_error, "%s", safe);
  free(safe);
  pgr_warn("database connection failed; retrying",
           PGR_LS("error", c->last_error), PGR_LI("retry_ms", c->backoff_ms),
           PGR_LS("class", pgr_connerr_name(kind)));
  unwatch(c);
  if (c->conn) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  schedule_retry(c);
  /* Last: the owner may close the connection from here. */
  if (c->on_connect_failed)
    c->on_connect_failed(c, kind, c->last_error);
}

/* libpq enforces connect_timeout only when it connects blocking; a
   nonblocking connection times its attempt itself. */
static void on_connect_timeout(uv_timer_t *t) {
  struct pgr_pgconn *c = pgr_container_of(t, struct pgr_pgconn, timer);
  if (c->state == PGR_PGC_CONNECTING)
    connect_failed(c, "timeout expired");
}

static void start_connect(struct pgr_pgconn *c, const struct pgr_conninfo *ci) {
  c->conn = PQconnectStartParams(ci->keywords, ci->values, 0);
  if (c->conn == NULL) {
    connect_failed(c, "out of memory");
    return;
  }
  pgr_connerr_watch(c->conn);
  PQsetNoticeProcessor(c->conn, pgr_log_pq_notice, NULL);
  if (PQstatus(c->conn) == CONNECTION_BAD) {
    connect_failed(c, PQerrorMessage(c->conn));
    return;
  }
  c->state = PGR_PGC_CONNECTING;
  if (c->connect_timeout_ms > 0)
    uv_timer_start(&c->timer, on_connect_timeout, c->connect_timeout_ms, 0);
  /* libpq: "On the first iteration ... behave as if it last returned
     PGRES_POLLING_WRITING." */
  if (watch(c, UV_WRITABLE, 1) != 0)
    connect_failed(c, "cannot watch the connection's socket");
}

/*
 * One connection attempt's lookup, on libuv's thread pool: every host of
 * the conninfo (after libpq's own service-file and environment expansion)
 * resolved, so that libpq, given one host/hostaddr/port entry per address,
 * walks them in its own order and never resolves a name on this thread.
 * The pool thread reads only `ci`, a copy it owns until after_resolve.
 */
struct pgr_pgresolve {
  uv_work_t req;
  struct pgr_pgconn *owner;
  struct pgr_conninfo ci;
  struct pgr_conn_targets targets;
  int rc;
  char err[512];
};

static void resolve_work(uv_work_t *req) {
  struct pgr_pgresolve *r = req->data;
  r->rc = pgr_conn_targets_find(&r->ci, &r->targets, r->err, sizeof r->err);
}

static void resolve_free(struct pgr_pgresolve *r) {
  pgr_conninfo_free(&r->ci);
  pgr_conn_targets_free(&r->targets);
  free(r);
}

static void after_resolve(uv_work_t *req, int status) {
  struct pgr_pgresolve *r = req->data;
  struct pgr_pgconn *c = r->owner;

  c->resolving = NULL;
  if (c->state == PGR_PGC_CLOSING) {
    resolve_free(r);
    if (--c->pending_closes == 0 && c->close_cb)
      c->close_cb(c);
    return;
  }
  if (status != 0 || r->rc != 0) {
    connect_failed(c, status != 0 ? uv_strerror(status) : r->err);
    resolve_free(r);
    return;
  }
  free(c->skipped);
  c->skipped = r->targets.skipped ? pgr_strdup(r->targets.skipped) : NULL;
  pgr_conninfo_set(&r->ci, "host", r->targets.host);
  pgr_conninfo_set(&r->ci, "hostaddr", r->targets.hostaddr);
  pgr_conninfo_set(&r->ci, "port", r->targets.port);
  start_connect(c, &r->ci);
  resolve_free(r);
}

static void begin(struct pgr_pgconn *c) {
  struct pgr_pgresolve *r = pgr_calloc(1, sizeof *r);
  r->owner = c;
  r->req.data = r;
  pgr_conninfo_copy(&r->ci, &c->ci);
  c->state = PGR_PGC_RESOLVING;
  if (uv_queue_work(c->loop, &r->req, resolve_work, after_resolve) != 0) {
    resolve_free(r);
    connect_failed(c, "cannot start the host name lookup");
    return;
  }
  c->resolving = r;
}

static void on_retry_timer(uv_timer_t *t) {
  struct pgr_pgconn *c = pgr_container_of(t, struct pgr_pgconn, timer);
  if (c->state == PGR_PGC_DOWN)
    begin(c);
}

int pgr_pgconn_init(uv_loop_t *loop, struct pgr_pgconn *c, const char *conninfo,
                    const char *appname, char *errbuf, size_t errlen) {
  int rc;
  memset(c, 0, sizeof *c);
  STAILQ_INIT(&c->cmds);
  c->loop = loop;
  c->conninfo = pgr_strdup(conninfo ? conninfo : "");
  if ((rc = pgr_conninfo_parse(conninfo, appname, &c->ci, errbuf, errlen)) !=
      0) {
    free(c->conninfo);
    c->conninfo = NULL;
    return rc;
  }
  c->connect_timeout_ms = pgr_connect_timeout_ms(&c->ci);
  c->backoff_ms = 100;
  c->seed = pgr_now_us() | 1;
  uv_timer_init(loop, &c->timer);
  c->state = PGR_PGC_DOWN;
  return 0;
}

void pgr_pgconn_start(struct pgr_pgconn *c) {
  begin(c);
}

int pgr_pgconn_ready(const struct pgr_pgconn *c) {
  return c->state == PGR_PGC_READY;
}

/* Push out what libpq has buffered; watch for writability while it can't. */
static void flush(struct pgr_pgconn *c) {
  int r = PQflush(c->conn);
  if (r < 0) {
    lost(c, PQerrorMessage(c->conn));
    return;
  }
  if (watch(c, r == 1 ? UV_READABLE | UV_WRITABLE : UV_READABLE, 0) != 0)
    lost(c, "cannot watch the connection's socket");
}

static void send_next(struct pgr_pgconn *c) {
  struct pgr_pgcmd *cmd = STAILQ_FIRST(&c->cmds);
  if (c->busy || cmd == NULL || c->state != PGR_PGC_READY)
    return;
  /* Without parameters, the simple protocol: it allows several
     statements in one string (LISTEN a; LISTEN b). */
  int ok;
  switch (cmd->kind) {
  case CMD_PREPARE:
    ok = PQsendPrepare(c->conn, cmd->name, cmd->sql, 0, NULL);
    break;
  case CMD_EXECUTE:
    ok = PQsendQueryPrepared(c->conn, cmd->name, cmd->nparams,
                             (const char *const *)cmd->params, NULL, NULL, 0);
    break;
  default:
    ok = cmd->nparams == 0
             ? PQsendQuery(c->conn, cmd->sql)
             : PQsendQueryParams(c->conn, cmd->sql, cmd->nparams, NULL,
                                 (const char *const *)cmd->params, NULL, NULL,
                                 0);
    break;
  }
  if (!ok) {
    lost(c, PQerrorMessage(c->conn));
    return;
  }
  c->busy = 1;
  flush(c);
}

static int enqueue(struct pgr_pgconn *c, enum cmd_kind kind, const char *name,
                   const char *sql, int nparams, const char *const *params,
                   pgr_pgconn_result_cb cb, void *arg) {
  if (c->state != PGR_PGC_READY)
    return PGR_ECONN;
  struct pgr_pgcmd *cmd = pgr_calloc(1, sizeof *cmd);
  cmd->kind = kind;
  cmd->name = name ? pgr_strdup(name) : NULL;
  cmd->sql = sql ? pgr_strdup(sql) : NULL;
  cmd->nparams = nparams;
  cmd->params = pgr_calloc((size_t)nparams + 1, sizeof(char *));
  for (int i = 0; i < nparams; i++)
    cmd->params[i] = params[i] ? pgr_strdup(params[i]) : NULL;
  cmd->cb = cb;
  cmd->arg = arg;
  STAILQ_INSERT_TAIL(&c->cmds, cmd, next);
  send_next(c);
  return 0;
}

int pgr_pgconn_query(struct pgr_pgconn *c, const char *sql, int nparams,
                     const char *const *params, pgr_pgconn_result_cb cb,
                     void *arg) {
  return enqueue(c, CMD_QUERY, NULL, sql, nparams, params, cb, arg);
}

int pgr_pgconn_prepare(struct pgr_pgconn *c, const char *name, const char *sql,
                       pgr_pgconn_result_cb cb, void *arg) {
  return enqueue(c, CMD_PREPARE, name, sql, 0, NULL, cb, arg);
}

int pgr_pgconn_execute(struct pgr_pgconn *c, const char *name, int nparams,
                       const char *const *params, pgr_pgconn_result_cb cb,
                       void *arg) {
  return enqueue(c, CMD_EXECUTE, name, NULL, nparams, params, cb, arg);
}

/* Fail every queued command; their callbacks see NULL. */
static void fail_commands(struct pgr_pgconn *c) {
  struct pgr_pgcmds cmds = STAILQ_HEAD_INITIALIZER(cmds);
  struct pgr_pgcmd *cmd;
  STAILQ_CONCAT(&cmds, &c->cmds);
  c->busy = 0;
  if (c->result) {
    PQclear(c->result);
    c->result = NULL;
  }
  while ((cmd = STAILQ_FIRST(&cmds)) != NULL) {
    STAILQ_REMOVE_HEAD(&cmds, next);
    if (cmd->cb)
      cmd->cb(c, NULL, cmd->arg);
    cmd_free(cmd);
  }
}

static void lost(struct pgr_pgconn *c, const char *why) {
  char *safe = pgr_redact(c->conninfo, why);
  pgr_trim_end(safe);
  snprintf(c->last_error, sizeof c->last_error, "%s", safe);
  free(safe);
  unwatch(c);
  if (c->conn) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  c->backoff_ms = 100;
  schedule_retry(c);
  fail_commands(c);
  if (c->on_down)
    c->on_down(c, c->last_error);
}

/* Hand out the notifications libpq has parsed. 0 if the connection went
   down meanwhile. */
static int deliver_notifies(struct pgr_pgconn *c) {
  PGnotify *n;
  while ((n = PQnotifies(c->conn)) != NULL) {
    if (c->on_notify)
      c->on_notify(c, n->relname, n->extra);
    PQfreemem(n);
    if (c->state != PGR_PGC_READY)
      return 0;
  }
  return 1;
}

static void on_readable(struct pgr_pgconn *c) {
  if (!PQconsumeInput(c->conn)) {
    lost(c, PQerrorMessage(c->conn));
    return;
  }
  if (!deliver_notifies(c))
    return;
  while (c->busy && !PQisBusy(c->conn)) {
    PGresult *res = PQgetResult(c->conn);
    if (res != NULL) {
      /* Keep the first error, else the last result. */
      if (c->result == NULL || PQresultStatus(c->result) != PGRES_FATAL_ERROR) {
        PQclear(c->result);
        c->result = res;
      } else {
        PQclear(res);
      }
      continue;
    }
    /* NULL: the command is complete. A notification the server sent
       before its answer (libpq parses both in PQisBusy) goes first, as
       the server meant: session.c relies on that order. */
    if (!deliver_notifies(c))
      return;
    struct pgr_pgcmd *cmd = STAILQ_FIRST(&c->cmds);
    PGresult *done = c->result;
    c->result = NULL;
    STAILQ_REMOVE_HEAD(&c->cmds, next);
    c->busy = 0;
    if (cmd->cb)
      cmd->cb(c, done, cmd->arg);
    PQclear(done);
    cmd_free(cmd);
    if (c->state != PGR_PGC_READY)
      return;
    send_next(c);
  }
  if (PQstatus(c->conn) == CONNECTION_BAD)
    lost(c, PQerrorMessage(c->conn));
}

static void connect_step(struct pgr_pgconn *c) {
  switch (PQconnectPoll(c->conn)) {
  case PGRES_POLLING_READING:
    if (watch(c, UV_READABLE, 1) != 0)
      connect_failed(c, "cannot watch the connection's socket");
    return;
  case PGRES_POLLING_WRITING:
    if (watch(c, UV_WRITABLE, 1) != 0)
      connect_failed(c, "cannot watch the connection's socket");
    return;
  case PGRES_POLLING_OK:
    uv_timer_stop(&c->timer);
    pgr_connerr_unwatch(c->conn);
    if (PQsetnonblocking(c->conn, 1) != 0) {
      connect_failed(c, PQerrorMessage(c->conn));
      return;
    }
    c->state = PGR_PGC_READY;
    c->backoff_ms = 100;
    c->last_error[0] = '\0';
    if (watch(c, UV_READABLE, 1) != 0) {
      lost(c, "cannot watch the connection's socket");
      return;
    }
    if (c->on_up)
      c->on_up(c);
    return;
  case PGRES_POLLING_FAILED:
  default:
    connect_failed(c, PQerrorMessage(c->conn));
    return;
  }
}

static void on_poll(uv_poll_t *h, int status, int events) {
  struct pgr_pgpoll *p = h->data;
  struct pgr_pgconn *c = p->owner;

  if (c == NULL || c->poll != p)
    return; /* a handle being replaced */
  switch (c->state) {
  case PGR_PGC_CONNECTING:
    connect_step(c);
    return;
  case PGR_PGC_READY:
    if (status < 0) {
      lost(c, uv_strerror(status));
      return;
    }
    if (events & UV_WRITABLE) {
      flush(c);
      if (c->state != PGR_PGC_READY)
        return;
    }
    if (events & UV_READABLE)
      on_readable(c);
    return;
  default:
    return;
  }
}

static void on_timer_closed(uv_handle_t *h) {
  struct pgr_pgconn *c =
      pgr_container_of((uv_timer_t *)h, struct pgr_pgconn, timer);
  if (--c->pending_closes == 0 && c->close_cb)
    c->close_cb(c);
}

void pgr_pgconn_close(struct pgr_pgconn *c, pgr_pgconn_event_cb cb) {
  c->state = PGR_PGC_CLOSING;
  c->close_cb = cb;
  c->pending_closes++; /* held until the end of this function */
  uv_timer_stop(&c->timer);
  c->pending_closes++;
  uv_close((uv_handle_t *)&c->timer, on_timer_closed);
  if (c->resolving) {
    /* Cancelled if it has not started; after_resolve frees it either way. */
    c->pending_closes++;
    uv_cancel((uv_req_t *)&c->resolving->req);
  }
  unwatch(c);
  fail_commands(c);
  if (c->conn) {
    PQfinish(c->conn);
    c->conn = NULL;
  }
  pgr_conninfo_free(&c->ci);
  free(c->conninfo);
  c->conninfo = NULL;
  free(c->skipped);
  c->skipped = NULL;
  if (--c->pending_closes == 0 && c->close_cb)
    c->close_cb(c);
}

int pgr_pgconn_result_ok(const PGresult *res, ExecStatusType want,
                         enum pgr_level level, const char *what) {
  if (res == NULL)
    return 0;
  if (PQresultStatus(res) == want)
    return 1;
  const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  pgr_log(level, what, PGR_LS("error", m ? m : "unknown error"));
  return 0;
}
