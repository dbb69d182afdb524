/* Messages to stderr, prefixed with the program name. */
#include <stdio.h>

#include "io/log.h"

void uq_verror(const char *fmt, va_list ap)
{
    fputs("ublk-qcow2: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
}

void uq_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    uq_verror(fmt, ap);
    va_end(ap);
}
