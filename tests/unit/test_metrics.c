/*
 * test_metrics.c - the counters and their Prometheus text (metrics.c), and
 * the real HTTP server on a loopback port, spoken to over plain sockets:
 * good requests, garbage, oversized heads, clients that vanish or say
 * nothing, more connections than the cap, stop with connections open.
 *
 * Thread: Criterion runs each test in its own process, so every test starts
 * with zeroed counters and no server; the HTTP tests talk to the server's
 * own thread from the test's thread (and from client threads in
 * parallel_requests_are_all_answered).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <pthread.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include "metrics.h"
#include "web/http.h"

/* ---- helpers ------------------------------------------------------------ */

/* has_line tells whether `text` holds `line` as a whole line. */
static int has_line(const char *text, const char *line) {
  size_t n = strlen(line);
  for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
    if ((p == text || p[-1] == '\n') && p[n] == '\n')
      return 1;
  }
  return 0;
}

/* count_prefix counts lines of `text` that start with `prefix`. */
static int count_prefix(const char *text, const char *prefix) {
  int n = 0;
  size_t len = strlen(prefix);
  const char *p = text;
  while (*p) {
    if (strncmp(p, prefix, len) == 0)
      n++;
    p = strchr(p, '\n');
    if (p == NULL)
      break;
    p++;
  }
  return n;
}

/*
 * check_exposition checks every line against the text format 0.0.4: a
 * "# HELP name text" and a "# TYPE name type" before a family's samples,
 * each sample "name{labels} value" or "name value", and a final newline.
 */
static void check_exposition(const char *text) {
  regex_t sample, help, type;
  char *copy = strdup(text);
  char *save = NULL, family[128] = "";
  int seen_type = 0;

  cr_assert(not(eq(ptr, copy, NULL)));
  cr_assert(eq(int,
               regcomp(&sample,
                       "^([a-zA-Z_:][a-zA-Z0-9_:]*)"
                       "(\\{([a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\]|"
                       "\\\\[\\\\\"n])*\",?)*\\})? "
                       "(-?[0-9]+(\\.[0-9]+)?([eE][-+]?[0-9]+)?|"
                       "\\+Inf|-Inf|NaN)$",
                       REG_EXTENDED),
               0));
  cr_assert(eq(
      int, regcomp(&help, "^# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .+$", REG_EXTENDED),
      0));
  cr_assert(eq(int,
               regcomp(&type,
                       "^# TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                       "(counter|gauge|histogram|summary|untyped)$",
                       REG_EXTENDED),
               0));
  cr_expect(eq(chr, text[strlen(text) - 1], '\n'),
            "the text should end with a newline");

  for (char *line = strtok_r(copy, "\n", &save); line;
       line = strtok_r(NULL, "\n", &save)) {
    if (strncmp(line, "# HELP ", 7) == 0) {
      cr_expect(eq(int, regexec(&help, line, 0, NULL, 0), 0),
                "bad HELP line: %s", line);
      sscanf(line + 7, "%127s", family);
      seen_type = 0;
    } else if (strncmp(line, "# TYPE ", 7) == 0) {
      char name[128] = "";
      cr_expect(eq(int, regexec(&type, line, 0, NULL, 0), 0),
                "bad TYPE line: %s", line);
      sscanf(line + 7, "%127s", name);
      cr_expect(eq(str, name, family), "TYPE %s should follow its HELP", name);
      seen_type = 1;
    } else {
      cr_expect(eq(int, regexec(&sample, line, 0, NULL, 0), 0),
                "bad sample line: %s", line);
      cr_expect(seen_type, "sample before its TYPE: %s", line);
      cr_expect(eq(int, strncmp(line, family, strlen(family)), 0),
                "sample %s outside its family %s", line, family);
    }
  }
  regfree(&sample);
  regfree(&help);
  regfree(&type);
  free(copy);
}

struct http_reply {
  int status;
  char *head; /* status line and headers */
  char *body;
};

static void http_reply_free(struct http_reply *r) {
  free(r->head);
  free(r->body);
  r->head = r->body = NULL;
}

/*
 * connect_to opens a TCP connection to family/addr:port, or returns -1. A
 * receive time limit only keeps a broken server from hanging the test. No
 * Criterion assertions here or below: parallel_requests calls these from
 * threads of its own.
 */
