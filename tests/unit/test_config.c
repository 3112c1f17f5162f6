/* Unit tests for config.c: flags, environment, and their validation. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"

static int parse(struct pgr_config *cfg, char *err, size_t errlen, int argc,
                 const char **argv) {
  return pgr_config_parse(cfg, argc, (char **)argv, err, errlen);
}

#define PARSE(cfg, err, ...)                                                   \
  ({                                                                           \
    const char *argv_[] = {"pgrunner", __VA_ARGS__};                           \
    parse(cfg, err, sizeof err, (int)(sizeof argv_ / sizeof argv_[0]), argv_); \
  })

static void clean_env(void) {
  unsetenv("DATABASE_URL");
  unsetenv("PGRUNNER_DB");
  unsetenv("PGRUNNER_CONCURRENCY");
  unsetenv("PGRUNNER_QUEUES");
  unsetenv("PGRUNNER_LOG_LEVEL");
  unsetenv("PGRUNNER_SMTP_PORT");
  unsetenv("PGRUNNER_POLL_INTERVAL");
  unsetenv("PGRUNNER_LOG_DIR");
  unsetenv("PGRUNNER_PLUGIN");
}

TestSuite(config, .init = clean_env);

Test(config, work_defaults_match_the_contract) {
  struct pgr_config cfg;
  char err[256];
  cr_assert(eq(int, PARSE(&cfg, err, "work"), 0), "%s", err);
  cr_expect(eq(int, cfg.command, PGR_CMD_WORK));
  cr_expect(eq(int, cfg.concurrency, 8), "concurrency defaults to 8");
  cr_expect(eq(int, cfg.poll_interval_ms, 1000));
  cr_expect(eq(int, cfg.shutdown_timeout_s, 30));
  cr_expect(eq(int, cfg.task_timeout_s, 300));
  cr_expect(eq(i64, cfg.retention_s, 7 * 86400), "retention defaults to 7d");
  cr_expect(eq(str, cfg.jobs_schema, "pgrunner_jobs"));
  cr_expect(eq(sz, cfg.nqueues, 1));
  cr_expect(eq(str, cfg.queues[0].name, "default"));
  cr_expect(eq(int, cfg.smtp.port, 25));
  pgr_config_free(&cfg);
}

Test(config, flags_win_over_environment) {
  struct pgr_config cfg;
  char err[256];
  setenv("PGRUNNER_CONCURRENCY", "3", 1);
  cr_assert(eq(int, PARSE(&cfg, err, "work"), 0), "%s", err);
  cr_expect(eq(int, cfg.concurrency, 3), "the environment is read");
  pgr_config_free(&cfg);
  cr_assert(eq(int, PARSE(&cfg, err, "work", "--concurrency", "5"), 0));
  cr_expect(eq(int, cfg.concurrency, 5), "the flag wins");
  pgr_config_free(&cfg);
}

Test(config, bad_values_are_usage_errors_naming_the_option) {
  struct pgr_config cfg;
  char err[256];
  static const char *bad[][2] = {
      {"--concurrency", "0"},
      {"--concurrency", "abc"},
      {"--poll-interval", "x"},
      {"--log-level", "loud"},
      {"--log-format", "xml"},
      {"--retention", "7x"},
      {"--task-timeout", "0"},
      {"--metrics-listen", "nonsense"},
      {"--jobs-schema", "Bad;"},
      {"--queues", ""},
      {"--queues", "a:0"},
      {"--queues", "a,a"},
      {"--log-dir", "/nonexistent/dir"},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    int rc = PARSE(&cfg, err, "work", bad[i][0], bad[i][1]);
    cr_expect(eq(int, rc, PGR_EUSAGE), "%s %s should be refused", bad[i][0],
              bad[i][1]);
    cr_expect(strstr(err, bad[i][0]) != NULL, "the message names %s: %s",
              bad[i][0], err);
    cr_expect(strchr(err, '\n') == NULL, "one line: %s", err);
    pgr_config_free(&cfg);
  }
}

Test(config, bad_environment_is_a_usage_error) {
  struct pgr_config cfg;
  char err[256];
  setenv("PGRUNNER_CONCURRENCY", "many", 1);
  cr_expect(eq(int, PARSE(&cfg, err, "work"), PGR_EUSAGE));
  cr_expect(strstr(err, "PGRUNNER_CONCURRENCY") != NULL, "%s", err);
  pgr_config_free(&cfg);
}

Test(config, a_flag_makes_its_variable_irrelevant_even_when_invalid) {
  struct pgr_config cfg;
  char err[256];
  setenv("PGRUNNER_CONCURRENCY", "abc", 1);
  setenv("PGRUNNER_LOG_LEVEL", "loud", 1);
  setenv("PGRUNNER_LOG_DIR", "/nonexistent/dir", 1);
  setenv("PGRUNNER_QUEUES", "a,a", 1);
  setenv("PGRUNNER_PLUGIN", "/env/plugin.so", 1);
  cr_assert(eq(int,
               PARSE(&cfg, err, "work", "--concurrency", "3", "--log-level",
                     "warn", "--log-dir", "/tmp", "--queues", "mail:2",
                     "--plugin", "/flag/plugin.so"),
               0),
            "flags override broken variables: %s", err);
  cr_expect(eq(int, cfg.concurrency, 3));
  cr_expect(eq(int, cfg.log_level, PGR_LEVEL_WARN));
  cr_expect(eq(str, cfg.log_dir, "/tmp"));
  cr_expect(eq(sz, cfg.nqueues, 1));
  cr_expect(eq(str, cfg.queues[0].name, "mail"));
  cr_expect(eq(sz, cfg.nplugins, 1), "--plugin replaces PGRUNNER_PLUGIN");
  cr_expect(eq(str, cfg.plugins[0], "/flag/plugin.so"));
  pgr_config_free(&cfg);
  /* A global option's variable is overridden for every command. */
  unsetenv("PGRUNNER_LOG_DIR");
  cr_expect(eq(int, PARSE(&cfg, err, "status", "--log-level", "error"), 0),
            "%s", err);
  cr_expect(eq(int, cfg.log_level, PGR_LEVEL_ERROR));
  pgr_config_free(&cfg);
}

