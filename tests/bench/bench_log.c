/*
 * bench_log.c - what a log call costs the calling thread, and how fast the
 * writer gets records into DIR/pgrunner.log.
 *
 * Usage: bench_log [N]   (N records per run, default 1000000)
 *
 * Thread: main, plus one or two producer threads per run; the logger adds
 * its writer thread. Each run starts the logger as a worker would (a fresh
 * log dir, the socket served, stderr quiet), logs N "task succeeded" records
 * with the five fields a worker uses, and stops it; stop returns once every
 * record is in the file, so N / (first call .. stop returned) is the
 * written rate. A "burst" run logs fewer records than the queue holds,
 * which shows the caller's own cost; the "sustained" runs log more, and are
 * paced by the writer (callers wait for room when the queue is full).
 */
#include <ftw.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "log.h"

struct producer {
  int64_t first, count;
  uint64_t ns;     /* wall clock */
  uint64_t cpu_ns; /* this thread's CPU time: immune to other processes */
};

static uint64_t thread_cpu_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void produce(void *arg) {
  struct producer *p = arg;
  uint64_t t0 = uv_hrtime(), c0 = thread_cpu_ns();
  for (int64_t i = p->first; i < p->first + p->count; i++)
    pgr_info("task succeeded", PGR_LI("task", i), PGR_LS("kind", "email"),
             PGR_LS("queue", "default"), PGR_LI("attempt", 1),
             PGR_LI("duration_ms", 12));
  p->ns = uv_hrtime() - t0;
  p->cpu_ns = thread_cpu_ns() - c0;
}

static int rm_entry(const char *p, const struct stat *st, int type,
                    struct FTW *ftw) {
  (void)st;
  (void)type;
  (void)ftw;
  return remove(p);
}

static int64_t count_lines(const char *path) {
  FILE *f = fopen(path, "rb");
  if (f == NULL)
    return -1;
  char buf[65536];
  size_t n;
  int64_t lines = 0;
  while ((n = fread(buf, 1, sizeof(buf), f)) > 0)
    for (size_t i = 0; i < n; i++)
      lines += buf[i] == '\n';
  fclose(f);
  return lines;
}

/* run logs n records from `threads` threads; returns 0 if all were written. */
static int run(const char *label, int64_t n, int threads,
               enum pgr_log_format format) {
  char dir[] = "/tmp/pgr-bench-log-XXXXXX";
  if (mkdtemp(dir) == NULL) {
    perror("mkdtemp");
    return 1;
  }
  struct pgr_log_options o = {.proc = "worker",
                              .level = PGR_LEVEL_INFO,
                              .format = format,
                              .dir = dir,
                              .serve = 1,
                              .quiet_stderr = 1};
  if (pgr_log_start(&o) != 0)
    return 1;
  uv_thread_t th[2];
  struct producer p[2];
  uint64_t t0 = uv_hrtime();
  for (int i = 0; i < threads; i++) {
    p[i] = (struct producer){.first = i * (n / threads), .count = n / threads};
    if (uv_thread_create(&th[i], produce, &p[i]) != 0)
      return 1;
  }
  for (int i = 0; i < threads; i++)
    uv_thread_join(&th[i]);
  pgr_log_stop();
  uint64_t total = uv_hrtime() - t0;

  char *log = pgr_asprintf("%s/pgrunner.log", dir);
  int64_t want = n / threads * threads, got = count_lines(log);
  double call_ns = 0, cpu_ns = 0;
  for (int i = 0; i < threads; i++) {
    call_ns += (double)p[i].ns / (double)p[i].count;
    cpu_ns += (double)p[i].cpu_ns / (double)p[i].count;
  }
  printf("%-34s %6.0f ns/call (%4.0f ns CPU) %9.0f records/s written\n", label,
         call_ns / threads, cpu_ns / threads,
         (double)want * 1e9 / (double)total);
  free(log);
  nftw(dir, rm_entry, 8, FTW_DEPTH | FTW_PHYS);
  if (got != want || pgr_log_dropped() != 0) {
    fprintf(stderr, "bench_log: %" PRId64 " of %" PRId64 " lines written\n",
            got, want);
    return 1;
  }
  return 0;
}

int main(int argc, char **argv) {
  int64_t n = argc > 1 ? strtoll(argv[1], NULL, 10) : 1000000;
  if (n < 2) {
    fprintf(stderr, "usage: bench_log [N]\n");
    return 2;
  }
  /* Below the queue's 65536 records: no waiting for room. */
  int64_t burst = n < 50000 ? n : 50000;
  char label[64];
  int rc = 0;
  printf("bench_log: records of 5 fields, 1 file, stderr quiet; ns/call is "
         "wall time per call\non the calling thread (CPU: that thread's CPU "
         "time), records/s from the first\ncall until pgr_log_stop() "
         "returned with every record in the file\n");
  snprintf(label, sizeof(label), "burst %" PRId64 ", 1 thread, text", burst);
  rc |= run(label, burst, 1, PGR_LOG_TEXT);
  snprintf(label, sizeof(label), "burst %" PRId64 ", 2 threads, text", burst);
  rc |= run(label, burst, 2, PGR_LOG_TEXT);
  snprintf(label, sizeof(label), "sustained %" PRId64 ", 1 thread, text", n);
  rc |= run(label, n, 1, PGR_LOG_TEXT);
  snprintf(label, sizeof(label), "sustained %" PRId64 ", 2 threads, text", n);
  rc |= run(label, n, 2, PGR_LOG_TEXT);
  snprintf(label, sizeof(label), "sustained %" PRId64 ", 1 thread, json", n);
  rc |= run(label, n, 1, PGR_LOG_JSON);
  return rc;
}
