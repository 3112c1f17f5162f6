/*
 * no_loop_lookup.c - an LD_PRELOAD shim for the integration tests: aborts
 * the process when the event-loop thread asks for a name lookup.
 *
 * `pgrunner work` runs its event loop on the process's main thread (see
 * pgr_mark_loop_thread in loop.c), so a getaddrinfo() there that may look a
 * name up (anything but AI_NUMERICHOST, which only parses an address)
 * blocks the loop. Worker threads and libuv's thread pool may resolve.
 * Built by tests/integration/test_multihost.py with the system compiler,
 * uninstrumented, so it works in front of sanitizer builds too.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef int (*gai_fn)(const char *, const char *, const struct addrinfo *,
                      struct addrinfo **);

int getaddrinfo(const char *node, const char *service,
                const struct addrinfo *hints, struct addrinfo **res) {
  gai_fn real = (gai_fn)dlsym(RTLD_NEXT, "getaddrinfo");
  int numeric = hints && (hints->ai_flags & AI_NUMERICHOST);
  if (node && !numeric && syscall(SYS_gettid) == getpid()) {
    fprintf(stderr, "no_loop_lookup: getaddrinfo(\"%s\") on the loop thread\n",
            node);
    abort();
  }
  return real(node, service, hints, res);
}
