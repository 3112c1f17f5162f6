/*
 * fuzz_html.c - the dashboard's HTML escaping, pgr_html_text(), on any
 * string (kinds, queues, payloads and errors come from the tasks table).
 * The output holds no '<', '>', '"' or '\'', every '&' opens one of the
 * five entities it writes, and decoding those gives the input back.
 */
#include "fuzz.h"
#include "web/html.h"

static const char *const entities[] = {"&amp;", "&lt;", "&gt;", "&quot;",
                                       "&#39;"};
static const char plain[] = "&<>\"'";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = fuzz_cstr(data, size);
  struct pgr_buf b = {NULL, 0, 0}, back = {NULL, 0, 0};

  pgr_buf_add(&b, "", 0);
  pgr_buf_add(&back, "", 0);
  pgr_html_text(&b, s);
  FUZZ_CHECK(strpbrk(b.data, "<>\"'") == NULL);
  for (const char *p = b.data; *p;) {
    if (*p != '&') {
      pgr_buf_addc(&back, *p++);
      continue;
    }
    size_t k = 0;
    while (k < PGR_ARRAY_LEN(entities) &&
           strncmp(p, entities[k], strlen(entities[k])) != 0)
      k++;
    FUZZ_CHECK(k < PGR_ARRAY_LEN(entities));
    pgr_buf_addc(&back, plain[k]);
    p += strlen(entities[k]);
  }
  FUZZ_CHECK(strcmp(back.data, s) == 0);
  pgr_buf_free(&b);
  pgr_buf_free(&back);
  free(s);
  return 0;
}
