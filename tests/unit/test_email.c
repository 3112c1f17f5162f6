/*
 * test_email.c - the `email` message builder (worker/jobs/email_msg.c):
 * payload validation, RFC 2047 / RFC 2045 encoding, header assembly; and
 * the handler's outcomes that need no server (a bad payload, a refused
 * connection to localhost). The SMTP session itself is tested by
 * tests/integration/test_email.py against a real server.
 */
#include <criterion/criterion.h>
#include <criterion/new/assert.h>

#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "jobs/email.h"
#include "jobs/email_msg.h"

static struct pgr_email_opts opts(void) {
  struct pgr_email_opts o = {
      .task_id = 42,
      .default_from = "Worker <worker@example.org>",
      .msgid_domain = "mail.example.org",
      .date = 1764052380, /* 2025-11-25 06:33:00 UTC */
  };
  return o;
}

/* build runs the builder and returns its code; err gets the reason. */
static int build(const char *payload, struct pgr_email *m, char *err,
                 size_t errlen) {
  struct pgr_email_opts o = opts();
  err[0] = '\0';
  return pgr_email_build(payload, &o, m, err, errlen);
}

/* The header section, up to the first empty line, as a new string. */
static char *header_section(const struct pgr_email *m) {
  const char *end = strstr(m->data.data, "\r\n\r\n");
  cr_assert(end != NULL, "the message should have a header section");
  return strndup(m->data.data, (size_t)(end - m->data.data) + 2);
}

/* unfold removes the CRLFs of folded lines (RFC 5322 2.2.3). */
static char *unfold(const char *s) {
  char *out = malloc(strlen(s) + 1), *o = out;
  for (; *s != '\0'; s++) {
    if (s[0] == '\r' && s[1] == '\n' && (s[2] == ' ' || s[2] == '\t')) {
      s++;
      continue;
    }
    *o++ = *s;
  }
  *o = '\0';
  return out;
}

/* The unfolded value of header `name` (with its leading space), or NULL. */
static char *header_value(const struct pgr_email *m, const char *name) {
  char *hs = header_section(m), *u = unfold(hs), *line, *save = NULL,
       *found = NULL;
  size_t n = strlen(name);
  for (line = strtok_r(u, "\r\n", &save); line != NULL;
       line = strtok_r(NULL, "\r\n", &save))
    if (strncasecmp(line, name, n) == 0 && line[n] == ':') {
      found = strdup(line + n + 1);
      break;
    }
  free(hs);
  free(u);
  return found;
}

/* check_lines: every line ends in CRLF, is 7-bit and at most 998 octets
 * (RFC 5322 2.1.1, RFC 5321 4.5.3.1.6); header lines at most 78. */
static void check_lines(const struct pgr_email *m) {
  const char *p = m->data.data, *end = p + m->data.len;
  int in_headers = 1;
  cr_assert(m->data.len >= 2 && memcmp(end - 2, "\r\n", 2) == 0,
            "the message should end with CRLF");
  while (p < end) {
    const char *eol = strstr(p, "\r\n");
    cr_assert(eol != NULL, "every line should end with CRLF");
    for (const char *q = p; q < eol; q++) {
      cr_assert(lt(int, (unsigned char)*q, 128), "the message should be 7-bit");
      cr_assert(q[0] != '\r' && q[0] != '\n', "no bare CR or LF: %.40s", p);
    }
    cr_assert(eol - p <= 998, "a line should be at most 998 octets");
    if (in_headers) {
      cr_assert(eol - p <= 78, "a header line should fold at 78: %.*s",
                (int)(eol - p), p);
      if (eol == p)
        in_headers = 0;
    }
    p = eol + 2;
  }
}

static int b64val(char c) {
  const char *t =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  const char *p = strchr(t, c);
  return c != '\0' && p != NULL ? (int)(p - t) : -1;
}

/* b64dec decodes base64 (skipping CRLF) and appends to out. */
static size_t b64dec(const char *s, size_t n, char *out) {
  size_t o = 0;
  unsigned v = 0;
  int bits = 0;
  for (size_t i = 0; i < n; i++) {
    int d = b64val(s[i]);
    if (d < 0)
      continue;
    v = (v << 6) | (unsigned)d;
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[o++] = (char)((v >> bits) & 0xFF);
    }
  }
  out[o] = '\0';
  return o;
}

/* decode_words decodes an unstructured value made of =?UTF-8?B?..?= words
 * separated by whitespace. */
static char *decode_words(const char *v) {
  char *out = calloc(1, strlen(v) + 1);
  size_t o = 0;
  while (*v != '\0') {
    const char *s, *e;
    while (*v == ' ' || *v == '\r' || *v == '\n')
      v++;
    if (*v == '\0')
      break;
    cr_assert(strncmp(v, "=?UTF-8?B?", 10) == 0, "an encoded-word: %s", v);
    s = v + 10;
    e = strstr(s, "?=");
    cr_assert(e != NULL);
    cr_assert(e + 2 - v <= 75, "an encoded-word is at most 75 characters");
    o += b64dec(s, (size_t)(e - s), out + o);
    v = e + 2;
  }
  return out;
}

