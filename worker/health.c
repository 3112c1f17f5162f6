/*
 * health.c - the worker's health, one mutex around a few facts (see
 * health.h for who writes what).
 *
 * Thread: any.
 */
#include "health.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include "common.h"

#define WHY_LEN 512

static uv_once_t once = UV_ONCE_INIT;
static uv_mutex_t mu;

static struct {
  int loop_up;
  char loop_why[WHY_LEN];
  int schema_have, schema_need; /* need 0: not checked yet */
  int claim_failing;
  char claim_why[WHY_LEN];
  int nthreads;
  unsigned char *thread_failing; /* per thread: its last attempt failed */
  int nfailing;
  char thread_why[WHY_LEN]; /* the latest failure's message */
} h = {.loop_why = "not connected yet"};

static void init_once(void) {
  PGR_ASSERT(uv_mutex_init(&mu) == 0);
}

static void lock(void) {
  uv_once(&once, init_once);
  uv_mutex_lock(&mu);
}

static void copy(char *dst, const char *src) {
  snprintf(dst, WHY_LEN, "%s", src && *src ? src : "unknown error");
}

void pgr_health_reset(int nthreads) {
  unsigned char *failing = pgr_calloc(nthreads > 0 ? (size_t)nthreads : 1, 1);
  lock();
  free(h.thread_failing);
  memset(&h, 0, sizeof h);
  copy(h.loop_why, "not connected yet");
  h.nthreads = nthreads;
  h.thread_failing = failing;
  uv_mutex_unlock(&mu);
}

void pgr_health_loop_up(void) {
  lock();
  h.loop_up = 1;
  uv_mutex_unlock(&mu);
}

void pgr_health_loop_down(const char *why) {
  lock();
  h.loop_up = 0;
  copy(h.loop_why, why);
  uv_mutex_unlock(&mu);
}

void pgr_health_schema(int have, int need) {
  lock();
  h.schema_have = have;
  h.schema_need = need;
  uv_mutex_unlock(&mu);
}

void pgr_health_claim_ok(void) {
  lock();
  h.claim_failing = 0;
  uv_mutex_unlock(&mu);
}

void pgr_health_claim_failed(const char *why) {
  lock();
  h.claim_failing = 1;
  copy(h.claim_why, why);
  uv_mutex_unlock(&mu);
}

void pgr_health_thread_failed(int index, const char *why) {
  lock();
  if (index >= 0 && index < h.nthreads) {
    if (!h.thread_failing[index])
      h.nfailing++;
    h.thread_failing[index] = 1;
    copy(h.thread_why, why);
  }
  uv_mutex_unlock(&mu);
}

void pgr_health_thread_connected(int index) {
  lock();
  if (index >= 0 && index < h.nthreads && h.thread_failing[index]) {
    h.thread_failing[index] = 0;
    h.nfailing--;
  }
  uv_mutex_unlock(&mu);
}

int pgr_health_db_up(void) {
  int up;
  lock();
  up = h.loop_up;
  uv_mutex_unlock(&mu);
  return up;
}

int pgr_health_reason(char *buf, size_t len) {
  int ok = 0;
  lock();
  if (!h.loop_up)
    snprintf(buf, len, "database connection down: %s", h.loop_why);
  else if (h.schema_need > 0 && h.schema_have < h.schema_need)
    snprintf(buf, len, "schema behind: have %d, need %d", h.schema_have,
             h.schema_need);
  else if (h.nfailing > 0 && h.nfailing >= h.nthreads)
    snprintf(buf, len, "no worker thread can connect: %s", h.thread_why);
  else if (h.nfailing > 0)
    snprintf(buf, len, "%d of %d worker threads cannot connect: %s", h.nfailing,
             h.nthreads, h.thread_why);
  else if (h.claim_failing)
    snprintf(buf, len, "claims failing: %s", h.claim_why);
  else {
    snprintf(buf, len, "ok");
    ok = 1;
  }
  uv_mutex_unlock(&mu);
  return ok;
}
