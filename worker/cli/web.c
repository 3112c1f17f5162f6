/*
 * web.c - `pgrunner web`: the dashboard without a worker, for a container
 * of its own.
 *
 * Thread: the main thread blocks in sigwait() while libmicrohttpd's thread
 * serves; SIGINT and SIGTERM are blocked first, so that thread and every
 * other never sees them.
 */
#include <signal.h>
#include <stdio.h>

#include "cli/cli.h"
#include "log.h"
#include "web/http.h"

int pgr_cmd_web(const struct pgr_config *cfg) {
  sigset_t set;
  char err[512];
  int sig = 0, rc;

  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  pgr_http_set_database(cfg->db, "pgrunner/web", NULL, 0);
  pgr_http_enable_dashboard(1);
  rc = pgr_http_start(cfg->metrics_host, cfg->metrics_port, err, sizeof err);
  if (rc != 0) {
    fprintf(stderr, "pgrunner: web: --listen: %s\n", err);
    pgr_error("web: cannot listen", PGR_LS("error", err));
    pgr_http_stop();
    return rc == PGR_EUSAGE ? PGR_EUSAGE : rc;
  }
  pgr_info("web: serving the dashboard", PGR_LS("host", cfg->metrics_host),
           PGR_LI("port", cfg->metrics_port));
  while (sigwait(&set, &sig) != 0)
    ;
  pgr_info("web: stopping", PGR_LI("signal", sig));
  pgr_http_stop();
  return 0;
}
