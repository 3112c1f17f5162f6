/*
 * config.c - argv and PGRUNNER_* environment variables -> struct pgr_config.
 *
 * Thread: main thread, before any other thread starts.
 *
 * Precedence for `work` options: flag, then PGRUNNER_<NAME>, then default.
 * A variable whose option is given as a flag is ignored, not validated, and
 * --help reads no variable at all.
 * The database: --db, then DATABASE_URL, then PGRUNNER_DB, then libpq's own
 * PG* variables (left to libpq). `work`'s loop connections use --listen-db
 * (PGRUNNER_LISTEN_DB) when given, else the same. Every rejected value
 * produces one line that names the option and the value's problem; main
 * prints it and exits 2.
 */
#include "config.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include <jansson.h>

#include "conninfo.h"
#include "logfmt.h"

enum {
  OPT_DB = 1000,
  OPT_QUEUES,
  OPT_CONCURRENCY,
  OPT_POLL,
  OPT_SHUTDOWN,
  OPT_LOG_DIR,
  OPT_LOG_LEVEL,
  OPT_LOG_FORMAT,
  OPT_METRICS,
  OPT_LISTEN,
  OPT_PLUGIN,
  OPT_JOBS_SCHEMA,
  OPT_RETENTION,
  OPT_TASK_TIMEOUT,
  OPT_LISTEN_DB,
  OPT_QUEUE,
  OPT_RUN_AT,
  OPT_DELAY,
  OPT_PRIORITY,
  OPT_MAX_ATTEMPTS,
  OPT_KEY,
  OPT_JSON,
  OPT_HELP,
  OPT_VERSION,
  OPT_END, /* not an option: the size of a table indexed by option */
};

/* Which options were given as flags, indexed by opt - OPT_DB. */
#define NOPTS (OPT_END - OPT_DB)

static const struct option global_opts[] = {
    {"db", required_argument, NULL, OPT_DB},
    {"log-dir", required_argument, NULL, OPT_LOG_DIR},
    {"log-level", required_argument, NULL, OPT_LOG_LEVEL},
    {"log-format", required_argument, NULL, OPT_LOG_FORMAT},
    {"help", no_argument, NULL, OPT_HELP},
    {"version", no_argument, NULL, OPT_VERSION},
    {0, 0, 0, 0},
};

static const struct option work_opts[] = {
    {"queues", required_argument, NULL, OPT_QUEUES},
    {"concurrency", required_argument, NULL, OPT_CONCURRENCY},
    {"poll-interval", required_argument, NULL, OPT_POLL},
    {"shutdown-timeout", required_argument, NULL, OPT_SHUTDOWN},
    {"metrics-listen", required_argument, NULL, OPT_METRICS},
    {"plugin", required_argument, NULL, OPT_PLUGIN},
    {"jobs-schema", required_argument, NULL, OPT_JOBS_SCHEMA},
    {"retention", required_argument, NULL, OPT_RETENTION},
    {"task-timeout", required_argument, NULL, OPT_TASK_TIMEOUT},
    {"listen-db", required_argument, NULL, OPT_LISTEN_DB},
    {0, 0, 0, 0},
};

static const struct option web_opts[] = {
    {"listen", required_argument, NULL, OPT_LISTEN},
    {0, 0, 0, 0},
};

static const struct option add_opts[] = {
    {"queue", required_argument, NULL, OPT_QUEUE},
    {"run-at", required_argument, NULL, OPT_RUN_AT},
    {"delay", required_argument, NULL, OPT_DELAY},
    {"priority", required_argument, NULL, OPT_PRIORITY},
    {"max-attempts", required_argument, NULL, OPT_MAX_ATTEMPTS},
    {"key", required_argument, NULL, OPT_KEY},
    {0, 0, 0, 0},
};

static const struct option status_opts[] = {
    {"json", no_argument, NULL, OPT_JSON},
    {0, 0, 0, 0},
};

static const char usage_main[] =
    "Usage: pgrunner COMMAND [OPTIONS]\n"
    "\n"
    "A PostgreSQL-backed job queue worker.\n"
    "\n"
    "Commands:\n"
    "  work               run a worker\n"
    "  add KIND [PAYLOAD] add a task and print its id\n"
    "  status [--json]    counts per queue and state, workers, failures\n"
    "  cancel ID          cancel a task\n"
    "  retry ID           queue a failed or cancelled task again\n"
    "  migrate            create or upgrade the database schema\n"
    "  web                serve the dashboard without working\n"
    "\n"
    "Options for every command:\n"
    "  --db CONNINFO      libpq conninfo or postgres:// URL\n"
    "                     (else DATABASE_URL, else libpq's PG* variables)\n"
    "  --log-dir DIR      also log to DIR/pgrunner.log (through the worker's\n"
    "                     DIR/pgrunner.sock when a worker listens there)\n"
    "  --log-level L      debug, info, warn, error (info)\n"
    "  --log-format F     text or json (text)\n"
    "  --help, --version\n"
    "\n"
    "Run 'pgrunner COMMAND --help' for a command's own options.\n";

