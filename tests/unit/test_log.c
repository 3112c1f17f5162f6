/*
 * test_log.c - the logger: formatting and escaping (logfmt.c), and the
 * asynchronous logger with its file and socket (log.c), over real files and
 * real unix sockets.
 *
 * Thread: Criterion runs each test in its own process, so every test starts
 * with a fresh logger; some tests start threads or fork a second process
 * (a worker serving the log socket) themselves.
 */
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <jansson.h>

#include "log.h"
#include "logfmt.h"

/* ---- helpers ------------------------------------------------------------ */

static char *value_of(const char *s, size_t n) {
  struct pgr_buf b;
  pgr_buf_init(&b);
  pgr_logfmt_value(&b, s, n);
  return b.data;
}

static char *record_of(enum pgr_log_format fmt,
                       const struct pgr_logfmt_rec *r) {
  struct pgr_buf b;
  pgr_buf_init(&b);
  pgr_logfmt_record(&b, fmt, r);
  return b.data;
}

static int64_t utc_ms(int y, int mo, int d, int h, int mi, int s, int ms) {
  struct tm tm = {.tm_year = y - 1900,
                  .tm_mon = mo - 1,
                  .tm_mday = d,
                  .tm_hour = h,
                  .tm_min = mi,
                  .tm_sec = s};
  return (int64_t)timegm(&tm) * 1000 + ms;
}

static size_t count_char(const char *s, char c) {
  size_t n = 0;
  for (; *s; s++)
    n += *s == c;
  return n;
}

/* memmem with explicit lengths: strstr() in a loop is quadratic under ASan,
 * whose interceptor measures the whole haystack on every call. */
static size_t count_str(const char *s, const char *needle) {
  size_t n = 0, len = strlen(s), nlen = strlen(needle);
  const char *end = s + len;
  for (const char *p = s; (p = memmem(p, (size_t)(end - p), needle, nlen)); p++)
    n++;
  return n;
}

static char *slurp(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return pgr_strdup("");
  struct pgr_buf b;
  pgr_buf_init(&b);
  char tmp[65536];
  size_t n;
  while ((n = fread(tmp, 1, sizeof(tmp), f)) > 0)
    pgr_buf_add(&b, tmp, n);
  fclose(f);
  return b.data;
}

static char *make_dir(void) {
  char tmpl[] = "/tmp/pgr-test-log-XXXXXX";
  cr_assert(ne(ptr, mkdtemp(tmpl), NULL), "a temporary directory");
  return pgr_strdup(tmpl);
}

static int rm_entry(const char *p, const struct stat *st, int type,
                    struct FTW *ftw) {
  (void)st;
  (void)type;
  (void)ftw;
  return remove(p);
}

static void remove_dir(char *dir) {
  nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
  free(dir);
}

static char *path_in(const char *dir, const char *name) {
  return pgr_asprintf("%s/%s", dir, name);
}

/* Waits (up to a minute: a guard, not a timing assertion) for a file to
 * contain needle. */
static int wait_for_text(const char *path, const char *needle) {
  for (int i = 0; i < 6000; i++) {
    char *s = slurp(path);
    int found = strstr(s, needle) != NULL;
    free(s);
    if (found)
      return 1;
    usleep(10000);
  }
  return 0;
}

static int connect_to(const char *path) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  cr_assert(ge(int, fd, 0));
  if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

static int bind_at(const char *path) {
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
  int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  cr_assert(ge(int, fd, 0));
  cr_assert(eq(int, bind(fd, (struct sockaddr *)&sa, sizeof(sa)), 0),
            "bind %s: %s", path, strerror(errno));
  return fd;
}

static void send_all(int fd, const char *p, size_t n) {
  while (n > 0) {
    ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    cr_assert(gt(sz, (size_t)(w > 0 ? w : 0), 0), "send: %s", strerror(errno));
    p += w;
    n -= (size_t)w;
  }
}

/* Half-closes and waits for the worker to close its end: by then it has
 * written (or rejected) every line we sent. */
static void finish_and_wait(int fd) {
  char buf[64];
  shutdown(fd, SHUT_WR);
  while (recv(fd, buf, sizeof(buf), 0) > 0)
    ;
  close(fd);
}

static char *wire_line(const char *msg, int64_t task) {
  const struct pgr_log_field f[] = {PGR_LI("task", task),
                                    PGR_LS("kind", "email")};
  struct pgr_logfmt_rec r = {.ts_ms = utc_ms(2026, 11, 24, 21, 45, 44, 123),
                             .level = PGR_LEVEL_INFO,
                             .proc = "add",
                             .pid = 77,
                             .msg = msg,
                             .fields = f,
                             .nfields = 2};
  struct pgr_buf b;
  pgr_buf_init(&b);
  pgr_logfmt_wire(&b, &r);
  return b.data;
}

