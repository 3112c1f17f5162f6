/*
 * handlers.h - the kind -> handler registry.
 *
 * Thread: built on the main thread at start (built-ins, then plugins);
 * read-only afterwards, so worker threads look kinds up without locks.
 * Ownership: the registry owns its entries and the dlopen handles.
 */
#ifndef PGR_HANDLERS_H
#define PGR_HANDLERS_H

#include "common.h"
#include "config.h"
#include "pgrunner.h"

struct pgr_handler {
  char *kind;
  pgr_handler_fn fn;
  void *arg;
  int noop; /* the built-in noop: the worker takes its one-statement path */
};

struct pgr_handlers;

PGR_MUSTCHECK int pgr_handlers_create(const struct pgr_config *cfg,
                                      struct pgr_handlers **out, char *errbuf,
                                      size_t errlen);
void pgr_handlers_destroy(struct pgr_handlers *h);
const struct pgr_handler *pgr_handlers_find(const struct pgr_handlers *h,
                                            const char *kind);

#endif /* PGR_HANDLERS_H */