static const char usage_work[] =
    "Usage: pgrunner work [OPTIONS]\n"
    "\n"
    "Run a worker: wait for tasks (LISTEN/NOTIFY), claim them and run each as\n"
    "one transaction on a worker thread. Each option is also an environment\n"
    "variable PGRUNNER_<NAME> (e.g. PGRUNNER_CONCURRENCY); flags win.\n"
    "\n"
    "  --queues LIST            comma-separated queues; name:N caps that\n"
    "                           queue at N running tasks (default)\n"
    "  --concurrency N          worker threads, one connection each (8)\n"
    "  --poll-interval MS       fallback poll interval (1000)\n"
    "  --shutdown-timeout S     grace period on SIGTERM/SIGINT (30)\n"
    "  --log-dir DIR            write DIR/pgrunner.log, serve "
    "DIR/pgrunner.sock\n"
    "  --log-level L            debug, info, warn, error (info)\n"
    "  --log-format F           text or json (text)\n"
    "  --metrics-listen A:P     serve /metrics and /healthz (off)\n"
    "  --plugin PATH            load handlers from a shared object "
    "(repeatable)\n"
    "  --jobs-schema NAME       schema of SQL-function jobs (pgrunner_jobs)\n"
    "  --retention DURATION     keep succeeded tasks this long (7d)\n"
    "  --task-timeout S         default per-task time limit (300)\n"
    "  --db CONNINFO            database (else DATABASE_URL, PG* variables)\n"
    "  --listen-db CONNINFO     the loop's LISTEN/claim and maintenance\n"
    "                           connections, which need a session (not a\n"
    "                           transaction pooler); default: --db\n"
    "\n"
    "SMTP for email tasks: PGRUNNER_SMTP_HOST, PGRUNNER_SMTP_PORT (25),\n"
    "PGRUNNER_SMTP_USER, PGRUNNER_SMTP_PASSWORD, PGRUNNER_SMTP_STARTTLS\n"
    "(no, try, require), PGRUNNER_SMTP_CA_FILE, PGRUNNER_MAIL_FROM.\n"
    "http tasks: PGRUNNER_HTTP_ALLOW (comma-separated hosts; unset: any).\n";

static const char usage_add[] =
    "Usage: pgrunner add KIND [PAYLOAD_JSON] [OPTIONS]\n"
    "\n"
    "Add a task and print its id.\n"
    "\n"
    "  --queue Q            queue (default)\n"
    "  --run-at TIME        not before this time (any PostgreSQL timestamptz)\n"
    "  --delay S            not before S seconds from now\n"
    "  --priority P         smaller runs first (0)\n"
    "  --max-attempts N     attempts before the task fails (default: the\n"
    "                       retry policy of its kind and queue, else 5)\n"
    "  --key K              de-duplication key\n";

static const char usage_status[] =
    "Usage: pgrunner status [--json]\n"
    "\n"
    "Task counts per queue and state, live workers, the most recent "
    "failures.\n";

static const char usage_cancel[] =
    "Usage: pgrunner cancel ID\n"
    "\n"
    "Cancel a task: a queued one at once, a running one is interrupted.\n";

static const char usage_retry[] =
    "Usage: pgrunner retry ID\n"
    "\n"
    "Queue a failed or cancelled task again with fresh attempts.\n";

static const char usage_migrate[] =
    "Usage: pgrunner migrate\n"
    "\n"
    "Create or upgrade the pgrunner schema. Idempotent; safe to run from\n"
    "several processes at once.\n";

static const char usage_web[] =
    "Usage: pgrunner web [--listen ADDR:PORT]\n"
    "\n"
    "Serve the dashboard (/, a page per task) and /healthz without running\n"
    "tasks, until SIGINT or SIGTERM. Retry and cancel work only when\n"
    "PGRUNNER_ADMIN_TOKEN is set and a request carries it.\n"
    "\n"
    "  --listen ADDR:PORT   where to listen (127.0.0.1:9188; env\n"
    "                       PGRUNNER_WEB_LISTEN). The page shows payloads\n"
    "                       and errors: keep it off public addresses.\n";

const char *pgr_config_usage(enum pgr_command cmd) {
  switch (cmd) {
  case PGR_CMD_WORK:
    return usage_work;
  case PGR_CMD_ADD:
    return usage_add;
  case PGR_CMD_STATUS:
    return usage_status;
  case PGR_CMD_CANCEL:
    return usage_cancel;
  case PGR_CMD_RETRY:
    return usage_retry;
  case PGR_CMD_MIGRATE:
    return usage_migrate;
  case PGR_CMD_WEB:
    return usage_web;
  default:
    return usage_main;
  }
}

PGR_PRINTF(3, 4)
static int usage_error(char *errbuf, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(errbuf, errlen, fmt, ap);
  va_end(ap);
  return PGR_EUSAGE;
}

int pgr_parse_int(const char *s, int64_t min, int64_t max, int64_t *out) {
  char *end;
  long long v;

  if (s == NULL || *s == '\0' || isspace((unsigned char)*s))
    return PGR_EINVAL;
  errno = 0;
  v = strtoll(s, &end, 10);
  if (errno != 0 || *end != '\0' || v < min || v > max)
    return PGR_EINVAL;
  *out = v;
  return 0;
}

