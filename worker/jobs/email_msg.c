/*
 * email_msg.c - the `email` payload -> one RFC 5322 message and its
 * envelope: parsing, validation, RFC 2047 header encoding, RFC 2045 body
 * encoding and header assembly. No I/O.
 *
 * Thread: any (pure functions). Ownership: see email_msg.h.
 *
 * Why everything is encoded down to 7 bits: libESMTP sends the message as
 * it is given (it only dot-stuffs and fills in missing headers), and a 7-bit
 * message needs neither the 8BITMIME nor the SMTPUTF8 extension, so it goes
 * through any server. Why the headers are all written here: libESMTP adds
 * Date, From and Message-Id only when the message lacks them (headers.c,
 * missing_header()), so a message that carries its own is sent unchanged,
 * and the Message-ID stays the one derived from the task id.
 */
#include "jobs/email_msg.h"

#include "config.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include <jansson.h>
#include <openssl/evp.h>

/* RFC 5322 2.1.1: lines SHOULD stay within 78 characters, MUST within 998. */
#define LINE_SOFT 78
#define LINE_HARD 998

/* Input bytes per "=?UTF-8?B?...?=" word: 12 + 52 = 64 characters, so a
 * word fits on a line after "Subject: " or a folding space (RFC 2047 2: an
 * encoded-word is at most 75 characters). */
#define EW_BYTES 39
/* The longest word of a display name written as it is: with "Reply-To: "
 * before it, it still fits in 78 columns. Longer words are encoded. */
#define MAX_ATOM 60

struct mbox {
  char *name; /* display name, NULL if none */
  char *addr;
};

struct mlist {
  struct mbox *v;
  size_t n;
};

/* ---- errors ---------------------------------------------------------- */

/* bad writes the reason for a permanent failure and returns PGR_EINVAL. */
static int bad(char *errbuf, size_t errlen, const char *fmt, ...)
    PGR_PRINTF(3, 4);
static int bad(char *errbuf, size_t errlen, const char *fmt, ...) {
  va_list ap;
  if (errbuf != NULL && errlen > 0) {
    va_start(ap, fmt);
    vsnprintf(errbuf, errlen, fmt, ap);
    va_end(ap);
  }
  return PGR_EINVAL;
}

/*
 * shown copies user text into out for an error message: printable ASCII
 * only (last_error must be printable, and valid UTF-8 for PostgreSQL), at
 * most ~60 characters, with C-style escapes for the rest.
 */
static const char *shown(const char *s, char *out, size_t n) {
  size_t o = 0;
  PGR_ASSERT(n >= 16);
  for (; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    char tmp[8];
    size_t tl;
    if (c == '\r')
      tl = (size_t)snprintf(tmp, sizeof tmp, "\\r");
    else if (c == '\n')
      tl = (size_t)snprintf(tmp, sizeof tmp, "\\n");
    else if (c == '"' || c == '\\')
      tl = (size_t)snprintf(tmp, sizeof tmp, "\\%c", c);
    else if (c < 32 || c >= 127)
      tl = (size_t)snprintf(tmp, sizeof tmp, "\\x%02x", c);
    else
      tl = (size_t)snprintf(tmp, sizeof tmp, "%c", c);
    if (o + tl + 4 >= n) {
      memcpy(out + o, "...", 3);
      o += 3;
      break;
    }
    memcpy(out + o, tmp, tl);
    o += tl;
  }
  out[o] = '\0';
  return out;
}

/* ---- addresses ------------------------------------------------------- */

/* RFC 5322 3.2.3 atext. */
static int is_atext(unsigned char c) {
  if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
      (c >= '0' && c <= '9'))
    return 1;
  return c != '\0' && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL;
}

static int valid_domain(const char *d, size_t n) {
  size_t label = 0;
  if (n == 0 || n > 253)
    return 0;
  if (d[0] == '[') {
    /* An address literal, "[192.0.2.1]" or "[IPv6:...]". */
    if (n < 3 || d[n - 1] != ']')
      return 0;
    for (size_t i = 1; i + 1 < n; i++) {
      unsigned char c = (unsigned char)d[i];
      if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') ||
            (c >= 'A' && c <= 'Z') || c == '.' || c == ':'))
        return 0;
    }
    return 1;
  }
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)d[i];
    if (c == '.') {
      if (label == 0 || d[i - 1] == '-')
        return 0;
      label = 0;
    } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               (c >= '0' && c <= '9') || c == '-') {
      if (label == 0 && c == '-')
        return 0;
      if (++label > 63)
        return 0;
    } else {
      return 0;
    }
  }
  return label > 0 && d[n - 1] != '-';
}

