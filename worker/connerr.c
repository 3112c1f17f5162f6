/*
 * connerr.c - classify connection failures (see connerr.h for the rule).
 *
 * Thread: any.
 */
#include "connerr.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "common.h"

void pgr_connerr_watch(PGconn *conn) {
  /* libpq: PQERRORS_VERBOSE "includes ... the SQLSTATE code"; it applies to
     messages built after the call, the startup's ErrorResponse included. */
  if (conn)
    (void)PQsetErrorVerbosity(conn, PQERRORS_VERBOSE);
}

void pgr_connerr_unwatch(PGconn *conn) {
  if (conn)
    (void)PQsetErrorVerbosity(conn, PQERRORS_DEFAULT);
}

static int is_sqlstate(const char *p) {
  for (int i = 0; i < 5; i++)
    if (!isdigit((unsigned char)p[i]) && !isupper((unsigned char)p[i]))
      return 0;
  return p[5] == ':' && p[6] == ' ';
}

/* The SQLSTATE after the first "FATAL:  " or "ERROR:  ", or "". */
static void find_sqlstate(const char *msg, char state[6]) {
  static const char *const sev[] = {"FATAL:  ", "ERROR:  ", "PANIC:  "};
  state[0] = '\0';
  for (size_t i = 0; i < PGR_ARRAY_LEN(sev); i++) {
    const char *p = strstr(msg, sev[i]);
    if (p && is_sqlstate(p + strlen(sev[i]))) {
      memcpy(state, p + strlen(sev[i]), 5);
      state[5] = '\0';
      return;
    }
  }
}

/* msg on one line, without "XXXXX: " after a severity and without the
   LOCATION line. */
static void clean(const char *msg, char *out, size_t outlen) {
  struct pgr_buf b;
  const char *p = msg;
  pgr_buf_init(&b);
  while (*p) {
    const char *eol = strchr(p, '\n');
    size_t len = eol ? (size_t)(eol - p) : strlen(p);
    if (!(len >= 9 && strncmp(p, "LOCATION:", 9) == 0)) {
      if (b.len > 0)
        pgr_buf_addc(&b, ' ');
      for (size_t i = 0; i < len; i++) {
        /* "FATAL:  28P01: text" -> "FATAL:  text" */
        if (i >= 3 && p[i - 1] == ' ' && p[i - 2] == ' ' && p[i - 3] == ':' &&
            len - i >= 7 && is_sqlstate(p + i)) {
          i += 6;
          continue;
        }
        pgr_buf_addc(&b, p[i] == '\t' || p[i] == '\r' ? ' ' : p[i]);
      }
    }
    p += len;
    if (*p == '\n')
      p++;
  }
  pgr_trim_end(b.data);
  snprintf(out, outlen, "%s", b.data[0] ? b.data : "unknown error");
  pgr_buf_free(&b);
}

/* The text after libpq's "connection to server ... failed: " prefix. */
static const char *reason_of(const char *msg) {
  const char *p = strstr(msg, " failed: ");
  return strncmp(msg, "connection to server", 20) == 0 && p ? p + 9 : msg;
}

enum pgr_connerr pgr_connerr_classify(const char *msg, int needs_password,
                                      char *out, size_t outlen) {
  static const char *const fatal_states[] = {"28P01", "28000", "3D000",
                                             "42501"};
  /* libpq's own TLS messages (fe-secure-openssl.c, fe-connect.c). */
  static const char *const tls[] = {"certificate", "private key",
                                    "does not support SSL", "SSL was required"};
  char state[6];

  if (msg == NULL || *msg == '\0')
    msg = "unknown error";
  clean(msg, out, outlen);
  if (needs_password)
    return PGR_CONNERR_FATAL;
  find_sqlstate(msg, state);
  for (size_t i = 0; i < PGR_ARRAY_LEN(fatal_states); i++)
    if (strcmp(state, fatal_states[i]) == 0)
      return PGR_CONNERR_FATAL;
  if (state[0] != '\0')
    return PGR_CONNERR_RETRY; /* the server spoke: 57P03, 53300, 55000 ... */
  for (size_t i = 0; i < PGR_ARRAY_LEN(tls); i++)
    if (strstr(msg, tls[i]))
      return PGR_CONNERR_FATAL;
  /* connectOptions2's checks: "invalid sslmode value: ...", "invalid port
     number: ...", "could not match 2 host names to 1 hostaddr values",
     "could not parse network address ...". */
  const char *r = reason_of(msg);
  if (strncmp(r, "invalid ", 8) == 0 || strstr(r, "could not match ") ||
      strstr(r, "could not parse network address"))
    return PGR_CONNERR_CONFIG;
  return PGR_CONNERR_RETRY;
}

const char *pgr_connerr_name(enum pgr_connerr e) {
  switch (e) {
  case PGR_CONNERR_FATAL:
    return "fatal";
  case PGR_CONNERR_CONFIG:
    return "config";
  default:
    return "retry";
  }
}

uint64_t pgr_connect_timeout_ms(const struct pgr_conninfo *ci) {
  const char *v = pgr_conninfo_get(ci, "connect_timeout");
  if (v == NULL || *v == '\0')
    v = getenv("PGCONNECT_TIMEOUT");
  if (v == NULL || *v == '\0')
    return (uint64_t)PGR_CONNECT_TIMEOUT_S * 1000;
  long s = strtol(v, NULL, 10);
  if (s <= 0)
    return 0;
  if (s == 1)
    s = 2; /* libpq: "values of 1 are interpreted as 2" */
  return (uint64_t)s * 1000;
}
