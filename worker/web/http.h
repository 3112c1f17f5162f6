/*
 * http.h - the worker's HTTP endpoint: /metrics and /healthz, served by
 * libmicrohttpd on a thread of its own.
 *
 * Thread: start and stop run on the thread that owns the worker's lifecycle;
 * requests are answered on libmicrohttpd's thread, which only reads the
 * metrics module's state (under its mutex), so the event loop never serves,
 * formats or waits for a client.
 */
#ifndef PGR_HTTP_H
#define PGR_HTTP_H

#include <stddef.h>

#include "common.h"

/* Listen on host:port ("localhost" means 127.0.0.1; "::" is dual stack).
 * PGR_EUSAGE for a bad address or a port in use, with a reason in errbuf. */
PGR_MUSTCHECK int pgr_http_start(const char *host, int port, char *errbuf,
                                 size_t errlen);
/* Before start: read the queue gauges of these queues from this database
 * (as application_name appname) for /metrics. Without it, /metrics has this
 * process's counters only. Copies everything. */
void pgr_http_set_database(const char *conninfo, const char *appname,
                           const char *const *queues, size_t nqueues);
/* Before start: serve the dashboard too (/, /task/ID, POST
 * /api/tasks/ID/retry|cancel with the PGRUNNER_ADMIN_TOKEN). standalone:
 * no worker runs in this process (`pgrunner web`), so /healthz reports
 * whether the database can be read. Needs pgr_http_set_database(). */
void pgr_http_enable_dashboard(int standalone);
/* Close the listener and every connection; harmless when not started. */
void pgr_http_stop(void);

#endif /* PGR_HTTP_H */