int pgr_email_valid_addr(const char *addr) {
  const char *at = strrchr(addr, '@');
  size_t local, total = strlen(addr);
  int after_dot = 1;

  /* RFC 5321 4.5.3.1: local part <= 64 octets, a path <= 256 with its
   * angle brackets. Quoted local parts and UTF-8 (SMTPUTF8) are refused:
   * neither is needed in practice and both complicate every hop. */
  if (at == NULL || at == addr || total > 254)
    return 0;
  local = (size_t)(at - addr);
  if (local > 64)
    return 0;
  for (size_t i = 0; i < local; i++) {
    unsigned char c = (unsigned char)addr[i];
    if (c == '.') {
      if (after_dot)
        return 0;
      after_dot = 1;
    } else if (is_atext(c)) {
      after_dot = 0;
    } else {
      return 0;
    }
  }
  if (after_dot)
    return 0;
  return valid_domain(at + 1, strlen(at + 1));
}

static int has_crlf(const char *s) {
  return strpbrk(s, "\r\n") != NULL;
}

static int is_space(char c) {
  return c == ' ' || c == '\t';
}

static int not_an_address(const char *s, char *errbuf, size_t errlen) {
  char sh[96];
  return bad(errbuf, errlen, "\"%s\" is not a valid email address",
             shown(s, sh, sizeof sh));
}

int pgr_email_parse_mailbox(const char *s, char **name, char **addr,
                            char *errbuf, size_t errlen) {
  const char *p = s, *q = s + strlen(s);
  const char *a0, *a1, *n0 = NULL, *n1 = NULL;
  char sh[96];
  int rc;

  *name = *addr = NULL;
  if (has_crlf(s))
    return bad(errbuf, errlen, "address contains CR or LF");
  while (p < q && is_space(*p))
    p++;
  while (q > p && is_space(q[-1]))
    q--;
  if (q > p && q[-1] == '>') {
    const char *lt = NULL;
    for (const char *r = q - 1; r > p; r--)
      if (r[-1] == '<') {
        lt = r - 1;
        break;
      }
    if (lt == NULL) {
      rc = not_an_address(s, errbuf, errlen);
      goto out;
    }
    a0 = lt + 1;
    a1 = q - 1;
    n0 = p;
    n1 = lt;
    while (n1 > n0 && is_space(n1[-1]))
      n1--;
  } else {
    a0 = p;
    a1 = q;
  }

  *addr = pgr_strndup(a0, (size_t)(a1 - a0));
  if (!pgr_email_valid_addr(*addr)) {
    rc = not_an_address(s, errbuf, errlen);
    goto out;
  }

  if (n0 != NULL && n1 > n0) {
    struct pgr_buf nb = {NULL, 0, 0};
    if (*n0 == '"') {
      /* A quoted-string: strip the quotes, undo the backslash escapes. */
      if (n1 - n0 < 2 || n1[-1] != '"') {
        rc = not_an_address(s, errbuf, errlen);
        goto out;
      }
      for (const char *r = n0 + 1; r < n1 - 1; r++) {
        if (*r == '\\' && r + 1 < n1 - 1)
          r++;
        else if (*r == '"' || *r == '\\') {
          pgr_buf_free(&nb);
          rc = not_an_address(s, errbuf, errlen);
          goto out;
        }
        pgr_buf_addc(&nb, *r);
      }
    } else {
      pgr_buf_add(&nb, n0, (size_t)(n1 - n0));
    }
    if (nb.data == NULL)
      pgr_buf_add(&nb, "", 0);
    for (const char *r = nb.data; *r != '\0'; r++)
      if ((unsigned char)*r < 32 && *r != '\t') {
        pgr_buf_free(&nb);
        rc = bad(errbuf, errlen,
                 "display name of \"%s\" contains a control character",
                 shown(s, sh, sizeof sh));
        goto out;
      }
    if (nb.len > 0)
      *name = nb.data;
    else
      pgr_buf_free(&nb);
  }
  return 0;

out:
  free(*addr);
  free(*name);
  *addr = *name = NULL;
  return rc;
}

/* ---- header writing --------------------------------------------------- */

/* A header being written: where its current line starts, so tokens can be
 * folded before they would cross 78 columns. */
struct hw {
  struct pgr_buf *b;
  size_t line_start;
  size_t min_col; /* never fold right after "Name:" */
};

static size_t hw_col(const struct hw *w) {
  return w->b->len - w->line_start;
}

static void hw_begin(struct hw *w, struct pgr_buf *b, const char *name) {
  w->b = b;
  w->line_start = b->len;
  pgr_buf_adds(b, name);
  pgr_buf_addc(b, ':');
  w->min_col = hw_col(w);
}

/*
 * hw_token appends whitespace ws then token tok, first folding (CRLF before
 * the whitespace, RFC 5322 2.2.3) when the line would pass 78 columns. No
 * fold without whitespace to fold at, and none before a bare trailing
 * whitespace run: a folded line may not be whitespace only.
 */