/* Redirects fd 2 to a file for the rest of the test; returns its path. */
static char *capture_stderr(const char *dir) {
  char *p = path_in(dir, "stderr.txt");
  int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND, 0600);
  cr_assert(ge(int, fd, 0));
  cr_assert(eq(int, dup2(fd, STDERR_FILENO), STDERR_FILENO));
  close(fd);
  return p;
}

static struct pgr_log_options opts_for(const char *dir, int serve,
                                       enum pgr_log_format fmt) {
  struct pgr_log_options o = {.proc = serve ? "worker" : "add",
                              .level = PGR_LEVEL_INFO,
                              .format = fmt,
                              .dir = dir,
                              .serve = serve,
                              .quiet_stderr = 1};
  return o;
}

/* ---- formatting --------------------------------------------------------- */

Test(logfmt, bare_values_stay_bare_and_others_are_quoted) {
  struct {
    const char *in;
    const char *out;
  } cases[] = {
      {"abc", "abc"},
      {"default", "default"},
      {"h\xC3\xA9llo", "h\xC3\xA9llo"},
      {"", "\"\""},
      {"a b", "\"a b\""},
      {"a\"b", "\"a\\\"b\""},
      {"a=b", "\"a=b\""},
      {"a\\b", "\"a\\\\b\""},
      {"one\ntwo", "\"one\\ntwo\""},
      {"cr\r", "\"cr\\r\""},
      {"tab\t", "\"tab\\t\""},
      {"bell\x07", "\"bell\\u0007\""},
      {"del\x7f", "\"del\\u007f\""},
      {"bad\xff", "bad\xEF\xBF\xBD"},
      {"over\xC0\xAF", "over\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"surrogate\xED\xA0\x80",
       "surrogate\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD"},
      {"cut\xE2\x82", "cut\xEF\xBF\xBD\xEF\xBF\xBD"},
  };
  for (size_t i = 0; i < PGR_ARRAY_LEN(cases); i++) {
    char *v = value_of(cases[i].in, strlen(cases[i].in));
    cr_expect(eq(str, v, (char *)cases[i].out), "value %zu should escape as %s",
              i, cases[i].out);
    free(v);
  }
  char *nul = value_of("a\0b", 3);
  cr_expect(eq(str, nul, "\"a\\u0000b\""), "an embedded NUL is escaped");
  free(nul);
}

Test(logfmt, text_record_matches_the_contract) {
  const struct pgr_log_field f[] = {
      PGR_LI("task", 42),         PGR_LS("kind", "email"),
      PGR_LS("queue", "default"), PGR_LI("attempt", 1),
      PGR_LI("duration_ms", 12),
  };
  struct pgr_logfmt_rec r = {.ts_ms = utc_ms(2026, 11, 24, 21, 45, 44, 123),
                             .level = PGR_LEVEL_INFO,
                             .proc = "worker",
                             .pid = 4242,
                             .msg = "task succeeded",
                             .fields = f,
                             .nfields = PGR_ARRAY_LEN(f)};
  char *line = record_of(PGR_LOG_TEXT, &r);
  cr_expect(eq(str, line,
               "ts=2026-11-24T21:45:44.123Z level=info proc=worker pid=4242 "
               "msg=\"task succeeded\" task=42 kind=email queue=default "
               "attempt=1 duration_ms=12\n"));
  free(line);

  r.msg = "started";
  r.nfields = 0;
  r.level = PGR_LEVEL_WARN;
  line = record_of(PGR_LOG_TEXT, &r);
  cr_expect(eq(str, line,
               "ts=2026-11-24T21:45:44.123Z level=warn proc=worker pid=4242 "
               "msg=started\n"),
            "a message without spaces is bare, like any logfmt value");
  free(line);
}

Test(logfmt, timestamps_are_utc_milliseconds) {
  char ts[PGR_LOGFMT_TS_SIZE];
  pgr_logfmt_ts(ts, 0);
  cr_expect(eq(str, ts, "1970-01-01T00:00:00.000Z"));
  pgr_logfmt_ts(ts, utc_ms(2000, 2, 29, 23, 59, 59, 999));
  cr_expect(eq(str, ts, "2000-02-29T23:59:59.999Z"));
  pgr_logfmt_ts(ts, utc_ms(2026, 11, 24, 21, 45, 44, 7));
  cr_expect(eq(str, ts, "2026-11-24T21:45:44.007Z"));

  /* Against libc over two centuries, one odd second at a time. */
  for (int64_t s = 0; s < INT64_C(4102444800); s += 86399 * 7 + 13) {
    time_t t = (time_t)s;
    struct tm tm;
    char want[64];
    gmtime_r(&t, &tm);
    strftime(want, sizeof(want), "%Y-%m-%dT%H:%M:%S", &tm);
    strcat(want, ".042Z");
    pgr_logfmt_ts(ts, s * 1000 + 42);
    cr_assert(eq(str, ts, want), "second %" PRId64, s);
  }
}

