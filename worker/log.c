/*
 * log.c - the asynchronous logger: a bounded queue, one writer thread, the
 * log file and the log socket.
 *
 * Thread: pgr_log_write(), pgr_log_enabled(), pgr_log_dropped() and
 * pgr_log_rejected() run on any thread; pgr_log_start() and pgr_log_stop()
 * on the main thread; pgr_log_reopen() on the event-loop thread. Functions
 * named writer_*, server_*, conn_* and on_* run on the writer thread only.
 * Ownership: a record is one heap block formatted by the logging thread;
 * enqueueing hands it to the writer, which frees it once written. The
 * writer state `W` is set up by pgr_log_start() before the writer thread
 * exists, then belongs to that thread until pgr_log_stop() joins it.
 *
 * DESIGN
 *
 * A logging thread formats its record itself (the writer never sees the
 * caller's strings), takes the queue mutex, appends, and wakes the writer
 * with uv_async_send() only when the queue was empty: the writer swaps the
 * whole list out under the lock, so one wake-up covers everything that
 * arrives while it writes (libuv's uv__work_done pattern). No I/O happens
 * under the mutex except that wake-up.
 *
 * When the queue is full (QUEUE_MAX_RECORDS or QUEUE_MAX_BYTES):
 *   - a debug record is dropped and counted (pgr_log_dropped()); the writer
 *     reports the count in one warn record at most once a second;
 *   - info, warn and error records are never dropped. A thread that may
 *     block (a job thread, the main thread) waits up to ROOM_WAIT_MS for the
 *     writer to make room, which slows a runaway producer down to disk speed;
 *     after that wait, and at once on the event-loop thread (which must never
 *     wait) or the writer thread, the record is queued above the bound. The
 *     queue thus outgrows its bound only while the disk stalls, by what the
 *     loop thread logs plus one record per other thread per ROOM_WAIT_MS.
 *
 * The writer thread runs its own uv_loop_t: a uv_async_t for records, stop
 * and reopen, a timer for drop reports and, for the worker (serve = 1), a
 * uv_pipe_t listening on DIR/pgrunner.sock with one uv_pipe_t per client.
 * File and stderr writes are plain blocking write(2) calls on this thread:
 * it exists so that nobody else waits for them.
 *
 * The wire: a client sends each record as one JSON line (logfmt.h). The
 * server parses and checks every line, then formats it in its own format, so
 * a broken or hostile client can at worst lose its own lines, counted by
 * pgr_log_rejected(): a line that is not a valid record, a line longer than
 * PGR_LOGFMT_WIRE_MAX (skipped up to its newline), and the unfinished last
 * line of a client that disconnects mid-line. The worker's stderr gets only
 * its own records; the file gets everyone's.
 *
 * A client (serve = 0 with a dir) connects once, at start. When nobody
 * listens, or the connection breaks later, it appends to DIR/pgrunner.log
 * itself with O_APPEND, each write(2) carrying whole lines, so lines from
 * several processes never interleave. At stop it half-closes the socket and
 * waits (at most CONN_TIMEOUT_S) for the worker to close its end, which the
 * worker does only after writing everything the client sent: a command's
 * lines are in the file by the time the command exits.
 *
 * Exclusivity: a worker holds flock() on DIR/pgrunner.sock.lock for its
 * lifetime (the kernel releases it if the worker dies), so two workers
 * starting at once cannot both replace the socket. A worker that finds the
 * lock taken is a client like the commands (one machine, several workers,
 * one file). A socket file on which something accepts connections is
 * never replaced; one that refuses them was left by a dead worker and is.
 */
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/queue.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#include <uv.h>

#include "logfmt.h"

#define QUEUE_MAX_RECORDS 65536
#define QUEUE_MAX_BYTES (32u << 20)
#define ROOM_WAIT_MS 100
#define FLUSH_BYTES (64 * 1024)
#define MAX_CLIENTS 128
#define LISTEN_BACKLOG 128
#define DROP_REPORT_MS 1000
#define GATHER_MS 2
#define CONN_TIMEOUT_S 5
#define REC_INITIAL_BYTES 384
#define POOL_MAX 4096
#define PROC_MAX 64

/*
 * One record. The header lives at the start of the block the record was
 * formatted into, so a record costs one allocation (usually no realloc).
 */
struct rec {
  STAILQ_ENTRY(rec) next;
  size_t size;     /* bytes allocated, counted against QUEUE_MAX_BYTES */
  size_t line_len; /* the line in this process's format follows the header */
  size_t wire_off; /* client mode: offset of the wire line; else 0 */
  size_t wire_len;
  enum pgr_level level;
};
STAILQ_HEAD(recs, rec);

