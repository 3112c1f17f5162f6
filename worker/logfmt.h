/*
 * logfmt.h - one log record turned into one line: logfmt text, JSON, and the
 * wire form pgrunner commands send to the worker's log socket.
 *
 * Thread: any. These are pure functions without shared state; log.c calls
 * them on the logging thread (local records) and on its writer thread
 * (records read from the socket). The unit tests call them directly.
 * Ownership: every function appends to a caller-owned struct pgr_buf and
 * keeps no pointer to its arguments.
 *
 * Guarantees shared by all formats: a record is exactly one line ending in
 * '\n'; control characters are escaped, invalid UTF-8 is replaced by U+FFFD,
 * keys are reduced to [A-Za-z0-9_.-] and a field may not reuse one of the
 * fixed keys (ts, level, proc, pid, msg): such a key gets a '_' prefix.
 */
#ifndef PGR_LOGFMT_H
#define PGR_LOGFMT_H

#include <stddef.h>
#include <stdint.h>

#include "common.h"
#include "log.h"

/* "2026-11-24T21:45:44.123Z" and its NUL. */
#define PGR_LOGFMT_TS_SIZE 25

/* The longest wire line the log socket accepts, newline excluded. */
#define PGR_LOGFMT_WIRE_MAX (256 * 1024)

/* Everything one record holds, borrowed from the caller. */
struct pgr_logfmt_rec {
  int64_t ts_ms; /* wall clock, milliseconds since the Unix epoch */
  enum pgr_level level;
  const char *proc;
  int64_t pid;
  const char *msg; /* NULL reads as "" */
  const struct pgr_log_field *fields;
  size_t nfields;
};

/* "debug", "info", "warn", "error"; out-of-range levels clamp. */
const char *pgr_log_level_name(enum pgr_level level);
/* The inverse of pgr_log_level_name(); PGR_EINVAL for anything else. */
PGR_MUSTCHECK int pgr_log_level_parse(const char *s, enum pgr_level *out);

/* Writes the UTC timestamp of `ms` as 2026-11-24T21:45:44.123Z. */
void pgr_logfmt_ts(char out[PGR_LOGFMT_TS_SIZE], int64_t ms);

/*
 * Appends one logfmt value: bare when it is non-empty and holds no space,
 * control character, '"', '=' or '\\'; otherwise double-quoted with JSON's
 * escapes (\" \\ \n \r \t \u00XX). s == NULL appends nothing (`key=`).
 */
void pgr_logfmt_value(struct pgr_buf *out, const char *s, size_t n);

/* Appends a JSON string literal, quotes included. */
void pgr_logfmt_json_string(struct pgr_buf *out, const char *s, size_t n);

/* Appends the record in `format`, newline included. */
void pgr_logfmt_record(struct pgr_buf *out, enum pgr_log_format format,
                       const struct pgr_logfmt_rec *r);

/*
 * Appends the wire form of the record, newline included: one JSON object,
 *   {"v":1,"ts":<ms>,"level":"info","proc":"add","pid":7,"msg":"task added",
 *    "f":[["task",42],["kind","email"]]}
 * Field values are JSON strings, numbers or null (a NULL string); a double
 * that is not finite travels as the string "NaN", "+Inf" or "-Inf".
 */
void pgr_logfmt_wire(struct pgr_buf *out, const struct pgr_logfmt_rec *r);

/*
 * Parses one wire line (without its newline), checks every member, and
 * appends the record in `format`. Returns PGR_EJSON for text that is not
 * JSON, PGR_EINVAL for JSON that is not a valid record (including lines
 * longer than PGR_LOGFMT_WIRE_MAX); `out` is untouched on failure.
 */
PGR_MUSTCHECK int pgr_logfmt_rewire(struct pgr_buf *out,
                                    enum pgr_log_format format,
                                    const char *line, size_t len);

#endif /* PGR_LOGFMT_H */
