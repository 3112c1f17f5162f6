/*
 * fuzz_conninfo.c - connection strings (--db, DATABASE_URL: outside input)
 * through pgr_conninfo_parse() and pgr_redact(). The input is a template
 * number, a password P and the rest R of the string (P and R separated by
 * a NUL byte); the target writes P into the string in one of the ways
 * libpq reads a password. Whenever P is the password by libpq's rules, and
 * whenever libpq parses the string to some password, neither the parse
 * error nor a redacted message shows it.
 */
#include <ctype.h>

#include <libpq-fe.h>

#include "conninfo.h"
#include "fuzz.h"

#define PREFIX "invalid connection string: "

/* Whether `secret` may be checked for: "***" is what masking writes, so a
 * secret made of it could reappear; an empty one is everywhere. */
static int checkable(const char *secret) {
  return secret != NULL && secret[0] != '\0' && strchr(secret, '*') == NULL;
}

static void pct_encode(struct pgr_buf *b, const char *s) {
  for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
    if (isalnum(*p) || *p == '-' || *p == '.' || *p == '_' || *p == '~')
      pgr_buf_addc(b, (char)*p);
    else
      pgr_buf_printf(b, "%%%02X", *p);
  }
}

static void quote(struct pgr_buf *b, const char *s) {
  pgr_buf_addc(b, '\'');
  for (const char *p = s; *p; p++) {
    if (*p == '\'' || *p == '\\')
      pgr_buf_addc(b, '\\');
    pgr_buf_addc(b, *p);
  }
  pgr_buf_addc(b, '\'');
}

/* The redaction of a message quoting `secret` between other text. */
static void check_redacts(const char *conninfo, const char *secret,
                          const char *rest) {
  if (!checkable(secret))
    return;
  char *msg = pgr_asprintf("x %s y %s z \"%s\"", secret, rest, secret);
  char *red = pgr_redact(conninfo, msg);
  FUZZ_CHECK(strstr(red, secret) == NULL);
  free(red);
  free(msg);
  red = pgr_redact(conninfo, conninfo);
  FUZZ_CHECK(strstr(red, secret) == NULL);
  free(red);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  if (size < 1)
    return 0;
  char *in = fuzz_cstr(data + 1, size - 1);
  const char *pw = in;
  size_t pwlen = strlen(in);
  const char *rest = pwlen + 1 < size ? in + pwlen + 1 : "";
  struct pgr_buf ci = {NULL, 0, 0};
  int strict; /* P is the password by libpq's rules */

  switch (data[0] % 5) {
  case 0: /* keyword, quoted */
    pgr_buf_adds(&ci, "password=");
    quote(&ci, pw);
    pgr_buf_printf(&ci, " %s", rest);
    strict = 1;
    break;
  case 1: /* keyword, quoted, after the rest */
    pgr_buf_printf(&ci, "%s password=", rest);
    quote(&ci, pw);
    /* The rest may open a quote or take a value that swallows ours. */
    strict = strpbrk(rest, "'\\=") == NULL;
    break;
  case 2: /* URL userinfo, percent-encoded */
    pgr_buf_adds(&ci, "postgresql://u:");
    pct_encode(&ci, pw);
    pgr_buf_printf(&ci, "@%s", rest);
    strict = 1;
    break;
  case 3: /* URL query parameter, percent-encoded */
    pgr_buf_printf(&ci, "postgresql://%s?password=", rest);
    pct_encode(&ci, pw);
    strict = strpbrk(rest, "?&#=") == NULL;
    break;
  default: /* the input as it is */
    pgr_buf_printf(&ci, "%s", pw);
    strict = 0;
    break;
  }

  /* The parse error never shows P. */
  struct pgr_conninfo parsed;
  char err[512];
  err[0] = '\0';
  if (pgr_conninfo_parse(ci.data, "fuzz", &parsed, err, sizeof err) != 0) {
    FUZZ_CHECK(strncmp(err, PREFIX, strlen(PREFIX)) == 0);
    if (strict && checkable(pw))
      FUZZ_CHECK(strstr(err + strlen(PREFIX), pw) == NULL);
    FUZZ_CHECK(parsed.keywords == NULL && parsed.n == 0);
  } else {
    FUZZ_CHECK(strcmp(pgr_conninfo_get(&parsed, "application_name"), "fuzz") ==
               0);
    for (size_t i = 0; i < parsed.n; i++)
      FUZZ_CHECK(parsed.keywords[i] != NULL);
    FUZZ_CHECK(parsed.keywords[parsed.n] == NULL);
    pgr_conninfo_free(&parsed);
  }

  /* The password libpq reads is never shown... */
  PQconninfoOption *opts = PQconninfoParse(ci.data, NULL);
  if (opts != NULL) {
    for (PQconninfoOption *o = opts; o->keyword; o++)
      if (strcmp(o->keyword, "password") == 0)
        check_redacts(ci.data, o->val, rest);
    PQconninfoFree(opts);
  }
  /* ... nor the one the user wrote. */
  if (strict)
    check_redacts(ci.data, pw, rest);

  pgr_buf_free(&ci);
  free(in);
  return 0;
}