/* What a logging thread formats: the line, or the line and the wire form. */
enum mode { MODE_LOCAL = 0, MODE_CLIENT = 1 };

/* A connection to the worker's log socket, server side. */
struct client {
  uv_pipe_t pipe;    /* pipe.data points back here */
  struct pgr_buf in; /* the unfinished line */
  int discarding;    /* skipping an overlong line up to its newline */
  uint64_t rejected;
  LIST_ENTRY(client) link;
};

static uv_once_t once = UV_ONCE_INIT;
/* Created once and never destroyed, so a late caller can always lock. */
static uv_mutex_t mu;
static uv_cond_t room;

/* Under mu. */
static struct recs q = STAILQ_HEAD_INITIALIZER(q);
static size_t q_count, q_bytes;
static int q_waiters;
static int accepting; /* records go to the queue, else straight to stderr */
static int stopping;
static int gathering; /* the writer drains on its timer: nobody wakes it */
static int running;   /* from a successful start to the end of stop */

/*
 * Read by every logging thread. start writes them before the threads that
 * log are created (it runs once in main); stop resets mode and pid.
 */
static atomic_int min_level = PGR_LEVEL_INFO;
static atomic_int cur_format = PGR_LOG_TEXT;
static atomic_int cur_mode = MODE_LOCAL;
static _Atomic int64_t cur_pid; /* 0: ask getpid() */
static char cur_proc[PROC_MAX + 1] = "pgrunner";

/*
 * Blocks of REC_INITIAL_BYTES come back from the writer for reuse, under
 * their own mutex: a glibc free() from another thread than the malloc()
 * is slow, and the heap kept growing and trimming under load.
 */
static uv_mutex_t pool_mu;
static struct recs pool = STAILQ_HEAD_INITIALIZER(pool); /* under pool_mu */
static size_t pool_len;                                  /* under pool_mu */

static _Atomic uint64_t n_dropped, n_rejected;
static atomic_int reopen_requested;
static _Thread_local int on_writer_thread;

static struct {
  uv_thread_t thread;
  uv_loop_t loop;
  uv_async_t wake;
  uv_timer_t drop_timer;
  uv_timer_t gather_timer;
  uv_pipe_t server;
  int serving; /* server is initialized */
  int bound;   /* we created sock_path and remove it at the end */
  int quiet;
  char *log_path, *sock_path, *lock_path;
  int log_fd, conn_fd, lock_fd;
  LIST_HEAD(, client) clients;
  size_t nclients;
  struct pgr_buf file_out, err_out;
  uint64_t drops_reported;
  int file_failing;
  char rbuf[64 * 1024]; /* read buffer for clients; one read at a time */
} W;

static void init_once(void) {
  PGR_ASSERT(uv_mutex_init(&mu) == 0);
  PGR_ASSERT(uv_cond_init(&room) == 0);
  PGR_ASSERT(uv_mutex_init(&pool_mu) == 0);
}

static char *block_get(void) {
  struct rec *r;
  uv_mutex_lock(&pool_mu);
  r = STAILQ_FIRST(&pool);
  if (r != NULL) {
    STAILQ_REMOVE_HEAD(&pool, next);
    pool_len--;
  }
  uv_mutex_unlock(&pool_mu);
  return r != NULL ? (char *)r : pgr_malloc(REC_INITIAL_BYTES);
}

/* rec_free returns usual-sized blocks to the pool (up to POOL_MAX). */
static void rec_free(struct recs *list) {
  struct recs keep = STAILQ_HEAD_INITIALIZER(keep);
  struct rec *r;
  size_t nkeep = 0;
  while ((r = STAILQ_FIRST(list)) != NULL) {
    STAILQ_REMOVE_HEAD(list, next);
    if (r->size == REC_INITIAL_BYTES && nkeep < POOL_MAX) {
      STAILQ_INSERT_HEAD(&keep, r, next);
      nkeep++;
    } else {
      free(r);
    }
  }
  uv_mutex_lock(&pool_mu);
  while (pool_len < POOL_MAX && (r = STAILQ_FIRST(&keep)) != NULL) {
    STAILQ_REMOVE_HEAD(&keep, next);
    STAILQ_INSERT_HEAD(&pool, r, next);
    pool_len++;
  }
  uv_mutex_unlock(&pool_mu);
  while ((r = STAILQ_FIRST(&keep)) != NULL) {
    STAILQ_REMOVE_HEAD(&keep, next);
    free(r);
  }
}

