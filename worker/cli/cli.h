/*
 * cli.h - the commands other than work: migrate, add, status, cancel,
 * retry, and web (which serves until it is stopped).
 *
 * Thread: the main thread of a short-lived process; these block on the
 * database (worker/db.h) and never run inside the worker's event loop.
 * Each returns 0 or a negative PGR_E*; main maps PGR_EUSAGE to exit 2 and
 * anything else to exit 1. Errors are reported (stderr and log) here.
 */
#ifndef PGR_CLI_H
#define PGR_CLI_H

#include "config.h"

PGR_MUSTCHECK int pgr_cmd_migrate(const struct pgr_config *cfg);
PGR_MUSTCHECK int pgr_cmd_add(const struct pgr_config *cfg);
PGR_MUSTCHECK int pgr_cmd_status(const struct pgr_config *cfg);
PGR_MUSTCHECK int pgr_cmd_cancel(const struct pgr_config *cfg);
PGR_MUSTCHECK int pgr_cmd_retry(const struct pgr_config *cfg);
/* Serve the dashboard until SIGINT or SIGTERM (web.c). */
PGR_MUSTCHECK int pgr_cmd_web(const struct pgr_config *cfg);

/* Used by `work` too: apply pending migrations on an open connection. */
struct pg_conn;
PGR_MUSTCHECK int pgr_migrate_conn(struct pg_conn *conn, int *applied,
                                   char *errbuf, size_t errlen);

#endif /* PGR_CLI_H */
