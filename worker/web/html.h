/*
 * html.h - HTML text escaping for the dashboard.
 *
 * Thread: any; pure functions.
 */
#ifndef PGR_HTML_H
#define PGR_HTML_H

#include "common.h"

/* Append s with & < > " ' escaped, so it is text in an element or in a
 * quoted attribute value, whatever it contains. NULL appends nothing. */
void pgr_html_text(struct pgr_buf *b, const char *s);

#endif /* PGR_HTML_H */
