/*
 * config.h - command-line flags and PGRUNNER_* environment variables turned
 * into one immutable struct pgr_config.
 *
 * Thread: built on the main thread before any other thread starts; read-only
 * afterwards, so every thread may read it without locks.
 * Ownership: pgr_config_parse() fills a caller-owned struct whose strings it
 * owns; pgr_config_free() releases them.
 */
#ifndef PGR_CONFIG_H
#define PGR_CONFIG_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "log.h"

enum pgr_command {
  PGR_CMD_NONE = 0,
  PGR_CMD_WORK,
  PGR_CMD_ADD,
  PGR_CMD_STATUS,
  PGR_CMD_CANCEL,
  PGR_CMD_RETRY,
  PGR_CMD_MIGRATE,
  PGR_CMD_WEB,
  PGR_CMD_HELP,
  PGR_CMD_VERSION,
};

enum pgr_starttls {
  PGR_STARTTLS_NO = 0,
  PGR_STARTTLS_TRY = 1,
  PGR_STARTTLS_REQUIRE = 2,
};

struct pgr_queue_cfg {
  char *name;
  int cap; /* most running tasks of this queue in this worker; 0: no cap */
};

struct pgr_smtp_config {
  char *host; /* NULL: localhost */
  int port;   /* 25 */
  char *user;
  char *password;
  enum pgr_starttls starttls;
  char *mail_from;
  char *helo_domain;       /* PGRUNNER_SMTP_HELO, else the host name */
  char *message_id_domain; /* PGRUNNER_MESSAGE_ID_DOMAIN, else the sender's */
  int timeout_s;           /* PGRUNNER_SMTP_TIMEOUT, 30 */
  char *ca_file; /* PGRUNNER_SMTP_CA_FILE: trusted instead of the default */
};

/* PGRUNNER_HTTP_ALLOW: the hosts `http` tasks may reach, lower-cased,
   IPv6 addresses without brackets; n == 0: any host. */
struct pgr_http_allow {
  char **hosts;
  size_t n;
};

struct pgr_config {
  enum pgr_command command;
  char *db; /* --db or DATABASE_URL; NULL: libpq's own defaults */
  /* --listen-db: the loop's connections, which need a session (LISTEN, the
     prepared claim, session settings); NULL: the same as db. */
  char *listen_db;

  /* work */
  struct pgr_queue_cfg *queues;
  size_t nqueues;
  int concurrency;
  int poll_interval_ms;
  int shutdown_timeout_s;
  char *metrics_host; /* NULL: off */
  int metrics_port;
  char **plugins;
  size_t nplugins;
  char *jobs_schema;
  int64_t retention_s;
  int task_timeout_s;
  struct pgr_smtp_config smtp;
  struct pgr_http_allow http_allow;

  /* logging, all commands */
  char *log_dir;
  enum pgr_level log_level;
  enum pgr_log_format log_format;

  /* add */
  char *add_kind;
  char *add_payload; /* validated JSON text */
  char *add_queue;
  char *add_run_at;
  double add_delay_s; /* <0: not given */
  int add_priority;
  int add_has_priority;
  int add_max_attempts; /* 0: not given */
  char *add_key;

  /* status */
  int json;

  /* cancel, retry */
  int64_t task_id;

  int help; /* COMMAND --help */
};

/*
 * Parse argv and the environment. On a usage error returns PGR_EUSAGE and
 * writes a one-line reason into errbuf.
 */
PGR_MUSTCHECK int pgr_config_parse(struct pgr_config *cfg, int argc,
                                   char **argv, char *errbuf, size_t errlen);
void pgr_config_free(struct pgr_config *cfg);

/* The conninfo of the loop's connections: --listen-db, else --db. */
const char *pgr_config_listen_db(const struct pgr_config *cfg);

/* The help text of a command (PGR_CMD_NONE: the overview). */
const char *pgr_config_usage(enum pgr_command cmd);

/* Parsers shared with the unit tests. */
PGR_MUSTCHECK int pgr_parse_duration(const char *s, int64_t *out_seconds);
/* `src` names the option or variable in messages ("--queues"). */
PGR_MUSTCHECK int pgr_parse_queues(const char *s, const char *src,
                                   struct pgr_queue_cfg **out, size_t *n,
                                   char *errbuf, size_t errlen);
PGR_MUSTCHECK int pgr_parse_int(const char *s, int64_t min, int64_t max,
                                int64_t *out);
PGR_MUSTCHECK int pgr_valid_kind(const char *kind);
/* The index of queue `name` in cfg->queues, or -1. */
int pgr_config_queue_index(const struct pgr_config *cfg, const char *name);

#endif /* PGR_CONFIG_H */
