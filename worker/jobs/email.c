/*
 * email.c - the `email` handler: build the message (email_msg.c), then one
 * libESMTP session to the configured server, then sort the result into
 * success, retry or permanent failure.
 *
 * Thread: worker threads only (PGR_ASSERT_OFF_LOOP). libESMTP is
 * thread-safe per session (its errno is per-thread, its SASL plugin list is
 * behind a mutex); each call makes its own session and frees it. Each worker
 * thread keeps one OpenSSL context for STARTTLS (see thread_tls_ctx()).
 *
 * Ownership: everything here lives for one call. The session's auth
 * context is ours to free after the session (smtp_destroy_session() leaves
 * it alone); the message reader's cursor is freed by libESMTP with free()
 * (message-source.c, msg_source_destroy()).
 *
 * Classification (see email.h): 2xx after DATA is success; a 5xx reply
 * that ends the session is permanent, whichever command it answers (the
 * greeting, EHLO/HELO, STARTTLS, AUTH, MAIL, RCPT or DATA); everything else
 * (no connection, timeout, a dropped connection, 4xx, TLS problems, a
 * server without the STARTTLS that =require asks for) is retried with
 * backoff. A 5xx that libESMTP recovers from (EHLO 502, then HELO) decides
 * nothing. All recipients or none: the session requires
 * every RCPT to be accepted before DATA (smtp_option_require_all_recipients)
 * so a retry never re-sends to recipients who already got the message.
 */
#include "jobs/email.h"

#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

/* Both before libesmtp.h (a block of its own, so include sorting keeps the
 * order): it declares smtp_auth_set_context() only after auth-client.h, and
 * smtp_starttls_set_ctx() only after <openssl/ssl.h>. */
#include <auth-client.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

#include <libesmtp.h>

#include "common.h"
#include "config.h"
#include "jobs/email_msg.h"
#include "log.h"

/* What one session learns beside libESMTP's own status structures. */
struct session {
  const struct pgr_smtp_config *cfg;
  const char *server;     /* "host:port", for messages */
  char problem[256];      /* a STARTTLS failure the event callback saw */
  char failure[256];      /* the server's last 4xx/5xx reply line */
  int failure_final;      /* no command but QUIT, no 2xx/3xx, came after it */
  char auth_failure[256]; /* its first 4xx/5xx reply once AUTH started */
  char line[256];         /* the reply line being read */
  size_t line_len;
  int tls_up;
  int auth_asked;
  int authenticated;
};

/* host_is_ip: the configured host is an IPv4 address (IPv6 literals cannot
 * be given, see send_message()). */
static int host_is_ip(const char *host) {
  struct in_addr a;
  return host != NULL && inet_pton(AF_INET, host, &a) == 1;
}

/* printable copies a server's text for last_error: ASCII, no controls. */
static void printable(char *dst, size_t n, const char *src, size_t len) {
  size_t o = 0;
  for (size_t i = 0; i < len && o + 1 < n; i++) {
    unsigned char c = (unsigned char)src[i];
    if (c == '\r' || c == '\n') {
      if (o > 0 && dst[o - 1] != ' ')
        dst[o++] = ' ';
      continue;
    }
    dst[o++] = (c < 32 || c >= 127) ? '?' : (char)c;
  }
  while (o > 0 && dst[o - 1] == ' ')
    o--;
  dst[o] = '\0';
}

static void note(struct session *ss, const char *fmt, ...) PGR_PRINTF(2, 3);
static void note(struct session *ss, const char *fmt, ...) {
  va_list ap;
  if (ss->problem[0] != '\0')
    return; /* the first problem is the cause; later ones follow from it */
  va_start(ap, fmt);
  vsnprintf(ss->problem, sizeof ss->problem, fmt, ap);
  va_end(ap);
}

/*
 * on_event is libESMTP's event callback. The varargs of each event are
 * those documented in libesmtp.h and passed in smtp-tls.c / protocol.c.
 * With STARTTLS "try" certificate problems are waved through: TLS is then
 * opportunistic, still better than plain text; with "require" they end the
 * session and we keep the reason.
 */