Test(logfmt, json_record_parses_with_the_same_keys) {
  const struct pgr_log_field f[] = {
      PGR_LI("task", 42),
      PGR_LS("kind", "email"),
      PGR_LS("error", "he said \"no\"\nthen\tleft \x01 \xff"),
      PGR_LD("ratio", 0.25),
      PGR_LD("nan", NAN),
      PGR_LS("nothing", NULL),
      PGR_LI("big", INT64_MIN),
  };
  struct pgr_logfmt_rec r = {.ts_ms = utc_ms(2026, 11, 24, 21, 45, 44, 123),
                             .level = PGR_LEVEL_ERROR,
                             .proc = "worker",
                             .pid = 4242,
                             .msg = "task failed",
                             .fields = f,
                             .nfields = PGR_ARRAY_LEN(f)};
  char *line = record_of(PGR_LOG_JSON, &r);
  cr_expect(eq(sz, count_char(line, '\n'), 1), "one line");
  json_error_t err;
  json_t *o = json_loads(line, 0, &err);
  cr_assert(ne(ptr, o, NULL), "JSON output should parse: %s (%s)", err.text,
            line);
  cr_expect(eq(str, (char *)json_string_value(json_object_get(o, "ts")),
               "2026-11-24T21:45:44.123Z"));
  cr_expect(
      eq(str, (char *)json_string_value(json_object_get(o, "level")), "error"));
  cr_expect(
      eq(str, (char *)json_string_value(json_object_get(o, "proc")), "worker"));
  cr_expect(eq(int, json_is_integer(json_object_get(o, "pid")), 1),
            "pid is a number");
  cr_expect(eq(i64, json_integer_value(json_object_get(o, "pid")), 4242));
  cr_expect(eq(str, (char *)json_string_value(json_object_get(o, "msg")),
               "task failed"));
  cr_expect(eq(int, json_is_integer(json_object_get(o, "task")), 1),
            "task is a number");
  cr_expect(eq(i64, json_integer_value(json_object_get(o, "task")), 42));
  cr_expect(eq(str, (char *)json_string_value(json_object_get(o, "error")),
               "he said \"no\"\nthen\tleft \x01 \xEF\xBF\xBD"));
  cr_expect(eq(dbl, json_real_value(json_object_get(o, "ratio")), 0.25));
  cr_expect(
      eq(str, (char *)json_string_value(json_object_get(o, "nan")), "NaN"));
  cr_expect(eq(int, json_is_null(json_object_get(o, "nothing")), 1));
  cr_expect(eq(i64, json_integer_value(json_object_get(o, "big")), INT64_MIN));
  /* Keys in order: the same order as the text format. */
  const char *want[] = {"ts",   "level", "proc",  "pid", "msg",     "task",
                        "kind", "error", "ratio", "nan", "nothing", "big"};
  size_t i = 0;
  const char *key;
  json_t *val;
  json_object_foreach(o, key, val) {
    (void)val;
    cr_assert(lt(sz, i, PGR_ARRAY_LEN(want)));
    cr_expect(eq(str, (char *)key, (char *)want[i]), "key %zu", i);
    i++;
  }
  json_decref(o);
  free(line);
}

Test(logfmt, a_record_with_newlines_stays_one_line) {
  const struct pgr_log_field f[] = {PGR_LS("detail", "a\nb\r\nc\n"),
                                    PGR_LS("k\ney", "v")};
  struct pgr_logfmt_rec r = {.ts_ms = 1,
                             .level = PGR_LEVEL_WARN,
                             .proc = "wor\nker",
                             .pid = 1,
                             .msg = "first\nsecond\r\nthird",
                             .fields = f,
                             .nfields = PGR_ARRAY_LEN(f)};
  enum pgr_log_format fmts[] = {PGR_LOG_TEXT, PGR_LOG_JSON};
  for (size_t i = 0; i < 2; i++) {
    char *line = record_of(fmts[i], &r);
    cr_expect(eq(sz, count_char(line, '\n'), 1), "format %zu: one newline", i);
    cr_expect(eq(chr, line[strlen(line) - 1], '\n'), "at the end");
    cr_expect(eq(sz, count_char(line, '\r'), 0), "no carriage return");
    free(line);
  }
  char *text = record_of(PGR_LOG_TEXT, &r);
  cr_expect(ne(ptr, strstr(text, " msg=\"first\\nsecond\\r\\nthird\" "), NULL),
            "the message is quoted and escaped: %s", text);
  cr_expect(ne(ptr, strstr(text, " k_ey=v"), NULL),
            "a key is reduced to key characters: %s", text);
  free(text);
}