static int connect_to(int family, const char *addr, int port) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  struct timeval tv = {.tv_sec = 30};
  int fd;

  memset(&ss, 0, sizeof ss);
  if (family == AF_INET) {
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, addr, &sin->sin_addr) != 1)
      return -1;
    sslen = sizeof *sin;
  } else {
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    if (inet_pton(AF_INET6, addr, &sin6->sin6_addr) != 1)
      return -1;
    sslen = sizeof *sin6;
  }
  fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&ss, sslen) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int send_all(int fd, const char *data, size_t len) {
  while (len > 0) {
    ssize_t n = send(fd, data, len, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      return -1;
    data += n;
    len -= (size_t)n;
  }
  return 0;
}

/* read_to_eof appends what fd sends until EOF: 0, or -1 on a reset or the
 * receive time limit. */
static int read_to_eof(int fd, struct pgr_buf *b) {
  char chunk[4096];
  ssize_t n;

  while ((n = recv(fd, chunk, sizeof chunk, 0)) != 0) {
    if (n < 0 && errno == EINTR)
      continue;
    if (n < 0)
      return -1;
    pgr_buf_add(b, chunk, (size_t)n);
  }
  return 0;
}

/* reset_close closes fd with a TCP reset rather than a FIN. */
static void reset_close(int fd) {
  struct linger lg = {.l_onoff = 1, .l_linger = 0};
  setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
  close(fd);
}

/* parse_reply splits a raw reply; -1 when it is not an HTTP/1.x reply. */
static int parse_reply(const char *raw, struct http_reply *out) {
  const char *sep;

  memset(out, 0, sizeof *out);
  if (sscanf(raw, "HTTP/1.%*d %d", &out->status) != 1)
    return -1;
  sep = strstr(raw, "\r\n\r\n");
  if (sep == NULL)
    return -1;
  out->head = pgr_strndup(raw, (size_t)(sep - raw) + 2);
  out->body = pgr_strdup(sep + 4);
  return 0;
}

/*
 * http_raw sends `len` bytes of `data` (half-closing after them when
 * half_close is set), reads the reply to EOF and parses it. -1 when the
 * server sent no whole reply.
 */
static int http_raw(int family, const char *addr, int port, const char *data,
                    size_t len, int half_close, struct http_reply *out) {
  struct pgr_buf b;
  int fd = connect_to(family, addr, port), rc = -1;

  memset(out, 0, sizeof *out);
  if (fd < 0)
    return -1;
  pgr_buf_init(&b);
  if (send_all(fd, data, len) != 0)
    goto out;
  if (half_close)
    shutdown(fd, SHUT_WR);
  if (read_to_eof(fd, &b) != 0)
    goto out;
  rc = parse_reply(b.data, out);
out:
  close(fd);
  pgr_buf_free(&b);
  return rc;
}

/* http_request sends one ordinary request and reads the reply. */
static int http_request(int family, const char *addr, int port,
                        const char *method, const char *path,
                        struct http_reply *out) {
  char req[512];

  snprintf(req, sizeof req,
           "%s %s HTTP/1.1\r\nHost: test\r\nUser-Agent: test_metrics\r\n"
           "Accept: */*\r\n\r\n",
           method, path);
  return http_raw(family, addr, port, req, strlen(req), 0, out);
}

static int get_status(int port, const char *path) {
  struct http_reply r;
  int status;

  if (http_request(AF_INET, "127.0.0.1", port, "GET", path, &r) != 0)
    return -1;
  status = r.status;
  http_reply_free(&r);
  return status;
}

/* header tells whether the reply head holds the header line `line`. */
static int header(const struct http_reply *r, const char *line) {
  size_t n = strlen(line);
  for (const char *p = r->head; (p = strstr(p, line)) != NULL; p++) {
    if (p > r->head && p[-1] == '\n' && p[n] == '\r')
      return 1;
  }
  return 0;
}

/*
 * listening_socket binds and listens on addr with an ephemeral port and
 * returns the fd, the port in *port.
 */
static int listening_socket(int family, const char *addr, int *port) {
  struct sockaddr_storage ss;
  socklen_t sslen = sizeof ss;
  int fd = socket(family, SOCK_STREAM, 0);

  cr_assert(fd >= 0);
  memset(&ss, 0, sizeof ss);
  ss.ss_family = (sa_family_t)family;
  if (family == AF_INET)
    inet_pton(AF_INET, addr, &((struct sockaddr_in *)&ss)->sin_addr);
  else
    inet_pton(AF_INET6, addr, &((struct sockaddr_in6 *)&ss)->sin6_addr);
  if (bind(fd, (struct sockaddr *)&ss,
           family == AF_INET ? sizeof(struct sockaddr_in)
                             : sizeof(struct sockaddr_in6)) != 0 ||
      listen(fd, 4) != 0) {
    close(fd);
    return -1;
  }
  cr_assert(eq(int, getsockname(fd, (struct sockaddr *)&ss, &sslen), 0));
  *port = family == AF_INET ? ntohs(((struct sockaddr_in *)&ss)->sin_port)
                            : ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
  return fd;
}

/*
 * start_on_free_port starts the server on a port the kernel just called
 * free. Another process may take it between our probe and the server's bind,
 * so a port in use is retried a few times.
 */
static int start_on_free_port(int family, const char *addr) {
  char err[256];

  for (int i = 0; i < 20; i++) {
    int port, fd = listening_socket(family, addr, &port);
    if (fd < 0)
      return -1;
    close(fd);
    if (pgr_http_start(addr, port, err, sizeof err) == 0)
      return port;
    cr_log_info("start on %s:%d failed: %s; retrying", addr, port, err);
  }
  cr_assert(0, "no free port found");
  return -1;
}

/* ---- rendering ---------------------------------------------------------- */

Test(metrics, empty_counters_render_valid_text) {
  char *t = pgr_metrics_render();

  check_exposition(t);
  cr_expect(has_line(t, "# TYPE pgrunner_tasks_started_total counter"));
  cr_expect(has_line(t, "# TYPE pgrunner_task_duration_seconds histogram"));
  cr_expect(has_line(t, "pgrunner_tasks_running 0"));
  cr_expect(has_line(t, "pgrunner_db_up 0"),
            "the database counts as down until set_db_up(1)");
  cr_expect(has_line(t, "pgrunner_log_records_dropped_total 0"));
  cr_expect(has_line(t, "pgrunner_build_info{version=\"" PGR_VERSION "\"} 1"));
  free(t);
}

Test(metrics, counters_count_each_outcome_under_its_labels) {
  char *t;

  for (int i = 0; i < 7; i++)
    pgr_metrics_task_started("default", "echo");
  pgr_metrics_task_started("mail", "email");
  pgr_metrics_task_done("default", "echo", PGR_DONE_SUCCEEDED, 0.002);
  pgr_metrics_task_done("default", "echo", PGR_DONE_SUCCEEDED, 0.3);
  pgr_metrics_task_done("default", "echo", PGR_DONE_FAILED, 2.0);
  pgr_metrics_task_done("default", "echo", PGR_DONE_RETRY, 0.0005);
  pgr_metrics_task_done("default", "echo", PGR_DONE_CANCELLED, 100.0);
  pgr_metrics_task_done("default", "echo", PGR_DONE_REQUEUED, 1.0);
  pgr_metrics_task_done("default", "echo", PGR_DONE_LOST, 5.0);
  pgr_metrics_set_running(3);
  pgr_metrics_set_db_up(1);

  t = pgr_metrics_render();
  check_exposition(t);
  cr_expect(has_line(
      t, "pgrunner_tasks_started_total{queue=\"default\",kind=\"echo\"} 7"));
  cr_expect(has_line(
      t, "pgrunner_tasks_started_total{queue=\"mail\",kind=\"email\"} 1"));
  cr_expect(has_line(
      t, "pgrunner_tasks_succeeded_total{queue=\"default\",kind=\"echo\"} 2"));
  cr_expect(has_line(
      t, "pgrunner_tasks_failed_total{queue=\"default\",kind=\"echo\"} 1"));
  cr_expect(has_line(
      t, "pgrunner_tasks_retried_total{queue=\"default\",kind=\"echo\"} 1"));
  cr_expect(has_line(
      t, "pgrunner_tasks_cancelled_total{queue=\"default\",kind=\"echo\"} 1"));
  cr_expect(has_line(
      t, "pgrunner_tasks_requeued_total{queue=\"default\",kind=\"echo\"} 1"));
  cr_expect(has_line(
      t, "pgrunner_tasks_lost_total{queue=\"default\",kind=\"echo\"} 1"));
  cr_expect(has_line(
      t, "pgrunner_tasks_succeeded_total{queue=\"mail\",kind=\"email\"} 0"));

  /* Six attempts observed (the lost one is not): 0.0005 0.002 0.3 1 2 100. */
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"0.001\"} 1"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"0.005\"} 2"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"0.25\"} 2"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"0.5\"} 3"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"1\"} 4"),
            "a bucket's bound is inclusive (le)");
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"2.5\"} 5"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"60\"} 5"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"default"
                        "\",kind=\"echo\",le=\"+Inf\"} 6"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_count{queue=\"default"
                        "\",kind=\"echo\"} 6"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_sum{queue=\"default\","
                        "kind=\"echo\"} 103.302500"));
  cr_expect(eq(int,
               count_prefix(t, "pgrunner_task_duration_seconds_bucket{queue="
                               "\"default\",kind=\"echo\","),
               15),
            "14 finite buckets and +Inf");
  cr_expect(has_line(t, "pgrunner_tasks_running 3"));
  cr_expect(has_line(t, "pgrunner_db_up 1"));
  free(t);
}