static void pool_clear(void) {
  struct recs list = STAILQ_HEAD_INITIALIZER(list);
  struct rec *r;
  uv_mutex_lock(&pool_mu);
  STAILQ_CONCAT(&list, &pool);
  pool_len = 0;
  uv_mutex_unlock(&pool_mu);
  while ((r = STAILQ_FIRST(&list)) != NULL) {
    STAILQ_REMOVE_HEAD(&list, next);
    free(r);
  }
}

static enum pgr_level clamp_level(enum pgr_level level) {
  if ((int)level < PGR_LEVEL_DEBUG)
    return PGR_LEVEL_DEBUG;
  if ((int)level > PGR_LEVEL_ERROR)
    return PGR_LEVEL_ERROR;
  return level;
}

int pgr_log_enabled(enum pgr_level level) {
  return (int)level >= atomic_load_explicit(&min_level, memory_order_relaxed);
}

uint64_t pgr_log_dropped(void) {
  return atomic_load(&n_dropped);
}

uint64_t pgr_log_rejected(void) {
  return atomic_load(&n_rejected);
}

static int64_t current_pid(void) {
  int64_t pid = atomic_load_explicit(&cur_pid, memory_order_relaxed);
  return pid != 0 ? pid : (int64_t)getpid();
}

static const char *rec_line(const struct rec *r) {
  return (const char *)(r + 1);
}

static const char *rec_wire(const struct rec *r) {
  return (const char *)r + r->wire_off;
}

/* rec_create formats a record into one new block; the caller owns it. */
static struct rec *rec_create(enum pgr_level level, const char *msg,
                              const struct pgr_log_field *fields,
                              size_t nfields) {
  struct pgr_logfmt_rec r = {
      .ts_ms = pgr_wall_ms(),
      .level = level,
      .proc = cur_proc,
      .pid = current_pid(),
      .msg = msg,
      .fields = fields,
      .nfields = nfields,
  };
  struct pgr_buf b = {
      .data = block_get(), .len = sizeof(struct rec), .cap = REC_INITIAL_BYTES};
  b.data[b.len] = '\0';
  pgr_logfmt_record(&b, atomic_load_explicit(&cur_format, memory_order_relaxed),
                    &r);
  size_t line_end = b.len, wire_off = 0;
  if (atomic_load_explicit(&cur_mode, memory_order_relaxed) == MODE_CLIENT) {
    wire_off = b.len;
    pgr_logfmt_wire(&b, &r);
  }
  struct rec *rec = (struct rec *)(void *)b.data;
  rec->size = b.cap;
  rec->line_len = line_end - sizeof(struct rec);
  rec->wire_off = wire_off;
  rec->wire_len = wire_off != 0 ? b.len - wire_off : 0;
  rec->level = level;
  return rec;
}

/* write_all returns 0 or a negative errno. */
static int write_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR)
      continue;
    if (w < 0)
      return -errno;
    if (w == 0)
      return -EIO;
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

static int queue_full(void) {
  return q_count >= QUEUE_MAX_RECORDS || q_bytes >= QUEUE_MAX_BYTES;
}

/*
 * enqueue hands rec to the writer, or drops it (a debug record while the
 * queue is full). Returns 0 when the logger is not accepting records: rec is
 * then still the caller's.
 */
static int enqueue(struct rec *rec) {
  int taken = 0, drop = 0;
  uv_mutex_lock(&mu);
  if (!accepting)
    goto out;
  if (queue_full()) {
    if (rec->level == PGR_LEVEL_DEBUG) {
      drop = taken = 1;
      goto out;
    }
    if (!on_writer_thread && !pgr_on_loop_thread()) {
      uint64_t deadline = uv_hrtime() + (uint64_t)ROOM_WAIT_MS * 1000000u;
      q_waiters++;
      while (accepting && queue_full()) {
        uint64_t now = uv_hrtime();
        if (now >= deadline)
          break;
        (void)uv_cond_timedwait(&room, &mu, deadline - now);
      }
      q_waiters--;
      if (!accepting)
        goto out;
    }
  }
  int was_empty = STAILQ_EMPTY(&q);
  STAILQ_INSERT_TAIL(&q, rec, next);
  q_count++;
  q_bytes += rec->size;
  /* Under the lock: stop closes the handle only after it set !accepting.
     While the writer gathers, its timer picks the record up unless the
     queue has no room left for the next one. */
  if ((was_empty && !gathering) || queue_full())
    PGR_ASSERT(uv_async_send(&W.wake) == 0);
  taken = 1;
out:
  uv_mutex_unlock(&mu);
  if (drop) {
    atomic_fetch_add(&n_dropped, 1);
    free(rec);
  }
  return taken;
}