static void hw_token(struct hw *w, const char *ws, size_t wsn, const char *tok,
                     size_t n) {
  if (wsn > 0 && n > 0 && hw_col(w) > w->min_col &&
      hw_col(w) + wsn + n > LINE_SOFT) {
    pgr_buf_add(w->b, "\r\n", 2);
    w->line_start = w->b->len;
  }
  pgr_buf_add(w->b, ws, wsn);
  pgr_buf_add(w->b, tok, n);
}

static void hw_end(struct hw *w) {
  pgr_buf_add(w->b, "\r\n", 2);
}

/* b64_raw appends the base64 of s (no line breaks), in slices of a whole
   number of 3-byte groups, so only the last one is padded. */
static void b64_raw(struct pgr_buf *b, const unsigned char *s, size_t n) {
  unsigned char out[4 * 48 / 3 + 1]; /* EVP_EncodeBlock adds a NUL */
  while (n > 0) {
    int k = n < 48 ? (int)n : 48;
    int m = EVP_EncodeBlock(out, s, k);
    pgr_buf_add(b, (const char *)out, (size_t)m);
    s += k;
    n -= (size_t)k;
  }
}

/*
 * hw_encoded writes text as RFC 2047 B encoded-words of whole UTF-8
 * characters, each its own token, so they fold between words. Decoders drop
 * the whitespace between adjacent encoded-words (RFC 2047 6.2).
 */
static void hw_encoded(struct hw *w, const char *text) {
  size_t n = strlen(text), i = 0;
  struct pgr_buf word = {NULL, 0, 0};
  do {
    size_t j = i;
    while (j < n) {
      /* jansson passes valid UTF-8 only; a stray byte goes alone. */
      size_t cl = pgr_utf8_len((const unsigned char *)text + j, n - j);
      if (cl == 0)
        cl = 1;
      if (j > i && j + cl - i > EW_BYTES)
        break;
      j += cl;
    }
    word.len = 0;
    pgr_buf_adds(&word, "=?UTF-8?B?");
    b64_raw(&word, (const unsigned char *)text + i, j - i);
    pgr_buf_adds(&word, "?=");
    hw_token(w, " ", 1, word.data, word.len);
    i = j;
  } while (i < n);
  pgr_buf_free(&word);
}

/* printable ASCII or tab: may appear in a header as it is. */
static int plain_text(const char *s) {
  for (; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    if ((c < 32 && c != '\t') || c >= 127)
      return 0;
  }
  return 1;
}

void pgr_email_header(struct pgr_buf *b, const char *name, const char *value) {
  struct hw w;
  int encode = !plain_text(value) || strstr(value, "=?") != NULL;

  /* A word too long to fold under 998 octets gets encoded too. */
  if (!encode) {
    size_t run = 0;
    for (const char *p = value; *p != '\0'; p++) {
      run = is_space(*p) ? 0 : run + 1;
      if (run > LINE_HARD - strlen(name) - 4) {
        encode = 1;
        break;
      }
    }
  }

  hw_begin(&w, b, name);
  if (encode) {
    hw_encoded(&w, value);
  } else {
    /* Tokens are (whitespace run, word) pairs of " " + value, so the
     * original whitespace is kept and every fold lands on it. */
    const char *p = value;
    int first = 1;
    do {
      const char *ws = p, *word;
      while (is_space(*p))
        p++;
      word = p;
      while (*p != '\0' && !is_space(*p))
        p++;
      if (first) {
        struct pgr_buf t = {NULL, 0, 0};
        pgr_buf_addc(&t, ' ');
        pgr_buf_add(&t, ws, (size_t)(p - ws));
        hw_token(&w, "", 0, t.data, t.len);
        pgr_buf_free(&t);
        first = 0;
      } else {
        hw_token(&w, ws, (size_t)(word - ws), word, (size_t)(p - word));
      }
    } while (*p != '\0');
  }
  hw_end(&w);
}

/* hw_phrase writes a display name: atoms as they are, a quoted-string
 * when it has specials, encoded-words when it is not plain ASCII. */
static void hw_phrase(struct hw *w, const char *name) {
  size_t n = strlen(name), run = 0;
  int atoms = 1, quotable = plain_text(name) && n <= 64;

  /* A word that would not fit on a line is encoded: written as it is, a
   * long one made a line of more than 998 octets. */
  for (const char *p = name; *p != '\0'; p++) {
    if (!is_atext((unsigned char)*p) && *p != ' ')
      atoms = 0;
    run = *p == ' ' ? 0 : run + 1;
    if (run > MAX_ATOM)
      atoms = 0;
  }
  if (atoms && plain_text(name) && strstr(name, "=?") == NULL) {
    const char *p = name;
    while (*p != '\0') {
      const char *word;
      while (*p == ' ')
        p++;
      word = p;
      while (*p != '\0' && *p != ' ')
        p++;
      if (p > word)
        hw_token(w, " ", 1, word, (size_t)(p - word));
    }
  } else if (quotable) {
    struct pgr_buf q = {NULL, 0, 0};
    pgr_buf_addc(&q, '"');
    for (const char *p = name; *p != '\0'; p++) {
      if (*p == '"' || *p == '\\')
        pgr_buf_addc(&q, '\\');
      pgr_buf_addc(&q, *p);
    }
    pgr_buf_addc(&q, '"');
    hw_token(w, " ", 1, q.data, q.len);
    pgr_buf_free(&q);
  } else {
    hw_encoded(w, name);
  }
}

