/*
 * main.c - argv + environment -> config; start the logger; run the command;
 * exit code.
 *
 * Thread: the main thread. For `work` it becomes the loop thread inside
 * pgr_loop_run(); the other commands block on the database here, which is
 * fine: they have no loop.
 *
 * Exit codes (SPEC section 5): 0 success or clean shutdown, 1 runtime
 * failure, 2 bad usage or bad configuration with a one-line reason on stderr.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cli/cli.h"
#include "config.h"
#include "jobs/email.h"
#include "jobs/email_msg.h"
#include "jobs/http.h"
#include "log.h"
#include "loop/loop.h"

static const char *proc_name(enum pgr_command cmd) {
  switch (cmd) {
  case PGR_CMD_WORK:
    return "worker";
  case PGR_CMD_ADD:
    return "add";
  case PGR_CMD_STATUS:
    return "status";
  case PGR_CMD_CANCEL:
    return "cancel";
  case PGR_CMD_RETRY:
    return "retry";
  case PGR_CMD_MIGRATE:
    return "migrate";
  case PGR_CMD_WEB:
    return "web";
  default:
    return "pgrunner";
  }
}

/*
 * libpq links libldap, which links GnuTLS, whose load-time constructor
 * initialises itself (priority files, PKCS#11 modules): about 0.7 MiB of
 * resident memory that pgrunner never uses. GnuTLS skips it when
 * GNUTLS_NO_IMPLICIT_INIT=1 is in the environment *before* it is loaded,
 * so a long-running worker started without it executes itself once more
 * with it set (same pid; nothing has run yet). libldap still initialises
 * GnuTLS itself if an LDAP lookup ever needs TLS. Setting the variable to
 * anything, e.g. 0, keeps the process as it is; a failed exec is harmless.
 */
static void reexec_without_gnutls_init(char **argv) {
  if (getenv("GNUTLS_NO_IMPLICIT_INIT") != NULL)
    return;
  if (setenv("GNUTLS_NO_IMPLICIT_INIT", "1", 1) != 0)
    return;
  execv("/proc/self/exe", argv);
  unsetenv("GNUTLS_NO_IMPLICIT_INIT");
}

int main(int argc, char **argv) {
  struct pgr_config cfg;
  char err[1024];
  int rc;

  /* A peer closing a socket must not kill us; writes report EPIPE. */
  signal(SIGPIPE, SIG_IGN);
  /* A SIGTERM that comes while `work` is still starting (before its loop
     watches signals) must stop it cleanly, not kill it: hold the stop
     signals from the first instruction on. Threads started meanwhile
     inherit the mask, so the main thread is the one that takes them once
     the loop unblocks them (pgr_loop_run); the other commands unblock them
     below, `web` waits for them with sigwait(). */
  pgr_stop_signals_mask(SIG_BLOCK);

  if (pgr_config_parse(&cfg, argc, argv, err, sizeof err) != 0) {
    fprintf(stderr, "pgrunner: %s\n", err);
    pgr_config_free(&cfg);
    return 2;
  }
  if (cfg.command == PGR_CMD_VERSION) {
    printf("pgrunner %s\n", PGR_VERSION);
    pgr_config_free(&cfg);
    return 0;
  }
  if (cfg.help) {
    fputs(pgr_config_usage(cfg.command), stdout);
    pgr_config_free(&cfg);
    return 0;
  }
  if (cfg.command == PGR_CMD_WORK) {
    if (pgr_email_check_config(&cfg.smtp, err, sizeof err) != 0 ||
        pgr_email_check_ca_file(&cfg.smtp, err, sizeof err) != 0) {
      fprintf(stderr, "pgrunner: %s\n", err);
      pgr_config_free(&cfg);
      return 2;
    }
    reexec_without_gnutls_init(argv);
    /* libcurl's global set-up, for the http kind: once, before any thread
       of ours starts (curl_global_init is not thread-safe everywhere). */
    if (pgr_http_global_init() != 0) {
      fprintf(stderr, "pgrunner: cannot initialise libcurl\n");
      pgr_config_free(&cfg);
      return 1;
    }
  }

  struct pgr_log_options lo = {
      .proc = proc_name(cfg.command),
      .level = cfg.log_level,
      .format = cfg.log_format,
      .dir = cfg.log_dir,
      .serve = cfg.command == PGR_CMD_WORK,
  };
  int lrc = pgr_log_start(&lo);
  if (lrc != 0) {
    /* The logger printed why. A socket another worker owns is a runtime
       condition (1); a bad directory is bad configuration (2). */
    pgr_config_free(&cfg);
    return lrc == PGR_EUSAGE ? 2 : 1;
  }

  if (cfg.command != PGR_CMD_WORK && cfg.command != PGR_CMD_WEB)
    pgr_stop_signals_mask(SIG_UNBLOCK);
  switch (cfg.command) {
  case PGR_CMD_WORK:
    rc = pgr_loop_run(&cfg);
    break;
  case PGR_CMD_MIGRATE:
    rc = pgr_cmd_migrate(&cfg);
    break;
  case PGR_CMD_ADD:
    rc = pgr_cmd_add(&cfg);
    break;
  case PGR_CMD_STATUS:
    rc = pgr_cmd_status(&cfg);
    break;
  case PGR_CMD_CANCEL:
    rc = pgr_cmd_cancel(&cfg);
    break;
  case PGR_CMD_RETRY:
    rc = pgr_cmd_retry(&cfg);
    break;
  case PGR_CMD_WEB:
    rc = pgr_cmd_web(&cfg);
    break;
  default:
    rc = PGR_EUSAGE;
    break;
  }
  enum pgr_command cmd = cfg.command;
  pgr_log_stop();
  pgr_config_free(&cfg);
  if (cmd == PGR_CMD_WORK) {
    pgr_http_global_cleanup();
    return rc; /* already an exit code */
  }
  return rc == 0 ? 0 : rc == PGR_EUSAGE ? 2 : 1;
}
