/* Per-thread io_uring event loop and the I/O primitives (see loop.h). */
#include "io/loop.h"
#include "io/log.h"
#include "io/coroutine.h"

#include <errno.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>

#ifndef IORING_SETUP_COOP_TASKRUN
#define IORING_SETUP_COOP_TASKRUN (1U << 8)
#endif
#ifndef IORING_SETUP_SINGLE_ISSUER
#define IORING_SETUP_SINGLE_ISSUER (1U << 12)
#endif
#ifndef IORING_SETUP_DEFER_TASKRUN
#define IORING_SETUP_DEFER_TASKRUN (1U << 13)
#endif

struct loop {
    struct io_uring ring;
    unsigned inflight;      /* SQEs queued or submitted, CQE not yet reaped */
    unsigned file_inflight; /* of which file I/O: completes without any peer */
    bool coalesce;          /* LOOP_COALESCE granted (deferred task work) */
    const uint8_t *fixed;   /* registered buffer 0, or NULL */
    size_t fixed_len;
    bool stopping;
    struct co_queue turn_wait;  /* loop_wait_file_turn */
};

/* A parked coroutine waiting for one CQE; lives on that coroutine's stack. */
struct io_waiter {
    struct co *co;
    int res;
    bool done;
    bool file;              /* counted in file_inflight */
};

static __thread struct loop *cur_loop;

struct loop *loop_new(unsigned entries)
{
    return loop_new_flags(entries, 0);
}

struct loop *loop_new_flags(unsigned entries, unsigned flags)
{
    struct loop *l = calloc(1, sizeof(*l));
    if (!l) {
        errno = ENOMEM;
        return NULL;
    }
    struct io_uring_params p;
    int ret = -EINVAL;
    if (flags & LOOP_COALESCE) {
        /* Deferred task work: the kernel wakes a waiter for file I/O
         * completions only once as many as it asked for are pending (socket
         * readiness still wakes it at once), see loop_run.  Linux 6.1+. */
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        ret = io_uring_queue_init_params(entries, &l->ring, &p);
        l->coalesce = ret == 0;
    }
    if (ret == -EINVAL) {
        memset(&p, 0, sizeof(p));
        /* A bigger CQ than SQ: many coroutines may have I/O in flight at once. */
        p.flags = IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_COOP_TASKRUN | IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        ret = io_uring_queue_init_params(entries, &l->ring, &p);
    }
    if (ret == -EINVAL) {
        memset(&p, 0, sizeof(p));
        p.flags = IORING_SETUP_CQSIZE;
        p.cq_entries = entries * 4;
        ret = io_uring_queue_init_params(entries, &l->ring, &p);
    }
    if (ret == -EINVAL)
        ret = io_uring_queue_init(entries, &l->ring, 0);
    if (ret < 0) {
        free(l);
        errno = -ret;
        return NULL;
    }
    cur_loop = l;
    return l;
}

int loop_register_buffer(struct loop *l, void *base, size_t len)
{
    struct iovec iov = { base, len };
    int r;

    if (l->fixed)
        return -EBUSY;
    r = io_uring_register_buffers(&l->ring, &iov, 1);
    if (r < 0)
        return r;
    l->fixed = base;
    l->fixed_len = len;
    return 0;
}

void loop_unregister_buffer(struct loop *l)
{
    if (!l->fixed)
        return;
    io_uring_unregister_buffers(&l->ring);
    l->fixed = NULL;
    l->fixed_len = 0;
}

void loop_free(struct loop *l)
{
    if (!l)
        return;
    io_uring_queue_exit(&l->ring);
    if (cur_loop == l)
        cur_loop = NULL;
    free(l);
}

struct loop *loop_current(void)
{
    return cur_loop;
}

void loop_stop(struct loop *l)
{
    l->stopping = true;
}

bool loop_stopping(struct loop *l)
{
    return l->stopping;
}

/* A CQE's user data: an io_waiter, or an io_cqe_sink with the low bit set
 * (both are aligned), or NULL (nobody waits). */
#define SINK_BIT 1ul