int pgr_parse_duration(const char *s, int64_t *out_seconds) {
  int64_t total = 0;
  const char *p = s;

  if (s == NULL || *s == '\0')
    return PGR_EINVAL;
  while (*p) {
    char *end;
    int64_t mult;
    errno = 0;
    if (!isdigit((unsigned char)*p))
      return PGR_EINVAL;
    long long v = strtoll(p, &end, 10);
    if (errno != 0 || v < 0)
      return PGR_EINVAL;
    switch (*end) {
    case '\0':
      /* A bare number is seconds, and only as the whole value. */
      if (p != s)
        return PGR_EINVAL;
      mult = 1;
      break;
    case 's':
      mult = 1;
      end++;
      break;
    case 'm':
      mult = 60;
      end++;
      break;
    case 'h':
      mult = 3600;
      end++;
      break;
    case 'd':
      mult = 86400;
      end++;
      break;
    case 'w':
      mult = 7 * 86400;
      end++;
      break;
    default:
      return PGR_EINVAL;
    }
    if (v > (INT64_MAX - total) / mult)
      return PGR_EINVAL;
    total += v * mult;
    p = end;
  }
  *out_seconds = total;
  return 0;
}

static int valid_queue_name(const char *s, size_t n) {
  if (n == 0 || n > 128)
    return 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c <= ' ' || c == ',' || c == ':' || c == 0x7f)
      return 0;
  }
  return 1;
}

static void free_queues(struct pgr_queue_cfg *q, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(q[i].name);
  free(q);
}

int pgr_parse_queues(const char *s, const char *src, struct pgr_queue_cfg **out,
                     size_t *n, char *errbuf, size_t errlen) {
  struct pgr_queue_cfg *qs = NULL;
  size_t count = 0;
  const char *p = s;
  int rc = 0;

  if (s == NULL || *s == '\0') {
    rc = usage_error(errbuf, errlen, "%s: empty list", src);
    goto out;
  }
  for (;;) {
    const char *comma = strchr(p, ',');
    size_t len = comma ? (size_t)(comma - p) : strlen(p);
    const char *colon = memchr(p, ':', len);
    size_t nlen = colon ? (size_t)(colon - p) : len;
    int64_t cap = 0;

    if (!valid_queue_name(p, nlen)) {
      rc = usage_error(errbuf, errlen, "%s: invalid queue name \"%.*s\"", src,
                       (int)nlen, p);
      goto out;
    }
    if (colon) {
      char num[32];
      size_t clen = len - nlen - 1;
      if (clen == 0 || clen >= sizeof num) {
        rc = usage_error(errbuf, errlen, "%s: invalid cap for \"%.*s\"", src,
                         (int)nlen, p);
        goto out;
      }
      memcpy(num, colon + 1, clen);
      num[clen] = '\0';
      if (pgr_parse_int(num, 1, 100000, &cap) != 0) {
        rc = usage_error(errbuf, errlen,
                         "%s: cap \"%s\" for \"%.*s\" is not a whole number "
                         "from 1 to 100000",
                         src, num, (int)nlen, p);
        goto out;
      }
    }
    for (size_t i = 0; i < count; i++) {
      if (strlen(qs[i].name) == nlen && memcmp(qs[i].name, p, nlen) == 0) {
        rc = usage_error(errbuf, errlen, "%s: queue \"%.*s\" is listed twice",
                         src, (int)nlen, p);
        goto out;
      }
    }
    qs = pgr_realloc(qs, (count + 1) * sizeof *qs);
    qs[count].name = pgr_strndup(p, nlen);
    qs[count].cap = (int)cap;
    count++;
    if (!comma)
      break;
    p = comma + 1;
  }
  *out = qs;
  *n = count;
  qs = NULL;
  count = 0;
out:
  free_queues(qs, count);
  return rc;
}

int pgr_valid_kind(const char *kind) {
  if (kind == NULL || *kind == '\0' || strlen(kind) > 63)
    return 0;
  if (!(islower((unsigned char)kind[0]) || kind[0] == '_'))
    return 0;
  for (const char *p = kind; *p; p++) {
    if (!(islower((unsigned char)*p) || isdigit((unsigned char)*p) ||
          *p == '_'))
      return 0;
  }
  return 1;
}

/* The log's own level names, and "warning" for warn. */
static int parse_level(const char *s, enum pgr_level *out) {
  if (strcmp(s, "warning") == 0) {
    *out = PGR_LEVEL_WARN;
    return 0;
  }
  return pgr_log_level_parse(s, out);
}

static int parse_listen(const char *s, char **host, int *port) {
  const char *colon = strrchr(s, ':');
  int64_t p;
  const char *h = s;
  size_t hlen;

  if (colon == NULL)
    return PGR_EINVAL;
  hlen = (size_t)(colon - s);
  if (hlen >= 2 && s[0] == '[' && s[hlen - 1] == ']') {
    h = s + 1;
    hlen -= 2;
  }
  if (pgr_parse_int(colon + 1, 1, 65535, &p) != 0)
    return PGR_EINVAL;
  free(*host);
  *host = hlen ? pgr_strndup(h, hlen) : pgr_strdup("0.0.0.0");
  *port = (int)p;
  return 0;
}

