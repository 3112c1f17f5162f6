/*
 * conntargets.c - the server addresses of a connection string, found the
 * way libpq finds them, without connecting.
 *
 * Thread: never the event-loop thread (PGR_ASSERT_OFF_LOOP): reading the
 * service file and resolving names block.
 */
#include "conntargets.h"

#include <netdb.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#include <libpq-fe.h>

/*
 * libpq has no call that expands a connection string (service file, PG*
 * variables, defaults) without connecting. PQconnectStartParams does the
 * expansion into the PGconn before it checks the options, and stops
 * without any network work when a check fails; PQconninfo then reads the
 * expanded host, hostaddr and port back. An sslmode nobody can mean makes
 * that check fail; it is only ever given to this probe.
 */
#define PROBE_SSLMODE "pgr-probe-never-connects"

/* Split a comma-separated list as libpq does: "" and NULL are no items,
   "a," is two ("a" and ""). */
static char **split(const char *s, size_t *n) {
  char **v = NULL;
  *n = 0;
  if (s == NULL || *s == '\0')
    return NULL;
  for (;;) {
    size_t len = strcspn(s, ",");
    v = pgr_realloc(v, (*n + 1) * sizeof *v);
    v[(*n)++] = pgr_strndup(s, len);
    if (s[len] != ',')
      return v;
    s += len + 1;
  }
}

static void split_free(char **v, size_t n) {
  for (size_t i = 0; i < n; i++)
    free(v[i]);
  free(v);
}

static const char *item(char **v, size_t n, size_t i) {
  return i < n ? v[i] : "";
}

struct lists {
  struct pgr_buf host, hostaddr, port, skipped;
  size_t n;
};

static void add_entry(struct lists *l, const char *host, const char *addr,
                      const char *port) {
  if (l->n++ > 0) {
    pgr_buf_addc(&l->host, ',');
    pgr_buf_addc(&l->hostaddr, ',');
    pgr_buf_addc(&l->port, ',');
  }
  pgr_buf_adds(&l->host, host);
  pgr_buf_adds(&l->hostaddr, addr);
  pgr_buf_adds(&l->port, port);
}

/* One entry per address of `host`, in getaddrinfo's order (libpq's). */
static void add_resolved(struct lists *l, const char *host, const char *port) {
  struct addrinfo hints, *res = NULL;
  memset(&hints, 0, sizeof hints);
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  int g = getaddrinfo(host, NULL, &hints, &res);
  if (g != 0) {
    if (l->skipped.len > 0)
      pgr_buf_adds(&l->skipped, "; ");
    pgr_buf_printf(&l->skipped,
                   "could not translate host name \"%s\" to address: %s", host,
                   gai_strerror(g));
    return;
  }
  for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
    char addr[NI_MAXHOST];
    if (ai->ai_family != AF_INET && ai->ai_family != AF_INET6)
      continue;
    if (getnameinfo(ai->ai_addr, ai->ai_addrlen, addr, sizeof addr, NULL, 0,
                    NI_NUMERICHOST) != 0)
      continue;
    add_entry(l, host, addr, port);
  }
  freeaddrinfo(res);
}

/* What libpq would use for host, hostaddr and port; 0, or PGR_ECONN with
   libpq's complaint about the string in errbuf. */