void pgr_log_write(enum pgr_level level, const char *msg,
                   const struct pgr_log_field *fields, size_t nfields) {
  level = clamp_level(level);
  if (!pgr_log_enabled(level))
    return;
  uv_once(&once, init_once);
  struct rec *rec = rec_create(level, msg, fields, nfields);
  if (!enqueue(rec)) {
    /* Before start or after stop: start-up and shutdown only. */
    (void)write_all(STDERR_FILENO, rec_line(rec), rec->line_len);
    free(rec);
  }
}

/* ---- writer thread: output ---------------------------------------------- */

static void writer_write(struct recs *list);

/* writer_emit logs a record of the logger's own, on the writer thread. */
static void writer_emit(enum pgr_level level, const char *msg,
                        const struct pgr_log_field *fields, size_t nfields) {
  struct recs one = STAILQ_HEAD_INITIALIZER(one);
  if (!pgr_log_enabled(level))
    return;
  struct rec *r = rec_create(level, msg, fields, nfields);
  STAILQ_INSERT_TAIL(&one, r, next);
  writer_write(&one);
}

static void flush_file(void) {
  if (W.file_out.len == 0)
    return;
  int err =
      W.log_fd >= 0 ? write_all(W.log_fd, W.file_out.data, W.file_out.len) : 0;
  pgr_buf_reset(&W.file_out);
  if (err == 0) {
    W.file_failing = 0;
  } else if (!W.file_failing) {
    /* Said once per failing streak, on stderr: the file is what failed. */
    W.file_failing = 1;
    const struct pgr_log_field f[] = {PGR_LS("path", W.log_path),
                                      PGR_LS("error", uv_strerror(err))};
    struct rec *r = rec_create(PGR_LEVEL_ERROR, "cannot write log file", f,
                               PGR_ARRAY_LEN(f));
    (void)write_all(STDERR_FILENO, rec_line(r), r->line_len);
    free(r);
  }
}

static void flush_err(void) {
  if (W.err_out.len == 0)
    return;
  /* Nowhere left to report a failing stderr. */
  (void)write_all(STDERR_FILENO, W.err_out.data, W.err_out.len);
  pgr_buf_reset(&W.err_out);
}

static void file_add(const char *line, size_t len) {
  pgr_buf_add(&W.file_out, line, len);
  if (W.file_out.len >= FLUSH_BYTES)
    flush_file();
}

static void conn_lost(int err) {
  close(W.conn_fd);
  W.conn_fd = -1;
  atomic_store(&cur_mode, MODE_LOCAL);
  const struct pgr_log_field f[] = {PGR_LS("path", W.sock_path),
                                    PGR_LS("error", uv_strerror(-err))};
  writer_emit(PGR_LEVEL_WARN, "log socket lost; appending to the log file", f,
              PGR_ARRAY_LEN(f));
}

/*
 * conn_send sends one wire line to the worker. On failure the line goes to
 * the file instead; if part of it was sent, the worker drops that part when
 * it sees the connection close, so the record is written exactly once.
 */
