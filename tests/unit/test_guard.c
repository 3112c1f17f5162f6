/* The async/sync line at run time: a blocking entry point called on the
   loop thread aborts with a clear message. */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>

#include "common.h"
#include "db.h"

Test(guard, off_the_loop_thread_the_guard_is_silent) {
  cr_expect(eq(int, pgr_on_loop_thread(), 0));
  PGR_ASSERT_OFF_LOOP();
  pgr_mark_loop_thread();
  cr_expect(eq(int, pgr_on_loop_thread(), 1));
  pgr_unmark_loop_thread();
  cr_expect(eq(int, pgr_on_loop_thread(), 0));
}

Test(guard, a_blocking_connect_on_the_loop_thread_aborts, .signal = SIGABRT) {
  PGconn *conn;
  char err[128];
  pgr_mark_loop_thread();
  /* Never reaches the network: the guard fires first. */
  (void)!pgr_db_connect("host=127.0.0.1 port=1", "t", &conn, err, sizeof err);
}

Test(guard, a_blocking_query_on_the_loop_thread_aborts, .signal = SIGABRT) {
  char err[128];
  pgr_mark_loop_thread();
  (void)!pgr_db_exec(NULL, "SELECT 1", 0, NULL, err, sizeof err, NULL);
}

static void *other_thread(void *arg) {
  (void)arg;
  /* The mark is per thread: another thread is not the loop. */
  return (void *)(intptr_t)pgr_on_loop_thread();
}

Test(guard, the_mark_belongs_to_one_thread) {
  pthread_t t;
  void *r;
  pgr_mark_loop_thread();
  pthread_create(&t, NULL, other_thread, NULL);
  pthread_join(t, &r);
  cr_expect(eq(int, (int)(intptr_t)r, 0));
  pgr_unmark_loop_thread();
}
