/*
 * http_req.c - the `http` kind's payload, parsed and checked into one
 * request (see http_req.h), and the small readers of a response.
 *
 * Thread: any; pure functions. libcurl's URL parser (curl_url) needs no
 * curl_global_init and does no I/O.
 */
#include "jobs/http_req.h"

#include <ctype.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <curl/curl.h>
#include <jansson.h>

#define MAX_URL 8192
#define MAX_HEADERS 64
#define MAX_HEADER_NAME 256
#define MAX_HEADER_VALUE 8192

static const char *const methods[] = {"GET",   "HEAD",   "POST",   "PUT",
                                      "PATCH", "DELETE", "OPTIONS"};

/* Headers pgrunner writes itself (curl computes the framing ones). */
static const char *const reserved[] = {"Content-Length", "Transfer-Encoding",
                                       "Idempotency-Key"};

static int fail(char *errbuf, size_t errlen, const char *fmt, ...)
    PGR_PRINTF(3, 4);
static int fail(char *errbuf, size_t errlen, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(errbuf, errlen, fmt, ap);
  va_end(ap);
  return PGR_EINVAL;
}

/* A short printable-ASCII rendering of outside text for a reason. */
static void show(char *dst, size_t n, const char *src) {
  size_t o = 0;
  for (size_t i = 0; src[i] != '\0' && o + 1 < n; i++) {
    unsigned char c = (unsigned char)src[i];
    dst[o++] = (c < 32 || c >= 127) ? '?' : (char)c;
  }
  dst[o] = '\0';
}