Test(logfmt, fields_cannot_impersonate_fixed_keys) {
  const struct pgr_log_field f[] = {PGR_LS("msg", "fake"), PGR_LI("pid", 1),
                                    PGR_LS(NULL, "x"), PGR_LS("a b=c", "y")};
  struct pgr_logfmt_rec r = {.ts_ms = 1,
                             .level = PGR_LEVEL_INFO,
                             .proc = "worker",
                             .pid = 9,
                             .msg = "real",
                             .fields = f,
                             .nfields = PGR_ARRAY_LEN(f)};
  char *text = record_of(PGR_LOG_TEXT, &r);
  cr_expect(
      ne(ptr, strstr(text, "msg=real _msg=fake _pid=1 _=x a_b_c=y\n"), NULL),
      "%s", text);
  free(text);
  char *json = record_of(PGR_LOG_JSON, &r);
  json_error_t err;
  json_t *o = json_loads(json, JSON_REJECT_DUPLICATES, &err);
  cr_expect(ne(ptr, o, NULL), "no duplicate keys: %s", json);
  json_decref(o);
  free(json);
}

Test(logfmt, wire_round_trip_gives_the_same_line) {
  const struct pgr_log_field f[] = {
      PGR_LI("task", 42),   PGR_LS("kind", "email"), PGR_LS("q", "a \"b\"\n"),
      PGR_LD("d", 0.1),     PGR_LD("whole", 12.0),   PGR_LD("inf", -INFINITY),
      PGR_LS("null", NULL), PGR_LS("empty", ""),     PGR_LS("msg", "shadow"),
  };
  struct pgr_logfmt_rec r = {.ts_ms = utc_ms(2026, 1, 2, 3, 4, 5, 6),
                             .level = PGR_LEVEL_DEBUG,
                             .proc = "add",
                             .pid = 31337,
                             .msg = "task added",
                             .fields = f,
                             .nfields = PGR_ARRAY_LEN(f)};
  struct pgr_buf wire;
  pgr_buf_init(&wire);
  pgr_logfmt_wire(&wire, &r);
  cr_assert(eq(sz, count_char(wire.data, '\n'), 1));
  enum pgr_log_format fmts[] = {PGR_LOG_TEXT, PGR_LOG_JSON};
  for (size_t i = 0; i < 2; i++) {
    struct pgr_buf out;
    pgr_buf_init(&out);
    cr_assert(
        eq(int, pgr_logfmt_rewire(&out, fmts[i], wire.data, wire.len - 1), 0),
        "a wire line we made is accepted: %s", wire.data);
    char *direct = record_of(fmts[i], &r);
    cr_expect(eq(str, out.data, direct),
              "the server writes what the client would have written");
    free(direct);
    pgr_buf_free(&out);
  }
  pgr_buf_free(&wire);
}

Test(logfmt, rewire_rejects_anything_that_is_not_a_record) {
  char *good = wire_line("ok", 1);
  size_t glen = strlen(good) - 1;
  const char *bad[] = {
      "not json",
      "{}",
      "[1,2]",
      "\"string\"",
      "{\"v\":1}",
      "{\"v\":2,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[]}",
      "{\"v\":1,\"ts\":-1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"fatal\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":\"1\","
      "\"msg\":\"m\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":7,\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":{}}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[[\"k\",{}]]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[[\"\",1]]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[[\"k\",1,2]]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[],\"extra\":1}",
      "{\"v\":1,\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\","
      "\"msg\":\"m\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"nul\\u0000\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"bad \xff utf8\",\"f\":[]}",
      "{\"v\":1,\"ts\":1,\"level\":\"info\",\"proc\":\"a\",\"pid\":1,"
      "\"msg\":\"m\",\"f\":[]} trailing",
  };
  struct pgr_buf out;
  pgr_buf_init(&out);
  pgr_buf_adds(&out, "untouched");
  for (size_t i = 0; i < PGR_ARRAY_LEN(bad); i++) {
    cr_expect(ne(int,
                 pgr_logfmt_rewire(&out, PGR_LOG_TEXT, bad[i], strlen(bad[i])),
                 0),
              "line %zu should be rejected: %s", i, bad[i]);
  }
  /* A good line with a NUL byte in the middle, and one over the limit. */
  char *nul = pgr_strdup(good);
  nul[glen / 2] = '\0';
  cr_expect(ne(int, pgr_logfmt_rewire(&out, PGR_LOG_TEXT, nul, glen), 0));
  size_t big = PGR_LOGFMT_WIRE_MAX + 1;
  char *huge = pgr_malloc(big);
  memset(huge, ' ', big);
  memcpy(huge, good, glen);
  cr_expect(ne(int, pgr_logfmt_rewire(&out, PGR_LOG_TEXT, huge, big), 0),
            "an overlong line is rejected even if it is valid JSON");
  cr_expect(eq(str, out.data, "untouched"), "nothing is written on failure");
  cr_expect(eq(int, pgr_logfmt_rewire(&out, PGR_LOG_TEXT, good, glen), 0));
  free(huge);
  free(nul);
  free(good);
  pgr_buf_free(&out);
}

