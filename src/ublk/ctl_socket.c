/* The ublk daemon's control socket (see ctl_socket.h). */
#include "ublk/ctl_socket.h"
#include "ublk/server.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define CTL_SERVER_TIMEOUT_MS 1000      /* a client gets this long to ask, and to read */
#define CTL_CLIENT_TIMEOUT_MS 60000     /* the daemon may be busy (a flush) before answering */

static int ctl_addr(uint32_t id, struct sockaddr_un *sa)
{
    memset(sa, 0, sizeof(*sa));
    sa->sun_family = AF_UNIX;
    int n = snprintf(sa->sun_path, sizeof(sa->sun_path), "%s/ublk%u.sock", UBLK_STATE_DIR, id);
    return n < (int)sizeof(sa->sun_path) ? 0 : -ENAMETOOLONG;
}

static int ctl_listen(uint32_t id, char *err, size_t errlen)
{
    struct sockaddr_un sa;
    int r = ctl_addr(id, &sa);
    if (r == 0 && mkdir(UBLK_STATE_DIR, 0755) < 0 && errno != EEXIST)
        r = -errno;
    int fd = r == 0 ? socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0) : -1;
    if (r == 0 && fd < 0)
        r = -errno;
    if (r == 0) {
        /* A socket left by a daemon of the same id that died. */
        unlink(sa.sun_path);
        mode_t old = umask(077);
        if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 8) < 0)
            r = -errno;
        umask(old);
    }
    if (r < 0) {
        snprintf(err, errlen, "cannot create the control socket %s: %s", sa.sun_path, strerror(-r));
        if (fd >= 0)
            close(fd);
        return r;
    }
    return fd;
}

/* Read up to a newline, waiting at most timeout_ms between reads; returns
 * the length or -1. */
static int read_line(int fd, char *buf, size_t len, int timeout_ms)
{
    size_t have = 0;
    while (have + 1 < len) {
        struct pollfd pf = { .fd = fd, .events = POLLIN };
        int pr = poll(&pf, 1, timeout_ms);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            return -1;
        ssize_t n = read(fd, buf + have, len - 1 - have);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            break;
        have += (size_t)n;
        buf[have] = '\0';
        char *nl = memchr(buf, '\n', have);
        if (nl) {
            *nl = '\0';
            return (int)(nl - buf);
        }
    }
    return -1;
}

static int write_all(int fd, const char *buf, size_t len)
{
    while (len) {
        struct pollfd pf = { .fd = fd, .events = POLLOUT };
        int pr = poll(&pf, 1, CTL_SERVER_TIMEOUT_MS);
        if (pr < 0 && errno == EINTR)
            continue;
        if (pr <= 0)
            return -1;
        ssize_t n = send(fd, buf, len, MSG_NOSIGNAL);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            return -1;
        buf += n;
        len -= (size_t)n;
    }
    return 0;
}

struct ctl_server {
    int listen_fd;
    uint32_t id;
    ctl_answer_fn answer;
    void *arg;
    pthread_mutex_t lock;
    pthread_cond_t idle;        /* signalled when clients drops to 0 */
    unsigned clients;           /* threads serving a client now */
};

struct ctl_client {
    struct ctl_server *s;
    int fd;
};

static void *serve_client(void *arg)
{
    struct ctl_client *cl = arg;
    struct ctl_server *s = cl->s;
    char req[CTL_REQUEST_MAX], reply[CTL_LINE_MAX];
    if (read_line(cl->fd, req, sizeof(req), CTL_SERVER_TIMEOUT_MS) >= 0) {
        s->answer(s->arg, req, reply, sizeof(reply) - 1);
        size_t n = strlen(reply);
        reply[n++] = '\n';
        write_all(cl->fd, reply, n);
    }
    close(cl->fd);
    free(cl);
    pthread_mutex_lock(&s->lock);
    if (--s->clients == 0)
        pthread_cond_broadcast(&s->idle);
    pthread_mutex_unlock(&s->lock);
    return NULL;
}