static int is_tchar(unsigned char c) {
  return isalnum(c) || (c != '\0' && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

/* --- the raw span of a value (pgr_http_json_span) ----------------------- */

static size_t skip_ws(const char *s, size_t i) {
  while (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')
    i++;
  return i;
}

/* s[i] is '"'; the index after the closing quote. */
static size_t skip_string(const char *s, size_t i) {
  for (i++; s[i] != '\0' && s[i] != '"'; i++)
    if (s[i] == '\\' && s[i + 1] != '\0')
      i++;
  return s[i] == '"' ? i + 1 : i;
}

static size_t skip_value(const char *s, size_t i) {
  if (s[i] == '"')
    return skip_string(s, i);
  if (s[i] == '{' || s[i] == '[') {
    int depth = 0;
    while (s[i] != '\0') {
      if (s[i] == '"') {
        i = skip_string(s, i);
        continue;
      }
      if (s[i] == '{' || s[i] == '[')
        depth++;
      else if ((s[i] == '}' || s[i] == ']') && --depth == 0)
        return i + 1;
      i++;
    }
    return i;
  }
  while (s[i] != '\0' && strchr(",}] \t\r\n", s[i]) == NULL)
    i++;
  return i;
}

/* Does the JSON string s[a..b) (quotes included) spell `key`? */
static int key_is(const char *s, size_t a, size_t b, const char *key) {
  size_t n = strlen(key);
  if (memchr(s + a, '\\', b - a) == NULL)
    return b - a == n + 2 && memcmp(s + a + 1, key, n) == 0;
  json_t *k = json_loadb(s + a, b - a, JSON_DECODE_ANY, NULL);
  int same = json_is_string(k) && json_string_length(k) == n &&
             memcmp(json_string_value(k), key, n) == 0;
  json_decref(k);
  return same;
}

int pgr_http_json_span(const char *json, const char *key, size_t *start,
                       size_t *len) {
  size_t i = skip_ws(json, 0);
  int found = -1;
  if (json[i] != '{')
    return -1;
  i = skip_ws(json, i + 1);
  while (json[i] == '"') {
    size_t ka = i, kb = skip_string(json, i);
    i = skip_ws(json, kb);
    if (json[i] != ':')
      return -1;
    i = skip_ws(json, i + 1);
    size_t va = i, vb = skip_value(json, i);
    if (vb == va)
      return -1;
    if (key_is(json, ka, kb, key)) {
      *start = va;
      *len = vb - va;
      found = 0;
    }
    i = skip_ws(json, vb);
    if (json[i] != ',')
      break;
    i = skip_ws(json, i + 1);
  }
  return found;
}

/* --- the request -------------------------------------------------------- */

static void add_header(struct pgr_http_req *r, char *line) {
  r->headers = pgr_realloc(r->headers, (r->nheaders + 1) * sizeof *r->headers);
  r->headers[r->nheaders++] = line;
}

static int host_allowed(const struct pgr_http_allow *allow, const char *host) {
  size_t n = strlen(host);
  if (allow == NULL || allow->n == 0)
    return 1;
  /* libcurl gives an IPv6 host in brackets; the list holds it bare. */
  if (n >= 2 && host[0] == '[' && host[n - 1] == ']') {
    host++;
    n -= 2;
  }
  for (size_t i = 0; i < allow->n; i++)
    if (strlen(allow->hosts[i]) == n &&
        strncasecmp(allow->hosts[i], host, n) == 0)
      return 1;
  return 0;
}

static int parse_url(const char *url, const struct pgr_http_allow *allow,
                     struct pgr_http_req *r, char *errbuf, size_t errlen) {
  CURLU *u = NULL;
  char *norm = NULL, *host = NULL, *port = NULL, *path = NULL;
  const char *sep = strstr(url, "://");
  char what[48];
  int rc = PGR_EINVAL;

  if (*url == '\0')
    return fail(errbuf, errlen, "\"url\" is empty");
  if (strlen(url) > MAX_URL)
    return fail(errbuf, errlen, "\"url\" is longer than %d bytes", MAX_URL);
  for (const unsigned char *p = (const unsigned char *)url; *p; p++)
    if (*p <= ' ' || *p == 0x7f)
      return fail(errbuf, errlen,
                  "\"url\" must not contain spaces or control characters");
  if (sep == NULL)
    return fail(errbuf, errlen, "\"url\" must start with http:// or https://");
  char scheme[16];
  size_t slen = (size_t)(sep - url);
  if (slen >= sizeof scheme ||
      !((slen == 4 && strncasecmp(url, "http", 4) == 0) ||
        (slen == 5 && strncasecmp(url, "https", 5) == 0))) {
    snprintf(scheme, sizeof scheme, "%.*s", (int)(slen < 15 ? slen : 15), url);
    show(what, sizeof what, scheme);
    return fail(errbuf, errlen, "\"url\" must use http or https, not %s", what);
  }
  memcpy(scheme, url, slen);
  scheme[slen] = '\0';
  for (char *p = scheme; *p; p++)
    *p = (char)tolower((unsigned char)*p);

  u = curl_url();
  if (u == NULL) {
    fail(errbuf, errlen, "out of memory parsing \"url\"");
    goto out;
  }
  CURLUcode uc = curl_url_set(u, CURLUPART_URL, url, 0);
  if (uc != CURLUE_OK) {
    fail(errbuf, errlen, "\"url\" is not a valid URL (%s)",
         curl_url_strerror(uc));
    goto out;
  }
  if (curl_url_get(u, CURLUPART_HOST, &host, 0) != CURLUE_OK || *host == '\0') {
    fail(errbuf, errlen, "\"url\" has no host");
    goto out;
  }
  if (!host_allowed(allow, host)) {
    show(what, sizeof what, host);
    fail(errbuf, errlen, "host %s is not in PGRUNNER_HTTP_ALLOW", what);
    goto out;
  }
  if (curl_url_get(u, CURLUPART_URL, &norm, 0) != CURLUE_OK ||
      curl_url_get(u, CURLUPART_PATH, &path, 0) != CURLUE_OK) {
    fail(errbuf, errlen, "\"url\" is not a valid URL");
    goto out;
  }
  (void)curl_url_get(u, CURLUPART_PORT, &port, 0);
  r->url = pgr_strdup(norm);
  r->shown = pgr_asprintf("%s://%s%s%s%s", scheme, host, port ? ":" : "",
                          port ? port : "", path);
  rc = 0;
out:
  curl_free(norm);
  curl_free(host);
  curl_free(port);
  curl_free(path);
  curl_url_cleanup(u);
  return rc;
}

static int parse_headers(const json_t *h, struct pgr_http_req *r, int *has_type,
                         char *errbuf, size_t errlen) {
  const char *name;
  json_t *v;
  char what[48];

  if (!json_is_object(h))
    return fail(errbuf, errlen,
                "\"headers\" must be an object of strings, not %s",
                pgr_json_kind(h));
  if (json_object_size(h) > MAX_HEADERS)
    return fail(errbuf, errlen, "\"headers\" has more than %d entries",
                MAX_HEADERS);
  json_object_foreach((json_t *)h, name, v) {
    size_t nlen = strlen(name);
    show(what, sizeof what, name);
    if (nlen == 0 || nlen > MAX_HEADER_NAME)
      return fail(errbuf, errlen, "header name \"%s\" must be 1 to %d bytes",
                  what, MAX_HEADER_NAME);
    for (size_t i = 0; i < nlen; i++)
      if (!is_tchar((unsigned char)name[i]))
        return fail(errbuf, errlen,
                    "header name \"%s\" has a character not allowed in a "
                    "header name (CR, LF, space, colon...)",
                    what);
    for (size_t i = 0; i < PGR_ARRAY_LEN(reserved); i++)
      if (strcasecmp(name, reserved[i]) == 0)
        return fail(errbuf, errlen, "header %s is set by pgrunner", what);
    if (!json_is_string(v))
      return fail(errbuf, errlen, "header %s must be a string, not %s", what,
                  pgr_json_kind(v));
    const char *val = json_string_value(v);
    size_t vlen = json_string_length(v);
    if (vlen > MAX_HEADER_VALUE)
      return fail(errbuf, errlen, "header %s is longer than %d bytes", what,
                  MAX_HEADER_VALUE);
    for (size_t i = 0; i < vlen; i++) {
      unsigned char c = (unsigned char)val[i];
      if ((c < 32 && c != '\t') || c == 0x7f)
        return fail(errbuf, errlen,
                    "header %s has a control character (CR, LF...) in its "
                    "value",
                    what);
    }
    if (strcasecmp(name, "Content-Type") == 0)
      *has_type = 1;
    add_header(r, pgr_asprintf("%s: %s", name, val));
  }
  return 0;
}

int pgr_http_parse(const char *payload, int64_t task_id,
                   const struct pgr_http_allow *allow, struct pgr_http_req *out,
                   char *errbuf, size_t errlen) {
  json_error_t jerr;
  json_t *root = NULL, *v;
  const char *key;
  struct pgr_http_req r;
  const char *type = NULL;
  int has_type = 0, rc = PGR_EINVAL;
  char what[48];

  memset(&r, 0, sizeof r);
  memset(out, 0, sizeof *out);
  root = json_loads(payload, 0, &jerr);
  if (root == NULL) {
    show(what, sizeof what, jerr.text);
    fail(errbuf, errlen, "payload is not valid JSON: %s", what);
    goto out;
  }
  if (!json_is_object(root)) {
    fail(errbuf, errlen, "payload must be an object, not %s",
         pgr_json_kind(root));
    goto out;
  }
  json_object_foreach(root, key, v) {
    if (strcmp(key, "url") != 0 && strcmp(key, "method") != 0 &&
        strcmp(key, "headers") != 0 && strcmp(key, "body") != 0) {
      show(what, sizeof what, key);
      fail(errbuf, errlen,
           "unknown key \"%s\" (expected url, method, headers, body)", what);
      goto out;
    }
  }

  v = json_object_get(root, "url");
  if (v == NULL) {
    fail(errbuf, errlen, "\"url\" is missing");
    goto out;
  }
  if (!json_is_string(v)) {
    fail(errbuf, errlen, "\"url\" must be a string, not %s", pgr_json_kind(v));
    goto out;
  }
  if (strlen(json_string_value(v)) != json_string_length(v)) {
    fail(errbuf, errlen,
         "\"url\" must not contain spaces or control characters");
    goto out;
  }
  if (parse_url(json_string_value(v), allow, &r, errbuf, errlen) != 0)
    goto out;

  v = json_object_get(root, "method");
  snprintf(r.method, sizeof r.method, "POST");
  if (v != NULL) {
    size_t i;
    if (!json_is_string(v)) {
      fail(errbuf, errlen, "\"method\" must be a string, not %s",
           pgr_json_kind(v));
      goto out;
    }
    for (i = 0; i < PGR_ARRAY_LEN(methods); i++)
      if (strcmp(json_string_value(v), methods[i]) == 0)
        break;
    if (i == PGR_ARRAY_LEN(methods)) {
      show(what, sizeof what, json_string_value(v));
      fail(errbuf, errlen,
           "\"method\" \"%s\" is not one of GET, HEAD, POST, PUT, PATCH, "
           "DELETE, OPTIONS",
           what);
      goto out;
    }
    snprintf(r.method, sizeof r.method, "%s", methods[i]);
  }

  v = json_object_get(root, "headers");
  if (v != NULL && parse_headers(v, &r, &has_type, errbuf, errlen) != 0)
    goto out;

  v = json_object_get(root, "body");
  if (v != NULL && !json_is_null(v)) {
    if (strcmp(r.method, "GET") == 0 || strcmp(r.method, "HEAD") == 0) {
      fail(errbuf, errlen, "a %s request takes no \"body\"", r.method);
      goto out;
    }
    if (json_is_string(v)) {
      r.body_len = json_string_length(v);
      r.body = pgr_strndup(json_string_value(v), r.body_len);
      type = "text/plain; charset=utf-8";
    } else {
      size_t at, len;
      /* The payload's own text of the value: the numbers as written. */
      if (pgr_http_json_span(payload, "body", &at, &len) != 0) {
        fail(errbuf, errlen, "cannot find \"body\" in the payload");
        goto out;
      }
      r.body = pgr_strndup(payload + at, len);
      r.body_len = len;
      type = "application/json";
    }
    if (!has_type)
      add_header(&r, pgr_asprintf("Content-Type: %s", type));
  }
  add_header(
      &r, pgr_asprintf("Idempotency-Key: pgrunner-%lld", (long long)task_id));
  *out = r;
  memset(&r, 0, sizeof r);
  rc = 0;
out:
  pgr_http_req_free(&r);
  json_decref(root);
  return rc;
}

void pgr_http_req_free(struct pgr_http_req *r) {
  free(r->url);
  free(r->shown);
  for (size_t i = 0; i < r->nheaders; i++)
    free(r->headers[i]);
  free(r->headers);
  free(r->body);
  memset(r, 0, sizeof *r);
}

/* --- the response ------------------------------------------------------- */

enum pgr_http_class pgr_http_classify(long status) {
  if (status >= 200 && status <= 299)
    return PGR_HTTP_OK;
  if (status == 408 || status == 429 || (status >= 500 && status <= 599))
    return PGR_HTTP_RETRY;
  return PGR_HTTP_PERMANENT;
}

int64_t pgr_http_retry_after(const char *value, time_t now) {
  const char *p = value;
  while (*p == ' ' || *p == '\t')
    p++;
  if (isdigit((unsigned char)*p)) {
    int64_t secs = 0;
    for (; isdigit((unsigned char)*p); p++) {
      secs = secs * 10 + (*p - '0');
      if (secs > 100LL * 365 * 86400)
        secs = 100LL * 365 * 86400; /* the policy's cap applies anyway */
    }
    while (*p == ' ' || *p == '\t')
      p++;
    return *p == '\0' ? secs * 1000 : -1;
  }
  time_t t = curl_getdate(p, NULL);
  if (t == -1)
    return -1;
  return t > now ? (int64_t)(t - now) * 1000 : 0;
}