Test(metrics, odd_inputs_do_not_break_the_text) {
  char *t;

  pgr_metrics_task_started(NULL, NULL);
  pgr_metrics_task_done("q", "k", PGR_DONE_SUCCEEDED, -1.0);
  pgr_metrics_task_done("q", "k", PGR_DONE_SUCCEEDED, NAN);
  pgr_metrics_task_done("q", "k", (enum pgr_done)99, 1.0);
  t = pgr_metrics_render();
  check_exposition(t);
  cr_expect(has_line(t, "pgrunner_tasks_started_total{queue=\"\",kind=\"\"} "
                        "1"));
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_bucket{queue=\"q\","
                        "kind=\"k\",le=\"0.001\"} 2"),
            "negative and NaN durations count as zero");
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_sum{queue=\"q\","
                        "kind=\"k\"} 0.000000"));
  free(t);
}

Test(metrics, label_values_are_escaped) {
  char *t;

  pgr_metrics_task_started("q\"1", "a\\b\"c\nd");
  t = pgr_metrics_render();
  check_exposition(t);
  cr_expect(has_line(t, "pgrunner_tasks_started_total{queue=\"q\\\"1\","
                        "kind=\"a\\\\b\\\"c\\nd\"} 1"),
            "got:\n%s", t);
  free(t);
}