/* Replace *dst with a copy of src. */
static void set_str(char **dst, const char *src) {
  free(*dst);
  *dst = src ? pgr_strdup(src) : NULL;
}

static int valid_schema(const char *s) {
  return pgr_valid_kind(s); /* same identifier rule */
}

static int parse_payload(struct pgr_config *cfg, const char *text, char *errbuf,
                         size_t errlen) {
  json_error_t jerr;
  json_t *v = json_loads(text, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &jerr);
  if (v == NULL)
    return usage_error(errbuf, errlen,
                       "invalid JSON payload: %s (line %d, column %d)",
                       jerr.text, jerr.line, jerr.column);
  json_decref(v);
  set_str(&cfg->add_payload, text);
  return 0;
}

/*
 * Apply one option. `src` names where the value came from ("--x" or the
 * environment variable) for the error message.
 */
static int apply(struct pgr_config *cfg, int opt, const char *val,
                 const char *src, char *errbuf, size_t errlen) {
  int64_t n;

  switch (opt) {
  case OPT_DB:
    if (*val == '\0')
      return usage_error(errbuf, errlen, "%s: empty connection string", src);
    set_str(&cfg->db, val);
    return 0;
  case OPT_LISTEN_DB:
    /* Parsed when `work` starts, like --db: a malformed one ends it with
       exit 1 (SPEC section 9), not with a usage error. */
    if (*val == '\0')
      return usage_error(errbuf, errlen, "%s: empty connection string", src);
    set_str(&cfg->listen_db, val);
    return 0;
  case OPT_LOG_DIR: {
    struct stat st;
    if (stat(val, &st) != 0 || !S_ISDIR(st.st_mode))
      return usage_error(errbuf, errlen,
                         "%s: \"%s\" is not an existing directory", src, val);
    set_str(&cfg->log_dir, val);
    return 0;
  }
  case OPT_LOG_LEVEL:
    if (parse_level(val, &cfg->log_level) != 0)
      return usage_error(errbuf, errlen,
                         "%s: \"%s\" is not one of debug, info, warn, error",
                         src, val);
    return 0;
  case OPT_LOG_FORMAT:
    if (strcmp(val, "text") == 0)
      cfg->log_format = PGR_LOG_TEXT;
    else if (strcmp(val, "json") == 0)
      cfg->log_format = PGR_LOG_JSON;
    else
      return usage_error(errbuf, errlen, "%s: \"%s\" is not text or json", src,
                         val);
    return 0;
  case OPT_QUEUES: {
    struct pgr_queue_cfg *qs;
    size_t nq;
    int rc = pgr_parse_queues(val, src, &qs, &nq, errbuf, errlen);
    if (rc != 0)
      return rc;
    free_queues(cfg->queues, cfg->nqueues);
    cfg->queues = qs;
    cfg->nqueues = nq;
    return 0;
  }
  case OPT_CONCURRENCY:
    if (pgr_parse_int(val, 1, 1000, &n) != 0)
      return usage_error(errbuf, errlen,
                         "%s: \"%s\" is not a whole number from 1 to 1000", src,
                         val);
    cfg->concurrency = (int)n;
    return 0;
  case OPT_POLL:
    if (pgr_parse_int(val, 10, 3600000, &n) != 0)
      return usage_error(
          errbuf, errlen,
          "%s: \"%s\" is not a number of milliseconds from 10 to 3600000", src,
          val);
    cfg->poll_interval_ms = (int)n;
    return 0;
  case OPT_SHUTDOWN:
    if (pgr_parse_int(val, 0, 86400, &n) != 0)
      return usage_error(
          errbuf, errlen,
          "%s: \"%s\" is not a number of seconds from 0 to 86400", src, val);
    cfg->shutdown_timeout_s = (int)n;
    return 0;
  case OPT_METRICS:
  case OPT_LISTEN:
    if (parse_listen(val, &cfg->metrics_host, &cfg->metrics_port) != 0)
      return usage_error(errbuf, errlen, "%s: \"%s\" is not ADDR:PORT", src,
                         val);
    return 0;
  case OPT_PLUGIN:
    if (*val == '\0')
      return usage_error(errbuf, errlen, "%s: empty path", src);
    cfg->plugins =
        pgr_realloc(cfg->plugins, (cfg->nplugins + 1) * sizeof *cfg->plugins);
    cfg->plugins[cfg->nplugins++] = pgr_strdup(val);
    return 0;
  case OPT_JOBS_SCHEMA:
    if (!valid_schema(val))
      return usage_error(
          errbuf, errlen,
          "%s: \"%s\" is not a schema name matching [a-z_][a-z0-9_]*", src,
          val);
    set_str(&cfg->jobs_schema, val);
    return 0;
  case OPT_RETENTION:
    if (pgr_parse_duration(val, &cfg->retention_s) != 0)
      return usage_error(
          errbuf, errlen,
          "%s: \"%s\" is not a duration such as 7d, 12h, 30m or 3600", src,
          val);
    return 0;
  case OPT_TASK_TIMEOUT:
    if (pgr_parse_int(val, 1, 86400 * 7, &n) != 0)
      return usage_error(
          errbuf, errlen,
          "%s: \"%s\" is not a number of seconds from 1 to 604800", src, val);
    cfg->task_timeout_s = (int)n;
    return 0;
  case OPT_QUEUE:
    if (!valid_queue_name(val, strlen(val)))
      return usage_error(errbuf, errlen, "%s: invalid queue name \"%s\"", src,
                         val);
    set_str(&cfg->add_queue, val);
    return 0;
  case OPT_RUN_AT:
    if (*val == '\0')
      return usage_error(errbuf, errlen, "%s: empty time", src);
    set_str(&cfg->add_run_at, val);
    return 0;
  case OPT_DELAY: {
    char *end;
    errno = 0;
    double d = strtod(val, &end);
    if (errno != 0 || end == val || *end != '\0' || !(d >= 0) || d > 1e9)
      return usage_error(errbuf, errlen,
                         "%s: \"%s\" is not a number of seconds", src, val);
    cfg->add_delay_s = d;
    return 0;
  }
  case OPT_PRIORITY:
    if (pgr_parse_int(val, INT_MIN, INT_MAX, &n) != 0)
      return usage_error(errbuf, errlen, "%s: \"%s\" is not a whole number",
                         src, val);
    cfg->add_priority = (int)n;
    cfg->add_has_priority = 1;
    return 0;
  case OPT_MAX_ATTEMPTS:
    if (pgr_parse_int(val, 1, INT_MAX, &n) != 0)
      return usage_error(errbuf, errlen,
                         "%s: \"%s\" is not a whole number of at least 1", src,
                         val);
    cfg->add_max_attempts = (int)n;
    return 0;
  case OPT_KEY:
    set_str(&cfg->add_key, val);
    return 0;
  case OPT_JSON:
    cfg->json = 1;
    return 0;
  }
  return usage_error(errbuf, errlen, "internal: unknown option %d", opt);
}

