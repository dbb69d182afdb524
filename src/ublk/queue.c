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
    bool fetched;           /* batch I/O: a request came for it, not yet served */
    bool idle;              /* batch I/O: parked, waiting for a request */
    /* The request being served (a copy of the descriptor). */
    struct ublksrv_io_desc desc;
};

/* Batch I/O (UBLK_F_BATCH_IO) state of one queue: one multishot fetch
 * brings the tags of new requests into provided buffers, one committer
 * sends the results of the requests served since its last commit. */
struct ublk_batch {
    struct io_cqe_sink sink;        /* the fetch's CQEs */
    struct io_uring_buf_ring *br;   /* buffer group qid: nbufs of buf_len */
    uint8_t *bufs;
    unsigned nbufs, buf_len;
    struct co *fetcher, *committer;
    int fetch_res;                  /* of the fetch's last CQE */
    bool fetch_over;                /* that CQE came */
    bool ended;                     /* no request will come any more */
    unsigned live_tags;             /* tag coroutines not yet ended */
    /* Commit elements: cur fills while the other one is being committed. */
    uint8_t *elems[2];
    unsigned n[2], cur;
    bool committing;
    struct co_queue flushed;        /* woken when nothing is left to commit */
};

struct ublk_queue {
    struct ublk_queues *qs;
    unsigned qid;
    const struct ublksrv_io_desc *descs;
    size_t descs_len;
    struct ublk_tag *tags;
    struct ublk_batch b;
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
    /* Per tag: tag coroutines still fetching (all queues); batch I/O:
     * queues still serving (their committer has not ended). */
    unsigned live_tags;
    int err;
    char errmsg[200];           /* why the engine thread could not start */
    /* Batch I/O: each commit element's size and the commands' flags. */
    unsigned elem_bytes;
    uint16_t batch_flags;
    atomic_ullong served;
    struct bounce *bounces;     /* free bounce buffers (engine thread only) */
    /* Written by the engine thread only (tag_execute). */
    struct {
        stat_counter ops[5], bytes[2], errors, in_flight;
        /* Reads and writes ([ST_READ], [ST_WRITE]) by how their data moved:
         * between the request's pages and the file (zero copy), or through a
         * buffer of the daemon (a bounce buffer, or the tag's own). */
        stat_counter zero_copy[2], copied[2];
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
    stat_add(&qs->st.copied[write ? ST_WRITE : ST_READ], 1);
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
    /* FUA: RWF_DSYNC makes this data durable before the completion, unless
     * img_map_end flushes anyway (a mapping not yet on disk), which syncs it. */
    ssize_t n = io_rw_fixed(write, m.file->fd, idx, 0, len, m.host,
                            write && (flags & IMG_FUA) && !m.flush_at_end ? RWF_DSYNC : 0);
    bool short_read = !write && n >= 0 && (uint64_t)n < len;
    r = img_map_end(img, &m, mf, n < 0 ? (int)n : 0);
    /* A read past the end of the file (a cluster allocated but never
     * written out): the copy path reads the rest as zeros. */
    if (r == 0 && short_read)
        return tag_rw_copy(t, write, off, len, flags);
    stat_add(&qs->st.zero_copy[write ? ST_WRITE : ST_READ], 1);
    return r;
}

/* A read or write: zero copy devices by tag_rw_zc, others with the tag's
 * buffer. */
static int tag_rw(struct ublk_tag *t, bool write, uint64_t off, uint64_t len, unsigned flags)
{
    struct ublk_queues *qs = t->q->qs;
    if (len > qs->cfg.buf_bytes)
        return -EIO;
    int r;
    if (qs->cfg.zero_copy) {
        r = tag_rw_zc(t, write, off, len, flags);   /* counts which way it went */
    } else {
        stat_add(&qs->st.copied[write ? ST_WRITE : ST_READ], 1);
        r = write ? img_write(qs->cfg.img, t->buf, off, len, flags) : img_read(qs->cfg.img, t->buf, off, len);
    }
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

static void batch_wait_committed(struct ublk_queues *qs);

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
    /* None may be left executed-but-uncommitted, the one kind a reissue
     * would repeat; the kernel completes a request as it takes its commit. */
    if (qs->cfg.batch_io) {
        /* The drained requests are in their queue's commit elements: wait
         * until the committers have had every one taken. */
        batch_wait_committed(qs);
        return 0;
    }
    /* The drained requests' COMMIT_AND_FETCH SQEs were queued before this
     * NOP: once it completes they were all submitted. */
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

/* ---- batch I/O (UBLK_F_BATCH_IO, Linux 7.0+) ----------------------------------
 *
 * Per queue: PREP_IO_CMDS hands the kernel every tag at once (before
 * START_DEV or END_USER_RECOVERY, which wait for it); one multishot
 * FETCH_IO_CMDS then brings the tags of new requests, many per CQE, into a
 * ring of provided buffers; the tag coroutines serve them as before; one
 * committer per queue sends COMMIT_IO_CMDS with the results of every request
 * finished since its last one.  All on the engine's ring: with zero copy the
 * kernel registers each request's pages in the ring of the fetch (slot
 * buf_index of the tag's last PREP or COMMIT element) and unregisters them
 * at the commit only if the commit comes through the same ring. */

struct batch_cmd {
    struct ublk_queue *q;
    unsigned op;            /* UBLK_U_IO_{PREP,COMMIT,FETCH}_IO_CMDS */
    const uint8_t *elems;   /* PREP, COMMIT: nr elements of elem_bytes */
    unsigned nr;
};

static void prep_batch_cmd(struct io_uring_sqe *sqe, void *arg)
{
    const struct batch_cmd *c = arg;
    struct ublk_queues *qs = c->q->qs;
    memset(sqe, 0, sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = qs->cdev_fd;
    sqe->cmd_op = c->op;
    struct ublk_batch_io *cmd = (struct ublk_batch_io *)sqe->cmd;
    cmd->q_id = (uint16_t)c->q->qid;
    cmd->nr_elem = (uint16_t)c->nr;
    if (c->op == UBLK_U_IO_FETCH_IO_CMDS) {
        /* Tags (16 bits each) into a buffer of group qid. */
        cmd->elem_bytes = sizeof(uint16_t);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = (uint16_t)c->q->qid;
        sqe->uring_cmd_flags = IORING_URING_CMD_MULTISHOT;
        return;
    }
    cmd->elem_bytes = (uint8_t)qs->elem_bytes;
    cmd->flags = qs->batch_flags;
    sqe->addr = (uint64_t)(uintptr_t)c->elems;
    sqe->len = c->nr * qs->elem_bytes;
}

/* The PREP or COMMIT element of a tag: with zero copy the slot for its
 * next request's pages (FALLBACK: the kernel says so in the descriptor if
 * it cannot register them), else its buffer's address. */
static void batch_elem(const struct ublk_queue *q, unsigned tag, int result, uint8_t *e)
{
    struct ublk_queues *qs = q->qs;
    struct ublk_elem_header h = { .tag = (uint16_t)tag, .result = result };
    if (qs->cfg.zero_copy)
        h.buf_index = (uint16_t)(q->qid * qs->cfg.depth + tag);
    memcpy(e, &h, sizeof(h));
    if (!qs->cfg.zero_copy) {
        uint64_t addr = (uint64_t)(uintptr_t)q->tags[tag].buf;
        memcpy(e + sizeof(h), &addr, sizeof(addr));
    }
}

/* On the engine thread before the loop runs: the fetch buffers, and every
 * tag of every queue prepared.  0, or -errno with qs->errmsg set. */
static int batch_setup(struct ublk_queues *qs)
{
    for (unsigned i = 0; i < qs->cfg.nr_queues; i++) {
        struct ublk_queue *q = &qs->queues[i];
        struct ublk_batch *b = &q->b;
        b->br = loop_buf_ring_new(qs->loop, b->nbufs, q->qid);
        if (!b->br) {
            int e = errno;
            snprintf(qs->errmsg, sizeof(qs->errmsg), "cannot register the fetch buffers of queue %u: %s",
                     q->qid, strerror(e));
            return -e;
        }
        for (unsigned k = 0; k < b->nbufs; k++)
            io_uring_buf_ring_add(b->br, b->bufs + (size_t)k * b->buf_len, b->buf_len, (unsigned short)k,
                                  io_uring_buf_ring_mask(b->nbufs), (int)k);
        io_uring_buf_ring_advance(b->br, (int)b->nbufs);
        for (unsigned t = 0; t < qs->cfg.depth; t++)
            batch_elem(q, t, 0, b->elems[0] + (size_t)t * qs->elem_bytes);
        struct batch_cmd c = { q, UBLK_U_IO_PREP_IO_CMDS, b->elems[0], qs->cfg.depth };
        int r = loop_submit_sync(qs->loop, prep_batch_cmd, &c);
        if (r < 0) {
            snprintf(qs->errmsg, sizeof(qs->errmsg), "PREP_IO_CMDS of queue %u failed: %s", q->qid,
                     strerror(-r));
            return r;
        }
    }
    return 0;
}

/* A tag the fetch brought: its coroutine serves the request. */
static void batch_deliver(struct ublk_queue *q, unsigned tag)
{
    if (tag >= q->qs->cfg.depth || !q->tags[tag].idle || q->tags[tag].fetched) {
        uq_error("queue %u: the kernel handed over %s tag %u", q->qid,
                 tag >= q->qs->cfg.depth ? "an invalid" : "a busy", tag);
        return;
    }
    q->tags[tag].fetched = true;
    co_wake(q->tags[tag].co);
}

/* The fetch's CQEs (as the loop reaps them): tags in a provided buffer. */
static void batch_fetched(struct io_cqe_sink *sink, int res, unsigned flags)
{
    struct ublk_queue *q = (struct ublk_queue *)((char *)sink - offsetof(struct ublk_queue, b.sink));
    struct ublk_batch *b = &q->b;
    if (flags & IORING_CQE_F_BUFFER) {
        unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
        if (bid < b->nbufs) {
            uint8_t *buf = b->bufs + (size_t)bid * b->buf_len;
            for (int i = 0; i + 2 <= res; i += 2) {
                uint16_t tag;
                memcpy(&tag, buf + i, sizeof(tag));
                batch_deliver(q, tag);
            }
            /* The tags are copied out: the buffer can take more at once. */
            io_uring_buf_ring_add(b->br, buf, b->buf_len, (unsigned short)bid,
                                  io_uring_buf_ring_mask(b->nbufs), 0);
            io_uring_buf_ring_advance(b->br, 1);
        }
    }
    if (!(flags & IORING_CQE_F_MORE)) {
        b->fetch_res = res;
        b->fetch_over = true;
        co_wake(b->fetcher);
    }
}

/* Keeps one fetch going on the queue until the kernel aborts it (the device
 * stops or is quiesced), then lets the idle tags end. */
static void batch_fetcher(void *arg)
{
    struct ublk_queue *q = arg;
    struct ublk_batch *b = &q->b;
    for (;;) {
        b->fetch_over = false;
        struct batch_cmd c = { q, UBLK_U_IO_FETCH_IO_CMDS, NULL, b->buf_len / sizeof(uint16_t) };
        if (io_submit_sink(prep_batch_cmd, &c, &b->sink) < 0)
            abort();    /* the engine thread always has its loop */
        while (!b->fetch_over)
            co_yield();
        if (b->fetch_res == UBLK_IO_RES_ABORT)
            break;
        /* Ended by the kernel without an abort (no free buffer, a full
         * CQ: it keeps the tags it could not post): fetch again. */
        if (b->fetch_res >= 0 || b->fetch_res == -ENOBUFS)
            continue;
        uq_error("queue %u: FETCH_IO_CMDS failed: %s", q->qid, strerror(-b->fetch_res));
        if (!q->qs->err)
            q->qs->err = b->fetch_res;
        break;
    }
    b->ended = true;
    /* The idle tags end now, the busy ones once their request is served
     * (only idle ones are woken: a wake is for the event a coroutine
     * parked for). */
    for (unsigned t = 0; t < q->qs->cfg.depth; t++)
        if (q->tags[t].idle)
            co_wake(q->tags[t].co);
}

/* Send nr elements; the kernel stops at the first it refuses (a tag it
 * does not think we hold): report it and send the rest. */
static void batch_commit(struct ublk_queue *q, const uint8_t *elems, unsigned nr)
{
    struct ublk_queues *qs = q->qs;
    unsigned done = 0;
    while (done < nr) {
        struct batch_cmd c = { q, UBLK_U_IO_COMMIT_IO_CMDS, elems + (size_t)done * qs->elem_bytes,
                               nr - done };
        int r = io_submit_wait(prep_batch_cmd, &c);
        unsigned took = r > 0 ? (unsigned)r / qs->elem_bytes : 0;
        done += took;
        if (done == nr)
            break;
        uint16_t tag;
        memcpy(&tag, elems + (size_t)done * qs->elem_bytes, sizeof(tag));
        uq_error("queue %u: COMMIT_IO_CMDS refused tag %u: %s", q->qid, tag,
                 r < 0 ? strerror(-r) : "refused");
        if (!qs->err)
            qs->err = r < 0 ? r : -EPROTO;
        done++;
    }
}

/* The queue's committer.  A served request wakes it; it runs after every
 * coroutine already ready in this pass of the scheduler (the queue is
 * FIFO), so the requests whose I/O completed together are committed
 * together, by one COMMIT_IO_CMDS that goes out with the loop's next
 * submit: when their per-tag commits would have gone out, no later.
 * While one commit is in flight the next requests fill the other array. */
static void batch_committer(void *arg)
{
    struct ublk_queue *q = arg;
    struct ublk_batch *b = &q->b;
    for (;;) {
        while (b->n[b->cur] == 0 && b->live_tags > 0)
            co_yield();
        if (b->n[b->cur] == 0)
            break;      /* every tag ended, nothing left to commit */
        unsigned i = b->cur;
        b->cur ^= 1;
        b->committing = true;
        batch_commit(q, b->elems[i], b->n[i]);
        b->committing = false;
        b->n[i] = 0;
        if (b->n[b->cur] == 0)
            co_queue_wake_all(&b->flushed);
    }
    if (--q->qs->live_tags == 0)
        tags_finished(q->qs);
}

/* Wait until every request served so far was committed (hand_over). */
static void batch_wait_committed(struct ublk_queues *qs)
{
    for (unsigned i = 0; i < qs->cfg.nr_queues; i++) {
        struct ublk_batch *b = &qs->queues[i].b;
        while (b->n[0] || b->n[1] || b->committing)
            co_queue_wait(&b->flushed);
    }
}

/* A tag's coroutine with batch I/O: serve each request the fetch brings,
 * hand its result to the committer. */
static void batch_tag_loop(void *arg)
{
    struct ublk_tag *t = arg;
    struct ublk_queue *q = t->q;
    struct ublk_batch *b = &q->b;
    for (;;) {
        t->idle = true;
        while (!t->fetched && !b->ended)
            co_yield();
        t->idle = false;
        if (!t->fetched)
            break;
        t->desc = q->descs[t->tag];
        t->result = tag_execute(t);
        atomic_fetch_add_explicit(&q->qs->served, 1, memory_order_relaxed);
        /* Cleared before the commit can reach the kernel: the tag's next
         * request can only come after it. */
        t->fetched = false;
        batch_elem(q, t->tag, t->result, b->elems[b->cur] + (size_t)b->n[b->cur] * q->qs->elem_bytes);
        b->n[b->cur]++;
        co_wake(b->committer);
    }
    if (--b->live_tags == 0)
        co_wake(b->committer);
}

/* Spawn every queue's coroutines (engine thread). */
static void batch_spawn(struct ublk_queues *qs)
{
    qs->live_tags = qs->cfg.nr_queues;
    for (unsigned i = 0; i < qs->cfg.nr_queues; i++) {
        struct ublk_queue *q = &qs->queues[i];
        q->b.live_tags = qs->cfg.depth;
        for (unsigned t = 0; t < qs->cfg.depth; t++)
            q->tags[t].co = co_spawn(batch_tag_loop, &q->tags[t]);
        q->b.committer = co_spawn(batch_committer, q);
        q->b.fetcher = co_spawn(batch_fetcher, q);
    }
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
            snprintf(qs->errmsg, sizeof(qs->errmsg), "cannot register %u buffer slots for zero copy: %s",
                     total, strerror(-err));
    }
    /* Batch I/O: every tag prepared before START_DEV (or END_USER_RECOVERY)
     * can be sent, since they wait for it; a failure is reported at once. */
    if (err == 0 && qs->cfg.batch_io)
        err = batch_setup(qs);

    pthread_mutex_lock(&qs->lock);
    qs->err = err;
    qs->ready = true;
    pthread_cond_broadcast(&qs->cond);
    while (qs->state == START_WAIT)
        pthread_cond_wait(&qs->cond, &qs->lock);
    bool go = qs->state == START_GO;
    pthread_mutex_unlock(&qs->lock);

    if (go) {
        if (qs->cfg.batch_io) {
            batch_spawn(qs);
        } else {
            qs->live_tags = total;
            for (unsigned i = 0; i < qs->cfg.nr_queues; i++)
                for (unsigned t = 0; t < qs->cfg.depth; t++)
                    qs->queues[i].tags[t].co = co_spawn(tag_loop, &qs->queues[i].tags[t]);
        }
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
        /* The loop, which had the buffer ring registered, is gone. */
        free(q->b.br);
        free(q->b.bufs);
        free(q->b.elems[0]);
        free(q->b.elems[1]);
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

/* Batch I/O memory of a queue: fetch buffers, two arrays of commit
 * elements.  A fetch CQE brings at least one tag and the buffer goes back
 * to the ring as the loop reaps it, so one buffer per tag can never run
 * out; the kernel puts at most 128 tags in one. */
static int batch_queue_alloc(struct ublk_queue *q, char *err, size_t errlen)
{
    struct ublk_batch *b = &q->b;
    unsigned depth = q->qs->cfg.depth;
    b->nbufs = 1;
    while (b->nbufs < depth)
        b->nbufs <<= 1;
    b->buf_len = (depth < 128 ? depth : 128) * sizeof(uint16_t);
    b->bufs = malloc((size_t)b->nbufs * b->buf_len);
    b->elems[0] = malloc((size_t)depth * q->qs->elem_bytes);
    b->elems[1] = malloc((size_t)depth * q->qs->elem_bytes);
    b->flushed = (struct co_queue)CO_QUEUE_INIT;
    b->sink.fn = batch_fetched;
    if (!b->bufs || !b->elems[0] || !b->elems[1]) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    return 0;
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
    if (qs->cfg.batch_io)
        return batch_queue_alloc(q, err, errlen);
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
    /* Batch elements: the header; without zero copy, the tag's buffer. */
    qs->elem_bytes = sizeof(struct ublk_elem_header) + (cfg->zero_copy ? 0 : sizeof(uint64_t));
    qs->batch_flags = cfg->zero_copy ? UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK : UBLK_BATCH_F_HAS_BUF_ADDR;
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
    if (ret < 0 && qs->errmsg[0])
        snprintf(err, errlen, "%s", qs->errmsg);
    else if (ret < 0)
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
    st->zero_copy_reads = stat_get(&qs->st.zero_copy[ST_READ]);
    st->zero_copy_writes = stat_get(&qs->st.zero_copy[ST_WRITE]);
    st->copied_reads = stat_get(&qs->st.copied[ST_READ]);
    st->copied_writes = stat_get(&qs->st.copied[ST_WRITE]);
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