static void on_event(smtp_session_t s, int ev, void *arg, ...) {
  struct session *ss = arg;
  int require = ss->cfg->starttls == PGR_STARTTLS_REQUIRE;
  va_list ap;
  int *ok;

  (void)s;
  va_start(ap, arg);
  switch (ev) {
  case SMTP_EV_STARTTLS_OK:
    ss->tls_up = 1;
    break;
  case SMTP_EV_INVALID_PEER_CERTIFICATE: {
    long r = va_arg(ap, long);
    ok = va_arg(ap, int *);
    if (!require)
      *ok = 1;
    else
      note(ss, "the server's TLS certificate is not trusted (%s)",
           X509_verify_cert_error_string(r));
    break;
  }
  case SMTP_EV_NO_PEER_CERTIFICATE:
    ok = va_arg(ap, int *);
    if (!require)
      *ok = 1;
    else
      note(ss, "the server sent no TLS certificate");
    break;
  case SMTP_EV_WRONG_PEER_CERTIFICATE: {
    char name[96];
    const char *n;
    SSL *ssl;
    ok = va_arg(ap, int *);
    n = va_arg(ap, const char *);
    ssl = va_arg(ap, SSL *);
    if (!require) {
      *ok = 1;
      break;
    }
    printable(name, sizeof name, n ? n : "", n ? strlen(n) : 0);
    /* libESMTP matches the host against the certificate's DNS names only
     * (smtp-tls.c: "TODO: handle GEN_IPADD"); a host given as an address
     * is matched here against its IP address names. The chain itself was
     * verified before this event. */
    if (host_is_ip(ss->cfg->host)) {
      X509 *cert = ssl != NULL ? SSL_get0_peer_certificate(ssl) : NULL;
      if (cert != NULL && X509_check_ip_asc(cert, ss->cfg->host, 0) == 1) {
        *ok = 1;
        break;
      }
      note(ss,
           "the server's TLS certificate does not name the address %s "
           "(no such IP address in its subjectAltName; it names \"%s\")",
           ss->cfg->host, name);
      break;
    }
    note(ss,
         "the server's TLS certificate does not name the host "
         "(it names \"%s\")",
         name);
    break;
  }
  case SMTP_EV_WEAK_CIPHER:
    (void)va_arg(ap, int);
    (void)va_arg(ap, int *);
    note(ss, "the negotiated TLS cipher is too weak");
    break;
  case SMTP_EV_UNUSABLE_CLIENT_CERTIFICATE:
  case SMTP_EV_NO_CLIENT_CERTIFICATE:
    /* libESMTP looks for a client certificate for the host under
     * ~/.config/libesmtp/private/ even with our context; one it found and
     * could not use ends the session. */
    note(ss, "libESMTP's client certificate for this host is unusable");
    break;
  case SMTP_EV_EXTNA_STARTTLS:
    note(ss, "the server does not offer STARTTLS, and "
             "PGRUNNER_SMTP_STARTTLS=require");
    break;
  default:
    break;
  }
  va_end(ap);
}

/*
 * on_monitor sees the protocol traffic. What the server sends is read as
 * complete reply lines, to keep the failing reply for the error message and
 * to learn whether AUTH succeeded (235, RFC 4954). What we write includes
 * the AUTH exchange, i.e. the password: it is only compared with "QUIT",
 * never copied. A command other than QUIT after a failing reply means
 * libESMTP carried on (EHLO 502 -> HELO, one AUTH mechanism -> the next,
 * MAIL after a refused login), so that reply no longer ends the session
 * and must not decide whether a later timeout or drop is permanent.
 */