Test(metrics, distinct_label_pairs_are_capped) {
  char kind[32], queue[32], *t;

  /* 1500 kinds on one queue: the first 1000 count as themselves. */
  for (int i = 0; i < 1500; i++) {
    snprintf(kind, sizeof kind, "k%d", i);
    pgr_metrics_task_started("default", kind);
    pgr_metrics_task_done("default", kind, PGR_DONE_SUCCEEDED, 0.01);
  }
  /* Then 500 random queues: 64 get a kind="other" series of their own. */
  for (int i = 0; i < 500; i++) {
    snprintf(queue, sizeof queue, "q%d", i);
    pgr_metrics_task_started(queue, "x");
  }
  t = pgr_metrics_render();
  check_exposition(t);
  cr_expect(has_line(
      t, "pgrunner_tasks_started_total{queue=\"default\",kind=\"k999\"} 1"));
  cr_expect(not(has_line(
      t, "pgrunner_tasks_started_total{queue=\"default\",kind=\"k1000\"} 1")));
  cr_expect(
      has_line(
          t,
          "pgrunner_tasks_started_total{queue=\"default\",kind=\"other\"} 500"),
      "kinds past the cap should fold into kind=\"other\"");
  cr_expect(has_line(t, "pgrunner_task_duration_seconds_count{queue=\""
                        "default\",kind=\"other\"} 500"));
  cr_expect(has_line(
      t, "pgrunner_tasks_started_total{queue=\"q0\",kind=\"other\"} 1"));
  cr_expect(
      has_line(
          t,
          "pgrunner_tasks_started_total{queue=\"other\",kind=\"other\"} 437"),
      "past the second cap everything folds into one series");
  cr_expect(le(int, count_prefix(t, "pgrunner_tasks_started_total{"), 1065),
            "the number of series is bounded");
  free(t);
}

struct hammer {
  int n;
};

static void *hammer_main(void *arg) {
  struct hammer *h = arg;
  char kind[32];

  for (int i = 0; i < h->n; i++) {
    snprintf(kind, sizeof kind, "k%d", i % 50);
    pgr_metrics_task_started("default", kind);
    pgr_metrics_task_done("default", kind, PGR_DONE_SUCCEEDED, 0.001);
  }
  return NULL;
}

Test(metrics, rendering_while_counting_sees_consistent_totals) {
  struct hammer h = {.n = 20000};
  pthread_t th;
  char *t;

  cr_assert(eq(int, pthread_create(&th, NULL, hammer_main, &h), 0));
  for (int i = 0; i < 50; i++) {
    t = pgr_metrics_render();
    check_exposition(t);
    free(t);
  }
  cr_assert(eq(int, pthread_join(th, NULL), 0));
  t = pgr_metrics_render();
  cr_expect(has_line(
      t, "pgrunner_tasks_started_total{queue=\"default\",kind=\"k7\"} 400"));
  free(t);
}

/* ---- HTTP --------------------------------------------------------------- */

