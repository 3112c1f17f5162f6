/*
 * dashboard.h - the web dashboard's pages and actions.
 *
 * Thread: the HTTP server's thread (blocking reads on webdb.h's
 * connection). Each function renders into a caller's buffer and returns the
 * HTTP status.
 */
#ifndef PGR_DASHBOARD_H
#define PGR_DASHBOARD_H

#include <stddef.h>

#include "common.h"

/* The overview: queues (with a chart of the last hour), running tasks,
 * recent failures, workers, schedules. queues: shown even when empty. */
int pgr_dash_index(const char *const *queues, size_t nqueues, int admin,
                   struct pgr_buf *out);
/* One task's page; 404 when there is no such task. */
int pgr_dash_task(const char *id, int admin, struct pgr_buf *out);
/* POST actions: "retry" or "cancel" one task; a JSON answer. */
int pgr_dash_action(const char *id, const char *action, struct pgr_buf *out);
/* A static file of the page (script, style): NULL if there is none. */
const char *pgr_dash_asset(const char *path, const char **ctype);

#endif /* PGR_DASHBOARD_H */
