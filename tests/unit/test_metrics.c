/*
 * test_metrics.c - the counters and their Prometheus text (metrics.c), and
 * the real HTTP server on a loopback port, spoken to over a plain socket.
 *
 * Thread: Criterion runs each test in its own process, so every test starts
 * with zeroed counters and no server; the HTTP tests talk to
 * libmicrohttpd's thread from the test's thread.
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
}

/*
 * http_request sends one request to family/addr:port over a plain socket
 * and reads the reply to EOF (the request asks to close). A receive time
 * limit only keeps a broken server from hanging the test.
 */
static int http_request(int family, const char *addr, int port,
                        const char *method, const char *path,
                        struct http_reply *out) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  struct timeval tv = {.tv_sec = 30};
  char req[512];
  struct pgr_buf b;
  char chunk[4096];
  ssize_t n;
  char *sep;
  int fd, rc = -1;

  memset(&ss, 0, sizeof ss);
  memset(out, 0, sizeof *out);
  if (family == AF_INET) {
    struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    cr_assert(eq(int, inet_pton(AF_INET, addr, &sin->sin_addr), 1));
    sslen = sizeof *sin;
  } else {
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    cr_assert(eq(int, inet_pton(AF_INET6, addr, &sin6->sin6_addr), 1));
    sslen = sizeof *sin6;
  }
  fd = socket(family, SOCK_STREAM, 0);
  cr_assert(fd >= 0);
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  if (connect(fd, (struct sockaddr *)&ss, sslen) != 0) {
    close(fd);
    return -1;
  }
  snprintf(req, sizeof req,
           "%s %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
           "Content-Length: 0\r\n\r\n",
           method, path);
  cr_assert(
      eq(sz, (size_t)send(fd, req, strlen(req), MSG_NOSIGNAL), strlen(req)));
  pgr_buf_init(&b);
  while ((n = recv(fd, chunk, sizeof chunk, 0)) > 0)
    pgr_buf_add(&b, chunk, (size_t)n);
  close(fd);
  if (n < 0 || sscanf(b.data, "HTTP/1.%*d %d", &out->status) != 1)
    goto out;
  sep = strstr(b.data, "\r\n\r\n");
  if (sep == NULL)
    goto out;
  out->head = pgr_strndup(b.data, (size_t)(sep - b.data) + 2);
  out->body = pgr_strdup(sep + 4);
  rc = 0;
out:
  pgr_buf_free(&b);
  return rc;
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
    if (pgr_metrics_start(addr, port, err, sizeof err) == 0)
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
  cr_expect(eq(str, r.body, "database connection down\n"));
  http_reply_free(&r);

  pgr_metrics_set_db_up(1);
  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r), 0));
  cr_expect(eq(int, r.status, 200), "healthz once the database is up");
  cr_expect(eq(str, r.body, "ok\n"));
  http_reply_free(&r);

  pgr_metrics_set_db_up(0);
  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r), 0));
  cr_expect(eq(int, r.status, 503), "healthz after the connection drops");
  http_reply_free(&r);

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/metrics", &r), 0));
  cr_expect(eq(int, r.status, 200));
  cr_expect(not(eq(ptr, strstr(r.head, "text/plain; version=0.0.4"), NULL)),
            "content type: %s", r.head);
  cr_expect(has_line(
      r.body,
      "pgrunner_tasks_started_total{queue=\"default\",kind=\"echo\"} 1"));
  check_exposition(r.body);
  http_reply_free(&r);

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/nothing", &r), 0));
  cr_expect(eq(int, r.status, 404));
  http_reply_free(&r);

  cr_assert(eq(int,
               http_request(AF_INET, "127.0.0.1", port, "POST", "/metrics", &r),
               0));
  cr_expect(eq(int, r.status, 405));
  cr_expect(not(eq(ptr, strstr(r.head, "Allow: GET"), NULL)));
  http_reply_free(&r);

  pgr_metrics_stop();
  cr_expect(
      not(eq(int,
             http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r),
             0)),
      "nothing should listen after stop");
  pgr_metrics_stop(); /* a second stop is harmless */
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
  pgr_metrics_stop();
}

Test(metrics, restart_on_the_same_port_works) {
  char err[256];
  struct http_reply r;
  int port = start_on_free_port(AF_INET, "127.0.0.1");

  cr_assert(eq(
      int, http_request(AF_INET, "127.0.0.1", port, "GET", "/healthz", &r), 0));
  http_reply_free(&r);
  pgr_metrics_stop();
  cr_expect(eq(int, pgr_metrics_start("127.0.0.1", port, err, sizeof err), 0),
            "restart failed: %s", err);
  pgr_metrics_stop();
}

Test(metrics, a_port_in_use_fails_cleanly) {
  char err[256] = "", want[64];
  int port, fd = listening_socket(AF_INET, "127.0.0.1", &port);

  cr_assert(fd >= 0);
  cr_expect(lt(int, pgr_metrics_start("127.0.0.1", port, err, sizeof err), 0));
  snprintf(want, sizeof want, "127.0.0.1:%d", port);
  cr_expect(not(eq(ptr, strstr(err, want), NULL)), "message: %s", err);
  cr_expect(not(eq(ptr, strstr(err, "in use"), NULL)), "message: %s", err);
  cr_log_info("port in use: %s", err);
  pgr_metrics_stop(); /* nothing started: harmless */

  /* The failure left nothing behind: once the port is free, start works. */
  close(fd);
  cr_expect(eq(int, pgr_metrics_start("127.0.0.1", port, err, sizeof err), 0),
            "start after the port was freed failed: %s", err);
  pgr_metrics_stop();
}

Test(metrics, a_bad_address_fails_cleanly) {
  char err[256] = "";

  cr_expect(lt(int, pgr_metrics_start("not-an-ip", 9999, err, sizeof err), 0));
  cr_expect(not(eq(ptr, strstr(err, "not-an-ip"), NULL)), "message: %s", err);
  cr_expect(lt(int, pgr_metrics_start("127.0.0.1", 0, err, sizeof err), 0));
  cr_expect(lt(int, pgr_metrics_start("127.0.0.1", 70000, err, sizeof err), 0));
}
