/* Unit tests for conninfo.c: passwords never reach a message. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <stdlib.h>
#include <string.h>

#include "conninfo.h"

Test(conninfo, redacts_the_password_of_a_keyword_string) {
  char *m = pgr_redact("host=db password=s3cr3t user=u",
                       "could not connect: password=s3cr3t rejected s3cr3t");
  cr_expect(strstr(m, "s3cr3t") == NULL, "%s", m);
  cr_expect(strstr(m, "could not connect") != NULL, "the rest stays: %s", m);
  free(m);
}

Test(conninfo, redacts_the_password_of_a_url) {
  char *m = pgr_redact("postgres://u:Hunter2@db:5432/x",
                       "bad URI postgres://u:Hunter2@db:5432/x");
  cr_expect(strstr(m, "Hunter2") == NULL, "%s", m);
  cr_expect(strstr(m, "postgres://u:***@db") != NULL, "%s", m);
  free(m);
}

Test(conninfo, masks_password_fragments_even_when_unparseable) {
  char *m = pgr_redact("host='broken password=abc def",
                       "missing \"=\" after \"password=abc\" in string");
  cr_expect(strstr(m, "abc") == NULL, "%s", m);
  free(m);
  m = pgr_redact(NULL, "postgresql://me:pw0rd@h/d");
  cr_expect(strstr(m, "pw0rd") == NULL, "%s", m);
  free(m);
}

Test(conninfo, masks_pgpassword) {
  setenv("PGPASSWORD", "fromenv99", 1);
  char *m = pgr_redact("host=x", "auth failed for fromenv99");
  cr_expect(strstr(m, "fromenv99") == NULL, "%s", m);
  free(m);
  unsetenv("PGPASSWORD");
}

Test(conninfo, parse_sets_application_name_and_keeps_the_rest) {
  struct pgr_conninfo ci;
  char err[256];
  cr_assert(eq(int,
               pgr_conninfo_parse("postgresql://u@h:5433/d", "pgrunner/x", &ci,
                                  err, sizeof err),
               0),
            "%s", err);
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "host"), "h"));
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "port"), "5433"));
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "dbname"), "d"));
  cr_expect(
      eq(str, (char *)pgr_conninfo_get(&ci, "application_name"), "pgrunner/x"));
  pgr_conninfo_set(&ci, "hostaddr", "10.0.0.1");
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "hostaddr"), "10.0.0.1"));
  cr_expect(ci.keywords[ci.n] == NULL, "arrays stay NULL-terminated");
  pgr_conninfo_free(&ci);
}

Test(conninfo, a_bad_string_is_refused_without_its_password) {
  struct pgr_conninfo ci;
  char err[256];
  cr_expect(eq(int,
               pgr_conninfo_parse("host=x password=zz9 bogus", NULL, &ci, err,
                                  sizeof err),
               PGR_EUSAGE));
  cr_expect(strstr(err, "zz9") == NULL, "%s", err);
}

/* Redact `msg` for `conninfo` and expect none of the NULL-terminated
   `secrets` to survive. */
static void expect_masked(const char *conninfo, const char *msg,
                          const char *const *secrets) {
  char *m = pgr_redact(conninfo, msg);
  for (const char *const *s = secrets; *s; s++)
    cr_expect(strstr(m, *s) == NULL, "\"%s\" survives in: %s", *s, m);
  cr_expect(strstr(m, "***") != NULL, "the marker shows: %s", m);
  free(m);
}

/* Parse a string libpq refuses and expect none of `secrets` in the error. */
static void expect_refused_without(const char *conninfo,
                                   const char *const *secrets) {
  struct pgr_conninfo ci;
  char err[512];
  cr_expect(eq(int, pgr_conninfo_parse(conninfo, NULL, &ci, err, sizeof err),
               PGR_EUSAGE),
            "%s should not parse", conninfo);
  for (const char *const *s = secrets; *s; s++)
    cr_expect(strstr(err, *s) == NULL, "\"%s\" survives in: %s", *s, err);
}

Test(conninfo, a_malformed_percent_encoded_url_password_is_masked) {
  /* libpq quotes the raw token: invalid percent-encoded token: "s3cret%zz" */
  expect_refused_without(
      "postgresql://postgres:s3cret%zz@127.0.0.1:5432/postgres",
      (const char *[]){"s3cret", NULL});
  /* The decoded form of the valid part goes as well as the raw one. */
  expect_masked("postgresql://u:p%41ss%zzword@h/d",
                "raw \"p%41ss%zzword\" decoded \"pAss%zzword\"",
                (const char *[]){"p%41ss", "pAss", "zzword", NULL});
}

Test(conninfo, a_url_password_with_at_signs_is_masked_with_its_pieces) {
  /* libpq cuts the password at the first '@' and reads "ret@h" as the
     host, so the piece after it must go too. */
  expect_masked("postgresql://u:s3c@ret@h:5432/d",
                "could not translate host name \"ret@h\"; \"s3c@ret\"",
                (const char *[]){"s3c", "ret", NULL});
  expect_refused_without("postgresql://u:s3c@r%zzet@h/d",
                         (const char *[]){"s3c", "r%zzet", NULL});
}

Test(conninfo, a_url_password_with_colons_is_masked_whole) {
  expect_refused_without("postgresql://u:s3c:r%zzet@h/d",
                         (const char *[]){"s3c", "r%zzet", NULL});
  /* A raw '/' hides the userinfo from libpq, which then quotes "s3c" as
     the port. */
  expect_masked("postgresql://u:s3c/ret@h/d",
                "invalid integer value \"s3c\" for connection option "
                "\"port\"",
                (const char *[]){"s3c", NULL});
}

Test(conninfo, a_password_in_the_url_query_is_masked) {
  expect_refused_without("postgresql://u@h/d?sslmode=disable&password=s3c%zz",
                         (const char *[]){"s3c", NULL});
  /* A percent-encoded keyword is still the password keyword. */
  expect_refused_without("postgresql://u@h/d?pass%77ord=s3c%zz",
                         (const char *[]){"s3c", NULL});
  expect_masked("postgresql://u@h/d?password=Hunter%32&x=%zz",
                "raw Hunter%32, decoded Hunter2",
                (const char *[]){"Hunter", NULL});
}

Test(conninfo, a_quoted_keyword_password_is_masked_as_written_and_unescaped) {
  expect_refused_without("host=x password = 's3 cr\\'3t' bogus",
                         (const char *[]){"s3 cr", NULL});
  expect_masked("host=x password='s3 cr\\'3t' bogus",
                "unescaped s3 cr'3t, as written s3 cr\\'3t",
                (const char *[]){"s3 cr", NULL});
  /* Unterminated: the value runs to the end. */
  expect_masked("host=x password='s3cr3t", "echo s3cr3t",
                (const char *[]){"s3cr3t", NULL});
  /* Unquoted, with a backslash escape. */
  expect_masked("password=ab\\ cd host=x", "echo ab cd and ab\\ cd",
                (const char *[]){"ab cd", "ab\\ cd", NULL});
}

Test(conninfo, a_password_after_a_non_postgres_scheme_is_masked) {
  /* libpq reads anything but postgres:// and postgresql:// as keyword=value
     text, where this password= is a password like any other. */
  expect_masked("mysql://u:x@h password='s3cr3t'", "echo s3cr3t",
                (const char *[]){"s3cr3t", NULL});
}