static int qp_hex(char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* qp_decode undoes quoted-printable (soft breaks, =XX). */
static char *qp_decode(const char *s, size_t n) {
  char *out = malloc(n + 1);
  size_t o = 0;
  for (size_t i = 0; i < n; i++) {
    if (s[i] == '=' && i + 2 < n + 1 && s[i + 1] == '\r' && s[i + 2] == '\n') {
      i += 2;
    } else if (s[i] == '=') {
      cr_assert(i + 2 < n && qp_hex(s[i + 1]) >= 0 && qp_hex(s[i + 2]) >= 0,
                "a valid =XX escape");
      out[o++] = (char)(qp_hex(s[i + 1]) * 16 + qp_hex(s[i + 2]));
      i += 2;
    } else {
      out[o++] = s[i];
    }
  }
  out[o] = '\0';
  return out;
}

/* ---- addresses --------------------------------------------------------- */

Test(email_addr, accepts_ordinary_addresses) {
  const char *good[] = {"a@example.com",         "first.last@example.co.uk",
                        "x+tag@sub.example.org", "o'neil@example.ie",
                        "user@localhost",        "user@[192.0.2.1]",
                        "a_b-c@x-y.example"};
  for (size_t i = 0; i < sizeof good / sizeof good[0]; i++)
    cr_expect(pgr_email_valid_addr(good[i]), "%s should be valid", good[i]);
}

Test(email_addr, refuses_malformed_addresses) {
  const char *badv[] = {"",
                        "plain",
                        "@example.com",
                        "a@",
                        "a@@example.com",
                        "a b@example.com",
                        ".a@example.com",
                        "a.@example.com",
                        "a..b@example.com",
                        "a@-example.com",
                        "a@example-.com",
                        "a@exa_mple.com",
                        "a@example..com",
                        "a@example.com.",
                        "a,b@example.com",
                        "a<b@example.com",
                        "a@example.com>",
                        "\"quoted\"@example.com",
                        "j\xc3\xb6rg@example.com",
                        "a\r\n@example.com"};
  for (size_t i = 0; i < sizeof badv / sizeof badv[0]; i++)
    cr_expect(zero(int, pgr_email_valid_addr(badv[i])), "%s should be invalid",
              badv[i]);
}

Test(email_addr, refuses_overlong_parts) {
  char local[80], addr[300];
  memset(local, 'a', 65);
  local[65] = '\0';
  snprintf(addr, sizeof addr, "%s@example.com", local);
  cr_expect(zero(int, pgr_email_valid_addr(addr)),
            "a 65-octet local part is too long");
  local[64] = '\0';
  snprintf(addr, sizeof addr, "%s@example.com", local);
  cr_expect(pgr_email_valid_addr(addr), "64 octets are allowed");
}

Test(email_addr, parses_mailbox_forms) {
  char *name, *addr, err[256];

  cr_assert(eq(
      int,
      pgr_email_parse_mailbox("a@example.com", &name, &addr, err, sizeof err),
      0));
  cr_expect(name == NULL);
  cr_expect(eq(str, addr, "a@example.com"));
  free(addr);

  cr_assert(eq(int,
               pgr_email_parse_mailbox("  Ann Smith  <ann@example.com> ", &name,
                                       &addr, err, sizeof err),
               0));
  cr_expect(eq(str, name, "Ann Smith"));
  cr_expect(eq(str, addr, "ann@example.com"));
  free(name);
  free(addr);

  cr_assert(eq(int,
               pgr_email_parse_mailbox("\"Doe, \\\"J\\\"\" <j@example.com>",
                                       &name, &addr, err, sizeof err),
               0));
  cr_expect(eq(str, name, "Doe, \"J\""));
  free(name);
  free(addr);

  cr_assert(eq(
      int,
      pgr_email_parse_mailbox("<b@example.com>", &name, &addr, err, sizeof err),
      0));
  cr_expect(name == NULL, "an empty display name is no name");
  free(addr);
}

Test(email_addr, refuses_malformed_mailboxes) {
  const char *badv[] = {"Ann <ann@example.com",         "Ann ann@example.com>",
                        "\"Ann <ann@example.com>",      "Ann <>",
                        "a@example.com, b@example.com", "Ann <a@b> x"};
  char *name, *addr, err[256];
  for (size_t i = 0; i < sizeof badv / sizeof badv[0]; i++) {
    cr_expect(
        eq(int, pgr_email_parse_mailbox(badv[i], &name, &addr, err, sizeof err),
           PGR_EINVAL),
        "%s should be refused", badv[i]);
    cr_expect(name == NULL && addr == NULL, "nothing is returned on failure");
    cr_expect(strstr(err, "not a valid email address") != NULL, "%s", err);
  }
}

Test(email_addr, says_cr_lf_in_a_mailbox) {
  char *name, *addr, err[256];
  cr_expect(eq(int,
               pgr_email_parse_mailbox("Ann\r\nBcc: x@y <a@example.com>", &name,
                                       &addr, err, sizeof err),
               PGR_EINVAL));
  cr_expect(strstr(err, "CR or LF") != NULL, "%s", err);
}

/* ---- encodings -------------------------------------------------------------
 */

Test(email_encode, leaves_short_ascii_headers_alone) {
  struct pgr_buf b = {NULL, 0, 0};
  pgr_email_header(&b, "Subject", "Hello, world");
  cr_expect(eq(str, b.data, "Subject: Hello, world\r\n"));
  pgr_buf_free(&b);
}

Test(email_encode, encodes_utf8_as_rfc2047_b_words) {
  struct pgr_buf b = {NULL, 0, 0};
  pgr_email_header(&b, "Subject",
                   "Gr\xc3\xbc\xc3\x9f"
                   "e");
  /* base64("Grüße") = R3LDvMOfZQ== */
  cr_expect(eq(str, b.data, "Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n"));
  pgr_buf_free(&b);
}

Test(email_encode, encodes_text_that_looks_like_an_encoded_word) {
  struct pgr_buf b = {NULL, 0, 0};
  pgr_email_header(&b, "Subject", "=?UTF-8?B?eA==?=");
  cr_expect(strncmp(b.data, "Subject: =?UTF-8?B?", 19) == 0, "%s", b.data);
  cr_expect(strstr(b.data, "eA==") == NULL, "the text itself is encoded");
  pgr_buf_free(&b);
}

Test(email_encode, folds_long_ascii_headers_at_whitespace) {
  struct pgr_buf b = {NULL, 0, 0};
  char value[600] = "", *u;
  for (int i = 0; i < 60; i++)
    strcat(value, i ? " word" : "word");
  pgr_email_header(&b, "Subject", value);
  for (const char *p = b.data; *p != '\0';) {
    const char *eol = strstr(p, "\r\n");
    cr_assert(eol != NULL);
    cr_expect(eol - p <= 78, "each folded line fits 78 columns");
    p = eol + 2;
  }
  u = unfold(b.data);
  cr_expect(strncmp(u, "Subject: ", 9) == 0);
  cr_expect(strncmp(u + 9, value, strlen(value)) == 0,
            "unfolding gives the original text back");
  free(u);
  pgr_buf_free(&b);
}

Test(email_encode, splits_long_utf8_into_words_on_char_boundaries) {
  struct pgr_buf b = {NULL, 0, 0};
  char value[1024] = "", *u, *dec;
  for (int i = 0; i < 100; i++)
    strcat(value, "\xe2\x82\xac"); /* the euro sign, 3 octets */
  strcat(value, " end");
  pgr_email_header(&b, "Subject", value);
  for (const char *p = b.data; *p != '\0';) {
    const char *eol = strstr(p, "\r\n");
    cr_expect(eol - p <= 78, "each line fits 78 columns");
    p = eol + 2;
  }
  u = unfold(b.data);
  dec = decode_words(u + strlen("Subject:"));
  cr_expect(eq(str, dec, value), "the words decode to the original text");
  free(dec);
  free(u);
  pgr_buf_free(&b);
}

Test(email_encode, quoted_printable_follows_rfc2045) {
  struct pgr_buf b = {NULL, 0, 0};
  const char *in = "a=b caf\xc3\xa9 \r\nFrom me\t\r\nend";
  pgr_email_encode_qp(&b, in, strlen(in));
  cr_expect(eq(str, b.data, "a=3Db caf=C3=A9=20\r\n=46rom me=09\r\nend"),
            "got %s", b.data);
  pgr_buf_free(&b);
}

Test(email_encode, quoted_printable_soft_breaks_at_76) {
  struct pgr_buf b = {NULL, 0, 0};
  char line[501], *dec;
  for (int i = 0; i < 500; i++)
    line[i] = i % 7 == 0 ? '=' : 'x';
  line[500] = '\0';
  pgr_email_encode_qp(&b, line, 500);
  for (const char *p = b.data; *p != '\0';) {
    const char *eol = strstr(p, "\r\n");
    if (eol == NULL)
      eol = p + strlen(p);
    cr_expect(eol - p <= 76, "an encoded line is at most 76 characters");
    p = *eol ? eol + 2 : eol;
  }
  dec = qp_decode(b.data, b.len);
  cr_expect(eq(str, dec, line), "decoding gives the input back");
  free(dec);
  pgr_buf_free(&b);
}

Test(email_encode, base64_lines_are_76_characters) {
  struct pgr_buf b = {NULL, 0, 0};
  char in[200], out[201];
  for (int i = 0; i < 200; i++)
    in[i] = (char)(i * 7);
  pgr_email_encode_base64(&b, in, 200);
  cr_expect(strncmp(b.data + 76, "\r\n", 2) == 0, "first line is 76 long");
  cr_expect(eq(sz, b64dec(b.data, b.len, out), 200));
  cr_expect(memcmp(in, out, 200) == 0, "decoding gives the input back");
  pgr_buf_free(&b);
}

Test(email_encode, formats_rfc5322_dates_in_utc) {
  char d[64];
  pgr_email_format_date(d, sizeof d, 1764052380);
  cr_expect(eq(str, d, "Tue, 25 Nov 2025 06:33:00 +0000"));
}

/* ---- whole messages ---------------------------------------------------- */

Test(email_build, builds_a_plain_message) {
  struct pgr_email m;
  char err[512], *v;
  cr_assert(eq(int,
               build("{\"to\": \"Ann <ann@example.com>\", \"subject\": "
                     "\"Hi\", \"text\": \"Hello Ann.\\nBye.\"}",
                     &m, err, sizeof err),
               0),
            "%s", err);
  check_lines(&m);
  cr_expect(eq(str, m.from, "worker@example.org"),
            "the default sender is the envelope sender");
  cr_assert(eq(sz, m.nrcpts, 1));
  cr_expect(eq(str, m.rcpts[0], "ann@example.com"));
  cr_expect(
      eq(str, (v = header_value(&m, "From")), " Worker <worker@example.org>"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "To")), " Ann <ann@example.com>"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "Subject")), " Hi"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "Date")),
               " Tue, 25 Nov 2025 06:33:00 +0000"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "MIME-Version")), " 1.0"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "Content-Type")),
               " text/plain; charset=UTF-8"));
  free(v);
  cr_expect(
      eq(str, (v = header_value(&m, "Content-Transfer-Encoding")), " 7bit"));
  free(v);
  cr_expect(strstr(m.data.data, "\r\n\r\nHello Ann.\r\nBye.\r\n") != NULL,
            "LF line breaks become CRLF");
  pgr_email_free(&m);
}