static void on_monitor(const char *buf, int len, int writing, void *arg) {
  struct session *ss = arg;
  if (writing != SMTP_CB_READING) {
    if (!(len == 6 && memcmp(buf, "QUIT\r\n", 6) == 0))
      ss->failure_final = 0;
    return;
  }
  for (int i = 0; i < len; i++) {
    if (buf[i] != '\n') {
      if (ss->line_len + 1 < sizeof ss->line)
        ss->line[ss->line_len++] = buf[i];
      continue;
    }
    ss->line[ss->line_len] = '\0';
    if (ss->auth_asked && strncmp(ss->line, "235", 3) == 0)
      ss->authenticated = 1;
    if (ss->line[0] == '4' || ss->line[0] == '5') {
      printable(ss->failure, sizeof ss->failure, ss->line, ss->line_len);
      ss->failure_final = 1;
      if (ss->auth_asked && !ss->authenticated && ss->auth_failure[0] == '\0')
        memcpy(ss->auth_failure, ss->failure, sizeof ss->auth_failure);
    } else if (strncmp(ss->line, "221", 3) != 0) {
      ss->failure_final = 0; /* a 2xx/3xx other than QUIT's 221 */
    }
    ss->line_len = 0;
  }
}

/* on_interact hands the SASL mechanism (PLAIN or LOGIN) the credentials. */
static int on_interact(auth_client_request_t req, char **result, int fields,
                       void *arg) {
  struct session *ss = arg;
  ss->auth_asked = 1;
  for (int i = 0; i < fields; i++) {
    const char *v;
    if (req[i].flags & AUTH_USER)
      v = ss->cfg->user;
    else if (req[i].flags & AUTH_PASS)
      v = ss->cfg->password != NULL ? ss->cfg->password : "";
    else
      return 0; /* a realm or the like: not something we have */
    /* libESMTP's PLAIN plugin copies into a fixed 2*255+3 buffer. */
    if (req[i].size > 0 && strlen(v) > req[i].size)
      return 0;
    result[i] = (char *)v; /* the plugins only read it */
  }
  return 1;
}

/* read_message streams the prepared message to libESMTP; a NULL len asks
 * to rewind. The cursor in *ctx is freed by libESMTP with free(). */
static const char *read_message(void **ctx, int *len, void *arg) {
  const struct pgr_email *m = arg;
  size_t *pos = *ctx, n;

  if (pos == NULL) {
    pos = pgr_calloc(1, sizeof *pos);
    *ctx = pos;
  }
  if (len == NULL) {
    *pos = 0;
    return NULL;
  }
  n = m->data.len - *pos;
  if (n > 65536)
    n = 65536;
  *len = (int)n;
  *pos += n;
  return m->data.data + *pos - n;
}

static void status_text(char *dst, size_t n, const smtp_status_t *st) {
  char text[200];
  const char *t = st->text != NULL ? st->text : "";
  printable(text, sizeof text, t, strlen(t));
  if (st->enh_class > 0)
    snprintf(dst, n, "%d %d.%d.%d %s", st->code, st->enh_class, st->enh_subject,
             st->enh_detail, text);
  else
    snprintf(dst, n, "%d %s", st->code, text);
}

struct rcpt_scan {
  const char *perm_addr, *temp_addr;
  char perm[256], temp[256];
  int nperm;
};

static void on_recipient(smtp_recipient_t r, const char *mailbox, void *arg) {
  struct rcpt_scan *rs = arg;
  const smtp_status_t *st = smtp_recipient_status(r);
  if (st == NULL)
    return;
  if (st->code >= 500 && st->code < 600) {
    if (rs->nperm++ == 0) {
      rs->perm_addr = mailbox;
      status_text(rs->perm, sizeof rs->perm, st);
    }
  } else if (st->code >= 400 && st->code < 500 && rs->temp_addr == NULL) {
    rs->temp_addr = mailbox;
    status_text(rs->temp, sizeof rs->temp, st);
  }
}

static const char *errno_text(int e, char *buf, size_t n, int timeout_s) {
  if (e == SMTP_ERR_DROPPED_CONNECTION) {
    snprintf(buf, n,
             "the server closed the connection or did not answer within %d s",
             timeout_s);
    return buf;
  }
  /* With GNU strerror_r the text may not be in buf: use what it returns. */
  const char *t = smtp_strerror(e, buf, n);
  return t != NULL ? t : "unknown error";
}

/*
 * reply_outcome is the outcome of a session that the server's 4xx/5xx
 * reply `line` ended. RFC 5321 4.2.1 on 5yz: "The SMTP client SHOULD NOT
 * repeat the exact request (in the same sequence)", so a 5xx is permanent
 * whichever command it answered; a 4xx is retried.
 */
