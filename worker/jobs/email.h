/*
 * email.h - the built-in `email` job kind: one message through SMTP with
 * libESMTP.
 *
 * Thread: WORKER THREADS ONLY. The handler blocks on the network for up to
 * PGRUNNER_SMTP_TIMEOUT seconds per protocol step; it runs inside the
 * task's attempt, while the task's transaction is open.
 *
 * Ownership: the handler's arg is the worker's const struct pgr_smtp_config
 * (&cfg->smtp), read-only and alive for the whole run. Nothing outlives a
 * call.
 *
 * Outcomes: PGR_SUCCESS once the server accepted the message (250 after
 * DATA); PGR_RETRY for temporary failures (no connection, timeout, a 4xx
 * reply, a TLS problem); PGR_PERMANENT for a bad payload (checked before
 * any connection is made) or any 5xx reply that ends the session
 * (greeting, EHLO/HELO, STARTTLS, AUTH, MAIL, RCPT, DATA). Every
 * failure calls job->fail() with a one-line reason. The SMTP password never
 * appears in a log record or an error message.
 *
 * TLS: STARTTLS uses pgrunner's own OpenSSL context (TLS 1.2; see email.c
 * for why not 1.3 with libESMTP 1.1.0), which trusts OpenSSL's default CA
 * store: the system's, or the file / directory named by the standard
 * SSL_CERT_FILE / SSL_CERT_DIR environment variables; PGRUNNER_SMTP_CA_FILE
 * replaces that store with the certificates of one PEM file. With
 * PGRUNNER_SMTP_STARTTLS=require the server's certificate must verify and
 * name the host (libESMTP matches its DNS names; a host given as an IPv4
 * address is matched against the certificate's IP address names); with
 * =try it is
 * opportunistic TLS: used when offered, certificate not verified (as
 * Postfix's "may" level).
 */
#ifndef PGR_EMAIL_H
#define PGR_EMAIL_H

#include <stddef.h>

#include "common.h"
#include "pgrunner.h"

/* arg: const struct pgr_smtp_config *. */
enum pgr_outcome pgr_email_handler(struct pgr_job *job, void *arg);

struct pgr_smtp_config;

/* pgr_email_check_ca_file: PGRUNNER_SMTP_CA_FILE, when set, loads (a
 * readable PEM file with at least one certificate). 0, or -1 with a
 * one-line reason in errbuf. Checked once when the worker starts. */
PGR_MUSTCHECK int pgr_email_check_ca_file(const struct pgr_smtp_config *cfg,
                                          char *errbuf, size_t errlen);

#endif /* PGR_EMAIL_H */