Test(config, an_invalid_variable_without_its_flag_still_fails) {
  struct pgr_config cfg;
  char err[256];
  setenv("PGRUNNER_CONCURRENCY", "abc", 1);
  setenv("PGRUNNER_POLL_INTERVAL", "500", 1);
  /* Another option's flag does not excuse it. */
  cr_expect(
      eq(int, PARSE(&cfg, err, "work", "--poll-interval", "200"), PGR_EUSAGE));
  cr_expect(eq(str, err,
               "PGRUNNER_CONCURRENCY: \"abc\" is not a whole number from 1 "
               "to 1000"));
  pgr_config_free(&cfg);
  /* Valid variables without flags are still read. */
  unsetenv("PGRUNNER_CONCURRENCY");
  cr_assert(eq(int, PARSE(&cfg, err, "work", "--concurrency", "2"), 0), "%s",
            err);
  cr_expect(eq(int, cfg.concurrency, 2));
  cr_expect(eq(int, cfg.poll_interval_ms, 500));
  pgr_config_free(&cfg);
}

Test(config, help_ignores_the_environment) {
  struct pgr_config cfg;
  char err[256];
  setenv("PGRUNNER_CONCURRENCY", "abc", 1);
  setenv("PGRUNNER_LOG_LEVEL", "loud", 1);
  setenv("PGRUNNER_SMTP_PORT", "notaport", 1);
  static const char *cmds[] = {"work",   "add",   "status",
                               "cancel", "retry", "migrate"};
  for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++) {
    int rc = PARSE(&cfg, err, cmds[i], "--help");
    cr_expect(eq(int, rc, 0), "%s --help: %s", cmds[i], err);
    cr_expect(eq(int, cfg.help, 1), "%s --help asks for help", cmds[i]);
    pgr_config_free(&cfg);
  }
  cr_expect(eq(int, PARSE(&cfg, err, "--help"), 0), "%s", err);
  cr_expect(eq(int, cfg.help, 1));
  pgr_config_free(&cfg);
}

Test(config, queues_with_caps) {
  struct pgr_queue_cfg *q;
  size_t n;
  char err[256];
  cr_assert(eq(int,
               pgr_parse_queues("mail:2,default,bulk:10", "--queues", &q, &n,
                                err, sizeof err),
               0),
            "%s", err);
  cr_assert(eq(sz, n, 3));
  cr_expect(eq(str, q[0].name, "mail"));
  cr_expect(eq(int, q[0].cap, 2));
  cr_expect(eq(int, q[1].cap, 0), "no cap means 0");
  cr_expect(eq(int, q[2].cap, 10));
  for (size_t i = 0; i < n; i++)
    free(q[i].name);
  free(q);
  cr_expect(eq(int, pgr_parse_queues("a:", "--queues", &q, &n, err, sizeof err),
               PGR_EUSAGE));
  cr_expect(eq(
      int, pgr_parse_queues("a b", "PGRUNNER_QUEUES", &q, &n, err, sizeof err),
      PGR_EUSAGE));
}

Test(config, durations) {
  int64_t s;
  cr_expect(eq(int, pgr_parse_duration("7d", &s), 0));
  cr_expect(eq(i64, s, 604800));
  cr_expect(eq(int, pgr_parse_duration("1h30m", &s), 0));
  cr_expect(eq(i64, s, 5400));
  cr_expect(eq(int, pgr_parse_duration("3600", &s), 0));
  cr_expect(eq(i64, s, 3600), "a bare number is seconds");
  cr_expect(eq(int, pgr_parse_duration("2w", &s), 0));
  cr_expect(eq(i64, s, 14 * 86400));
  cr_expect(ne(int, pgr_parse_duration("", &s), 0));
  cr_expect(ne(int, pgr_parse_duration("7x", &s), 0));
  cr_expect(ne(int, pgr_parse_duration("-1d", &s), 0));
  cr_expect(ne(int, pgr_parse_duration("1d5", &s), 0));
}

