/*
 * migrations.h - the SQL migrations embedded in the binary at build time
 * (cmake/embed_sql.cmake turns sql/NNNN_name.sql into pgr_migrations[]).
 *
 * Thread: read-only data.
 */
#ifndef PGR_MIGRATIONS_H
#define PGR_MIGRATIONS_H

#include <stddef.h>

struct pgr_migration {
  int version;
  const char *name;
  const char *sql;
};

extern const struct pgr_migration pgr_migrations[];
extern const size_t pgr_nmigrations;

/* The newest migration version this binary carries (no I/O: the loop's
   schema check uses it too). */
int pgr_migrate_latest(void);

#endif /* PGR_MIGRATIONS_H */
