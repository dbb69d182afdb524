/* ublk queues: one engine thread serving the tags of every queue (see
 * queue.h). */
#include "ublk/queue.h"
#include "io/log.h"
#include "io/coroutine.h"
#include "io/loop.h"
#include "io/mailbox.h"
#include "io/stat.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct ublk_tag {
    struct ublk_queue *q;
    unsigned tag;
    void *buf;
    struct co *co;
    unsigned cmd_op;        /* next command: FETCH, then COMMIT_AND_FETCH */
    int result;             /* committed with the next COMMIT_AND_FETCH */
    /* The request being served (a copy of the descriptor). */
    struct ublksrv_io_desc desc;
};

struct ublk_queue {
    struct ublk_queues *qs;
    unsigned qid;
    const struct ublksrv_io_desc *descs;
    size_t descs_len;
    struct ublk_tag *tags;
};

/* A bounce buffer of the copy path (zero copy devices), kept for reuse. */
struct bounce {
    struct bounce *next;
};

enum start_state { START_WAIT, START_GO, START_ABORT };

/* A function to run on the engine thread with the device quiesced
 * (ublk_queues_exclusive); the caller waits on cond for done. */
struct engine_call {
    struct mbox_msg m;          /* first: a mbox_msg pointer is an engine_call pointer */
    int (*fn)(void *arg);       /* NULL: the quit note of the control coroutine */
    void *arg;
    int result;
    bool done;
    pthread_mutex_t *lock;
    pthread_cond_t cond;
};

