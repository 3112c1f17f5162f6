/*
 * email_msg.h - turn an `email` task's JSON payload into one RFC 5322
 * message and its SMTP envelope, without touching the network.
 *
 * Thread: any; the functions are pure (no globals, no I/O), so the worker
 * threads call them from the email handler and the unit tests call them
 * directly.
 *
 * What it guarantees about the message it builds: every line ends in CRLF,
 * is 7-bit and at most 998 octets long (RFC 5322 2.1.1), so the SMTP session
 * needs no 8BITMIME; non-ASCII header text is RFC 2047 encoded-words, bodies
 * are 7bit, quoted-printable or base64 (RFC 2045) in UTF-8; Bcc recipients
 * are in the envelope only. Every check that can fail the task for good is
 * made here, before any connection is opened.
 *
 * Ownership: pgr_email_build() fills a caller-owned struct pgr_email whose
 * strings it owns; pgr_email_free() releases them.
 */
#ifndef PGR_EMAIL_MSG_H
#define PGR_EMAIL_MSG_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"

/* One message ready for SMTP. */
struct pgr_email {
  char *from;   /* envelope sender, an addr-spec (MAIL FROM) */
  char **rcpts; /* envelope recipients: to, cc, bcc, de-duplicated */
  size_t nrcpts;
  char *message_id;    /* without the angle brackets */
  struct pgr_buf data; /* the whole message, headers and body */
};

/* What the payload does not say. */
struct pgr_email_opts {
  int64_t task_id;          /* the Message-ID is derived from it */
  const char *default_from; /* PGRUNNER_MAIL_FROM; NULL: "from" required */
  /* Right-hand side of the Message-ID (PGRUNNER_MESSAGE_ID_DOMAIN). NULL
   * or empty: the domain of the envelope sender, or "pgrunner.invalid"
   * when that is an address literal; never the host name, which differs
   * between the workers that may retry the task. */
  const char *msgid_domain;
  int64_t date; /* the Date header, seconds since the epoch */
};

/*
 * pgr_email_build parses and validates the payload and assembles the
 * message. On any problem with the payload it returns PGR_EINVAL and writes
 * a one-line reason (printable ASCII) into errbuf, e.g.
 * `"to" must be a string or an array of strings, not a number`; the task
 * should then fail for good. `out` is left empty on failure.
 */
PGR_MUSTCHECK int pgr_email_build(const char *payload,
                                  const struct pgr_email_opts *opts,
                                  struct pgr_email *out, char *errbuf,
                                  size_t errlen);
void pgr_email_free(struct pgr_email *m);

struct pgr_smtp_config;

/*
 * pgr_email_check_config checks the SMTP settings once, when the worker
 * starts, so that a typo is a one-line configuration error (exit 2) rather
 * than every email task failing: the host is a bare name or address (the
 * port has its own variable), the HELO and Message-ID domains are domain
 * names, PGRUNNER_MAIL_FROM is a mailbox, and the user and password fit
 * libESMTP's 255-byte limit for SASL. PGR_EINVAL with the reason, naming
 * the variable, never showing the password.
 */
PGR_MUSTCHECK int pgr_email_check_config(const struct pgr_smtp_config *cfg,
                                         char *errbuf, size_t errlen);

/* The building blocks, exported for the unit tests. */

/* 1 if addr is an acceptable addr-spec (ASCII dot-atom@domain), else 0. */
int pgr_email_valid_addr(const char *addr);

/*
 * pgr_email_parse_mailbox splits "addr@x", "Name <addr@x>" or
 * "\"Quoted, Name\" <addr@x>" into a display name (NULL if none) and an
 * address, both heap strings the caller frees. PGR_EINVAL with a reason on
 * a malformed mailbox or one containing CR or LF.
 */
PGR_MUSTCHECK int pgr_email_parse_mailbox(const char *s, char **name,
                                          char **addr, char *errbuf,
                                          size_t errlen);

/*
 * pgr_email_header appends `Name: value` CRLF, folded at 78 columns where
 * the value has whitespace; values that are not printable ASCII (or that
 * could not be folded under 998 octets, or that look like encoded-words)
 * become RFC 2047 "=?UTF-8?B?...?=" encoded-words. The value must not hold
 * CR or LF (the caller has checked).
 */
void pgr_email_header(struct pgr_buf *b, const char *name, const char *value);

/* Quoted-printable (RFC 2045 6.7) of text whose line breaks are CRLF. */
void pgr_email_encode_qp(struct pgr_buf *b, const char *s, size_t n);

/* Base64 in lines of 76 characters separated by CRLF (RFC 2045 6.8). */
void pgr_email_encode_base64(struct pgr_buf *b, const char *s, size_t n);

/* The RFC 5322 date-time of t in UTC: "Tue, 25 Nov 2025 06:33:00 +0000". */
void pgr_email_format_date(char *buf, size_t len, int64_t t);

#endif /* PGR_EMAIL_MSG_H */
