/* Patterns the lint must accept: names in comments and strings, the
   nonblocking forms, guarded PQgetResult and a reasoned exception. A
   comment may say getaddrinfo() or sleep() or PQexec() freely. */
#include <stdio.h>
#include <libpq-fe.h>
#include <uv.h>

#include "loop/internal.h"

static const char *doc = "never PQexec(conn) or fopen(path) here";

static void on_open(uv_fs_t *req) {
  uv_fs_req_cleanup(req);
}

static void on_resolved(uv_getaddrinfo_t *req, int status,
                        struct addrinfo *res) {
  (void)req;
  (void)status;
  uv_freeaddrinfo(res);
}

static void on_readable(PGconn *conn, uv_loop_t *loop, uv_fs_t *req,
                        uv_getaddrinfo_t *gai) {
  PQconsumeInput(conn);
  while (!PQisBusy(conn)) {
    PGresult *res = PQgetResult(conn);
    if (res == NULL)
      break;
    PQclear(res);
  }
  if (PQisBusy(conn))
    return;
  /* lint-ok(pq-getresult): PQisBusy() was false just above */
  PQclear(PQgetResult(conn));
  uv_fs_open(loop, req, "/tmp/x", 0, 0,
             on_open);
  uv_getaddrinfo(loop, gai, on_resolved, "db", NULL, NULL);
  PQsendQuery(conn, "SELECT 1");
  PQconnectStartParams(NULL, NULL, 0);
  fprintf(stderr, "%s\n", doc);
}

int pgr_start(void) {
  FILE *f = fopen("/etc/pgrunner", "r"); /* lint-ok(libc-file): at start */
  return f != NULL;
}
