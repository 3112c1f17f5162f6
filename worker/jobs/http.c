/*
 * http.c - the `http` handler: check the payload (http_req.c), send one
 * request with a libcurl easy handle, and sort the answer into success,
 * retry or permanent failure (see http.h).
 *
 * Thread: worker threads only (PGR_ASSERT_OFF_LOOP). libcurl is
 * thread-safe per easy handle once curl_global_init has run; each call
 * makes its own handle and frees it. CURLOPT_NOSIGNAL: libcurl must not
 * use SIGALRM for its timeouts in a threaded program (its own docs:
 * "threads and signals don't mix").
 *
 * The transfer is bounded twice: by the task's time limit
 * (CURLOPT_TIMEOUT_MS), and by an interrupt (cancel_task, the time limit's
 * watchdog, the shutdown deadline), which the progress callback reads;
 * libcurl calls it at least about once a second even while nothing moves,
 * and a nonzero answer aborts the transfer.
 */
#include "jobs/http.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <curl/curl.h>
#include <jansson.h>

#include "config.h"
#include "jobs/http_req.h"
#include "log.h"

int pgr_http_global_init(void) {
  return curl_global_init(CURL_GLOBAL_DEFAULT) == CURLE_OK ? 0 : PGR_EIO;
}

void pgr_http_global_cleanup(void) {
  curl_global_cleanup();
}

/* The answer's body: the first PGR_HTTP_BODY_KEEP bytes, and how many came. */
struct answer {
  struct pgr_buf kept;
  size_t total;
};

static size_t on_body(char *data, size_t size, size_t nmemb, void *arg) {
  struct answer *a = arg;
  size_t n = size * nmemb;
  if (a->kept.len < PGR_HTTP_BODY_KEEP) {
    size_t room = PGR_HTTP_BODY_KEEP - a->kept.len;
    pgr_buf_add(&a->kept, data, n < room ? n : room);
  }
  a->total += n;
  return n;
}

static int on_progress(void *arg, curl_off_t dltotal, curl_off_t dlnow,
                       curl_off_t ultotal, curl_off_t ulnow) {
  struct pgr_job *job = arg;
  (void)dltotal;
  (void)dlnow;
  (void)ultotal;
  (void)ulnow;
  return job->interrupted(job) ? 1 : 0;
}

/* The body as a JSON string's content: UTF-8, with every byte that is not
   (a NUL, which jsonb refuses, or a character cut at the end) as U+FFFD. */
static void add_utf8(struct pgr_buf *b, const char *s, size_t n) {
  const unsigned char *p = (const unsigned char *)s, *end = p + n;
  while (p < end) {
    size_t k = pgr_utf8_len(p, (size_t)(end - p));
    if (k == 0 || *p == '\0') {
      pgr_buf_add(b, "\xef\xbf\xbd", 3);
      p++;
    } else {
      pgr_buf_add(b, (const char *)p, k);
      p += k;
    }
  }
}

static int is_json_type(const char *ctype) {
  if (ctype == NULL)
    return 0;
  size_t n = strcspn(ctype, ";");
  while (n > 0 && ctype[n - 1] == ' ')
    n--;
  return (n == 16 && strncasecmp(ctype, "application/json", 16) == 0) ||
         (n > 5 && strncasecmp(ctype + n - 5, "+json", 5) == 0);
}

/* {"status": N, "body": ..., "truncated": true}: a JSON body as it came
   (when it is whole and parses), anything else as a string. */
static char *output_json(long status, const struct answer *a,
                         const char *ctype) {
  struct pgr_buf o;
  int cut = a->total > a->kept.len;
  pgr_buf_init(&o);
  pgr_buf_printf(&o, "{\"status\": %ld, \"body\": ", status);
  json_t *v = NULL;
  if (!cut && a->kept.len > 0 && is_json_type(ctype))
    v = json_loadb(a->kept.data, a->kept.len, JSON_DECODE_ANY, NULL);
  if (v != NULL) {
    pgr_buf_add(&o, a->kept.data, a->kept.len);
    json_decref(v);
  } else {
    struct pgr_buf t;
    pgr_buf_init(&t);
    add_utf8(&t, a->kept.data ? a->kept.data : "", a->kept.len);
    json_t *str = json_stringn(t.data ? t.data : "", t.len);
    char *text = json_dumps(str, JSON_ENCODE_ANY);
    PGR_ASSERT(text != NULL);
    pgr_buf_adds(&o, text);
    free(text);
    json_decref(str);
    pgr_buf_free(&t);
  }
  if (cut)
    pgr_buf_adds(&o, ", \"truncated\": true");
  pgr_buf_addc(&o, '}');
  return o.data;
}

/* "POST https://host/path: HTTP 503: <the body's first 200 bytes>". */
static void status_error(struct pgr_job *job, const struct pgr_http_req *r,
                         long status, const struct answer *a) {
  struct pgr_buf m;
  pgr_buf_init(&m);
  pgr_buf_printf(&m, "%s %s: HTTP %ld", r->method, r->shown, status);
  if (a->kept.len > 0) {
    size_t n = a->kept.len < 200 ? a->kept.len : 200;
    pgr_buf_adds(&m, ": ");
    for (size_t i = 0; i < n; i++) {
      char c = a->kept.data[i];
      pgr_buf_addc(&m, c == '\r' || c == '\n' || c == '\t' ? ' ' : c);
    }
  }
  job->fail(job, m.data);
  pgr_buf_free(&m);
}

