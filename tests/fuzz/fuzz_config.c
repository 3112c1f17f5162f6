/*
 * fuzz_config.c - option and environment values (outside input: the
 * command line and PGRUNNER_* variables). The first byte picks what:
 *   'D' + text  pgr_parse_duration: accepts exactly N or (N unit)+ with the
 *               total computed independently here, and "<total>s" parses
 *               back to the same total;
 *   'Q' + text  pgr_parse_queues: every accepted queue has a valid name and
 *               cap, names are distinct, and the list written back as
 *               name[:cap],... parses to the same list;
 *   otherwise   lines: "NAME=value" for a known variable sets it, any other
 *               line is an argument; pgr_config_parse() then either fails
 *               with a reason or yields values inside their documented
 *               ranges, and the SMTP settings go through
 *               pgr_email_check_config() as the worker does at start.
 */
#include <ctype.h>

#include "config.h"
#include "fuzz.h"
#include "jobs/email_msg.h"

static const char *const env_names[] = {
    "DATABASE_URL",
    "PGRUNNER_DB",
    "PGRUNNER_QUEUES",
    "PGRUNNER_CONCURRENCY",
    "PGRUNNER_POLL_INTERVAL",
    "PGRUNNER_SHUTDOWN_TIMEOUT",
    "PGRUNNER_METRICS_LISTEN",
    "PGRUNNER_JOBS_SCHEMA",
    "PGRUNNER_RETENTION",
    "PGRUNNER_TASK_TIMEOUT",
    "PGRUNNER_LOG_DIR",
    "PGRUNNER_LOG_LEVEL",
    "PGRUNNER_LOG_FORMAT",
    "PGRUNNER_PLUGIN",
    "PGRUNNER_SMTP_HOST",
    "PGRUNNER_SMTP_PORT",
    "PGRUNNER_SMTP_USER",
    "PGRUNNER_SMTP_PASSWORD",
    "PGRUNNER_SMTP_STARTTLS",
    "PGRUNNER_MAIL_FROM",
    "PGRUNNER_SMTP_HELO",
    "PGRUNNER_MESSAGE_ID_DOMAIN",
    "PGRUNNER_SMTP_TIMEOUT",
    "PGRUNNER_SMTP_CA_FILE",
    "PGRUNNER_LISTEN_DB",
    "PGRUNNER_WEB_LISTEN",
};

/* The duration grammar, independently: returns 0 and the total, or -1. */
static int ref_duration(const char *s, int64_t *total) {
  const char *p = s;
  __int128 t = 0;
  if (*s == '\0')
    return -1;
  while (*p) {
    __int128 v = 0;
    if (!isdigit((unsigned char)*p))
      return -1;
    while (isdigit((unsigned char)*p)) {
      v = v * 10 + (*p++ - '0');
      if (v > INT64_MAX)
        return -1;
    }
    int64_t mult;
    switch (*p) {
    case '\0':
      if (t != 0 || p != s + strspn(s, "0123456789"))
        return -1;
      mult = 1;
      break;
    case 's':
      mult = 1;
      p++;
      break;
    case 'm':
      mult = 60;
      p++;
      break;
    case 'h':
      mult = 3600;
      p++;
      break;
    case 'd':
      mult = 86400;
      p++;
      break;
    case 'w':
      mult = 7 * 86400;
      p++;
      break;
    default:
      return -1;
    }
    t += v * mult;
    if (t > INT64_MAX)
      return -1;
  }
  *total = (int64_t)t;
  return 0;
}

static void fuzz_duration(const char *s) {
  int64_t got = -1, want = -1;
  int rc = pgr_parse_duration(s, &got);
  int ref = ref_duration(s, &want);
  FUZZ_CHECK((rc == 0) == (ref == 0));
  if (rc != 0)
    return;
  FUZZ_CHECK(got == want && got >= 0);
  char again[32];
  int64_t back = -1;
  snprintf(again, sizeof again, "%llds", (long long)got);
  FUZZ_CHECK(pgr_parse_duration(again, &back) == 0 && back == got);
}