static void header_mboxes(struct pgr_buf *b, const char *hname,
                          const struct mbox *v, size_t n) {
  struct hw w;
  struct pgr_buf t = {NULL, 0, 0};

  hw_begin(&w, b, hname);
  for (size_t i = 0; i < n; i++) {
    pgr_buf_add(&t, "", 0);
    t.len = 0;
    if (v[i].name != NULL) {
      hw_phrase(&w, v[i].name);
      pgr_buf_printf(&t, "<%s>", v[i].addr);
    } else {
      pgr_buf_adds(&t, v[i].addr);
    }
    if (i + 1 < n)
      pgr_buf_addc(&t, ',');
    hw_token(&w, " ", 1, t.data, t.len);
  }
  hw_end(&w);
  pgr_buf_free(&t);
}

/* ---- bodies ------------------------------------------------------------ */

enum cte { CTE_7BIT, CTE_QP, CTE_BASE64 };

static const char *cte_name(enum cte c) {
  switch (c) {
  case CTE_7BIT:
    return "7bit";
  case CTE_QP:
    return "quoted-printable";
  case CTE_BASE64:
    return "base64";
  }
  return "7bit";
}

/* crlf copies s with every CRLF, lone CR and lone LF made CRLF. */
static void crlf(struct pgr_buf *out, const char *s) {
  pgr_buf_add(out, "", 0);
  for (; *s != '\0'; s++) {
    if (*s == '\r') {
      if (s[1] == '\n')
        s++;
      pgr_buf_add(out, "\r\n", 2);
    } else if (*s == '\n') {
      pgr_buf_add(out, "\r\n", 2);
    } else {
      pgr_buf_addc(out, *s);
    }
  }
}

/*
 * choose_cte picks the transfer encoding of a CRLF-normalised body: 7bit
 * when it already is short-lined printable ASCII, base64 when more than
 * half of it is non-ASCII (Cyrillic, Greek, CJK text), else quoted-printable,
 * which keeps mostly-Latin text readable.
 */
static enum cte choose_cte(const char *s, size_t n, const char *boundary) {
  size_t high = 0, line = 0;
  int plain = 1;
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    if (c == '\r' && i + 1 < n && s[i + 1] == '\n') {
      /* Trailing whitespace may be stripped in transit, and an mbox on
       * the way turns "From " into ">From ": quoted-printable keeps both. */
      if (line > 0 && is_space(s[i - 1]))
        plain = 0;
      line = 0;
      i++;
      continue;
    }
    if (line == 0 && n - i >= 5 && memcmp(s + i, "From ", 5) == 0)
      plain = 0;
    if (c >= 0x80) {
      high++;
      plain = 0;
    } else if ((c < 32 && c != '\t') || c == 127) {
      plain = 0;
    }
    if (++line > LINE_HARD)
      plain = 0;
  }
  if (n > 0 && is_space(s[n - 1]))
    plain = 0;
  if (plain && (boundary == NULL || strstr(s, boundary) == NULL))
    return CTE_7BIT;
  return high * 2 > n ? CTE_BASE64 : CTE_QP;
}

void pgr_email_encode_qp(struct pgr_buf *b, const char *s, size_t n) {
  size_t col = 0;
  pgr_buf_add(b, "", 0);
  for (size_t i = 0; i < n; i++) {
    unsigned char c = (unsigned char)s[i];
    char enc[4];
    size_t elen;
    int eol;

    if (c == '\r' && i + 1 < n && s[i + 1] == '\n') {
      pgr_buf_add(b, "\r\n", 2);
      col = 0;
      i++;
      continue;
    }
    eol = i + 1 == n || (s[i + 1] == '\r' && i + 2 < n && s[i + 2] == '\n');
    /* Rule 3: whitespace at the end of a line is encoded, as it would be
     * stripped in transit. "From " at a line start is encoded too, so an
     * mbox on the way cannot mangle it into ">From ". */
    if (((c >= 33 && c <= 126 && c != '=') || (is_space((char)c) && !eol)) &&
        !(col == 0 && c == 'F' && n - i >= 5 &&
          memcmp(s + i, "From ", 5) == 0)) {
      enc[0] = (char)c;
      elen = 1;
    } else {
      snprintf(enc, sizeof enc, "=%02X", c);
      elen = 3;
    }
    /* Rule 5: encoded lines are at most 76 characters, a soft break's "="
     * included. */
    if (col + elen > (eol ? 76u : 75u)) {
      pgr_buf_add(b, "=\r\n", 3);
      col = 0;
    }
    pgr_buf_add(b, enc, elen);
    col += elen;
  }
}