Test(config, kinds_that_may_name_sql_functions) {
  cr_expect(pgr_valid_kind("send_email"));
  cr_expect(pgr_valid_kind("_x1"));
  cr_expect(not(pgr_valid_kind("Upper")));
  cr_expect(not(pgr_valid_kind("1abc")));
  cr_expect(not(pgr_valid_kind("x; drop table t")));
  cr_expect(not(pgr_valid_kind("public.f")));
  cr_expect(not(pgr_valid_kind("")));
  cr_expect(not(pgr_valid_kind("\"q\"")));
}

Test(config, add_validates_json_before_anything_else) {
  struct pgr_config cfg;
  char err[256];
  cr_expect(eq(int, PARSE(&cfg, err, "add", "email", "{bad"), PGR_EUSAGE));
  cr_expect(strstr(err, "JSON") != NULL, "%s", err);
  pgr_config_free(&cfg);
  cr_expect(
      eq(int, PARSE(&cfg, err, "add", "email", "{\"a\":1} x"), PGR_EUSAGE),
      "trailing garbage is refused");
  pgr_config_free(&cfg);
  cr_assert(eq(int,
               PARSE(&cfg, err, "add", "email", "{\"to\":\"a@b\"}", "--queue",
                     "mail", "--priority", "-3", "--key", "k", "--max-attempts",
                     "2", "--delay", "1.5"),
               0),
            "%s", err);
  cr_expect(eq(str, cfg.add_kind, "email"));
  cr_expect(eq(str, cfg.add_queue, "mail"));
  cr_expect(eq(int, cfg.add_priority, -3));
  cr_expect(eq(int, cfg.add_max_attempts, 2));
  cr_expect(eq(str, cfg.add_key, "k"));
  cr_expect(cfg.add_delay_s > 1.4 && cfg.add_delay_s < 1.6);
  pgr_config_free(&cfg);
  cr_expect(
      eq(int,
         PARSE(&cfg, err, "add", "x", "--delay", "1", "--run-at", "2030-01-01"),
         PGR_EUSAGE),
      "--delay and --run-at exclude each other");
  pgr_config_free(&cfg);
}

Test(config, ids_for_cancel_and_retry) {
  struct pgr_config cfg;
  char err[256];
  cr_expect(eq(int, PARSE(&cfg, err, "cancel", "42"), 0));
  cr_expect(eq(i64, cfg.task_id, 42));
  pgr_config_free(&cfg);
  cr_expect(eq(int, PARSE(&cfg, err, "retry", "abc"), PGR_EUSAGE));
  pgr_config_free(&cfg);
  cr_expect(eq(int, PARSE(&cfg, err, "retry", "-3"), PGR_EUSAGE));
  pgr_config_free(&cfg);
  cr_expect(eq(int, PARSE(&cfg, err, "cancel"), PGR_EUSAGE));
  pgr_config_free(&cfg);
}

Test(config, unknown_commands_and_options) {
  struct pgr_config cfg;
  char err[256];
  cr_expect(eq(int, PARSE(&cfg, err, "frobnicate"), PGR_EUSAGE));
  cr_expect(strstr(err, "frobnicate") != NULL);
  pgr_config_free(&cfg);
  cr_expect(eq(int, PARSE(&cfg, err, "work", "--bogus"), PGR_EUSAGE));
  cr_expect(strstr(err, "--bogus") != NULL, "%s", err);
  pgr_config_free(&cfg);
  cr_expect(
      eq(int, PARSE(&cfg, err, "add", "x", "--concurrency", "2"), PGR_EUSAGE),
      "work options are not add options");
  pgr_config_free(&cfg);
  cr_expect(eq(int, PARSE(&cfg, err, "--version"), 0));
  cr_expect(eq(int, cfg.command, PGR_CMD_VERSION));
  pgr_config_free(&cfg);
  cr_expect(eq(int, PARSE(&cfg, err, "work", "--help"), 0));
  cr_expect(eq(int, cfg.help, 1));
  pgr_config_free(&cfg);
}

Test(config, database_from_flag_then_environment) {
  struct pgr_config cfg;
  char err[256];
  setenv("DATABASE_URL", "postgres://env/db", 1);
  cr_assert(eq(int, PARSE(&cfg, err, "migrate"), 0));
  cr_expect(eq(str, cfg.db, "postgres://env/db"));
  pgr_config_free(&cfg);
  cr_assert(eq(int, PARSE(&cfg, err, "migrate", "--db", "dbname=x"), 0));
  cr_expect(eq(str, cfg.db, "dbname=x"), "--db wins over DATABASE_URL");
  pgr_config_free(&cfg);
  unsetenv("DATABASE_URL");
}
