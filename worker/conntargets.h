/*
 * conntargets.h - where a connection string leads: every server address
 * libpq would try, found without connecting.
 *
 * Thread: BLOCKS (reads the service and password files, resolves host
 * names): never the event-loop thread. The loop runs it on libuv's thread
 * pool (loop/pgconn.c) so that libpq, given the result, does no lookup of
 * its own there.
 * Ownership: pgr_conn_targets_free() frees what pgr_conn_targets_find()
 * filled in.
 */
#ifndef PGR_CONNTARGETS_H
#define PGR_CONNTARGETS_H

#include <stddef.h>

#include "common.h"
#include "conninfo.h"

/*
 * libpq's host, hostaddr and port lists after its own expansion of `ci`
 * (service file, PG* variables, defaults), with every host name resolved:
 * parallel comma-separated lists with one entry per address, hosts in order
 * and each host's addresses in getaddrinfo's order, which is the order
 * libpq tries them in. Given to libpq as host/hostaddr/port they make it
 * walk the same servers under its own multi-host rules (target_session_attrs
 * included) with no lookup, while `host` still serves TLS verification, the
 * password file and messages. Unix-socket entries and entries that have a
 * hostaddr already pass through unchanged.
 */
struct pgr_conn_targets {
  char *host;
  char *hostaddr;
  char *port;
  char *skipped; /* hosts left out because they did not resolve, or NULL */
};

/*
 * Fill `out`. A host that does not resolve is left out and named in
 * `skipped`, as libpq goes on to the next host; with no address left, or a
 * connection string libpq rejects, returns PGR_ECONN and says why in errbuf.
 */
PGR_MUSTCHECK int pgr_conn_targets_find(const struct pgr_conninfo *ci,
                                        struct pgr_conn_targets *out,
                                        char *errbuf, size_t errlen);
void pgr_conn_targets_free(struct pgr_conn_targets *t);

#endif /* PGR_CONNTARGETS_H */