Test(email_build, derives_the_message_id_from_the_task_id) {
  struct pgr_email m1, m2;
  struct pgr_email_opts o = opts();
  char err[512], *v1, *v2;
  const char *p = "{\"to\": \"a@example.com\", \"text\": \"x\"}";

  cr_assert(eq(int, pgr_email_build(p, &o, &m1, err, sizeof err), 0));
  o.date += 3600; /* a retry an hour later */
  cr_assert(eq(int, pgr_email_build(p, &o, &m2, err, sizeof err), 0));
  cr_expect(eq(str, m1.message_id, "pgrunner.42@mail.example.org"));
  v1 = header_value(&m1, "Message-ID");
  v2 = header_value(&m2, "Message-ID");
  cr_expect(eq(str, v1, " <pgrunner.42@mail.example.org>"));
  cr_expect(eq(str, v1, v2), "a retry carries the same Message-ID");
  free(v1);
  free(v2);
  pgr_email_free(&m1);
  pgr_email_free(&m2);

  o.task_id = 43;
  cr_assert(eq(int, pgr_email_build(p, &o, &m1, err, sizeof err), 0));
  cr_expect(eq(str, m1.message_id, "pgrunner.43@mail.example.org"));
  pgr_email_free(&m1);
}

/* msgid_of builds `payload` with `o` and returns its Message-ID (a new
 * string), or NULL with the reason in err. */
