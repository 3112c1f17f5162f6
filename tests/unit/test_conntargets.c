/* Unit tests for conntargets.c: the host, hostaddr and port lists libpq
   would use, with libpq's own expansion (real libpq, no server needed). */
#include <criterion/criterion.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "conntargets.h"

static int find(const char *conninfo, struct pgr_conn_targets *t, char *err,
                size_t errlen) {
  struct pgr_conninfo ci;
  char perr[256];
  cr_assert(pgr_conninfo_parse(conninfo, "t", &ci, perr, sizeof perr) == 0,
            "%s", perr);
  int rc = pgr_conn_targets_find(&ci, t, err, errlen);
  pgr_conninfo_free(&ci);
  return rc;
}

/* The lists found for `conninfo` are exactly these, and nothing skipped. */
static void expect(const char *conninfo, const char *host, const char *hostaddr,
                   const char *port) {
  struct pgr_conn_targets t;
  char err[256] = "";
  cr_assert(find(conninfo, &t, err, sizeof err) == 0, "%s: %s", conninfo, err);
  cr_expect_str_eq(t.host, host);
  cr_expect_str_eq(t.hostaddr, hostaddr);
  cr_expect_str_eq(t.port, port);
  cr_expect_null(t.skipped);
  pgr_conn_targets_free(&t);
}

Test(conntargets, numeric_and_socket_hosts_keep_their_order_and_ports) {
  /* A socket needs no address; the numeric hosts are their own. */
  expect("host=127.0.0.1,/tmp/pgr-sock,::1 port=1,2,3",
         "127.0.0.1,/tmp/pgr-sock,::1", "127.0.0.1,,::1", "1,2,3");
}

Test(conntargets, one_port_applies_to_every_host) {
  expect("host=127.0.0.2,127.0.0.3 port=7", "127.0.0.2,127.0.0.3",
         "127.0.0.2,127.0.0.3", "7,7");
}

Test(conntargets, a_name_becomes_one_entry_per_address) {
  struct pgr_conn_targets t;
  char err[256] = "";
  cr_assert(find("host=localhost port=9", &t, err, sizeof err) == 0, "%s", err);
  /* However many addresses localhost has here, each entry keeps the name
     (for TLS and messages) beside one numeric address. */
  size_t n = 1;
  for (const char *p = t.host; *p; p++)
    n += *p == ',';
  char want_host[256] = "", want_port[64] = "";
  for (size_t i = 0; i < n; i++) {
    strcat(want_host, i ? ",localhost" : "localhost");
    strcat(want_port, i ? ",9" : "9");
  }
  cr_expect_str_eq(t.host, want_host);
  cr_expect_str_eq(t.port, want_port);
  cr_expect(strstr(t.hostaddr, "127.0.0.1") != NULL ||
                strstr(t.hostaddr, "::1") != NULL,
            "%s", t.hostaddr);
  pgr_conn_targets_free(&t);
}

Test(conntargets, the_service_file_is_expanded) {
  char path[] = "/tmp/pgr-svc-XXXXXX";
  int fd = mkstemp(path);
  cr_assert(fd >= 0);
  FILE *f = fdopen(fd, "w");
  fputs("[pgrsvc]\nhost=127.0.0.4,127.0.0.5\nport=11,12\n", f);
  fclose(f);
  setenv("PGSERVICEFILE", path, 1);
  expect("service=pgrsvc dbname=x", "127.0.0.4,127.0.0.5",
         "127.0.0.4,127.0.0.5", "11,12");
  unsetenv("PGSERVICEFILE");
  unlink(path);
}

Test(conntargets, pghost_is_expanded) {
  setenv("PGHOST", "127.0.0.6,127.0.0.7", 1);
  expect("port=13", "127.0.0.6,127.0.0.7", "127.0.0.6,127.0.0.7", "13,13");
  unsetenv("PGHOST");
}

Test(conntargets, a_given_hostaddr_is_kept) {
  expect("host=db.example hostaddr=127.0.0.8 port=14", "db.example",
         "127.0.0.8", "14");
}

Test(conntargets, a_host_that_does_not_resolve_is_skipped) {
  struct pgr_conn_targets t;
  char err[256] = "";
  cr_assert(find("host=pgr-no-such-host.invalid,127.0.0.9 port=15,16", &t, err,
                 sizeof err) == 0,
            "%s", err);
  cr_expect_str_eq(t.host, "127.0.0.9");
  cr_expect_str_eq(t.port, "16");
  cr_assert_not_null(t.skipped);
  cr_expect(strstr(t.skipped, "pgr-no-such-host.invalid") != NULL, "%s",
            t.skipped);
  pgr_conn_targets_free(&t);
  cr_expect(find("host=pgr-no-such-host.invalid", &t, err, sizeof err) != 0);
  cr_expect(strstr(err, "pgr-no-such-host.invalid") != NULL, "%s", err);
}

Test(conntargets, a_bad_string_is_reported) {
  struct pgr_conn_targets t;
  char err[256] = "";
  cr_expect(find("host=a,b port=1,2,3", &t, err, sizeof err) != 0);
  cr_expect(strstr(err, "port") != NULL, "%s", err);
  setenv("PGSERVICEFILE", "/nonexistent/pgr-svc", 1);
  cr_expect(find("service=nope", &t, err, sizeof err) != 0);
  unsetenv("PGSERVICEFILE");
  cr_expect(strstr(err, "service") != NULL, "%s", err);
}
