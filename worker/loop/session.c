/*
 * session.c - is --listen-db a session? Checked once, at start, before
 * either loop connection changes a session setting or the worker registers.
 *
 * Thread: LOOP THREAD ONLY. Every query goes through pgconn.c's
 * nonblocking queue.
 *
 * LISTEN, the prepared claim and the loop's session settings live in one
 * server session. A transaction pooler (PgBouncer pool_mode=transaction)
 * lends a client a server connection per transaction only: notifications
 * reach whichever client holds that server connection at the time, or are
 * dropped while it sits in the pool ("got packet 'A' from server when not
 * linked"). Nothing in the protocol says a pooler is there or in which
 * mode (pgbouncer/pgbouncer#249, #653), so we test the one property we
 * need, with the two loop connections, which go to the same pool:
 *
 *   1. claim connection:  LISTEN a channel of our own; SELECT pg_backend_pid()
 *      (one statement string: one transaction, one server connection)
 *   2. maintenance connection:  SELECT pg_backend_pid(), pg_notify(channel)
 *   3. claim connection:  SELECT pg_backend_pid()
 *
 * The claim connection sends nothing between 1 and 3. With a session (a
 * direct connection, or session pooling) the pid of 1 and 3 is the same,
 * 2's is another, and the notification reaches the claim connection before
 * 3's answer: a backend delivers notifications that arrived during a
 * statement before its ReadyForQuery, and the signal announcing this one
 * was sent before 2 committed, which was before 3 was sent. Through a
 * transaction pooler the idle claim connection holds no server connection
 * at step 2, so either 2 runs on the server connection of 1 (the same pid;
 * PgBouncer hands out the most recently used idle one first), or the
 * notification goes to a server connection the claim connection does not
 * hold at that moment, and 3 sees no notification (or another pid). The
 * answer does not depend on timing. Pids are compared as the server reports
 * them (pg_backend_pid()): behind a pooler PQbackendPID() is the pooler's
 * own number.
 */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "loop/internal.h"

static void fail(struct pgr_loop *l, const char *why) {
  l->probe = PGR_PROBE_FAILED;
  pgr_error("the listening connection goes through a transaction pooler "
            "(such as PgBouncer with pool_mode=transaction): LISTEN and the "
            "claim need a session; point --listen-db at PostgreSQL or at a "
            "session pool",
            PGR_LS("cause", why));
  l->exit_code = 1;
  uv_kill(getpid(), SIGTERM);
}

/* An error answer (not a dropped connection): we cannot tell, and starting
   without knowing could lose every notification. */
static int refused(struct pgr_loop *l, PGresult *res) {
  if (PQresultStatus(res) == PGRES_TUPLES_OK && PQntuples(res) == 1)
    return 0;
  const char *m = PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY);
  l->probe = PGR_PROBE_FAILED;
  pgr_error("cannot check that the listening connection is a session",
            PGR_LS("error", m ? m : "unexpected answer"));
  l->exit_code = 1;
  uv_kill(getpid(), SIGTERM);
  return 1;
}

static void on_unlistened(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  (void)pc;
  (void)res;
  (void)arg;
}

static void on_checked(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  if (res == NULL || l->probe != PGR_PROBE_CHECKING)
    return; /* the claim connection dropped: redone when it is back */
  if (refused(l, res))
    return;
  if (atoi(PQgetvalue(res, 0, 0)) != l->probe_pid) {
    fail(l, "consecutive statements ran on different server connections");
    return;
  }
  if (!l->probe_seen) {
    fail(l, "a notification to this connection's LISTEN did not arrive");
    return;
  }
  l->probe = PGR_PROBE_PASSED;
  pgr_debug("the listening connection is a session",
            PGR_LI("backend_pid", l->probe_pid));
  char sql[96];
  snprintf(sql, sizeof sql, "UNLISTEN %s", l->probe_channel);
  pgr_janitor_setup(l);
  if (pgr_pgconn_query(&l->pg, sql, 0, NULL, on_unlistened, l) == 0)
    pgr_listener_setup_session(l); /* else at the next connect */
}

static void on_notified(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  int stale = l->probe_notify_round != l->probe_round;
  l->probe_notify_round = 0;
  if (stale) {
    /* Sent before the claim connection's last reconnect: that session
       never listened for it. Notify the new one. */
    pgr_session_probe_notify(l);
    return;
  }
  if (l->probe != PGR_PROBE_NOTIFYING)
    return;
  if (res == NULL) {
    l->probe = PGR_PROBE_LISTENING; /* again when maint is back up */
    return;
  }
  if (refused(l, res))
    return;
  if (atoi(PQgetvalue(res, 0, 0)) == l->probe_pid) {
    fail(l, "both loop connections ran on one server connection");
    return;
  }
  l->probe = PGR_PROBE_CHECKING;
  if (pgr_pgconn_query(&l->pg, "SELECT pg_backend_pid()", 0, NULL, on_checked,
                       l) != 0)
    l->probe = PGR_PROBE_NONE; /* the claim connection is down */
}

void pgr_session_probe_notify(struct pgr_loop *l) {
  const char *params[1] = {l->probe_channel};
  if (l->probe != PGR_PROBE_LISTENING || l->probe_notify_round != 0 ||
      !pgr_pgconn_ready(&l->maint))
    return;
  if (pgr_pgconn_query(&l->maint, "SELECT pg_backend_pid(), pg_notify($1, '')",
                       1, params, on_notified, l) == 0) {
    l->probe = PGR_PROBE_NOTIFYING;
    l->probe_notify_round = l->probe_round;
  }
}

static void on_listening(struct pgr_pgconn *pc, PGresult *res, void *arg) {
  struct pgr_loop *l = arg;
  (void)pc;
  if (res == NULL || l->probe != PGR_PROBE_STARTING)
    return;
  if (refused(l, res))
    return;
  l->probe_pid = atoi(PQgetvalue(res, 0, 0));
  l->probe = PGR_PROBE_LISTENING;
  pgr_session_probe_notify(l);
}

void pgr_session_probe_start(struct pgr_loop *l) {
  char sql[128];
  /* The worker id keeps the channel ours alone. */
  snprintf(l->probe_channel, sizeof l->probe_channel, "pgrunner_probe_%016llx",
           (unsigned long long)l->worker_id);
  snprintf(sql, sizeof sql, "LISTEN %s; SELECT pg_backend_pid()",
           l->probe_channel);
  l->probe_seen = 0;
  l->probe_round++;
  l->probe = PGR_PROBE_STARTING;
  if (pgr_pgconn_query(&l->pg, sql, 0, NULL, on_listening, l) != 0)
    l->probe = PGR_PROBE_NONE;
}

void pgr_session_probe_on_down(struct pgr_loop *l) {
  /* A new server session: LISTEN again from the start. */
  if (l->probe != PGR_PROBE_PASSED && l->probe != PGR_PROBE_FAILED)
    l->probe = PGR_PROBE_NONE;
}

int pgr_session_probe_on_notify(struct pgr_loop *l, const char *channel) {
  if (strcmp(channel, l->probe_channel) != 0)
    return 0;
  l->probe_seen = 1;
  return 1;
}