Test(metrics, http_serves_healthz_and_metrics) {
  struct http_reply r;
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  pgr_metrics_task_started("default", "echo");

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r), 0));
  cr_expect(eq(int, r.status, 503), "healthz before the database is up");
  cr_expect(eq(str, r.body, "database connection down: not connected yet\n"),
            "one line saying why");
  cr_expect(header(&r, "Connection: close"), "head: %s", r.head);
  cr_expect(header(&r, "Content-Length: 44"), "head: %s", r.head);
  http_reply_free(&r);

  pgr_metrics_set_db_up(1);
  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r), 0));
  cr_expect(eq(int, r.status, 200), "healthz once the database is up");
  cr_expect(eq(str, r.body, "ok\n"));
  cr_expect(header(&r, "Content-Type: text/plain; charset=utf-8"), "head: %s",
            r.head);
  http_reply_free(&r);

  pgr_metrics_set_db_up(0);
  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r), 0));
  cr_expect(eq(int, r.status, 503), "healthz after the connection drops");
  http_reply_free(&r);

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/metrics", &r), 0));
  cr_expect(eq(int, r.status, 200));
  cr_expect(header(&r, "Content-Type: text/plain; version=0.0.4; "
                       "charset=utf-8"),
            "head: %s", r.head);
  cr_expect(has_line(
      r.body,
      "pgrunner_tasks_started_total{queue=\"default\",kind=\"echo\"} 1"));
  check_exposition(r.body);
  {
    char want[64];
    snprintf(want, sizeof want, "Content-Length: %zu", strlen(r.body));
    cr_expect(header(&r, want), "want %s in: %s", want, r.head);
  }
  http_reply_free(&r);

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/nothing", &r), 0));
  cr_expect(eq(int, r.status, 404));
  http_reply_free(&r);

  cr_assert(eq(int,
               http_request(AF_INET, "127.0.0.1", port, "POST", "/metrics", &r),
               0));
  cr_expect(eq(int, r.status, 405));
  cr_expect(header(&r, "Allow: GET, HEAD"), "head: %s", r.head);
  http_reply_free(&r);

  pgr_http_stop();
  cr_expect(
      not(eq(int,
             http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r),
             0)),
      "nothing should listen after stop");
  pgr_http_stop(); /* a second stop is harmless */
}

Test(metrics, head_sends_headers_without_a_body) {
  struct http_reply r;
  int port = start_on_free_port(AF_INET, "127.0.0.1");
  char *t = pgr_metrics_render(), want[64];

  snprintf(want, sizeof want, "Content-Length: %zu", strlen(t));
  free(t);
  cr_assert(eq(int,
               http_request(AF_INET, "127.0.0.1", port, "HEAD", "/metrics", &r),
               0));
  cr_expect(eq(int, r.status, 200));
  cr_expect(eq(str, r.body, ""), "HEAD must not send a body");
  cr_expect(header(&r, want), "want %s in: %s", want, r.head);
  http_reply_free(&r);

  cr_assert(eq(int,
               http_request(AF_INET, "127.0.0.1", port, "HEAD", "/healthz", &r),
               0));
  cr_expect(eq(int, r.status, 503));
  cr_expect(eq(str, r.body, ""));
  cr_expect(header(&r, "Content-Length: 44"), "head: %s", r.head);
  http_reply_free(&r);

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "HEAD", "/nope", &r), 0));
  cr_expect(eq(int, r.status, 404));
  cr_expect(eq(str, r.body, ""));
  http_reply_free(&r);
  pgr_http_stop();
}

Test(metrics, request_forms_the_server_accepts) {
  static const char *const reqs[] = {
      /* HTTP/1.0, no headers at all */
      "GET /healthz HTTP/1.0\r\n\r\n",
      /* bare LF line ends */
      "GET /healthz HTTP/1.1\nHost: x\n\n",
      /* an empty line before the request line */
      "\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
      /* a query string */
      "GET /healthz?verbose=1 HTTP/1.1\r\nHost: x\r\n\r\n",
      /* absolute form */
      "GET http://example.com:9187/healthz HTTP/1.1\r\nHost: x\r\n\r\n",
  };
  struct http_reply r;
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  pgr_metrics_set_db_up(1);
  for (size_t i = 0; i < PGR_ARRAY_LEN(reqs); i++) {
    cr_assert(eq(int,
                 http_raw(AF_INET, "127.0.0.1", port, reqs[i], strlen(reqs[i]),
                          0, &r),
                 0),
              "request %zu got no reply", i);
    cr_expect(eq(int, r.status, 200), "request %zu", i);
    cr_expect(eq(str, r.body, "ok\n"), "request %zu", i);
    http_reply_free(&r);
  }
  /* A request followed by a half-close still gets its reply. */
  cr_assert(
      eq(int,
         http_raw(AF_INET, "127.0.0.1", port, reqs[0], strlen(reqs[0]), 1, &r),
         0));
  cr_expect(eq(int, r.status, 200));
  http_reply_free(&r);
  pgr_http_stop();
}

/*
 * libmicrohttpd parses requests; these pin down what it answers to garbage,
 * so an upgrade that changes it is noticed. status 0: the server may just
 * close. It is lenient where a 400 would gain nothing (extra blanks between
 * the request line's parts pass), so those forms are not listed.
 */
