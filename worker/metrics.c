/*
 * metrics.c - task counters, the /metrics text and the /healthz state, served
 * over HTTP by a small HTTP/1.x server of our own on libuv.
 *
 * Thread: the update functions (pgr_metrics_task_*, pgr_metrics_set_*) run
 * on the loop thread (and on the worker threads). The HTTP server runs on a
 * thread of its own with a uv_loop_t of its own; it parses requests and calls
 * pgr_metrics_render() there (tests call render from their own thread too),
 * so the worker's event loop never serves or formats anything.
 * pgr_metrics_start/stop run on the thread that owns the worker's lifecycle
 * (the loop thread, before and after the loop runs); stop reaches the server
 * thread through a uv_async_t and joins it.
 *
 * DESIGN: the two sides meet at one uv_mutex_t. Updates hold it for a hash
 * probe and a few increments: no I/O, and no allocation except the first
 * time a (queue, kind) pair is seen. The reader copies the counters out under
 * the lock into memory it allocated before taking it, then formats the text
 * with the lock released, so a slow scrape never stalls the loop.
 *
 * Ownership: all state is this module's, process-wide (the API has no
 * handle). Series are never freed: there are at most MAX_SERIES of them,
 * and label strings are borrowed by the reader's snapshot without copying.
 * The number of distinct (queue, kind) pairs is capped; past the cap a task
 * is counted under kind="other" of its queue, and past a second, small cap
 * under queue="other", kind="other", so a flood of random kinds cannot grow
 * memory without bound. The HTTP server (struct server) belongs to
 * start/stop; each connection (struct conn) belongs to the server thread and
 * is freed in the close callback of the last of its two handles.
 */
#include "metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#include "health.h"
#include "log.h"

/* Distinct (queue, kind) pairs counted as themselves. */
#define LABEL_CAP 1000
/* Extra (queue, "other") pairs past the cap, then one ("other", "other"). */
#define OVERFLOW_CAP 64
#define MAX_SERIES (LABEL_CAP + OVERFLOW_CAP + 1)
/* Open-addressing table; a power of two well above MAX_SERIES. */
#define NSLOTS 4096
/* Kinds are at most 63 bytes (pgr_valid_kind); cut anything longer. */
#define MAX_LABEL 128

static const double bucket_le[] = {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                   0.5,   1,     2.5,  5,     10,   30,  60};
static const char *const bucket_text[] = {
    "0.001", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25",
    "0.5",   "1",     "2.5",  "5",     "10",   "30",  "60"};
#define NBUCKETS PGR_ARRAY_LEN(bucket_le)

enum outcome {
  OUT_STARTED = 0,
  OUT_SUCCEEDED,
  OUT_FAILED,
  OUT_RETRIED,
  OUT_CANCELLED,
  OUT_REQUEUED,
  OUT_LOST,
  NOUTCOMES
};

static const struct {
  const char *name;
  const char *help;
} counter_info[NOUTCOMES] = {
    [OUT_STARTED] = {"pgrunner_tasks_started_total",
                     "Task attempts handed to a worker thread."},
    [OUT_SUCCEEDED] = {"pgrunner_tasks_succeeded_total",
                       "Task attempts that succeeded."},
    [OUT_FAILED] = {"pgrunner_tasks_failed_total",
                    "Task attempts that failed with no attempt left (the "
                    "task is failed for good)."},
    [OUT_RETRIED] = {"pgrunner_tasks_retried_total",
                     "Task attempts that failed and were queued again."},
    [OUT_CANCELLED] = {"pgrunner_tasks_cancelled_total",
                       "Tasks cancelled while running."},
    [OUT_REQUEUED] = {"pgrunner_tasks_requeued_total",
                      "Tasks interrupted at shutdown and queued again "
                      "without spending an attempt."},
    [OUT_LOST] = {"pgrunner_tasks_lost_total",
                  "Task attempts whose task was no longer this worker's "
                  "when they finished (recovered elsewhere)."},
};

struct series {
  char *queue;
  char *kind;
  uint64_t count[NOUTCOMES];
  uint64_t bucket[NBUCKETS]; /* not cumulative; +Inf is dur_count */
  double dur_sum;
  uint64_t dur_count;
};

static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t mu;
/* Under mu. */
static struct series *series[MAX_SERIES];
static size_t nseries;
static int16_t slots[NSLOTS]; /* index into series + 1; 0 = empty */
static int running;
/* Touched only by start/stop, on one thread. */
static struct server *server_;