static void loop_reap(struct loop *l)
{
    struct io_uring_cqe *cqe;
    unsigned head, seen = 0;

    io_uring_for_each_cqe(&l->ring, head, cqe) {
        uintptr_t ud = (uintptr_t)io_uring_cqe_get_data(cqe);
        struct io_waiter *w = (struct io_waiter *)ud;
        seen++;
        if (ud & SINK_BIT) {
            struct io_cqe_sink *s = (struct io_cqe_sink *)(ud & ~SINK_BIT);
            if (!(cqe->flags & IORING_CQE_F_MORE))
                l->inflight--;
            s->fn(s, cqe->res, cqe->flags);
            continue;
        }
        if (!w)
            continue;
        w->res = cqe->res;
        w->done = true;
        l->inflight--;
        if (w->file)
            l->file_inflight--;
        co_wake(w->co);
    }
    io_uring_cq_advance(&l->ring, seen);
}

int loop_run(struct loop *l)
{
    for (;;) {
        co_run_ready();
        if (l->stopping && co_live_count() == 0)
            return 0;
        if (l->inflight == 0) {
            if (co_live_count() == 0)
                return 0;
            uq_error("loop: all coroutines parked with no I/O in flight");
            return -EDEADLK;
        }
        /* One submit for every SQE queued by the coroutines that just ran.
         * With many file I/Os in flight, sleep until a quarter of them are
         * done (or a socket has news): bigger batches per wakeup and per
         * submit, which the block layer dispatches together.  Only file I/O
         * is counted, since it completes whatever any peer does. */
        unsigned want = 1;
        if (l->coalesce && l->file_inflight >= 8)
            want = l->file_inflight / 4;
        int ret = io_uring_submit_and_wait(&l->ring, want);
        if (ret < 0 && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN) {
            uq_error("loop: io_uring_submit_and_wait: %s", strerror(-ret));
            return ret;
        }
        loop_reap(l);
        co_queue_wake_all(&l->turn_wait);
    }
}

/* ---- coroutine-mode plumbing ------------------------------------------ */

static inline struct loop *async_loop(void)
{
    return co_self() ? cur_loop : NULL;
}

bool loop_wait_file_turn(unsigned min)
{
    struct loop *l = async_loop();

    if (!l || !l->coalesce || l->file_inflight < min)
        return false;
    co_queue_wait(&l->turn_wait);
    return true;
}

static struct io_uring_sqe *loop_sqe(struct loop *l)
{
    struct io_uring_sqe *sqe;
    while ((sqe = io_uring_get_sqe(&l->ring)) == NULL) {
        /* SQ full: push what is queued to the kernel to make room (and,
         * with deferred task work, post the completions that are ready). */
        int ret = l->coalesce ? io_uring_submit_and_get_events(&l->ring)
                              : io_uring_submit(&l->ring);
        if (ret < 0 && ret != -EINTR && ret != -EBUSY && ret != -EAGAIN) {
            uq_error("loop: io_uring_submit: %s", strerror(-ret));
            abort();
        }
        if (ret <= 0)
            loop_reap(l);   /* CQ backlog: completions only mark waiters ready */
    }
    return sqe;
}

static int loop_wait_as(struct loop *l, struct io_uring_sqe *sqe, bool file)
{
    struct io_waiter w = { co_self(), 0, false, file };
    io_uring_sqe_set_data(sqe, &w);
    l->inflight++;
    l->file_inflight += file;
    while (!w.done)
        co_yield();
    return w.res;
}

static int loop_wait(struct loop *l, struct io_uring_sqe *sqe)
{
    return loop_wait_as(l, sqe, false);
}

int io_submit_wait(io_prep_fn prep, void *arg)
{
    struct loop *l = async_loop();
    if (!l)
        return -EINVAL;
    struct io_uring_sqe *sqe = loop_sqe(l);
    prep(sqe, arg);
    return loop_wait(l, sqe);
}

int io_submit_sink(io_prep_fn prep, void *arg, struct io_cqe_sink *sink)
{
    struct loop *l = cur_loop;
    if (!l)
        return -EINVAL;
    struct io_uring_sqe *sqe = loop_sqe(l);
    prep(sqe, arg);
    io_uring_sqe_set_data(sqe, (void *)((uintptr_t)sink | SINK_BIT));
    l->inflight++;
    return 0;
}

