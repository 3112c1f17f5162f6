/*
 * logfmt.c - one log record turned into one line: logfmt text, JSON, and the
 * wire form of the log socket (and back, for records read from the socket).
 *
 * Thread: any; no shared state. The hot path (pgr_logfmt_record) avoids
 * stdio and locale-dependent calls: it runs on every logging thread, and
 * glibc's gmtime_r() takes a process-wide lock.
 * Ownership: output is appended to a caller-owned struct pgr_buf.
 */
#include "logfmt.h"

#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

/* Wire limits, beyond the line length: generous for code-defined records,
 * small enough that a hostile client cannot make the writer allocate much. */
#define WIRE_MAX_FIELDS 256
#define WIRE_MAX_KEY 128
#define WIRE_MAX_PROC 64
/* 9999-12-31T23:59:59.999Z */
#define WIRE_MAX_TS INT64_C(253402300799999)

/*
 * put and put1 append like pgr_buf_add/pgr_buf_addc, copying in place when
 * the buffer has room: this file appends a few bytes at a time, on the
 * logging thread's hot path.
 */
static inline void put(struct pgr_buf *out, const char *s, size_t n) {
  if (out->len + n < out->cap) {
    memcpy(out->data + out->len, s, n);
    out->len += n;
    out->data[out->len] = '\0';
  } else {
    pgr_buf_add(out, s, n);
  }
}

static inline void put1(struct pgr_buf *out, char c) {
  if (out->len + 1 < out->cap) {
    out->data[out->len++] = c;
    out->data[out->len] = '\0';
  } else {
    pgr_buf_addc(out, c);
  }
}

static const char *const level_names[] = {"debug", "info", "warn", "error"};

const char *pgr_log_level_name(enum pgr_level level) {
  if ((int)level < PGR_LEVEL_DEBUG)
    level = PGR_LEVEL_DEBUG;
  if ((int)level > PGR_LEVEL_ERROR)
    level = PGR_LEVEL_ERROR;
  return level_names[level];
}

int pgr_log_level_parse(const char *s, enum pgr_level *out) {
  for (size_t i = 0; i < PGR_ARRAY_LEN(level_names); i++) {
    if (s != NULL && strcmp(s, level_names[i]) == 0) {
      *out = (enum pgr_level)i;
      return 0;
    }
  }
  return PGR_EINVAL;
}

static void put2(char *p, unsigned v) {
  p[0] = (char)('0' + v / 10);
  p[1] = (char)('0' + v % 10);
}

/*
 * pgr_logfmt_ts converts with Howard Hinnant's days-to-civil algorithm
 * ("chrono-Compatible Low-Level Date Algorithms"), pure arithmetic, so no
 * call into libc's time zone machinery and its lock.
 */
void pgr_logfmt_ts(char out[PGR_LOGFMT_TS_SIZE], int64_t ms) {
  if (ms < 0)
    ms = 0;
  if (ms > WIRE_MAX_TS)
    ms = WIRE_MAX_TS;
  int64_t days = ms / 86400000;
  int64_t rem = ms % 86400000;
  int64_t z = days + 719468;
  int64_t era = z / 146097;
  int64_t doe = z - era * 146097;
  int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  int64_t mp = (5 * doy + 2) / 153;
  unsigned d = (unsigned)(doy - (153 * mp + 2) / 5 + 1);
  unsigned m = (unsigned)(mp < 10 ? mp + 3 : mp - 9);
  unsigned y = (unsigned)(yoe + era * 400 + (m <= 2));
  unsigned msec = (unsigned)(rem % 1000);
  unsigned sec = (unsigned)(rem / 1000);

  put2(out, y / 100);
  put2(out + 2, y % 100);
  out[4] = '-';
  put2(out + 5, m);
  out[7] = '-';
  put2(out + 8, d);
  out[10] = 'T';
  put2(out + 11, sec / 3600);
  out[13] = ':';
  put2(out + 14, sec / 60 % 60);
  out[16] = ':';
  put2(out + 17, sec % 60);
  out[19] = '.';
  out[20] = (char)('0' + msec / 100);
  put2(out + 21, msec % 100);
  out[23] = 'Z';
  out[24] = '\0';
}

/* Whether the ASCII byte c must be escaped inside a quoted value. */
static int must_escape(unsigned char c) {
  return c < 0x20 || c == '"' || c == '\\' || c == 0x7f;
}