static void init_once(void) {
  PGR_ASSERT(uv_mutex_init(&mu) == 0);
}

static uint32_t hash_labels(const char *queue, const char *kind) {
  uint32_t h = 2166136261u; /* FNV-1a */

  for (const char *p = queue; *p; p++)
    h = (h ^ (unsigned char)*p) * 16777619u;
  h = (h ^ 0xffu) * 16777619u; /* a byte no label holds, as separator */
  for (const char *p = kind; *p; p++)
    h = (h ^ (unsigned char)*p) * 16777619u;
  return h;
}

/*
 * find_slot returns the slot holding (queue, kind), or the empty slot where
 * it belongs. The table never fills (NSLOTS > MAX_SERIES), so it ends. mu
 * held.
 */
static size_t find_slot(const char *queue, const char *kind, uint32_t h) {
  size_t i = h & (NSLOTS - 1);

  for (;;) {
    int16_t s = slots[i];
    if (s == 0)
      return i;
    if (strcmp(series[s - 1]->queue, queue) == 0 &&
        strcmp(series[s - 1]->kind, kind) == 0)
      return i;
    i = (i + 1) & (NSLOTS - 1);
  }
}

/*
 * lookup finds or creates the series for (queue, kind) under the caps. mu
 * held. Allocating here is the one exception to "no allocation under the
 * lock": it happens at most MAX_SERIES times in the life of the process.
 */
static struct series *lookup(const char *queue, const char *kind) {
  char qbuf[MAX_LABEL + 1], kbuf[MAX_LABEL + 1];
  size_t i;
  struct series *s;

  if (queue == NULL)
    queue = "";
  if (kind == NULL)
    kind = "";
  if (strlen(queue) > MAX_LABEL) {
    memcpy(qbuf, queue, MAX_LABEL);
    qbuf[MAX_LABEL] = '\0';
    queue = qbuf;
  }
  if (strlen(kind) > MAX_LABEL) {
    memcpy(kbuf, kind, MAX_LABEL);
    kbuf[MAX_LABEL] = '\0';
    kind = kbuf;
  }
  i = find_slot(queue, kind, hash_labels(queue, kind));
  if (slots[i] != 0)
    return series[slots[i] - 1];
  if (nseries >= LABEL_CAP && strcmp(kind, "other") != 0)
    return lookup(queue, "other");
  if (nseries >= LABEL_CAP + OVERFLOW_CAP && strcmp(queue, "other") != 0)
    return lookup("other", "other");
  PGR_ASSERT(nseries < MAX_SERIES);
  s = pgr_calloc(1, sizeof *s);
  s->queue = pgr_strdup(queue);
  s->kind = pgr_strdup(kind);
  series[nseries++] = s;
  slots[i] = (int16_t)nseries;
  return s;
}

void pgr_metrics_task_started(const char *queue, const char *kind) {
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  lookup(queue, kind)->count[OUT_STARTED]++;
  uv_mutex_unlock(&mu);
}

void pgr_metrics_task_done(const char *queue, const char *kind,
                           enum pgr_done done, double seconds) {
  enum outcome o;
  size_t b = 0;
  struct series *s;

  switch (done) {
  case PGR_DONE_SUCCEEDED:
    o = OUT_SUCCEEDED;
    break;
  case PGR_DONE_RETRY:
    o = OUT_RETRIED;
    break;
  case PGR_DONE_FAILED:
    o = OUT_FAILED;
    break;
  case PGR_DONE_CANCELLED:
    o = OUT_CANCELLED;
    break;
  case PGR_DONE_REQUEUED:
    o = OUT_REQUEUED;
    break;
  case PGR_DONE_LOST:
  default:
    o = OUT_LOST;
    break;
  }
  if (!(seconds >= 0)) /* also catches NaN */
    seconds = 0;
  while (b < NBUCKETS && seconds > bucket_le[b])
    b++;

  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  s = lookup(queue, kind);
  s->count[o]++;
  /*
   * A lost attempt's outcome is someone else's; its duration says nothing
   * about this worker's tasks, so it stays out of the histogram.
   */
  if (o != OUT_LOST) {
    if (b < NBUCKETS)
      s->bucket[b]++;
    s->dur_sum += seconds;
    s->dur_count++;
  }
  uv_mutex_unlock(&mu);
}

void pgr_metrics_set_running(int n) {
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  running = n;
  uv_mutex_unlock(&mu);
}