static int expand(const struct pgr_conninfo *ci, char **host, char **hostaddr,
                  char **port, char *errbuf, size_t errlen) {
  struct pgr_conninfo probe;
  PQconninfoOption *opts = NULL;
  int rc = 0;

  pgr_conninfo_copy(&probe, ci);
  pgr_conninfo_set(&probe, "sslmode", PROBE_SSLMODE);
  PGconn *conn = PQconnectStartParams(probe.keywords, probe.values, 0);
  if (conn == NULL) {
    snprintf(errbuf, errlen, "out of memory");
    rc = PGR_ECONN;
    goto out;
  }
  if (strstr(PQerrorMessage(conn), PROBE_SSLMODE) == NULL) {
    /* libpq stopped before our check: the string itself is wrong (an
       unknown service, host and port lists that do not match). */
    snprintf(errbuf, errlen, "%s", PQerrorMessage(conn));
    pgr_trim_end(errbuf);
    rc = PGR_ECONN;
    goto out;
  }
  opts = PQconninfo(conn);
  if (opts == NULL) {
    snprintf(errbuf, errlen, "out of memory");
    rc = PGR_ECONN;
    goto out;
  }
  for (PQconninfoOption *o = opts; o->keyword; o++) {
    char **dst = strcmp(o->keyword, "host") == 0       ? host
                 : strcmp(o->keyword, "hostaddr") == 0 ? hostaddr
                 : strcmp(o->keyword, "port") == 0     ? port
                                                       : NULL;
    if (dst && o->val)
      *dst = pgr_strdup(o->val);
  }
out:
  if (opts)
    PQconninfoFree(opts);
  if (conn)
    PQfinish(conn);
  pgr_conninfo_free(&probe);
  return rc;
}

int pgr_conn_targets_find(const struct pgr_conninfo *ci,
                          struct pgr_conn_targets *out, char *errbuf,
                          size_t errlen) {
  char *host = NULL, *hostaddr = NULL, *port = NULL;
  char **hosts = NULL, **addrs = NULL, **ports = NULL;
  size_t nhosts = 0, naddrs = 0, nports = 0;
  struct lists l;
  int rc;

  PGR_ASSERT_OFF_LOOP();
  memset(out, 0, sizeof *out);
  memset(&l, 0, sizeof l);
  pgr_buf_init(&l.host);
  pgr_buf_init(&l.hostaddr);
  pgr_buf_init(&l.port);
  pgr_buf_init(&l.skipped);
  if ((rc = expand(ci, &host, &hostaddr, &port, errbuf, errlen)) != 0)
    goto out;
  hosts = split(host, &nhosts);
  addrs = split(hostaddr, &naddrs);
  ports = split(port, &nports);
  /* libpq's count: hostaddr's items, else host's, else one default. */
  size_t n = naddrs ? naddrs : nhosts ? nhosts : 1;
  if ((nhosts && nhosts != n) || (nports > 1 && nports != n)) {
    /* libpq refuses these before our probe's check; never seen here. */
    snprintf(errbuf, errlen, "host, hostaddr and port lists do not match");
    rc = PGR_ECONN;
    goto out;
  }
  for (size_t i = 0; i < n; i++) {
    const char *h = item(hosts, nhosts, i);
    const char *a = item(addrs, naddrs, i);
    const char *p = nports == 1 ? ports[0] : item(ports, nports, i);
    /* An address given, libpq's default socket, or a socket path
       (libpq's is_unixsock_path: absolute, or '@' for an abstract one). */
    if (*a || *h == '\0' || *h == '/' || *h == '@')
      add_entry(&l, h, a, p);
    else
      add_resolved(&l, h, p);
  }
  if (l.n == 0) {
    snprintf(errbuf, errlen, "%s", l.skipped.data);
    rc = PGR_ECONN;
    goto out;
  }
  out->host = pgr_strdup(l.host.data);
  out->hostaddr = pgr_strdup(l.hostaddr.data);
  out->port = pgr_strdup(l.port.data);
  out->skipped = l.skipped.len ? pgr_strdup(l.skipped.data) : NULL;
out:
  split_free(hosts, nhosts);
  split_free(addrs, naddrs);
  split_free(ports, nports);
  pgr_buf_free(&l.host);
  pgr_buf_free(&l.hostaddr);
  pgr_buf_free(&l.port);
  pgr_buf_free(&l.skipped);
  free(host);
  free(hostaddr);
  free(port);
  return rc;
}

void pgr_conn_targets_free(struct pgr_conn_targets *t) {
  free(t->host);
  free(t->hostaddr);
  free(t->port);
  free(t->skipped);
  memset(t, 0, sizeof *t);
}
