/*
 * pgconn.c - a nonblocking libpq connection on a uv_poll_t.
 *
 * Thread: LOOP THREAD ONLY; nothing here may block.
 *
 * One state enum, one place per transition:
 *   DOWN -> RESOLVING (host name) -> CONNECTING -> READY -> DOWN ...
 * and CLOSING from anywhere. A drop fails the queued commands (callbacks
 * get NULL), tells the owner (on_down) and arms the backoff timer.
 */
#include "loop/pgconn.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "connerr.h"
#include "log.h"

enum cmd_kind {
  CMD_QUERY = 0, /* sql is the text */
  CMD_PREPARE,   /* sql is the text, name the statement */
  CMD_EXECUTE,   /* name is a prepared statement */
};

struct pgr_pgcmd {
  struct pgr_pgcmd *next;
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
  char msg[512];
  enum pgr_connerr kind = pgr_connerr_classify(
      why, c->conn ? PQconnectionNeedsPassword(c->conn) : 0, msg, sizeof msg);
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

static void start_connect(struct pgr_pgconn *c) {
  c->conn = PQconnectStartParams(c->ci.keywords, c->ci.values, 0);
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

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  struct pgr_pgconn *c = req->data;
  char addr[INET6_ADDRSTRLEN] = "";

  c->gai_active = 0;
  if (c->state == PGR_PGC_CLOSING) {
    uv_freeaddrinfo(res);
    if (--c->pending_closes == 0 && c->close_cb)
      c->close_cb(c);
    return;
  }
  if (status != 0 || res == NULL) {
    char m[256];
    snprintf(m, sizeof m, "could not resolve host \"%s\": %s", c->host,
             uv_strerror(status));
    uv_freeaddrinfo(res);
    connect_failed(c, m);
    return;
  }
  uv_ip_name(res->ai_addr, addr, sizeof addr);
  uv_freeaddrinfo(res);
  /* Keep host (for TLS verification and messages) and add hostaddr, so
     libpq does no lookup of its own. */
  pgr_conninfo_set(&c->ci, "hostaddr", addr);
  start_connect(c);
}

static void begin(struct pgr_pgconn *c) {
  if (c->resolve) {
    struct addrinfo hints;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    c->state = PGR_PGC_RESOLVING;
    c->gai.data = c;
    if (uv_getaddrinfo(c->loop, &c->gai, on_resolved, c->host, NULL, &hints) !=
        0) {
      connect_failed(c, "cannot start the host name lookup");
      return;
    }
    c->gai_active = 1;
    return;
  }
  start_connect(c);
}

static void on_retry_timer(uv_timer_t *t) {
  struct pgr_pgconn *c = pgr_container_of(t, struct pgr_pgconn, timer);
  if (c->state == PGR_PGC_DOWN)
    begin(c);
}

static int is_numeric_host(const char *h) {
  unsigned char buf[sizeof(struct in6_addr)];
  return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

int pgr_pgconn_init(uv_loop_t *loop, struct pgr_pgconn *c, const char *conninfo,
                    const char *appname, char *errbuf, size_t errlen) {
  int rc;
  memset(c, 0, sizeof *c);
  c->loop = loop;
  c->conninfo = pgr_strdup(conninfo ? conninfo : "");
  if ((rc = pgr_conninfo_parse(conninfo, appname, &c->ci, errbuf, errlen)) !=
      0) {
    free(c->conninfo);
    c->conninfo = NULL;
    return rc;
  }
  /* The host may come from the string or from PGHOST. */
  const char *host = pgr_conninfo_get(&c->ci, "host");
  if (host == NULL)
    host = getenv("PGHOST");
  const char *hostaddr = pgr_conninfo_get(&c->ci, "hostaddr");
  if (hostaddr == NULL)
    hostaddr = getenv("PGHOSTADDR");
  if (host && *host && host[0] != '/' && host[0] != '@' && !hostaddr &&
      strchr(host, ',') == NULL && !is_numeric_host(host)) {
    c->resolve = 1;
    c->host = pgr_strdup(host);
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
  struct pgr_pgcmd *cmd = c->head;
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
  if (c->tail)
    c->tail->next = cmd;
  else
    c->head = cmd;
  c->tail = cmd;
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
  struct pgr_pgcmd *cmd = c->head;
  c->head = c->tail = NULL;
  c->busy = 0;
  if (c->result) {
    PQclear(c->result);
    c->result = NULL;
  }
  while (cmd) {
    struct pgr_pgcmd *next = cmd->next;
    if (cmd->cb)
      cmd->cb(c, NULL, cmd->arg);
    cmd_free(cmd);
    cmd = next;
  }
}

static void lost(struct pgr_pgconn *c, const char *why) {
  char *safe = pgr_redact(c->conninfo, why);
  size_t l = strlen(safe);
  while (l && (safe[l - 1] == '\n' || safe[l - 1] == ' '))
    safe[--l] = '\0';
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

static void on_readable(struct pgr_pgconn *c) {
  PGnotify *n;

  if (!PQconsumeInput(c->conn)) {
    lost(c, PQerrorMessage(c->conn));
    return;
  }
  while ((n = PQnotifies(c->conn)) != NULL) {
    if (c->on_notify)
      c->on_notify(c, n->relname, n->extra);
    PQfreemem(n);
    if (c->state != PGR_PGC_READY)
      return;
  }
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
    /* NULL: the command is complete. */
    struct pgr_pgcmd *cmd = c->head;
    PGresult *done = c->result;
    c->result = NULL;
    c->head = cmd->next;
    if (c->head == NULL)
      c->tail = NULL;
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
  if (c->gai_active) {
    c->pending_closes++;
    uv_cancel((uv_req_t *)&c->gai);
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
  free(c->host);
  c->host = NULL;
  if (--c->pending_closes == 0 && c->close_cb)
    c->close_cb(c);
}