static char *msgid_of(const char *payload, const struct pgr_email_opts *o,
                      char *err, size_t errlen) {
  struct pgr_email m;
  char *id;
  err[0] = '\0';
  if (pgr_email_build(payload, o, &m, err, errlen) != 0)
    return NULL;
  id = header_value(&m, "Message-ID");
  cr_expect(ne(ptr, id, NULL), "the message should have a Message-ID");
  if (id != NULL)
    cr_expect(eq(int, strncmp(id + 2, m.message_id, strlen(m.message_id)), 0),
              "the header carries the message's id");
  pgr_email_free(&m);
  return id;
}

Test(email_build, message_id_without_a_domain_takes_the_senders_domain) {
  struct pgr_email_opts o = opts();
  char err[512], *v;
  const char *p = "{\"to\": \"a@example.com\", \"text\": \"x\"}";

  o.msgid_domain = NULL;
  v = msgid_of(p, &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@example.org>"),
            "the default sender (PGRUNNER_MAIL_FROM) gives the domain");
  free(v);

  o.msgid_domain = ""; /* PGRUNNER_MESSAGE_ID_DOMAIN set but empty */
  v = msgid_of(p, &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@example.org>"), "empty is unset");
  free(v);

  v = msgid_of("{\"to\": \"a@example.com\", \"from\": \"Sales "
               "<sales@shop.example.com>\"}",
               &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@shop.example.com>"),
            "the payload's \"from\" gives the domain over the default");
  free(v);

  o.default_from = NULL;
  v = msgid_of("{\"to\": \"a@example.com\", \"from\": "
               "{\"email\": \"ops@mail.example.net\"}}",
               &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@mail.example.net>"),
            "no default sender needed when the payload has one");
  free(v);
}

Test(email_build, message_id_domain_wins_over_the_sender) {
  struct pgr_email_opts o = opts(); /* msgid_domain = mail.example.org */
  char err[512], *v;

  v = msgid_of("{\"to\": \"a@example.com\"}", &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@mail.example.org>"), "%s", err);
  free(v);
  v = msgid_of("{\"to\": \"a@example.com\", \"from\": "
               "\"sales@shop.example.com\"}",
               &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@mail.example.org>"),
            "PGRUNNER_MESSAGE_ID_DOMAIN wins over the payload's sender");
  free(v);
}

Test(email_build, message_id_is_the_same_on_every_worker) {
  /* Two workers: the same task, settings and payload, built at different
   * times (a retry after a crash); nothing of the machine goes in. */
  struct pgr_email_opts a = opts(), b = opts();
  char err[512], *va, *vb;
  const char *p = "{\"to\": \"a@example.com\"}";

  a.msgid_domain = b.msgid_domain = NULL;
  b.date += 600;
  va = msgid_of(p, &a, err, sizeof err);
  vb = msgid_of(p, &b, err, sizeof err);
  cr_expect(eq(str, va, vb), "a retry elsewhere re-sends the same Message-ID");
  free(va);
  free(vb);
}

Test(email_build, message_id_of_an_address_literal_sender_is_reserved) {
  struct pgr_email_opts o = opts();
  char err[512], *v;

  o.msgid_domain = NULL;
  v = msgid_of("{\"to\": \"a@example.com\", \"from\": "
               "\"ops@[192.0.2.1]\"}",
               &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@pgrunner.invalid>"), "%s", err);
  free(v);
  o.default_from = "ops@[IPv6:2001:db8::1]";
  v = msgid_of("{\"to\": \"a@example.com\"}", &o, err, sizeof err);
  cr_expect(eq(str, v, " <pgrunner.42@pgrunner.invalid>"), "%s", err);
  free(v);
}

Test(email_build, refuses_a_message_id_domain_that_is_not_a_domain) {
  struct pgr_email_opts o = opts();
  char err[512];

  o.msgid_domain = "not a domain";
  cr_expect(eq(
      ptr, msgid_of("{\"to\": \"a@example.com\"}", &o, err, sizeof err), NULL));
  cr_expect(ne(ptr, strstr(err, "Message-ID domain"), NULL), "%s", err);
}

Test(email_build, puts_bcc_in_the_envelope_only) {
  struct pgr_email m;
  char err[512], *v;
  cr_assert(eq(int,
               build("{\"to\": [\"a@example.com\", \"b@example.com\"], "
                     "\"cc\": \"c@example.com\", \"bcc\": "
                     "[\"secret@example.com\", \"A@example.com\"], "
                     "\"text\": \"x\"}",
                     &m, err, sizeof err),
               0),
            "%s", err);
  cr_assert(eq(sz, m.nrcpts, 4), "to, cc and bcc, the duplicate once");
  cr_expect(eq(str, m.rcpts[0], "a@example.com"));
  cr_expect(eq(str, m.rcpts[1], "b@example.com"));
  cr_expect(eq(str, m.rcpts[2], "c@example.com"));
  cr_expect(eq(str, m.rcpts[3], "secret@example.com"));
  cr_expect(strstr(m.data.data, "secret") == NULL,
            "a Bcc address appears nowhere in the message");
  cr_expect(strcasestr(m.data.data, "\nBcc:") == NULL, "no Bcc header");
  cr_expect(
      eq(str, (v = header_value(&m, "To")), " a@example.com, b@example.com"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "Cc")), " c@example.com"));
  free(v);
  pgr_email_free(&m);
}

Test(email_build, bcc_only_gets_undisclosed_recipients) {
  struct pgr_email m;
  char err[512], *v;
  cr_assert(eq(int,
               build("{\"bcc\": \"s@example.com\", \"text\": \"x\"}", &m, err,
                     sizeof err),
               0),
            "%s", err);
  cr_expect(eq(str, (v = header_value(&m, "To")), " undisclosed-recipients:;"));
  free(v);
  pgr_email_free(&m);
}

Test(email_build, builds_multipart_alternative_for_html) {
  struct pgr_email m;
  char err[512], *ct, delim[128], *b1, *b2, *end;
  cr_assert(eq(int,
               build("{\"to\": \"a@example.com\", \"text\": \"plain\", "
                     "\"html\": \"<p>caf\\u00e9</p>\"}",
                     &m, err, sizeof err),
               0),
            "%s", err);
  check_lines(&m);
  ct = header_value(&m, "Content-Type");
  cr_assert(strncmp(ct, " multipart/alternative; boundary=\"", 34) == 0, "%s",
            ct);
  snprintf(delim, sizeof delim, "\r\n--%.*s", (int)(strlen(ct) - 35), ct + 34);
  b1 = strstr(m.data.data, delim);
  cr_assert(b1 != NULL, "the first part starts with the boundary");
  cr_expect(strncmp(b1 + strlen(delim),
                    "\r\nContent-Type: text/plain; charset=UTF-8\r\n", 43) == 0,
            "the plain part comes first");
  b2 = strstr(b1 + 1, delim);
  cr_assert(b2 != NULL);
  cr_expect(strncmp(b2 + strlen(delim),
                    "\r\nContent-Type: text/html; charset=UTF-8\r\n"
                    "Content-Transfer-Encoding: quoted-printable\r\n\r\n"
                    "<p>caf=C3=A9</p>",
                    104) == 0,
            "then the html part, quoted-printable: %.120s", b2);
  end = strstr(b2 + 1, delim);
  cr_assert(end != NULL);
  cr_expect(strcmp(end + strlen(delim), "--\r\n") == 0,
            "the closing delimiter ends the message");
  free(ct);
  pgr_email_free(&m);
}

Test(email_build, html_alone_is_a_single_html_part) {
  struct pgr_email m;
  char err[512], *v;
  cr_assert(eq(int,
               build("{\"to\": \"a@example.com\", \"html\": \"<b>x</b>\"}", &m,
                     err, sizeof err),
               0),
            "%s", err);
  cr_expect(eq(str, (v = header_value(&m, "Content-Type")),
               " text/html; charset=UTF-8"));
  free(v);
  pgr_email_free(&m);
}

Test(email_build, chooses_body_encodings) {
  struct pgr_email m;
  char err[512], *v, payload[8192];

  cr_assert(eq(int,
               build("{\"to\": \"a@example.com\", \"text\": "
                     "\"Gr\\u00fc\\u00dfe aus K\\u00f6ln\"}",
                     &m, err, sizeof err),
               0));
  cr_expect(eq(str, (v = header_value(&m, "Content-Transfer-Encoding")),
               " quoted-printable"),
            "mostly ASCII: quoted-printable");
  free(v);
  pgr_email_free(&m);

  cr_assert(eq(int,
               build("{\"to\": \"a@example.com\", \"text\": "
                     "\"\\u65e5\\u672c\\u8a9e\\u306e\\u6587\"}",
                     &m, err, sizeof err),
               0));
  cr_expect(
      eq(str, (v = header_value(&m, "Content-Transfer-Encoding")), " base64"),
      "mostly non-ASCII: base64");
  free(v);
  check_lines(&m);
  pgr_email_free(&m);

  /* One 3000-character ASCII line cannot go as 7bit. */
  strcpy(payload, "{\"to\": \"a@example.com\", \"text\": \"");
  for (int i = 0; i < 3000; i++)
    strcat(payload, "y");
  strcat(payload, "\"}");
  cr_assert(eq(int, build(payload, &m, err, sizeof err), 0));
  cr_expect(eq(str, (v = header_value(&m, "Content-Transfer-Encoding")),
               " quoted-printable"),
            "a long line: quoted-printable");
  free(v);
  check_lines(&m);
  pgr_email_free(&m);
}

Test(email_build, encodes_utf8_subjects_and_display_names) {
  struct pgr_email m;
  char err[512], *v, *dec;
  cr_assert(eq(int,
               build("{\"to\": \"J\\u00fcrgen M\\u00fcller "
                     "<jm@example.com>\", \"from\": {\"email\": "
                     "\"s@example.com\", \"name\": \"Doe, Jane\"}, "
                     "\"subject\": \"Caf\\u00e9 \\u2615\", \"text\": \"x\"}",
                     &m, err, sizeof err),
               0),
            "%s", err);
  check_lines(&m);
  v = header_value(&m, "Subject");
  dec = decode_words(v);
  cr_expect(eq(str, dec, "Caf\xc3\xa9 \xe2\x98\x95"));
  free(dec);
  free(v);
  v = header_value(&m, "To");
  cr_expect(strncmp(v, " =?UTF-8?B?", 11) == 0, "%s", v);
  cr_expect(strstr(v, " <jm@example.com>") != NULL, "%s", v);
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "From")),
               " \"Doe, Jane\" <s@example.com>"));
  free(v);
  pgr_email_free(&m);
}

