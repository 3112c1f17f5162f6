/*
 * fuzz_log_wire.c - the log socket's wire format: any line a process
 * sends to DIR/pgrunner.sock goes through pgr_logfmt_rewire(). A line it
 * refuses leaves the output untouched; a line it takes becomes exactly one
 * line, '\n'-terminated, of valid UTF-8 without control characters, in
 * both formats. The JSON line is a JSON object with the fixed members
 * first, and the logfmt line's msg decodes to the same text as the JSON
 * line's. Every accepted line carries what the wire line said: writing the
 * decoded record to the wire again and reading it back gives the same line.
 */
#include <jansson.h>

#include "fuzz.h"
#include "logfmt.h"

static void check_line(const struct pgr_buf *b, size_t from) {
  const char *s = b->data + from;
  size_t n = b->len - from;
  FUZZ_CHECK(n >= 1 && s[n - 1] == '\n');
  for (size_t i = 0; i + 1 < n; i++)
    FUZZ_CHECK((unsigned char)s[i] >= 0x20 && s[i] != 0x7f);
  FUZZ_CHECK(fuzz_utf8_ok(s, n));
}

/* Reads a logfmt line pair by pair (keys of [A-Za-z0-9_.-], values bare
 * or JSON strings) and returns the msg value, decoded. */
static char *logfmt_msg(const char *line) {
  const char *p = line;
  char *msg = NULL;
  for (;;) {
    const char *k = p;
    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
           (*p >= '0' && *p <= '9') || *p == '_' || *p == '.' || *p == '-')
      p++;
    FUZZ_CHECK(p > k && *p == '=');
    int is_msg = p - k == 3 && memcmp(k, "msg", 3) == 0;
    const char *v = ++p;
    char *val;
    if (*p == '"') {
      for (p++; *p != '"'; p += *p == '\\' ? 2 : 1)
        FUZZ_CHECK(*p != '\0' && *p != '\n');
      p++;
      json_t *j = json_loadb(v, (size_t)(p - v), JSON_DECODE_ANY, NULL);
      FUZZ_CHECK(json_is_string(j));
      val = pgr_strdup(json_string_value(j));
      json_decref(j);
    } else {
      p += strcspn(p, " \n\"");
      val = pgr_strndup(v, (size_t)(p - v));
    }
    if (is_msg && msg == NULL)
      msg = val;
    else
      free(val);
    if (*p == '\n')
      break;
    FUZZ_CHECK(*p == ' ');
    p++;
  }
  FUZZ_CHECK(p[1] == '\0' && msg != NULL);
  return msg;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct pgr_buf text = {NULL, 0, 0}, js = {NULL, 0, 0};
  const char *line = (const char *)data;

  pgr_buf_adds(&text, "before\n");
  pgr_buf_adds(&js, "before\n");
  int rc = pgr_logfmt_rewire(&text, PGR_LOG_TEXT, line, size);
  int rc2 = pgr_logfmt_rewire(&js, PGR_LOG_JSON, line, size);
  FUZZ_CHECK(rc == rc2);
  if (rc != 0) {
    FUZZ_CHECK(rc == PGR_EJSON || rc == PGR_EINVAL);
    FUZZ_CHECK(text.len == 7 && js.len == 7);
    goto out;
  }
  check_line(&text, 7);
  check_line(&js, 7);
  FUZZ_CHECK(strncmp(text.data + 7, "ts=", 3) == 0);

  json_error_t jerr;
  json_t *o = json_loadb(js.data + 7, js.len - 7, 0, &jerr);
  FUZZ_CHECK(json_is_object(o));
  FUZZ_CHECK(json_is_string(json_object_get(o, "ts")) &&
             json_is_string(json_object_get(o, "level")) &&
             json_is_string(json_object_get(o, "proc")) &&
             json_is_integer(json_object_get(o, "pid")) &&
             json_is_string(json_object_get(o, "msg")));
  char *tmsg = logfmt_msg(text.data + 7);
  FUZZ_CHECK(strcmp(tmsg, json_string_value(json_object_get(o, "msg"))) == 0);
  free(tmsg);
  json_decref(o);

  /* Round trip: the wire line's record, encoded again, reads the same. */
  {
    json_t *w = json_loadb(line, size, 0, NULL);
    json_t *f = json_object_get(w, "f");
    struct pgr_log_field *fields =
        calloc(json_array_size(f) + 1, sizeof *fields);
    struct pgr_logfmt_rec r = {0};
    r.ts_ms = json_integer_value(json_object_get(w, "ts"));
    FUZZ_CHECK(
        pgr_log_level_parse(json_string_value(json_object_get(w, "level")),
                            &r.level) == 0);
    r.proc = json_string_value(json_object_get(w, "proc"));
    r.pid = json_integer_value(json_object_get(w, "pid"));
    r.msg = json_string_value(json_object_get(w, "msg"));
    r.nfields = json_array_size(f);
    r.fields = fields;
    for (size_t i = 0; i < r.nfields; i++) {
      json_t *pair = json_array_get(f, i);
      json_t *v = json_array_get(pair, 1);
      fields[i].key = json_string_value(json_array_get(pair, 0));
      if (json_is_integer(v)) {
        fields[i].type = PGR_LF_INT;
        fields[i].v.i = json_integer_value(v);
      } else if (json_is_real(v)) {
        fields[i].type = PGR_LF_DBL;
        fields[i].v.d = json_real_value(v);
      } else {
        fields[i].type = PGR_LF_STR;
        fields[i].v.s = json_string_value(v); /* NULL for null */
      }
    }
    struct pgr_buf wire = {NULL, 0, 0}, again = {NULL, 0, 0};
    pgr_logfmt_wire(&wire, &r);
    FUZZ_CHECK(wire.len >= 1 && wire.data[wire.len - 1] == '\n');
    FUZZ_CHECK(memchr(wire.data, '\n', wire.len - 1) == NULL);
    FUZZ_CHECK(
        pgr_logfmt_rewire(&again, PGR_LOG_TEXT, wire.data, wire.len - 1) == 0);
    FUZZ_CHECK(again.len == text.len - 7 &&
               memcmp(again.data, text.data + 7, again.len) == 0);
    pgr_buf_free(&wire);
    pgr_buf_free(&again);
    free(fields);
    json_decref(w);
  }

out:
  pgr_buf_free(&text);
  pgr_buf_free(&js);
  return 0;
}