struct env_opt {
  const char *name;
  int opt;
};

static const struct env_opt work_env[] = {
    {"PGRUNNER_QUEUES", OPT_QUEUES},
    {"PGRUNNER_CONCURRENCY", OPT_CONCURRENCY},
    {"PGRUNNER_POLL_INTERVAL", OPT_POLL},
    {"PGRUNNER_SHUTDOWN_TIMEOUT", OPT_SHUTDOWN},
    {"PGRUNNER_METRICS_LISTEN", OPT_METRICS},
    {"PGRUNNER_JOBS_SCHEMA", OPT_JOBS_SCHEMA},
    {"PGRUNNER_RETENTION", OPT_RETENTION},
    {"PGRUNNER_TASK_TIMEOUT", OPT_TASK_TIMEOUT},
    {"PGRUNNER_LISTEN_DB", OPT_LISTEN_DB},
};

static const struct env_opt web_env[] = {
    {"PGRUNNER_WEB_LISTEN", OPT_LISTEN},
};

static const struct env_opt global_env[] = {
    {"PGRUNNER_LOG_DIR", OPT_LOG_DIR},
    {"PGRUNNER_LOG_LEVEL", OPT_LOG_LEVEL},
    {"PGRUNNER_LOG_FORMAT", OPT_LOG_FORMAT},
};

/*
 * Apply the variables of `tab` whose option was not given as a flag. A
 * variable the flag overrides is not even validated: flags win, so a stale
 * or broken value in the environment must not stop a command line that
 * says otherwise.
 */
static int apply_env(struct pgr_config *cfg, const struct env_opt *tab,
                     size_t n, const unsigned char *given, char *errbuf,
                     size_t errlen) {
  for (size_t i = 0; i < n; i++) {
    const char *v = getenv(tab[i].name);
    if (v == NULL || given[tab[i].opt - OPT_DB])
      continue;
    int rc = apply(cfg, tab[i].opt, v, tab[i].name, errbuf, errlen);
    if (rc != 0)
      return rc;
  }
  return 0;
}

