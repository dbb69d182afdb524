/* ublk queues: per-queue threads, per-tag coroutines, forwarding of requests
 * to the single engine thread (see queue.h). */
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
#include <time.h>
#include <unistd.h>

enum msg_kind { MSG_REQUEST, MSG_COMPLETION, MSG_QUEUE_DONE, MSG_QUIT };

struct ublk_msg {
    struct mbox_msg m;      /* first: a mbox_msg pointer is a ublk_msg pointer */
    enum msg_kind kind;
    struct ublk_tag *tag;
    struct ublk_queue *q;
};

struct ublk_tag {
    struct ublk_queue *q;
    unsigned tag;
    void *buf;
    struct co *co;
    unsigned cmd_op;        /* next command: FETCH, then COMMIT_AND_FETCH */
    int result;             /* committed with the next COMMIT_AND_FETCH */
    /* The request being served (a copy of the descriptor). */
    struct ublksrv_io_desc desc;
    struct ublk_msg msg;    /* request to the engine, then its completion back */
    bool done;              /* forwarded request completed */
};

struct ublk_queue {
    struct ublk_queues *qs;
    unsigned qid;
    pthread_t thread;
    bool thread_started;
    struct loop *loop;
    const struct ublksrv_io_desc *descs;
    size_t descs_len;
    struct ublk_tag *tags;
    unsigned live_tags;
    /* Queue 0: requests from other queues and their QUEUE_DONE notes.
     * Other queues: completions from the engine, and QUIT. */
    struct mailbox *mbox;
    struct ublk_msg done_msg, quit_msg;
    int err;
};

enum start_state { START_WAIT, START_GO, START_ABORT };

struct ublk_queues {
    struct ublk_queues_cfg cfg;
    int cdev_fd;
    int done_fd;
    struct ublk_queue *queues;
    atomic_uint running;        /* threads not yet finished */
    atomic_ullong served;
    /* Written by the engine thread only (tag_execute). */
    struct {
        stat_counter ops[5], bytes[2], errors, in_flight;
    } st;
    /* Start-up handshake: every thread makes its loop, then waits for go. */
    pthread_mutex_t lock;
    pthread_cond_t cond;
    unsigned ready, failed;
    enum start_state state;
};

static size_t page_round(size_t n)
{
    size_t pg = (size_t)sysconf(_SC_PAGESIZE);
    return (n + pg - 1) / pg * pg;
}

/* ---- the engine: every img_* call happens on queue 0's thread ------------- */

static int tag_execute_op(struct ublk_tag *t);

/* Kinds of request in ublk_queues.st.ops, in ublk_io_stats order. */
enum { ST_READ, ST_WRITE, ST_FLUSH, ST_DISCARD, ST_WRITE_ZEROES };

static int tag_execute(struct ublk_tag *t)
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