static enum pgr_outcome reply_outcome(const char *line) {
  return line[0] == '5' ? PGR_PERMANENT : PGR_RETRY;
}

/* classify turns the finished session into an outcome and a reason. */
static enum pgr_outcome classify(struct session *ss, smtp_message_t msg,
                                 int started, const struct pgr_email *m,
                                 int timeout_s, char *err, size_t errlen) {
  const smtp_status_t *mst = smtp_message_transfer_status(msg);
  const smtp_status_t *rp = smtp_reverse_path_status(msg);
  struct rcpt_scan rs;
  char st[256], et[128];
  int e = smtp_errno();
  const char *hint = "";

  if (started && mst != NULL && mst->code >= 200 && mst->code < 300)
    return PGR_SUCCESS;
  if (ss->problem[0] != '\0') {
    snprintf(err, errlen, "SMTP: STARTTLS with %s failed: %s", ss->server,
             ss->problem);
    return PGR_RETRY;
  }
  if (!started) {
    /* No session: the greeting was refused, EHLO got a 4xx, HELO got no
     * 2xx, or there was no connection at all. */
    if (ss->failure_final) {
      snprintf(err, errlen, "SMTP: %s refused the session: %s", ss->server,
               ss->failure);
      return reply_outcome(ss->failure);
    }
    snprintf(err, errlen, "SMTP: cannot talk to %s: %s", ss->server,
             errno_text(e, et, sizeof et, timeout_s));
    return PGR_RETRY;
  }
  /* The first refusal of the login decides, not the MAIL refusal (530)
   * that follows it: 535 (bad credentials) is permanent, 454 (temporary
   * authentication failure, RFC 4954 6) is retried. Only the server's
   * reply goes into the reason, never what we sent. */
  if (ss->auth_failure[0] != '\0' && !ss->authenticated) {
    char user[96];
    printable(user, sizeof user, ss->cfg->user, strlen(ss->cfg->user));
    snprintf(err, errlen,
             "SMTP: %s refused the login (AUTH) of user \"%s\": %s", ss->server,
             user, ss->auth_failure);
    return reply_outcome(ss->auth_failure);
  }
  if (ss->cfg->user != NULL && *ss->cfg->user != '\0' && !ss->auth_asked)
    hint = " (the server offered no AUTH PLAIN or LOGIN, so the message "
           "went unauthenticated)";
  if (rp == NULL || rp->code == 0) {
    if (ss->cfg->starttls != PGR_STARTTLS_NO && !ss->tls_up &&
        e == SMTP_ERR_CLIENT_ERROR) {
      snprintf(err, errlen,
               "SMTP: STARTTLS with %s failed: TLS handshake failed",
               ss->server);
      return PGR_RETRY;
    }
    if (ss->failure_final) {
      /* A 5xx to EHLO that HELO cannot cure, or a refused STARTTLS. */
      snprintf(err, errlen, "SMTP: %s ended the session before MAIL FROM: %s",
               ss->server, ss->failure);
      return reply_outcome(ss->failure);
    }
    snprintf(err, errlen, "SMTP: session with %s ended before MAIL FROM: %s",
             ss->server, errno_text(e, et, sizeof et, timeout_s));
    return PGR_RETRY;
  }
  if (rp->code >= 400) {
    status_text(st, sizeof st, rp);
    snprintf(err, errlen, "SMTP: %s %s sender <%s>: %s%s", ss->server,
             rp->code >= 500 ? "rejected" : "deferred", m->from, st, hint);
    return rp->code >= 500 ? PGR_PERMANENT : PGR_RETRY;
  }
  memset(&rs, 0, sizeof rs);
  smtp_enumerate_recipients(msg, on_recipient, &rs);
  if (rs.nperm > 0) {
    char more[48] = "";
    if (rs.nperm > 1)
      snprintf(more, sizeof more, " (and %d more)", rs.nperm - 1);
    snprintf(err, errlen, "SMTP: %s rejected recipient <%s>%s: %s", ss->server,
             rs.perm_addr, more, rs.perm);
    return PGR_PERMANENT;
  }
  if (rs.temp_addr != NULL) {
    snprintf(err, errlen, "SMTP: %s deferred recipient <%s>: %s", ss->server,
             rs.temp_addr, rs.temp);
    return PGR_RETRY;
  }
  if (mst != NULL && mst->code >= 400) {
    status_text(st, sizeof st, mst);
    snprintf(err, errlen, "SMTP: %s %s the message: %s", ss->server,
             mst->code >= 500 ? "rejected" : "deferred", st);
    return mst->code >= 500 ? PGR_PERMANENT : PGR_RETRY;
  }
  snprintf(err, errlen,
           "SMTP: session with %s ended before the message was accepted: %s",
           ss->server,
           ss->failure_final ? ss->failure
                             : errno_text(e, et, sizeof et, timeout_s));
  return ss->failure_final ? reply_outcome(ss->failure) : PGR_RETRY;
}

