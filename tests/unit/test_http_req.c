/*
 * test_http_req.c - the `http` kind's pure parts (worker/jobs/http_req.c):
 * the payload parser, the status classes, Retry-After and the raw JSON
 * span of the body. The requests themselves are tested by
 * tests/integration/test_http_kind.py against a real server.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stdlib.h>
#include <string.h>

#include "jobs/http_req.h"

static const struct pgr_http_allow any = {NULL, 0};

Test(http_req, builds_a_post_with_the_idempotency_key_last) {
  struct pgr_http_req r;
  char err[256];
  cr_assert(
      eq(int,
         pgr_http_parse("{\"url\": \"https://u:pw@Example.org:8443/h?t=1\","
                        " \"headers\": {\"X-A\": \"b\"},"
                        " \"body\": {\"n\": 0.1}}",
                        7, &any, &r, err, sizeof err),
         0),
      "%s", err);
  cr_expect(eq(str, r.method, "POST"), "POST is the default method");
  cr_expect(eq(str, r.shown, "https://Example.org:8443/h"),
            "the shown URL has no userinfo or query");
  cr_expect(eq(str, r.body, "{\"n\": 0.1}"), "the body keeps its digits");
  cr_assert(eq(sz, r.nheaders, 3));
  cr_expect(eq(str, r.headers[0], "X-A: b"));
  cr_expect(eq(str, r.headers[1], "Content-Type: application/json"));
  cr_expect(eq(str, r.headers[2], "Idempotency-Key: pgrunner-7"));
  pgr_http_req_free(&r);
}

Test(http_req, refuses_what_it_must_with_a_reason) {
  static const struct {
    const char *payload, *why;
  } bad[] = {
      {"{}", "\"url\" is missing"},
      {"{\"url\": \"gopher://h/\"}",
       "\"url\" must use http or https, not gopher"},
      {"{\"url\": \"http://h/ x\"}",
       "\"url\" must not contain spaces or control characters"},
      {"{\"url\": \"http://h/\", \"method\": \"get\"}",
       "\"method\" \"get\" is not one of GET, HEAD, POST, PUT, PATCH, DELETE, "
       "OPTIONS"},
      {"{\"url\": \"http://h/\", \"headers\": {\"A\": \"x\\ry\"}}",
       "header A has a control character (CR, LF...) in its value"},
      {"{\"url\": \"http://h/\", \"headers\": {\"Content-Length\": \"1\"}}",
       "header Content-Length is set by pgrunner"},
      {"{\"url\": \"http://h/\", \"method\": \"HEAD\", \"body\": 1}",
       "a HEAD request takes no \"body\""},
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    struct pgr_http_req r;
    char err[256] = "";
    cr_expect(eq(int,
                 pgr_http_parse(bad[i].payload, 1, &any, &r, err, sizeof err),
                 PGR_EINVAL),
              "%s should be refused", bad[i].payload);
    cr_expect(eq(str, err, (char *)bad[i].why));
  }
}

Test(http_req, the_allow_list_matches_hosts_exactly) {
  char *hosts[] = {"example.org", "::1"};
  struct pgr_http_allow allow = {hosts, 2};
  struct pgr_http_req r;
  char err[256];
  cr_expect(eq(int,
               pgr_http_parse("{\"url\": \"http://EXAMPLE.org/\"}", 1, &allow,
                              &r, err, sizeof err),
               0));
  pgr_http_req_free(&r);
  cr_expect(eq(int,
               pgr_http_parse("{\"url\": \"http://[::1]:9/\"}", 1, &allow, &r,
                              err, sizeof err),
               0));
  pgr_http_req_free(&r);
  cr_expect(eq(int,
               pgr_http_parse("{\"url\": \"http://api.example.org/\"}", 1,
                              &allow, &r, err, sizeof err),
               PGR_EINVAL),
            "no subdomains");
  cr_expect(eq(str, err, "host api.example.org is not in PGRUNNER_HTTP_ALLOW"));
}

Test(http_req, classifies_statuses) {
  cr_expect(eq(int, pgr_http_classify(200), PGR_HTTP_OK));
  cr_expect(eq(int, pgr_http_classify(204), PGR_HTTP_OK));
  cr_expect(eq(int, pgr_http_classify(408), PGR_HTTP_RETRY));
  cr_expect(eq(int, pgr_http_classify(429), PGR_HTTP_RETRY));
  cr_expect(eq(int, pgr_http_classify(503), PGR_HTTP_RETRY));
  cr_expect(eq(int, pgr_http_classify(301), PGR_HTTP_PERMANENT));
  cr_expect(eq(int, pgr_http_classify(404), PGR_HTTP_PERMANENT));
  cr_expect(eq(int, pgr_http_classify(101), PGR_HTTP_PERMANENT));
}

Test(http_req, reads_retry_after_as_seconds_or_a_date) {
  time_t now = 1445412480; /* Wed, 21 Oct 2015 07:28:00 GMT */
  cr_expect(eq(i64, pgr_http_retry_after("120", now), 120000));
  cr_expect(eq(i64, pgr_http_retry_after(" 5 ", now), 5000));
  cr_expect(eq(i64, pgr_http_retry_after("Wed, 21 Oct 2015 07:29:00 GMT", now),
               60000));
  cr_expect(
      eq(i64, pgr_http_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now), 0),
      "a date in the past means now");
  cr_expect(eq(i64, pgr_http_retry_after("soon", now), -1));
  cr_expect(eq(i64, pgr_http_retry_after("12s", now), -1));
}

Test(http_req, finds_the_raw_text_of_a_top_level_value) {
  size_t at = 0, len = 0;
  const char *j = "{\"a\": \"}\\\"]\", \"body\": [1.50, {\"x\": \"]\"}],"
                  " \"b\\u006fdy\": 2e3 }";
  cr_assert(eq(int, pgr_http_json_span(j, "body", &at, &len), 0));
  char *v = strndup(j + at, len);
  cr_expect(eq(str, v, "2e3"), "the last one wins");
  free(v);
  cr_assert(eq(int,
               pgr_http_json_span("{\"body\": [1.50, {\"x\": \"]\"}]}", "body",
                                  &at, &len),
               0));
  cr_expect(eq(sz, len, 18));
  cr_expect(eq(int, pgr_http_json_span("{\"a\": 1}", "body", &at, &len), -1));
}
