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
  cr_assert(eq(int, pgr_conninfo_parse("postgresql://u@h:5433/d", "pgrunner/x",
                                       &ci, err, sizeof err), 0), "%s", err);
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "host"), "h"));
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "port"), "5433"));
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "dbname"), "d"));
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "application_name"),
               "pgrunner/x"));
  pgr_conninfo_set(&ci, "hostaddr", "10.0.0.1");
  cr_expect(eq(str, (char *)pgr_conninfo_get(&ci, "hostaddr"), "10.0.0.1"));
  cr_expect(ci.keywords[ci.n] == NULL, "arrays stay NULL-terminated");
  pgr_conninfo_free(&ci);
}

Test(conninfo, a_bad_string_is_refused_without_its_password) {
  struct pgr_conninfo ci;
  char err[256];
  cr_expect(eq(int, pgr_conninfo_parse("host=x password=zz9 bogus", NULL, &ci,
                                       err, sizeof err), PGR_EUSAGE));
  cr_expect(strstr(err, "zz9") == NULL, "%s", err);
}