int loop_submit_sync(struct loop *l, io_prep_fn prep, void *arg)
{
    if (l->inflight)
        return -EBUSY;
    struct io_uring_sqe *sqe = loop_sqe(l);
    prep(sqe, arg);
    io_uring_sqe_set_data(sqe, NULL);
    int ret = io_uring_submit_and_wait(&l->ring, 1);
    if (ret < 0)
        return ret;
    struct io_uring_cqe *cqe;
    ret = io_uring_wait_cqe(&l->ring, &cqe);
    if (ret < 0)
        return ret;
    ret = cqe->res;
    io_uring_cqe_seen(&l->ring, cqe);
    return ret;
}

struct io_uring_buf_ring *loop_buf_ring_new(struct loop *l, unsigned entries, unsigned bgid)
{
    size_t len = (size_t)entries * sizeof(struct io_uring_buf);
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    void *p = NULL;
    /* The kernel maps the ring by pages: page-aligned, whole pages. */
    int r = posix_memalign(&p, pg, (len + pg - 1) / pg * pg);
    if (r != 0) {
        errno = r;
        return NULL;
    }
    struct io_uring_buf_ring *br = p;
    io_uring_buf_ring_init(br);
    struct io_uring_buf_reg reg = {
        .ring_addr = (uint64_t)(uintptr_t)br, .ring_entries = entries, .bgid = (uint16_t)bgid,
    };
    r = io_uring_register_buf_ring(&l->ring, &reg, 0);
    if (r < 0) {
        free(p);
        errno = -r;
        return NULL;
    }
    return br;
}

/* A READ_FIXED or WRITE_FIXED of registered buffer idx; addr is a user
 * address for a buffer we registered, the offset into it for one the
 * kernel registered. */
static void prep_rw_fixed(struct io_uring_sqe *sqe, bool write, int fd, void *addr, size_t len,
                          uint64_t off, unsigned idx)
{
    if (write)
        io_uring_prep_write_fixed(sqe, fd, addr, (unsigned)len, off, (int)idx);
    else
        io_uring_prep_read_fixed(sqe, fd, addr, (unsigned)len, off, (int)idx);
}

/* One transfer's result in a loop moving len bytes: 1 go on (counted in
 * *done, or an interrupted try to repeat), 0 stop at the end of the file
 * (a read), -errno fail (a write that made no progress: -EIO). */
static int rw_progress(ssize_t ret, bool write, size_t *done)
{
    if (ret == -EINTR || ret == -EAGAIN)
        return 1;
    if (ret < 0)
        return (int)ret;
    if (ret == 0)
        return write ? -EIO : 0;
    *done += (size_t)ret;
    return 1;
}

int loop_register_sparse(struct loop *l, unsigned n)
{
    return io_uring_register_buffers_sparse(&l->ring, n);
}

ssize_t io_rw_fixed(bool write, int fd, unsigned idx, uint64_t buf_off, size_t len, uint64_t off,
                    int rw_flags)
{
    struct loop *l = async_loop();
    if (!l)
        return -EINVAL;
    size_t done = 0;
    while (done < len) {
        struct io_uring_sqe *sqe = loop_sqe(l);
        /* For a buffer the kernel registered (a bvec table), the address
         * is the byte offset into that buffer. */
        prep_rw_fixed(sqe, write, fd, (void *)(uintptr_t)(buf_off + done), len - done, off + done, idx);
        sqe->rw_flags = rw_flags;
        int r = rw_progress(loop_wait_as(l, sqe, true), write, &done);
        if (r <= 0) {
            if (r < 0)
                return r;
            break;
        }
    }
    return (ssize_t)done;
}

/* ---- positional file I/O ---------------------------------------------- */

#define IOV_WINDOW 64