void pgr_email_encode_base64(struct pgr_buf *b, const char *s, size_t n) {
  pgr_buf_add(b, "", 0);
  for (size_t i = 0; i < n; i += 57) {
    if (i > 0)
      pgr_buf_add(b, "\r\n", 2);
    b64_raw(b, (const unsigned char *)s + i, n - i < 57 ? n - i : 57);
  }
}

/* add_part writes a part's Content-* headers, the blank line and the
 * encoded body, without a final CRLF. */
static void add_part(struct pgr_buf *b, const char *type, const char *text,
                     const char *boundary) {
  struct pgr_buf norm = {NULL, 0, 0};
  enum cte cte;

  crlf(&norm, text);
  cte = choose_cte(norm.data, norm.len, boundary);
  pgr_buf_printf(b,
                 "Content-Type: %s; charset=UTF-8\r\n"
                 "Content-Transfer-Encoding: %s\r\n\r\n",
                 type, cte_name(cte));
  switch (cte) {
  case CTE_7BIT:
    pgr_buf_add(b, norm.data, norm.len);
    break;
  case CTE_QP:
    pgr_email_encode_qp(b, norm.data, norm.len);
    break;
  case CTE_BASE64:
    pgr_email_encode_base64(b, norm.data, norm.len);
    break;
  }
  pgr_buf_free(&norm);
}

/* ---- dates ------------------------------------------------------------- */

void pgr_email_format_date(char *buf, size_t len, int64_t t) {
  static const char days[7][4] = {"Sun", "Mon", "Tue", "Wed",
                                  "Thu", "Fri", "Sat"};
  static const char months[12][4] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                     "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
  time_t tt = (time_t)t;
  struct tm tm;
  /* Names spelled out here: strftime's %a and %b follow the locale. */
  gmtime_r(&tt, &tm);
  snprintf(buf, len, "%s, %d %s %04d %02d:%02d:%02d +0000", days[tm.tm_wday],
           tm.tm_mday, months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour,
           tm.tm_min, tm.tm_sec);
}

/* ---- the payload --------------------------------------------------------- */

static void mlist_free(struct mlist *l) {
  for (size_t i = 0; i < l->n; i++) {
    free(l->v[i].name);
    free(l->v[i].addr);
  }
  free(l->v);
  l->v = NULL;
  l->n = 0;
}

/*
 * one_mbox reads one mailbox: a string ("a@x", "Name <a@x>") or an object
 * {"email": "a@x", "name": "Name"} (handy for names with quotes or commas).
 * `what` names it in errors, e.g. "\"to\"[2]".
 */
static int one_mbox(const json_t *v, const char *what, struct mbox *out,
                    char *errbuf, size_t errlen) {
  char reason[256];
  const char *s;

  out->name = out->addr = NULL;
  if (json_is_string(v)) {
    s = json_string_value(v);
    if (pgr_email_parse_mailbox(s, &out->name, &out->addr, reason,
                                sizeof reason) != 0)
      return bad(errbuf, errlen, "%s: %s", what, reason);
    return 0;
  }
  if (json_is_object(v)) {
    const json_t *e = json_object_get(v, "email");
    const json_t *n = json_object_get(v, "name");
    char sh[96];
    if (!json_is_string(e))
      return bad(errbuf, errlen, "%s must have an \"email\" string", what);
    if (n != NULL && !json_is_null(n) && !json_is_string(n))
      return bad(errbuf, errlen, "%s.name must be a string, not %s", what,
                 pgr_json_kind(n));
    s = json_string_value(e);
    if (has_crlf(s))
      return bad(errbuf, errlen, "%s: address contains CR or LF", what);
    if (!pgr_email_valid_addr(s))
      return bad(errbuf, errlen, "%s: \"%s\" is not a valid email address",
                 what, shown(s, sh, sizeof sh));
    if (json_is_string(n)) {
      const char *nm = json_string_value(n);
      if (has_crlf(nm))
        return bad(errbuf, errlen, "%s: display name contains CR or LF", what);
      if (!plain_text(nm))
        for (const char *p = nm; *p != '\0'; p++)
          if ((unsigned char)*p < 32 && *p != '\t')
            return bad(errbuf, errlen,
                       "%s: display name contains a control character", what);
      if (*nm != '\0')
        out->name = pgr_strdup(nm);
    }
    out->addr = pgr_strdup(s);
    return 0;
  }
  return bad(errbuf, errlen, "%s must be a string, not %s", what,
             pgr_json_kind(v));
}

/* get_list reads key as a mailbox or an array of them; absent or null: an
 * empty list. */