Test(metrics, garbage_gets_an_error_and_the_server_carries_on) {
  static const struct {
    const char *req;
    int status;
  } cases[] = {
      {"\x01\x02\xff garbage\r\n\r\n", 400},
      {"GET\r\n\r\n", 0},
      {"GET /metrics\r\n\r\n", 400}, /* HTTP/0.9 */
      {"GET /met rics HTTP/1.1\r\n\r\n", 404},
      {"GET /metrics HTTP/1.1x\r\n\r\n", 400},
      {"GET /metrics FTP/1.1\r\n\r\n", 400},
      {"G(T /metrics HTTP/1.1\r\n\r\n", 405},
      {"GET /metrics HTTP/2.0\r\n\r\n", 505},
      {"get /metrics HTTP/1.1\r\n\r\n", 405}, /* methods are case-sensitive */
  };
  struct http_reply r;
  char *big;
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  for (size_t i = 0; i < PGR_ARRAY_LEN(cases); i++) {
    int got = http_raw(AF_INET, "127.0.0.1", port, cases[i].req,
                       strlen(cases[i].req), 0, &r);
    if (cases[i].status == 0)
      cr_expect(got != 0 || r.status == 400, "case %zu: %d", i, r.status);
    else
      cr_expect(got == 0 && r.status == cases[i].status, "case %zu: %d (%d)", i,
                r.status, got);
    http_reply_free(&r);
  }
  /* An unfinished request line and a half-close: the server just closes. */
  cr_expect(not(
      eq(int, http_raw(AF_INET, "127.0.0.1", port, "garbage", 7, 1, &r), 0)));
  http_reply_free(&r);

  /* 10 KiB with no line end (414), then 9 KiB of headers (431): both past
   * the cap. The reply arrives whole though the server never read it all. */
  big = pgr_malloc(10240 + 64);
  memset(big, 'A', 10240);
  cr_assert(
      eq(int, http_raw(AF_INET, "127.0.0.1", port, big, 10240, 0, &r), 0));
  cr_expect(eq(int, r.status, 414));
  http_reply_free(&r);
  strcpy(big, "GET /metrics HTTP/1.1\r\nX-Long: ");
  memset(big + strlen(big), 'b', 9216);
  strcpy(big + 32 + 9216, "\r\n\r\n");
  cr_assert(eq(
      int, http_raw(AF_INET, "127.0.0.1", port, big, strlen(big), 0, &r), 0));
  cr_expect(eq(int, r.status, 431));
  http_reply_free(&r);

  /* Random bytes, with and without a half-close: whatever the reply, the
   * server must live on. */
  srand(42);
  for (int i = 0; i < 50; i++) {
    size_t n = 1 + (size_t)rand() % 10000;
    for (size_t k = 0; k < n; k++)
      big[k] = (char)rand();
    (void)http_raw(AF_INET, "127.0.0.1", port, big, n, i % 2, &r);
    http_reply_free(&r);
  }
  free(big);
  cr_expect(eq(int, get_status(port, "/healthz"), 503),
            "the server should still answer");
  pgr_http_stop();
}

