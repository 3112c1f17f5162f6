/*
 * http.h - the built-in `http` job kind: one HTTP(S) request with libcurl
 * (webhooks).
 *
 * Thread: WORKER THREADS ONLY. The handler blocks on the network for at
 * most the task's time limit; it runs inside the task's attempt, while the
 * task's transaction is open. pgr_http_global_init() runs once on the main
 * thread before any worker thread starts (libcurl's curl_global_init is
 * not thread-safe).
 *
 * Ownership: the handler's arg is the worker's const struct pgr_http_allow
 * (&cfg->http_allow), read-only and alive for the whole run. Nothing
 * outlives a call: each request has its own easy handle.
 *
 * Outcomes: PGR_SUCCESS for a 2xx answer; PGR_RETRY for 408, 429, 5xx,
 * no answer (refused, reset, timed out, TLS problems) or an interrupt,
 * with the answer's Retry-After as the retry's delay; PGR_PERMANENT for a
 * bad payload (checked before any connection is made), a 1xx or 3xx
 * answer (redirects are not followed) and any other 4xx. The answer's
 * status and the first PGR_HTTP_BODY_KEEP bytes of its body become the
 * task's output, whatever the outcome. Messages and logs name the URL
 * without its user name, password and query.
 */
#ifndef PGR_HTTP_H
#define PGR_HTTP_H

#include "common.h"
#include "pgrunner.h"

/* curl_global_init, once, on the main thread. 0 or PGR_EIO. */
PGR_MUSTCHECK int pgr_http_global_init(void);
void pgr_http_global_cleanup(void);

/* arg: const struct pgr_http_allow *. */
enum pgr_outcome pgr_http_handler(struct pgr_job *job, void *arg);

#endif /* PGR_HTTP_H */
