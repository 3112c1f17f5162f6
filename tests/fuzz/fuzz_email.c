/*
 * fuzz_email.c - an `email` task's payload (outside input: whoever adds
 * the task writes it) through pgr_email_build(). Checks what email_msg.h
 * promises of the message: CRLF line ends only, 7-bit, lines of at most
 * 998 octets, well-formed header fields, no Bcc header, valid and distinct
 * envelope addresses; and that the Subject, the extra headers and the
 * bodies decode back to what the payload said. A refused payload gets a
 * one-line printable ASCII reason.
 */
#include <ctype.h>
#include <strings.h>

#include <jansson.h>

#include "fuzz.h"
#include "jobs/email_msg.h"

static int b64val(unsigned char c) {
  if (c >= 'A' && c <= 'Z')
    return c - 'A';
  if (c >= 'a' && c <= 'z')
    return c - 'a' + 26;
  if (c >= '0' && c <= '9')
    return c - '0' + 52;
  if (c == '+')
    return 62;
  if (c == '/')
    return 63;
  return -1;
}

/* Decodes base64, skipping CR and LF; aborts on anything malformed. */
static void b64_decode(struct pgr_buf *out, const char *s, size_t n) {
  unsigned v = 0;
  int bits = 0;
  size_t pad = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '\r' || c == '\n')
      continue;
    if (c == '=') {
      pad++;
      continue;
    }
    FUZZ_CHECK(pad == 0 && b64val(c) >= 0);
    v = v << 6 | (unsigned)b64val(c);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      pgr_buf_addc(out, (char)((v >> bits) & 0xFF));
    }
  }
  FUZZ_CHECK(pad <= 2);
}

static int hexv(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Decodes quoted-printable; aborts on a malformed or overlong line. */
static void qp_decode(struct pgr_buf *out, const char *s, size_t n) {
  size_t col = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '\r') {
      FUZZ_CHECK(col <= 76);
      col = 0;
      pgr_buf_add(out, "\r\n", 2);
      i++;
      continue;
    }
    col++;
    if (s[i] != '=') {
      pgr_buf_addc(out, s[i]);
      continue;
    }
    FUZZ_CHECK(i + 2 < n);
    if (s[i + 1] == '\r') { /* soft line break */
      FUZZ_CHECK(col <= 76);
      col = 0;
      i += 2;
      continue;
    }
    FUZZ_CHECK(hexv(s[i + 1]) >= 0 && hexv(s[i + 2]) >= 0);
    pgr_buf_addc(out, (char)(hexv(s[i + 1]) << 4 | hexv(s[i + 2])));
    col += 2;
    i += 2;
  }
  FUZZ_CHECK(col <= 76);
}

/* The payload's text with every line break made CRLF. */
static void normalise(struct pgr_buf *out, const char *s) {
  pgr_buf_add(out, "", 0);
  for (; *s; s++) {
    if (*s == '\r' || *s == '\n') {
      if (s[0] == '\r' && s[1] == '\n')
        s++;
      pgr_buf_add(out, "\r\n", 2);
    } else {
      pgr_buf_addc(out, *s);
    }
  }
}

/* Finds header `name` (exact case) in the header section; returns its
 * unfolded value (after the colon) in out, or 0 if absent. */
static int header_value(const char *head, size_t hlen, const char *name,
                        struct pgr_buf *out) {
  size_t nl = strlen(name);
  const char *p = head;
  for (;;) {
    if ((size_t)(head + hlen - p) > nl && memcmp(p, name, nl) == 0 &&
        p[nl] == ':')
      break;
    p = memmem(p, (size_t)(head + hlen - p), "\r\n", 2);
    if (p == NULL)
      return 0;
    p += 2;
  }
  p += nl + 1;
  pgr_buf_add(out, "", 0);
  for (;;) {
    const char *e = memmem(p, (size_t)(head + hlen - p), "\r\n", 2);
    FUZZ_CHECK(e != NULL);
    pgr_buf_add(out, p, (size_t)(e - p));
    p = e + 2;
    if (p >= head + hlen || (*p != ' ' && *p != '\t'))
      return 1;
  }
}

