/*
 * health.h - whether the worker can do its job, and if not, why: the state
 * behind /healthz.
 *
 * Thread: any. Each fact has one writer:
 *   - the loop thread: its claim connection (up, or down and why), the
 *     schema version it found, and the result of the latest claim;
 *   - each worker thread: its own connection attempts (failing and why, or
 *     connected);
 *   - the HTTP thread (metrics.c) only reads, through pgr_health_reason().
 * All of it sits under one mutex, held for a few stores or a copy of a
 * short string: a reason is a string, and a reader must see it together
 * with the flag it explains, which atomics cannot give without a lock of
 * their own. Nobody does I/O or waits under it, so the loop thread may
 * take it.
 */
#ifndef PGR_HEALTH_H
#define PGR_HEALTH_H

#include <stddef.h>

/* Forget everything; `nthreads` worker threads will report. */
void pgr_health_reset(int nthreads);

/* Loop thread. */
void pgr_health_loop_up(void);
void pgr_health_loop_down(const char *why);
void pgr_health_schema(int have, int need);
void pgr_health_claim_ok(void);
void pgr_health_claim_failed(const char *why);

/* Worker thread `index`. */
void pgr_health_thread_failed(int index, const char *why);
void pgr_health_thread_connected(int index);

/* 1 if the loop's claim connection is up (the pgrunner_db_up gauge). */
int pgr_health_db_up(void);

/*
 * 1 and "ok" if the worker can do its job; else 0 and one line saying why
 * (the first that applies: the claim connection, the schema, the worker
 * threads' connections, the claims).
 */
int pgr_health_reason(char *buf, size_t len);

#endif /* PGR_HEALTH_H */
