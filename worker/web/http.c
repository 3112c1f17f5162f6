/*
 * http.c - the worker's HTTP endpoint on libmicrohttpd: routing, the
 * listening socket, start and stop. What the pages say lives elsewhere
 * (metrics.c renders /metrics and decides /healthz).
 *
 * Thread: pgr_http_start/stop run on the thread that owns the worker's
 * lifecycle; answer() runs on libmicrohttpd's internal polling thread.
 * Ownership: the daemon belongs to start/stop; each response body is
 * malloc'd by its renderer and freed by libmicrohttpd (MHD_RESPMEM_MUST_FREE).
 */
#include "web/http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "metrics.h"
#include "web/dashboard.h"
#include "web/gauges.h"
#include "web/webdb.h"

/* Connections served at once; more wait in the kernel's backlog. */
#define MAX_CONNS 64
/* A client that sends nothing for this long is cut off. */
#define IDLE_TIMEOUT_S 10
/* Per-connection memory, which bounds a request's head: past it the
 * client gets 431. */
#define CONN_MEMORY (8 * 1024)

static const char text_plain[] = "text/plain; charset=utf-8";
static const char text_metrics[] = "text/plain; version=0.0.4; charset=utf-8";
static const char text_html[] = "text/html; charset=utf-8";
static const char app_json[] = "application/json";
/* The dashboard runs its one script file and nothing inline, so markup that
 * slipped through escaping could still not run script. */
static const char csp[] =
    "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'";

static struct MHD_Daemon *daemon_;
/* The gauges' source: set before start, read by the server's thread, freed
 * after stop. */
static char **queues_;
static size_t nqueues_;
static int have_db_;
static int dashboard_;
static int standalone_; /* `pgrunner web`: no worker in this process */
/* PGRUNNER_ADMIN_TOKEN at start; NULL: the dashboard is read-only. */
static char *token_;

void pgr_http_enable_dashboard(int standalone) {
  PGR_ASSERT(daemon_ == NULL);
  dashboard_ = 1;
  standalone_ = standalone != 0;
}

void pgr_http_set_database(const char *conninfo, const char *appname,
                           const char *const *queues, size_t nqueues) {
  PGR_ASSERT(daemon_ == NULL);
  pgr_webdb_setup(conninfo, appname);
  queues_ = pgr_calloc(nqueues ? nqueues : 1, sizeof *queues_);
  for (size_t i = 0; i < nqueues; i++)
    queues_[i] = pgr_strdup(queues[i]);
  nqueues_ = nqueues;
  have_db_ = 1;
}

/* The counters of this process, then the gauges read from the database. */
static char *render_metrics(void) {
  char *own = pgr_metrics_render();
  struct pgr_buf b;

  if (!have_db_)
    return own;
  pgr_buf_init(&b);
  pgr_buf_adds(&b, own);
  free(own);
  pgr_gauges_render((const char *const *)queues_, nqueues_, &b);
  return b.data;
}

/* reply queues status with body (malloc'd; taken). libmicrohttpd leaves the
 * body out of a HEAD reply and keeps its Content-Length. */
