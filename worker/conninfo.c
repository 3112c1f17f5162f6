/*
 * conninfo.c - connection string parsing and password redaction.
 *
 * Thread: any.
 */
#include "conninfo.h"

#include <ctype.h>
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

void pgr_conninfo_copy(struct pgr_conninfo *dst,
                       const struct pgr_conninfo *src) {
  memset(dst, 0, sizeof *dst);
  dst->keywords = pgr_calloc(1, sizeof(char *));
  dst->values = pgr_calloc(1, sizeof(char *));
  for (size_t i = 0; i < src->n; i++)
    pgr_conninfo_set(dst, src->keywords[i], src->values[i]);
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
      pgr_trim_end(safe);
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

/*
 * The secrets of one connection string, found by reading its text rather
 * than by asking libpq: when the string does not parse, libpq's error quotes
 * the offending token, which may be the password itself ("invalid
 * percent-encoded token: ..."), and libpq tells us nothing else.
 */
struct secrets {
  char **v;
  size_t n;
};

static void secrets_add(struct secrets *s, const char *p, size_t len) {
  if (len == 0)
    return;
  for (size_t i = 0; i < s->n; i++)
    if (strlen(s->v[i]) == len && memcmp(s->v[i], p, len) == 0)
      return;
  s->v = pgr_realloc(s->v, (s->n + 1) * sizeof *s->v);
  s->v[s->n++] = pgr_strndup(p, len);
}

static void secrets_free(struct secrets *s) {
  for (size_t i = 0; i < s->n; i++)
    free(s->v[i]);
  free(s->v);
  memset(s, 0, sizeof *s);
}

static int hexval(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Add `p` and its percent-decoded form. Decoding is lenient: a malformed
   "%zz" (and "%00", which libpq refuses) stays as written, so the rest of
   a malformed password is still decoded and masked. */
static void secrets_add_url(struct secrets *s, const char *p, size_t len) {
  struct pgr_buf d;
  pgr_buf_init(&d);
  for (size_t i = 0; i < len; i++) {
    int hi, lo;
    if (p[i] == '%' && i + 2 < len && (hi = hexval(p[i + 1])) >= 0 &&
        (lo = hexval(p[i + 2])) >= 0 && (hi | lo) != 0) {
      pgr_buf_addc(&d, (char)(hi << 4 | lo));
      i += 2;
    } else {
      pgr_buf_addc(&d, p[i]);
    }
  }
  secrets_add(s, p, len);
  secrets_add(s, d.data, d.len);
  pgr_buf_free(&d);
}

/*
 * The password of "scheme://user:password@host...": from the first ':' to
 * the last '@' before the query. libpq ends the password at the first '@',
 * and if a raw '/' comes first it finds no password at all and reads
 * "user:pa" as host and port; either way it may quote a piece of what the
 * user meant as the password in a host, port or database name. So the
 * pieces between '@', '/' and ',' are secrets too.
 */
static void url_secrets(const char *auth, struct secrets *s) {
  size_t alen = strcspn(auth, "?");
  const char *at = NULL;

  for (const char *p = auth; p < auth + alen; p++)
    if (*p == '@')
      at = p;
  if (at != NULL) {
    const char *colon = memchr(auth, ':', (size_t)(at - auth));
    if (colon != NULL) {
      const char *pw = colon + 1;
      size_t len = (size_t)(at - pw);
      secrets_add_url(s, pw, len);
      if (memchr(pw, '@', len) || memchr(pw, '/', len) ||
          memchr(pw, ',', len)) {
        const char *q = pw;
        while (q < at) {
          size_t n = strcspn(q, "@/,");
          if (n > (size_t)(at - q))
            n = (size_t)(at - q);
          secrets_add_url(s, q, n);
          q += n + 1;
        }
      }
    }
  }
  if (auth[alen] != '?')
    return;
  /* "?password=..." (the keyword may be percent-encoded, as libpq decodes
     keywords too); the value runs to the next '&'. */
  for (const char *q = auth + alen + 1; *q;) {
    size_t n = strcspn(q, "&");
    const char *eq = memchr(q, '=', n);
    if (eq != NULL) {
      struct secrets key = {0};
      secrets_add_url(&key, q, (size_t)(eq - q));
      for (size_t i = 0; i < key.n; i++)
        if (strcmp(key.v[i], "password") == 0)
          secrets_add_url(s, eq + 1, (size_t)(q + n - eq - 1));
      secrets_free(&key);
    }
    q += n;
    if (*q == '&')
      q++;
  }
}

/* "scheme://" at the start of s? Return what follows it. libpq itself takes
   only postgresql:// and postgres://, but any other scheme fails as a
   keyword=value string with an error quoting the whole URL. */
static const char *url_authority(const char *s) {
  const char *p = s;
  if (!isalpha((unsigned char)*p))
    return NULL;
  while (isalnum((unsigned char)*p) || *p == '+' || *p == '-' || *p == '.')
    p++;
  return strncmp(p, "://", 3) == 0 ? p + 3 : NULL;
}

static void conninfo_secrets(const char *conninfo, struct secrets *s,
                             int depth);

/*
 * The values of password= in "key = value ..." (libpq's rules: a value is
 * single-quoted or runs to the next space, and a backslash escapes the next
 * character), both as written and unescaped. The scan goes on past
 * malformed parts, because they are what makes libpq fail. A dbname that is
 * itself a connection string (libpq expands it) is read the same way.
 */
static void keyword_secrets(const char *conninfo, struct secrets *s,
                            int depth) {
  const char *p = conninfo;
  struct pgr_buf val;

  pgr_buf_init(&val);
  while (*p) {
    while (isspace((unsigned char)*p))
      p++;
    const char *key = p;
    while (*p && !isspace((unsigned char)*p) && *p != '=')
      p++;
    size_t klen = (size_t)(p - key);
    while (isspace((unsigned char)*p))
      p++;
    if (*p != '=')
      continue;
    p++;
    while (isspace((unsigned char)*p))
      p++;
    const char *raw = p;
    int quoted = *p == '\'';
    if (quoted)
      raw = ++p;
    pgr_buf_reset(&val);
    while (*p && (quoted ? *p != '\'' : !isspace((unsigned char)*p))) {
      if (*p == '\\' && p[1])
        p++;
      pgr_buf_addc(&val, *p++);
    }
    size_t rawlen = (size_t)(p - raw);
    if (quoted && *p == '\'')
      p++;
    if (klen == 8 && memcmp(key, "password", 8) == 0) {
      secrets_add(s, raw, rawlen);
      secrets_add(s, val.data, val.len);
    } else if (klen == 6 && memcmp(key, "dbname", 6) == 0 && depth == 0) {
      conninfo_secrets(val.data, s, depth + 1);
    }
  }
  pgr_buf_free(&val);
}

static void conninfo_secrets(const char *conninfo, struct secrets *s,
                             int depth) {
  const char *auth = url_authority(conninfo);
  if (auth != NULL)
    url_secrets(auth, s);
  /* Also when it looks like a URL: libpq reads any scheme but postgres://
     and postgresql:// as keyword=value text, where a later password= is
     a password. Reading too much only masks more. */
  keyword_secrets(conninfo, s, depth);
}

/* Longest first, so that a password is masked whole before its pieces. */
static int by_length_desc(const void *a, const void *b) {
  size_t la = strlen(*(char *const *)a), lb = strlen(*(char *const *)b);
  return la < lb ? 1 : la > lb ? -1 : 0;
}

char *pgr_redact(const char *conninfo, const char *msg) {
  struct secrets s = {0};
  struct pgr_buf b;

  pgr_buf_init(&b);
  pgr_buf_adds(&b, msg ? msg : "");
  if (conninfo && *conninfo) {
    PQconninfoOption *opts = PQconninfoParse(conninfo, NULL);
    if (opts) {
      for (PQconninfoOption *o = opts; o->keyword; o++)
        if (strcmp(o->keyword, "password") == 0 && o->val)
          secrets_add(&s, o->val, strlen(o->val));
      PQconninfoFree(opts);
    }
    conninfo_secrets(conninfo, &s, 0);
  }
  {
    const char *env = getenv("PGPASSWORD");
    if (env)
      secrets_add(&s, env, strlen(env));
  }
  if (s.n > 1)
    qsort(s.v, s.n, sizeof *s.v, by_length_desc);
  for (size_t i = 0; i < s.n; i++)
    mask_all(&b, s.v[i]);
  secrets_free(&s);
  mask_keyword(&b);
  mask_url(&b);
  return b.data;
}