/* The gauge and /healthz read health.c, where the state lives. */
void pgr_metrics_set_db_up(int up) {
  if (up)
    pgr_health_loop_up();
  else
    pgr_health_loop_down("database connection lost");
}

/* Label values escape backslash, double quote and newline (exposition
 * format 0.0.4). */
static void add_label_value(struct pgr_buf *b, const char *v) {
  for (const char *p = v; *p; p++) {
    switch (*p) {
    case '\\':
      pgr_buf_add(b, "\\\\", 2);
      break;
    case '"':
      pgr_buf_add(b, "\\\"", 2);
      break;
    case '\n':
      pgr_buf_add(b, "\\n", 2);
      break;
    default:
      pgr_buf_addc(b, *p);
    }
  }
}

static void add_labels(struct pgr_buf *b, const struct series *s,
                       const char *le) {
  pgr_buf_adds(b, "{queue=\"");
  add_label_value(b, s->queue);
  pgr_buf_adds(b, "\",kind=\"");
  add_label_value(b, s->kind);
  pgr_buf_addc(b, '"');
  if (le) {
    pgr_buf_adds(b, ",le=\"");
    pgr_buf_adds(b, le);
    pgr_buf_addc(b, '"');
  }
  pgr_buf_addc(b, '}');
}

static void add_header(struct pgr_buf *b, const char *name, const char *type,
                       const char *help) {
  pgr_buf_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static int cmp_series(const void *a, const void *b) {
  const struct series *x = a, *y = b;
  int c = strcmp(x->queue, y->queue);
  return c ? c : strcmp(x->kind, y->kind);
}

char *pgr_metrics_render(void) {
  struct series *snap = NULL;
  size_t n = 0, cap = 0;
  int run, up;
  uint64_t dropped = pgr_log_dropped();
  uint64_t rejected = pgr_log_rejected();
  struct pgr_buf b;

  uv_once(&once, init_once);
  /*
   * Size the snapshot outside the lock; series only grow, so retry in the
   * rare case one was added in between.
   */
  for (;;) {
    uv_mutex_lock(&mu);
    if (nseries <= cap)
      break;
    cap = nseries + 16;
    uv_mutex_unlock(&mu);
    free(snap);
    snap = pgr_malloc(cap * sizeof *snap + 1);
  }
  n = nseries;
  for (size_t i = 0; i < n; i++)
    snap[i] = *series[i]; /* label strings are never freed: borrow them */
  run = running;
  uv_mutex_unlock(&mu);
  up = pgr_health_db_up();

  if (n > 1)
    qsort(snap, n, sizeof *snap, cmp_series);

  pgr_buf_init(&b);
  for (int o = 0; o < NOUTCOMES; o++) {
    add_header(&b, counter_info[o].name, "counter", counter_info[o].help);
    for (size_t i = 0; i < n; i++) {
      pgr_buf_adds(&b, counter_info[o].name);
      add_labels(&b, &snap[i], NULL);
      pgr_buf_printf(&b, " %llu\n", (unsigned long long)snap[i].count[o]);
    }
  }

  add_header(&b, "pgrunner_task_duration_seconds", "histogram",
             "Time a task attempt ran on a worker thread.");
  for (size_t i = 0; i < n; i++) {
    uint64_t cum = 0;
    for (size_t k = 0; k < NBUCKETS; k++) {
      cum += snap[i].bucket[k];
      pgr_buf_adds(&b, "pgrunner_task_duration_seconds_bucket");
      add_labels(&b, &snap[i], bucket_text[k]);
      pgr_buf_printf(&b, " %llu\n", (unsigned long long)cum);
    }
    pgr_buf_adds(&b, "pgrunner_task_duration_seconds_bucket");
    add_labels(&b, &snap[i], "+Inf");
    pgr_buf_printf(&b, " %llu\n", (unsigned long long)snap[i].dur_count);
    pgr_buf_adds(&b, "pgrunner_task_duration_seconds_sum");
    add_labels(&b, &snap[i], NULL);
    pgr_buf_printf(&b, " %.6f\n", snap[i].dur_sum);
    pgr_buf_adds(&b, "pgrunner_task_duration_seconds_count");
    add_labels(&b, &snap[i], NULL);
    pgr_buf_printf(&b, " %llu\n", (unsigned long long)snap[i].dur_count);
  }

  add_header(&b, "pgrunner_tasks_running", "gauge",
             "Tasks running on this worker's threads now.");
  pgr_buf_printf(&b, "pgrunner_tasks_running %d\n", run);
  add_header(&b, "pgrunner_db_up", "gauge",
             "1 while the worker's database connection is up, else 0.");
  pgr_buf_printf(&b, "pgrunner_db_up %d\n", up);
  add_header(&b, "pgrunner_log_records_dropped_total", "counter",
             "Debug log records dropped because the log queue was full.");
  pgr_buf_printf(&b, "pgrunner_log_records_dropped_total %llu\n",
                 (unsigned long long)dropped);
  add_header(&b, "pgrunner_log_lines_rejected_total", "counter",
             "Lines other processes sent to the log socket that were not "
             "valid records (garbage, overlong, cut off).");
  pgr_buf_printf(&b, "pgrunner_log_lines_rejected_total %llu\n",
                 (unsigned long long)rejected);
  add_header(&b, "pgrunner_build_info", "gauge",
             "Always 1; the labels name the build.");
  pgr_buf_adds(&b, "pgrunner_build_info{version=\"");
  add_label_value(&b, PGR_VERSION);
  pgr_buf_adds(&b, "\"} 1\n");

  free(snap);
  return b.data;
}

/* ---- HTTP ---- */

/*
 * DESIGN (HTTP): a deliberately small server, because the whole job is two
 * fixed GET routes for a scraper and a health check. It reads the request
 * line and headers (never a body), answers, and closes: one request per
 * connection, announced with "Connection: close", so there is no keep-alive,
 * pipelining or chunked input to get wrong. Everything a client can make it
 * hold is bounded: REQ_MAX bytes of request head per connection, MAX_CONNS
 * connections, and a deadline per connection (a slow or silent client is
 * cut off; the deadline is not pushed back by each byte, so dribbling a
 * byte at a time does not hold a slot for long either).
 *
 * After the response is written the server half-closes (FIN) and keeps
 * reading until the client closes, discarding what it gets: closing a
 * socket with unread input makes the kernel send a reset, which can destroy
 * the response before the client has read it (a request with a body, a
 * pipelined second request, an oversized head answered with 431).
 */

/* Request line and headers, including the blank line. */
#define REQ_MAX 8192
/* A scraper needs one or two; cap what misbehaving clients can hold. */
#define MAX_CONNS 64
/* From accept to the end of the request head. */
#define REQUEST_TIMEOUT_MS 10000
/* From the end of the request head to the client's close. */
#define RESPONSE_TIMEOUT_MS 10000

static const char text_plain[] = "text/plain; charset=utf-8";
static const char text_metrics[] = "text/plain; version=0.0.4; charset=utf-8";

enum conn_state {
  CONN_READING,  /* collecting the request head */
  CONN_WRITING,  /* the response is being written; input is discarded */
  CONN_DRAINING, /* response written, FIN sent; discard input until EOF */
  CONN_CLOSING,  /* uv_close called on both handles */
};

struct conn {
  uv_tcp_t tcp;
  uv_timer_t timer;
  uv_write_t write_req;
  uv_shutdown_t shutdown_req;
  struct server *srv;
  struct conn *prev, *next; /* the server's list, for stop */
  enum conn_state state;
  int open_handles; /* freed when the last handle's close_cb runs */
  int peer_eof;     /* the client half-closed after its request */
  char *resp_head;  /* what uv_write is sending; freed in on_written */
  char *resp_body;
  /* Set once the request line has parsed; they point into req. */
  const char *method;
  size_t method_len;
  const char *target;
  size_t target_len;
  size_t scan; /* where to resume looking for the end of the head */
  size_t len;  /* bytes of req filled */
  char req[REQ_MAX];
};

struct server {
  uv_loop_t loop;
  uv_tcp_t listener;
  uv_async_t stop_async;
  uv_thread_t thread;
  struct conn *conns;
  int nconns; /* including connections whose handles are closing */
};

static void on_conn_closed(uv_handle_t *h) {
  struct conn *c = h->data;
  struct server *s = c->srv;

  if (--c->open_handles > 0)
    return;
  if (c->prev)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next)
    c->next->prev = c->prev;
  s->nconns--;
  /* Pending write and shutdown callbacks ran (UV_ECANCELED) before this. */
  PGR_ASSERT(c->resp_head == NULL && c->resp_body == NULL);
  free(c);
}