static enum MHD_Result reply(struct MHD_Connection *conn, unsigned status,
                             const char *ctype, char *body) {
  struct MHD_Response *r = MHD_create_response_from_buffer(
      strlen(body), body, MHD_RESPMEM_MUST_FREE);
  enum MHD_Result ok;

  if (r == NULL) {
    free(body);
    return MHD_NO;
  }
  /* Scrapes are one request each: closing after it keeps nothing idle. */
  if (ctype == text_html &&
      (MHD_add_response_header(r, "Content-Security-Policy", csp) != MHD_YES ||
       MHD_add_response_header(r, "X-Content-Type-Options", "nosniff") !=
           MHD_YES ||
       MHD_add_response_header(r, "Referrer-Policy", "no-referrer") !=
           MHD_YES)) {
    MHD_destroy_response(r);
    return MHD_NO;
  }
  if (MHD_add_response_header(r, MHD_HTTP_HEADER_CONTENT_TYPE, ctype) !=
          MHD_YES ||
      MHD_add_response_header(r, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store") !=
          MHD_YES ||
      MHD_add_response_header(r, MHD_HTTP_HEADER_CONNECTION, "close") !=
          MHD_YES ||
      (status == MHD_HTTP_METHOD_NOT_ALLOWED &&
       MHD_add_response_header(r, MHD_HTTP_HEADER_ALLOW, "GET, HEAD") !=
           MHD_YES)) {
    MHD_destroy_response(r);
    return MHD_NO;
  }
  ok = MHD_queue_response(conn, status, r);
  MHD_destroy_response(r);
  return ok;
}

/* page answers with what a dashboard renderer put in b. */
static enum MHD_Result page(struct MHD_Connection *conn, int status,
                            const char *ctype, struct pgr_buf *b) {
  if (b->data == NULL)
    pgr_buf_adds(b, "");
  return reply(conn, (unsigned)status, ctype, b->data);
}

/* The request carries the admin token (compared in constant time). */
static int authorized(struct MHD_Connection *conn) {
  const char *t =
      MHD_lookup_connection_value(conn, MHD_HEADER_KIND, "X-Pgrunner-Token");
  size_t n = token_ ? strlen(token_) : 0;
  return token_ != NULL && t != NULL && strlen(t) == n &&
         CRYPTO_memcmp(t, token_, n) == 0;
}

/* POST /api/tasks/ID/ACTION: the only requests that change anything. */
static enum MHD_Result action(struct MHD_Connection *conn, const char *rest) {
  struct pgr_buf b;
  char id[32];
  const char *slash = strchr(rest, '/');

  if (token_ == NULL)
    return reply(conn, MHD_HTTP_FORBIDDEN, app_json,
                 pgr_strdup("{\"error\":\"read-only: PGRUNNER_ADMIN_TOKEN "
                            "is not set\"}\n"));
  if (!authorized(conn))
    return reply(conn, MHD_HTTP_FORBIDDEN, app_json,
                 pgr_strdup("{\"error\":\"wrong or missing token\"}\n"));
  if (slash == NULL || (size_t)(slash - rest) >= sizeof id)
    return reply(conn, MHD_HTTP_NOT_FOUND, app_json,
                 pgr_strdup("{\"error\":\"not found\"}\n"));
  memcpy(id, rest, (size_t)(slash - rest));
  id[slash - rest] = '\0';
  pgr_buf_init(&b);
  int status = pgr_dash_action(id, slash + 1, &b);
  return page(conn, status, app_json, &b);
}

/* GET routes of the dashboard; MHD_NO-like -1 when the path is not one. */
static int dashboard(struct MHD_Connection *conn, const char *url,
                     enum MHD_Result *ret) {
  struct pgr_buf b;
  const char *ctype, *asset;
  int status;

  if ((asset = pgr_dash_asset(url, &ctype)) != NULL) {
    *ret = reply(conn, MHD_HTTP_OK, ctype, pgr_strdup(asset));
    return 0;
  }
  if (strcmp(url, "/") != 0 && strncmp(url, "/task/", 6) != 0)
    return -1;
  pgr_buf_init(&b);
  if (strcmp(url, "/") == 0)
    status = pgr_dash_index((const char *const *)queues_, nqueues_,
                            token_ != NULL, &b);
  else
    status = pgr_dash_task(url + 6, token_ != NULL, &b);
  *ret = page(conn, status, text_html, &b);
  return 0;
}

/* answer is libmicrohttpd's access handler: every request comes here once
 * its head is in, and is answered at once (no route reads a body). */
static enum MHD_Result answer(void *cls, struct MHD_Connection *conn,
                              const char *url, const char *method,
                              const char *version, const char *upload_data,
                              size_t *upload_data_size, void **req_cls) {
  (void)cls;
  (void)version;
  (void)upload_data;
  (void)upload_data_size;
  (void)req_cls;

  /* A request target in absolute form ("http://host/p", which RFC 9112
     has servers accept) routes by its path. */
  if (strncasecmp(url, "http://", 7) == 0 ||
      strncasecmp(url, "https://", 8) == 0) {
    const char *p = strchr(strchr(url, ':') + 3, '/');
    url = p ? p : "/";
  }
  if (dashboard_ && strcmp(method, MHD_HTTP_METHOD_POST) == 0 &&
      strncmp(url, "/api/tasks/", 11) == 0)
    return action(conn, url + 11);
  if (strcmp(method, MHD_HTTP_METHOD_GET) != 0 &&
      strcmp(method, MHD_HTTP_METHOD_HEAD) != 0)
    return reply(conn, MHD_HTTP_METHOD_NOT_ALLOWED, text_plain,
                 pgr_strdup("method not allowed\n"));
  if (strcmp(url, "/metrics") == 0)
    return reply(conn, MHD_HTTP_OK, text_metrics, render_metrics());
  if (strcmp(url, "/healthz") == 0 && standalone_) {
    /* `pgrunner web`: healthy while it can read the database. */
    char err[256];
    if (pgr_webdb_get(err, sizeof err) != NULL)
      return reply(conn, MHD_HTTP_OK, text_plain, pgr_strdup("ok\n"));
    return reply(conn, MHD_HTTP_SERVICE_UNAVAILABLE, text_plain,
                 pgr_asprintf("database unavailable: %s\n", err));
  }
  if (strcmp(url, "/healthz") == 0) {
    char *body = NULL;
    unsigned status = (unsigned)pgr_metrics_health(&body);
    return reply(conn, status, text_plain, body);
  }
  enum MHD_Result ret;
  if (dashboard_ && dashboard(conn, url, &ret) == 0)
    return ret;
  return reply(conn, MHD_HTTP_NOT_FOUND, text_plain, pgr_strdup("not found\n"));
}

/*
 * open_listener binds and listens on host:port itself, so that a port in
 * use is reported with its errno before anything starts, and so that "::"
 * gets dual stack.
 */
static int open_listener(const char *host, int port, int *fd_out, char *errbuf,
                         size_t errlen) {
  struct sockaddr_storage ss;
  socklen_t sslen;
  int fd = -1, one = 1, v6 = 0, rc = PGR_EIO;

  memset(&ss, 0, sizeof ss);
  if (port < 1 || port > 65535) {
    snprintf(errbuf, errlen, "port %d is out of range 1-65535", port);
    rc = PGR_EUSAGE;
    goto out;
  }
  if (strcmp(host, "localhost") == 0)
    host = "127.0.0.1";
  struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
    sin->sin_family = AF_INET;
    sin->sin_port = htons((uint16_t)port);
    sslen = sizeof *sin;
  } else if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
    sin6->sin6_family = AF_INET6;
    sin6->sin6_port = htons((uint16_t)port);
    sslen = sizeof *sin6;
    v6 = 1;
  } else {
    snprintf(errbuf, errlen,
             "\"%s\" is not an IPv4 or IPv6 address (use 0.0.0.0 for all "
             "interfaces)",
             host);
    rc = PGR_EUSAGE;
    goto out;
  }

  fd = socket(ss.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    snprintf(errbuf, errlen, "socket: %s", strerror(errno));
    goto out;
  }
  /* Restarting right after a stop must not wait out TIME_WAIT. On Linux
   * this never lets two listeners share a port. */
  (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (v6) {
    /* "::" serves IPv4 too (dual stack); a specific address only itself. */
    int only = !IN6_IS_ADDR_UNSPECIFIED(&sin6->sin6_addr);
    (void)setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &only, sizeof only);
  }
  if (bind(fd, (struct sockaddr *)&ss, sslen) != 0 ||
      listen(fd, MAX_CONNS) != 0) {
    snprintf(errbuf, errlen, "cannot listen on %s%s%s:%d: %s", v6 ? "[" : "",
             host, v6 ? "]" : "", port, strerror(errno));
    rc = errno == EADDRINUSE || errno == EADDRNOTAVAIL || errno == EACCES
             ? PGR_EUSAGE
             : PGR_EIO;
    goto out;
  }
  *fd_out = fd;
  fd = -1;
  rc = 0;