static int conn_send(const struct rec *r) {
  const char *p = rec_wire(r);
  size_t n = r->wire_len;
  while (n > 0) {
    ssize_t w = send(W.conn_fd, p, n, MSG_NOSIGNAL);
    if (w < 0 && errno == EINTR)
      continue;
    if (w <= 0) {
      conn_lost(w < 0 ? errno : EPIPE);
      return -1;
    }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* writer_write writes and frees a list of records. */
static void writer_write(struct recs *list) {
  struct rec *r;
  STAILQ_FOREACH(r, list, next) {
    int sent = W.conn_fd >= 0 && r->wire_len > 0 &&
               r->wire_len <= PGR_LOGFMT_WIRE_MAX && conn_send(r) == 0;
    if (!sent && W.log_fd >= 0)
      file_add(rec_line(r), r->line_len);
    if (!W.quiet) {
      pgr_buf_add(&W.err_out, rec_line(r), r->line_len);
      if (W.err_out.len >= FLUSH_BYTES)
        flush_err();
    }
  }
  flush_file();
  flush_err();
  rec_free(list);
}

static void writer_report_drops(void) {
  uint64_t total = atomic_load(&n_dropped);
  if (total == W.drops_reported)
    return;
  const struct pgr_log_field f[] = {PGR_LI("dropped", total - W.drops_reported),
                                    PGR_LI("dropped_total", total),
                                    PGR_LS("level", "debug"),
                                    PGR_LS("reason", "queue full")};
  W.drops_reported = total;
  writer_emit(PGR_LEVEL_WARN, "log records dropped", f, PGR_ARRAY_LEN(f));
}

static void on_drop_timer(uv_timer_t *t) {
  (void)t;
  writer_report_drops();
}

static int open_log(const char *path) {
  return open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0640);
}

/* writer_reopen follows a renamed log file (logrotate) to a new one. */
static void writer_reopen(void) {
  if (W.log_path == NULL)
    return;
  flush_file();
  int fd = open_log(W.log_path);
  if (fd < 0) {
    const struct pgr_log_field f[] = {PGR_LS("path", W.log_path),
                                      PGR_LS("error", uv_strerror(-errno))};
    writer_emit(PGR_LEVEL_ERROR, "cannot reopen log file; keeping the old one",
                f, PGR_ARRAY_LEN(f));
    return;
  }
  if (W.log_fd >= 0)
    close(W.log_fd);
  W.log_fd = fd;
  W.file_failing = 0;
  const struct pgr_log_field f[] = {PGR_LS("path", W.log_path)};
  writer_emit(PGR_LEVEL_DEBUG, "log file reopened", f, PGR_ARRAY_LEN(f));
}

/* ---- writer thread: the log socket, server side ------------------------- */

static void on_closed(uv_handle_t *h) {
  struct client *c = h->data;
  if (c == NULL)
    return;
  LIST_REMOVE(c, link);
  W.nclients--;
  if (c->rejected > 0) {
    atomic_fetch_add(&n_rejected, c->rejected);
    const struct pgr_log_field f[] = {PGR_LI("rejected", c->rejected)};
    writer_emit(PGR_LEVEL_WARN, "log socket client sent invalid records", f,
                PGR_ARRAY_LEN(f));
  }
  pgr_buf_free(&c->in);
  free(c);
}

static void server_close_client(struct client *c) {
  if (!uv_is_closing((uv_handle_t *)&c->pipe))
    uv_close((uv_handle_t *)&c->pipe, on_closed);
}

static void server_line(struct client *c, const char *line, size_t len) {
  if (len == 0)
    return;
  int format = atomic_load_explicit(&cur_format, memory_order_relaxed);
  if (pgr_logfmt_rewire(&W.file_out, format, line, len) != 0)
    c->rejected++;
  else if (W.file_out.len >= FLUSH_BYTES)
    flush_file();
}

/*
 * server_feed splits what a client sent into lines. The unfinished tail is
 * kept, up to PGR_LOGFMT_WIRE_MAX bytes; a longer line is counted once and
 * skipped up to its newline.
 */
static void server_feed(struct client *c, const char *p, size_t n) {
  const char *end = p + n;
  while (p < end) {
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    size_t seg = (size_t)((nl != NULL ? nl : end) - p);
    if (c->discarding) {
      if (nl == NULL)
        return;
      c->discarding = 0;
    } else if (c->in.len + seg > PGR_LOGFMT_WIRE_MAX) {
      c->rejected++;
      pgr_buf_reset(&c->in);
      c->discarding = nl == NULL;
    } else if (nl == NULL) {
      pgr_buf_add(&c->in, p, seg);
    } else if (c->in.len > 0) {
      pgr_buf_add(&c->in, p, seg);
      server_line(c, c->in.data, c->in.len);
      pgr_buf_reset(&c->in);
    } else {
      server_line(c, p, seg);
    }
    if (nl == NULL)
      return;
    p = nl + 1;
  }
}

/* A disconnect ends the client's last line: unfinished, it is dropped. */
static void server_client_eof(struct client *c) {
  if (c->in.len > 0 && !c->discarding)
    c->rejected++;
  pgr_buf_reset(&c->in);
  c->discarding = 0;
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  (void)h;
  (void)suggested;
  /* One buffer will do: libuv calls on_read before the next on_alloc. */
  *buf = uv_buf_init(W.rbuf, sizeof(W.rbuf));
}

static void on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf) {
  struct client *c = s->data;
  if (nread > 0) {
    server_feed(c, buf->base, (size_t)nread);
    flush_file();
  } else if (nread < 0) {
    /* UV_EOF or an error: either way the client is gone. Closing our end
     * tells a client waiting in conn_finish() that its lines are written. */
    server_client_eof(c);
    server_close_client(c);
  }
}

static void on_connection(uv_stream_t *server, int status) {
  if (status < 0) {
    const struct pgr_log_field f[] = {PGR_LS("error", uv_strerror(status))};
    writer_emit(PGR_LEVEL_WARN, "log socket accept failed", f,
                PGR_ARRAY_LEN(f));
    return;
  }
  struct client *c = pgr_calloc(1, sizeof(*c));
  pgr_buf_init(&c->in);
  PGR_ASSERT(uv_pipe_init(&W.loop, &c->pipe, 0) == 0);
  c->pipe.data = c;
  LIST_INSERT_HEAD(&W.clients, c, link);
  W.nclients++;
  /* Beyond MAX_CLIENTS a client is closed at once; it then appends to the
   * file itself, which is just as safe, so nothing is lost. */
  if (uv_accept(server, (uv_stream_t *)&c->pipe) != 0 ||
      W.nclients > MAX_CLIENTS ||
      uv_read_start((uv_stream_t *)&c->pipe, on_alloc, on_read) != 0)
    server_close_client(c);
}

