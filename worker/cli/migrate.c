/*
 * migrate.c - `pgrunner migrate`: apply the embedded sql/NNNN_*.sql files in
 * order, each in its own transaction, recorded in pgrunner.migrations.
 *
 * Thread: main thread of the command (blocking).
 *
 * Several processes may migrate at once (every worker container start, say):
 * each transaction first takes a transaction-scoped advisory lock, so they
 * queue up, and the second finds the work done. A failed migration rolls
 * back whole and leaves the recorded version where it was.
 *
 * After the migrations, every run calls pgrunner.setup_roles() (0013): it
 * creates the roles pgrunner_producer and pgrunner_worker if missing and
 * grants them their privileges again, so functions of later migrations are
 * covered. A user without CREATEROLE gets a warning naming the missing
 * roles and exit 0: the schema is usable by its owner, and the roles can be
 * created by someone who may and migrate run again.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

#include "cli.h"
#include "db.h"
#include "log.h"
#include "migrations.h"

#define MIGRATE_LOCK "SELECT pg_advisory_xact_lock(1885827685, 0)"

int pgr_migrate_latest(void) {
  return pgr_nmigrations ? pgr_migrations[pgr_nmigrations - 1].version : 0;
}

/* Whether this version is recorded as applied. Each version is looked up
   on its own, not compared with the highest applied one: migrations are
   numbered when work on them starts, so one may land after a higher one
   (say 0009 after 0012) and must still be applied. */
static int is_applied(PGconn *conn, int version, int *applied, char *errbuf,
                      size_t errlen) {
  char vbuf[16];
  const char *params[1] = {vbuf};
  snprintf(vbuf, sizeof vbuf, "%d", version);
  PGresult *res = pgr_db_exec(
      conn,
      "SELECT EXISTS (SELECT 1 FROM pgrunner.migrations WHERE version = $1)", 1,
      params, errbuf, errlen, NULL);
  if (res == NULL)
    return PGR_EDB;
  *applied = PQgetvalue(res, 0, 0)[0] == 't';
  PQclear(res);
  return 0;
}

int pgr_migrate_conn(struct pg_conn *conn, int *applied, char *errbuf,
                     size_t errlen) {
  int rc = 0;
  int done = 0;
  int in_txn = 0;

  *applied = 0;
  for (size_t i = 0; i < pgr_nmigrations; i++) {
    const struct pgr_migration *m = &pgr_migrations[i];
    char vbuf[16];
    const char *params[2] = {vbuf, m->name};
    PGresult *res;

    if ((rc = pgr_db_command(conn, "BEGIN", errbuf, errlen)) != 0)
      goto out;
    in_txn = 1;
    if ((rc = pgr_db_command(conn, MIGRATE_LOCK, errbuf, errlen)) != 0)
      goto out;
    if ((rc = pgr_db_command(conn,
                             "CREATE SCHEMA IF NOT EXISTS pgrunner;"
                             "CREATE TABLE IF NOT EXISTS pgrunner.migrations ("
                             " version int PRIMARY KEY, name text NOT NULL,"
                             " applied_at timestamptz NOT NULL DEFAULT now())",
                             errbuf, errlen)) != 0)
      goto out;
    if ((rc = is_applied(conn, m->version, &done, errbuf, errlen)) != 0)
      goto out;
    if (done) {
      if ((rc = pgr_db_command(conn, "COMMIT", errbuf, errlen)) != 0)
        goto out;
      in_txn = 0;
      continue;
    }
    /* A migration file is several statements: the simple query protocol
       runs them in order inside our transaction. */
    if ((rc = pgr_db_command(conn, m->sql, errbuf, errlen)) != 0) {
      char tmp[1024];
      snprintf(tmp, sizeof tmp, "%s", errbuf);
      snprintf(errbuf, errlen, "migration %s failed: %s", m->name, tmp);
      goto out;
    }
    snprintf(vbuf, sizeof vbuf, "%d", m->version);
    res = pgr_db_exec(conn,
                      "INSERT INTO pgrunner.migrations (version, name) "
                      "VALUES ($1, $2)",
                      2, params, errbuf, errlen, NULL);
    if (res == NULL) {
      rc = PGR_EDB;
      goto out;
    }
    PQclear(res);
    if ((rc = pgr_db_command(conn, "COMMIT", errbuf, errlen)) != 0)
      goto out;
    in_txn = 0;
    (*applied)++;
    pgr_info("migration applied", PGR_LI("version", m->version),
             PGR_LS("name", m->name));
  }
out:
  if (in_txn) {
    char ignore[256];
    (void)pgr_db_command(conn, "ROLLBACK", ignore, sizeof ignore);
  }
  return rc;
}

/* pgrunner.setup_roles(), under the migration lock (concurrent GRANTs on
   one object fail), when this user owns the schema: a worker's login that
   runs migrate at start finds the schema up to date and has nothing to
   grant. A role it could not create is a warning. */
static int setup_roles(PGconn *conn, char *errbuf, size_t errlen) {
  PGresult *res = NULL;
  int rc;

  if ((rc = pgr_db_command(conn, "BEGIN", errbuf, errlen)) != 0)
    return rc;
  if ((rc = pgr_db_command(conn, MIGRATE_LOCK, errbuf, errlen)) != 0)
    goto out;
  res = pgr_db_exec(conn,
                    "SELECT pg_has_role(n.nspowner, 'USAGE') "
                    "FROM pg_namespace n WHERE n.nspname = 'pgrunner'",
                    0, NULL, errbuf, errlen, NULL);
  if (res == NULL) {
    rc = PGR_EDB;
    goto out;
  }
  int owner = PQntuples(res) == 1 && PQgetvalue(res, 0, 0)[0] == 't';
  PQclear(res);
  res = NULL;
  if (owner) {
    res = pgr_db_exec(conn, "SELECT pgrunner.setup_roles()", 0, NULL, errbuf,
                      errlen, NULL);
    if (res == NULL) {
      rc = PGR_EDB;
      goto out;
    }
    if (!PQgetisnull(res, 0, 0))
      pgr_warn("roles not set up", PGR_LS("reason", PQgetvalue(res, 0, 0)));
  } else {
    pgr_debug("roles left alone: this user does not own the schema");
  }
  rc = pgr_db_command(conn, "COMMIT", errbuf, errlen);
out:
  PQclear(res);
  if (rc != 0) {
    char ignore[256];
    (void)pgr_db_command(conn, "ROLLBACK", ignore, sizeof ignore);
  }
  return rc;
}

int pgr_cmd_migrate(const struct pgr_config *cfg) {
  PGconn *conn = NULL;
  char err[2048];
  int applied = 0;
  int rc;

  if ((rc = pgr_db_connect(cfg->db, "pgrunner migrate", &conn, err,
                           sizeof err)) != 0)
    goto out;
  if ((rc = pgr_migrate_conn(conn, &applied, err, sizeof err)) != 0)
    goto out;
  if ((rc = setup_roles(conn, err, sizeof err)) != 0)
    goto out;
  pgr_info(applied ? "schema migrated" : "schema up to date",
           PGR_LI("version", pgr_migrate_latest()), PGR_LI("applied", applied));
out:
  if (rc != 0)
    pgr_error("migrate failed", PGR_LS("error", err));
  PQfinish(conn);
  return rc;
}
