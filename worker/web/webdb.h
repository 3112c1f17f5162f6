/*
 * webdb.h - the HTTP thread's own database connection, for the gauges of
 * /metrics (and the dashboard).
 *
 * Thread: the HTTP server's thread only (libmicrohttpd's internal thread,
 * one at a time); pgr_webdb_close() after that thread has stopped. The
 * connection is blocking, which is why it lives here and never on the
 * event loop. Ownership: the connection is this module's; callers borrow it
 * for one request.
 */
#ifndef PGR_WEBDB_H
#define PGR_WEBDB_H

#include <stddef.h>

#include <libpq-fe.h>

/* Where to connect (NULL: libpq's defaults) and as whom; copied. */
void pgr_webdb_setup(const char *conninfo, const char *appname);
/* The connection, connected now if need be; NULL with a reason in err. A
 * failed connect is not retried for a second, so scrapes of a down server
 * cost nothing. */
PGconn *pgr_webdb_get(char *err, size_t errlen);
/* Forget a connection that failed mid-request. */
void pgr_webdb_broken(void);
void pgr_webdb_close(void);

#endif /* PGR_WEBDB_H */