/* At stop: take in what connected clients already sent, then close them. */
static void server_drain_clients(void) {
  struct client *c;
  LIST_FOREACH(c, &W.clients, link) {
    uv_os_fd_t fd;
    if (uv_is_closing((uv_handle_t *)&c->pipe) ||
        uv_fileno((uv_handle_t *)&c->pipe, &fd) != 0)
      continue;
    ssize_t n;
    while ((n = recv(fd, W.rbuf, sizeof(W.rbuf), MSG_DONTWAIT)) > 0 ||
           (n < 0 && errno == EINTR))
      if (n > 0)
        server_feed(c, W.rbuf, (size_t)n);
    server_client_eof(c);
  }
  flush_file();
}

/* ---- writer thread: the log socket, client side ------------------------- */

/*
 * conn_finish half-closes the connection and waits for the worker to close
 * its end, which it does after writing every line we sent (or after
 * CONN_TIMEOUT_S, SO_RCVTIMEO, if it is wedged).
 */
static void conn_finish(void) {
  char buf[256];
  ssize_t n;
  if (shutdown(W.conn_fd, SHUT_WR) == 0) {
    while ((n = recv(W.conn_fd, buf, sizeof(buf), 0)) > 0 ||
           (n < 0 && errno == EINTR))
      ;
  }
  close(W.conn_fd);
  W.conn_fd = -1;
}

/* ---- writer thread: the loop -------------------------------------------- */

static void close_walk(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, on_closed);
}

static void writer_shutdown(void) {
  server_drain_clients();
  writer_report_drops();
  if (W.conn_fd >= 0)
    conn_finish();
  uv_walk(&W.loop, close_walk, NULL);
}

/*
 * Take the whole queue. On a busy worker a wake-up per record would cost a
 * thread switch per line logged (two per task), so after writing a batch the
 * writer gathers for GATHER_MS: producers stop waking it and the gather
 * timer takes what arrived meanwhile. An empty gather ends the window, and
 * the next record wakes the writer at once again. Stop and reopen always
 * wake it.
 */
static void on_gather(uv_timer_t *t);

static void drain(int from_timer) {
  uv_mutex_lock(&mu);
  struct recs list = STAILQ_HEAD_INITIALIZER(list);
  STAILQ_CONCAT(&list, &q);
  q_count = q_bytes = 0;
  int stop = stopping;
  if (q_waiters > 0)
    uv_cond_broadcast(&room);
  int gather = gathering = !stop && (!STAILQ_EMPTY(&list) || !from_timer);
  uv_mutex_unlock(&mu);
  if (gather)
    PGR_ASSERT(uv_timer_start(&W.gather_timer, on_gather, GATHER_MS, 0) == 0);

  /* After the swap: a record logged after pgr_log_reopen() is in this list
   * only if the request is visible now, so it lands in the new file. */
  if (atomic_exchange(&reopen_requested, 0))
    writer_reopen();
  writer_write(&list);
  if (stop) {
    writer_shutdown();
  } else if (atomic_load(&n_dropped) != W.drops_reported &&
             !uv_is_active((uv_handle_t *)&W.drop_timer)) {
    PGR_ASSERT(
        uv_timer_start(&W.drop_timer, on_drop_timer, DROP_REPORT_MS, 0) == 0);
  }
}

static void on_gather(uv_timer_t *t) {
  (void)t;
  drain(1);
}

static void on_wake(uv_async_t *h) {
  (void)h;
  drain(0);
}

/* release frees what start acquired; the loop is closed by then. */
static void release(void) {
  if (W.conn_fd >= 0)
    close(W.conn_fd);
  if (W.log_fd >= 0)
    close(W.log_fd);
  /* Unlink before giving up the lock, or we could remove the socket of a
   * worker that starts right after. */
  if (W.bound)
    unlink(W.sock_path);
  if (W.lock_fd >= 0)
    close(W.lock_fd);
  W.conn_fd = W.log_fd = W.lock_fd = -1;
  W.bound = W.serving = 0;
  free(W.log_path);
  free(W.sock_path);
  free(W.lock_path);
  W.log_path = W.sock_path = W.lock_path = NULL;
  pgr_buf_free(&W.file_out);
  pgr_buf_free(&W.err_out);
}