Test(logfmt, level_names) {
  enum pgr_level l;
  cr_expect(eq(str, (char *)pgr_log_level_name(PGR_LEVEL_WARN), "warn"));
  cr_expect(eq(int, pgr_log_level_parse("debug", &l), 0));
  cr_expect(eq(int, l, PGR_LEVEL_DEBUG));
  cr_expect(ne(int, pgr_log_level_parse("verbose", &l), 0));
}

/* ---- the logger -----------------------------------------------------------
 */

Test(log, records_below_the_level_are_discarded) {
  char *dir = make_dir();
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  o.level = PGR_LEVEL_WARN;
  cr_assert(eq(int, pgr_log_start(&o), 0));
  cr_expect(not(pgr_log_enabled(PGR_LEVEL_INFO)));
  cr_expect(pgr_log_enabled(PGR_LEVEL_WARN));
  int evaluated = 0;
  pgr_debug("d", PGR_LI("n", ++evaluated));
  pgr_info("i", PGR_LI("n", ++evaluated));
  pgr_warn("w", PGR_LI("n", 1));
  pgr_error("e", PGR_LI("n", 2));
  pgr_log_stop();
  cr_expect(eq(int, evaluated, 0), "fields of disabled records are not "
                                   "evaluated");
  char *log = path_in(dir, "pgrunner.log");
  char *s = slurp(log);
  cr_expect(eq(sz, count_char(s, '\n'), 2), "two records: %s", s);
  cr_expect(ne(ptr, strstr(s, "level=warn proc=worker"), NULL));
  cr_expect(ne(ptr, strstr(s, "level=error proc=worker"), NULL));
  cr_expect(eq(ptr, strstr(s, "msg=i"), NULL));
  free(s);
  free(log);
  remove_dir(dir);
}

Test(log, before_start_and_after_stop_records_go_to_stderr_at_once) {
  char *dir = make_dir();
  char *err = capture_stderr(dir);
  pgr_warn("early bird", PGR_LI("n", 1));
  char *s = slurp(err);
  cr_expect(ne(ptr, strstr(s, "level=warn proc=pgrunner"), NULL),
            "written before the call returned: %s", s);
  cr_expect(ne(ptr, strstr(s, "msg=\"early bird\" n=1\n"), NULL), "%s", s);
  free(s);

  struct pgr_log_options o = opts_for(NULL, 0, PGR_LOG_JSON);
  o.quiet_stderr = 0;
  cr_assert(eq(int, pgr_log_start(&o), 0));
  pgr_info("while running");
  pgr_log_stop();
  pgr_info("late", PGR_LI("n", 3));
  s = slurp(err);
  cr_expect(ne(ptr, strstr(s, "\"msg\":\"while running\"}\n"), NULL), "%s", s);
  cr_expect(ne(ptr, strstr(s, "\"proc\":\"add\""), NULL), "%s", s);
  cr_expect(ne(ptr, strstr(s, "\"msg\":\"late\",\"n\":3}\n"), NULL),
            "after stop, in the last format: %s", s);
  free(s);
  free(err);
  remove_dir(dir);
}

struct producer {
  int first, count;
};

static void *produce(void *arg) {
  struct producer *p = arg;
  for (int i = p->first; i < p->first + p->count; i++)
    pgr_info("task succeeded", PGR_LI("task", i), PGR_LS("kind", "email"),
             PGR_LS("queue", "default"), PGR_LI("attempt", 1),
             PGR_LI("duration_ms", 12));
  return NULL;
}

/* Checks that the file holds task=0..n-1 "task succeeded" lines once each. */
static void expect_all_tasks(const char *text, int n, int json) {
  char *seen = pgr_calloc((size_t)n, 1);
  char *copy = pgr_strdup(text);
  const char *task = json ? "\"task\":" : " task=";
  const char *msg =
      json ? "\"msg\":\"task succeeded\"" : "msg=\"task succeeded\"";
  int lines = 0;
  for (char *p = copy; *p;) {
    char *nl = strchr(p, '\n');
    cr_assert(ne(ptr, nl, NULL), "every line is finished");
    *nl = '\0'; /* one line at a time */
    const char *t = strstr(p, task);
    if (t != NULL && strstr(p, msg) != NULL) {
      long id = strtol(t + strlen(task), NULL, 10);
      cr_assert(ge(long, id, 0));
      cr_assert(lt(long, id, (long)n));
      cr_expect(eq(int, seen[id], 0), "task %ld once", id);
      seen[id] = 1;
      lines++;
    }
    p = nl + 1;
  }
  cr_expect(eq(int, lines, n), "all %d task lines are in the file", n);
  free(copy);
  free(seen);
}