/* A header written by pgr_email_header() reads back as `want`. */
static void check_header(const char *head, size_t hlen, const char *name,
                         const char *want) {
  struct pgr_buf v = {NULL, 0, 0}, dec = {NULL, 0, 0};
  FUZZ_CHECK(header_value(head, hlen, name, &v));
  if (strncmp(v.data, " =?UTF-8?B?", 11) == 0) {
    /* Encoded-words separated by whitespace, which decoders drop. */
    char *save = NULL;
    pgr_buf_add(&dec, "", 0);
    for (char *w = strtok_r(v.data, " \t", &save); w;
         w = strtok_r(NULL, " \t", &save)) {
      size_t wl = strlen(w);
      FUZZ_CHECK(wl <= 75 && wl >= 12 && strncmp(w, "=?UTF-8?B?", 10) == 0 &&
                 strcmp(w + wl - 2, "?=") == 0);
      b64_decode(&dec, w + 10, wl - 12);
    }
    FUZZ_CHECK(strcmp(dec.data, want) == 0);
  } else {
    FUZZ_CHECK(v.data[0] == ' ' && strcmp(v.data + 1, want) == 0);
  }
  pgr_buf_free(&v);
  pgr_buf_free(&dec);
}

/* One body part from its Content-Transfer-Encoding header on: decodes it
 * and compares with the payload's text. `tail_ok`: the builder may have
 * added a final CRLF. */
static void check_part(const char *p, size_t n, const char *text, int tail_ok) {
  struct pgr_buf want = {NULL, 0, 0}, got = {NULL, 0, 0};
  /* At a line start: a Subject may hold the same words. */
  const char *cte = memmem(p, n, "\r\nContent-Transfer-Encoding: ", 29);
  FUZZ_CHECK(cte != NULL);
  cte += 29;
  const char *body = memmem(cte, (size_t)(p + n - cte), "\r\n\r\n", 4);
  FUZZ_CHECK(body != NULL);
  body += 4;
  size_t blen = (size_t)(p + n - body);
  pgr_buf_add(&got, "", 0);
  if (strncmp(cte, "7bit\r\n", 6) == 0)
    pgr_buf_add(&got, body, blen);
  else if (strncmp(cte, "quoted-printable\r\n", 18) == 0)
    qp_decode(&got, body, blen);
  else if (strncmp(cte, "base64\r\n", 8) == 0)
    b64_decode(&got, body, blen);
  else
    FUZZ_CHECK(!"unknown Content-Transfer-Encoding");
  normalise(&want, text);
  if (tail_ok && got.len == want.len + 2 &&
      memcmp(got.data + want.len, "\r\n", 2) == 0)
    got.len -= 2;
  FUZZ_CHECK(got.len == want.len && memcmp(got.data, want.data, got.len) == 0);
  pgr_buf_free(&want);
  pgr_buf_free(&got);
}

static const char *str_member(json_t *root, const char *key) {
  json_t *v = json_object_get(root, key);
  return json_is_string(v) ? json_string_value(v) : NULL;
}