static void writer_main(void *arg) {
  (void)arg;
  on_writer_thread = 1;
  uv_run(&W.loop, UV_RUN_DEFAULT);
  PGR_ASSERT(uv_loop_close(&W.loop) == 0);
  release();
}

/* ---- start, stop, reopen ------------------------------------------------- */

/* start_error reports why start failed; not started, it goes to stderr. */
static void start_error(const char *msg, const char *path, int err) {
  if (err != 0)
    pgr_error(msg, PGR_LS("path", path), PGR_LS("error", uv_strerror(-err)));
  else
    pgr_error(msg, PGR_LS("path", path));
}

/* connect_unix returns a connected nonblocking socket, or -1 and errno. */
static int connect_unix(const char *path) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof(sa.sun_path)) {
    errno = ENAMETOOLONG;
    return -1;
  }
  strcpy(sa.sun_path, path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0)
    return -1;
  if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

/*
 * serve_setup claims DIR for this worker and listens on its socket. The
 * socket is bound, then made 0600, then listened on: until listen() nobody
 * can connect, so the moment it has umask's mode exposes nothing.
 * PGR_ENOTFOUND (nothing printed) when another worker holds DIR.
 */
static int serve_setup(void) {
  struct sockaddr_un sa;
  struct stat st;
  int rc;
  if (strlen(W.sock_path) >= sizeof(sa.sun_path)) {
    start_error("log directory path too long for a unix socket", W.sock_path,
                0);
    return PGR_EUSAGE;
  }
  W.lock_fd = open(W.lock_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (W.lock_fd < 0) {
    start_error("cannot open log socket lock file", W.lock_path, errno);
    return PGR_EIO;
  }
  if (flock(W.lock_fd, LOCK_EX | LOCK_NB) != 0) {
    if (errno == EWOULDBLOCK) {
      /* Another worker serves this directory: this one is its client. */
      close(W.lock_fd);
      W.lock_fd = -1;
      return PGR_ENOTFOUND;
    }
    start_error("cannot lock log socket lock file", W.lock_path, errno);
    return PGR_EIO;
  }
  if (lstat(W.sock_path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      start_error("log socket path exists and is not a socket", W.sock_path, 0);
      return PGR_EIO;
    }
    int probe = connect_unix(W.sock_path);
    if (probe >= 0 || errno != ECONNREFUSED) {
      /* Connected, or EAGAIN (a full backlog): someone is listening. */
      if (probe >= 0)
        close(probe);
      start_error("log socket is in use (something accepts connections on "
                  "it); not replacing it",
                  W.sock_path, 0);
      return PGR_EIO;
    }
    if (unlink(W.sock_path) != 0 && errno != ENOENT) {
      start_error("cannot remove stale log socket", W.sock_path, errno);
      return PGR_EIO;
    }
  } else if (errno != ENOENT) {
    start_error("cannot inspect log socket path", W.sock_path, errno);
    return PGR_EIO;
  }

  PGR_ASSERT(uv_pipe_init(&W.loop, &W.server, 0) == 0);
  W.serving = 1;
  rc = uv_pipe_bind(&W.server, W.sock_path);
  if (rc != 0) {
    start_error("cannot bind log socket", W.sock_path, rc);
    return PGR_EIO;
  }
  W.bound = 1;
  if (chmod(W.sock_path, 0600) != 0) {
    start_error("cannot set log socket mode", W.sock_path, errno);
    return PGR_EIO;
  }
  rc = uv_listen((uv_stream_t *)&W.server, LISTEN_BACKLOG, on_connection);
  if (rc != 0) {
    start_error("cannot listen on log socket", W.sock_path, rc);
    return PGR_EIO;
  }
  return 0;
}

/* client_connect connects to a listening worker, if there is one. */
static void client_connect(void) {
  int fd = connect_unix(W.sock_path);
  if (fd < 0)
    return; /* nobody listens (or the backlog is full): use the file */
  struct timeval tv = {.tv_sec = CONN_TIMEOUT_S};
  int flags = fcntl(fd, F_GETFL);
  /* The writer thread may block; bounded, so a wedged worker cannot hang a
   * command forever. */
  if (flags < 0 || fcntl(fd, F_SETFL, flags & ~O_NONBLOCK) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv)) != 0 ||
      setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)) != 0) {
    close(fd);
    return;
  }
  W.conn_fd = fd;
}