Test(metrics, unread_input_does_not_cut_the_reply_short) {
  char req[8192], kind[32], want[64];
  struct http_reply r;
  struct pgr_buf b;
  int port = start_on_free_port(AF_INET, "127.0.0.1"), n, fd, rcvbuf = 4096;

  /* The body is never read: the reply must not be lost to a reset. */
  n = snprintf(req, sizeof req,
               "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 6000\r\n"
               "\r\n");
  memset(req + n, 'x', 6000);
  cr_assert(eq(
      int, http_raw(AF_INET, "127.0.0.1", port, req, (size_t)n + 6000, 0, &r),
      0));
  cr_expect(eq(int, r.status, 405));
  http_reply_free(&r);

  /*
   * Now a reply of a few MiB to a client with a small receive buffer that
   * reads late: most of the reply still sits in the server's send buffer
   * when the server is done writing, and must all arrive. (A client that
   * also sends more after its request may lose the tail to a reset:
   * libmicrohttpd closes without draining input, unlike the server of our
   * own it replaced; no scraper pipelines.)
   */
  for (int i = 0; i < 1000; i++) {
    snprintf(kind, sizeof kind, "kind_%d", i);
    pgr_metrics_task_done("default", kind, PGR_DONE_SUCCEEDED, 0.1);
  }
  n = snprintf(req, sizeof req, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
  fd = connect_to(AF_INET, "127.0.0.1", port);
  cr_assert(fd >= 0);
  setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  cr_assert(eq(int, send_all(fd, req, (size_t)n), 0));
  usleep(300000); /* let the server finish writing (not an assertion) */
  pgr_buf_init(&b);
  cr_expect(eq(int, read_to_eof(fd, &b), 0),
            "the reply should end in a FIN, not a reset");
  close(fd);
  cr_assert(eq(int, parse_reply(b.data, &r), 0));
  cr_expect(eq(int, r.status, 200));
  snprintf(want, sizeof want, "Content-Length: %zu", strlen(r.body));
  cr_expect(header(&r, want), "body of %zu bytes, head: %s", strlen(r.body),
            r.head);
  cr_expect(gt(sz, strlen(r.body), (size_t)1000000));
  http_reply_free(&r);
  pgr_buf_free(&b);
  pgr_http_stop();
}

Test(metrics, clients_that_vanish_do_no_harm) {
  static const char full[] = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n";
  char kind[32];
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  /* A /metrics body of a few hundred KiB, so writes are still going on
   * when the client is gone. */
  for (int i = 0; i < 300; i++) {
    snprintf(kind, sizeof kind, "kind_%d", i);
    pgr_metrics_task_started("default", kind);
  }
  for (int i = 0; i < 40; i++) {
    int fd = connect_to(AF_INET, "127.0.0.1", port);
    cr_assert(fd >= 0);
    switch (i % 4) {
    case 0: /* half a request, then a FIN */
      cr_assert(eq(int, send_all(fd, full, 10), 0));
      close(fd);
      break;
    case 1: /* half a request, then a reset */
      cr_assert(eq(int, send_all(fd, full, 20), 0));
      reset_close(fd);
      break;
    case 2: /* a whole request, gone before the reply: a reset */
      cr_assert(eq(int, send_all(fd, full, strlen(full)), 0));
      reset_close(fd);
      break;
    default: /* nothing at all */
      close(fd);
    }
  }
  /* The first bytes of a reply, then a reset. */
  for (int i = 0; i < 10; i++) {
    char buf[100];
    int fd = connect_to(AF_INET, "127.0.0.1", port);
    cr_assert(fd >= 0);
    cr_assert(eq(int, send_all(fd, full, strlen(full)), 0));
    cr_expect(gt(sz, (size_t)recv(fd, buf, sizeof buf, 0), 0));
    reset_close(fd);
  }
  cr_expect(eq(int, get_status(port, "/metrics"), 200),
            "the server should still answer");
  pgr_http_stop();
}

struct client {
  int port;
  int ok;
};

static void *client_main(void *arg) {
  struct client *c = arg;

  for (int i = 0; i < 25; i++)
    if (get_status(c->port, i % 2 ? "/metrics" : "/healthz") ==
        (i % 2 ? 200 : 503))
      c->ok++;
  return NULL;
}

Test(metrics, parallel_requests_are_all_answered) {
  struct client clients[16];
  pthread_t th[16];
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  for (int i = 0; i < 16; i++) {
    clients[i] = (struct client){.port = port};
    cr_assert(
        eq(int, pthread_create(&th[i], NULL, client_main, &clients[i]), 0));
  }
  for (int i = 0; i < 16; i++) {
    cr_assert(eq(int, pthread_join(th[i], NULL), 0));
    cr_expect(eq(int, clients[i].ok, 25), "client %d", i);
  }
  pgr_http_stop();
}

Test(metrics, connections_past_the_cap_wait) {
  int idle[64], fd, status = -1;
  char c;
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  /* 64 connections that say nothing hold every slot... */
  for (int i = 0; i < 64; i++) {
    idle[i] = connect_to(AF_INET, "127.0.0.1", port);
    cr_assert(idle[i] >= 0);
  }
  /* ...so the 65th waits in the kernel's backlog, unserved... */
  fd = connect_to(AF_INET, "127.0.0.1", port);
  cr_assert(fd >= 0);
  (void)send_all(fd, "GET /healthz HTTP/1.0\r\n\r\n", 25);
  struct timeval tv = {.tv_sec = 1};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  cr_expect(lt(int, (int)recv(fd, &c, 1, 0), 0),
            "a connection past the cap should not be served yet");
  /* ...and once they go, it is answered. */
  for (int i = 0; i < 64; i++)
    close(idle[i]);
  tv.tv_sec = 30;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  status = (int)recv(fd, &c, 1, 0);
  cr_expect(eq(int, status, 1), "the waiting connection should be served");
  close(fd);
  cr_expect(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
}

Test(metrics, a_silent_client_is_cut_off) {
  char c;
  int port = start_on_free_port(AF_INET, "127.0.0.1");
  int fd = connect_to(AF_INET, "127.0.0.1", port);

  cr_assert(fd >= 0);
  cr_assert(eq(int, send_all(fd, "GET /metrics HTTP/1.1\r\n", 23), 0));
  /* The server's deadline (10 s) is well inside our 30 s receive limit. */
  errno = 0;
  cr_expect(eq(int, (int)recv(fd, &c, 1, 0), 0),
            "the server should close an idle connection (errno %d)", errno);
  close(fd);
  pgr_http_stop();
}

Test(metrics, stop_closes_open_connections) {
  int fds[8];
  char c;
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  for (int i = 0; i < 8; i++) {
    fds[i] = connect_to(AF_INET, "127.0.0.1", port);
    cr_assert(fds[i] >= 0);
    cr_assert(eq(int, send_all(fds[i], "GET /metrics HTTP/1.1\r\n", 23), 0));
  }
  /* Make sure the server has taken them all before stopping it. */
  cr_assert(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
  for (int i = 0; i < 8; i++) {
    cr_expect(le(int, (int)recv(fds[i], &c, 1, 0), 0),
              "stop should close connection %d", i);
    close(fds[i]);
  }
}

Test(metrics, a_second_start_is_refused) {
  char err[256] = "";
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  cr_expect(eq(int, pgr_http_start("127.0.0.1", port + 1, err, sizeof err),
               PGR_EINVAL));
  cr_expect(not(eq(ptr, strstr(err, "already running"), NULL)), "%s", err);
  cr_expect(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
}

Test(metrics, http_serves_ipv6_loopback) {
  struct http_reply r;
  int probe_port, fd = listening_socket(AF_INET6, "::1", &probe_port);
  int port;

  if (fd < 0)
    cr_skip_test("no IPv6 loopback here");
  close(fd);
  port = start_on_free_port(AF_INET6, "::1");
  cr_assert(
      eq(int, http_request(AF_INET6, "::1", port, "GET", "/metrics", &r), 0));
  cr_expect(eq(int, r.status, 200));
  http_reply_free(&r);
  pgr_http_stop();
}

Test(metrics, the_ipv6_wildcard_serves_ipv4_too) {
  struct http_reply r;
  int probe_port, fd = listening_socket(AF_INET6, "::1", &probe_port);
  int port;

  if (fd < 0)
    cr_skip_test("no IPv6 loopback here");
  close(fd);
  port = start_on_free_port(AF_INET6, "::");
  cr_assert(
      eq(int, http_request(AF_INET6, "::1", port, "GET", "/metrics", &r), 0));
  cr_expect(eq(int, r.status, 200));
  http_reply_free(&r);
  cr_expect(eq(int, get_status(port, "/metrics"), 200),
            "\"::\" should accept IPv4 connections as well");
  pgr_http_stop();
}

Test(metrics, localhost_means_ipv4_loopback) {
  char err[256];
  int port = -1;

  for (int i = 0; i < 20; i++) {
    int fd = listening_socket(AF_INET, "127.0.0.1", &port);
    cr_assert(fd >= 0);
    close(fd);
    if (pgr_http_start("localhost", port, err, sizeof err) == 0)
      break;
    port = -1;
  }
  cr_assert(gt(int, port, 0), "could not start on localhost: %s", err);
  cr_expect(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
}

Test(metrics, restart_on_the_same_port_works) {
  char err[256];
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  cr_assert(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
  cr_expect(eq(int, pgr_http_start("127.0.0.1", port, err, sizeof err), 0),
            "restart failed: %s", err);
  cr_expect(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
}

Test(metrics, a_port_in_use_fails_cleanly) {
  char err[256] = "", want[64];
  int port, fd = listening_socket(AF_INET, "127.0.0.1", &port);

  cr_assert(fd >= 0);
  cr_expect(lt(int, pgr_http_start("127.0.0.1", port, err, sizeof err), 0));
  snprintf(want, sizeof want, "127.0.0.1:%d", port);
  cr_expect(not(eq(ptr, strstr(err, want), NULL)), "message: %s", err);
  cr_expect(not(eq(ptr, strstr(err, "in use"), NULL)), "message: %s", err);
  cr_log_info("port in use: %s", err);
  pgr_http_stop(); /* nothing started: harmless */

  /* The failure left nothing behind: once the port is free, start works. */
  close(fd);
  cr_expect(eq(int, pgr_http_start("127.0.0.1", port, err, sizeof err), 0),
            "start after the port was freed failed: %s", err);
  cr_expect(eq(int, get_status(port, "/healthz"), 503));
  pgr_http_stop();
}

Test(metrics, a_bad_address_fails_cleanly) {
  char err[256] = "";

  cr_expect(lt(int, pgr_http_start("not-an-ip", 9999, err, sizeof err), 0));
  cr_expect(not(eq(ptr, strstr(err, "not-an-ip"), NULL)), "message: %s", err);
  cr_expect(lt(int, pgr_http_start("127.0.0.1", 0, err, sizeof err), 0));
  cr_expect(lt(int, pgr_http_start("127.0.0.1", 70000, err, sizeof err), 0));
}