Test(log, many_threads_lose_no_line) {
  char *dir = make_dir();
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  pthread_t th[4];
  struct producer p[4];
  for (int i = 0; i < 4; i++) {
    p[i] = (struct producer){.first = i * 5000, .count = 5000};
    cr_assert(eq(int, pthread_create(&th[i], NULL, produce, &p[i]), 0));
  }
  for (int i = 0; i < 4; i++)
    pthread_join(th[i], NULL);
  pgr_log_stop();
  char *log = path_in(dir, "pgrunner.log");
  char *s = slurp(log);
  expect_all_tasks(s, 20000, 0);
  cr_expect(eq(u64, pgr_log_dropped(), 0));
  free(s);
  free(log);
  remove_dir(dir);
}

static void *resume_later(void *arg) {
  usleep(300000);
  kill(*(pid_t *)arg, SIGCONT);
  return NULL;
}

/*
 * A worker in a child process serves the socket (JSON); this process logs
 * as a command would (text). Lines in the file are JSON: they went through
 * the socket, and stop returned only once the worker had written them.
 */
Test(log, socket_round_trip_and_stop_flushes_everything) {
  char *dir = make_dir();
  int ready[2], quit[2];
  cr_assert(eq(int, pipe(ready), 0));
  cr_assert(eq(int, pipe(quit), 0));
  pid_t child = fork();
  cr_assert(ge(int, child, 0));
  if (child == 0) {
    close(ready[0]);
    close(quit[1]);
    struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_JSON);
    char ok = pgr_log_start(&o) == 0 ? 'r' : 'e';
    if (write(ready[1], &ok, 1) != 1 || ok != 'r')
      _exit(1);
    char c;
    while (read(quit[0], &c, 1) > 0)
      ;
    pgr_log_stop();
    _exit(pgr_log_rejected() == 0 ? 0 : 3);
  }
  close(ready[1]);
  close(quit[0]);
  char c = 0;
  cr_assert(eq(int, (int)read(ready[0], &c, 1), 1));
  cr_assert(eq(chr, c, 'r'), "the worker started");

  struct pgr_log_options o = opts_for(dir, 0, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  struct producer p = {.first = 0, .count = 19900};
  produce(&p);
  char *log = path_in(dir, "pgrunner.log");
  cr_assert(wait_for_text(log, "\"task\":19899,"), "the worker keeps up");
  /* The worker is frozen for the last lines and resumed a little later, so
   * they are still unread when stop begins: stop must wait for the worker
   * to write them, not merely hand them to the kernel. */
  cr_assert(eq(int, kill(child, SIGSTOP), 0));
  pthread_t th;
  cr_assert(eq(int, pthread_create(&th, NULL, resume_later, &child), 0));
  p = (struct producer){.first = 19900, .count = 100};
  produce(&p);
  pgr_log_stop();
  char *s = slurp(log); /* before the worker is sure to have resumed */
  pthread_join(th, NULL);

  cr_expect(eq(sz, count_str(s, "\"proc\":\"add\""), 20000), "JSON lines");
  char *pid = pgr_asprintf("\"pid\":%d,", (int)getpid());
  cr_expect(eq(sz, count_str(s, pid), 20000), "with the command's pid");
  expect_all_tasks(s, 20000, 1);
  /* In the order they were logged. */
  const char *prev = s;
  for (int i = 0; i < 20000; i += 997) {
    char needle[64];
    snprintf(needle, sizeof(needle), "\"task\":%d,", i);
    const char *at = strstr(s, needle);
    cr_assert(ne(ptr, (void *)at, NULL));
    cr_expect(ge(ptr, (void *)at, (void *)prev), "task %d in order", i);
    prev = at;
  }
  close(quit[1]);
  int status = 0;
  cr_assert(eq(int, waitpid(child, &status, 0), child));
  cr_expect(eq(int, WIFEXITED(status) && WEXITSTATUS(status) == 0, 1),
            "the worker stopped cleanly and rejected nothing (%d)", status);
  free(pid);
  free(s);
  free(log);
  remove_dir(dir);
}