static int tag_execute_op(struct ublk_tag *t)
{
    struct image *img = t->q->qs->cfg.img;
    const struct ublksrv_io_desc *d = &t->desc;
    unsigned op = ublksrv_get_op(d);
    uint64_t off = d->start_sector << 9;
    uint64_t len = (uint64_t)d->nr_sectors << 9;
    int r;

    switch (op) {
    case UBLK_IO_OP_READ:
        if (len > t->q->qs->cfg.buf_bytes)
            return -EIO;
        r = img_read(img, t->buf, off, len);
        return r < 0 ? r : (int)len;
    case UBLK_IO_OP_WRITE:
        if (len > t->q->qs->cfg.buf_bytes)
            return -EIO;
        /* FUA: the kernel wants this write durable before it completes. */
        r = img_write(img, t->buf, off, len, (d->op_flags & UBLK_IO_F_FUA) ? IMG_FUA : 0);
        return r < 0 ? r : (int)len;
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

/* Runs on the engine thread for a request forwarded by another queue. */
static void engine_request(void *arg)
{
    struct ublk_tag *t = arg;
    t->result = tag_execute(t);
    t->msg.kind = MSG_COMPLETION;
    /* After the post the tag belongs to its queue again: touch nothing. */
    if (mailbox_post(t->q->mbox, &t->msg.m) < 0) {
        uq_error("cannot wake queue %u: %s", t->q->qid, strerror(errno));
        abort();
    }
}

/* Queue 0's inbox: spawn each forwarded request, count finished queues. */
static void engine_inbox(void *arg)
{
    struct ublk_queue *q = arg;
    unsigned remaining = q->qs->cfg.nr_queues - 1;
    while (remaining > 0) {
        struct mbox_msg *m = mailbox_wait(q->mbox);
        if (!m) {
            uq_error("engine mailbox failed: %s", strerror(errno));
            abort();
        }
        while (m) {
            struct ublk_msg *msg = (struct ublk_msg *)m;
            m = m->next;
            if (msg->kind == MSG_REQUEST)
                co_spawn(engine_request, msg->tag);
            else if (msg->kind == MSG_QUEUE_DONE)
                remaining--;
        }
    }
}

/* Other queues: hand completions back to the waiting tag coroutines. */
static void completion_inbox(void *arg)
{
    struct ublk_queue *q = arg;
    bool quit = false;
    while (!quit) {
        struct mbox_msg *m = mailbox_wait(q->mbox);
        if (!m) {
            uq_error("queue %u mailbox failed: %s", q->qid, strerror(errno));
            abort();
        }
        while (m) {
            struct ublk_msg *msg = (struct ublk_msg *)m;
            m = m->next;
            if (msg->kind == MSG_COMPLETION) {
                msg->tag->done = true;
                co_wake(msg->tag->co);
            } else if (msg->kind == MSG_QUIT) {
                quit = true;
            }
        }
    }
}

static int tag_serve(struct ublk_tag *t)
{
    struct ublk_queue *q = t->q;
    if (q->qid == 0)
        return tag_execute(t);
    t->done = false;
    t->msg.kind = MSG_REQUEST;
    if (mailbox_post(q->qs->queues[0].mbox, &t->msg.m) < 0) {
        uq_error("cannot wake the engine: %s", strerror(errno));
        abort();
    }
    while (!t->done)
        co_yield();
    return t->result;
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
    cmd->addr = (uint64_t)(uintptr_t)t->buf;
}

static void queue_finished(struct ublk_queue *q)
{
    if (q->qs->cfg.nr_queues == 1 || q->qid == 0)
        return;     /* the engine inbox ends once every other queue is done */
    q->done_msg.kind = MSG_QUEUE_DONE;
    q->quit_msg.kind = MSG_QUIT;
    if (mailbox_post(q->qs->queues[0].mbox, &q->done_msg.m) < 0 ||
        mailbox_post(q->mbox, &q->quit_msg.m) < 0) {
        uq_error("queue %u cannot post: %s", q->qid, strerror(errno));
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
            if (!q->err)
                q->err = res < 0 ? res : -EPROTO;
            break;
        }
        t->desc = q->descs[t->tag];
        t->result = tag_serve(t);
        atomic_fetch_add_explicit(&q->qs->served, 1, memory_order_relaxed);
        t->cmd_op = ioctl ? UBLK_U_IO_COMMIT_AND_FETCH_REQ : UBLK_IO_COMMIT_AND_FETCH_REQ;
    }
    if (--q->live_tags == 0)
        queue_finished(q);
}

/* ---- queue threads ---------------------------------------------------------- */

static void *queue_thread(void *arg)
{
    struct ublk_queue *q = arg;
    struct ublk_queues *qs = q->qs;
    unsigned depth = qs->cfg.depth;

    /* Room for every tag's command plus the engine's own file I/O. */
    q->loop = loop_new(depth * 2 < 256 ? 256 : depth * 2);
    int err = q->loop ? 0 : -errno;

    pthread_mutex_lock(&qs->lock);
    if (err) {
        q->err = err;
        qs->failed++;
    }
    qs->ready++;
    pthread_cond_broadcast(&qs->cond);
    while (qs->state == START_WAIT)
        pthread_cond_wait(&qs->cond, &qs->lock);
    bool go = qs->state == START_GO;
    pthread_mutex_unlock(&qs->lock);

    if (go) {
        q->live_tags = depth;
        for (unsigned i = 0; i < depth; i++)
            q->tags[i].co = co_spawn(tag_loop, &q->tags[i]);
        if (qs->cfg.nr_queues > 1)
            co_spawn(q->qid == 0 ? engine_inbox : completion_inbox, q);
        int r = loop_run(q->loop);
        if (r < 0 && !q->err)
            q->err = r;
    }
    co_pool_release();
    loop_free(q->loop);
    q->loop = NULL;

    if (atomic_fetch_sub(&qs->running, 1) == 1) {
        uint64_t one = 1;
        if (write(qs->done_fd, &one, sizeof(one)) < 0)
            uq_error("cannot signal the end of the queues: %s", strerror(errno));
    }
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
        mailbox_free(q->mbox);
    }
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
        q->tags[t].buf = io_alloc(qs->cfg.buf_bytes);
        q->tags[t].msg.tag = &q->tags[t];
        q->tags[t].msg.q = q;
    }
    q->done_msg.q = q->quit_msg.q = q;
    if (qs->cfg.nr_queues > 1) {
        q->mbox = mailbox_new();
        if (!q->mbox) {
            int e = errno;
            snprintf(err, errlen, "cannot create a mailbox: %s", strerror(e));
            return -e;
        }
    }
    return 0;
}

