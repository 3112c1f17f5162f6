/*
 * common.c - allocation, error strings, clocks and the loop-thread guard.
 *
 * Thread: any.
 */
#include "common.h"

#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>

static _Thread_local int on_loop_thread;

void pgr_fatal(const char *file, int line, const char *fmt, ...) {
  va_list ap;
  fprintf(stderr, "pgrunner: fatal: %s:%d: ", file, line);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  fflush(stderr);
  abort();
}

static void oom(size_t n) {
  pgr_fatal(__FILE__, __LINE__, "out of memory allocating %zu bytes", n);
}

void *pgr_malloc(size_t n) {
  void *p = malloc(n ? n : 1);
  if (p == NULL)
    oom(n);
  return p;
}

void *pgr_calloc(size_t n, size_t size) {
  void *p = calloc(n ? n : 1, size ? size : 1);
  if (p == NULL)
    oom(n * size);
  return p;
}

void *pgr_realloc(void *p, size_t n) {
  void *q = realloc(p, n ? n : 1);
  if (q == NULL)
    oom(n);
  return q;
}

void pgr_stop_signals_mask(int how) {
  sigset_t stops;
  sigemptyset(&stops);
  sigaddset(&stops, SIGTERM);
  sigaddset(&stops, SIGINT);
  sigaddset(&stops, SIGHUP);
  pthread_sigmask(how, &stops, NULL);
}

void pgr_trim_end(char *s) {
  size_t l = strlen(s);
  while (l > 0 && (s[l - 1] == '\n' || s[l - 1] == ' ' || s[l - 1] == '\r'))
    s[--l] = '\0';
}

char *pgr_strdup(const char *s) {
  return pgr_strndup(s, strlen(s));
}

char *pgr_strndup(const char *s, size_t n) {
  char *p = pgr_malloc(n + 1);
  memcpy(p, s, n);
  p[n] = '\0';
  return p;
}

char *pgr_asprintf(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  PGR_ASSERT(n >= 0);
  char *p = pgr_malloc((size_t)n + 1);
  va_start(ap, fmt);
  vsnprintf(p, (size_t)n + 1, fmt, ap);
  va_end(ap);
  return p;
}

void pgr_mark_loop_thread(void) {
  on_loop_thread = 1;
}

void pgr_unmark_loop_thread(void) {
  on_loop_thread = 0;
}

int pgr_on_loop_thread(void) {
  return on_loop_thread;
}

uint64_t pgr_now_us(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

uint64_t pgr_now_ms(void) {
  return pgr_now_us() / 1000u;
}

int64_t pgr_wall_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void pgr_buf_init(struct pgr_buf *b) {
  b->cap = 64;
  b->len = 0;
  b->data = pgr_malloc(b->cap);
  b->data[0] = '\0';
}

void pgr_buf_free(struct pgr_buf *b) {
  free(b->data);
  b->data = NULL;
  b->len = b->cap = 0;
}

void pgr_buf_reset(struct pgr_buf *b) {
  b->len = 0;
  b->data[0] = '\0';
}

static void buf_reserve(struct pgr_buf *b, size_t extra) {
  if (b->len + extra + 1 <= b->cap)
    return;
  size_t cap = b->cap ? b->cap : 64;
  while (cap < b->len + extra + 1)
    cap *= 2;
  b->data = pgr_realloc(b->data, cap);
  b->cap = cap;
}

void pgr_buf_add(struct pgr_buf *b, const char *s, size_t n) {
  buf_reserve(b, n);
  memcpy(b->data + b->len, s, n);
  b->len += n;
  b->data[b->len] = '\0';
}

void pgr_buf_adds(struct pgr_buf *b, const char *s) {
  pgr_buf_add(b, s, strlen(s));
}

void pgr_buf_addc(struct pgr_buf *b, char c) {
  buf_reserve(b, 1);
  b->data[b->len++] = c;
  b->data[b->len] = '\0';
}

void pgr_buf_printf(struct pgr_buf *b, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(NULL, 0, fmt, ap);
  va_end(ap);
  PGR_ASSERT(n >= 0);
  buf_reserve(b, (size_t)n);
  va_start(ap, fmt);
  vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap);
  va_end(ap);
  b->len += (size_t)n;
}

void pgr_buf_add_array(struct pgr_buf *b, const char *const *items, size_t n) {
  pgr_buf_addc(b, '{');
  for (size_t i = 0; i < n; i++) {
    if (i > 0)
      pgr_buf_addc(b, ',');
    pgr_buf_add_array_elem(b, items[i]);
  }
  pgr_buf_addc(b, '}');
}

void pgr_buf_add_array_elem(struct pgr_buf *b, const char *s) {
  pgr_buf_addc(b, '"');
  for (; *s; s++) {
    if (*s == '"' || *s == '\\')
      pgr_buf_addc(b, '\\');
    pgr_buf_addc(b, *s);
  }
  pgr_buf_addc(b, '"');
}

/*
 * The length of the well-formed UTF-8 sequence at p, of the n bytes there
 * (1 to 4), or 0 when p starts an ill-formed one (RFC 3629: no overlongs,
 * no surrogates, nothing above U+10FFFF). n is at least 1.
 */
size_t pgr_utf8_len(const unsigned char *p, size_t n) {
  unsigned c = p[0];
  if (c < 0x80)
    return 1;
  if (c < 0xC2 || c > 0xF4)
    return 0;
  size_t len = c < 0xE0 ? 2 : c < 0xF0 ? 3 : 4;
  if (n < len)
    return 0;
  for (size_t i = 1; i < len; i++)
    if ((p[i] & 0xC0) != 0x80)
      return 0;
  if ((c == 0xE0 && p[1] < 0xA0) || (c == 0xED && p[1] > 0x9F) ||
      (c == 0xF0 && p[1] < 0x90) || (c == 0xF4 && p[1] > 0x8F))
    return 0;
  return len;
}

const char *pgr_json_kind(const json_t *v) {
  switch (json_typeof(v)) {
  case JSON_OBJECT:
    return "an object";
  case JSON_ARRAY:
    return "an array";
  case JSON_STRING:
    return "a string";
  case JSON_INTEGER:
  case JSON_REAL:
    return "a number";
  case JSON_TRUE:
  case JSON_FALSE:
    return "a boolean";
  case JSON_NULL:
    return "null";
  }
  return "something else";
}