Test(log, without_a_worker_commands_append_to_the_file) {
  char *dir = make_dir();
  char *sock = path_in(dir, "pgrunner.sock");
  int stale = bind_at(sock); /* bound, never listening: refuses */
  struct pgr_log_options o = opts_for(dir, 0, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  struct producer p = {.first = 0, .count = 1000};
  produce(&p);
  pgr_log_stop();
  char *log = path_in(dir, "pgrunner.log");
  char *s = slurp(log);
  expect_all_tasks(s, 1000, 0);
  cr_expect(ne(ptr, strstr(s, "proc=add"), NULL));
  close(stale);
  free(s);
  free(log);
  free(sock);
  remove_dir(dir);
}

Test(log, garbage_on_the_socket_is_dropped_and_counted) {
  char *dir = make_dir();
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  char *sock = path_in(dir, "pgrunner.sock");
  struct stat st;
  cr_assert(eq(int, stat(sock, &st), 0));
  cr_expect(eq(int, st.st_mode & 0777, 0600), "the socket is mode 0600");

  int fd = connect_to(sock);
  cr_assert(ge(int, fd, 0), "the worker accepts connections");
  char *one = wire_line("first good", 1);
  char *two = wire_line("second good", 2);
  send_all(fd, one, strlen(one));
  send_all(fd, "garbage\n", 8);
  send_all(fd, "{\"v\":1}\n", 8);
  /* An overlong line, sent in pieces, then a good line right after it. */
  char *chunk = pgr_malloc(100000);
  memset(chunk, 'x', 100000);
  for (int i = 0; i < 4; i++)
    send_all(fd, chunk, 100000);
  send_all(fd, "\n", 1);
  send_all(fd, "ab\0cd\n", 6);
  send_all(fd, two, strlen(two));
  send_all(fd, one, strlen(one) / 2); /* cut off by the disconnect */
  finish_and_wait(fd);

  /* A client that vanishes mid-line without a shutdown. */
  fd = connect_to(sock);
  cr_assert(ge(int, fd, 0));
  send_all(fd, two, 10);
  close(fd);
  /* The worker still serves after all that. */
  fd = connect_to(sock);
  cr_assert(ge(int, fd, 0));
  char *three = wire_line("third good", 3);
  send_all(fd, three, strlen(three));
  finish_and_wait(fd);

  pgr_log_stop();
  cr_expect(eq(u64, pgr_log_rejected(), 6),
            "5 bad lines from the first client, 1 from the second");
  char *log = path_in(dir, "pgrunner.log");
  char *s = slurp(log);
  cr_expect(eq(sz, count_str(s, "msg=\"first good\""), 1), "%s", s);
  cr_expect(eq(sz, count_str(s, "msg=\"second good\""), 1), "%s", s);
  cr_expect(eq(sz, count_str(s, "msg=\"third good\""), 1), "%s", s);
  cr_expect(eq(sz, count_str(s, "log socket client sent invalid records"), 2),
            "%s", s);
  cr_expect(eq(sz, count_str(s, "rejected=5"), 1), "%s", s);
  cr_expect(eq(ptr, strstr(s, "xxx"), NULL), "no garbage in the file");
  /* Every line is a whole record of ours. */
  for (const char *p = s; *p;) {
    cr_assert(eq(int, strncmp(p, "ts=", 3), 0), "line starts a record: %.60s",
              p);
    const char *nl = strchr(p, '\n');
    cr_assert(ne(ptr, (void *)nl, NULL));
    p = nl + 1;
  }
  cr_expect(ne(int, stat(sock, &st), 0), "stop removes the socket");
  free(three);
  free(chunk);
  free(one);
  free(two);
  free(s);
  free(log);
  free(sock);
  remove_dir(dir);
}

Test(log, a_live_socket_is_not_stolen) {
  char *dir = make_dir();
  char *err = capture_stderr(dir);
  char *sock = path_in(dir, "pgrunner.sock");
  int lfd = bind_at(sock);
  cr_assert(eq(int, listen(lfd, 4), 0));
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  cr_expect(ne(int, pgr_log_start(&o), 0), "start fails");
  int fd = connect_to(sock);
  cr_expect(ge(int, fd, 0), "the other listener still owns the socket");
  if (fd >= 0)
    close(fd);
  char *s = slurp(err);
  cr_expect(ne(ptr, strstr(s, "level=error"), NULL), "%s", s);
  cr_expect(ne(ptr, strstr(s, "log socket is in use"), NULL), "%s", s);
  cr_expect(ne(ptr, strstr(s, sock), NULL), "the message names the path");
  /* And start works once the socket is free. */
  close(lfd);
  cr_expect(eq(int, pgr_log_start(&o), 0), "a stale socket is replaced");
  pgr_log_stop();
  free(s);
  free(sock);
  free(err);
  remove_dir(dir);
}

Test(log, a_stale_socket_is_replaced) {
  char *dir = make_dir();
  char *sock = path_in(dir, "pgrunner.sock");
  close(bind_at(sock)); /* a dead worker's socket file */
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  int fd = connect_to(sock);
  cr_expect(ge(int, fd, 0), "the new socket accepts connections");
  if (fd >= 0) {
    char *line = wire_line("via the new socket", 5);
    send_all(fd, line, strlen(line));
    finish_and_wait(fd);
    free(line);
  }
  pgr_log_stop();
  char *log = path_in(dir, "pgrunner.log");
  char *s = slurp(log);
  cr_expect(ne(ptr, strstr(s, "msg=\"via the new socket\""), NULL), "%s", s);
  free(s);
  free(log);
  free(sock);
  remove_dir(dir);
}

Test(log, a_second_worker_on_the_same_dir_writes_to_the_same_file) {
  char *dir = make_dir();
  char *err = capture_stderr(dir);
  char *lock = path_in(dir, "pgrunner.sock.lock");
  /* flock() locks belong to an open file description: this one stands in
   * for another worker process (which, here, does not listen, so the
   * second worker appends to the file itself). */
  int lfd = open(lock, O_RDWR | O_CREAT, 0600);
  cr_assert(eq(int, flock(lfd, LOCK_EX | LOCK_NB), 0));
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  pgr_info("from the second worker", PGR_LI("task", 7));
  pgr_log_stop();
  char *log = path_in(dir, "pgrunner.log");
  char *s = slurp(log);
  cr_expect(ne(ptr, strstr(s, "msg=\"from the second worker\" task=7"), NULL),
            "%s", s);
  char *e = slurp(err);
  cr_expect(eq(ptr, strstr(e, "already serves"), NULL), "%s", e);
  close(lfd);
  free(e);
  free(s);
  free(log);
  free(lock);
  free(err);
  remove_dir(dir);
}

Test(log, the_log_dir_must_exist) {
  char *dir = make_dir();
  char *err = capture_stderr(dir);
  char *missing = path_in(dir, "nope");
  struct pgr_log_options o = opts_for(missing, 1, PGR_LOG_TEXT);
  cr_expect(eq(int, pgr_log_start(&o), PGR_EUSAGE));
  char *s = slurp(err);
  cr_expect(ne(ptr, strstr(s, "log directory does not exist"), NULL), "%s", s);
  free(s);
  free(missing);
  free(err);
  remove_dir(dir);
}

Test(log, reopen_follows_logrotate) {
  char *dir = make_dir();
  char *log = path_in(dir, "pgrunner.log");
  char *old = path_in(dir, "pgrunner.log.1");
  struct pgr_log_options o = opts_for(dir, 1, PGR_LOG_TEXT);
  cr_assert(eq(int, pgr_log_start(&o), 0));
  pgr_info("before rotation");
  cr_assert(wait_for_text(log, "before rotation"));
  cr_assert(eq(int, rename(log, old), 0));
  pgr_log_reopen();
  pgr_info("after rotation");
  pgr_log_stop();
  char *a = slurp(old), *b = slurp(log);
  cr_expect(ne(ptr, strstr(a, "before rotation"), NULL));
  cr_expect(eq(ptr, strstr(a, "after rotation"), NULL), "%s", a);
  cr_expect(ne(ptr, strstr(b, "after rotation"), NULL), "%s", b);
  free(a);
  free(b);
  free(old);
  free(log);
  remove_dir(dir);
}

struct drain {
  int fd;
  struct pgr_buf got;
};

static void *drain_pipe(void *arg) {
  struct drain *d = arg;
  char buf[65536];
  ssize_t n;
  while ((n = read(d->fd, buf, sizeof(buf))) > 0)
    pgr_buf_add(&d->got, buf, (size_t)n);
  return NULL;
}

/*
 * stderr is a pipe nobody reads, so the writer blocks on it and the queue
 * fills: debug records are then dropped and counted, info records are not.
 */
Test(log, a_full_queue_drops_debug_but_never_info) {
  int p[2];
  cr_assert(eq(int, pipe(p), 0));
  int saved = dup(STDERR_FILENO);
  cr_assert(eq(int, dup2(p[1], STDERR_FILENO), STDERR_FILENO));
  close(p[1]);
  struct pgr_log_options o = opts_for(NULL, 0, PGR_LOG_TEXT);
  o.level = PGR_LEVEL_DEBUG;
  o.quiet_stderr = 0;
  cr_assert(eq(int, pgr_log_start(&o), 0));
  for (int i = 0; i < 300000; i++)
    pgr_debug("chatter", PGR_LI("i", i));
  for (int i = 0; i < 3; i++)
    pgr_info("must survive", PGR_LI("i", i));
  uint64_t dropped = pgr_log_dropped();

  struct drain d = {.fd = p[0]};
  pgr_buf_init(&d.got);
  pthread_t th;
  cr_assert(eq(int, pthread_create(&th, NULL, drain_pipe, &d), 0));
  pgr_log_stop();
  dup2(saved, STDERR_FILENO); /* closes the pipe's last write end */
  close(saved);
  pthread_join(th, NULL);
  close(p[0]);

  cr_expect(gt(u64, dropped, 0), "debug records were dropped");
  cr_expect(eq(sz, count_str(d.got.data, "msg=\"must survive\""), 3),
            "no info record was dropped");
  size_t written = count_str(d.got.data, "msg=chatter");
  cr_expect(eq(u64, written + dropped, 300000),
            "every debug record was written or counted (%zu + %" PRIu64 ")",
            written, dropped);
  cr_expect(ne(ptr, strstr(d.got.data, "msg=\"log records dropped\""), NULL),
            "the drops are reported");
  pgr_buf_free(&d.got);
}
