/*
 * conninfo.h - connection strings: parsing into libpq keyword/value arrays,
 * and keeping passwords out of every message we print.
 *
 * Thread: any (pure functions over their arguments).
 * Ownership: pgr_conninfo_parse() returns a struct the caller frees with
 * pgr_conninfo_free(); the redaction functions return malloc'd strings.
 */
#ifndef PGR_CONNINFO_H
#define PGR_CONNINFO_H

#include <stddef.h>

#include "common.h"

struct pgr_conninfo {
  /* NULL-terminated arrays for PQconnectStartParams/PQconnectdbParams. */
  const char **keywords;
  const char **values;
  size_t n;
  char **owned; /* strings we allocated */
  size_t nowned;
};

/*
 * Parse `conninfo` (NULL or "": libpq's defaults, which read PG* variables)
 * and set application_name to `appname`. Returns PGR_EUSAGE with a
 * password-free message in errbuf when the string does not parse.
 */
PGR_MUSTCHECK int pgr_conninfo_parse(const char *conninfo, const char *appname,
                                     struct pgr_conninfo *out, char *errbuf,
                                     size_t errlen);
void pgr_conninfo_free(struct pgr_conninfo *ci);

/* Look up a keyword's value in a parsed conninfo (NULL if unset). */
const char *pgr_conninfo_get(const struct pgr_conninfo *ci, const char *kw);
/* Set (or add) a keyword. */
void pgr_conninfo_set(struct pgr_conninfo *ci, const char *kw,
                      const char *value);

/* Copy `src` into `dst` (which the caller frees with pgr_conninfo_free). */
void pgr_conninfo_copy(struct pgr_conninfo *dst,
                       const struct pgr_conninfo *src);

/*
 * Return a copy of `msg` in which the password of `conninfo` (and of
 * PGPASSWORD) is replaced by "***", and in which any "password=..." or
 * "scheme://user:secret@" fragment is masked, so a libpq message that
 * echoes part of the connection string can be printed safely. The password
 * is also read from the text of `conninfo` itself (URL userinfo up to the
 * last '@', ?password=, password=; as written and decoded), so that it is
 * masked even when libpq cannot parse the string.
 */
char *pgr_redact(const char *conninfo, const char *msg);

#endif /* PGR_CONNINFO_H */