struct ublk_queues {
    struct ublk_queues_cfg cfg;
    int cdev_fd;
    int done_fd;
    struct ublk_queue *queues;
    /* The one thread: it fetches and commits every queue's tags on its own
     * ring and runs the engine, so no request crosses a thread. */
    pthread_t thread;
    bool thread_started;
    struct loop *loop;
    unsigned live_tags;         /* tag coroutines still fetching (all queues) */
    int err;
    atomic_ullong served;
    struct bounce *bounces;     /* free bounce buffers (engine thread only) */
    /* Written by the engine thread only (tag_execute). */
    struct {
        stat_counter ops[5], bytes[2], errors, in_flight;
    } st;
    /* Exclusive calls (engine thread): ctl is the engine's inbox for them;
     * the gate, while closed, holds new requests before they enter the
     * engine; active counts the requests inside it. */
    struct mailbox *ctl;
    struct engine_call ctl_quit;
    bool ctl_closed;            /* under lock: no call is taken any more */
    bool gate_closed;
    bool gate_sealed;           /* handed over: the gate never opens again */
    unsigned active;
    struct co_queue gate, drained;
    /* Start-up handshake: the thread makes its loop, then waits for go. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool ready;
    enum start_state state;
};

static size_t page_round(size_t n)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (n + pg - 1) / pg * pg;
}

/* ---- the engine: every img_* call happens on the engine thread ------------- */

static int tag_execute_op(struct ublk_tag *t);
static int tag_execute_counted(struct ublk_tag *t);

/* Kinds of request in ublk_queues.st.ops, in ublk_io_stats order. */
enum { ST_READ, ST_WRITE, ST_FLUSH, ST_DISCARD, ST_WRITE_ZEROES };

static int tag_execute(struct ublk_tag *t)
{
    struct ublk_queues *qs = t->q->qs;
    /* An exclusive call (a snapshot, a resize) holds new requests here
     * until it is done: they wait, nothing fails. */
    while (qs->gate_closed)
        co_queue_wait(&qs->gate);
    qs->active++;
    int r = tag_execute_counted(t);
    if (--qs->active == 0 && qs->gate_closed)
        co_queue_wake_all(&qs->drained);
    return r;
}

static int tag_execute_counted(struct ublk_tag *t)
{
    struct ublk_queues *qs = t->q->qs;
    unsigned op = ublksrv_get_op(&t->desc);
    int kind = op == UBLK_IO_OP_READ ? ST_READ : op == UBLK_IO_OP_WRITE ? ST_WRITE
             : op == UBLK_IO_OP_FLUSH ? ST_FLUSH : op == UBLK_IO_OP_DISCARD ? ST_DISCARD
             : op == UBLK_IO_OP_WRITE_ZEROES ? ST_WRITE_ZEROES : -1;
    stat_add(&qs->st.in_flight, 1);
    int r = tag_execute_op(t);
    stat_sub(&qs->st.in_flight, 1);
    if (kind >= 0)
        stat_add(&qs->st.ops[kind], 1);
    if (r < 0)
        stat_add(&qs->st.errors, 1);
    else if (kind == ST_READ || kind == ST_WRITE)
        stat_add(&qs->st.bytes[kind], (uint64_t)t->desc.nr_sectors << 9);
    return r;
}

static void *bounce_get(struct ublk_queues *qs)
{
    struct bounce *b = qs->bounces;
    if (!b)
        return io_alloc(qs->cfg.buf_bytes);
    qs->bounces = b->next;
    return b;
}

static void bounce_put(struct ublk_queues *qs, void *p)
{
    struct bounce *b = p;
    b->next = qs->bounces;
    qs->bounces = b;
}

/* The copy path of a zero copy device: the request's bytes move between
 * its pages and a bounce buffer by user copy (a plain memory copy in the
 * kernel, which never waits: done inline), and the engine does the rest. */
static int tag_rw_copy(struct ublk_tag *t, bool write, uint64_t off, uint64_t len, unsigned flags)
{
    struct ublk_queues *qs = t->q->qs;
    struct image *img = qs->cfg.img;
    off_t pos = (off_t)ublk_user_copy_pos(t->q->qid, t->tag, 0);
    void *buf = bounce_get(qs);
    int r = 0;
    if (write) {
        ssize_t n = pread(qs->cdev_fd, buf, len, pos);
        r = n < 0 ? -errno : (uint64_t)n != len ? -EIO : 0;
        if (r == 0)
            r = img_write(img, buf, off, len, flags);
    } else {
        r = img_read(img, buf, off, len);
        if (r == 0) {
            ssize_t n = pwrite(qs->cdev_fd, buf, len, pos);
            r = n < 0 ? -errno : (uint64_t)n != len ? -EIO : 0;
        }
    }
    bounce_put(qs, buf);
    return r;
}

/* A read or write on a zero copy device: in place with the request's
 * registered pages when the image says the range is one plain extent,
 * else the copy path. */
static int tag_rw_zc(struct ublk_tag *t, bool write, uint64_t off, uint64_t len, unsigned flags)
{
    struct ublk_queues *qs = t->q->qs;
    struct image *img = qs->cfg.img;
    /* Registration failed (the kernel said so instead of failing the
     * request): only user copy reaches the data. */
    if (ublksrv_get_flags(&t->desc) & UBLK_IO_F_NEED_REG_BUF)
        return tag_rw_copy(t, write, off, len, flags);
    unsigned mf = flags | (write ? IMG_MAP_WRITE : 0);
    struct img_map m;
    int r = img_map(img, off, len, mf, &m);
    if (r <= 0)
        return r < 0 ? r : tag_rw_copy(t, write, off, len, flags);
    unsigned idx = t->q->qid * qs->cfg.depth + t->tag;
    /* FUA: RWF_DSYNC makes this data durable before the completion;
     * img_map_end adds the flush a mapping not yet on disk needs. */
    ssize_t n = io_rw_fixed(write, m.file->fd, idx, 0, len, m.host,
                            write && (flags & IMG_FUA) ? RWF_DSYNC : 0);
    bool short_read = !write && n >= 0 && (uint64_t)n < len;
    r = img_map_end(img, &m, mf, n < 0 ? (int)n : 0);
    /* A read past the end of the file (a cluster allocated but never
     * written out): the copy path reads the rest as zeros. */
    if (r == 0 && short_read)
        return tag_rw_copy(t, write, off, len, flags);
    return r;
}

/* A read or write: zero copy devices by tag_rw_zc, others with the tag's
 * buffer. */
static int tag_rw(struct ublk_tag *t, bool write, uint64_t off, uint64_t len, unsigned flags)
{
    struct ublk_queues *qs = t->q->qs;
    if (len > qs->cfg.buf_bytes)
        return -EIO;
    int r = qs->cfg.zero_copy ? tag_rw_zc(t, write, off, len, flags)
            : write ? img_write(qs->cfg.img, t->buf, off, len, flags)
            : img_read(qs->cfg.img, t->buf, off, len);
    return r < 0 ? r : (int)len;
}

static int tag_execute_op(struct ublk_tag *t)
{
    struct image *img = t->q->qs->cfg.img;
    const struct ublksrv_io_desc *d = &t->desc;
    unsigned op = ublksrv_get_op(d);
    uint64_t off = d->start_sector << 9;
    uint64_t len = (uint64_t)d->nr_sectors << 9;

    switch (op) {
    case UBLK_IO_OP_READ:
        return tag_rw(t, false, off, len, 0);
    case UBLK_IO_OP_WRITE:
        /* FUA: the kernel wants this write durable before it completes. */
        return tag_rw(t, true, off, len, (d->op_flags & UBLK_IO_F_FUA) ? IMG_FUA : 0);
    case UBLK_IO_OP_FLUSH:
        return img_flush(img);
    case UBLK_IO_OP_DISCARD:
        return img_discard(img, off, len);
    case UBLK_IO_OP_WRITE_ZEROES:
        /* NOUNMAP: the caller wants the range to stay allocated. */
        return img_write_zeroes(img, off, len, (d->op_flags & UBLK_IO_F_NOUNMAP) ? IMG_NO_HOLE : 0);
    default:
        return -EOPNOTSUPP;
    }
}

/* ---- exclusive calls ---------------------------------------------------------- */

static void call_finish(struct engine_call *c, int result)
{
    pthread_mutex_lock(c->lock);
    c->result = result;
    c->done = true;
    pthread_cond_signal(&c->cond);
    pthread_mutex_unlock(c->lock);
}

/* Take each call, quiesce (close the gate, wait for the requests inside the
 * engine to finish), run it, reopen the gate.  The quit note (every tag is
 * done) ends this coroutine, so the loop can end. */
static void engine_control(void *arg)
{
    struct ublk_queues *qs = arg;
    for (;;) {
        struct mbox_msg *m = mailbox_wait(qs->ctl);
        if (!m) {
            fprintf(stderr, "ublk: control mailbox failed: %s\n", strerror(errno));
            abort();
        }
        while (m) {
            struct engine_call *c = (struct engine_call *)m;
            m = m->next;
            if (!c->fn) {
                /* Calls posted after this one are answered when the
                 * thread ends (ublk_queues_exclusive sees ctl_closed). */
                while (m) {
                    struct engine_call *rest = (struct engine_call *)m;
                    m = m->next;
                    if (rest->fn)
                        call_finish(rest, -ESHUTDOWN);
                }
                return;
            }
            if (qs->gate_sealed) {
                /* Handed over: the image is the next daemon's now. */
                call_finish(c, -ESHUTDOWN);
                continue;
            }
            qs->gate_closed = true;
            while (qs->active)
                co_queue_wait(&qs->drained);
            int r = c->fn(c->arg);
            if (!qs->gate_sealed) {
                qs->gate_closed = false;
                co_queue_wake_all(&qs->gate);
            }
            call_finish(c, r);
        }
    }
}

int ublk_queues_exclusive(struct ublk_queues *qs, int (*fn)(void *arg), void *arg)
{
    struct engine_call c = { .fn = fn, .arg = arg, .lock = &qs->lock };
    pthread_cond_init(&c.cond, NULL);
    pthread_mutex_lock(&qs->lock);
    int r = 0;
    if (qs->ctl_closed)
        r = -ESHUTDOWN;
    else if (mailbox_post(qs->ctl, &c.m) < 0)
        r = -errno;
    while (r == 0 && !c.done)
        pthread_cond_wait(&c.cond, &qs->lock);
    pthread_mutex_unlock(&qs->lock);
    pthread_cond_destroy(&c.cond);
    return r < 0 ? r : c.result;
}

static void prep_nop(struct io_uring_sqe *sqe, void *arg)
{
    (void)arg;
    io_uring_prep_nop(sqe);
}

/* Run by engine_control with the gate closed and the engine drained. */
static int hand_over(void *arg)
{
    struct ublk_queues *qs = arg;
    /* Flush first: once sealed there is no way back to serving, and a
     * failed flush must leave a daemon that still has the acknowledged
     * writes (its metadata cache) serving the device. */
    int r = img_flush(qs->cfg.img);
    if (r < 0)
        return r;
    qs->gate_sealed = true;
    /* The drained requests' COMMIT_AND_FETCH SQEs were queued before this
     * NOP: once it completes they were all submitted, and the kernel
     * completes a request as it takes its commit.  None is left
     * executed-but-uncommitted, the one kind a reissue would repeat. */
    io_submit_wait(prep_nop, NULL);
    return 0;
}

int ublk_queues_hand_over(struct ublk_queues *qs)
{
    return ublk_queues_exclusive(qs, hand_over, qs);
}

/* The engine thread is ending: calls still in the inbox get -ESHUTDOWN, and
 * later ones are refused at once. */
static void control_close(struct ublk_queues *qs)
{
    pthread_mutex_lock(&qs->lock);
    qs->ctl_closed = true;
    pthread_mutex_unlock(&qs->lock);
    for (struct mbox_msg *m = mailbox_take(qs->ctl); m;) {
        struct engine_call *c = (struct engine_call *)m;
        m = m->next;
        if (c->fn)
            call_finish(c, -ESHUTDOWN);
    }
}

/* ---- the tag loop ---------------------------------------------------------- */

static void prep_io_cmd(struct io_uring_sqe *sqe, void *arg)
{
    struct ublk_tag *t = arg;
    struct ublk_queue *q = t->q;
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = q->qs->cdev_fd;
    sqe->cmd_op = t->cmd_op;
    struct ublksrv_io_cmd *cmd = (struct ublksrv_io_cmd *)sqe->cmd;
    cmd->q_id = (uint16_t)q->qid;
    cmd->tag = (uint16_t)t->tag;
    cmd->result = t->result;
    /* Zero copy: the SQE's own addr (not the command's, which user copy
     * wants zero) names the slot where the kernel registers the next
     * request's pages (FALLBACK: if it cannot, it says so in the
     * descriptor rather than failing the request). */
    if (q->qs->cfg.zero_copy)
        sqe->addr = ublk_auto_buf_reg_addr(q->qid * q->qs->cfg.depth + t->tag,
                                           UBLK_AUTO_BUF_REG_FALLBACK);
    else
        cmd->addr = (uint64_t)(uintptr_t)t->buf;
}

/* Every tag is done (the device is stopping): end the control coroutine,
 * so the loop can end. */
static void tags_finished(struct ublk_queues *qs)
{
    qs->ctl_quit.fn = NULL;
    if (mailbox_post(qs->ctl, &qs->ctl_quit.m) < 0) {
        uq_error("ublk: the engine cannot post to itself: %s", strerror(errno));
        abort();
    }
}

static void tag_loop(void *arg)
{
    struct ublk_tag *t = arg;
    struct ublk_queue *q = t->q;
    bool ioctl = q->qs->cfg.ioctl_encode;

    t->cmd_op = ioctl ? UBLK_U_IO_FETCH_REQ : UBLK_IO_FETCH_REQ;
    t->result = 0;
    for (;;) {
        int res = io_submit_wait(prep_io_cmd, t);
        if (res == UBLK_IO_RES_ABORT)
            break;      /* device stopping: nothing more will come */
        if (res != UBLK_IO_RES_OK) {
            uq_error("queue %u tag %u: %s command failed: %s", q->qid, t->tag,
                    t->cmd_op == UBLK_U_IO_FETCH_REQ || t->cmd_op == UBLK_IO_FETCH_REQ
                        ? "FETCH_REQ" : "COMMIT_AND_FETCH_REQ",
                    res < 0 ? strerror(-res) : "unexpected result");
            if (!q->qs->err)
                q->qs->err = res < 0 ? res : -EPROTO;
            break;
        }
        t->desc = q->descs[t->tag];
        t->result = tag_execute(t);
        atomic_fetch_add_explicit(&q->qs->served, 1, memory_order_relaxed);
        t->cmd_op = ioctl ? UBLK_U_IO_COMMIT_AND_FETCH_REQ : UBLK_IO_COMMIT_AND_FETCH_REQ;
    }
    if (--q->qs->live_tags == 0)
        tags_finished(q->qs);
}

/* ---- the engine thread ------------------------------------------------------ */

/* Before Linux 6.16 the task that fetched a queue's tags must issue every
 * later command for them (the queue's daemon task); nothing stops one task
 * from being the daemon of every queue, so one thread serves them all. */
static void *engine_thread(void *arg)
{
    struct ublk_queues *qs = arg;
    unsigned total = qs->cfg.nr_queues * qs->cfg.depth;

    /* Room for every tag's command plus the engine's own file I/O. */
    unsigned entries = total * 2 < 256 ? 256 : total * 2 > 4096 ? 4096 : total * 2;
    qs->loop = loop_new(entries);
    int err = qs->loop ? 0 : -errno;
    /* Zero copy: one empty slot per tag, which the kernel fills with the
     * request's pages as it hands the request over and empties as the
     * commit completes it. */
    if (err == 0 && qs->cfg.zero_copy) {
        err = loop_register_sparse(qs->loop, total);
        if (err < 0)
            uq_error("cannot register %u buffer slots for zero copy: %s", total, strerror(-err));
    }

    pthread_mutex_lock(&qs->lock);
    qs->err = err;
    qs->ready = true;
    pthread_cond_broadcast(&qs->cond);
    while (qs->state == START_WAIT)
        pthread_cond_wait(&qs->cond, &qs->lock);
    bool go = qs->state == START_GO;
    pthread_mutex_unlock(&qs->lock);

    if (go) {
        qs->live_tags = total;
        for (unsigned i = 0; i < qs->cfg.nr_queues; i++)
            for (unsigned t = 0; t < qs->cfg.depth; t++)
                qs->queues[i].tags[t].co = co_spawn(tag_loop, &qs->queues[i].tags[t]);
        co_spawn(engine_control, qs);
        int r = loop_run(qs->loop);
        if (r < 0 && !qs->err)
            qs->err = r;
    }
    control_close(qs);
    co_pool_release();
    loop_free(qs->loop);
    qs->loop = NULL;

    uint64_t one = 1;
    if (write(qs->done_fd, &one, sizeof(one)) < 0)
        uq_error("cannot signal the end of the queues: %s", strerror(errno));
    return NULL;
}

static int open_cdev(uint32_t dev_id, char *err, size_t errlen)
{
    char path[64];
    snprintf(path, sizeof(path), "/dev/ublkc%u", dev_id);
    /* The node may lag ADD_DEV by a moment, or udev may hold it briefly
     * (or, for an unprivileged device, not have given it to us yet): retry
     * for up to 5 s. */
    for (int i = 0; i < 500; i++) {
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd >= 0)
            return fd;
        if (errno != ENOENT && errno != EBUSY && !(errno == EACCES && geteuid() != 0))
            break;
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    int e = errno;
    snprintf(err, errlen, "cannot open %s: %s", path, strerror(e));
    return -e;
}

static void queues_free(struct ublk_queues *qs)
{
    for (unsigned i = 0; qs->queues && i < qs->cfg.nr_queues; i++) {
        struct ublk_queue *q = &qs->queues[i];
        if (q->descs)
            munmap((void *)q->descs, q->descs_len);
        for (unsigned t = 0; q->tags && t < qs->cfg.depth; t++)
            io_free(q->tags[t].buf);
        free(q->tags);
    }
    while (qs->bounces) {
        struct bounce *b = qs->bounces;
        qs->bounces = b->next;
        io_free(b);
    }
    mailbox_free(qs->ctl);
    free(qs->queues);
    if (qs->cdev_fd >= 0)
        close(qs->cdev_fd);
    if (qs->done_fd >= 0)
        close(qs->done_fd);
    pthread_mutex_destroy(&qs->lock);
    pthread_cond_destroy(&qs->cond);
    free(qs);
}

static int queue_setup(struct ublk_queues *qs, struct ublk_queue *q, unsigned qid,
                       char *err, size_t errlen)
{
    unsigned depth = qs->cfg.depth;
    q->qs = qs;
    q->qid = qid;
    q->descs_len = page_round(depth * sizeof(struct ublksrv_io_desc));
    /* Queue qid's descriptors sit at a fixed stride sized for the largest depth. */
    off_t off = UBLKSRV_CMD_BUF_OFFSET +
                (off_t)qid * (off_t)page_round(UBLK_MAX_QUEUE_DEPTH * sizeof(struct ublksrv_io_desc));
    void *p = mmap(NULL, q->descs_len, PROT_READ, MAP_SHARED | MAP_POPULATE, qs->cdev_fd, off);
    if (p == MAP_FAILED) {
        int e = errno;
        snprintf(err, errlen, "cannot map the descriptors of queue %u: %s", qid, strerror(e));
        return -e;
    }
    q->descs = p;
    q->tags = calloc(depth, sizeof(*q->tags));
    if (!q->tags) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    for (unsigned t = 0; t < depth; t++) {
        q->tags[t].q = q;
        q->tags[t].tag = t;
        /* Zero copy needs no buffer per tag (the copy path borrows one). */
        q->tags[t].buf = qs->cfg.zero_copy ? NULL : io_alloc(qs->cfg.buf_bytes);
    }
    return 0;
}

int ublk_queues_start(const struct ublk_queues_cfg *cfg, struct ublk_queues **out,
                      char *err, size_t errlen)
{
    *out = NULL;
    if (cfg->nr_queues == 0 || cfg->depth == 0 || cfg->depth > UBLK_MAX_QUEUE_DEPTH ||
        cfg->buf_bytes == 0 || cfg->buf_bytes % IO_ALIGN ||
        (cfg->zero_copy && cfg->nr_queues * cfg->depth > 16384)) {
        snprintf(err, errlen, "invalid queue configuration");
        return -EINVAL;
    }
    struct ublk_queues *qs = calloc(1, sizeof(*qs));
    if (!qs) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    qs->cfg = *cfg;
    qs->cdev_fd = -1;
    pthread_mutex_init(&qs->lock, NULL);
    pthread_cond_init(&qs->cond, NULL);
    qs->gate = (struct co_queue)CO_QUEUE_INIT;
    qs->drained = (struct co_queue)CO_QUEUE_INIT;
    qs->ctl = mailbox_new();
    qs->done_fd = eventfd(0, EFD_CLOEXEC);
    if (!qs->ctl || qs->done_fd < 0) {
        int e = errno;
        snprintf(err, errlen, "eventfd: %s", strerror(e));
        queues_free(qs);
        return -e;
    }
    int ret = open_cdev(cfg->dev_id, err, errlen);
    if (ret < 0) {
        queues_free(qs);
        return ret;
    }
    qs->cdev_fd = ret;
    qs->queues = calloc(cfg->nr_queues, sizeof(*qs->queues));
    if (!qs->queues) {
        snprintf(err, errlen, "out of memory");
        queues_free(qs);
        return -ENOMEM;
    }
    for (unsigned i = 0; i < cfg->nr_queues; i++) {
        ret = queue_setup(qs, &qs->queues[i], i, err, errlen);
        if (ret < 0) {
            queues_free(qs);
            return ret;
        }
    }

    /* The thread first makes its loop; no fetch goes out until it did, so
     * a failure here leaves nothing behind in the kernel. */
    ret = pthread_create(&qs->thread, NULL, engine_thread, qs);
    if (ret != 0) {
        snprintf(err, errlen, "cannot create the engine thread: %s", strerror(ret));
        queues_free(qs);
        return -ret;
    }
    qs->thread_started = true;
    pthread_mutex_lock(&qs->lock);
    while (!qs->ready)
        pthread_cond_wait(&qs->cond, &qs->lock);
    ret = qs->err;
    if (ret < 0)
        snprintf(err, errlen, "cannot create the engine's io_uring: %s", strerror(-ret));
    qs->state = ret == 0 ? START_GO : START_ABORT;
    pthread_cond_broadcast(&qs->cond);
    pthread_mutex_unlock(&qs->lock);

    if (ret < 0) {
        pthread_join(qs->thread, NULL);
        queues_free(qs);
        return ret;
    }
    *out = qs;
    return 0;
}

int ublk_queues_done_fd(const struct ublk_queues *qs)
{
    return qs->done_fd;
}

uint64_t ublk_queues_served(const struct ublk_queues *qs)
{
    return atomic_load_explicit(&((struct ublk_queues *)qs)->served, memory_order_relaxed);
}

void ublk_queues_stats(const struct ublk_queues *qs, struct ublk_io_stats *st)
{
    st->reads = stat_get(&qs->st.ops[ST_READ]);
    st->writes = stat_get(&qs->st.ops[ST_WRITE]);
    st->flushes = stat_get(&qs->st.ops[ST_FLUSH]);
    st->discards = stat_get(&qs->st.ops[ST_DISCARD]);
    st->write_zeroes = stat_get(&qs->st.ops[ST_WRITE_ZEROES]);
    st->read_bytes = stat_get(&qs->st.bytes[ST_READ]);
    st->write_bytes = stat_get(&qs->st.bytes[ST_WRITE]);
    st->errors = stat_get(&qs->st.errors);
    st->in_flight = stat_get(&qs->st.in_flight);
}

int ublk_queues_stop(struct ublk_queues *qs)
{
    if (qs->thread_started)
        pthread_join(qs->thread, NULL);
    int ret = qs->err;
    queues_free(qs);
    return ret;
}

/* ---- parameters -------------------------------------------------------------- */

void ublk_params_for_image(struct ublk_params *p, const struct image *img,
                           uint32_t buf_bytes, bool read_only)
{
    memset(p, 0, sizeof(*p));
    p->len = sizeof(*p);
    p->types = UBLK_PARAM_TYPE_BASIC;
    struct ublk_param_basic *b = &p->basic;
    /* VOLATILE_CACHE: the engine caches metadata and the host file has a
     * page cache, so the kernel must send FLUSH; FUA is honoured per write. */
    b->attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
    if (read_only)
        b->attrs |= UBLK_ATTR_READ_ONLY;
    b->logical_bs_shift = 9;
    b->physical_bs_shift = 12;      /* 4 KiB: avoids read-modify-write in the engine */
    b->io_min_shift = 12;
    b->io_opt_shift = 12;
    b->max_sectors = buf_bytes >> 9;
    /* No chunk_sectors: the engine splits requests at cluster boundaries
     * itself, and chunking would only add kernel-side splits. */
    b->chunk_sectors = 0;
    b->dev_sectors = img_size(img) >> 9;
    if (!read_only) {
        p->types |= UBLK_PARAM_TYPE_DISCARD;
        struct ublk_param_discard *d = &p->discard;
        d->discard_granularity = 4096;
        d->max_discard_sectors = 1u << 21;          /* 1 GiB per request */
        d->max_write_zeroes_sectors = 1u << 21;
        d->max_discard_segments = 1;                /* one range per request */
    }
}
