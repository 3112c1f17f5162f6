/*
 * http_req.h - turn an `http` task's JSON payload into one HTTP request,
 * and read what comes back (status class, Retry-After), without touching
 * the network.
 *
 * Thread: any; the functions are pure (no globals, no I/O), so the http
 * handler (jobs/http.c) and the fuzz target call them directly.
 *
 * What it guarantees about a request it builds: the scheme is http or
 * https, the host is on the allow-list when there is one, the method is one
 * of GET HEAD POST PUT PATCH DELETE OPTIONS, and no header line holds a CR,
 * LF or NUL (so none can smuggle another header). `shown` is the URL as
 * messages and logs may name it: no user name, password, query or fragment.
 *
 * Ownership: pgr_http_parse() fills a caller-owned struct pgr_http_req
 * whose strings it owns; pgr_http_req_free() releases them.
 */
#ifndef PGR_HTTP_REQ_H
#define PGR_HTTP_REQ_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "common.h"
#include "config.h"

/* At most this much of a response body is kept in the task's output. */
#define PGR_HTTP_BODY_KEEP 16384

struct pgr_http_req {
  char *url;   /* as given: libcurl connects to it */
  char *shown; /* scheme://host[:port]/path, for messages */
  char method[8];
  char **headers; /* "Name: value" lines, the Idempotency-Key included */
  size_t nheaders;
  char *body; /* NULL: no body */
  size_t body_len;
};

/*
 * pgr_http_parse validates the payload and builds the request of task
 * `task_id`. On any problem it returns PGR_EINVAL and writes a one-line
 * reason (printable ASCII) into errbuf, e.g. `"url" must use http or
 * https, not ftp`; the task should then fail for good. `out` is left empty
 * on failure.
 */
PGR_MUSTCHECK int pgr_http_parse(const char *payload, int64_t task_id,
                                 const struct pgr_http_allow *allow,
                                 struct pgr_http_req *out, char *errbuf,
                                 size_t errlen);
void pgr_http_req_free(struct pgr_http_req *r);

enum pgr_http_class {
  PGR_HTTP_OK,        /* 2xx */
  PGR_HTTP_RETRY,     /* 408, 429, 5xx */
  PGR_HTTP_PERMANENT, /* 1xx, 3xx (redirects are not followed), other 4xx */
};
enum pgr_http_class pgr_http_classify(long status);

/*
 * pgr_http_retry_after reads a Retry-After value (RFC 9110 10.2.3): a
 * number of seconds, or an HTTP date (then the time from `now` until it,
 * at least 0). Returns milliseconds, or -1 if the value is neither.
 */
int64_t pgr_http_retry_after(const char *value, time_t now);

/*
 * pgr_http_json_span finds the value of top-level key `key` in `json`, a
 * JSON object jansson has accepted, as it is written there (so numbers
 * keep their digits: jansson would print 0.1 back as 0.10000000000000001).
 * The last occurrence wins, as in jansson and jsonb. 0 and the span, or -1.
 */
int pgr_http_json_span(const char *json, const char *key, size_t *start,
                       size_t *len);

#endif /* PGR_HTTP_REQ_H */
