/*
 * common.h - error codes, assertions, allocation and the loop-thread guard.
 *
 * Thread: any.
 *
 * Functions across pgrunner return 0 or a negative PGR_E* code (libuv's
 * contract). Out of memory aborts: a worker that cannot allocate a few bytes
 * cannot make progress, and unwinding every call site for it buys nothing.
 */
#ifndef PGR_COMMON_H
#define PGR_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <stdnoreturn.h>

#define PGR_MUSTCHECK __attribute__((warn_unused_result))
#define PGR_PRINTF(a, b) __attribute__((format(printf, a, b)))

#define PGR_VERSION "0.1.0"

enum {
  PGR_OK = 0,
  PGR_EUSAGE = -1, /* bad command line or configuration: exit 2 */
  PGR_EDB = -2,    /* database error */
  PGR_ECONN = -3,  /* could not connect / connection lost */
  PGR_EJSON = -4,  /* malformed JSON */
  PGR_EIO = -5,    /* file or socket I/O */
  PGR_ENOTFOUND = -6,
  PGR_EINVAL = -8, /* invalid argument */
};

noreturn void pgr_fatal(const char *file, int line, const char *fmt, ...)
    PGR_PRINTF(3, 4);

#define PGR_ASSERT(cond)                                                       \
  do {                                                                         \
    if (!(cond))                                                               \
      pgr_fatal(__FILE__, __LINE__, "assertion failed: %s", #cond);            \
  } while (0)

void *pgr_malloc(size_t n);
void *pgr_calloc(size_t n, size_t size);
void *pgr_realloc(void *p, size_t n);
char *pgr_strdup(const char *s);
char *pgr_strndup(const char *s, size_t n);
/* Cut trailing newlines, carriage returns and spaces (libpq's messages
   end with a newline) in place. */
void pgr_trim_end(char *s);
char *pgr_asprintf(const char *fmt, ...) PGR_PRINTF(1, 2);
/* pthread_sigmask(how) of the stop signals: SIGTERM, SIGINT and SIGHUP. */
void pgr_stop_signals_mask(int how);

/*
 * The async/sync line, enforced at run time. The loop thread calls
 * pgr_mark_loop_thread() once; every blocking entry point (a blocking
 * libpq call, an SMTP session, a sleep) starts with PGR_ASSERT_OFF_LOOP(),
 * which aborts with a clear message when it finds itself on that thread.
 */
void pgr_mark_loop_thread(void);
void pgr_unmark_loop_thread(void);
int pgr_on_loop_thread(void);
#define PGR_ASSERT_OFF_LOOP()                                                  \
  do {                                                                         \
    if (pgr_on_loop_thread())                                                  \
      pgr_fatal(__FILE__, __LINE__,                                            \
                "blocking call %s() made on the event-loop thread; blocking "  \
                "database and network work belongs on a worker thread",        \
                __func__);                                                     \
  } while (0)

/* Monotonic and wall clocks, in milliseconds / microseconds. */
uint64_t pgr_now_ms(void);
uint64_t pgr_now_us(void);
int64_t pgr_wall_ms(void);

/* A small growable string buffer; NUL-terminated at all times. */
struct pgr_buf {
  char *data;
  size_t len;
  size_t cap;
};
void pgr_buf_init(struct pgr_buf *b);
void pgr_buf_free(struct pgr_buf *b);
void pgr_buf_reset(struct pgr_buf *b);
void pgr_buf_add(struct pgr_buf *b, const char *s, size_t n);
void pgr_buf_adds(struct pgr_buf *b, const char *s);
void pgr_buf_addc(struct pgr_buf *b, char c);
void pgr_buf_printf(struct pgr_buf *b, const char *fmt, ...) PGR_PRINTF(2, 3);
/*
 * Sent on the connections that run only pgrunner's own statements (the
 * loop's two; `status`, `cancel` and `retry` use the LOCAL form below): each of
 * those statements was written to read a bounded index range, and this keeps
 * stale statistics (a bulk insert nobody analyzed) or a cached generic plan
 * from swapping that for a read of the whole table.
 * tests/integration/test_plans.py checks the plans. No JIT: a read left with no
 * index keeps the priced-out cost, which the server would otherwise pay an LLVM
 * compilation for at every call.
 */
#define PGR_PLANNER_SETTINGS                                                   \
  "SET enable_seqscan = off; SET enable_bitmapscan = off; "                    \
  "SET enable_hashjoin = off; SET enable_mergejoin = off; SET jit = off"
/* The same for one transaction, on connections that may go through a
   transaction pooler (the commands' --db), where a session setting would
   stay behind on a server connection that other clients use next. */
#define PGR_PLANNER_SETTINGS_LOCAL                                             \
  "SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; "        \
  "SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off; "        \
  "SET LOCAL jit = off"

/* One element of a PostgreSQL array literal: double-quoted, escaped. */
void pgr_buf_add_array_elem(struct pgr_buf *b, const char *s);
/* The length of the well-formed UTF-8 sequence at p (n bytes there), 1 to
 * 4, or 0 if it is ill-formed (common.c). */
size_t pgr_utf8_len(const unsigned char *p, size_t n);

/* What a jansson value is, for messages: "an object", "a number"... */
struct json_t;
const char *pgr_json_kind(const struct json_t *v);
/* A whole PostgreSQL text[] literal of n strings. */
void pgr_buf_add_array(struct pgr_buf *b, const char *const *items, size_t n);

#define pgr_container_of(ptr, type, member)                                    \
  ((type *)((char *)(ptr)-offsetof(type, member)))

#define PGR_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))

#endif /* PGR_COMMON_H */