/* The queue names as the array literal the loop sends to PostgreSQL,
 * read back by PostgreSQL's rules for a quoted element. */
static void check_array(const struct pgr_queue_cfg *q, size_t n) {
  struct pgr_buf a = {NULL, 0, 0};
  pgr_buf_addc(&a, '{');
  for (size_t i = 0; i < n; i++) {
    if (i)
      pgr_buf_addc(&a, ',');
    pgr_buf_add_array_elem(&a, q[i].name);
  }
  pgr_buf_addc(&a, '}');
  const char *p = a.data + 1;
  for (size_t i = 0; i < n; i++) {
    struct pgr_buf e = {NULL, 0, 0};
    pgr_buf_add(&e, "", 0);
    FUZZ_CHECK(*p == '"');
    for (p++; *p != '"'; p++) {
      FUZZ_CHECK(*p != '\0');
      if (*p == '\\')
        p++;
      pgr_buf_addc(&e, *p);
    }
    p++;
    FUZZ_CHECK(*p == (i + 1 < n ? ',' : '}'));
    p++;
    FUZZ_CHECK(strcmp(e.data, q[i].name) == 0);
    pgr_buf_free(&e);
  }
  FUZZ_CHECK(*p == '\0');
  pgr_buf_free(&a);
}

static void fuzz_queues(const char *s) {
  struct pgr_queue_cfg *q = NULL, *q2 = NULL;
  size_t n = 0, n2 = 0;
  char err[512];
  struct pgr_buf again = {NULL, 0, 0};

  err[0] = '\0';
  if (pgr_parse_queues(s, "--queues", &q, &n, err, sizeof err) != 0) {
    FUZZ_CHECK(err[0] != '\0' && q == NULL && n == 0);
    return;
  }
  FUZZ_CHECK(n >= 1);
  for (size_t i = 0; i < n; i++) {
    size_t len = strlen(q[i].name);
    FUZZ_CHECK(len >= 1 && len <= 128);
    for (const char *p = q[i].name; *p; p++)
      FUZZ_CHECK((unsigned char)*p > ' ' && *p != ',' && *p != ':' &&
                 *p != 0x7f);
    FUZZ_CHECK(q[i].cap >= 0 && q[i].cap <= 100000);
    for (size_t k = 0; k < i; k++)
      FUZZ_CHECK(strcmp(q[i].name, q[k].name) != 0);
    pgr_buf_printf(&again, "%s%s", i ? "," : "", q[i].name);
    if (q[i].cap)
      pgr_buf_printf(&again, ":%d", q[i].cap);
  }
  check_array(q, n);
  FUZZ_CHECK(
      pgr_parse_queues(again.data, "--queues", &q2, &n2, err, sizeof err) == 0);
  FUZZ_CHECK(n2 == n);
  for (size_t i = 0; i < n; i++)
    FUZZ_CHECK(strcmp(q[i].name, q2[i].name) == 0 && q[i].cap == q2[i].cap);
  for (size_t i = 0; i < n; i++) {
    free(q[i].name);
    free(q2[i].name);
  }
  free(q);
  free(q2);
  pgr_buf_free(&again);
}