static void conn_close(struct conn *c) {
  if (c->state == CONN_CLOSING)
    return;
  c->state = CONN_CLOSING;
  uv_close((uv_handle_t *)&c->tcp, on_conn_closed);
  uv_close((uv_handle_t *)&c->timer, on_conn_closed);
}

static void on_conn_timeout(uv_timer_t *t) {
  conn_close(t->data);
}

static const char *reason_phrase(int status) {
  switch (status) {
  case 200:
    return "OK";
  case 400:
    return "Bad Request";
  case 404:
    return "Not Found";
  case 405:
    return "Method Not Allowed";
  case 431:
    return "Request Header Fields Too Large";
  case 503:
    return "Service Unavailable";
  case 505:
    return "HTTP Version Not Supported";
  default:
    return "Error";
  }
}

/* add_date adds the Date header RFC 9110 asks of a server with a clock; the
 * names are spelled out because strftime's %a and %b follow the locale. */
static void add_date(struct pgr_buf *b) {
  static const char *const day[] = {"Sun", "Mon", "Tue", "Wed",
                                    "Thu", "Fri", "Sat"};
  static const char *const mon[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                    "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  time_t now = time(NULL);
  struct tm tm;

  if (gmtime_r(&now, &tm) == NULL)
    return;
  pgr_buf_printf(b, "Date: %s, %02d %s %04d %02d:%02d:%02d GMT\r\n",
                 day[tm.tm_wday % 7], tm.tm_mday, mon[tm.tm_mon % 12],
                 tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
}

static void on_shutdown(uv_shutdown_t *req, int status) {
  struct conn *c = pgr_container_of(req, struct conn, shutdown_req);

  if (status < 0)
    conn_close(c); /* a no-op when already closing (UV_ECANCELED) */
}

static void on_written(uv_write_t *req, int status) {
  struct conn *c = pgr_container_of(req, struct conn, write_req);

  free(c->resp_head);
  free(c->resp_body);
  c->resp_head = c->resp_body = NULL;
  if (c->state == CONN_CLOSING)
    return;
  if (status < 0 || c->peer_eof) {
    /* Failed, or done: a client that already closed its side reads to our
     * FIN, and all its input has been read, so close cannot reset. */
    conn_close(c);
    return;
  }
  c->state = CONN_DRAINING;
  if (uv_shutdown(&c->shutdown_req, (uv_stream_t *)&c->tcp, on_shutdown) != 0)
    conn_close(c);
}

/*
 * respond sends status with body (malloc'd; taken, even on failure) and
 * closes after it. head_only leaves the body out (HEAD) but keeps its
 * Content-Length.
 */
static void respond(struct conn *c, int status, const char *ctype, char *body,
                    int head_only) {
  struct pgr_buf h;
  uv_buf_t bufs[2];
  size_t body_len = strlen(body);

  pgr_buf_init(&h);
  pgr_buf_printf(&h, "HTTP/1.1 %d %s\r\n", status, reason_phrase(status));
  add_date(&h);
  pgr_buf_printf(&h,
                 "Content-Type: %s\r\nContent-Length: %zu\r\n"
                 "Cache-Control: no-store\r\nConnection: close\r\n",
                 ctype, body_len);
  if (status == 405)
    pgr_buf_adds(&h, "Allow: GET, HEAD\r\n");
  pgr_buf_adds(&h, "\r\n");

  c->resp_head = h.data;
  bufs[0] = uv_buf_init(h.data, (unsigned int)h.len);
  if (head_only || body_len == 0) {
    free(body);
  } else {
    c->resp_body = body;
    bufs[1] = uv_buf_init(body, (unsigned int)body_len);
  }
  c->state = CONN_WRITING;
  /* The deadline now covers writing and the client's close. */
  uv_timer_start(&c->timer, on_conn_timeout, RESPONSE_TIMEOUT_MS, 0);
  if (uv_write(&c->write_req, (uv_stream_t *)&c->tcp, bufs,
               c->resp_body ? 2 : 1, on_written) != 0) {
    free(c->resp_head);
    free(c->resp_body);
    c->resp_head = c->resp_body = NULL;
    conn_close(c);
  }
}

static int method_is(const struct conn *c, const char *m) {
  return c->method != NULL && c->method_len == strlen(m) &&
         memcmp(c->method, m, c->method_len) == 0;
}

/* respond_error answers a request that cannot be served as asked. */
static void respond_error(struct conn *c, int status, const char *body) {
  respond(c, status, text_plain, pgr_strdup(body), method_is(c, "HEAD"));
}

/*
 * request_path returns the path of the request target (origin form
 * "/p?q", or absolute form "http://host/p?q", which RFC 9112 has servers
 * accept) without its query, in *len.
 */
static const char *request_path(const struct conn *c, size_t *len) {
  const char *p = c->target, *end = c->target + c->target_len;
  const char *q;

  if ((size_t)(end - p) > 7 && strncasecmp(p, "http://", 7) == 0)
    p += 7;
  else if ((size_t)(end - p) > 8 && strncasecmp(p, "https://", 8) == 0)
    p += 8;
  if (p != c->target) {
    p = memchr(p, '/', (size_t)(end - p));
    if (p == NULL) {
      *len = 1;
      return "/";
    }
  }
  q = memchr(p, '?', (size_t)(end - p));
  *len = (size_t)((q ? q : end) - p);
  return p;
}

static int path_is(const char *path, size_t len, const char *want) {
  return len == strlen(want) && memcmp(path, want, len) == 0;
}

/* serve answers a complete, well-formed request head. */
static void serve(struct conn *c) {
  int head = method_is(c, "HEAD");
  size_t len;
  const char *path = request_path(c, &len);

  if (!head && !method_is(c, "GET"))
    respond_error(c, 405, "method not allowed\n");
  else if (path_is(path, len, "/metrics"))
    respond(c, 200, text_metrics, pgr_metrics_render(), head);
  else if (path_is(path, len, "/healthz")) {
    char why[1024];
    int ok = pgr_health_reason(why, sizeof why - 1);
    strcat(why, "\n");
    respond(c, ok ? 200 : 503, text_plain, pgr_strdup(why), head);
  }
  else
    respond_error(c, 404, "not found\n");
}

static int is_tchar(unsigned char ch) {
  return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
         (ch >= '0' && ch <= '9') ||
         (ch != '\0' && strchr("!#$%&'*+-.^_`|~", ch) != NULL);
}

/*
 * parse_request_line checks "METHOD SP target SP HTTP/d.d" in [p, end) (end
 * at the line's LF) and records the method and target. It returns 0, or the
 * status to answer: 400 for anything malformed, 505 for a major version
 * other than 1.
 */
static int parse_request_line(struct conn *c, const char *p, const char *end) {
  const char *sp1, *sp2, *v;

  if (end > p && end[-1] == '\r')
    end--;
  sp1 = memchr(p, ' ', (size_t)(end - p));
  if (sp1 == NULL || sp1 == p)
    return 400;
  for (const char *q = p; q < sp1; q++)
    if (!is_tchar((unsigned char)*q))
      return 400;
  sp2 = memchr(sp1 + 1, ' ', (size_t)(end - sp1 - 1));
  if (sp2 == NULL || sp2 == sp1 + 1)
    return 400;
  for (const char *q = sp1 + 1; q < sp2; q++)
    if ((unsigned char)*q <= 0x20 || (unsigned char)*q == 0x7f)
      return 400;
  v = sp2 + 1;
  if (end - v != 8 || memcmp(v, "HTTP/", 5) != 0 || v[5] < '0' || v[5] > '9' ||
      v[6] != '.' || v[7] < '0' || v[7] > '9')
    return 400;
  if (v[5] != '1')
    return 505;
  c->method = p;
  c->method_len = (size_t)(sp1 - p);
  c->target = sp1 + 1;
  c->target_len = (size_t)(sp2 - sp1 - 1);
  return 0;
}

/*
 * on_request_bytes looks at the request head collected so far: the request
 * line is checked as soon as it is complete (garbage is answered at once),
 * and the request is served at the blank line that ends the head. A bare LF
 * is accepted for CRLF, and empty lines before the request line are skipped
 * (RFC 9112 section 2.2).
 */
static void on_request_bytes(struct conn *c) {
  const char *buf = c->req, *end = c->req + c->len;

  if (c->method == NULL) {
    const char *p = buf, *nl;
    int status;

    while (p < end && (*p == '\r' || *p == '\n'))
      p++;
    nl = memchr(p, '\n', (size_t)(end - p));
    if (nl != NULL) {
      status = parse_request_line(c, p, nl);
      if (status != 0) {
        respond_error(c, status,
                      status == 505 ? "HTTP/1.x only\n" : "bad request\n");
        return;
      }
      c->scan = (size_t)(nl - buf);
    }
  }
  if (c->method != NULL) {
    /* The head ends at LF [CR] LF; c->scan is at or before its first LF. */
    for (size_t i = c->scan; i < c->len; i++) {
      size_t j = i + 1;
      if (buf[i] != '\n')
        continue;
      if (j < c->len && buf[j] == '\r')
        j++;
      if (j < c->len && buf[j] == '\n') {
        serve(c);
        return;
      }
    }
    /* Rescan the last two bytes next time: they may start the blank line. */
    c->scan = c->len >= 2 ? c->len - 2 : 0;
  }
  if (c->len == REQ_MAX)
    respond_error(c, 431, "request head too large\n");
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf) {
  struct conn *c = h->data;
  (void)suggested;

  /* Past the head, input is read only to be thrown away. A full buffer
   * cannot happen while reading the head: on_request_bytes answers 431. */
  if (c->state == CONN_READING)
    *buf = uv_buf_init(c->req + c->len, (unsigned int)(REQ_MAX - c->len));
  else
    *buf = uv_buf_init(c->req, REQ_MAX);
}

static void on_read(uv_stream_t *stream, ssize_t nread, const uv_buf_t *buf) {
  struct conn *c = stream->data;
  (void)buf;

  if (nread == 0 || c->state == CONN_CLOSING)
    return;
  if (nread == UV_EOF && c->state == CONN_WRITING) {
    /* A client may send its request and half-close: it still gets the
     * response, and the connection closes once that is written. */
    c->peer_eof = 1;
    uv_read_stop(stream);
    return;
  }
  if (nread < 0) {
    /* EOF mid-request (the client gave up), EOF after our FIN (done), or
     * a reset: nothing more to do with this connection. */
    conn_close(c);
    return;
  }
  if (c->state == CONN_READING) {
    c->len += (size_t)nread;
    on_request_bytes(c);
  }
}

static void on_connection(uv_stream_t *listener, int status) {
  struct server *s = pgr_container_of(listener, struct server, listener);
  struct conn *c;

  /*
   * A failed accept (out of descriptors, say) concerns one client; libuv
   * keeps listening, and there is nothing useful to log per connection.
   */
  if (status < 0)
    return;
  c = pgr_calloc(1, sizeof *c);
  c->srv = s;
  PGR_ASSERT(uv_tcp_init(&s->loop, &c->tcp) == 0);
  PGR_ASSERT(uv_timer_init(&s->loop, &c->timer) == 0);
  c->tcp.data = c->timer.data = c;
  c->open_handles = 2;
  c->state = CONN_READING;
  c->next = s->conns;
  if (s->conns)
    s->conns->prev = c;
  s->conns = c;
  s->nconns++;
  /*
   * Past the cap the connection is still accepted, then closed at once:
   * leaving it in the backlog would make libuv stop accepting altogether.
   */
  if (uv_accept(listener, (uv_stream_t *)&c->tcp) != 0 ||
      s->nconns > MAX_CONNS ||
      uv_timer_start(&c->timer, on_conn_timeout, REQUEST_TIMEOUT_MS, 0) != 0 ||
      uv_read_start((uv_stream_t *)&c->tcp, on_alloc, on_read) != 0)
    conn_close(c);
}

/* on_stop runs on the server thread when pgr_metrics_stop asks: closing
 * every handle lets uv_run return. */
static void on_stop(uv_async_t *a) {
  struct server *s = pgr_container_of(a, struct server, stop_async);

  uv_close((uv_handle_t *)&s->listener, NULL);
  uv_close((uv_handle_t *)&s->stop_async, NULL);
  /* conn_close unlinks nothing (the close callbacks do), so this walk is
   * safe. */
  for (struct conn *c = s->conns; c != NULL; c = c->next)
    conn_close(c);
}

static void server_main(void *arg) {
  struct server *s = arg;
  sigset_t set;

  /*
   * Writing to a client that has gone raises SIGPIPE, which kills a process
   * that has not ignored it (the unit tests have not). Blocked on this
   * thread, the write just fails with EPIPE.
   */
  sigemptyset(&set);
  sigaddset(&set, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  uv_run(&s->loop, UV_RUN_DEFAULT);
}

static void close_any(uv_handle_t *h, void *arg) {
  (void)arg;
  if (!uv_is_closing(h))
    uv_close(h, NULL);
}

/* discard_server frees a server whose thread never started. */
static void discard_server(struct server *s) {
  uv_walk(&s->loop, close_any, NULL);
  uv_run(&s->loop, UV_RUN_DEFAULT);
  PGR_ASSERT(uv_loop_close(&s->loop) == 0);
  free(s);
}

/*
 * open_listener binds and listens on host:port itself, so that a port in
 * use is reported with its errno, and so that "::" gets dual stack.
 */
static int open_listener(const char *host, int port, int *fd_out, char *errbuf,
                         size_t errlen) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  int fd = -1, one = 1, v6 = 0, rc = PGR_EIO;

  memset(&ss, 0, sizeof ss);
  if (port < 1 || port > 65535) {
    snprintf(errbuf, errlen, "port %d is out of range 1-65535", port);
    rc = PGR_EUSAGE;
    goto out;
  }
  if (strcmp(host, "localhost") == 0)
    host = "127.0.0.1";
  struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    sslen = sizeof *sin;
  } else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    sslen = sizeof *sin6;
    v6 = 1;
  } else {
    snprintf(errbuf, errlen,
             "\"%s\" is not an IPv4 or IPv6 address (use 0.0.0.0 for all "
             "interfaces)",
             host);
    rc = PGR_EUSAGE;
    goto out;
  }

  fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    snprintf(errbuf, errlen, "socket: %s", strerror(errno));
    goto out;
  }
  /* Restarting right after a stop must not wait out TIME_WAIT. On Linux
   * this never lets two listeners share a port. */
  (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (v6) {
    /* "::" serves IPv4 too (dual stack); a specific address only itself. */
    int only = !IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr);
    (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &only, sizeof only);
  }
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 ||
      listen(fd, MAX_CONNS) != 0) {
    snprintf(errbuf, errlen, "cannot listen on %s%s%s:%d: %s", v6 ? "[" : "",
             host, v6 ? "]" : "", port, strerror(errno));
    rc = errno == EADDRINUSE || errno == EADDRNOTAVAIL || errno == EACCES
             ? PGR_EUSAGE
             : PGR_EIO;
    goto out;
  }
  *fd_out = fd;
  fd = -1;
  rc = 0;
