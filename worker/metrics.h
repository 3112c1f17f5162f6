/*
 * metrics.h - counters for /metrics and the state behind /healthz.
 *
 * Thread: the update functions are called on the loop thread and take a
 * mutex for a few instructions; the HTTP server (http.c, its own
 * thread) reads under the same mutex. Nothing here does I/O on the caller.
 */
#ifndef PGR_METRICS_H
#define PGR_METRICS_H

#include <stddef.h>

#include "common.h"
#include "pool.h"

void pgr_metrics_task_started(const char *queue, const char *kind);
void pgr_metrics_task_done(const char *queue, const char *kind,
                           enum pgr_done done, double seconds);
void pgr_metrics_set_running(int n);
void pgr_metrics_set_db_up(int up);
/* A claim statement succeeded (whether or not it found tasks). */
void pgr_metrics_claim_succeeded(void);
/* Append a label value escaped for the text format (backslash, quote,
 * newline). */
void pgr_metrics_add_label_value(struct pgr_buf *b, const char *v);
/* The Prometheus text of the current counters (malloc'd); for tests too. */
char *pgr_metrics_render(void);
/* The /healthz answer: the HTTP status, and a one-line body (malloc'd). */
int pgr_metrics_health(char **body);

#endif /* PGR_METRICS_H */
