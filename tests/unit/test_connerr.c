/* Unit tests for connerr.c: which connection failures waiting can heal. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdlib.h>
#include <string.h>

#include "connerr.h"

static const char prefix[] =
    "connection to server at \"127.0.0.1\", port 5432 failed: ";

static enum pgr_connerr classify(const char *tail, char *out, size_t len) {
  char msg[1024];
  snprintf(msg, sizeof msg, "%s%s", prefix, tail);
  return pgr_connerr_classify(msg, 0, out, len);
}

Test(connerr, authentication_and_unknown_databases_are_fatal) {
  char out[512];
  cr_expect(eq(int,
               classify("FATAL:  28P01: password authentication failed for "
                        "user \"u\"\nLOCATION:  auth_failed, auth.c:323\n",
                        out, sizeof out),
               PGR_CONNERR_FATAL));
  cr_expect(eq(str, out,
               "connection to server at \"127.0.0.1\", port 5432 failed: "
               "FATAL:  password authentication failed for user \"u\""),
            "the SQLSTATE and LOCATION verbose mode added are gone");
  cr_expect(eq(int,
               classify("FATAL:  3D000: database \"x\" does not exist\n", out,
                        sizeof out),
               PGR_CONNERR_FATAL));
  cr_expect(eq(
      int,
      classify("FATAL:  28000: role \"x\" does not exist\n", out, sizeof out),
      PGR_CONNERR_FATAL));
  cr_expect(eq(int,
               pgr_connerr_classify("fe_sendauth: no password supplied\n", 1,
                                    out, sizeof out),
               PGR_CONNERR_FATAL),
            "a password libpq needed and did not have");
}

Test(connerr, tls_problems_are_fatal) {
  char out[512];
  cr_expect(eq(
      int, classify("SSL error: certificate verify failed\n", out, sizeof out),
      PGR_CONNERR_FATAL));
  cr_expect(eq(int,
               classify("server certificate for \"a\" does not match host "
                        "name \"b\"\n",
                        out, sizeof out),
               PGR_CONNERR_FATAL));
}

Test(connerr, what_waiting_heals_is_retried) {
  char out[512];
  cr_expect(eq(int,
               classify("Connection refused\n\tIs the server running on that "
                        "host and accepting TCP/IP connections?\n",
                        out, sizeof out),
               PGR_CONNERR_RETRY));
  cr_expect(strchr(out, '\n') == NULL && strchr(out, '\t') == NULL,
            "one line: %s", out);
  cr_expect(eq(int,
               classify("FATAL:  57P03: the database system is starting "
                        "up\n",
                        out, sizeof out),
               PGR_CONNERR_RETRY));
  cr_expect(eq(int,
               classify("FATAL:  53300: too many connections for role "
                        "\"u\"\n",
                        out, sizeof out),
               PGR_CONNERR_RETRY));
  cr_expect(eq(
      int,
      classify("server closed the connection unexpectedly\n", out, sizeof out),
      PGR_CONNERR_RETRY));
  cr_expect(eq(int, pgr_connerr_classify("timeout expired", 0, out, sizeof out),
               PGR_CONNERR_RETRY));
}

Test(connerr, values_libpq_refuses_are_configuration) {
  char out[512];
  cr_expect(eq(int,
               pgr_connerr_classify("invalid sslmode value: \"x\"\n", 0, out,
                                    sizeof out),
               PGR_CONNERR_CONFIG));
  cr_expect(eq(str, out, "invalid sslmode value: \"x\""));
}

Test(connerr, connect_timeout_follows_libpq) {
  struct pgr_conninfo ci;
  char err[256];
  unsetenv("PGCONNECT_TIMEOUT");
  cr_assert(
      eq(int, pgr_conninfo_parse("host=h", "a", &ci, err, sizeof err), 0));
  cr_expect(eq(u64, pgr_connect_timeout_ms(&ci),
               (uint64_t)PGR_CONNECT_TIMEOUT_S * 1000),
            "the default when nothing is said");
  pgr_conninfo_free(&ci);
  cr_assert(eq(
      int,
      pgr_conninfo_parse("host=h connect_timeout=1", "a", &ci, err, sizeof err),
      0));
  cr_expect(eq(u64, pgr_connect_timeout_ms(&ci), 2000), "1 counts as 2");
  pgr_conninfo_free(&ci);
  cr_assert(eq(
      int,
      pgr_conninfo_parse("host=h connect_timeout=0", "a", &ci, err, sizeof err),
      0));
  cr_expect(eq(u64, pgr_connect_timeout_ms(&ci), 0), "0: no limit");
  pgr_conninfo_free(&ci);
}