Test(email_build, encodes_a_display_name_word_too_long_for_a_line) {
  /* One 1000-letter word: written as an atom it made a 1004-octet line. */
  char payload[1200], name[1001], err[512], *v, *dec;
  struct pgr_email m;
  memset(name, 'x', 1000);
  name[1000] = '\0';
  snprintf(payload, sizeof payload,
           "{\"to\": \"%s <a@example.com>\", \"text\": \"x\"}", name);
  cr_assert(eq(int, build(payload, &m, err, sizeof err), 0), "%s", err);
  check_lines(&m);
  v = header_value(&m, "To");
  cr_assert(strncmp(v, " =?UTF-8?B?", 11) == 0, "%.60s", v);
  *strstr(v, " <a@example.com>") = '\0';
  dec = decode_words(v);
  cr_expect(eq(str, dec, name));
  free(dec);
  free(v);
  pgr_email_free(&m);
}

Test(email_build, adds_custom_headers_and_reply_to) {
  struct pgr_email m;
  char err[512], *v;
  cr_assert(eq(int,
               build("{\"to\": \"a@example.com\", \"reply_to\": "
                     "[\"r1@example.com\", \"r2@example.com\"], "
                     "\"headers\": {\"X-Campaign\": \"autumn 2025\", "
                     "\"List-Unsubscribe\": \"<mailto:u@example.com>\"},"
                     " \"text\": \"x\"}",
                     &m, err, sizeof err),
               0),
            "%s", err);
  cr_expect(eq(str, (v = header_value(&m, "X-Campaign")), " autumn 2025"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "List-Unsubscribe")),
               " <mailto:u@example.com>"));
  free(v);
  cr_expect(eq(str, (v = header_value(&m, "Reply-To")),
               " r1@example.com, r2@example.com"));
  free(v);
  pgr_email_free(&m);
}

