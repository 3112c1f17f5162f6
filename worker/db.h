/*
 * db.h - BLOCKING database helpers.
 *
 * Thread: worker threads (worker/jobs/) and the one-shot commands
 * (worker/cli/) only. Never include this from worker/loop/: the lint test
 * tests/lint/loop_never_blocks.sh fails the build's tests if loop code does,
 * and every function here starts with PGR_ASSERT_OFF_LOOP(), which aborts
 * when called on the event-loop thread.
 *
 * Ownership: a PGconn returned by pgr_db_connect() belongs to the caller
 * (PQfinish it). Error messages are written into caller buffers, already
 * stripped of any password.
 */
#ifndef PGR_DB_H
#define PGR_DB_H

#include <stddef.h>

#include <libpq-fe.h>

#include "common.h"

/* stop(arg) returns 1 when a connection attempt should be abandoned. */
typedef int (*pgr_db_stop_fn)(void *arg);

/*
 * Connect, blocking for at most the connect timeout (connerr.h), and less
 * if stop(arg) becomes 1 (checked a few times a second; stop may be NULL).
 * On failure errbuf gets libpq's message on one line, without the password,
 * and *kind (if not NULL) an enum pgr_connerr.
 */
PGR_MUSTCHECK int pgr_db_connect_until(const char *conninfo,
                                       const char *appname, pgr_db_stop_fn stop,
                                       void *arg, PGconn **out, char *errbuf,
                                       size_t errlen, int *kind);

/* Connect, blocking. `appname` becomes application_name. */
PGR_MUSTCHECK int pgr_db_connect(const char *conninfo, const char *appname,
                                 PGconn **out, char *errbuf, size_t errlen);

/*
 * Run a command with parameters, blocking. Returns the result on success
 * (PGRES_COMMAND_OK or PGRES_TUPLES_OK; caller PQclear()s it) or NULL with
 * the message in errbuf and the SQLSTATE (if any) in sqlstate[6].
 */
PGresult *pgr_db_exec(PGconn *conn, const char *sql, int nparams,
                      const char *const *params, char *errbuf, size_t errlen,
                      char sqlstate[6]);

/* Simple statements without results (BEGIN, COMMIT, SET ...). */
int pgr_db_command(PGconn *conn, const char *sql, char *errbuf, size_t errlen);

/*
 * Format a failed result's error for a user: the primary message, then
 * DETAIL/HINT/CONTEXT if present, on one line. A message that says the
 * pgrunner schema is missing gets a hint to run `pgrunner migrate`.
 */
void pgr_db_describe_error(const PGresult *res, PGconn *conn, char *buf,
                           size_t len);

/* 1 if the SQLSTATE means the pgrunner schema is not there. */
int pgr_db_schema_missing(const char *sqlstate);

#endif /* PGR_DB_H */
