/*
 * unit_pg.h - a real PostgreSQL for the unit tests that need one
 * (test_pgconn.c, test_pool.c): one server for the whole run, initdb into a
 * temporary directory as tests/support/pgr_fixtures.py does (as root it
 * runs as `postgres`), started by a PRE_ALL hook in Criterion's runner
 * process and stopped by a POST_ALL hook. The test processes find it
 * through PGR_UNIT_PG_DSN (server_dsn()).
 *
 * Included by one test file per executable: it defines the hooks.
 */
#ifndef PGR_UNIT_PG_H
#define PGR_UNIT_PG_H

#include <criterion/criterion.h>
#include <criterion/hooks.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- the server (runner process) ---------------------------------------- */

static char pg_dir[64];

static int free_port(void) {
  struct sockaddr_in a = {.sin_family = AF_INET};
  socklen_t n = sizeof a;
  int fd = socket(AF_INET, SOCK_STREAM, 0), port = -1;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof a) == 0 &&
      getsockname(fd, (struct sockaddr *)&a, &n) == 0)
    port = ntohs(a.sin_port);
  if (fd >= 0)
    close(fd);
  return port;
}

/* Runs `cmd` through the shell, as the server's user; 0 on success. */
static int as_pg_user(const char *cmd) {
  char buf[2048];
  if (geteuid() == 0)
    snprintf(buf, sizeof buf, "runuser -u postgres -- sh -c '%s'", cmd);
  else
    snprintf(buf, sizeof buf, "sh -c '%s'", cmd);
  return system(buf);
}

/* The server's programs: PG_BIN, as for the integration tests. */
static const char *pg_bin(void) {
  const char *b = getenv("PG_BIN");
  return b ? b : "/usr/lib/postgresql/15/bin";
}

ReportHook(PRE_ALL)(struct criterion_test_set *set) {
  (void)set;
  const char *bin = pg_bin();
  const char *user = "postgres";
  char cmd[1024], dsn[256];
  int port = free_port();

  snprintf(pg_dir, sizeof pg_dir, "/tmp/pgr-unit-pg-XXXXXX");
  if (port < 0 || mkdtemp(pg_dir) == NULL)
    return;
  if (geteuid() == 0) {
    struct passwd *pw = getpwnam("postgres");
    if (pw == NULL || chown(pg_dir, pw->pw_uid, pw->pw_gid) != 0)
      return;
  } else {
    struct passwd *pw = getpwuid(geteuid());
    user = pw ? pw->pw_name : "postgres";
  }
  snprintf(cmd, sizeof cmd,
           "%s/initdb -D %s/data --auth=trust -E UTF8 --locale=C.UTF-8 "
           "-U %s >%s/initdb.log 2>&1 && "
           "printf \"listen_addresses = \\047127.0.0.1\\047\\nport = %d\\n"
           "unix_socket_directories = \\047%s\\047\\n\" "
           ">>%s/data/postgresql.conf && "
           "%s/pg_ctl -D %s/data -l %s/server.log -w -t 60 start >/dev/null",
           bin, pg_dir, user, pg_dir, port, pg_dir, pg_dir, bin, pg_dir,
           pg_dir);
  if (as_pg_user(cmd) != 0)
    return;
  snprintf(dsn, sizeof dsn,
           "host=127.0.0.1 port=%d user=%s dbname=postgres connect_timeout=10",
           port, user);
  setenv("PGR_UNIT_PG_DSN", dsn, 1);
}

ReportHook(POST_ALL)(struct criterion_global_stats *stats) {
  (void)stats;
  const char *bin = pg_bin();
  char cmd[512];
  if (pg_dir[0] == '\0')
    return;
  snprintf(cmd, sizeof cmd,
           "%s/pg_ctl -D %s/data -m immediate -w stop >/dev/null", bin, pg_dir);
  (void)as_pg_user(cmd);
  snprintf(cmd, sizeof cmd, "rm -rf %s", pg_dir);
  (void)system(cmd);
}

static const char *server_dsn(void) {
  const char *dsn = getenv("PGR_UNIT_PG_DSN");
  cr_assert(dsn != NULL, "the test server did not start (see /tmp/pgr-unit-"
                         "pg-*/initdb.log or server.log)");
  return dsn;
}

#endif /* PGR_UNIT_PG_H */