Test(email_build, folds_long_recipient_lists) {
  struct pgr_email m;
  char err[512], payload[4096] = "{\"text\": \"x\", \"to\": [";
  for (int i = 0; i < 40; i++) {
    char one[64];
    snprintf(one, sizeof one, "%s\"Person %d <person%d@example.com>\"",
             i ? ", " : "", i, i);
    strcat(payload, one);
  }
  strcat(payload, "]}");
  cr_assert(eq(int, build(payload, &m, err, sizeof err), 0), "%s", err);
  check_lines(&m);
  cr_expect(eq(sz, m.nrcpts, 40));
  pgr_email_free(&m);
}

/* ---- refusals ------------------------------------------------------------ */

/* refused: the payload is refused with a reason containing `want`. */
static void refused(const char *payload, const char *want) {
  struct pgr_email m;
  char err[512];
  cr_expect(eq(int, build(payload, &m, err, sizeof err), PGR_EINVAL),
            "%s should be refused", payload);
  cr_expect(strstr(err, want) != NULL, "reason \"%s\" should mention \"%s\"",
            err, want);
  cr_expect(m.data.data == NULL && m.rcpts == NULL, "nothing is built");
}

Test(email_refuse, cr_or_lf_in_any_header_value) {
  refused("{\"to\": \"a@example.com\", \"subject\": "
          "\"Hi\\r\\nBcc: x@example.com\"}",
          "\"subject\" contains CR or LF");
  refused("{\"to\": \"a@example.com\", \"subject\": \"Hi\\nthere\"}",
          "CR or LF");
  refused("{\"to\": \"a@example.com\\r\\nBcc: x@example.com\"}",
          "\"to\": address contains CR or LF");
  refused("{\"to\": \"a@example.com\", \"cc\": [\"Ann\\r <b@example.com>\"]}",
          "\"cc\"[0]: address contains CR or LF");
  refused("{\"to\": \"a@example.com\", \"headers\": {\"X-A\": \"1\\r\\nX-B: "
          "2\"}}",
          "header X-A contains CR or LF");
  refused("{\"to\": \"a@example.com\", \"from\": {\"email\": "
          "\"s@example.com\", \"name\": \"S\\nT\"}}",
          "CR or LF");
}

