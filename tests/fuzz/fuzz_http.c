/*
 * fuzz_http.c - the http kind's payload parser, pgr_http_parse(), on any
 * text (a payload is whatever a producer inserted), with and without an
 * allow-list, and the Retry-After reader.
 *
 * A request it accepts: http or https, a method of the fixed list, header
 * lines "Name: value" with a token name and no CR, LF or NUL anywhere, the
 * Idempotency-Key last and naming the task, a `shown` URL without
 * userinfo, query or fragment, the host on the allow-list; a JSON body
 * equal (json_equal) to the payload's "body". A refusal has a printable
 * ASCII reason and leaves the request empty.
 */
#include <jansson.h>

#include "fuzz.h"
#include "jobs/http_req.h"

static void check_printable(const char *err) {
  FUZZ_CHECK(err[0] != '\0');
  for (const char *p = err; *p; p++)
    FUZZ_CHECK(*p >= 32 && *p < 127);
}

static void check(const char *payload, const struct pgr_http_allow *allow) {
  struct pgr_http_req r;
  char err[512];

  err[0] = '\0';
  if (pgr_http_parse(payload, 42, allow, &r, err, sizeof err) != 0) {
    check_printable(err);
    FUZZ_CHECK(r.url == NULL && r.nheaders == 0 && r.body == NULL);
    return;
  }
  FUZZ_CHECK(strncmp(r.url, "http://", 7) == 0 ||
             strncmp(r.url, "https://", 8) == 0);
  /* No userinfo (an '@' before the path; one in the path is the path's),
     no query, no fragment. */
  const char *authority = strstr(r.shown, "://");
  FUZZ_CHECK(authority != NULL);
  authority += 3;
  size_t alen = strcspn(authority, "/");
  FUZZ_CHECK(memchr(authority, '@', alen) == NULL);
  FUZZ_CHECK(strpbrk(r.shown, "?#") == NULL);
  FUZZ_CHECK(r.nheaders >= 1);
  FUZZ_CHECK(
      strcmp(r.headers[r.nheaders - 1], "Idempotency-Key: pgrunner-42") == 0);
  for (size_t i = 0; i < r.nheaders; i++) {
    const char *h = r.headers[i];
    const char *colon = strchr(h, ':');
    FUZZ_CHECK(colon != NULL && colon > h && colon[1] == ' ');
    FUZZ_CHECK(strpbrk(h, "\r\n") == NULL);
    for (const char *p = h; p < colon; p++)
      FUZZ_CHECK(*p > 32 && *p < 127);
  }
  if (allow->n > 0) {
    int found = 0;
    for (size_t i = 0; i < allow->n; i++)
      found |= strcasestr(r.shown, allow->hosts[i]) != NULL;
    FUZZ_CHECK(found);
  }
  json_t *root = json_loads(payload, 0, NULL);
  FUZZ_CHECK(root != NULL);
  json_t *body = json_object_get(root, "body");
  if (body == NULL || json_is_null(body)) {
    FUZZ_CHECK(r.body == NULL);
  } else if (json_is_string(body)) {
    FUZZ_CHECK(r.body_len == json_string_length(body) &&
               memcmp(r.body, json_string_value(body), r.body_len) == 0);
  } else {
    json_t *again = json_loadb(r.body, r.body_len, JSON_DECODE_ANY, NULL);
    FUZZ_CHECK(again != NULL && json_equal(again, body));
    json_decref(again);
  }
  json_decref(root);
  pgr_http_req_free(&r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = fuzz_cstr(data, size);
  char *hosts[] = {"localhost", "example.org"};
  struct pgr_http_allow none = {NULL, 0}, some = {hosts, 2};

  check(s, &none);
  check(s, &some);
  int64_t ms = pgr_http_retry_after(s, 1700000000);
  FUZZ_CHECK(ms >= -1);
  free(s);
  return 0;
}
