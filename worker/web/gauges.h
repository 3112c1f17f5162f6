/*
 * gauges.h - the queue gauges of /metrics, read from the database at each
 * scrape.
 *
 * Thread: the HTTP server's thread (blocking reads on its own connection,
 * webdb.h).
 */
#ifndef PGR_GAUGES_H
#define PGR_GAUGES_H

#include <stddef.h>

#include <libpq-fe.h>

#include "common.h"

/* Counts stop here: a gauge at the cap means "at least this many". */
#define PGR_GAUGE_CAP 100000

/* Append the gauges of these queues to out, in the Prometheus text format.
 * When the database cannot be read, appends pgrunner_gauges_up 0 only. */
void pgr_gauges_render(const char *const *queues, size_t nqueues,
                       struct pgr_buf *out);

/* The gauges' rows for queues (an array literal): name, queued, not yet
 * due, oldest due age (s, NULL: none), running, failed in the last hour.
 * NULL with err on failure; caller PQclear()s. */
PGresult *pgr_gauges_query(PGconn *conn, const char *queues, char *err,
                           size_t errlen);

#endif /* PGR_GAUGES_H */