/*
 * The TLS context of STARTTLS sessions: one per worker thread, made on the
 * thread's first STARTTLS and freed when the thread exits.
 *
 * Why our own and not libESMTP's: libESMTP 1.1.0 handles a readable socket
 * before it flushes the command it has queued (protocol.c, do_session()).
 * TLS 1.3 servers send their session tickets just after the handshake; when
 * they arrive before libESMTP's next poll, it reads them, finds no reply and
 * waits for one while its EHLO sits unsent, until the timeout. On a fast
 * link that is most sessions (measured: 16 of 20 against a local OpenSSL
 * server). TLS 1.2 carries its ticket inside the handshake, so capping the
 * version at 1.2 removes the race; 1.2 with the default ciphers is what most
 * SMTP servers negotiate anyway. Owning the context also means trust comes
 * from OpenSSL's default store, which the standard SSL_CERT_FILE and
 * SSL_CERT_DIR variables override, rather than from libESMTP's per-user
 * files, and PGRUNNER_SMTP_CA_FILE, when set, replaces that store (as
 * curl's --cacert and libpq's sslrootcert do). libESMTP still checks the
 * certificate and the host name itself (check_acceptable_security()) and
 * reports through on_event(), where an IP address host is checked.
 *
 * Why per thread: OpenSSL 3.0 fills a certificate's extension cache lazily,
 * and two threads verifying against the same trusted certificate race on it
 * (openssl/openssl#32609, seen here with TSan). Contexts that share no
 * certificate avoid it; loading the CA bundle (tens of ms) once per thread
 * keeps the cost off each message.
 */
static pthread_once_t tls_once = PTHREAD_ONCE_INIT;
static pthread_key_t tls_key;

static void tls_ctx_free(void *ctx) {
  SSL_CTX_free(ctx);
}

static void tls_key_init(void) {
  PGR_ASSERT(pthread_key_create(&tls_key, tls_ctx_free) == 0);
}

/* load_trust makes ctx trust PGRUNNER_SMTP_CA_FILE alone when it is set,
 * else OpenSSL's default store. 0, or -1 with OpenSSL's reason in err. */
static int load_trust(SSL_CTX *ctx, const char *ca_file, char *err,
                      size_t errlen) {
  unsigned long e;
  FILE *f;
  if (ca_file == NULL || *ca_file == '\0') {
    if (SSL_CTX_set_default_verify_paths(ctx))
      return 0;
    snprintf(err, errlen, "cannot load OpenSSL's default CA store");
    return -1;
  }
  f = fopen(ca_file, "r");
  if (f == NULL) {
    char eb[128];
    /* GNU strerror_r (_GNU_SOURCE): the text may not be in eb. */
    const char *why = strerror_r(errno, eb, sizeof eb);
    snprintf(err, errlen, "PGRUNNER_SMTP_CA_FILE: cannot read \"%s\": %s",
             ca_file, why);
    return -1;
  }
  fclose(f);
  ERR_clear_error();
  if (SSL_CTX_load_verify_locations(ctx, ca_file, NULL))
    return 0;
  e = ERR_peek_last_error();
  snprintf(err, errlen, "PGRUNNER_SMTP_CA_FILE: cannot load \"%s\": %s",
           ca_file, e != 0 ? ERR_reason_error_string(e) : "no certificate");
  ERR_clear_error();
  return -1;
}

