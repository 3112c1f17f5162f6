/*
 * loop/internal.h - the worker's loop-side state, shared by the files of
 * worker/loop/.
 *
 * Thread: LOOP THREAD ONLY. Nothing reachable from here may block: no
 * blocking libpq call, no file I/O, no sleep (tests/lint enforces the names,
 * PGR_ASSERT_OFF_LOOP the behaviour).
 */
#ifndef PGR_LOOP_INTERNAL_H
#define PGR_LOOP_INTERNAL_H

#include <stdint.h>

#include <uv.h>

#include "config.h"
#include "handlers.h"
#include "loop/pgconn.h"
#include "pool.h"

/* Where the next claim of one queue starts: just after the last task this
   worker claimed from it (see pgr_claim_sql in claim.c). */
struct pgr_cursor {
  int set; /* 0: from the front of the queue */
  int priority;
  char run_at[64]; /* as the server printed it; sent back as it was */
  int64_t id;
};

/* Where the worker is in its life. It only moves forward; the loop's
   callbacks ask it rather than a set of flags. */
enum pgr_phase {
  PGR_PHASE_STARTING = 0, /* until the schema check first passes */
  PGR_PHASE_RUNNING,      /* claiming and running tasks */
  PGR_PHASE_DRAINING,     /* stopping: no claims, running tasks may end */
  PGR_PHASE_CLOSING,      /* deregistering, then closing every handle */
};

/* Where the claim connection's session is: back to DOWN at every drop. */
enum pgr_session {
  PGR_SESSION_DOWN = 0,   /* not connected, or not set up yet */
  PGR_SESSION_SET_UP,     /* LISTEN, settings and the claim queued */
  PGR_SESSION_REGISTERED, /* the worker's row is there and what a lost
                             claim left running is given back: claims run */
};

/* session.c's check of --listen-db, in order. */
enum pgr_probe {
  PGR_PROBE_NONE = 0,  /* not started (or restarting after a reconnect) */
  PGR_PROBE_STARTING,  /* LISTEN and the pid asked on pg */
  PGR_PROBE_LISTENING, /* waiting for maint to send the notification */
  PGR_PROBE_NOTIFYING, /* the notification sent from maint */
  PGR_PROBE_CHECKING,  /* the pid asked again on pg */
  PGR_PROBE_PASSED,
  PGR_PROBE_FAILED,
};

struct pgr_loop {
  const struct pgr_config *cfg;
  uv_loop_t loop;
  struct pgr_pgconn pg;    /* LISTEN and claims (listener.c, claim.c) */
  struct pgr_pgconn maint; /* heartbeat and retention (janitor.c) */
  struct pgr_pool *pool;
  const struct pgr_handlers *handlers;

  int64_t worker_id;
  char appname[64];
  char hostname[256];

  uv_async_t done_async;
  uv_signal_t sigterm, sigint, sighup;
  uv_timer_t wake_timer;      /* the earliest future run_at */
  uint64_t wake_at_ms;        /* wall clock of wake_timer; 0: not armed */
  uv_timer_t poll_timer;      /* --poll-interval fallback */
  uv_timer_t gather_timer;    /* a claim waiting for more idle threads */
  uv_timer_t heartbeat_timer; /* register, heartbeat, recovery */
  uv_timer_t prune_timer;     /* retention */
  uv_timer_t watchdog_timer;  /* task time limits */
  uv_timer_t shutdown_timer;  /* --shutdown-timeout */

  /* Claimed attempts on the worker threads, newest first. */
  struct pgr_claim *inflight;
  int ninflight;
  int *queue_running; /* per cfg->queues index */
  /* Outcomes per cfg->queues index, and what the janitor reported of them
     to pgrunner.queue_stats; indexes PGR_DONE_SUCCEEDED, _RETRY, _FAILED. */
  uint64_t (*queue_done)[3];
  uint64_t (*queue_reported)[3];
  int stats_busy;
  struct pgr_cursor *cursors; /* per cfg->queues index */
  uint64_t swept_ms;          /* last claim from the front of every queue */