struct ctl_server *ctl_server_start(uint32_t id, ctl_answer_fn answer, void *arg, char *err,
                                    size_t errlen)
{
    struct ctl_server *s = calloc(1, sizeof(*s));
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->listen_fd = ctl_listen(id, err, errlen);
    if (s->listen_fd < 0) {
        free(s);
        return NULL;
    }
    s->id = id;
    s->answer = answer;
    s->arg = arg;
    pthread_mutex_init(&s->lock, NULL);
    pthread_cond_init(&s->idle, NULL);
    return s;
}

int ctl_server_fd(const struct ctl_server *s)
{
    return s ? s->listen_fd : -1;
}

void ctl_server_accept(struct ctl_server *s)
{
    for (;;) {
        int fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0)
            return;     /* EAGAIN: no one else waits */
        struct ctl_client *cl = malloc(sizeof(*cl));
        pthread_mutex_lock(&s->lock);
        bool room = cl && s->clients < CTL_MAX_CLIENTS;
        if (room)
            s->clients++;
        pthread_mutex_unlock(&s->lock);
        pthread_attr_t attr;
        pthread_t t;
        bool started = false;
        if (room && pthread_attr_init(&attr) == 0) {
            pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
            pthread_attr_setstacksize(&attr, 256 << 10);
            cl->s = s;
            cl->fd = fd;
            started = pthread_create(&t, &attr, serve_client, cl) == 0;
            pthread_attr_destroy(&attr);
        }
        if (!started) {
            /* Over the limit (or no thread): this client goes unanswered. */
            close(fd);
            free(cl);
            if (room) {
                pthread_mutex_lock(&s->lock);
                s->clients--;
                pthread_mutex_unlock(&s->lock);
            }
        }
    }
}

void ctl_server_stop(struct ctl_server *s)
{
    if (!s)
        return;
    struct sockaddr_un sa;
    close(s->listen_fd);
    if (ctl_addr(s->id, &sa) == 0)
        unlink(sa.sun_path);
    /* Every client thread ends within its timeouts plus its answer. */
    pthread_mutex_lock(&s->lock);
    while (s->clients)
        pthread_cond_wait(&s->idle, &s->lock);
    pthread_mutex_unlock(&s->lock);
    pthread_mutex_destroy(&s->lock);
    pthread_cond_destroy(&s->idle);
    free(s);
}

/* The socket of a device of root's, for a user whose own state directory
 * has none: the user may not ask it (EACCES, not "no daemon"). */
static bool roots_socket_exists(uint32_t id)
{
    if (geteuid() == 0)
        return false;
    char root_dir[256], path[320];
    struct stat st;
    ublk_state_dir_of(0, root_dir, sizeof(root_dir));
    snprintf(path, sizeof(path), "%s/ublk%u.sock", root_dir, id);
    return stat(path, &st) == 0 && S_ISSOCK(st.st_mode);
}

int ctl_request(uint32_t id, const char *request, char *reply, size_t len)
{
    return ctl_request_wait(id, request, reply, len, CTL_CLIENT_TIMEOUT_MS);
}

int ctl_request_wait(uint32_t id, const char *request, char *reply, size_t len, int timeout_ms)
{
    struct sockaddr_un sa;
    int r = ctl_addr(id, &sa);
    if (r < 0)
        return r;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        r = errno == ECONNREFUSED ? -ENOENT : -errno;
        if (r == -ENOENT && roots_socket_exists(id))
            r = -EACCES;
        close(fd);
        return r;
    }
    char line[CTL_REQUEST_MAX];
    int n = snprintf(line, sizeof(line), "%s\n", request);
    if (n >= (int)sizeof(line) || write_all(fd, line, (size_t)n) < 0 || read_line(fd, reply, len, timeout_ms) < 0)
        r = -EIO;
    close(fd);
    return r;
}