static void check_message(const char *payload, const struct pgr_email *m) {
  const char *d = m->data.data;
  size_t n = m->data.len, line = 0;

  /* CRLF only, 7-bit, no NUL, lines of at most 998 octets. */
  FUZZ_CHECK(n >= 2 && memcmp(d + n - 2, "\r\n", 2) == 0);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)d[i];
    FUZZ_CHECK(c != 0 && c < 0x80);
    if (c == '\r') {
      FUZZ_CHECK(i + 1 < n && d[i + 1] == '\n');
      FUZZ_CHECK(line <= 998);
      line = 0;
      i++;
    } else {
      FUZZ_CHECK(c != '\n');
      line++;
    }
  }

  /* The header section: fields and non-blank continuation lines. */
  const char *end = memmem(d, n, "\r\n\r\n", 4);
  FUZZ_CHECK(end != NULL);
  size_t hlen = (size_t)(end - d) + 2;
  for (const char *p = d; p < d + hlen;) {
    const char *e = memmem(p, (size_t)(d + hlen - p), "\r\n", 2);
    if (*p == ' ' || *p == '\t') {
      FUZZ_CHECK(p != d);
      int blank = 1;
      for (const char *q = p; q < e; q++)
        blank = blank && (*q == ' ' || *q == '\t');
      FUZZ_CHECK(!blank);
    } else {
      const char *q = p;
      while (q < e && *q != ':') {
        FUZZ_CHECK(*q > 32 && *q < 127);
        q++;
      }
      FUZZ_CHECK(q < e && q > p);
      FUZZ_CHECK(strncasecmp(p, "Bcc:", 4) != 0);
    }
    p = e + 2;
  }

  /* The envelope. */
  FUZZ_CHECK(pgr_email_valid_addr(m->from));
  FUZZ_CHECK(m->nrcpts >= 1);
  for (size_t i = 0; i < m->nrcpts; i++) {
    FUZZ_CHECK(pgr_email_valid_addr(m->rcpts[i]));
    for (size_t k = 0; k < i; k++)
      FUZZ_CHECK(strcasecmp(m->rcpts[i], m->rcpts[k]) != 0);
  }
  FUZZ_CHECK(strpbrk(m->message_id, "<> \t\r\n") == NULL);

  /* What the payload said reads back. */
  json_t *root = json_loads(payload, 0, NULL);
  FUZZ_CHECK(root != NULL);
  const char *subject = str_member(root, "subject");
  const char *text = str_member(root, "text");
  const char *html = str_member(root, "html");
  if (subject != NULL)
    check_header(d, hlen, "Subject", subject);
  json_t *h = json_object_get(root, "headers");
  if (json_is_object(h)) {
    const char *k;
    json_t *v;
    json_object_foreach(h, k, v) {
      check_header(d, hlen, k, json_string_value(v));
    }
  }
  if (text != NULL && html != NULL) {
    struct pgr_buf ct = {NULL, 0, 0};
    FUZZ_CHECK(header_value(d, hlen, "Content-Type", &ct));
    const char *bq = strstr(ct.data, "boundary=\"");
    FUZZ_CHECK(bq != NULL);
    char delim[96];
    snprintf(delim, sizeof delim, "\r\n--%.*s", (int)strcspn(bq + 10, "\""),
             bq + 10);
    /* The delimiter occurs exactly where the builder put it. */
    const char *body = end + 2; /* at the CRLF before the first "--" */
    const char *d1 = memmem(body, (size_t)(d + n - body), delim, strlen(delim));
    FUZZ_CHECK(d1 == body);
    const char *p1 = d1 + strlen(delim);
    const char *d2 = memmem(p1, (size_t)(d + n - p1), delim, strlen(delim));
    FUZZ_CHECK(d2 != NULL);
    const char *p2 = d2 + strlen(delim);
    const char *d3 = memmem(p2, (size_t)(d + n - p2), delim, strlen(delim));
    FUZZ_CHECK(d3 != NULL && strcmp(d3 + strlen(delim), "--\r\n") == 0);
    check_part(p1, (size_t)(d2 - p1), text, 0);
    check_part(p2, (size_t)(d3 - p2), html, 0);
    pgr_buf_free(&ct);
  } else {
    check_part(d, n, html ? html : text ? text : "", 1);
  }
  json_decref(root);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *payload = fuzz_cstr(data, size);
  struct pgr_email_opts opts = {
      .task_id = 42,
      .default_from = "Sender <sender@example.com>",
      .msgid_domain = NULL,
      .date = 1764052380,
  };
  struct pgr_email m;
  char err[256];

  err[0] = '\0';
  if (pgr_email_build(payload, &opts, &m, err, sizeof err) == 0) {
    check_message(payload, &m);
    pgr_email_free(&m);
  } else {
    /* A one-line printable ASCII reason. */
    FUZZ_CHECK(err[0] != '\0');
    for (const char *p = err; *p; p++)
      FUZZ_CHECK(*p >= 32 && *p < 127);
    FUZZ_CHECK(m.data.data == NULL && m.from == NULL && m.nrcpts == 0);
  }
  free(payload);
  return 0;
}
