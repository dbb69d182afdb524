/* Messages to stderr and, for daemons, syslog (see log.h). */
#include "io/log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_LEN 2048
#define SYSLOG_PATH "/dev/log"
#define FACILITY_DAEMON (3 << 3)

static int verbosity;
static char context[512];
static int syslog_fd = -1;

void uq_set_verbosity(int v) { verbosity = v; }
int uq_verbosity(void) { return verbosity; }

void uq_log_context(const char *fmt, ...)
{
    if (!fmt) {
        context[0] = '\0';
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(context, sizeof(context), fmt, ap);
    va_end(ap);
}

void uq_log_to_syslog(void)
{
    if (syslog_fd >= 0)
        return;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return;
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", SYSLOG_PATH);
    /* No log daemon now: try again at each line (it may start later). */
    connect(fd, (struct sockaddr *)&sa, sizeof(sa));
    syslog_fd = fd;
}

static void to_syslog(enum uq_level level, const char *msg)
{
    static const int severity[] = { 3, 4, 6, 7 };     /* err, warning, info, debug */
    char line[LINE_MAX_LEN + 64], stamp[32];
    time_t now = time(NULL);
    struct tm tm;
    localtime_r(&now, &tm);
    strftime(stamp, sizeof(stamp), "%b %e %H:%M:%S", &tm);
    int n = snprintf(line, sizeof(line), "<%d>%s ublk-qcow2[%d]: %s", FACILITY_DAEMON | severity[level],
                     stamp, (int)getpid(), msg);
    if (n >= (int)sizeof(line))
        n = (int)sizeof(line) - 1;
    if (send(syslog_fd, line, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno == ENOTCONN) {
        struct sockaddr_un sa = { .sun_family = AF_UNIX };
        snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", SYSLOG_PATH);
        if (connect(syslog_fd, (struct sockaddr *)&sa, sizeof(sa)) == 0)
            send(syslog_fd, line, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
}

void uq_vlog(enum uq_level level, const char *fmt, va_list ap)
{
    if ((level == UQ_LOG_INFO && verbosity < 1) || (level == UQ_LOG_DEBUG && verbosity < 2))
        return;
    int saved = errno;
    char msg[LINE_MAX_LEN], line[LINE_MAX_LEN + 600];
    int n = 0;
    if (context[0])
        n = snprintf(msg, sizeof(msg), "%s: ", context);
    if (level == UQ_LOG_WARN && n < (int)sizeof(msg))
        n += snprintf(msg + n, sizeof(msg) - (size_t)n, "warning: ");
    if (n < (int)sizeof(msg))
        vsnprintf(msg + n, sizeof(msg) - (size_t)n, fmt, ap);
    int len = snprintf(line, sizeof(line), "ublk-qcow2: %s\n", msg);
    if (len >= (int)sizeof(line)) {
        len = (int)sizeof(line) - 1;
        line[len - 1] = '\n';
    }
    fflush(stderr);     /* keep order with anything stdio still holds */
    for (int off = 0; off < len;) {
        ssize_t w = write(STDERR_FILENO, line + off, (size_t)(len - off));
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            break;
        off += (int)w;
    }
    if (syslog_fd >= 0)
        to_syslog(level, msg);
    errno = saved;
}

void uq_verror(const char *fmt, va_list ap) { uq_vlog(UQ_LOG_ERR, fmt, ap); }

#define LOG_FN(name, level)                          \
    void name(const char *fmt, ...)                  \
    {                                                \
        va_list ap;                                  \
        va_start(ap, fmt);                           \
        uq_vlog(level, fmt, ap);                     \
        va_end(ap);                                  \
    }
LOG_FN(uq_error, UQ_LOG_ERR)
LOG_FN(uq_warn, UQ_LOG_WARN)
LOG_FN(uq_info, UQ_LOG_INFO)
LOG_FN(uq_debug, UQ_LOG_DEBUG)
