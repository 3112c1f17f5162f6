/*
 * conninfo.c - connection string parsing and password redaction.
 *
 * Thread: any.
 */
#include "conninfo.h"

#include <stdlib.h>
#include <string.h>

#include <libpq-fe.h>

static void add_owned(struct pgr_conninfo *ci, char *s) {
  ci->owned = pgr_realloc(ci->owned, (ci->nowned + 1) * sizeof *ci->owned);
  ci->owned[ci->nowned++] = s;
}

void pgr_conninfo_set(struct pgr_conninfo *ci, const char *kw,
                      const char *value) {
  char *v = value ? pgr_strdup(value) : NULL;
  if (v)
    add_owned(ci, v);
  for (size_t i = 0; i < ci->n; i++) {
    if (strcmp(ci->keywords[i], kw) == 0) {
      ci->values[i] = v;
      return;
    }
  }
  char *k = pgr_strdup(kw);
  add_owned(ci, k);
  ci->keywords = pgr_realloc(ci->keywords, (ci->n + 2) * sizeof(char *));
  ci->values = pgr_realloc(ci->values, (ci->n + 2) * sizeof(char *));
  ci->keywords[ci->n] = k;
  ci->values[ci->n] = v;
  ci->n++;
  ci->keywords[ci->n] = NULL;
  ci->values[ci->n] = NULL;
}

const char *pgr_conninfo_get(const struct pgr_conninfo *ci, const char *kw) {
  for (size_t i = 0; i < ci->n; i++)
    if (strcmp(ci->keywords[i], kw) == 0)
      return ci->values[i];
  return NULL;
}

int pgr_conninfo_parse(const char *conninfo, const char *appname,
                       struct pgr_conninfo *out, char *errbuf, size_t errlen) {
  PQconninfoOption *opts = NULL;
  char *err = NULL;
  int rc = 0;

  memset(out, 0, sizeof *out);
  out->keywords = pgr_calloc(1, sizeof(char *));
  out->values = pgr_calloc(1, sizeof(char *));
  if (conninfo && *conninfo) {
    opts = PQconninfoParse(conninfo, &err);
    if (opts == NULL) {
      char *safe = pgr_redact(conninfo, err ? err : "out of memory");
      size_t l = strlen(safe);
      while (l > 0 && (safe[l - 1] == '\n' || safe[l - 1] == ' '))
        safe[--l] = '\0';
      snprintf(errbuf, errlen, "invalid connection string: %s", safe);
      free(safe);
      PQfreemem(err);
      rc = PGR_EUSAGE;
      goto out;
    }
    for (PQconninfoOption *o = opts; o->keyword; o++)
      if (o->val && *o->val)
        pgr_conninfo_set(out, o->keyword, o->val);
  }
  if (appname)
    pgr_conninfo_set(out, "application_name", appname);
  /* GSSAPI encryption is tried first by default, which initialises
     Kerberos in every process (about 1 MiB resident) to find, almost
     always, no credentials. Off unless asked for in the string or with
     PGGSSENCMODE. */
  if (pgr_conninfo_get(out, "gssencmode") == NULL && !getenv("PGGSSENCMODE"))
    pgr_conninfo_set(out, "gssencmode", "disable");
out:
  if (opts)
    PQconninfoFree(opts);
  if (rc != 0)
    pgr_conninfo_free(out);
  return rc;
}

void pgr_conninfo_free(struct pgr_conninfo *ci) {
  for (size_t i = 0; i < ci->nowned; i++)
    free(ci->owned[i]);
  free(ci->owned);
  free(ci->keywords);
  free(ci->values);
  memset(ci, 0, sizeof *ci);
}

/* Replace every occurrence of `secret` in b by "***". */
static void mask_all(struct pgr_buf *b, const char *secret) {
  size_t sl;
  if (secret == NULL || (sl = strlen(secret)) == 0)
    return;
  struct pgr_buf o;
  pgr_buf_init(&o);
  const char *p = b->data;
  const char *hit;
  while ((hit = strstr(p, secret)) != NULL) {
    pgr_buf_add(&o, p, (size_t)(hit - p));
    pgr_buf_adds(&o, "***");
    p = hit + sl;
  }
  pgr_buf_adds(&o, p);
  pgr_buf_free(b);
  *b = o;
}

/* Mask "password=VALUE" (VALUE up to a space or quote-delimited). */
static void mask_keyword(struct pgr_buf *b) {
  struct pgr_buf o;
  const char *p = b->data;
  const char *hit;
  pgr_buf_init(&o);
  while ((hit = strstr(p, "password")) != NULL) {
    const char *q = hit + 8;
    pgr_buf_add(&o, p, (size_t)(q - p));
    p = q;
    while (*q == ' ')
      q++;
    if (*q != '=')
      continue;
    q++;
    while (*q == ' ')
      q++;
    pgr_buf_add(&o, p, (size_t)(q - p));
    if (*q == '\'') {
      q++;
      while (*q && *q != '\'') {
        if (*q == '\\' && q[1])
          q++;
        q++;
      }
      if (*q == '\'')
        q++;
    } else {
      while (*q && *q != ' ' && *q != '&' && *q != '"' && *q != '\n')
        q++;
    }
    pgr_buf_adds(&o, "***");
    p = q;
  }
  pgr_buf_adds(&o, p);
  pgr_buf_free(b);
  *b = o;
}

/* Mask the secret of "scheme://user:secret@host". */
static void mask_url(struct pgr_buf *b) {
  struct pgr_buf o;
  const char *p = b->data;
  const char *hit;
  pgr_buf_init(&o);
  while ((hit = strstr(p, "://")) != NULL) {
    const char *q = hit + 3;
    const char *end = q;
    while (*end && *end != '@' && *end != '/' && *end != ' ' && *end != '"')
      end++;
    const char *colon = memchr(q, ':', (size_t)(end - q));
    if (*end == '@' && colon) {
      pgr_buf_add(&o, p, (size_t)(colon + 1 - p));
      pgr_buf_adds(&o, "***");
      p = end;
    } else {
      pgr_buf_add(&o, p, (size_t)(q - p));
      p = q;
    }
  }
  pgr_buf_adds(&o, p);
  pgr_buf_free(b);
  *b = o;
}

char *pgr_redact(const char *conninfo, const char *msg) {
  struct pgr_buf b;
  pgr_buf_init(&b);
  pgr_buf_adds(&b, msg ? msg : "");
  if (conninfo && *conninfo) {
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    if (opts) {
      for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "password") == 0 && o->val)
          mask_all(&b, o->val);
      PQconninfoFree(opts);
    }
  }
  mask_all(&b, getenv("PGPASSWORD"));
  mask_keyword(&b);
  mask_url(&b);
  return b.data;
}
