/* Messages to stderr, prefixed with the program name. */
#ifndef UQ_IO_LOG_H
#define UQ_IO_LOG_H

#include <stdarg.h>

void uq_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
void uq_verror(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));

#endif
