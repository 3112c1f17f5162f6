/*
 * metrics.c - task counters, the /metrics text and the /healthz state, served
 * over HTTP by libmicrohttpd.
 *
 * Thread: the update functions (pgr_metrics_task_*, pgr_metrics_set_*) run
 * on the loop thread; pgr_metrics_render() runs on libmicrohttpd's own
 * polling thread (or a test's thread). pgr_metrics_start/stop run on the
 * thread that owns the worker's lifecycle (the loop thread, before and after
 * the loop runs).
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
 * memory without bound.
 */
#include "metrics.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

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
static int db_up;
/* Touched only by start/stop, on one thread. */
static struct MHD_Daemon *daemon_;

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

void pgr_metrics_set_db_up(int up) {
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  db_up = up != 0;
  uv_mutex_unlock(&mu);
}

static int get_db_up(void) {
  int up;

  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  up = db_up;
  uv_mutex_unlock(&mu);
  return up;
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
  up = db_up;
  uv_mutex_unlock(&mu);

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
  add_header(&b, "pgrunner_build_info", "gauge",
             "Always 1; the labels name the build.");
  pgr_buf_adds(&b, "pgrunner_build_info{version=\"");
  add_label_value(&b, PGR_VERSION);
  pgr_buf_adds(&b, "\"} 1\n");

  free(snap);
  return b.data;
}

/* ---- HTTP ---- */

static enum MHD_Result reply(struct MHD_Connection *conn, unsigned int status,
                             char *body, int must_free,
                             const char *content_type) {
  struct MHD_Response *r;
  enum MHD_Result ret;

  r = MHD_create_response_from_buffer(strlen(body), body,
                                      must_free ? MHD_RESPMEM_MUST_FREE
                                                : MHD_RESPMEM_PERSISTENT);
  if (r == NULL) {
    if (must_free)
      free(body);
    return MHD_NO;
  }
  MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
  if (status == MHD_HTTP_METHOD_NOT_ALLOWED)
    MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD");
  ret = MHD_queue_response(conn, status, r);
  MHD_destroy_response(r);
  return ret;
}

/*
 * on_request answers one request on libmicrohttpd's thread. It replies on
 * the first call; libmicrohttpd discards any request body itself.
 */
static enum MHD_Result on_request(void *cls, struct MHD_Connection *conn,
                                  const char *url, const char *method,
                                  const char *version, const char *upload,
                                  size_t *upload_size, void **req_cls) {
  static const char text[] = "text/plain; charset=utf-8";
  (void)cls;
  (void)version;
  (void)upload;
  (void)upload_size;
  (void)req_cls;

  if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
      strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
    return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED,
                 (char *)"method not allowed\n", 0, text);
  if (strcmp(url, "/metrics") == 0)
    return reply(conn, MHD_HTTP_OK, pgr_metrics_render(), 1,
                 "text/plain; version=0.0.4; charset=utf-8");
  if (strcmp(url, "/healthz") == 0) {
    if (get_db_up())
      return reply(conn, MHD_HTTP_OK, (char *)"ok\n", 0, text);
    return reply(conn, MHD_HTTP_SERVICE_UNAVAILABLE,
                 (char *)"database connection down\n", 0, text);
  }
  return reply(conn, MHD_HTTP_NOT_FOUND, (char *)"not found\n", 0, text);
}

/* libmicrohttpd's own complaints go into our log, not raw onto stderr. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
  char msg[512];
  size_t len;
  (void)cls;

  vsnprintf(msg, sizeof msg, fmt, ap);
  len = strlen(msg);
  while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == '\r'))
    msg[--len] = '\0';
  pgr_warn("metrics http server", PGR_LS("error", msg));
}

/*
 * open_listener binds and listens on host:port itself, so that a port in
 * use is reported with its errno rather than libmicrohttpd's log line.
 */
static int open_listener(const char *host, int port, int *fd_out, int *v6_out,
                         char *errbuf, size_t errlen) {
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
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 || listen(fd, 64) != 0) {
    snprintf(errbuf, errlen, "cannot listen on %s%s%s:%d: %s", v6 ? "[" : "",
             host, v6 ? "]" : "", port, strerror(errno));
    rc = errno == EADDRINUSE || errno == EADDRNOTAVAIL || errno == EACCES
             ? PGR_EUSAGE
             : PGR_EIO;
    goto out;
  }
  *fd_out = fd;
  *v6_out = v6;
  fd = -1;
  rc = 0;
out:
  if (fd >= 0)
    close(fd);
  return rc;
}

int pgr_metrics_start(const char *host, int port, char *errbuf, size_t errlen) {
  int fd = -1, v6 = 0, rc;
  unsigned int flags =
      MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_AUTO | MHD_USE_ERROR_LOG;

  uv_once(&once, init_once);
  if (daemon_ != NULL) {
    snprintf(errbuf, errlen, "the metrics server is already running");
    return PGR_EINVAL;
  }
  if (host == NULL || *host == '\0')
    host = "0.0.0.0";
  rc = open_listener(host, port, &fd, &v6, errbuf, errlen);
  if (rc != 0)
    return rc;
  if (v6)
    flags |= MHD_USE_IPv6;
  daemon_ = MHD_start_daemon(
      flags, (uint16_t)port, NULL, NULL, on_request, NULL,
      /* First, or libmicrohttpd prints what precedes it itself. */
      MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, NULL, MHD_OPTION_LISTEN_SOCKET,
      (MHD_socket)fd,
      /* A scraper needs one or two; cap what a misbehaving client can hold. */
      MHD_OPTION_CONNECTION_LIMIT, (unsigned int)64,
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)10, MHD_OPTION_END);
  if (daemon_ == NULL) {
    /*
     * The socket is not closed here: libmicrohttpd 0.9.75 closes a socket
     * passed with MHD_OPTION_LISTEN_SOCKET on most of its failure paths, and
     * closing it again could close a descriptor another thread has just
     * been given. Leaking one descriptor on a path that ends the process is
     * the lesser harm. The reason is in the log (on_mhd_log).
     */
    snprintf(errbuf, errlen,
             "libmicrohttpd could not start the HTTP server on %s:%d (see "
             "the log)",
             host, port);
    return PGR_EIO;
  }
  return 0;
}

void pgr_metrics_stop(void) {
  if (daemon_ == NULL)
    return;
  /* Joins libmicrohttpd's thread and closes the listening socket. */
  MHD_stop_daemon(daemon_);
  daemon_ = NULL;
}