/* One read or write attempt; may transfer less than asked. */
static ssize_t rw_once(bool write, bool now, int fd, const struct iovec *iov, int iovcnt,
                       uint64_t off, int rw_flags)
{
    struct loop *l = now ? NULL : async_loop();
    ssize_t ret;

    if (l) {
        struct io_uring_sqe *sqe = loop_sqe(l);
        const uint8_t *b = iov[0].iov_base;
        if (iovcnt == 1 && l->fixed && b >= l->fixed && iov[0].iov_len <= l->fixed_len &&
            (size_t)(b - l->fixed) <= l->fixed_len - iov[0].iov_len) {
            /* Inside the registered buffer: no page pinning per I/O. */
            prep_rw_fixed(sqe, write, fd, iov[0].iov_base, iov[0].iov_len, off, 0);
        } else if (iovcnt == 1) {
            if (write)
                io_uring_prep_write(sqe, fd, iov[0].iov_base, iov[0].iov_len, off);
            else
                io_uring_prep_read(sqe, fd, iov[0].iov_base, iov[0].iov_len, off);
        } else {
            if (write)
                io_uring_prep_writev(sqe, fd, iov, iovcnt, off);
            else
                io_uring_prep_readv(sqe, fd, iov, iovcnt, off);
        }
        sqe->rw_flags = rw_flags;
        return loop_wait_as(l, sqe, true);
    }
    do {
        if (write)
            ret = rw_flags ? pwritev2(fd, iov, iovcnt, off, rw_flags)
                           : (iovcnt == 1 ? pwrite(fd, iov[0].iov_base, iov[0].iov_len, off)
                                          : pwritev(fd, iov, iovcnt, off));
        else
            ret = rw_flags ? preadv2(fd, iov, iovcnt, off, rw_flags)
                           : (iovcnt == 1 ? pread(fd, iov[0].iov_base, iov[0].iov_len, off)
                                          : preadv(fd, iov, iovcnt, off));
    } while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

/* Fill win with the part of iov that starts `skip` bytes in. */
static int iov_window(const struct iovec *iov, int iovcnt, size_t skip, struct iovec *win)
{
    int i = 0, n = 0;
    while (i < iovcnt && skip >= iov[i].iov_len)
        skip -= iov[i++].iov_len;
    for (; i < iovcnt && n < IOV_WINDOW; i++, n++) {
        win[n].iov_base = (char *)iov[i].iov_base + skip;
        win[n].iov_len = iov[i].iov_len - skip;
        skip = 0;
    }
    return n;
}

static ssize_t rw_full(bool write, bool now, int fd, const struct iovec *iov, int iovcnt,
                       uint64_t off, int rw_flags)
{
    struct iovec win[IOV_WINDOW];
    const struct iovec *cur = iov;
    int curcnt = iovcnt;
    size_t total = 0, done = 0;

    for (int i = 0; i < iovcnt; i++)
        total += iov[i].iov_len;
    if (iovcnt > IOV_WINDOW) {
        curcnt = iov_window(iov, iovcnt, 0, win);
        cur = win;
    }
    while (done < total) {
        int r = rw_progress(rw_once(write, now, fd, cur, curcnt, off + done, rw_flags), write, &done);
        if (r <= 0) {
            if (r < 0)
                return r;
            break;
        }
        if (done < total) {
            curcnt = iov_window(iov, iovcnt, done, win);
            cur = win;
        }
    }
    return (ssize_t)done;
}

ssize_t io_pread(int fd, void *buf, size_t len, uint64_t off)
{
    struct iovec iov = { buf, len };
    return rw_full(false, false, fd, &iov, 1, off, 0);
}

ssize_t io_pwrite(int fd, const void *buf, size_t len, uint64_t off, int rw_flags)
{
    struct iovec iov = { (void *)buf, len };
    return rw_full(true, false, fd, &iov, 1, off, rw_flags);
}

ssize_t io_preadv(int fd, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return rw_full(false, false, fd, iov, iovcnt, off, 0);
}

ssize_t io_pwritev(int fd, const struct iovec *iov, int iovcnt, uint64_t off, int rw_flags)
{
    return rw_full(true, false, fd, iov, iovcnt, off, rw_flags);
}

ssize_t io_preadv_now(int fd, const struct iovec *iov, int iovcnt, uint64_t off)
{
    return rw_full(false, true, fd, iov, iovcnt, off, 0);
}

ssize_t io_pwritev_now(int fd, const struct iovec *iov, int iovcnt, uint64_t off, int rw_flags)
{
    return rw_full(true, true, fd, iov, iovcnt, off, rw_flags);
}

int io_fdatasync(int fd)
{
    struct loop *l = async_loop();
    if (l) {
        struct io_uring_sqe *sqe = loop_sqe(l);
        io_uring_prep_fsync(sqe, fd, IORING_FSYNC_DATASYNC);
        return loop_wait(l, sqe);
    }
    int ret;
    do
        ret = fdatasync(fd);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : 0;
}

int io_fallocate(int fd, int mode, uint64_t off, uint64_t len)
{
    struct loop *l = async_loop();
    if (l) {
        struct io_uring_sqe *sqe = loop_sqe(l);
        io_uring_prep_fallocate(sqe, fd, mode, (off_t)off, (off_t)len);
        return loop_wait(l, sqe);
    }
    int ret;
    do
        ret = fallocate(fd, mode, (off_t)off, (off_t)len);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : 0;
}

/* ---- sockets and other fds -------------------------------------------- */

ssize_t io_recv(int fd, void *buf, size_t len, int flags)
{
    struct loop *l = async_loop();
    ssize_t ret;
    if (l) {
        do {
            struct io_uring_sqe *sqe = loop_sqe(l);
            io_uring_prep_recv(sqe, fd, buf, len, flags);
            ret = loop_wait(l, sqe);
        } while (ret == -EINTR);
        return ret;
    }
    do
        ret = recv(fd, buf, len, flags);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

ssize_t io_send(int fd, const void *buf, size_t len, int flags)
{
    struct loop *l = async_loop();
    ssize_t ret;
    if (l) {
        do {
            struct io_uring_sqe *sqe = loop_sqe(l);
            io_uring_prep_send(sqe, fd, buf, len, flags);
            ret = loop_wait(l, sqe);
        } while (ret == -EINTR);
        return ret;
    }
    do
        ret = send(fd, buf, len, flags);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

int io_sendv_all(int fd, struct iovec *iov, int cnt)
{
    struct msghdr msg;
    memset(&msg, 0, sizeof(msg));
    while (cnt > 0) {
        msg.msg_iov = iov;
        msg.msg_iovlen = (size_t)cnt;
        ssize_t r = io_sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (r == -EINTR || r == -EAGAIN)
            continue;
        if (r < 0)
            return (int)r;
        if (r == 0)
            return -EPIPE;
        while (cnt > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

ssize_t io_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    struct loop *l = async_loop();
    ssize_t ret;
    if (l) {
        do {
            struct io_uring_sqe *sqe = loop_sqe(l);
            io_uring_prep_sendmsg(sqe, fd, msg, (unsigned)flags);
            ret = loop_wait(l, sqe);
        } while (ret == -EINTR);
        return ret;
    }
    do
        ret = sendmsg(fd, msg, flags);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

ssize_t io_read(int fd, void *buf, size_t len)
{
    struct loop *l = async_loop();
    ssize_t ret;
    if (l) {
        do {
            struct io_uring_sqe *sqe = loop_sqe(l);
            /* Offset -1: the fd's own position (pipes, eventfds, ...). */
            io_uring_prep_read(sqe, fd, buf, len, (uint64_t)-1);
            ret = loop_wait(l, sqe);
        } while (ret == -EINTR);
        return ret;
    }
    do
        ret = read(fd, buf, len);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

int io_accept(int fd)
{
    struct loop *l = async_loop();
    int ret;
    if (l) {
        do {
            struct io_uring_sqe *sqe = loop_sqe(l);
            io_uring_prep_accept(sqe, fd, NULL, NULL, SOCK_CLOEXEC);
            ret = loop_wait(l, sqe);
        } while (ret == -EINTR);
        return ret;
    }
    do
        ret = accept4(fd, NULL, NULL, SOCK_CLOEXEC);
    while (ret < 0 && errno == EINTR);
    return ret < 0 ? -errno : ret;
}

ssize_t io_recv_all(int fd, void *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t ret = io_recv(fd, (char *)buf + done, len - done, MSG_WAITALL);
        if (ret < 0)
            return ret;
        if (ret == 0)
            return done == 0 ? 0 : -ECONNRESET;   /* peer closed mid-message */
        done += (size_t)ret;
    }
    return (ssize_t)len;
}

ssize_t io_send_all(int fd, const void *buf, size_t len)
{
    size_t done = 0;
    while (done < len) {
        ssize_t ret = io_send(fd, (const char *)buf + done, len - done, MSG_NOSIGNAL);
        if (ret < 0)
            return ret;
        if (ret == 0)
            return -EPIPE;
        done += (size_t)ret;
    }
    return (ssize_t)len;
}

/* ---- aligned buffers ---------------------------------------------------- */

void *io_alloc(size_t len)
{
    void *p;
    if (posix_memalign(&p, IO_ALIGN, len ? len : 1) != 0) {
        uq_error("out of memory allocating %zu bytes", len);
        abort();
    }
    return p;
}

void *io_zalloc(size_t len)
{
    void *p = io_alloc(len);
    memset(p, 0, len);
    return p;
}

void io_free(void *p)
{
    free(p);
}
