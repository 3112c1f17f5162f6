/*
 * fuzz_log_record.c - the encoder side of the log socket and the logfmt
 * escaping. The input is cut into a record (proc, msg, fields of every
 * type, strings with any bytes, doubles with any bits) as a pgrunner
 * command would log it. Checks: pgr_logfmt_wire() writes one line that
 * pgr_logfmt_rewire() accepts and turns into exactly what
 * pgr_logfmt_record() writes for the record directly, in both formats; and
 * pgr_logfmt_value() / pgr_logfmt_json_string() of any string are one
 * token that decodes back to the string (ill-formed UTF-8 aside).
 */
#include <jansson.h>

#include "fuzz.h"
#include "logfmt.h"

struct reader {
  const uint8_t *p;
  size_t n;
};

static uint8_t take_byte(struct reader *r) {
  if (r->n == 0)
    return 0;
  r->n--;
  return *r->p++;
}

/* A string up to the next 0x00 byte (or the end). */
static char *take_str(struct reader *r, size_t max) {
  size_t n = 0;
  while (n < r->n && r->p[n] != 0)
    n++;
  char *s = pgr_strndup((const char *)r->p, n < max ? n : max);
  r->p += n < r->n ? n + 1 : n;
  r->n -= n < r->n ? n + 1 : n;
  return s;
}

static uint64_t take_u64(struct reader *r) {
  uint64_t v = 0;
  for (int i = 0; i < 8; i++)
    v = v << 8 | take_byte(r);
  return v;
}

/* pgr_logfmt_value(s): a bare token, or a JSON string decoding to s. */
static void check_value(const char *s) {
  struct pgr_buf b = {NULL, 0, 0};
  size_t n = strlen(s);
  pgr_logfmt_value(&b, s, n);
  pgr_buf_add(&b, "", 0);
  FUZZ_CHECK(fuzz_utf8_ok(b.data, b.len));
  for (size_t i = 0; i < b.len; i++)
    FUZZ_CHECK((unsigned char)b.data[i] >= 0x20 && b.data[i] != 0x7f);
  if (b.len > 0 && b.data[0] == '"') {
    json_t *v = json_loadb(b.data, b.len, JSON_DECODE_ANY, NULL);
    FUZZ_CHECK(json_is_string(v));
    if (fuzz_utf8_ok(s, n))
      FUZZ_CHECK(strcmp(json_string_value(v), s) == 0);
    json_decref(v);
  } else {
    FUZZ_CHECK(b.len > 0 && strpbrk(b.data, " \"=\\") == NULL);
    if (fuzz_utf8_ok(s, n))
      FUZZ_CHECK(strcmp(b.data, s) == 0);
  }
  pgr_buf_free(&b);

  pgr_buf_init(&b);
  pgr_logfmt_json_string(&b, s, n);
  json_t *v = json_loadb(b.data, b.len, JSON_DECODE_ANY, NULL);
  FUZZ_CHECK(json_is_string(v));
  if (fuzz_utf8_ok(s, n))
    FUZZ_CHECK(strcmp(json_string_value(v), s) == 0);
  json_decref(v);
  pgr_buf_free(&b);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  struct reader rd = {data, size};
  struct pgr_logfmt_rec r = {0};
  struct pgr_log_field fields[8];
  char *strs[18] = {0};
  size_t ns = 0;

  r.ts_ms = (int64_t)(take_u64(&rd) % INT64_C(253402300800000));
  r.level = (enum pgr_level)(take_byte(&rd) % 4);
  r.pid = (int64_t)(take_u64(&rd) & 0x7fffffff);
  /* The proc name is the program's own ("worker", "add"): 1 to 64 bytes of
   * ASCII on the wire. */
  strs[ns] = take_str(&rd, 64);
  for (char *c = strs[ns]; *c; c++)
    if (*c < 0x21 || *c > 0x7e)
      *c = '_';
  r.proc = strs[ns][0] ? strs[ns] : "p";
  ns++;
  r.msg = strs[ns++] = take_str(&rd, 4096);
  r.nfields = take_byte(&rd) % 9;
  r.fields = fields;
  for (size_t i = 0; i < r.nfields; i++) {
    /* Keys are at most 128 bytes on the wire. */
    char *k = strs[ns++] = take_str(&rd, 128);
    fields[i].key = k; /* empty too: it travels as "_" */
    switch (take_byte(&rd) % 4) {
    case 0:
      fields[i].type = PGR_LF_STR;
      fields[i].v.s = strs[ns++] = take_str(&rd, 4096);
      break;
    case 1:
      fields[i].type = PGR_LF_STR;
      fields[i].v.s = NULL;
      break;
    case 2:
      fields[i].type = PGR_LF_INT;
      fields[i].v.i = (int64_t)take_u64(&rd);
      break;
    default: {
      uint64_t bits = take_u64(&rd);
      fields[i].type = PGR_LF_DBL;
      memcpy(&fields[i].v.d, &bits, sizeof bits);
      break;
    }
    }
  }

  struct pgr_buf wire = {NULL, 0, 0};
  pgr_logfmt_wire(&wire, &r);
  FUZZ_CHECK(wire.len >= 1 && wire.data[wire.len - 1] == '\n');
  FUZZ_CHECK(memchr(wire.data, '\n', wire.len - 1) == NULL);
  for (int f = PGR_LOG_TEXT; f <= PGR_LOG_JSON; f++) {
    struct pgr_buf direct = {NULL, 0, 0}, via = {NULL, 0, 0};
    pgr_logfmt_record(&direct, (enum pgr_log_format)f, &r);
    FUZZ_CHECK(pgr_logfmt_rewire(&via, (enum pgr_log_format)f, wire.data,
                                 wire.len - 1) == 0);
    FUZZ_CHECK(via.len == direct.len &&
               memcmp(via.data, direct.data, via.len) == 0);
    pgr_buf_free(&direct);
    pgr_buf_free(&via);
  }
  pgr_buf_free(&wire);

  check_value(r.msg);
  for (size_t i = 0; i < r.nfields; i++)
    if (fields[i].type == PGR_LF_STR && fields[i].v.s != NULL)
      check_value(fields[i].v.s);

  for (size_t i = 0; i < ns; i++)
    free(strs[i]);
  return 0;
}