  enum pgr_probe probe;        /* is --listen-db a session? (session.c) */
  int probe_pid;               /* pg's backend at the probe's LISTEN */
  int probe_seen;              /* the probe's notification reached pg */
  unsigned probe_round;        /* probes started (one per pg session) */
  unsigned probe_notify_round; /* the round of the notify in flight, or 0 */
  char probe_channel[64];
  enum pgr_phase phase;
  enum pgr_session session; /* of pg */
  int schema_checking;      /* the schema check is in flight */
  int schema_behind;        /* the last check found it missing or behind */
  int schema_logged;        /* ... and said so at error level */
  uint64_t registered_ms;   /* uv_now() when the session registered */
  int releasing;            /* release_unknown in flight */
  unsigned ticks;           /* heartbeat timer ticks */
  int claiming;             /* a claim query is in flight */
  int claim_asked;          /* how many it asked for */
  int more;                 /* work may be waiting: claim when a slot frees */
  int heartbeat_busy;
  int sweep_busy;
  int prune_busy;
  int64_t pruned; /* by the current run of full batches */
  int interrupted_all;
  int exit_code;
};

/* listener.c: the claim connection's callbacks (pgconn.h) */
void pgr_listener_on_up(struct pgr_pgconn *c);
void pgr_listener_on_down(struct pgr_pgconn *c, const char *why);
void pgr_listener_on_connect_failed(struct pgr_pgconn *c, int kind,
                                    const char *why);
void pgr_listener_on_notify(struct pgr_pgconn *c, const char *channel,
                            const char *payload);
void pgr_listener_start_timers(struct pgr_loop *l);
/* LISTEN, the session's settings and the prepared claim, then register. */
void pgr_listener_setup_session(struct pgr_loop *l);

/* claim.c */
extern const char pgr_claim_sql[];
/* Claim for the idle threads, if any, now or once a claim in flight ends. */
void pgr_claims_request(struct pgr_loop *l);
/* Claim again in in_ms (the next delayed task), unless sooner is set. */
void pgr_claims_wake_at(struct pgr_loop *l, int64_t in_ms);
/* Claims start from the front of every queue again (a new session). */
void pgr_claims_reset(struct pgr_loop *l);

/* registry.c */
void pgr_registry_check_schema(struct pgr_loop *l);
/* While the schema is behind, check it again (heartbeat ticks). */
void pgr_registry_recheck_schema(struct pgr_loop *l);
/* A heartbeat succeeded: on a new session, register. */
void pgr_registry_on_heartbeat(struct pgr_loop *l);
/* Every few seconds after registering: give back what is ours and unknown. */
void pgr_registry_release_unknown(struct pgr_loop *l);
/* The ids of the tasks the threads hold, as an array literal (initialises
   b; the caller frees it). */
void pgr_registry_inflight_ids(struct pgr_loop *l, struct pgr_buf *b);

/* session.c: the check that --listen-db is a session, started once the
   schema is known to be there; on success it sets up both connections. */
void pgr_session_probe_start(struct pgr_loop *l);
void pgr_session_probe_notify(struct pgr_loop *l);  /* when maint is up */
void pgr_session_probe_on_down(struct pgr_loop *l); /* pg dropped */
/* 1 if the notification was the probe's (then it is nobody else's). */
int pgr_session_probe_on_notify(struct pgr_loop *l, const char *channel);

/* janitor.c */
PGR_MUSTCHECK int pgr_janitor_init(struct pgr_loop *l, char *err,
                                   size_t errlen);
void pgr_janitor_start(struct pgr_loop *l);
void pgr_janitor_stop(struct pgr_loop *l);
void pgr_janitor_heartbeat(struct pgr_loop *l, struct pgr_pgconn *c);
/* maint's session settings, once session.c has passed --listen-db. */
void pgr_janitor_setup(struct pgr_loop *l);
/* Queue the worker's liveness lock on a loop connection, first thing after
   it comes up (see janitor.c). */
PGR_MUSTCHECK int pgr_janitor_hold_liveness(struct pgr_loop *l,
                                            struct pgr_pgconn *c);

/* dispatch.c */
void pgr_dispatch_submit(struct pgr_loop *l, struct pgr_claim *c);
void pgr_dispatch_on_done(uv_async_t *a);
void pgr_dispatch_interrupt(struct pgr_loop *l, int64_t id,
                            enum pgr_interrupt why);
void pgr_dispatch_interrupt_all(struct pgr_loop *l, enum pgr_interrupt why);
void pgr_dispatch_on_watchdog(uv_timer_t *t);
/* Shutdown: queue again (no attempt spent) what no thread has started. */
void pgr_dispatch_give_back(struct pgr_loop *l);

/* loop.c */
void pgr_loop_maybe_finish(struct pgr_loop *l);
/* Stop the worker for an error (exit code `code`) as a signal would. */
void pgr_loop_fail(struct pgr_loop *l, int code);

#endif /* PGR_LOOP_INTERNAL_H */