Test(email_refuse, malformed_addresses) {
  refused("{\"to\": \"not an address\"}",
          "\"to\": \"not an address\" is not a valid email address");
  refused("{\"to\": [\"a@example.com\", \"b@@example.com\"]}", "\"to\"[1]");
  refused("{\"to\": \"a@example.com\", \"reply_to\": \"x\"}", "\"reply_to\"");
  refused("{\"to\": \"a@example.com\", \"from\": \"nobody\"}", "\"from\"");
}

Test(email_refuse, payloads_of_the_wrong_shape) {
  refused("{\"to\": 42}",
          "\"to\" must be a string or an array of strings, not a number");
  refused("{\"to\": [true]}", "\"to\"[0] must be a string, not a boolean");
  refused("{\"to\": \"a@example.com\", \"subject\": 1}",
          "\"subject\" must be a string, not a number");
  refused("{\"to\": \"a@example.com\", \"text\": [\"x\"]}",
          "\"text\" must be a string");
  refused("{\"to\": \"a@example.com\", \"headers\": [\"x\"]}",
          "\"headers\" must be an object");
  refused("{\"to\": \"a@example.com\", \"headers\": {\"X-N\": 5}}",
          "must be a string");
  refused("[1, 2]", "payload must be a JSON object, not an array");
  refused("{\"to\": ", "payload is not valid JSON");
  refused("{\"to\": \"a@example.com\", \"from\": [\"a@example.com\", "
          "\"b@example.com\"]}",
          "\"from\" must be one address");
}

Test(email_refuse, no_recipient) {
  refused("{\"subject\": \"x\"}", "no recipient");
  refused("{\"to\": [], \"cc\": null, \"bcc\": []}", "no recipient");
}

Test(email_refuse, headers_pgrunner_writes_itself) {
  refused("{\"to\": \"a@example.com\", \"headers\": {\"bcc\": \"x@y.z\"}}",
          "is set by pgrunner");
  refused("{\"to\": \"a@example.com\", \"headers\": {\"Message-ID\": \"<x>\"}}",
          "is set by pgrunner");
  refused("{\"to\": \"a@example.com\", \"headers\": {\"Content-Type\": \"x\"}}",
          "is set by pgrunner");
  refused("{\"to\": \"a@example.com\", \"headers\": {\"Bad Name\": \"x\"}}",
          "not a valid header name");
}

Test(email_refuse, no_sender) {
  struct pgr_email m;
  struct pgr_email_opts o = opts();
  char err[512];
  o.default_from = NULL;
  cr_expect(eq(
      int,
      pgr_email_build("{\"to\": \"a@example.com\"}", &o, &m, err, sizeof err),
      PGR_EINVAL));
  cr_expect(strstr(err, "no sender") != NULL, "%s", err);
  o.default_from = "broken";
  cr_expect(eq(
      int,
      pgr_email_build("{\"to\": \"a@example.com\"}", &o, &m, err, sizeof err),
      PGR_EINVAL));
  cr_expect(strstr(err, "PGRUNNER_MAIL_FROM") != NULL, "%s", err);
}