/*
 * add_text appends s with control characters, quotes and backslashes escaped
 * JSON-style and ill-formed UTF-8 replaced by U+FFFD. Runs of plain bytes are
 * copied in one go.
 */
static void add_text(struct pgr_buf *out, const char *s, size_t n) {
  static const char hex[] = "0123456789abcdef";
  const unsigned char *p = (const unsigned char *)s;
  size_t run = 0, i = 0;
  while (i < n) {
    unsigned char c = p[i];
    size_t len = 1;
    if (c < 0x80) {
      if (!must_escape(c)) {
        i++;
        continue;
      }
    } else {
      len = pgr_utf8_len(p + i, n - i);
      if (len != 0) {
        i += len;
        continue;
      }
    }
    put(out, s + run, i - run);
    if (c >= 0x80) {
      put(out, "\xEF\xBF\xBD", 3);
    } else if (c == '"' || c == '\\') {
      char e[2] = {'\\', (char)c};
      put(out, e, 2);
    } else if (c == '\n') {
      put(out, "\\n", 2);
    } else if (c == '\r') {
      put(out, "\\r", 2);
    } else if (c == '\t') {
      put(out, "\\t", 2);
    } else {
      char e[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
      put(out, e, 6);
    }
    i++;
    run = i;
  }
  put(out, s + run, n - run);
}

void pgr_logfmt_json_string(struct pgr_buf *out, const char *s, size_t n) {
  put1(out, '"');
  if (s != NULL)
    add_text(out, s, n);
  put1(out, '"');
}

void pgr_logfmt_value(struct pgr_buf *out, const char *s, size_t n) {
  if (s == NULL)
    return;
  int quote = n == 0;
  for (size_t i = 0; i < n && !quote; i++) {
    unsigned char c = (unsigned char)s[i];
    quote = c <= ' ' || c == '"' || c == '=' || c == '\\' || c == 0x7f;
  }
  if (quote)
    pgr_logfmt_json_string(out, s, n);
  else
    add_text(out, s, n); /* only replaces ill-formed UTF-8 */
}

static void add_int(struct pgr_buf *out, int64_t v) {
  char tmp[24];
  char *p = tmp + sizeof(tmp);
  uint64_t u = v < 0 ? 0 - (uint64_t)v : (uint64_t)v;
  do {
    *--p = (char)('0' + u % 10);
    u /= 10;
  } while (u != 0);
  if (v < 0)
    *--p = '-';
  put(out, p, (size_t)(tmp + sizeof(tmp) - p));
}

/*
 * format_double writes the shortest of %.15g and %.17g that reads back as
 * the same double, or NaN/+Inf/-Inf. Returns whether d was finite.
 */
static int format_double(char buf[32], double d) {
  if (isnan(d)) {
    strcpy(buf, "NaN");
    return 0;
  }
  if (isinf(d)) {
    strcpy(buf, d > 0 ? "+Inf" : "-Inf");
    return 0;
  }
  /* "-0" would read back from the wire as the integer 0: one zero. */
  if (d == 0) {
    strcpy(buf, "0");
    return 1;
  }
  snprintf(buf, 32, "%.15g", d);
  if (strtod(buf, NULL) != d)
    snprintf(buf, 32, "%.17g", d);
  return 1;
}

static int reserved_key(const char *k) {
  switch (k[0]) { /* most keys are over at the first letter */
  case 't':
    return strcmp(k, "ts") == 0;
  case 'l':
    return strcmp(k, "level") == 0;
  case 'p':
    return strcmp(k, "proc") == 0 || strcmp(k, "pid") == 0;
  case 'm':
    return strcmp(k, "msg") == 0;
  }
  return 0;
}

static int key_char(unsigned char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
         (c >= '0' && c <= '9') || c == '_' || c == '.' || c == '-';
}

/*
 * reduce_key appends k with every byte that is not a key character made
 * '_' (a missing or empty key is "_"), so it never needs quoting. The wire
 * carries keys reduced, byte for byte as a local record writes them: as
 * JSON text an ill-formed byte would become U+FFFD, three bytes.
 */
static void reduce_key(struct pgr_buf *out, const char *k) {
  if (k == NULL || k[0] == '\0') {
    put1(out, '_');
    return;
  }
  size_t n = strlen(k), i = 0;
  while (i < n && key_char((unsigned char)k[i]))
    i++;
  put(out, k, i);
  for (; i < n; i++)
    put1(out, key_char((unsigned char)k[i]) ? k[i] : '_');
}

/* add_key appends k reduced, '_'-prefixed when it is one of the fixed keys. */
static void add_key(struct pgr_buf *out, const char *k) {
  if (k != NULL && reserved_key(k))
    put1(out, '_');
  reduce_key(out, k);
}

static void add_str(struct pgr_buf *out, const char *s) {
  put(out, s, strlen(s));
}

static void text_field(struct pgr_buf *out, const struct pgr_log_field *f) {
  char num[32];
  put1(out, ' ');
  add_key(out, f->key);
  put1(out, '=');
  switch (f->type) {
  case PGR_LF_STR:
    if (f->v.s != NULL)
      pgr_logfmt_value(out, f->v.s, strlen(f->v.s));
    break;
  case PGR_LF_INT:
    add_int(out, f->v.i);
    break;
  case PGR_LF_DBL:
    format_double(num, f->v.d);
    add_str(out, num);
    break;
  }
}

/* json_value appends a field's value as JSON (NULL string: null). */
static void json_value(struct pgr_buf *out, const struct pgr_log_field *f) {
  char num[32];
  switch (f->type) {
  case PGR_LF_STR:
    if (f->v.s == NULL)
      add_str(out, "null");
    else
      pgr_logfmt_json_string(out, f->v.s, strlen(f->v.s));
    break;
  case PGR_LF_INT:
    add_int(out, f->v.i);
    break;
  case PGR_LF_DBL:
    if (format_double(num, f->v.d)) {
      add_str(out, num);
    } else {
      pgr_logfmt_json_string(out, num, strlen(num));
    }
    break;
  }
}

void pgr_logfmt_record(struct pgr_buf *out, enum pgr_log_format format,
                       const struct pgr_logfmt_rec *r) {
  char ts[PGR_LOGFMT_TS_SIZE];
  const char *proc = r->proc != NULL ? r->proc : "";
  const char *msg = r->msg != NULL ? r->msg : "";
  pgr_logfmt_ts(ts, r->ts_ms);

  if (format == PGR_LOG_JSON) {
    add_str(out, "{\"ts\":\"");
    put(out, ts, PGR_LOGFMT_TS_SIZE - 1);
    add_str(out, "\",\"level\":\"");
    add_str(out, pgr_log_level_name(r->level));
    add_str(out, "\",\"proc\":");
    pgr_logfmt_json_string(out, proc, strlen(proc));
    add_str(out, ",\"pid\":");
    add_int(out, r->pid);
    add_str(out, ",\"msg\":");
    pgr_logfmt_json_string(out, msg, strlen(msg));
    for (size_t i = 0; i < r->nfields; i++) {
      add_str(out, ",\"");
      add_key(out, r->fields[i].key);
      add_str(out, "\":");
      json_value(out, &r->fields[i]);
    }
    add_str(out, "}\n");
    return;
  }

  add_str(out, "ts=");
  put(out, ts, PGR_LOGFMT_TS_SIZE - 1);
  add_str(out, " level=");
  add_str(out, pgr_log_level_name(r->level));
  add_str(out, " proc=");
  pgr_logfmt_value(out, proc, strlen(proc));
  add_str(out, " pid=");
  add_int(out, r->pid);
  add_str(out, " msg=");
  pgr_logfmt_value(out, msg, strlen(msg));
  for (size_t i = 0; i < r->nfields; i++)
    text_field(out, &r->fields[i]);
  put1(out, '\n');
}

void pgr_logfmt_wire(struct pgr_buf *out, const struct pgr_logfmt_rec *r) {
  const char *proc = r->proc != NULL ? r->proc : "";
  const char *msg = r->msg != NULL ? r->msg : "";
  add_str(out, "{\"v\":1,\"ts\":");
  add_int(out, r->ts_ms);
  add_str(out, ",\"level\":\"");
  add_str(out, pgr_log_level_name(r->level));
  add_str(out, "\",\"proc\":");
  pgr_logfmt_json_string(out, proc, strlen(proc));
  add_str(out, ",\"pid\":");
  add_int(out, r->pid);
  add_str(out, ",\"msg\":");
  pgr_logfmt_json_string(out, msg, strlen(msg));
  add_str(out, ",\"f\":[");
  for (size_t i = 0; i < r->nfields; i++) {
    add_str(out, i == 0 ? "[\"" : ",[\"");
    reduce_key(out, r->fields[i].key);
    add_str(out, "\",");
    json_value(out, &r->fields[i]);
    put1(out, ']');
  }
  add_str(out, "]}\n");
}

/* wire_string returns the string member `key` if it is 1..max bytes long. */
static const char *wire_string(json_t *obj, const char *key, size_t max) {
  json_t *v = json_object_get(obj, key);
  if (!json_is_string(v))
    return NULL;
  size_t n = json_string_length(v);
  return n >= 1 && n <= max ? json_string_value(v) : NULL;
}

static int wire_int(json_t *obj, const char *key, int64_t min, int64_t max,
                    int64_t *out) {
  json_t *v = json_object_get(obj, key);
  if (!json_is_integer(v))
    return PGR_EINVAL;
  json_int_t i = json_integer_value(v);
  if (i < min || i > max)
    return PGR_EINVAL;
  *out = (int64_t)i;
  return 0;
}

/*
 * pgr_logfmt_rewire trusts nothing in the line: jansson rejects malformed
 * JSON, ill-formed UTF-8 and \u0000 (without JSON_ALLOW_NUL), and each member
 * is checked for type and range here. The record is then formatted by the
 * same code as local records, so whatever a client sends, the file receives
 * one well-formed line or nothing.
 */
int pgr_logfmt_rewire(struct pgr_buf *out, enum pgr_log_format format,
                      const char *line, size_t len) {
  struct pgr_logfmt_rec r = {0};
  struct pgr_log_field *fields = NULL;
  json_t *root = NULL;
  json_error_t jerr;
  int64_t v, pid;
  int rc = PGR_EINVAL;

  if (len > PGR_LOGFMT_WIRE_MAX)
    goto out;
  root = json_loadb(line, len, JSON_REJECT_DUPLICATES, &jerr);
  if (root == NULL) {
    rc = PGR_EJSON;
    goto out;
  }
  /* Exactly the seven members of version 1: anything else is not ours. */
  if (!json_is_object(root) || json_object_size(root) != 7)
    goto out;
  if (wire_int(root, "v", 1, 1, &v) != 0 ||
      wire_int(root, "ts", 0, WIRE_MAX_TS, &r.ts_ms) != 0 ||
      wire_int(root, "pid", 0, INT32_MAX, &pid) != 0)
    goto out;
  r.pid = pid;
  const char *level = wire_string(root, "level", 8);
  if (level == NULL || pgr_log_level_parse(level, &r.level) != 0)
    goto out;
  r.proc = wire_string(root, "proc", WIRE_MAX_PROC);
  if (r.proc == NULL)
    goto out;
  json_t *msg = json_object_get(root, "msg");
  if (!json_is_string(msg))
    goto out;
  r.msg = json_string_value(msg);

  json_t *f = json_object_get(root, "f");
  if (!json_is_array(f) || json_array_size(f) > WIRE_MAX_FIELDS)
    goto out;
  r.nfields = json_array_size(f);
  fields = pgr_calloc(r.nfields, sizeof(*fields));
  for (size_t i = 0; i < r.nfields; i++) {
    json_t *pair = json_array_get(f, i);
    if (!json_is_array(pair) || json_array_size(pair) != 2)
      goto out;
    json_t *k = json_array_get(pair, 0), *val = json_array_get(pair, 1);
    if (!json_is_string(k) || json_string_length(k) < 1 ||
        json_string_length(k) > WIRE_MAX_KEY)
      goto out;
    fields[i].key = json_string_value(k);
    if (json_is_string(val)) {
      fields[i].type = PGR_LF_STR;
      fields[i].v.s = json_string_value(val);
    } else if (json_is_integer(val)) {
      fields[i].type = PGR_LF_INT;
      fields[i].v.i = (int64_t)json_integer_value(val);
    } else if (json_is_real(val)) {
      fields[i].type = PGR_LF_DBL;
      fields[i].v.d = json_real_value(val);
    } else if (json_is_null(val)) {
      fields[i].type = PGR_LF_STR;
      fields[i].v.s = NULL;
    } else {
      goto out;
    }
  }
  r.fields = fields;
  pgr_logfmt_record(out, format, &r);
  rc = 0;
out:
  free(fields);
  json_decref(root);
  return rc;
}