int pgr_email_check_ca_file(const struct pgr_smtp_config *cfg, char *errbuf,
                            size_t errlen) {
  SSL_CTX *ctx;
  int rc;
  if (cfg->ca_file == NULL || *cfg->ca_file == '\0')
    return 0;
  ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL) {
    snprintf(errbuf, errlen, "cannot set up a TLS context");
    return -1;
  }
  rc = load_trust(ctx, cfg->ca_file, errbuf, errlen);
  SSL_CTX_free(ctx);
  return rc;
}

/* thread_tls_ctx returns this thread's context, or NULL (reason in err). */
static SSL_CTX *thread_tls_ctx(const struct pgr_smtp_config *cfg, char *err,
                               size_t errlen) {
  SSL_CTX *ctx;

  pthread_once(&tls_once, tls_key_init);
  ctx = pthread_getspecific(tls_key);
  if (ctx != NULL)
    return ctx;
  snprintf(err, errlen, "cannot set up a TLS context");
  ctx = SSL_CTX_new(TLS_client_method());
  if (ctx == NULL)
    return NULL;
  if (!SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) ||
      !SSL_CTX_set_max_proto_version(ctx, TLS1_2_VERSION) ||
      load_trust(ctx, cfg->ca_file, err, errlen) != 0 ||
      pthread_setspecific(tls_key, ctx) != 0) {
    SSL_CTX_free(ctx);
    return NULL;
  }
  return ctx;
}

static enum pgr_outcome send_message(const struct pgr_smtp_config *cfg,
                                     const struct pgr_email *m, char *err,
                                     size_t errlen) {
  static const int phases[] = {Timeout_GREETING, Timeout_ENVELOPE, Timeout_DATA,
                               Timeout_TRANSFER, Timeout_DATA2};
  smtp_session_t s = NULL;
  smtp_message_t msg;
  auth_context_t auth = NULL;
  struct session ss;
  char server[300];
  int timeout_s = cfg->timeout_s > 0 ? cfg->timeout_s : 30;
  int have_user = cfg->user != NULL && *cfg->user != '\0';
  enum pgr_outcome outcome = PGR_RETRY;
  enum starttls_option tls = Starttls_DISABLED;
  int started;

  /* smtp_set_server() splits "host:port" at the first colon, so an IPv6
   * literal cannot be given; a host name resolving to IPv6 works. */
  snprintf(server, sizeof server, "%s:%d",
           cfg->host != NULL && *cfg->host != '\0' ? cfg->host : "localhost",
           cfg->port > 0 ? cfg->port : 25);
  memset(&ss, 0, sizeof ss);
  ss.cfg = cfg;
  ss.server = server;

  if (have_user && (strlen(cfg->user) > 255 ||
                    (cfg->password != NULL && strlen(cfg->password) > 255))) {
    snprintf(err, errlen,
             "SMTP: PGRUNNER_SMTP_USER and "
             "PGRUNNER_SMTP_PASSWORD may be at most 255 bytes each");
    return PGR_PERMANENT;
  }

  s = smtp_create_session();
  if (s == NULL) {
    snprintf(err, errlen, "SMTP: cannot create a libESMTP session");
    goto out;
  }
  if (!smtp_set_server(s, server) ||
      (cfg->helo_domain != NULL && *cfg->helo_domain != '\0' &&
       !smtp_set_hostname(s, cfg->helo_domain))) {
    snprintf(err, errlen, "SMTP: cannot set up a session with %s", server);
    goto out;
  }
  /* Every phase gets the configured bound, below RFC 5321's minutes-long
   * minimums (hence OVERRIDE): a hung server must not hold a worker thread.
   * libESMTP applies it to each wait for the server, the TLS handshake
   * included; connect() itself is bounded by the kernel's SYN retries. */
  for (size_t i = 0; i < PGR_ARRAY_LEN(phases); i++)
    smtp_set_timeout(s, phases[i] | Timeout_OVERRIDE_RFC2822_MINIMUM,
                     (long)timeout_s * 1000L);
  smtp_set_eventcb(s, on_event, &ss);
  smtp_set_monitorcb(s, on_monitor, &ss, 0);
  switch (cfg->starttls) {
  case PGR_STARTTLS_NO:
    tls = Starttls_DISABLED;
    break;
  case PGR_STARTTLS_TRY:
    tls = Starttls_ENABLED;
    break;
  case PGR_STARTTLS_REQUIRE:
    tls = Starttls_REQUIRED;
    break;
  }
  if (tls != Starttls_DISABLED) {
    char why[400];
    SSL_CTX *ctx = thread_tls_ctx(cfg, why, sizeof why);
    if (ctx == NULL) {
      snprintf(err, errlen, "SMTP: %s", why);
      goto out;
    }
    if (!smtp_starttls_enable(s, tls) || !smtp_starttls_set_ctx(s, ctx)) {
      snprintf(err, errlen, "SMTP: this libESMTP has no STARTTLS support");
      goto out;
    }
  }
  smtp_option_require_all_recipients(s, 1);
  if (have_user) {
    auth = auth_create_context();
    if (auth == NULL) {
      snprintf(err, errlen, "SMTP: cannot create an AUTH context");
      goto out;
    }
    /* PLAIN and LOGIN send the password as it is: they have to be allowed
     * explicitly (auth-client.c, mechanism_disabled()). */
    auth_set_mechanism_flags(auth, AUTH_PLUGIN_PLAIN, 0);
    auth_set_interact_cb(auth, on_interact, &ss);
    smtp_auth_set_context(s, auth);
  }

  msg = smtp_add_message(s);
  if (msg == NULL || !smtp_set_reverse_path(msg, m->from)) {
    snprintf(err, errlen, "SMTP: cannot set up the message");
    goto out;
  }
  for (size_t i = 0; i < m->nrcpts; i++)
    if (smtp_add_recipient(msg, m->rcpts[i]) == NULL) {
      snprintf(err, errlen, "SMTP: cannot add a recipient");
      goto out;
    }
  smtp_set_messagecb(msg, read_message, (void *)m);

  /* libESMTP's errno is only written on failure. An invalid call sets it
   * to a known value, so an error read afterwards is this session's. */
  (void)smtp_set_timeout(s, Timeout_GREETING, 0);
  started = smtp_start_session(s);
  outcome = classify(&ss, msg, started, m, timeout_s, err, errlen);
  pgr_debug("smtp session ended", PGR_LS("server", server),
            PGR_LI("tls", ss.tls_up), PGR_LI("authenticated", ss.authenticated),
            PGR_LI("outcome", outcome));

out:
  if (s != NULL)
    smtp_destroy_session(s);
  if (auth != NULL)
    auth_destroy_context(auth);
  return outcome;
}

