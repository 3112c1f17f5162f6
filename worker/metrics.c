/*
 * metrics.c - task counters, the /metrics text and the /healthz state
 * (http.c serves them).
 *
 * Thread: the update functions (pgr_metrics_task_*, pgr_metrics_set_*) run
 * on the loop thread (and on the worker threads). pgr_metrics_render() and
 * pgr_metrics_health() run on the HTTP server's thread (tests call them from
 * their own), so the worker's event loop never formats anything.
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
static uint64_t last_claim_ns; /* uv_hrtime() of the last claim; 0: none */

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
 * cut_label returns s, or its first MAX_LABEL bytes at most copied into
 * buf, cut before a UTF-8 continuation byte: the exposition format is
 * UTF-8, and half a character would make a scraper reject the whole page.
 */
static const char *cut_label(const char *s, char buf[MAX_LABEL + 1]) {
  size_t n = MAX_LABEL;

  if (strlen(s) <= MAX_LABEL)
    return s;
  while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
    n--;
  memcpy(buf, s, n);
  buf[n] = '\0';
  return buf;
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
  queue = cut_label(queue, qbuf);
  kind = cut_label(kind, kbuf);
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

void pgr_metrics_claim_succeeded(void) {
  uint64_t now = uv_hrtime();
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
  last_claim_ns = now;
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
void pgr_metrics_add_label_value(struct pgr_buf *b, const char *v) {
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
  pgr_metrics_add_label_value(b, s->queue);
  pgr_buf_adds(b, "\",kind=\"");
  pgr_metrics_add_label_value(b, s->kind);
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
  uint64_t claim_ns = last_claim_ns;
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
  if (claim_ns != 0) {
    add_header(&b, "pgrunner_last_claim_age_seconds", "gauge",
               "Seconds since this worker's last claim statement succeeded "
               "(claims run at least every --poll-interval).");
    pgr_buf_printf(&b, "pgrunner_last_claim_age_seconds %.3f\n",
                   (double)(uv_hrtime() - claim_ns) / 1e9);
  }
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
  pgr_metrics_add_label_value(&b, PGR_VERSION);
  pgr_buf_adds(&b, "\"} 1\n");

  free(snap);
  return b.data;
}

int pgr_metrics_health(char **body) {
  char why[1024];
  int ok = pgr_health_reason(why, sizeof why - 1);
  strcat(why, "\n");
  *body = pgr_strdup(why);
  return ok ? 200 : 503;
}