out:
  if (fd >= 0)
    close(fd);
  return rc;
}

int pgr_metrics_start(const char *host, int port, char *errbuf, size_t errlen) {
  struct server *s = NULL;
  int fd = -1, err = 0, rc;

  uv_once(&once, init_once);
  if (server_ != NULL) {
    snprintf(errbuf, errlen, "the metrics server is already running");
    return PGR_EINVAL;
  }
  if (host == NULL || *host == '\0')
    host = "0.0.0.0";
  rc = open_listener(host, port, &fd, errbuf, errlen);
  if (rc != 0)
    goto out;

  s = pgr_calloc(1, sizeof *s);
  err = uv_loop_init(&s->loop);
  if (err != 0) {
    free(s); /* uv_loop_init cleans up after itself */
    s = NULL;
    goto out;
  }
  PGR_ASSERT(uv_tcp_init(&s->loop, &s->listener) == 0);
  err = uv_async_init(&s->loop, &s->stop_async, on_stop);
  if (err != 0)
    goto out;
  err = uv_tcp_open(&s->listener, fd);
  if (err != 0)
    goto out;
  fd = -1; /* the handle owns it now */
  err = uv_listen((uv_stream_t *)&s->listener, MAX_CONNS, on_connection);
  if (err != 0)
    goto out;
  /* Everything above happens before the thread starts, so it sees it. */
  err = uv_thread_create(&s->thread, server_main, s);
  if (err != 0)
    goto out;
  server_ = s;
  s = NULL;
out:
  if (err != 0) {
    snprintf(errbuf, errlen, "cannot start the HTTP server on %s:%d: %s", host,
             port, uv_strerror(err));
    rc = PGR_EIO;
  }
  if (fd >= 0)
    close(fd);
  if (s != NULL)
    discard_server(s);
  return rc;
}

void pgr_metrics_stop(void) {
  struct server *s = server_;
  int err;

  if (s == NULL)
    return;
  PGR_ASSERT(uv_async_send(&s->stop_async) == 0);
  PGR_ASSERT(uv_thread_join(&s->thread) == 0);
  err = uv_loop_close(&s->loop);
  if (err != 0)
    pgr_warn("metrics http server: loop closed with handles open",
             PGR_LS("error", uv_strerror(err)));
  else
    free(s); /* with handles still open, leaking beats a use after free */
  server_ = NULL;
}