static int smtp_from_env(struct pgr_smtp_config *s, char *errbuf,
                         size_t errlen) {
  const char *v;
  int64_t n;

  s->port = 25;
  s->timeout_s = 30;
  s->starttls = PGR_STARTTLS_NO;
  set_str(&s->host, getenv("PGRUNNER_SMTP_HOST"));
  if ((v = getenv("PGRUNNER_SMTP_PORT")) != NULL) {
    if (pgr_parse_int(v, 1, 65535, &n) != 0)
      return usage_error(errbuf, errlen,
                         "PGRUNNER_SMTP_PORT: \"%s\" is not a port number", v);
    s->port = (int)n;
  }
  set_str(&s->user, getenv("PGRUNNER_SMTP_USER"));
  set_str(&s->password, getenv("PGRUNNER_SMTP_PASSWORD"));
  if ((v = getenv("PGRUNNER_SMTP_STARTTLS")) != NULL) {
    if (strcmp(v, "no") == 0 || *v == '\0')
      s->starttls = PGR_STARTTLS_NO;
    else if (strcmp(v, "try") == 0)
      s->starttls = PGR_STARTTLS_TRY;
    else if (strcmp(v, "require") == 0)
      s->starttls = PGR_STARTTLS_REQUIRE;
    else
      return usage_error(
          errbuf, errlen,
          "PGRUNNER_SMTP_STARTTLS: \"%s\" is not no, try or require", v);
  }
  set_str(&s->mail_from, getenv("PGRUNNER_MAIL_FROM"));
  set_str(&s->helo_domain, getenv("PGRUNNER_SMTP_HELO"));
  set_str(&s->message_id_domain, getenv("PGRUNNER_MESSAGE_ID_DOMAIN"));
  set_str(&s->ca_file, getenv("PGRUNNER_SMTP_CA_FILE"));
  if ((v = getenv("PGRUNNER_SMTP_TIMEOUT")) != NULL) {
    if (pgr_parse_int(v, 1, 3600, &n) != 0)
      return usage_error(errbuf, errlen,
                         "PGRUNNER_SMTP_TIMEOUT: \"%s\" is not a number of "
                         "seconds from 1 to 3600",
                         v);
    s->timeout_s = (int)n;
  }
  return 0;
}

static void http_allow_free(struct pgr_http_allow *a) {
  for (size_t i = 0; i < a->n; i++)
    free(a->hosts[i]);
  free(a->hosts);
  memset(a, 0, sizeof *a);
}

/* PGRUNNER_HTTP_ALLOW: host names or addresses separated by commas, spaces
   around them ignored, an IPv6 address with or without brackets. Only
   name characters are accepted, so a scheme, port, path or wildcard is a
   usage error rather than an entry that never matches. */
static int http_allow_parse(const char *value, struct pgr_http_allow *out,
                            char *errbuf, size_t errlen) {
  char *copy = pgr_strdup(value), *save = NULL;
  int rc = 0;

  memset(out, 0, sizeof *out);
  for (char *e = strtok_r(copy, ",", &save); e;
       e = strtok_r(NULL, ",", &save)) {
    while (*e == ' ' || *e == '\t')
      e++;
    pgr_trim_end(e);
    size_t n = strlen(e);
    if (n == 0)
      continue;
    if (n >= 2 && e[0] == '[' && e[n - 1] == ']') {
      e[n - 1] = '\0';
      e++;
    }
    /* One colon is a port; an IPv6 address has at least two. */
    const char *colon = strchr(e, ':');
    int port = colon != NULL && strchr(colon + 1, ':') == NULL;
    for (char *p = e; *p; p++) {
      if (port || (!isalnum((unsigned char)*p) && *p != '.' && *p != '-' &&
                   *p != '_' && *p != ':')) {
        rc = usage_error(errbuf, errlen,
                         "PGRUNNER_HTTP_ALLOW: \"%.64s\" is not a host name "
                         "or address (no scheme, port, path or wildcard)",
                         e);
        goto out;
      }
      *p = (char)tolower((unsigned char)*p);
    }
    out->hosts = pgr_realloc(out->hosts, (out->n + 1) * sizeof *out->hosts);
    out->hosts[out->n++] = pgr_strdup(e);
  }
out:
  free(copy);
  if (rc != 0)
    http_allow_free(out);
  return rc;
}

static const struct {
  const char *name;
  enum pgr_command cmd;
} commands[] = {
    {"work", PGR_CMD_WORK},     {"add", PGR_CMD_ADD},
    {"status", PGR_CMD_STATUS}, {"cancel", PGR_CMD_CANCEL},
    {"retry", PGR_CMD_RETRY},   {"migrate", PGR_CMD_MIGRATE},
    {"web", PGR_CMD_WEB},       {"help", PGR_CMD_HELP},
};

/* The option table of a command: the globals plus its own. */
static struct option *options_for(enum pgr_command cmd) {
  const struct option *own = NULL;
  size_t ng = PGR_ARRAY_LEN(global_opts) - 1, no = 0;
  struct option *all;

  switch (cmd) {
  case PGR_CMD_WORK:
    own = work_opts;
    no = PGR_ARRAY_LEN(work_opts) - 1;
    break;
  case PGR_CMD_ADD:
    own = add_opts;
    no = PGR_ARRAY_LEN(add_opts) - 1;
    break;
  case PGR_CMD_STATUS:
    own = status_opts;
    no = PGR_ARRAY_LEN(status_opts) - 1;
    break;
  case PGR_CMD_WEB:
    own = web_opts;
    no = PGR_ARRAY_LEN(web_opts) - 1;
    break;
  default:
    break;
  }
  all = pgr_calloc(ng + no + 1, sizeof *all);
  memcpy(all, global_opts, ng * sizeof *all);
  if (no)
    memcpy(all + ng, own, no * sizeof *all);
  return all;
}