static int get_list(const json_t *root, const char *key, struct mlist *l,
                    char *errbuf, size_t errlen) {
  const json_t *v = json_object_get(root, key);
  char what[64];
  int rc;

  l->v = NULL;
  l->n = 0;
  if (v == NULL || json_is_null(v))
    return 0;
  if (json_is_string(v) || json_is_object(v)) {
    l->v = pgr_calloc(1, sizeof *l->v);
    snprintf(what, sizeof what, "\"%s\"", key);
    if ((rc = one_mbox(v, what, &l->v[0], errbuf, errlen)) != 0) {
      mlist_free(l);
      return rc;
    }
    l->n = 1;
    return 0;
  }
  if (!json_is_array(v))
    return bad(errbuf, errlen,
               "\"%s\" must be a string or an array of strings, not %s", key,
               pgr_json_kind(v));
  l->v = pgr_calloc(json_array_size(v), sizeof *l->v);
  for (size_t i = 0; i < json_array_size(v); i++) {
    snprintf(what, sizeof what, "\"%s\"[%zu]", key, i);
    if ((rc = one_mbox(json_array_get(v, i), what, &l->v[i], errbuf, errlen)) !=
        0) {
      mlist_free(l);
      return rc;
    }
    l->n = i + 1;
  }
  return 0;
}

/* get_text reads an optional string; CR and LF are refused when the string
 * goes into a header. */
static int get_text(const json_t *root, const char *key, int header,
                    const char **out, char *errbuf, size_t errlen) {
  const json_t *v = json_object_get(root, key);
  *out = NULL;
  if (v == NULL || json_is_null(v))
    return 0;
  if (!json_is_string(v))
    return bad(errbuf, errlen, "\"%s\" must be a string, not %s", key,
               pgr_json_kind(v));
  *out = json_string_value(v);
  if (header && has_crlf(*out))
    return bad(errbuf, errlen, "\"%s\" contains CR or LF", key);
  return 0;
}

/* Headers pgrunner writes itself, or that only MTAs may add. The name has
 * passed valid_header_name(), so it is short printable ASCII. */
static int reserved_header(const char *name) {
  static const char names[] =
      " from to cc bcc reply-to subject date message-id mime-version"
      " return-path received sender original-recipient ";
  char key[96];
  size_t n = 0;

  if (strncasecmp(name, "content-", 8) == 0 ||
      strncasecmp(name, "resent-", 7) == 0)
    return 1;
  key[n++] = ' ';
  for (; *name != '\0' && n + 2 < sizeof key; name++)
    key[n++] = (char)((*name >= 'A' && *name <= 'Z') ? *name + 32 : *name);
  key[n++] = ' ';
  key[n] = '\0';
  return strstr(names, key) != NULL;
}

/* RFC 5322 3.6.8: a field name is printable ASCII but ':'. */
static int valid_header_name(const char *s) {
  size_t n = strlen(s);
  if (n == 0 || n > 76)
    return 0;
  for (; *s != '\0'; s++)
    if ((unsigned char)*s < 33 || (unsigned char)*s > 126 || *s == ':')
      return 0;
  return 1;
}

static int check_headers(const json_t *h, char *errbuf, size_t errlen) {
  const char *k;
  json_t *v;
  char sh[96];

  if (h == NULL || json_is_null(h))
    return 0;
  if (!json_is_object(h))
    return bad(errbuf, errlen, "\"headers\" must be an object, not %s",
               pgr_json_kind(h));
  json_object_foreach((json_t *)h, k, v) {
    if (!valid_header_name(k))
      return bad(errbuf, errlen,
                 "\"headers\": \"%s\" is not a valid header name",
                 shown(k, sh, sizeof sh));
    if (reserved_header(k))
      return bad(errbuf, errlen,
                 "\"headers\": %s is set by pgrunner; use the payload's "
                 "own keys (to, cc, from, reply_to, subject)",
                 k);
    if (!json_is_string(v))
      return bad(errbuf, errlen, "\"headers\".%s must be a string, not %s", k,
                 pgr_json_kind(v));
    if (has_crlf(json_string_value(v)))
      return bad(errbuf, errlen, "header %s contains CR or LF", k);
  }
  return 0;
}

static int seen_rcpt(const struct pgr_email *m, const char *addr) {
  for (size_t i = 0; i < m->nrcpts; i++)
    if (strcasecmp(m->rcpts[i], addr) == 0)
      return 1;
  return 0;
}

static void add_rcpts(struct pgr_email *m, const struct mlist *l) {
  for (size_t i = 0; i < l->n; i++) {
    if (seen_rcpt(m, l->v[i].addr))
      continue;
    m->rcpts = pgr_realloc(m->rcpts, (m->nrcpts + 1) * sizeof *m->rcpts);
    m->rcpts[m->nrcpts++] = pgr_strdup(l->v[i].addr);
  }
}

/* FNV-1a, for a boundary that is the same on every retry of a task. */
static uint64_t fnv1a(uint64_t h, const char *s) {
  for (; s != NULL && *s != '\0'; s++) {
    h ^= (unsigned char)*s;
    h *= 1099511628211u;
  }
  return h;
}

