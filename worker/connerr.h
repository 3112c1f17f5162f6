/*
 * connerr.h - why a connection attempt failed, and whether waiting can heal
 * it; how long one attempt may take.
 *
 * Thread: any (pure functions over their arguments, and setters on a
 * PGconn the caller owns).
 *
 * The rule (README "Connection errors"):
 *   - RETRY: everything waiting may heal: the network (refused, reset,
 *     timeout, host name not found), a server starting up or shutting down
 *     (57P03), too many connections (53300), a database that does not
 *     accept connections for now (55000), an error we do not recognise.
 *   - FATAL: authentication (a password required but not given, SQLSTATE
 *     28P01 or 28000), an unknown database (3D000), no CONNECT privilege
 *     (42501), and TLS set-up (any message about a certificate or a private
 *     key, or SSL required of a server without it).
 *   - CONFIG: libpq refused the connection string's values before reaching
 *     any server ("invalid sslmode value", "invalid port number", ...).
 * libpq gives a failed connection no PGresult, so the SQLSTATE is read from
 * the message: pgr_connerr_watch() asks libpq for verbose messages, which
 * carry it ("FATAL:  28P01: password authentication failed ..."), and
 * pgr_connerr_classify() takes it out again for the user.
 */
#ifndef PGR_CONNERR_H
#define PGR_CONNERR_H

#include <stddef.h>
#include <stdint.h>

#include <libpq-fe.h>

#include "conninfo.h"

enum pgr_connerr {
  PGR_CONNERR_RETRY = 0, /* waiting may heal it */
  PGR_CONNERR_FATAL,     /* waiting cannot: exit 1 at start */
  PGR_CONNERR_CONFIG,    /* a malformed connection string: exit 2 */
};

/* The default limit of one connection attempt when the connection string
   (connect_timeout) and PGCONNECT_TIMEOUT say nothing. */
#define PGR_CONNECT_TIMEOUT_S 10

/* Call right after PQconnectStart*: the error message will carry the
   SQLSTATE. */
void pgr_connerr_watch(PGconn *conn);
/* Call once connected: later messages in libpq's default form again. */
void pgr_connerr_unwatch(PGconn *conn);

/*
 * Classify `msg` (PQerrorMessage of a connection that failed after
 * pgr_connerr_watch) and write it on one line, without the SQLSTATE and
 * LOCATION that verbose mode added, into out. The caller redacts it.
 */
enum pgr_connerr pgr_connerr_classify(const char *msg, int needs_password,
                                      char *out, size_t outlen);

/* A short name of the class for log lines: "retry", "fatal", "config". */
const char *pgr_connerr_name(enum pgr_connerr e);

/*
 * How long one connection attempt may take, in milliseconds: the
 * connection string's connect_timeout, else PGCONNECT_TIMEOUT, else
 * PGR_CONNECT_TIMEOUT_S; libpq's rules (0 or less: no limit; 1 counts as
 * 2). 0 means no limit.
 */
uint64_t pgr_connect_timeout_ms(const struct pgr_conninfo *ci);

#endif /* PGR_CONNERR_H */
