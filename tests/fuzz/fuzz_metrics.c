/*
 * fuzz_metrics.c - Prometheus label values. Queue and kind names come from
 * the tasks table (anyone who can add a task picks them). The input is a
 * queue and a kind separated by a NUL byte. pgr_metrics_add_label_value()
 * must leave no raw quote, newline or lone backslash and decode back to the
 * value; and once counted, the series shows in pgr_metrics_render() as
 * well-formed exposition lines, valid UTF-8 when the names were (a long
 * name is cut, never inside a character).
 */
#include "fuzz.h"
#include "metrics.h"

/* Undoes the exposition format's escapes; aborts on a raw '"' or '\n' or
 * an unknown escape. */
static char *unescape(const char *s) {
  struct pgr_buf b = {NULL, 0, 0};
  pgr_buf_add(&b, "", 0);
  for (const char *p = s; *p; p++) {
    FUZZ_CHECK(*p != '"' && *p != '\n');
    if (*p != '\\') {
      pgr_buf_addc(&b, *p);
      continue;
    }
    p++;
    FUZZ_CHECK(*p == '\\' || *p == '"' || *p == 'n');
    pgr_buf_addc(&b, *p == 'n' ? '\n' : *p);
  }
  return b.data;
}

static void check_escape(const char *v) {
  struct pgr_buf b = {NULL, 0, 0};
  pgr_buf_add(&b, "", 0);
  pgr_metrics_add_label_value(&b, v);
  char *back = unescape(b.data);
  FUZZ_CHECK(strcmp(back, v) == 0);
  free(back);
  pgr_buf_free(&b);
}

/* One exposition line: a comment, or name{label="value",...} number. */
static void check_render_line(const char *l, size_t n) {
  if (n > 0 && l[0] == '#')
    return;
  size_t i = 0;
  while (i < n && (l[i] == '_' || (l[i] >= 'a' && l[i] <= 'z')))
    i++;
  FUZZ_CHECK(i > 0 && i < n);
  if (l[i] == '{') {
    i++;
    for (;;) {
      while (i < n && l[i] >= 'a' && l[i] <= 'z')
        i++;
      FUZZ_CHECK(i + 1 < n && l[i] == '=' && l[i + 1] == '"');
      i += 2;
      while (i < n && l[i] != '"') {
        FUZZ_CHECK(l[i] != '\n');
        i += l[i] == '\\' ? 2 : 1;
      }
      FUZZ_CHECK(i + 1 < n);
      i++;
      if (l[i] == '}')
        break;
      FUZZ_CHECK(l[i] == ',');
      i++;
    }
    i++;
  }
  FUZZ_CHECK(i < n && l[i] == ' ' && i + 1 < n);
}

/* Series live for the whole process and rendering many is slow: the
 * first few pairs (the seeds among them) are counted and rendered, later
 * inputs only go through the escaping, with a render now and then. */
#define MAX_COUNTED 64
static size_t ncounted;
static unsigned execs;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *queue = fuzz_cstr(data, size);
  size_t ql = strlen(queue);
  const char *kind = ql + 1 < size ? queue + ql + 1 : "";

  check_escape(queue);
  check_escape(kind);

  /* Only names PostgreSQL could hand over (valid UTF-8) are counted, so
   * the whole page must stay valid. */
  int counted = 0;
  if (ncounted < MAX_COUNTED && fuzz_utf8_ok(queue, ql) &&
      fuzz_utf8_ok(kind, strlen(kind))) {
    pgr_metrics_task_started(queue, kind);
    ncounted++;
    counted = 1;
  }
  if (!counted && ++execs % 4096 != 0)
    goto out;
  char *text = pgr_metrics_render();
  size_t n = strlen(text);
  FUZZ_CHECK(fuzz_utf8_ok(text, n));
  for (const char *p = text; p < text + n;) {
    const char *e = memchr(p, '\n', (size_t)(text + n - p));
    FUZZ_CHECK(e != NULL);
    check_render_line(p, (size_t)(e - p));
    p = e + 1;
  }
  free(text);
out:
  free(queue);
  return 0;
}
