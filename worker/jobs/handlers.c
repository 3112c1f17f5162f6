/*
 * handlers.c - the kind -> handler registry: the built-in `noop`,
 * `email` and `http`, then whatever --plugin shared objects register.
 *
 * Thread: filled on the main thread before the pool starts; read-only after.
 * Kinds with no entry here that match [a-z_][a-z0-9_]* run as SQL functions
 * (jobs/attempt.c); anything else fails with `no handler for kind "K"`.
 */
#include "handlers.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs/email.h"
#include "jobs/http.h"

struct pgr_handlers {
  struct pgr_handler *items;
  size_t n;
  void **dl;
  size_t ndl;
};

static enum pgr_outcome noop_handler(struct pgr_job *job, void *arg) {
  (void)job;
  (void)arg;
  return PGR_SUCCESS;
}

static int add(struct pgr_handlers *h, const char *kind, pgr_handler_fn fn,
               void *arg) {
  /* Plugin kinds follow the SQL kinds' rule, so every kind a task can name
     looks the same in logs, metrics labels and psql. */
  if (kind == NULL || fn == NULL || !pgr_valid_kind(kind))
    return PGR_EINVAL;
  for (size_t i = 0; i < h->n; i++)
    if (strcmp(h->items[i].kind, kind) == 0)
      return PGR_EINVAL;
  h->items = pgr_realloc(h->items, (h->n + 1) * sizeof *h->items);
  h->items[h->n] = (struct pgr_handler){pgr_strdup(kind), fn, arg, 0};
  h->n++;
  return 0;
}

static int registry_add(struct pgr_registry *reg, const char *kind,
                        pgr_handler_fn fn, void *arg) {
  return add(reg->priv, kind, fn, arg);
}

int pgr_handlers_create(const struct pgr_config *cfg, struct pgr_handlers **out,
                        char *errbuf, size_t errlen) {
  struct pgr_handlers *h = pgr_calloc(1, sizeof *h);
  int rc = 0;

  PGR_ASSERT(add(h, "noop", noop_handler, NULL) == 0);
  h->items[h->n - 1].noop = 1;
  PGR_ASSERT(add(h, "email", pgr_email_handler, (void *)&cfg->smtp) == 0);
  PGR_ASSERT(add(h, "http", pgr_http_handler, (void *)&cfg->http_allow) == 0);

  for (size_t i = 0; i < cfg->nplugins; i++) {
    const char *path = cfg->plugins[i];
    void *dl = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (dl == NULL) {
      snprintf(errbuf, errlen, "--plugin %s: %s", path, dlerror());
      rc = PGR_EUSAGE;
      goto out;
    }
    h->dl = pgr_realloc(h->dl, (h->ndl + 1) * sizeof *h->dl);
    h->dl[h->ndl++] = dl;
    pgr_plugin_init_fn init;
    *(void **)&init = dlsym(dl, PGR_PLUGIN_INIT_SYMBOL);
    if (init == NULL) {
      snprintf(errbuf, errlen, "--plugin %s: no %s() in it", path,
               PGR_PLUGIN_INIT_SYMBOL);
      rc = PGR_EUSAGE;
      goto out;
    }
    struct pgr_registry reg = {PGR_API_VERSION, registry_add, h};
    if (init(&reg) != 0) {
      snprintf(errbuf, errlen, "--plugin %s: %s() failed", path,
               PGR_PLUGIN_INIT_SYMBOL);
      rc = PGR_EUSAGE;
      goto out;
    }
  }
  *out = h;
  h = NULL;
out:
  if (h)
    pgr_handlers_destroy(h);
  return rc;
}

void pgr_handlers_destroy(struct pgr_handlers *h) {
  if (h == NULL)
    return;
  for (size_t i = 0; i < h->n; i++)
    free(h->items[i].kind);
  free(h->items);
  for (size_t i = 0; i < h->ndl; i++)
    dlclose(h->dl[i]);
  free(h->dl);
  free(h);
}

const struct pgr_handler *pgr_handlers_find(const struct pgr_handlers *h,
                                            const char *kind) {
  for (size_t i = 0; i < h->n; i++)
    if (strcmp(h->items[i].kind, kind) == 0)
      return &h->items[i];
  return NULL;
}