static void defaults(struct pgr_config *cfg) {
  memset(cfg, 0, sizeof *cfg);
  cfg->concurrency = 8;
  cfg->poll_interval_ms = 1000;
  cfg->shutdown_timeout_s = 30;
  cfg->jobs_schema = pgr_strdup("pgrunner_jobs");
  cfg->retention_s = 7 * 86400;
  cfg->task_timeout_s = 300;
  cfg->log_level = PGR_LEVEL_INFO;
  cfg->log_format = PGR_LOG_TEXT;
  cfg->add_delay_s = -1;
}

int pgr_config_parse(struct pgr_config *cfg, int argc, char **argv,
                     char *errbuf, size_t errlen) {
  unsigned char given[NOPTS] = {0};
  struct option *opts = NULL;
  char **args = NULL; /* positional arguments after the command */
  int nargs = 0;
  int rc = 0;
  int i;

  defaults(cfg);
  errbuf[0] = '\0';

  /* The command is the first argument that is not an option (or its value). */
  for (i = 1; i < argc; i++) {
    const char *a = argv[i];
    if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
      cfg->help = 1;
      continue;
    }
    if (strcmp(a, "--version") == 0) {
      if (cfg->command == PGR_CMD_NONE)
        cfg->command = PGR_CMD_VERSION;
      continue;
    }
    if (a[0] == '-' && a[1] == '-') {
      /* a global option before the command; skip its value */
      if (strchr(a, '=') == NULL &&
          (strcmp(a, "--db") == 0 || strcmp(a, "--log-dir") == 0 ||
           strcmp(a, "--log-level") == 0 || strcmp(a, "--log-format") == 0))
        i++;
      continue;
    }
    if (a[0] == '-') {
      rc = usage_error(errbuf, errlen, "unknown option \"%s\"", a);
      goto out;
    }
    for (size_t c = 0; c < PGR_ARRAY_LEN(commands); c++) {
      if (strcmp(a, commands[c].name) == 0)
        cfg->command = commands[c].cmd;
    }
    if (cfg->command == PGR_CMD_NONE || cfg->command == PGR_CMD_VERSION) {
      rc = usage_error(errbuf, errlen,
                       "unknown command \"%s\" (try 'pgrunner --help')", a);
      goto out;
    }
    break;
  }
  if (cfg->command == PGR_CMD_HELP) {
    cfg->command = PGR_CMD_NONE;
    cfg->help = 1;
  }
  if (cfg->command == PGR_CMD_VERSION || cfg->help)
    goto out;
  if (cfg->command == PGR_CMD_NONE) {
    rc =
        usage_error(errbuf, errlen, "no command given (try 'pgrunner --help')");
    goto out;
  }

  {
    const char *u = getenv("DATABASE_URL");
    if (u == NULL || *u == '\0')
      u = getenv("PGRUNNER_DB");
    if (u && *u)
      set_str(&cfg->db, u);
  }

  opts = options_for(cfg->command);
  args = pgr_calloc((size_t)argc + 1, sizeof *args);
  optind = 1;
  opterr = 0;
  for (;;) {
    int idx = 0;
    /* "-" first: positional arguments are returned in order as 1. */
    int c = getopt_long(argc, argv, "-:", opts, &idx);
    if (c == -1)
      break;
    if (c == 1) {
      args[nargs++] = optarg;
      continue;
    }
    if (c == '?') {
      rc = usage_error(
          errbuf, errlen, "unknown option \"%s\" for '%s'", argv[optind - 1],
          pgr_config_usage(cfg->command) == usage_main ? "pgrunner" : argv[0]);
      /* A clearer message: name the command. */
      for (size_t k = 0; k < PGR_ARRAY_LEN(commands); k++)
        if (commands[k].cmd == cfg->command)
          snprintf(errbuf, errlen, "unknown option \"%s\" for 'pgrunner %s'",
                   argv[optind - 1], commands[k].name);
      goto out;
    }
    if (c == ':') {
      rc = usage_error(errbuf, errlen, "option \"%s\" needs a value",
                       argv[optind - 1]);
      goto out;
    }
    if (c == OPT_HELP) {
      cfg->help = 1;
      continue;
    }
    if (c == OPT_VERSION)
      continue;
    char src[64];
    snprintf(src, sizeof src, "--%s", opts[idx].name);
    for (const struct option *o = opts; o->name; o++)
      if (o->val == c)
        snprintf(src, sizeof src, "--%s", o->name);
    if ((rc = apply(cfg, c, optarg, src, errbuf, errlen)) != 0)
      goto out;
    given[c - OPT_DB] = 1;
  }
  /* Help needs nothing from the environment, so a bad value there must not
     hide it. */
  if (cfg->help)
    goto out;

  /* The environment after the flags, for the options no flag gave. */
  if ((rc = apply_env(cfg, global_env, PGR_ARRAY_LEN(global_env), given, errbuf,
                      errlen)) != 0)
    goto out;
  if (cfg->command == PGR_CMD_WEB &&
      (rc = apply_env(cfg, web_env, PGR_ARRAY_LEN(web_env), given, errbuf,
                      errlen)) != 0)
    goto out;
  if (cfg->command == PGR_CMD_WORK) {
    if ((rc = apply_env(cfg, work_env, PGR_ARRAY_LEN(work_env), given, errbuf,
                        errlen)) != 0)
      goto out;
    const char *plugins = getenv("PGRUNNER_PLUGIN");
    if (plugins && *plugins && !given[OPT_PLUGIN - OPT_DB]) {
      /* Several plugins: separated by ':' as in PATH. */
      char *copy = pgr_strdup(plugins), *save = NULL;
      for (char *p = strtok_r(copy, ":", &save); p;
           p = strtok_r(NULL, ":", &save))
        (void)apply(cfg, OPT_PLUGIN, p, "PGRUNNER_PLUGIN", errbuf, errlen);
      free(copy);
    }
    if ((rc = smtp_from_env(&cfg->smtp, errbuf, errlen)) != 0)
      goto out;
    const char *allow = getenv("PGRUNNER_HTTP_ALLOW");
    if (allow != NULL &&
        (rc = http_allow_parse(allow, &cfg->http_allow, errbuf, errlen)) != 0)
      goto out;
  }

  /* args[0] is the command itself. */
  switch (cfg->command) {
  case PGR_CMD_ADD:
    if (nargs < 2) {
      rc = usage_error(errbuf, errlen,
                       "add: missing KIND (usage: pgrunner add KIND "
                       "[PAYLOAD_JSON] [OPTIONS])");
      goto out;
    }
    if (nargs > 3) {
      rc = usage_error(errbuf, errlen, "add: unexpected argument \"%s\"",
                       args[3]);
      goto out;
    }
    if (args[1][0] == '\0' || strlen(args[1]) > 200) {
      rc = usage_error(errbuf, errlen, "add: KIND must be 1 to 200 characters");
      goto out;
    }
    for (const char *p = args[1]; *p; p++) {
      if ((unsigned char)*p < 0x20 || *p == 0x7f) {
        rc = usage_error(errbuf, errlen, "add: KIND has a control character");
        goto out;
      }
    }
    set_str(&cfg->add_kind, args[1]);
    if ((rc = parse_payload(cfg, nargs == 3 ? args[2] : "{}", errbuf,
                            errlen)) != 0)
      goto out;
    if (cfg->add_run_at && cfg->add_delay_s >= 0) {
      rc = usage_error(errbuf, errlen,
                       "add: give --run-at or --delay, not both");
      goto out;
    }
    break;
  case PGR_CMD_CANCEL:
  case PGR_CMD_RETRY:
    if (nargs != 2) {
      rc = usage_error(errbuf, errlen, "%s: expected one task ID",
                       cfg->command == PGR_CMD_CANCEL ? "cancel" : "retry");
      goto out;
    }
    if (pgr_parse_int(args[1], 1, INT64_MAX, &cfg->task_id) != 0) {
      rc = usage_error(errbuf, errlen,
                       "%s: \"%s\" is not a task id (a positive whole number)",
                       cfg->command == PGR_CMD_CANCEL ? "cancel" : "retry",
                       args[1]);
      goto out;
    }
    break;
  default:
    if (nargs > 1) {
      rc = usage_error(errbuf, errlen, "unexpected argument \"%s\"", args[1]);
      goto out;
    }
    break;
  }

  if (cfg->command == PGR_CMD_WEB && cfg->metrics_host == NULL) {
    cfg->metrics_host = pgr_strdup("127.0.0.1");
    cfg->metrics_port = 9188;
  }
  if (cfg->command == PGR_CMD_WORK && cfg->nqueues == 0) {
    cfg->queues = pgr_calloc(1, sizeof *cfg->queues);
    cfg->queues[0].name = pgr_strdup("default");
    cfg->nqueues = 1;
  }