static int open_dir(const char *dir) {
  struct stat st;
  size_t n = strlen(dir);
  while (n > 1 && dir[n - 1] == '/')
    n--;
  if (stat(dir, &st) != 0) {
    start_error("log directory does not exist", dir, errno);
    return PGR_EUSAGE;
  }
  if (!S_ISDIR(st.st_mode)) {
    start_error("log directory is not a directory", dir, 0);
    return PGR_EUSAGE;
  }
  W.log_path = pgr_asprintf("%.*s/pgrunner.log", (int)n, dir);
  W.sock_path = pgr_asprintf("%.*s/pgrunner.sock", (int)n, dir);
  W.lock_path = pgr_asprintf("%.*s/pgrunner.sock.lock", (int)n, dir);
  W.log_fd = open_log(W.log_path);
  if (W.log_fd < 0) {
    start_error("cannot open log file", W.log_path, errno);
    return PGR_EIO;
  }
  return 0;
}

int pgr_log_start(const struct pgr_log_options *opts) {
  int rc = 0;
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  PGR_ASSERT(!running);
  uv_mutex_unlock(&mu);

  snprintf(cur_proc, sizeof(cur_proc), "%s",
           opts->proc != NULL ? opts->proc : "pgrunner");
  atomic_store(&cur_pid, (int64_t)getpid());
  atomic_store(&cur_format,
               opts->format == PGR_LOG_JSON ? PGR_LOG_JSON : PGR_LOG_TEXT);
  atomic_store(&min_level, clamp_level(opts->level));
  atomic_store(&cur_mode, MODE_LOCAL);
  atomic_store(&reopen_requested, 0);

  memset(&W, 0, sizeof(W));
  W.log_fd = W.conn_fd = W.lock_fd = -1;
  W.quiet = opts->quiet_stderr;
  W.drops_reported = atomic_load(&n_dropped);
  pgr_buf_init(&W.file_out);
  pgr_buf_init(&W.err_out);
  PGR_ASSERT(uv_loop_init(&W.loop) == 0);
  PGR_ASSERT(uv_async_init(&W.loop, &W.wake, on_wake) == 0);
  PGR_ASSERT(uv_timer_init(&W.loop, &W.drop_timer) == 0);
  PGR_ASSERT(uv_timer_init(&W.loop, &W.gather_timer) == 0);

  if (opts->dir != NULL) {
    rc = open_dir(opts->dir);
    if (rc != 0)
      goto out;
    if (opts->serve)
      rc = serve_setup();
    if (!opts->serve || rc == PGR_ENOTFOUND) {
      /* A command, or a second worker on the same directory: send our
         records to the worker that serves it (or append to the file). */
      rc = 0;
      client_connect();
    }
    if (rc != 0)
      goto out;
  }
  /* The loop is handed over complete: creating the thread orders all of the
   * above before anything the writer does. */
  if (uv_thread_create(&W.thread, writer_main, NULL) != 0) {
    rc = PGR_EIO;
    goto out;
  }
  if (W.conn_fd >= 0)
    atomic_store(&cur_mode, MODE_CLIENT);
  uv_mutex_lock(&mu);
  accepting = running = 1;
  stopping = gathering = 0;
  uv_mutex_unlock(&mu);
out:
  if (rc != 0) {
    uv_walk(&W.loop, close_walk, NULL);
    uv_run(&W.loop, UV_RUN_DEFAULT);
    PGR_ASSERT(uv_loop_close(&W.loop) == 0);
    release();
    atomic_store(&cur_pid, 0);
  }
  return rc;
}

void pgr_log_stop(void) {
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  if (!running || stopping) {
    uv_mutex_unlock(&mu);
    return;
  }
  accepting = 0;
  stopping = 1;
  uv_cond_broadcast(&room);
  PGR_ASSERT(uv_async_send(&W.wake) == 0);
  uv_mutex_unlock(&mu);

  uv_thread_join(&W.thread);
  pool_clear();
  atomic_store(&cur_mode, MODE_LOCAL);
  atomic_store(&cur_pid, 0);
  uv_mutex_lock(&mu);
  running = stopping = 0;
  uv_mutex_unlock(&mu);
}

void pgr_log_reopen(void) {
  uv_once(&once, init_once);
  /* The mutex is held only for list surgery, never across I/O. */
  uv_mutex_lock(&mu);
  if (accepting) {
    atomic_store(&reopen_requested, 1);
    PGR_ASSERT(uv_async_send(&W.wake) == 0);
  }
  uv_mutex_unlock(&mu);
}

void pgr_log_pq_notice(void *arg, const char *msg) {
  char m[512];
  (void)arg;
  snprintf(m, sizeof m, "%s", msg ? msg : "");
  pgr_trim_end(m);
  pgr_debug("server notice", PGR_LS("notice", m));
}