/*
 * msgid_domain returns the right-hand side of the Message-ID. The SPEC
 * derives the Message-ID from the task id so that a retry re-sends the same
 * one; a retry may run on another worker, so without a configured domain
 * the sender's is used, which every worker computes alike from the payload
 * and PGRUNNER_MAIL_FROM. An address literal ("[192.0.2.1]") would be
 * allowed (RFC 5322 3.6.4) but names a machine, not a domain; the reserved
 * "pgrunner.invalid" (RFC 2606) stands in for it. The sender was
 * validated, so the fallback is for an address literal only.
 */
static const char *msgid_domain(const struct pgr_email_opts *opts,
                                const char *from) {
  const char *at = strrchr(from, '@');
  if (opts->msgid_domain != NULL && *opts->msgid_domain != '\0')
    return opts->msgid_domain;
  if (at == NULL || at[1] == '[' || !valid_domain(at + 1, strlen(at + 1)))
    return "pgrunner.invalid";
  return at + 1;
}

int pgr_email_build(const char *payload, const struct pgr_email_opts *opts,
                    struct pgr_email *out, char *errbuf, size_t errlen) {
  json_t *root = NULL;
  json_error_t jerr;
  struct mlist to = {0}, cc = {0}, bcc = {0}, reply = {0}, from = {0};
  const char *subject, *text, *html;
  const json_t *headers;
  struct pgr_buf *b = &out->data;
  char date[64], boundary[64];
  int rc;

  memset(out, 0, sizeof *out);
  pgr_buf_init(&out->data);

  root = json_loads(payload, 0, &jerr);
  if (root == NULL) {
    /* jansson quotes the bytes it stopped at, which may be anything. */
    char sh[JSON_ERROR_TEXT_LENGTH];
    rc = bad(errbuf, errlen, "payload is not valid JSON: %s",
             shown(jerr.text, sh, sizeof sh));
    goto out;
  }
  if (!json_is_object(root)) {
    rc = bad(errbuf, errlen, "payload must be a JSON object, not %s",
             pgr_json_kind(root));
    goto out;
  }
  if ((rc = get_list(root, "to", &to, errbuf, errlen)) != 0 ||
      (rc = get_list(root, "cc", &cc, errbuf, errlen)) != 0 ||
      (rc = get_list(root, "bcc", &bcc, errbuf, errlen)) != 0 ||
      (rc = get_list(root, "reply_to", &reply, errbuf, errlen)) != 0 ||
      (rc = get_list(root, "from", &from, errbuf, errlen)) != 0)
    goto out;
  if (from.n > 1) {
    rc = bad(errbuf, errlen, "\"from\" must be one address");
    goto out;
  }
  if (from.n == 0) {
    char reason[256];
    if (opts->default_from == NULL || *opts->default_from == '\0') {
      rc = bad(errbuf, errlen,
               "no sender: give \"from\" in the payload or "
               "set PGRUNNER_MAIL_FROM");
      goto out;
    }
    from.v = pgr_calloc(1, sizeof *from.v);
    if (pgr_email_parse_mailbox(opts->default_from, &from.v[0].name,
                                &from.v[0].addr, reason, sizeof reason) != 0) {
      rc = bad(errbuf, errlen, "PGRUNNER_MAIL_FROM: %s", reason);
      goto out;
    }
    from.n = 1;
  }
  if ((rc = get_text(root, "subject", 1, &subject, errbuf, errlen)) != 0 ||
      (rc = get_text(root, "text", 0, &text, errbuf, errlen)) != 0 ||
      (rc = get_text(root, "html", 0, &html, errbuf, errlen)) != 0)
    goto out;
  headers = json_object_get(root, "headers");
  if ((rc = check_headers(headers, errbuf, errlen)) != 0)
    goto out;
  if (to.n + cc.n + bcc.n == 0) {
    rc = bad(errbuf, errlen,
             "no recipient: \"to\", \"cc\" and \"bcc\" are all empty");
    goto out;
  }
  if (opts->msgid_domain != NULL && *opts->msgid_domain != '\0' &&
      !valid_domain(opts->msgid_domain, strlen(opts->msgid_domain))) {
    char sh[96];
    rc = bad(errbuf, errlen, "Message-ID domain \"%s\" is not a domain name",
             shown(opts->msgid_domain, sh, sizeof sh));
    goto out;
  }

  /* The envelope. */
  out->from = pgr_strdup(from.v[0].addr);
  add_rcpts(out, &to);
  add_rcpts(out, &cc);
  add_rcpts(out, &bcc);
  out->message_id = pgr_asprintf("pgrunner.%lld@%s", (long long)opts->task_id,
                                 msgid_domain(opts, out->from));

  /* The header section; Bcc is deliberately absent (RFC 5322 3.6.3 lets
   * the Bcc: field go entirely). */
  pgr_email_format_date(date, sizeof date, opts->date);
  pgr_buf_printf(b, "Date: %s\r\n", date);
  header_mboxes(b, "From", from.v, from.n);
  if (reply.n > 0)
    header_mboxes(b, "Reply-To", reply.v, reply.n);
  if (to.n > 0)
    header_mboxes(b, "To", to.v, to.n);
  else if (cc.n == 0)
    pgr_buf_adds(b, "To: undisclosed-recipients:;\r\n");
  if (cc.n > 0)
    header_mboxes(b, "Cc", cc.v, cc.n);
  if (subject != NULL)
    pgr_email_header(b, "Subject", subject);
  pgr_buf_printf(b, "Message-ID: <%s>\r\n", out->message_id);
  pgr_buf_adds(b, "MIME-Version: 1.0\r\n");
  if (json_is_object(headers)) {
    const char *k;
    json_t *v;
    json_object_foreach((json_t *)headers, k, v) {
      pgr_email_header(b, k, json_string_value(v));
    }
  }

  /* The body. The boundary holds "=_", which neither quoted-printable nor
   * base64 can produce (RFC 2045 6.7: "=" is always followed by hex or a
   * line break); a 7bit part containing it is sent quoted-printable. */
  if (html != NULL && text != NULL) {
    snprintf(
        boundary, sizeof boundary, "=_pgr_%lld_%016llx",
        (long long)opts->task_id,
        (unsigned long long)fnv1a(fnv1a(14695981039346656037u, text), html));
    pgr_buf_printf(b,
                   "Content-Type: multipart/alternative;\r\n"
                   " boundary=\"%s\"\r\n\r\n--%s\r\n",
                   boundary, boundary);
    add_part(b, "text/plain", text, boundary);
    pgr_buf_printf(b, "\r\n--%s\r\n", boundary);
    add_part(b, "text/html", html, boundary);
    pgr_buf_printf(b, "\r\n--%s--\r\n", boundary);
  } else {
    add_part(b, html != NULL ? "text/html" : "text/plain",
             html != NULL ? html : (text != NULL ? text : ""), NULL);
    if (b->len < 2 || memcmp(b->data + b->len - 2, "\r\n", 2) != 0)
      pgr_buf_add(b, "\r\n", 2);
  }
  rc = 0;

out:
  mlist_free(&to);
  mlist_free(&cc);
  mlist_free(&bcc);
  mlist_free(&reply);
  mlist_free(&from);
  if (root != NULL)
    json_decref(root);
  if (rc != 0)
    pgr_email_free(out);
  return rc;
}