out:
  free(opts);
  free(args);
  return rc;
}

const char *pgr_config_listen_db(const struct pgr_config *cfg) {
  return cfg->listen_db ? cfg->listen_db : cfg->db;
}

void pgr_config_free(struct pgr_config *cfg) {
  free(cfg->db);
  free(cfg->listen_db);
  free_queues(cfg->queues, cfg->nqueues);
  free(cfg->metrics_host);
  for (size_t i = 0; i < cfg->nplugins; i++)
    free(cfg->plugins[i]);
  free(cfg->plugins);
  free(cfg->jobs_schema);
  free(cfg->smtp.host);
  free(cfg->smtp.user);
  free(cfg->smtp.password);
  free(cfg->smtp.mail_from);
  free(cfg->smtp.helo_domain);
  free(cfg->smtp.message_id_domain);
  free(cfg->smtp.ca_file);
  http_allow_free(&cfg->http_allow);
  free(cfg->log_dir);
  free(cfg->add_kind);
  free(cfg->add_payload);
  free(cfg->add_queue);
  free(cfg->add_run_at);
  free(cfg->add_key);
  memset(cfg, 0, sizeof *cfg);
}

int pgr_config_queue_index(const struct pgr_config *cfg, const char *name) {
  for (size_t i = 0; i < cfg->nqueues; i++)
    if (strcmp(cfg->queues[i].name, name) == 0)
      return (int)i;
  return -1;
}
