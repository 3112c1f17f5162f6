/*
 * html.c - HTML escaping. Every string the dashboard shows that came from
 * the database (kinds, queues, payloads, errors, worker names) goes through
 * pgr_html_text, in element text and in quoted attribute values alike.
 */
#include "web/html.h"

#include <string.h>

void pgr_html_text(struct pgr_buf *b, const char *s) {
  if (s == NULL)
    return;
  for (const char *p = s; *p; p++) {
    switch (*p) {
    case '&':
      pgr_buf_adds(b, "&amp;");
      break;
    case '<':
      pgr_buf_adds(b, "&lt;");
      break;
    case '>':
      pgr_buf_adds(b, "&gt;");
      break;
    case '"':
      pgr_buf_adds(b, "&quot;");
      break;
    case '\'':
      pgr_buf_adds(b, "&#39;");
      break;
    default:
      pgr_buf_addc(b, *p);
    }
  }
}
