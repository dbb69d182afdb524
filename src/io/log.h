/* Messages: one line each, "ublk-qcow2: [CONTEXT: ]text", on stderr.
 *
 * A daemon sets a context (its device and image) so that every line names
 * them, and may copy the lines to syslog.  Lines are written whole with one
 * write, so threads do not interleave them. */
#ifndef UQ_IO_LOG_H
#define UQ_IO_LOG_H

#include <stdarg.h>

enum uq_level { UQ_LOG_ERR, UQ_LOG_WARN, UQ_LOG_INFO, UQ_LOG_DEBUG };

void uq_vlog(enum uq_level level, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
void uq_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void uq_verror(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));
/* "warning: text"; always shown. */
void uq_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Shown from verbosity 1 (-v) and 2 (-vv) on. */
void uq_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void uq_debug(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

void uq_set_verbosity(int v);
int uq_verbosity(void);
/* Prefix every later line with "CONTEXT: " (NULL: none).  Set it before
 * starting threads that log. */
void uq_log_context(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Copy every later line to syslog (facility daemon).  Sent without ever
 * waiting: when the log daemon does not keep up, lines are dropped from
 * syslog (never from stderr) rather than stalling the device, whose own
 * I/O the log daemon may be waiting for. */
void uq_log_to_syslog(void);

#endif