static void check_config(const struct pgr_config *c) {
  if (c->help || c->command == PGR_CMD_VERSION)
    return;
  FUZZ_CHECK(c->command != PGR_CMD_NONE);
  FUZZ_CHECK(c->db == NULL || c->db[0] != '\0');
  FUZZ_CHECK(c->log_level >= PGR_LEVEL_DEBUG &&
             c->log_level <= PGR_LEVEL_ERROR);
  FUZZ_CHECK(c->jobs_schema != NULL && pgr_valid_kind(c->jobs_schema));
  switch (c->command) {
  case PGR_CMD_WORK: {
    FUZZ_CHECK(c->nqueues >= 1);
    FUZZ_CHECK(c->concurrency >= 1 && c->concurrency <= 1000);
    FUZZ_CHECK(c->poll_interval_ms >= 10 && c->poll_interval_ms <= 3600000);
    FUZZ_CHECK(c->shutdown_timeout_s >= 0 && c->shutdown_timeout_s <= 86400);
    FUZZ_CHECK(c->listen_db == NULL || c->listen_db[0] != '\0');
    FUZZ_CHECK(c->metrics_host == NULL ||
               (c->metrics_host[0] != '\0' && c->metrics_port >= 1 &&
                c->metrics_port <= 65535));
    FUZZ_CHECK(c->retention_s >= 0);
    FUZZ_CHECK(c->task_timeout_s >= 1 && c->task_timeout_s <= 604800);
    FUZZ_CHECK(c->smtp.port >= 1 && c->smtp.port <= 65535);
    FUZZ_CHECK(c->smtp.timeout_s >= 1 && c->smtp.timeout_s <= 3600);
    for (size_t i = 0; i < c->nplugins; i++)
      FUZZ_CHECK(c->plugins[i][0] != '\0');
    char err[512];
    err[0] = '\0';
    if (pgr_email_check_config(&c->smtp, err, sizeof err) != 0) {
      FUZZ_CHECK(err[0] != '\0');
      for (const char *p = err; *p; p++)
        FUZZ_CHECK(*p >= 32 && *p < 127);
    }
    break;
  }
  case PGR_CMD_ADD: {
    FUZZ_CHECK(c->add_kind != NULL && c->add_kind[0] != '\0' &&
               strlen(c->add_kind) <= 200);
    FUZZ_CHECK(c->add_payload != NULL);
    FUZZ_CHECK(!(c->add_run_at && c->add_delay_s >= 0));
    FUZZ_CHECK(c->add_delay_s < 0 || c->add_delay_s <= 1e9);
    FUZZ_CHECK(c->add_max_attempts >= 0);
    break;
  }
  case PGR_CMD_CANCEL:
  case PGR_CMD_RETRY:
    FUZZ_CHECK(c->task_id >= 1);
    break;
  case PGR_CMD_WEB:
    FUZZ_CHECK(c->metrics_host != NULL && c->metrics_host[0] != '\0' &&
               c->metrics_port >= 1 && c->metrics_port <= 65535);
    break;
  default:
    break;
  }
}

static void fuzz_argv(char *text) {
  char *argv[64];
  int argc = 0;
  argv[argc++] = "pgrunner";
  for (size_t i = 0; i < PGR_ARRAY_LEN(env_names); i++)
    unsetenv(env_names[i]);
  char *save = NULL;
  for (char *line = strtok_r(text, "\n", &save); line;
       line = strtok_r(NULL, "\n", &save)) {
    char *eq = strchr(line, '=');
    int is_env = 0;
    if (eq != NULL) {
      for (size_t i = 0; i < PGR_ARRAY_LEN(env_names); i++)
        if ((size_t)(eq - line) == strlen(env_names[i]) &&
            memcmp(line, env_names[i], (size_t)(eq - line)) == 0) {
          *eq = '\0';
          setenv(line, eq + 1, 1);
          *eq = '=';
          is_env = 1;
        }
    }
    if (!is_env && argc < 63)
      argv[argc++] = line;
  }
  argv[argc] = NULL;

  struct pgr_config cfg;
  char err[1024];
  if (pgr_config_parse(&cfg, argc, argv, err, sizeof err) == 0)
    check_config(&cfg);
  else
    FUZZ_CHECK(err[0] != '\0');
  pgr_config_free(&cfg);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  char *s = fuzz_cstr(data + 1, size - 1);
  if (data[0] == 'D')
    fuzz_duration(s);
  else if (data[0] == 'Q')
    fuzz_queues(s);
  else
    fuzz_argv(s);
  free(s);
  return 0;
}