static void set_method(CURL *h, const struct pgr_http_req *r) {
  if (strcmp(r->method, "GET") == 0) {
    curl_easy_setopt(h, CURLOPT_HTTPGET, 1L);
    return;
  }
  if (strcmp(r->method, "HEAD") == 0) {
    curl_easy_setopt(h, CURLOPT_NOBODY, 1L);
    return;
  }
  if (r->body != NULL || strcmp(r->method, "POST") == 0) {
    curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE,
                     (curl_off_t)(r->body ? r->body_len : 0));
    curl_easy_setopt(h, CURLOPT_POSTFIELDS, r->body ? r->body : "");
  }
  if (strcmp(r->method, "POST") != 0)
    curl_easy_setopt(h, CURLOPT_CUSTOMREQUEST, r->method);
}

enum pgr_outcome pgr_http_handler(struct pgr_job *job, void *arg) {
  PGR_ASSERT_OFF_LOOP();
  const struct pgr_http_allow *allow = arg;
  struct pgr_http_req r;
  struct answer a;
  struct curl_slist *hdrs = NULL;
  char reason[512], cerr[CURL_ERROR_SIZE];
  enum pgr_outcome outcome = PGR_RETRY;
  CURL *h = NULL;
  long timeout_ms =
      (job->task->timeout_seconds > 0 ? (long)job->task->timeout_seconds
                                      : 300L) *
      1000L;

  /* Everything that can make the task fail for good is checked here,
     before a connection is opened: a bad payload sends nothing. */
  if (pgr_http_parse(job->task->payload, job->task->id, allow, &r, reason,
                     sizeof reason) != 0) {
    char msg[600];
    snprintf(msg, sizeof msg, "invalid http payload: %s", reason);
    job->fail(job, msg);
    return PGR_PERMANENT;
  }
  pgr_buf_init(&a.kept);
  a.total = 0;

  h = curl_easy_init();
  if (h == NULL) {
    job->fail(job, "http: cannot create a libcurl handle");
    goto out;
  }
  for (size_t i = 0; i < r.nheaders; i++)
    hdrs = curl_slist_append(hdrs, r.headers[i]);
  /* No "Expect: 100-continue" wait before a large body. */
  hdrs = curl_slist_append(hdrs, "Expect:");
  PGR_ASSERT(hdrs != NULL);
  cerr[0] = '\0';
  curl_easy_setopt(h, CURLOPT_URL, r.url);
  curl_easy_setopt(h, CURLOPT_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
  curl_easy_setopt(h, CURLOPT_FOLLOWLOCATION, 0L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, timeout_ms);
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, hdrs);
  curl_easy_setopt(h, CURLOPT_USERAGENT, "pgrunner/" PGR_VERSION);
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, cerr);
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &a);
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, job);
  set_method(h, &r);

  uint64_t t0 = pgr_now_us();
  CURLcode rc = curl_easy_perform(h);
  int64_t ms = (int64_t)(pgr_now_us() - t0) / 1000;

  if (rc == CURLE_OK) {
    long status = 0;
    char *ctype = NULL;
    curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
    curl_easy_getinfo(h, CURLINFO_CONTENT_TYPE, &ctype);
    char *out = output_json(status, &a, ctype);
    /* Built to be valid (a JSON body only as jansson accepted it); a
       refusal would be our bug, and costs the output, not the task. */
    if (job->set_output(job, out) != 0)
      pgr_warn("http answer not kept as output", PGR_LI("task", job->task->id));
    free(out);
    switch (pgr_http_classify(status)) {
    case PGR_HTTP_OK:
      outcome = PGR_SUCCESS;
      pgr_info("http request succeeded", PGR_LI("task", job->task->id),
               PGR_LS("method", r.method), PGR_LS("url", r.shown),
               PGR_LI("status", status), PGR_LI("bytes", (int64_t)a.total),
               PGR_LI("duration_ms", ms));
      break;
    case PGR_HTTP_RETRY: {
      struct curl_header *ra;
      outcome = PGR_RETRY;
      status_error(job, &r, status, &a);
      if (curl_easy_header(h, "Retry-After", 0, CURLH_HEADER, -1, &ra) ==
          CURLHE_OK) {
        int64_t delay = pgr_http_retry_after(ra->value, time(NULL));
        if (delay >= 0)
          job->retry_after(job, delay);
      }
      break;
    }
    case PGR_HTTP_PERMANENT:
      outcome = PGR_PERMANENT;
      status_error(job, &r, status, &a);
      break;
    }
  } else if (rc == CURLE_ABORTED_BY_CALLBACK) {
    snprintf(reason, sizeof reason, "%s %s: interrupted", r.method, r.shown);
    job->fail(job, reason);
  } else if (rc == CURLE_OPERATION_TIMEDOUT) {
    snprintf(reason, sizeof reason,
             "%s %s: no complete answer within the task's time limit of %ld s",
             r.method, r.shown, timeout_ms / 1000);
    job->fail(job, reason);
  } else {
    /* No answer: refused, reset, a name not found, TLS. Worth another try
       later; libcurl's message names the host, never the userinfo. */
    snprintf(reason, sizeof reason, "%s %s: %s", r.method, r.shown,
             cerr[0] ? cerr : curl_easy_strerror(rc));
    job->fail(job, reason);
    if (rc == CURLE_UNSUPPORTED_PROTOCOL || rc == CURLE_URL_MALFORMAT)
      outcome = PGR_PERMANENT;
  }

out:
  curl_slist_free_all(hdrs);
  if (h != NULL)
    curl_easy_cleanup(h);
  pgr_buf_free(&a.kept);
  pgr_http_req_free(&r);
  return outcome;
}