int ublk_queues_start(const struct ublk_queues_cfg *cfg, struct ublk_queues **out,
                      char *err, size_t errlen)
{
    *out = NULL;
    if (cfg->nr_queues == 0 || cfg->depth == 0 || cfg->depth > UBLK_MAX_QUEUE_DEPTH ||
        cfg->buf_bytes == 0 || cfg->buf_bytes % IO_ALIGN) {
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
    qs->done_fd = eventfd(0, EFD_CLOEXEC);
    if (qs->done_fd < 0) {
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

    /* Threads first make their loops; no fetch goes out until all did, so
     * a failure here leaves nothing behind in the kernel. */
    unsigned started = 0;
    for (unsigned i = 0; i < cfg->nr_queues; i++) {
        atomic_fetch_add(&qs->running, 1);
        ret = pthread_create(&qs->queues[i].thread, NULL, queue_thread, &qs->queues[i]);
        if (ret != 0) {
            atomic_fetch_sub(&qs->running, 1);
            snprintf(err, errlen, "cannot create the thread of queue %u: %s", i, strerror(ret));
            ret = -ret;
            break;
        }
        qs->queues[i].thread_started = true;
        started++;
        ret = 0;
    }
    pthread_mutex_lock(&qs->lock);
    while (qs->ready < started)
        pthread_cond_wait(&qs->cond, &qs->lock);
    if (ret == 0 && qs->failed) {
        for (unsigned i = 0; i < cfg->nr_queues; i++)
            if (qs->queues[i].err) {
                ret = qs->queues[i].err;
                snprintf(err, errlen, "cannot create the io_uring of queue %u: %s", i, strerror(-ret));
                break;
            }
    }
    qs->state = ret == 0 ? START_GO : START_ABORT;
    pthread_cond_broadcast(&qs->cond);
    pthread_mutex_unlock(&qs->lock);

    if (ret < 0) {
        for (unsigned i = 0; i < cfg->nr_queues; i++)
            if (qs->queues[i].thread_started)
                pthread_join(qs->queues[i].thread, NULL);
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
    int ret = 0;
    for (unsigned i = 0; i < qs->cfg.nr_queues; i++) {
        struct ublk_queue *q = &qs->queues[i];
        if (q->thread_started)
            pthread_join(q->thread, NULL);
        if (q->err && !ret)
            ret = q->err;
    }
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