void pgr_email_free(struct pgr_email *m) {
  free(m->from);
  for (size_t i = 0; i < m->nrcpts; i++)
    free(m->rcpts[i]);
  free(m->rcpts);
  free(m->message_id);
  pgr_buf_free(&m->data);
  memset(m, 0, sizeof *m);
}

int pgr_email_check_config(const struct pgr_smtp_config *cfg, char *errbuf,
                           size_t errlen) {
  char sh[96];
  char *name = NULL, *addr = NULL;

  if (cfg->host != NULL && *cfg->host != '\0') {
    for (const unsigned char *p = (const unsigned char *)cfg->host; *p; p++)
      if (*p <= ' ' || *p == 0x7f || *p == ':' || *p == '/' || *p == '@')
        return bad(errbuf, errlen,
                   "PGRUNNER_SMTP_HOST: \"%s\" is not a host name or "
                   "address (the port goes in PGRUNNER_SMTP_PORT)",
                   shown(cfg->host, sh, sizeof sh));
  }
  if (cfg->helo_domain != NULL && *cfg->helo_domain != '\0' &&
      !valid_domain(cfg->helo_domain, strlen(cfg->helo_domain)))
    return bad(errbuf, errlen,
               "PGRUNNER_SMTP_HELO: \"%s\" is not a domain name",
               shown(cfg->helo_domain, sh, sizeof sh));
  if (cfg->message_id_domain != NULL && *cfg->message_id_domain != '\0' &&
      !valid_domain(cfg->message_id_domain, strlen(cfg->message_id_domain)))
    return bad(errbuf, errlen,
               "PGRUNNER_MESSAGE_ID_DOMAIN: \"%s\" is not a domain "
               "name",
               shown(cfg->message_id_domain, sh, sizeof sh));
  if (cfg->mail_from != NULL && *cfg->mail_from != '\0') {
    char why[256];
    if (pgr_email_parse_mailbox(cfg->mail_from, &name, &addr, why,
                                sizeof why) != 0)
      return bad(errbuf, errlen, "PGRUNNER_MAIL_FROM: %s", why);
    free(name);
    free(addr);
  }
  if (cfg->user != NULL && strlen(cfg->user) > 255)
    return bad(errbuf, errlen, "PGRUNNER_SMTP_USER is longer than 255 bytes");
  if (cfg->password != NULL && strlen(cfg->password) > 255)
    return bad(errbuf, errlen,
               "PGRUNNER_SMTP_PASSWORD is longer than 255 bytes");
  return 0;
}