enum pgr_outcome pgr_email_handler(struct pgr_job *job, void *arg) {
  PGR_ASSERT_OFF_LOOP();
  const struct pgr_smtp_config *cfg = arg;
  struct pgr_email m;
  struct pgr_email_opts o;
  char reason[1024], msg[1100];
  enum pgr_outcome outcome;

  PGR_ASSERT(cfg != NULL);
  memset(&o, 0, sizeof o);
  o.task_id = job->task->id;
  o.default_from = cfg->mail_from;
  /* Unset, the builder takes the sender's domain: the host name would give
   * a retry on another worker another Message-ID. */
  o.msgid_domain = cfg->message_id_domain;
  o.date = (int64_t)time(NULL);

  /* Everything that can make the task fail for good is checked here,
   * before a connection is opened: a bad payload sends nothing. */
  if (pgr_email_build(job->task->payload, &o, &m, reason, sizeof reason) != 0) {
    snprintf(msg, sizeof msg, "invalid email payload: %s", reason);
    job->fail(job, msg);
    return PGR_PERMANENT;
  }

  outcome = send_message(cfg, &m, reason, sizeof reason);
  if (outcome == PGR_SUCCESS)
    pgr_info("email sent", PGR_LI("task", job->task->id),
             PGR_LS("message_id", m.message_id), PGR_LI("recipients", m.nrcpts),
             PGR_LI("bytes", m.data.len));
  else
    job->fail(job, reason);
  pgr_email_free(&m);
  return outcome;
}