Test(email_refuse, error_messages_are_printable) {
  struct pgr_email m;
  char err[512];
  cr_expect(eq(int, build("{\"to\": \"\\u00e9\\u0001x\"}", &m, err, sizeof err),
               PGR_EINVAL));
  for (const char *p = err; *p != '\0'; p++)
    cr_expect(p[0] >= 32 && p[0] < 127, "only printable ASCII in %s", err);
}

Test(email_refuse, unknown_keys_are_ignored) {
  struct pgr_email m;
  char err[512];
  cr_expect(eq(int,
               build("{\"to\": \"a@example.com\", \"priority\": 3}", &m, err,
                     sizeof err),
               0),
            "%s", err);
  pgr_email_free(&m);
}

/* ---- the handler, without a server ------------------------------------- */

struct fake_job {
  struct pgr_job job;
  struct pgr_task task;
  char failed[1024];
  int nfail;
};

static void fake_log(struct pgr_job *job, enum pgr_level level,
                     const char *msg) {
  (void)job;
  (void)level;
  (void)msg;
}

static void fake_fail(struct pgr_job *job, const char *msg) {
  struct fake_job *f = pgr_container_of(job, struct fake_job, job);
  snprintf(f->failed, sizeof f->failed, "%s", msg);
  f->nfail++;
}

static enum pgr_outcome run_handler(struct fake_job *f, const char *payload) {
  /* Port 1 of localhost refuses connections: had the handler tried to
   * send, the outcome would be PGR_RETRY, not PGR_PERMANENT. */
  struct pgr_smtp_config cfg = {.host = "127.0.0.1",
                                .port = 1,
                                .mail_from = "w@example.org",
                                .message_id_domain = "example.org",
                                .timeout_s = 1};
  memset(f, 0, sizeof *f);
  f->task.id = 5;
  f->task.kind = "email";
  f->task.queue = "default";
  f->task.payload = payload;
  f->task.attempt = 1;
  f->task.max_attempts = 5;
  f->job.task = &f->task;
  f->job.log = fake_log;
  f->job.fail = fake_fail;
  return pgr_email_handler(&f->job, &cfg);
}

Test(email_handler, fails_a_bad_payload_for_good_without_connecting) {
  struct fake_job f;
  cr_expect(eq(int,
               run_handler(&f, "{\"to\": \"a@example.com\", \"subject\": "
                               "\"x\\r\\nBcc: b@example.com\"}"),
               PGR_PERMANENT));
  cr_expect(eq(int, f.nfail, 1), "the reason is recorded once");
  cr_expect(eq(str, f.failed,
               "invalid email payload: \"subject\" contains CR or LF"));
}

Test(email_handler, retries_when_the_server_is_unreachable) {
  struct fake_job f;
  cr_expect(eq(int, run_handler(&f, "{\"to\": \"a@example.com\"}"), PGR_RETRY));
  cr_expect(strstr(f.failed, "Connection refused") != NULL, "%s", f.failed);
}

/* The SMTP settings are checked once at start (pgr_email_check_config). */
Test(email_config, accepts_good_settings_and_unset_ones) {
  struct pgr_smtp_config c = {0};
  char err[256] = "";
  cr_assert(eq(int, pgr_email_check_config(&c, err, sizeof err), 0), "%s", err);
  c.host = "mail.example.com";
  c.helo_domain = "worker-1.example.com";
  c.message_id_domain = "example.com";
  c.mail_from = "Ops Team <ops@example.com>";
  c.user = "mailer";
  c.password = "secret";
  cr_assert(eq(int, pgr_email_check_config(&c, err, sizeof err), 0), "%s", err);
  c.host = "192.0.2.7";
  cr_assert(eq(int, pgr_email_check_config(&c, err, sizeof err), 0), "%s", err);
}

Test(email_config, refuses_each_bad_setting_naming_it) {
  static char long_secret[300];
  memset(long_secret, 'p', sizeof long_secret - 1);
  const struct {
    size_t off;
    const char *value, *expect;
  } cases[] = {
      {offsetof(struct pgr_smtp_config, host), "mail:25", "PGRUNNER_SMTP_HOST"},
      {offsetof(struct pgr_smtp_config, host), "a b", "PGRUNNER_SMTP_HOST"},
      {offsetof(struct pgr_smtp_config, helo_domain), "-bad-.example",
       "PGRUNNER_SMTP_HELO"},
      {offsetof(struct pgr_smtp_config, message_id_domain), "x\r\ny",
       "PGRUNNER_MESSAGE_ID_DOMAIN"},
      {offsetof(struct pgr_smtp_config, mail_from), "nobody",
       "PGRUNNER_MAIL_FROM"},
      {offsetof(struct pgr_smtp_config, password), long_secret,
       "PGRUNNER_SMTP_PASSWORD"},
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    struct pgr_smtp_config c = {0};
    char err[256] = "";
    *(const char **)((char *)&c + cases[i].off) = cases[i].value;
    cr_assert(ne(int, pgr_email_check_config(&c, err, sizeof err), 0),
              "case %zu accepted", i);
    cr_assert(ne(ptr, strstr(err, cases[i].expect), NULL), "case %zu: %s", i,
              err);
    cr_assert(eq(ptr, strstr(err, "ppppp"), NULL), "password shown: %s", err);
  }
}