out:
  if (fd >= 0)
    close(fd);
  return rc;
}

int pgr_http_start(const char *host, int port, char *errbuf, size_t errlen) {
  int fd = -1, rc;
  const char *token = getenv("PGRUNNER_ADMIN_TOKEN");

  if (daemon_ != NULL) {
    snprintf(errbuf, errlen, "the metrics server is already running");
    return PGR_EINVAL;
  }
  if (host == NULL || *host == '\0')
    host = "0.0.0.0";
  rc = open_listener(host, port, &fd, errbuf, errlen);
  if (rc != 0)
    return rc;
  free(token_);
  token_ = token && *token ? pgr_strdup(token) : NULL;
  /* The daemon takes the socket (and closes it at stop); its own thread
   * polls it. Writes to a vanished client use MSG_NOSIGNAL, so no SIGPIPE. */
  daemon_ = MHD_start_daemon(
      MHD_USE_AUTO_INTERNAL_THREAD, 0, NULL, NULL, answer, NULL,
      MHD_OPTION_LISTEN_SOCKET, (MHD_socket)fd, MHD_OPTION_CONNECTION_LIMIT,
      (unsigned int)MAX_CONNS, MHD_OPTION_CONNECTION_TIMEOUT,
      (unsigned int)IDLE_TIMEOUT_S, MHD_OPTION_CONNECTION_MEMORY_LIMIT,
      (size_t)CONN_MEMORY, MHD_OPTION_END);
  if (daemon_ == NULL) {
    close(fd);
    snprintf(errbuf, errlen, "cannot start the HTTP server on %s:%d", host,
             port);
    return PGR_EIO;
  }
  return 0;
}

void pgr_http_stop(void) {
  if (daemon_ != NULL)
    MHD_stop_daemon(daemon_);
  daemon_ = NULL;
  free(token_);
  token_ = NULL;
  dashboard_ = standalone_ = 0;
  if (have_db_) {
    pgr_webdb_close();
    for (size_t i = 0; i < nqueues_; i++)
      free(queues_[i]);
    free(queues_);
    queues_ = NULL;
    nqueues_ = 0;
    have_db_ = 0;
  }
}
