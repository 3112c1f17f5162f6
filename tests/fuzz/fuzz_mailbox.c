/*
 * fuzz_mailbox.c - the address parser, pgr_email_parse_mailbox(), on any
 * string (payload addresses and PGRUNNER_MAIL_FROM are outside input).
 * A mailbox it accepts has a valid addr-spec and a display name without
 * control characters, and writing it back as `"name" <addr>` (or the bare
 * address) parses to the same name and address.
 */
#include "fuzz.h"
#include "jobs/email_msg.h"

static void check_printable(const char *err) {
  FUZZ_CHECK(err[0] != '\0');
  for (const char *p = err; *p; p++)
    FUZZ_CHECK(*p >= 32 && *p < 127);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *s = fuzz_cstr(data, size);
  char *name = NULL, *addr = NULL, *name2 = NULL, *addr2 = NULL;
  char err[256];
  struct pgr_buf again = {NULL, 0, 0};

  err[0] = '\0';
  if (pgr_email_parse_mailbox(s, &name, &addr, err, sizeof err) != 0) {
    check_printable(err);
    FUZZ_CHECK(name == NULL && addr == NULL);
    goto out;
  }
  FUZZ_CHECK(addr != NULL && pgr_email_valid_addr(addr));
  FUZZ_CHECK(strpbrk(addr, "\r\n<> \t\"") == NULL);
  if (name != NULL) {
    FUZZ_CHECK(name[0] != '\0');
    for (const char *p = name; *p; p++)
      FUZZ_CHECK((unsigned char)*p >= 32 || *p == '\t');
    pgr_buf_addc(&again, '"');
    for (const char *p = name; *p; p++) {
      if (*p == '"' || *p == '\\')
        pgr_buf_addc(&again, '\\');
      pgr_buf_addc(&again, *p);
    }
    pgr_buf_printf(&again, "\" <%s>", addr);
  } else {
    pgr_buf_adds(&again, addr);
  }
  err[0] = '\0';
  FUZZ_CHECK(pgr_email_parse_mailbox(again.data, &name2, &addr2, err,
                                     sizeof err) == 0);
  FUZZ_CHECK(strcmp(addr, addr2) == 0);
  FUZZ_CHECK((name == NULL) == (name2 == NULL));
  FUZZ_CHECK(name == NULL || strcmp(name, name2) == 0);

out:
  pgr_buf_free(&again);
  free(name);
  free(addr);
  free(name2);
  free(addr2);
  free(s);
  return 0;
}
