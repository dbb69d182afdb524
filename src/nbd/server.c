/* NBD server: fixed-newstyle handshake, then simple replies to READ, WRITE,
 * FLUSH, TRIM and WRITE_ZEROES, each served by img_* calls.
 *
 * Per connection: a coroutine runs the handshake and then the receive loop,
 * which parses every complete request (and WRITE payload) it finds in a
 * receive buffer and spawns one coroutine per request.  Request coroutines
 * queue their replies; the connection's sender coroutine writes all the
 * replies queued so far with one sendmsg.  Request structs and their data
 * buffers are pooled per server.  Misaligned requests from
 * clients that never asked for block sizes are served by read-modify-write
 * under an export-wide lock taken exclusively; all other requests take it
 * shared, so an RMW never races a write to the same sector.
 */
#include <errno.h>
#include <malloc.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>
#include <liburing.h>

#include "io/coroutine.h"
#include "io/log.h"
#include "io/loop.h"
#include "nbd/proto.h"
#include "nbd/server.h"
#include "img/image.h"

#define SECTOR            512u
#define RX_BUF_SIZE       (256u << 10)  /* one recv takes many small requests */
#define RX_HANDSHAKE      (16u << 10)   /* until transmission: options are small */
#define RX_SMALL          (64u << 10)   /* payloads copied through the buffer */
#define SEND_BATCH        64u           /* replies per sendmsg */
#define POOL_REQS_MAX     1024u         /* idle request structs kept */
/* Idle data buffers are kept up to 4 MiB each (large client requests:
 * qemu-img convert, nbdcopy, the kernel driver) and up to one connection's
 * in-flight budget in total, so a steady stream of large requests reuses
 * them.  Freeing them instead costs every large request a fresh mmap and a
 * page fault per 4 KiB: glibc serves posix_memalign of 512 KiB from mmap
 * each time (its dynamic mmap threshold never rises above an aligned
 * request).  Once the last client leaves, buffers above POOL_BUF_SMALL are
 * given back. */
#define POOL_BUF_MAX      (4u << 20)
#define POOL_BYTES_MAX    NBD_CONN_MEM_LIMIT
#define POOL_BUF_SMALL    (64u << 10)
#define MAX_OPTION_LEN    (64u << 10)   /* longer options: hard disconnect */
/* Reads longer than this, and reads that find the memory budget spent, are
 * streamed by the connection's sender in STREAM_CHUNK pieces when their
 * turn to be sent comes: a 32 MiB read then needs 256 KiB, and a client
 * that stops reading holds at most one piece beyond its budget share. */
#define STREAM_MIN        (1u << 20)
#define STREAM_CHUNK      (256u << 10)
#define SPARE_MAX         256u          /* idle payload buffers kept */
/* Small reads and write payloads use slots of one buffer registered with
 * the ring (fixed buffers): the kernel then need not pin the pages of every
 * 4 KiB I/O.  A fixed, bounded set for the whole server (1 MiB pinned);
 * when all are taken, requests use ordinary buffers. */
#define SLOT_SIZE         4096u
#define SLOTS             256u

struct nbd_conn;

struct nbd_server {
    struct image *img;
    char *name;
    char *description;
    bool read_only;
    uint16_t tx_flags;

    int listen_fd;
    int wake_fd;                /* our own connection that unblocks accept */
    bool listening;             /* listener coroutine alive */
    bool stopping;
    bool grace_running;         /* shutdown grace timer alive */

    struct nbd_conn *conns;     /* open connections (doubly linked) */
    unsigned nconns;
    uint64_t next_id;

    uint64_t mem_used;          /* payload and read buffers reserved */
    struct co_queue mem_wait;   /* receive loops waiting for memory */
    struct co_queue idle_wait;  /* nbd_server_wait() */
    struct co_rwlock rmw_lock;  /* shared: aligned I/O; exclusive: RMW */

    struct nbd_req *pool;       /* idle request structs, most keep a buffer */
    unsigned pool_len;
    uint64_t pool_bytes;        /* buffer bytes held by idle requests and spares */
    struct { uint8_t *buf; size_t cap; } spare[SPARE_MAX];  /* detached payload buffers */
    unsigned nspare;
    uint8_t *slots;             /* SLOTS x SLOT_SIZE, registered with the loop */
    struct loop *slots_loop;
    bool slots_tried;
    unsigned nfree_slots;
    uint16_t free_slots[SLOTS];

    enum nbd_tls_mode tls_mode;
    struct nbd_tls_creds *tls;
    struct nbd_allow *allow;
    unsigned nallow;
    unsigned max_conns;
    unsigned hs_timeout_ms;
    unsigned req_timeout_ms;
    bool ticker_running;        /* handshake and request timeout coroutine alive */
    struct co_queue slot_free;  /* listener waiting for a connection slot */
    uint64_t log_window;        /* rate limit of refusal lines: current second */
    unsigned log_count, log_dropped;
};

struct nbd_conn {
    struct nbd_server *s;
    struct nbd_conn *prev, *next;
    int fd;
    uint64_t id;
    struct nbd_tls *tls;        /* after STARTTLS: every byte goes through it */
    char peer[64];              /* "ADDR:PORT" or "unix" */
    bool handshaking;           /* before NBD_OPT_GO: under the handshake timeout */
    bool quiet;                 /* cut on purpose: no more error lines */
    uint64_t hs_deadline;       /* CLOCK_MONOTONIC ms */
    uint64_t req_deadline;      /* waiting for the rest of a request until then; 0: not */
    size_t rx_cap;
    bool strict_align;          /* client asked for block sizes: misaligned -> EINVAL */
    bool no_zeroes;
    bool dead;                  /* a send failed: drop further replies */
    bool dirty;                 /* wrote since its last FLUSH */
    bool sender_alive;
    bool closing;               /* no more replies: the sender may end */
    unsigned inflight;
    unsigned running;           /* requests being served (replies not yet queued) */
    uint64_t mem_used;          /* this connection's share of s->mem_used */
    struct co_queue slot_wait;  /* receive loop waiting for an in-flight slot */
    struct co_queue idle_wait;  /* connection end waiting for inflight == 0 */
    struct nbd_req *reply_head, *reply_tail;    /* replies not yet sent */
    struct co_queue send_wait;  /* the sender waiting for replies */
    uint8_t *rx;
    size_t rx_start, rx_end;
};

struct nbd_req {
    struct nbd_conn *c;
    struct nbd_req *next;       /* reply queue or pool link */
    uint16_t flags, type;
    uint64_t cookie, off;
    uint32_t len;
    uint64_t cost;              /* bytes reserved against NBD_MEM_LIMIT */
    uint8_t *buf;               /* pooled buffer (io_alloc) */
    size_t buf_cap;
    uint8_t *slot;              /* a registered slot in use, or NULL */
    uint8_t *payload;           /* WRITE payload: slot or buf */
    uint8_t *data;              /* reply data inside buf */
    uint32_t data_len;
    bool stream;                /* READ served by the sender in pieces */
    uint8_t hdr[NBD_SIMPLE_REPLY_SIZE];
};

static void conn_log(const struct nbd_conn *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void conn_log(const struct nbd_conn *c, const char *fmt, ...)
{
    va_list ap;
    char what[512];
    va_start(ap, fmt);
    if (c->quiet)
        return;
    vsnprintf(what, sizeof(what), fmt, ap);
    va_end(ap);
    uq_error("nbd: client %llu (%s): %s", (unsigned long long)c->id, c->peer, what);
}

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

/* Refusals (--allow, full server, handshake timeouts) can come at the
 * rate an attacker connects: at most 20 such lines a second, then a count
 * of the ones left out. */
static bool refusal_log_ok(struct nbd_server *s)
{
    uint64_t sec = now_ms() / 1000;

    if (sec != s->log_window) {
        if (s->log_dropped)
            uq_error("nbd: %u more refusal message(s) suppressed", s->log_dropped);
        s->log_window = sec;
        s->log_count = 0;
        s->log_dropped = 0;
    }
    if (s->log_count < 20) {
        s->log_count++;
        return true;
    }
    s->log_dropped++;
    return false;
}

static uint64_t round_down(uint64_t v, uint64_t a) { return v & ~(a - 1); }
static uint64_t round_up(uint64_t v, uint64_t a) { return (v + a - 1) & ~(a - 1); }

/* -errno from the engine to the protocol's error values. */
static uint32_t nbd_error(int err)
{
    switch (-err) {
    case 0:          return 0;
    case EPERM:
    case EROFS:
    case EACCES:     return NBD_EPERM;
    case ENOMEM:     return NBD_ENOMEM;
    case EINVAL:     return NBD_EINVAL;
    case ENOSPC:
    case EDQUOT:
    case EFBIG:      return NBD_ENOSPC;
    case EOVERFLOW:  return NBD_EOVERFLOW;
    case EOPNOTSUPP: return NBD_ENOTSUP;
    case ESHUTDOWN:  return NBD_ESHUTDOWN;
    default:         return NBD_EIO;
    }
}

/* Park the running coroutine for ms milliseconds. */
static void prep_timeout(struct io_uring_sqe *sqe, void *arg)
{
    io_uring_prep_timeout(sqe, arg, 0, 0);
}

static void co_sleep_ms(unsigned ms)
{
    struct __kernel_timespec ts = { .tv_sec = ms / 1000, .tv_nsec = (ms % 1000) * 1000000ll };
    io_submit_wait(prep_timeout, &ts);
}

/* ---- memory budget --------------------------------------------------------- */

/* Bound buffer memory overall and per connection.  A connection that
 * holds nothing may always start one request, however large and whatever
 * the others hold: clients that stop reading their replies can fill the
 * shared budget, but they stall only themselves (their replies, not the
 * budget, are what waits).  Write payloads wait here; reads never do (see
 * mem_try_reserve). */
static bool mem_fits(const struct nbd_conn *c, uint64_t cost)
{
    return c->mem_used == 0 ||
           (c->mem_used + cost <= NBD_CONN_MEM_LIMIT && c->s->mem_used + cost <= NBD_MEM_LIMIT);
}

static void mem_reserve(struct nbd_conn *c, uint64_t cost)
{
    struct nbd_server *s = c->s;

    while (!mem_fits(c, cost))
        co_queue_wait(&s->mem_wait);
    c->mem_used += cost;
    s->mem_used += cost;
}

/* For reads: reserve only if it fits now (else the read is streamed). */
static bool mem_try_reserve(struct nbd_conn *c, uint64_t cost)
{
    if (c->mem_used + cost > NBD_CONN_MEM_LIMIT || c->s->mem_used + cost > NBD_MEM_LIMIT)
        return false;
    c->mem_used += cost;
    c->s->mem_used += cost;
    return true;
}

static void mem_release(struct nbd_conn *c, uint64_t cost)
{
    if (!cost)
        return;
    c->mem_used -= cost;
    c->s->mem_used -= cost;
    co_queue_wake_all(&c->s->mem_wait);
}

/* ---- receive buffer -------------------------------------------------------- */

static ssize_t conn_recv(struct nbd_conn *c, void *buf, size_t len)
{
    if (c->tls)
        return nbd_tls_recv(c->tls, buf, len);
    return io_recv(c->fd, buf, len, 0);
}

/* Requests being served on a connection, and file I/Os in the loop, from
 * which its receive loop stops keeping a receive armed. */
#define LAZY_RECV_MIN     8u

/* A busy connection looks at its socket once per loop wakeup instead of
 * keeping a receive armed: the client's next requests are then picked up
 * with the disk completions the loop wakes for anyway, rather than each
 * send of the client waking the loop on its own (randread 4k on disk:
 * about 3% less CPU per I/O).  Non-blocking recv.  Only while the
 * connection's own requests are being served: a connection whose replies
 * merely wait to be sent, or an idle one, waits on the ring as before, so
 * the polling is bounded by the I/O actually done. */
static ssize_t conn_recv_rx(struct nbd_conn *c, void *buf, size_t len)
{
    while (!c->tls && !c->handshaking && c->running >= LAZY_RECV_MIN) {
        ssize_t n = recv(c->fd, buf, len, MSG_DONTWAIT);
        if (n >= 0)
            return n;
        if (errno == EINTR)
            continue;
        if (errno != EAGAIN && errno != EWOULDBLOCK)
            return -errno;
        if (!loop_wait_file_turn(LAZY_RECV_MIN))
            break;
    }
    return conn_recv(c, buf, len);
}

static void ticker_start(struct nbd_server *s);

/* In transmission, a request begun must be complete within the request
 * timeout; the ticker cuts the connection otherwise.  Cleared by conn_serve
 * once the unit (header, payload) is in. */
static void rx_arm_deadline(struct nbd_conn *c)
{
    if (c->handshaking || c->req_deadline)
        return;
    c->req_deadline = now_ms() + c->s->req_timeout_ms;
    ticker_start(c->s);
}

/* Make `need` bytes available at rx + rx_start.  Returns 1, 0 on a clean
 * EOF (nothing of the unit received), or -errno (-EPIPE: EOF mid-unit). */
static int rx_need(struct nbd_conn *c, size_t need)
{
    size_t have = c->rx_end - c->rx_start;
    bool partial = have > 0;

    if (have >= need)
        return 1;
    if (c->rx_start) {
        memmove(c->rx, c->rx + c->rx_start, have);
        c->rx_start = 0;
        c->rx_end = have;
    }
    while (c->rx_end < need) {
        if (c->rx_end > 0)
            rx_arm_deadline(c);     /* part of a unit is here: the rest is due */
        ssize_t n = conn_recv_rx(c, c->rx + c->rx_end, c->rx_cap - c->rx_end);
        if (n == -EINTR || n == -EAGAIN)
            continue;
        if (n < 0)
            return (int)n;
        if (n == 0)
            return partial || c->rx_end > 0 ? -EPIPE : 0;
        c->rx_end += (size_t)n;
    }
    return 1;
}

/* Copy the next len bytes of the stream to dst: what is buffered first,
 * the rest straight from the socket.  Returns 0 or -errno. */
static int rx_copy(struct nbd_conn *c, void *dst, size_t len)
{
    size_t have = c->rx_end - c->rx_start;
    size_t n = have < len ? have : len;

    if (n < len)
        rx_arm_deadline(c);
    if (len <= RX_SMALL && len <= c->rx_cap && n < len) {
        /* A small payload cut by the end of the buffer: refill the buffer
         * instead of receiving only the rest, so the same recv also brings
         * the requests that follow. */
        int r = rx_need(c, len);
        if (r <= 0)
            return r == 0 ? -EPIPE : r;
        n = len;
    }

    memcpy(dst, c->rx + c->rx_start, n);
    c->rx_start += n;
    if (n < len && !c->tls) {
        ssize_t r = io_recv_all(c->fd, (uint8_t *)dst + n, len - n);
        if (r == 0)
            return -EPIPE;
        if (r < 0)
            return (int)r;
        return 0;
    }
    while (n < len) {
        ssize_t r = conn_recv(c, (uint8_t *)dst + n, len - n);
        if (r == -EINTR || r == -EAGAIN)
            continue;
        if (r == 0)
            return -EPIPE;
        if (r < 0)
            return (int)r;
        n += (size_t)r;
    }
    return 0;
}

/* Send every byte described by iov (modified on the way). */
static int send_iov(struct nbd_conn *c, struct iovec *iov, int cnt)
{
    if (c->tls)
        return nbd_tls_sendv(c->tls, iov, cnt);
    return io_sendv_all(c->fd, iov, cnt);
}

static int send_all(struct nbd_conn *c, const void *buf, size_t len)
{
    struct iovec iov = { (void *)buf, len };
    return send_iov(c, &iov, 1);
}

/* ---- request pool ---------------------------------------------------------- */

static struct nbd_req *req_get(struct nbd_conn *c)
{
    struct nbd_server *s = c->s;
    struct nbd_req *rq = s->pool;
    uint8_t *buf = NULL;
    size_t cap = 0;

    if (rq) {
        s->pool = rq->next;
        s->pool_len--;
        s->pool_bytes -= rq->buf_cap;
        buf = rq->buf;
        cap = rq->buf_cap;
    } else {
        rq = malloc(sizeof(*rq));
        if (!rq)
            return NULL;
    }
    memset(rq, 0, sizeof(*rq));
    rq->c = c;
    rq->buf = buf;
    rq->buf_cap = cap;
    return rq;
}

/* A buffer of at least len bytes (contents undefined): the request's own,
 * a spare one that fits, or a new one. */
static uint8_t *req_buf(struct nbd_req *rq, size_t len)
{
    struct nbd_server *s = rq->c->s;

    if (rq->buf_cap >= len)
        return rq->buf;
    for (unsigned i = s->nspare; i-- > 0;) {
        if (s->spare[i].cap >= len && s->spare[i].cap <= 2 * round_up(len, IO_ALIGN)) {
            io_free(rq->buf);
            rq->buf = s->spare[i].buf;
            rq->buf_cap = s->spare[i].cap;
            s->pool_bytes -= rq->buf_cap;
            s->spare[i] = s->spare[--s->nspare];
            return rq->buf;
        }
    }
    size_t cap = round_up(len, IO_ALIGN);
    io_free(rq->buf);
    rq->buf = io_alloc(cap);
    rq->buf_cap = cap;
    return rq->buf;
}

/* Set up the slots once, from the loop's thread; without them (no memory,
 * RLIMIT_MEMLOCK) every request uses ordinary buffers. */
static void slots_init(struct nbd_server *s)
{
    struct loop *l = loop_current();

    s->slots_tried = true;
    if (!l)
        return;
    s->slots = io_alloc(SLOTS * SLOT_SIZE);
    if (loop_register_buffer(l, s->slots, SLOTS * SLOT_SIZE) < 0) {
        io_free(s->slots);
        s->slots = NULL;
        return;
    }
    s->slots_loop = l;
    for (unsigned i = 0; i < SLOTS; i++)
        s->free_slots[i] = (uint16_t)(SLOTS - 1 - i);
    s->nfree_slots = SLOTS;
}

/* Unregister and free the slots (no request holds one); the next request
 * sets them up again. */
static void slots_release(struct nbd_server *s)
{
    if (s->slots) {
        if (s->slots_loop == loop_current())
            loop_unregister_buffer(s->slots_loop);
        io_free(s->slots);
        s->slots = NULL;
    }
    s->slots_loop = NULL;
    s->nfree_slots = 0;
    s->slots_tried = false;
}

/* A buffer of at least len bytes: a free slot if len fits one, else
 * req_buf's. */
static uint8_t *req_small_buf(struct nbd_req *rq, size_t len)
{
    struct nbd_server *s = rq->c->s;

    if (!rq->slot && len <= SLOT_SIZE) {
        if (!s->slots_tried)
            slots_init(s);
        if (s->nfree_slots)
            rq->slot = s->slots + (size_t)s->free_slots[--s->nfree_slots] * SLOT_SIZE;
    }
    return rq->slot && len <= SLOT_SIZE ? rq->slot : req_buf(rq, len);
}

static void req_put_slot(struct nbd_req *rq)
{
    struct nbd_server *s = rq->c->s;

    if (!rq->slot)
        return;
    s->free_slots[s->nfree_slots++] = (uint16_t)((size_t)(rq->slot - s->slots) / SLOT_SIZE);
    rq->slot = NULL;
}

/* A write is done with its payload once written: the buffer goes back for
 * reuse now rather than with the reply, so a client that does not read
 * its replies does not keep its payloads alive. */
static void req_drop_buf(struct nbd_req *rq)
{
    struct nbd_server *s = rq->c->s;

    req_put_slot(rq);
    rq->payload = NULL;
    if (!rq->buf)
        return;
    if (rq->buf_cap <= POOL_BUF_MAX && s->nspare < SPARE_MAX &&
        s->pool_bytes + rq->buf_cap <= POOL_BYTES_MAX) {
        s->spare[s->nspare].buf = rq->buf;
        s->spare[s->nspare].cap = rq->buf_cap;
        s->nspare++;
        s->pool_bytes += rq->buf_cap;
    } else {
        io_free(rq->buf);
    }
    rq->buf = NULL;
    rq->buf_cap = 0;
}

static void req_put(struct nbd_server *s, struct nbd_req *rq)
{
    if (rq->buf && (rq->buf_cap > POOL_BUF_MAX || s->pool_bytes + rq->buf_cap > POOL_BYTES_MAX)) {
        io_free(rq->buf);
        rq->buf = NULL;
        rq->buf_cap = 0;
    }
    if (s->pool_len >= POOL_REQS_MAX) {
        io_free(rq->buf);
        free(rq);
        return;
    }
    rq->next = s->pool;
    s->pool = rq;
    s->pool_len++;
    s->pool_bytes += rq->buf_cap;
}

/* Give back the large idle buffers (no client is connected). */
static void pool_trim(struct nbd_server *s)
{
    for (unsigned i = s->nspare; i-- > 0;) {
        if (s->spare[i].cap > POOL_BUF_SMALL) {
            s->pool_bytes -= s->spare[i].cap;
            io_free(s->spare[i].buf);
            s->spare[i] = s->spare[--s->nspare];
        }
    }
    for (struct nbd_req *rq = s->pool; rq; rq = rq->next) {
        if (rq->buf_cap > POOL_BUF_SMALL) {
            s->pool_bytes -= rq->buf_cap;
            io_free(rq->buf);
            rq->buf = NULL;
            rq->buf_cap = 0;
        }
    }
}

/* ---- handshake ------------------------------------------------------------- */

static int opt_reply(struct nbd_conn *c, uint32_t opt, uint32_t type,
                     const void *data, size_t len)
{
    uint8_t hdr[20];
    int r;

    nbd_put64(hdr, NBD_REP_MAGIC);
    nbd_put32(hdr + 8, opt);
    nbd_put32(hdr + 12, type);
    nbd_put32(hdr + 16, (uint32_t)len);
    r = send_all(c, hdr, sizeof(hdr));
    if (r == 0 && len)
        r = send_all(c, data, len);
    return r;
}

static int opt_error(struct nbd_conn *c, uint32_t opt, uint32_t type, const char *msg)
{
    return opt_reply(c, opt, type, msg, strlen(msg));
}

static bool name_matches(const struct nbd_server *s, const uint8_t *name, size_t len)
{
    return len == strlen(s->name) && memcmp(name, s->name, len) == 0;
}

/* An NBD_REP_INFO item: u16 type followed by its payload. */
static int send_info(struct nbd_conn *c, uint32_t opt, uint16_t type, const void *data, size_t len)
{
    uint8_t buf[2 + NBD_MAX_STRING];

    if (len > NBD_MAX_STRING)
        len = NBD_MAX_STRING;
    nbd_put16(buf, type);
    memcpy(buf + 2, data, len);
    return opt_reply(c, opt, NBD_REP_INFO, buf, 2 + len);
}

/* NBD_OPT_INFO and NBD_OPT_GO.  Returns 1 when GO succeeded (transmission
 * starts), 0 to keep haggling, -errno when the connection failed. */
static int handle_info(struct nbd_conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
    struct nbd_server *s = c->s;
    struct nbd_info_req in;
    const char *why;
    uint8_t item[14];
    int r;

    if (nbd_parse_info_req(data, len, &in, &why))
        return opt_error(c, opt, NBD_REP_ERR_INVALID, why);
    if (!name_matches(s, in.name, in.namelen))
        return opt_error(c, opt, NBD_REP_ERR_UNKNOWN, "no export of that name");

    nbd_put64(item, img_size(s->img));
    nbd_put16(item + 8, s->tx_flags);
    r = send_info(c, opt, NBD_INFO_EXPORT, item, 10);
    if (r == 0 && in.want_name)
        r = send_info(c, opt, NBD_INFO_NAME, s->name, strlen(s->name));
    if (r == 0 && in.want_desc && s->description)
        r = send_info(c, opt, NBD_INFO_DESCRIPTION, s->description, strlen(s->description));
    if (r == 0) {
        /* Sent even unasked (the protocol allows it); only enforced below
         * for clients that asked, since only they promised to honour it. */
        nbd_put32(item, NBD_BLOCK_MIN);
        nbd_put32(item + 4, NBD_BLOCK_PREFERRED);
        nbd_put32(item + 8, NBD_BLOCK_MAX);
        r = send_info(c, opt, NBD_INFO_BLOCK_SIZE, item, 12);
    }
    if (r == 0)
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    if (r < 0)
        return r;
    if (opt == NBD_OPT_GO) {
        c->strict_align = in.want_block;
        return 1;
    }
    return 0;
}

#define HS_MORE 2       /* from a handshake step: read the next option */

/* The server's greeting, then the client's flags: HS_MORE, or 0 when the
 * client went away, -1 on a failure (logged). */
static int greet_client(struct nbd_conn *c)
{
    uint8_t greet[18];
    nbd_put64(greet, NBD_MAGIC);
    nbd_put64(greet + 8, NBD_OPTS_MAGIC);
    nbd_put16(greet + 16, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
    if (send_all(c, greet, sizeof(greet)) < 0)
        return 0;

    int r = rx_need(c, 4);
    if (r <= 0)
        return r == 0 ? 0 : -1;
    uint32_t cflags = nbd_get32(c->rx + c->rx_start);
    c->rx_start += 4;
    if (cflags & ~(uint32_t)(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)) {
        conn_log(c, "unknown client flags 0x%x, closing", cflags);
        return -1;
    }
    c->no_zeroes = cflags & NBD_FLAG_C_NO_ZEROES;
    return HS_MORE;
}

/* The next option: its header, and its data (up to MAX_OPTION_LEN bytes)
 * into *data, sized to the option (a client stalled mid-option holds only
 * what it sent).  HS_MORE, or 0 at EOF, -1 on a failure (logged). */
static int read_option(struct nbd_conn *c, uint8_t **data, uint32_t *opt, uint32_t *len)
{
    struct nbd_opt_hdr oh;
    int r = rx_need(c, NBD_OPT_HDR_SIZE);
    if (r == 0)
        return 0;
    if (r < 0) {
        conn_log(c, "connection lost during the handshake: %s", strerror(-r));
        return -1;
    }
    nbd_parse_opt_hdr(c->rx + c->rx_start, &oh);
    *opt = oh.opt;
    *len = oh.len;
    c->rx_start += NBD_OPT_HDR_SIZE;
    if (oh.magic != NBD_OPTS_MAGIC) {
        conn_log(c, "bad option magic 0x%016llx, closing", (unsigned long long)oh.magic);
        return -1;
    }
    if (*len > MAX_OPTION_LEN) {
        conn_log(c, "option %u with %u bytes of data is too long, closing", *opt, *len);
        return -1;
    }
    free(*data);
    *data = malloc(*len ? *len : 1);
    if (!*data) {
        conn_log(c, "out of memory");
        return -1;
    }
    r = rx_copy(c, *data, *len);
    if (r < 0) {
        conn_log(c, "connection lost during the handshake: %s", strerror(-r));
        return -1;
    }
    return HS_MORE;
}

/* NBD_OPT_EXPORT_NAME: the old way in, without an error reply. */
static int answer_export_name(struct nbd_conn *c, const uint8_t *data, uint32_t len)
{
    struct nbd_server *s = c->s;
    uint8_t reply[10 + 124] = { 0 };
    if (!name_matches(s, data, len)) {
        /* This option has no error reply: the session must end. */
        conn_log(c, "unknown export name requested, closing");
        return -1;
    }
    nbd_put64(reply, img_size(s->img));
    nbd_put16(reply + 8, s->tx_flags);
    int r = send_all(c, reply, c->no_zeroes ? 10 : sizeof(reply));
    return r < 0 ? 0 : 1;
}

/* NBD_OPT_LIST: our one export. */
static int answer_list(struct nbd_conn *c, uint32_t opt, uint32_t len)
{
    struct nbd_server *s = c->s;
    if (len)
        return opt_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST takes no data");
    size_t nl = strlen(s->name);
    uint8_t *srv = malloc(4 + nl);
    int r = -ENOMEM;
    if (srv) {
        nbd_put32(srv, (uint32_t)nl);
        memcpy(srv + 4, s->name, nl);
        r = opt_reply(c, opt, NBD_REP_SERVER, srv, 4 + nl);
        free(srv);
    }
    if (r == 0)
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
    return r;
}

/* NBD_OPT_STARTTLS: acknowledge, then run the TLS handshake on the socket.
 * HS_MORE (answered, or TLS now active), -1 to close. */
static int answer_starttls(struct nbd_conn *c, uint32_t opt, uint32_t len)
{
    struct nbd_server *s = c->s;
    int r;
    if (s->tls_mode == NBD_TLS_OFF)
        r = opt_error(c, opt, NBD_REP_ERR_UNSUP, "TLS is not enabled on this server");
    else if (c->tls)
        r = opt_error(c, opt, NBD_REP_ERR_INVALID, "TLS is already active");
    else if (len)
        r = opt_error(c, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
    else if (c->rx_end != c->rx_start) {
        /* Bytes sent before our ACK would be taken as if they had come
         * through TLS (a plain-text injection): refuse. */
        conn_log(c, "data after NBD_OPT_STARTTLS before the TLS handshake, closing");
        return -1;
    } else {
        r = opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
        if (r < 0)
            return -1;
        char why[256];
        c->tls = nbd_tls_start(s->tls, c->fd, why, sizeof(why));
        if (!c->tls) {
            conn_log(c, "%s", why);
            return -1;
        }
        uq_debug("nbd: client %llu (%s): TLS established (%s)", (unsigned long long)c->id,
                 c->peer, nbd_tls_identity(c->tls));
    }
    return r < 0 ? -1 : HS_MORE;
}

/* Options that cannot be answered now: under TLS required, everything but
 * STARTTLS and ABORT in plain text (no export name, size or list leaks to an
 * eavesdropper); while stopping, everything but ABORT.  0 if opt may go on,
 * else the handshake's next step. */
static int refuse_option(struct nbd_conn *c, uint32_t opt)
{
    struct nbd_server *s = c->s;
    int r;
    if (s->tls_mode == NBD_TLS_REQUIRE && !c->tls && opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
        if (opt == NBD_OPT_EXPORT_NAME) {
            /* No error reply exists for it: the session ends. */
            conn_log(c, "NBD_OPT_EXPORT_NAME in plain text while TLS is required, closing");
            return -1;
        }
        r = opt_error(c, opt, NBD_REP_ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first");
        return r < 0 ? -1 : HS_MORE;
    }
    if (s->stopping && opt != NBD_OPT_ABORT) {
        if (opt == NBD_OPT_EXPORT_NAME)
            return -1;      /* cannot be answered with an error */
        r = opt_error(c, opt, NBD_REP_ERR_SHUTDOWN, "server is shutting down");
        return r < 0 ? -1 : HS_MORE;
    }
    return 0;
}

/* Answer one option: HS_MORE for the next one, else the handshake's
 * result (1 transmission, 0 clean end, -1 failure). */
static int answer_option(struct nbd_conn *c, uint32_t opt, const uint8_t *data, uint32_t len)
{
    int r = refuse_option(c, opt);
    if (r != 0)
        return r;
    switch (opt) {
    case NBD_OPT_EXPORT_NAME:
        return answer_export_name(c, data, len);
    case NBD_OPT_ABORT:
        opt_reply(c, opt, NBD_REP_ACK, NULL, 0);
        return 0;
    case NBD_OPT_LIST:
        r = answer_list(c, opt, len);
        break;
    case NBD_OPT_INFO:
    case NBD_OPT_GO:
        r = handle_info(c, opt, data, len);
        if (r == 1)
            return 1;
        break;
    case NBD_OPT_STARTTLS:
        return answer_starttls(c, opt, len);
    case NBD_OPT_STRUCTURED_REPLY:
        r = opt_error(c, opt, NBD_REP_ERR_UNSUP, "structured replies are not supported");
        break;
    default:
        r = opt_error(c, opt, NBD_REP_ERR_UNSUP, "option not supported");
        break;
    }
    return r < 0 ? -1 : HS_MORE;    /* r < 0: the client went away */
}

/* Returns 1 when transmission starts, 0 when the session ended cleanly
 * (abort, EOF), -1 on a failure (logged). */
static int conn_handshake(struct nbd_conn *c)
{
    int r = greet_client(c);
    if (r != HS_MORE)
        return r;
    uint8_t *data = NULL;
    uint32_t opt = 0, len = 0;
    do {
        r = read_option(c, &data, &opt, &len);
        if (r == HS_MORE)
            r = answer_option(c, opt, data, len);
    } while (r == HS_MORE);
    free(data);
    return r;
}

/* ---- requests -------------------------------------------------------------- */

/* Checks common to every command: flags, permission, range. */
static int req_check(const struct nbd_req *rq, uint16_t allowed_flags, bool writes)
{
    const struct nbd_server *s = rq->c->s;

    return nbd_check_request(rq->flags, rq->off, rq->len, allowed_flags, writes, s->read_only,
                             img_size(s->img));
}

static bool aligned(const struct nbd_req *rq)
{
    return (rq->off % SECTOR) == 0 && (rq->len % SECTOR) == 0;
}

/* Read-modify-write of one sector: bytes [from, to) of the sector at
 * `sector` become src (or zeroes when src is NULL).  Exclusive lock held. */
static int rmw_sector(struct image *img, uint8_t *bounce, uint64_t sector,
                      size_t from, size_t to, const uint8_t *src)
{
    int r = img_read(img, bounce, sector, SECTOR);
    if (r < 0)
        return r;
    if (src)
        memcpy(bounce + from, src, to - from);
    else
        memset(bounce + from, 0, to - from);
    return img_write(img, bounce, sector, SECTOR, 0);
}

/* Fallback when the format cannot write zeroes natively. */
static int write_zero_buffers(struct image *img, uint64_t off, uint64_t len)
{
    const uint64_t chunk = 1u << 20;
    uint8_t *zero = io_zalloc(chunk);
    int r = 0;

    while (len && r == 0) {
        uint64_t n = len < chunk ? len : chunk;
        r = img_write(img, zero, off, n, 0);
        off += n;
        len -= n;
    }
    io_free(zero);
    return r;
}

static int zeroes_aligned(struct image *img, uint64_t off, uint64_t len, unsigned flags)
{
    int r = img_write_zeroes(img, off, len, flags);
    if (r == -EOPNOTSUPP)
        r = write_zero_buffers(img, off, len);
    return r;
}

/* READ: on success the reply data is rq->data. */
static int do_read(struct nbd_req *rq)
{
    struct nbd_server *s = rq->c->s;
    uint64_t a0, a1;
    uint8_t *buf;
    int r;

    r = req_check(rq, NBD_CMD_FLAG_FUA, false);   /* FUA on a read: nothing to persist */
    if (r < 0)
        return r;
    if (rq->len == 0)
        return 0;
    if (rq->len > NBD_BLOCK_MAX)
        return -EINVAL;
    if (!aligned(rq) && rq->c->strict_align)
        return -EINVAL;
    if (rq->stream)
        return 0;       /* the sender reads it (stream_read) */
    a0 = round_down(rq->off, SECTOR);
    a1 = round_up(rq->off + rq->len, SECTOR);
    buf = req_small_buf(rq, a1 - a0);
    co_rwlock_rdlock(&s->rmw_lock);
    r = img_read(s->img, buf, a0, a1 - a0);
    co_rwlock_unlock(&s->rmw_lock);
    if (r < 0)
        return r;
    rq->data = buf + (rq->off - a0);
    rq->data_len = rq->len;
    return 0;
}

static int do_write(struct nbd_req *rq)
{
    struct nbd_server *s = rq->c->s;
    unsigned flags = (rq->flags & NBD_CMD_FLAG_FUA) ? IMG_FUA : 0;
    uint64_t a0, a1, alen;
    uint8_t *bounce;
    int r;

    r = req_check(rq, NBD_CMD_FLAG_FUA, true);
    if (r < 0 || rq->len == 0)
        return r;
    rq->c->dirty = true;
    if (aligned(rq)) {
        co_rwlock_rdlock(&s->rmw_lock);
        r = img_write(s->img, rq->payload, rq->off, rq->len, flags);
        co_rwlock_unlock(&s->rmw_lock);
        return r < 0 ? r : 0;
    }
    if (rq->c->strict_align)
        return -EINVAL;

    /* Misaligned write from a client that never asked for block sizes:
     * merge it into whole sectors under the exclusive lock. */
    a0 = round_down(rq->off, SECTOR);
    a1 = round_up(rq->off + rq->len, SECTOR);
    alen = a1 - a0;
    bounce = io_alloc(alen);
    co_rwlock_wrlock(&s->rmw_lock);
    r = 0;
    if (rq->off != a0)
        r = img_read(s->img, bounce, a0, SECTOR);
    if (r >= 0 && rq->off + rq->len != a1 && (alen > SECTOR || rq->off == a0))
        r = img_read(s->img, bounce + alen - SECTOR, a1 - SECTOR, SECTOR);
    if (r >= 0) {
        memcpy(bounce + (rq->off - a0), rq->payload, rq->len);
        r = img_write(s->img, bounce, a0, alen, flags);
    }
    co_rwlock_unlock(&s->rmw_lock);
    io_free(bounce);
    return r < 0 ? r : 0;
}

static int do_trim(struct nbd_req *rq)
{
    struct nbd_server *s = rq->c->s;
    uint64_t b0, b1;
    int r;

    r = req_check(rq, NBD_CMD_FLAG_FUA, true);
    if (r < 0 || rq->len == 0)
        return r;
    if (!aligned(rq) && rq->c->strict_align)
        return -EINVAL;
    rq->c->dirty = true;
    /* TRIM is advisory: only whole sectors inside the range are discarded. */
    b0 = round_up(rq->off, SECTOR);
    b1 = round_down(rq->off + rq->len, SECTOR);
    if (b1 <= b0)
        return 0;
    co_rwlock_rdlock(&s->rmw_lock);
    r = img_discard(s->img, b0, b1 - b0);
    co_rwlock_unlock(&s->rmw_lock);
    if (r == -EOPNOTSUPP)
        r = 0;
    /* FUA: the discard must be durable before the reply. */
    if (r == 0 && (rq->flags & NBD_CMD_FLAG_FUA))
        r = img_flush(s->img);
    return r < 0 ? r : 0;
}

static int do_write_zeroes(struct nbd_req *rq)
{
    struct nbd_server *s = rq->c->s;
    unsigned flags = (rq->flags & NBD_CMD_FLAG_NO_HOLE) ? IMG_NO_HOLE : 0;
    uint64_t end = rq->off + rq->len;
    int r;

    r = req_check(rq, NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE, true);
    if (r < 0 || rq->len == 0)
        return r;
    rq->c->dirty = true;
    if (aligned(rq)) {
        co_rwlock_rdlock(&s->rmw_lock);
        r = zeroes_aligned(s->img, rq->off, rq->len, flags);
        co_rwlock_unlock(&s->rmw_lock);
    } else if (rq->c->strict_align) {
        return -EINVAL;
    } else {
        /* Partial head/tail sectors by RMW, the whole sectors between natively. */
        uint64_t h = round_down(rq->off, SECTOR), t = round_down(end, SECTOR);
        uint8_t *bounce = io_alloc(SECTOR);
        co_rwlock_wrlock(&s->rmw_lock);
        if (h == t) {
            r = rmw_sector(s->img, bounce, h, rq->off - h, end - h, NULL);
        } else {
            uint64_t m0 = round_up(rq->off, SECTOR);
            r = 0;
            if (m0 != rq->off)
                r = rmw_sector(s->img, bounce, h, rq->off - h, SECTOR, NULL);
            if (r >= 0 && t > m0)
                r = zeroes_aligned(s->img, m0, t - m0, flags);
            if (r >= 0 && end != t)
                r = rmw_sector(s->img, bounce, t, 0, end - t, NULL);
        }
        co_rwlock_unlock(&s->rmw_lock);
        io_free(bounce);
    }
    /* FUA: zeroes must be durable before the reply. */
    if (r >= 0 && (rq->flags & NBD_CMD_FLAG_FUA))
        r = img_flush(s->img);
    return r < 0 ? r : 0;
}

static int do_flush(struct nbd_req *rq)
{
    int r = req_check(rq, NBD_CMD_FLAG_FUA, false);
    if (r < 0)
        return r;
    rq->c->dirty = false;
    r = img_flush(rq->c->s->img);
    return r < 0 ? r : 0;
}

static void req_free(struct nbd_req *rq)
{
    struct nbd_conn *c = rq->c;

    mem_release(c, rq->cost);
    req_put_slot(rq);
    req_put(c->s, rq);
    c->inflight--;
    co_queue_wake_one(&c->slot_wait);
    if (c->inflight == 0)
        co_queue_wake_all(&c->idle_wait);
}

static void req_run(void *arg)
{
    struct nbd_req *rq = arg;
    struct nbd_conn *c = rq->c;
    int err;

    if (c->s->stopping) {
        err = -ESHUTDOWN;   /* received after shutdown began */
    } else {
        switch (rq->type) {
        case NBD_CMD_READ:         err = do_read(rq); break;
        case NBD_CMD_WRITE:        err = do_write(rq); break;
        case NBD_CMD_FLUSH:        err = do_flush(rq); break;
        case NBD_CMD_TRIM:         err = do_trim(rq); break;
        case NBD_CMD_WRITE_ZEROES: err = do_write_zeroes(rq); break;
        default:                   err = -EINVAL; break;   /* unknown or not negotiated */
        }
    }
    c->running--;
    if (rq->type == NBD_CMD_WRITE) {
        /* Written (or failed): the payload is no longer needed. */
        req_drop_buf(rq);
        mem_release(c, rq->cost);
        rq->cost = 0;
    }
    if (err) {
        rq->data_len = 0;
        rq->stream = false;
    }
    nbd_put32(rq->hdr, NBD_SIMPLE_REPLY_MAGIC);
    nbd_put32(rq->hdr + 4, nbd_error(err));
    nbd_put64(rq->hdr + 8, rq->cookie);

    if (c->dead) {
        req_free(rq);
        return;
    }
    /* The sender owns the request from here and frees it once sent. */
    rq->next = NULL;
    if (c->reply_tail)
        c->reply_tail->next = rq;
    else
        c->reply_head = rq;
    c->reply_tail = rq;
    co_queue_wake_one(&c->send_wait);
}

static void conn_fail_send(struct nbd_conn *c)
{
    /* The client is gone (or its reply cannot be completed): stop the
     * receive loop too. */
    c->dead = true;
    shutdown(c->fd, SHUT_RDWR);
}

/* A streamed READ: header and data in STREAM_CHUNK pieces, each read just
 * before it is sent.  A read error after the header went out cannot be
 * reported in a simple reply: the connection is closed instead, as the
 * protocol prescribes. */
static void stream_read(struct nbd_conn *c, struct nbd_req *rq)
{
    struct nbd_server *s = c->s;
    uint64_t pos = rq->off, end = rq->off + rq->len;
    uint8_t *buf = io_alloc(STREAM_CHUNK + 2 * SECTOR);
    bool header_sent = false;

    while (pos < end && !c->dead) {
        uint64_t n = end - pos < STREAM_CHUNK ? end - pos : STREAM_CHUNK;
        uint64_t a0 = round_down(pos, SECTOR), a1 = round_up(pos + n, SECTOR);
        struct iovec iov[2];
        int niov = 0, r;

        co_rwlock_rdlock(&s->rmw_lock);
        r = img_read(s->img, buf, a0, a1 - a0);
        co_rwlock_unlock(&s->rmw_lock);
        if (r < 0 && header_sent) {
            conn_log(c, "read at offset %llu failed in the middle of a reply (%s), closing",
                     (unsigned long long)pos, strerror(-r));
            conn_fail_send(c);
            break;
        }
        if (r < 0) {
            nbd_put32(rq->hdr + 4, nbd_error(r));
            if (send_all(c, rq->hdr, sizeof(rq->hdr)) < 0)
                conn_fail_send(c);
            break;
        }
        if (!header_sent) {
            iov[niov++] = (struct iovec){ rq->hdr, sizeof(rq->hdr) };
            header_sent = true;
        }
        iov[niov++] = (struct iovec){ buf + (pos - a0), n };
        if (send_iov(c, iov, niov) < 0)
            conn_fail_send(c);
        pos += n;
    }
    io_free(buf);
}

/* Writes the queued replies, as many per sendmsg as have piled up while
 * the previous one was on its way; a streamed read goes out on its own. */
static void conn_sender(void *arg)
{
    struct nbd_conn *c = arg;
    struct nbd_req *batch[SEND_BATCH];
    struct iovec iov[2 * SEND_BATCH];

    for (;;) {
        unsigned n = 0;
        int niov = 0;

        while (!c->reply_head && !c->closing)
            co_queue_wait(&c->send_wait);
        if (!c->reply_head)
            break;
        if (c->reply_head->stream) {
            struct nbd_req *rq = c->reply_head;
            c->reply_head = rq->next;
            if (!c->reply_head)
                c->reply_tail = NULL;
            if (!c->dead)
                stream_read(c, rq);
            req_free(rq);
            continue;
        }
        while (c->reply_head && n < SEND_BATCH && !c->reply_head->stream) {
            struct nbd_req *rq = c->reply_head;
            c->reply_head = rq->next;
            batch[n++] = rq;
            iov[niov++] = (struct iovec){ rq->hdr, sizeof(rq->hdr) };
            if (rq->data_len)
                iov[niov++] = (struct iovec){ rq->data, rq->data_len };
        }
        if (!c->reply_head)
            c->reply_tail = NULL;
        if (!c->dead && send_iov(c, iov, niov) < 0)
            conn_fail_send(c);
        for (unsigned i = 0; i < n; i++)
            req_free(batch[i]);
    }
    c->sender_alive = false;
    co_queue_wake_all(&c->idle_wait);
}

/* The receive loop of the transmission phase. */
static void conn_serve(struct nbd_conn *c)
{
    for (;;) {
        struct nbd_req *rq;
        struct nbd_request h;
        int r;

        r = rx_need(c, NBD_REQUEST_SIZE);
        if (r == 0)
            break;
        if (r < 0) {
            if (r == -EPIPE)
                conn_log(c, "connection closed in the middle of a request header");
            else if (!c->dead)
                conn_log(c, "connection lost: %s", strerror(-r));
            break;
        }
        c->req_deadline = 0;        /* the header is in */
        nbd_parse_request(c->rx + c->rx_start, &h);
        if (h.magic != NBD_REQUEST_MAGIC) {
            conn_log(c, "bad request magic 0x%08x, closing", h.magic);
            break;
        }
        rq = req_get(c);
        if (!rq) {
            conn_log(c, "out of memory, closing");
            break;
        }
        rq->flags = h.flags;
        rq->type = h.type;
        rq->cookie = h.cookie;
        rq->off = h.off;
        rq->len = h.len;
        c->rx_start += NBD_REQUEST_SIZE;

        if (rq->type == NBD_CMD_DISC) {
            req_put(c->s, rq);
            break;
        }
        if (rq->type == NBD_CMD_WRITE && rq->len > NBD_BLOCK_MAX) {
            /* Its payload cannot be buffered: the stream is lost. */
            conn_log(c, "write of %u bytes exceeds the %u byte maximum, closing",
                     rq->len, NBD_BLOCK_MAX);
            req_put(c->s, rq);
            break;
        }

        while (c->inflight >= NBD_MAX_INFLIGHT)
            co_queue_wait(&c->slot_wait);
        if (rq->type == NBD_CMD_WRITE) {
            rq->cost = rq->len;
            mem_reserve(c, rq->cost);
        } else if (rq->type == NBD_CMD_READ && rq->len > 0 && rq->len <= NBD_BLOCK_MAX) {
            /* Large reads, and reads over the budget, never wait for
             * memory: they are streamed once their turn to be sent comes. */
            uint64_t cost = IO_ALIGN + rq->len + 2 * SECTOR;
            if (rq->len <= STREAM_MIN && mem_try_reserve(c, cost))
                rq->cost = cost;
            else
                rq->stream = true;
        }
        c->inflight++;

        if (rq->type == NBD_CMD_WRITE && rq->len) {
            rq->payload = req_small_buf(rq, rq->len);
            r = rx_copy(c, rq->payload, rq->len);
            if (r < 0) {
                conn_log(c, "connection lost in the middle of a write payload: %s",
                         r == -EPIPE || r == -ECONNRESET ? "closed by the client" : strerror(-r));
                req_free(rq);
                break;
            }
            c->req_deadline = 0;
        }
        c->running++;
        co_spawn(req_run, rq);
    }
}

/* ---- connections ----------------------------------------------------------- */

static int conn_grow_rx(struct nbd_conn *c);

static void conn_run(void *arg)
{
    struct nbd_conn *c = arg;
    struct nbd_server *s = c->s;

    if (conn_handshake(c) == 1 && conn_grow_rx(c) == 0) {
        c->handshaking = false;
        uq_info("nbd: client %llu connected (%s, %s)", (unsigned long long)c->id, c->peer,
                c->tls ? nbd_tls_identity(c->tls) : "no TLS");
        c->sender_alive = true;
        co_spawn(conn_sender, c);
        conn_serve(c);
    }
    c->handshaking = false;

    while (c->inflight)
        co_queue_wait(&c->idle_wait);
    c->closing = true;
    co_queue_wake_all(&c->send_wait);
    while (c->sender_alive)
        co_queue_wait(&c->idle_wait);
    /* Make a departing client's writes durable even if it never flushed
     * (the metadata cache may hold them).  Cheap: once per disconnect. */
    if (c->dirty && !s->read_only) {
        int r = img_flush(s->img);
        if (r < 0)
            conn_log(c, "flush after disconnect failed: %s", strerror(-r));
    }
    uq_info("nbd: client %llu disconnected (%s)", (unsigned long long)c->id, c->peer);
    if (c->tls) {
        /* close_notify only when it cannot block: a client that stopped
         * reading must not hold the connection open. */
        struct pollfd pfd = { .fd = c->fd, .events = POLLOUT };
        bool bye = !c->dead && !s->stopping && poll(&pfd, 1, 0) == 1 && (pfd.revents & POLLOUT);
        nbd_tls_close(c->tls, bye);
        c->tls = NULL;
    }
    close(c->fd);
    if (c->prev)
        c->prev->next = c->next;
    else
        s->conns = c->next;
    if (c->next)
        c->next->prev = c->prev;
    s->nconns--;
    free(c->rx);
    free(c);
    if (s->nconns == 0) {
        /* Back to the idle footprint: large pooled buffers, the slots,
         * and the heap pages freed by the connections that left. */
        pool_trim(s);
        slots_release(s);
        co_pool_release();      /* idle coroutine stacks: touched pages stay resident */
        malloc_trim(0);
    }
    co_queue_wake_one(&s->slot_free);
    co_queue_wake_all(&s->idle_wait);
}

/* The connection still in its handshake that has been there longest. */
static struct nbd_conn *oldest_handshaking(struct nbd_server *s)
{
    struct nbd_conn *best = NULL;

    for (struct nbd_conn *c = s->conns; c; c = c->next)
        if (c->handshaking && (!best || c->hs_deadline < best->hs_deadline))
            best = c;
    return best;
}

/* Cut c on purpose (timeout, eviction): its coroutine sees the end of the
 * stream and cleans up; no further error lines for it. */
static void conn_cut(struct nbd_conn *c)
{
    c->handshaking = false;
    c->req_deadline = 0;
    c->quiet = true;
    shutdown(c->fd, SHUT_RDWR);
}

/* Closes handshakes that are not done by their deadline, and connections
 * stalled in the middle of a request, so idle, slow or hostile clients
 * cannot hold slots (or memory) for long.  Runs while some connection has
 * a deadline; sleeps at most a second at a time so shutdown is never held
 * up for long (and a deadline set meanwhile is seen within a second). */
static void ticker_run(void *arg)
{
    struct nbd_server *s = arg;

    while (!s->stopping) {
        uint64_t now = now_ms(), next = UINT64_MAX;
        for (struct nbd_conn *c = s->conns; c; c = c->next) {
            uint64_t deadline = c->handshaking ? c->hs_deadline : c->req_deadline;
            if (!deadline)
                continue;
            if (deadline <= now) {
                if (refusal_log_ok(s)) {
                    if (c->handshaking)
                        uq_error("nbd: client %llu (%s): handshake not finished within %u ms, closing",
                                 (unsigned long long)c->id, c->peer, s->hs_timeout_ms);
                    else
                        uq_error("nbd: client %llu (%s): request not received in full within %u ms "
                                 "(--request-timeout), closing",
                                 (unsigned long long)c->id, c->peer, s->req_timeout_ms);
                }
                conn_cut(c);
            } else if (deadline < next) {
                next = deadline;
            }
        }
        if (next == UINT64_MAX)
            break;
        co_sleep_ms(next - now > 1000 ? 1000 : (unsigned)(next - now));
    }
    s->ticker_running = false;
    co_queue_wake_all(&s->idle_wait);
}

static void ticker_start(struct nbd_server *s)
{
    if (s->ticker_running || s->stopping)
        return;
    s->ticker_running = true;
    co_spawn(ticker_run, s);
}

static int conn_grow_rx(struct nbd_conn *c)
{
    uint8_t *rx;

    if (c->rx_cap >= RX_BUF_SIZE)
        return 0;
    rx = realloc(c->rx, RX_BUF_SIZE);
    if (!rx) {
        conn_log(c, "out of memory, closing");
        return -1;
    }
    c->rx = rx;
    c->rx_cap = RX_BUF_SIZE;
    return 0;
}

static void peer_name(int fd, struct sockaddr_storage *ss, char *buf, size_t len)
{
    socklen_t sl = sizeof(*ss);
    char host[INET6_ADDRSTRLEN];

    memset(ss, 0, sizeof(*ss));
    if (getpeername(fd, (struct sockaddr *)ss, &sl) < 0) {
        snprintf(buf, len, "unknown");
        return;
    }
    if (ss->ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &in->sin_addr, host, sizeof(host));
        snprintf(buf, len, "%s:%u", host, ntohs(in->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)ss;
        if (IN6_IS_ADDR_V4MAPPED(&in6->sin6_addr)) {
            inet_ntop(AF_INET, &in6->sin6_addr.s6_addr[12], host, sizeof(host));
            snprintf(buf, len, "%s:%u", host, ntohs(in6->sin6_port));
        } else {
            inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof(host));
            snprintf(buf, len, "[%s]:%u", host, ntohs(in6->sin6_port));
        }
    } else {
        snprintf(buf, len, "unix");
    }
}

static bool prefix_match(const uint8_t *a, const uint8_t *b, unsigned bits)
{
    unsigned bytes = bits / 8, rest = bits % 8;

    if (memcmp(a, b, bytes))
        return false;
    if (rest) {
        uint8_t mask = (uint8_t)(0xff << (8 - rest));
        if ((a[bytes] & mask) != (b[bytes] & mask))
            return false;
    }
    return true;
}

/* --allow: unix peers are governed by the socket file's permissions. */
static bool peer_allowed(const struct nbd_server *s, const struct sockaddr_storage *ss)
{
    const uint8_t *addr;
    int family = ss->ss_family;

    if (!s->nallow || (family != AF_INET && family != AF_INET6))
        return true;
    if (family == AF_INET) {
        addr = (const uint8_t *)&((const struct sockaddr_in *)ss)->sin_addr;
    } else {
        const struct in6_addr *a6 = &((const struct sockaddr_in6 *)ss)->sin6_addr;
        addr = a6->s6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a6)) {
            family = AF_INET;
            addr += 12;
        }
    }
    for (unsigned i = 0; i < s->nallow; i++)
        if (s->allow[i].family == family && prefix_match(addr, s->allow[i].addr, s->allow[i].prefix))
            return true;
    return false;
}

int nbd_allow_parse(const char *spec, struct nbd_allow *out, char *err, size_t errlen)
{
    char host[INET6_ADDRSTRLEN + 2];
    const char *slash = strchr(spec, '/');
    size_t hl = slash ? (size_t)(slash - spec) : strlen(spec);
    unsigned max;

    memset(out, 0, sizeof(*out));
    if (hl == 0 || hl >= sizeof(host))
        goto bad;
    memcpy(host, spec, hl);
    host[hl] = 0;
    if (host[0] == '[' && host[hl - 1] == ']') {
        memmove(host, host + 1, hl - 2);
        host[hl - 2] = 0;
    }
    if (inet_pton(AF_INET, host, out->addr) == 1) {
        out->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, host, out->addr) == 1) {
        out->family = AF_INET6;
        max = 128;
    } else {
        goto bad;
    }
    out->prefix = max;
    if (slash) {
        char *end;
        unsigned long p;
        errno = 0;
        p = strtoul(slash + 1, &end, 10);
        if (!slash[1] || *end || errno || p > max)
            goto bad;
        out->prefix = (unsigned)p;
    }
    return 0;
bad:
    snprintf(err, errlen, "--allow %s: expected an IPv4 or IPv6 address with an optional /PREFIX "
             "(e.g. 192.168.1.0/24, 10.0.0.7, fd00::/8)", spec);
    return -1;
}

int nbd_server_add_client(struct nbd_server *s, int fd)
{
    struct sockaddr_storage ss;
    struct nbd_conn *c;
    char peer[64];
    int one = 1;

    if (s->stopping) {
        close(fd);
        return -EBUSY;
    }
    peer_name(fd, &ss, peer, sizeof(peer));
    if (!peer_allowed(s, &ss)) {
        if (refusal_log_ok(s))
            uq_error("nbd: refused a connection from %s: not in --allow", peer);
        close(fd);
        return -EACCES;
    }
    if (s->nconns >= s->max_conns) {
        /* Full: a connection that has not finished its handshake (idle,
         * slow or hostile) makes room; established sessions are kept. */
        struct nbd_conn *old = oldest_handshaking(s);
        if (!old) {
            if (refusal_log_ok(s))
                uq_error("nbd: refused a connection from %s: %u connections (--max-connections)",
                         peer, s->max_conns);
            close(fd);
            return -EBUSY;
        }
        if (refusal_log_ok(s))
            uq_error("nbd: %u connections (--max-connections): closing client %llu (%s), "
                     "still in its handshake, for a new one from %s", s->max_conns,
                     (unsigned long long)old->id, old->peer, peer);
        conn_cut(old);
    }
    c = calloc(1, sizeof(*c));
    if (c)
        c->rx = malloc(RX_HANDSHAKE);
    if (!c || !c->rx) {
        if (c)
            free(c);
        close(fd);
        return -ENOMEM;
    }
    /* Replies are written whole; do not hold them back (fails harmlessly
     * on unix sockets). */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    c->s = s;
    c->fd = fd;
    c->id = ++s->next_id;
    c->rx_cap = RX_HANDSHAKE;
    memcpy(c->peer, peer, sizeof(peer));
    c->handshaking = true;
    c->hs_deadline = now_ms() + s->hs_timeout_ms;
    ticker_start(s);
    c->next = s->conns;
    if (s->conns)
        s->conns->prev = c;
    s->conns = c;
    s->nconns++;
    co_spawn(conn_run, c);
    return 0;
}

/* ---- listener and lifecycle ------------------------------------------------ */

static bool accept_error_transient(int err)
{
    switch (-err) {
    case EINTR: case EAGAIN: case ECONNABORTED: case EPROTO: case EPERM:
    case ENETDOWN: case ENOPROTOOPT: case EHOSTDOWN: case ENONET:
    case EHOSTUNREACH: case EOPNOTSUPP: case ENETUNREACH:
        return true;
    default:
        return false;
    }
}

static void listener_run(void *arg)
{
    struct nbd_server *s = arg;
    int last_err = 0;

    while (!s->stopping) {
        /* Full of established sessions: leave new clients in the kernel's
         * backlog until one ends. */
        while (!s->stopping && s->nconns >= s->max_conns && !oldest_handshaking(s))
            co_queue_wait(&s->slot_free);
        if (s->stopping)
            break;
        int fd = io_accept(s->listen_fd);
        if (s->stopping) {
            if (fd >= 0)
                close(fd);
            break;
        }
        if (fd >= 0) {
            last_err = 0;
            /* The last handshake may have finished since we checked:
             * then this client waits (here rather than in the backlog)
             * for an established session to end. */
            while (!s->stopping && s->nconns >= s->max_conns && !oldest_handshaking(s))
                co_queue_wait(&s->slot_free);
            nbd_server_add_client(s, fd);
            continue;
        }
        if (accept_error_transient(fd))
            continue;
        /* Out of fds or memory, or worse: report once, retry slowly. */
        if (fd != last_err)
            uq_error("nbd: accept failed: %s", strerror(-fd));
        last_err = fd;
        co_sleep_ms(100);
    }
    s->listening = false;
    co_queue_wake_all(&s->idle_wait);
}

/* Unblock the listener's pending accept by connecting to ourselves. */
static void wake_listener(struct nbd_server *s)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof(ss);
    int fd;

    if (getsockname(s->listen_fd, (struct sockaddr *)&ss, &sl) < 0)
        goto fallback;
    if (ss.ss_family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        if (in->sin_addr.s_addr == htonl(INADDR_ANY))
            in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    } else if (ss.ss_family == AF_INET6) {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        if (IN6_IS_ADDR_UNSPECIFIED(&in6->sin6_addr))
            in6->sin6_addr = in6addr_loopback;
    }
    fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        goto fallback;
    if (connect(fd, (struct sockaddr *)&ss, sl) == 0 || errno == EINPROGRESS || errno == EAGAIN) {
        s->wake_fd = fd;
        return;
    }
    close(fd);
fallback:
    /* No way to reach our own address: shutting the socket down also
     * fails a pending accept. */
    shutdown(s->listen_fd, SHUT_RDWR);
}

struct nbd_server *nbd_server_new(struct image *img, const struct nbd_export_opts *opts)
{
    struct nbd_server *s = calloc(1, sizeof(*s));

    if (!s)
        return NULL;
    s->img = img;
    s->name = strdup(opts->name ? opts->name : "");
    s->description = opts->description ? strdup(opts->description) : NULL;
    if (!s->name || (opts->description && !s->description)) {
        nbd_server_free(s);
        return NULL;
    }
    s->read_only = opts->read_only || img->read_only;
    s->tls_mode = opts->tls ? opts->tls_mode : NBD_TLS_OFF;
    s->tls = opts->tls;
    s->max_conns = opts->max_connections ? opts->max_connections : NBD_MAX_CONNECTIONS;
    s->hs_timeout_ms = opts->handshake_timeout_ms ? opts->handshake_timeout_ms
                                                  : NBD_HANDSHAKE_TIMEOUT_MS;
    s->req_timeout_ms = opts->request_timeout_ms ? opts->request_timeout_ms
                                                 : NBD_REQUEST_TIMEOUT_MS;
    if (opts->nallow) {
        s->allow = calloc(opts->nallow, sizeof(*s->allow));
        if (!s->allow) {
            nbd_server_free(s);
            return NULL;
        }
        memcpy(s->allow, opts->allow, opts->nallow * sizeof(*s->allow));
        s->nallow = opts->nallow;
    }
    s->listen_fd = -1;
    s->wake_fd = -1;
    /* One loop serves every connection on one image, and FLUSH flushes
     * the whole image: multi-connection clients see consistent data. */
    s->tx_flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_CAN_MULTI_CONN;
    if (s->read_only)
        s->tx_flags |= NBD_FLAG_READ_ONLY;
    else
        s->tx_flags |= NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES;
    return s;
}

void nbd_server_free(struct nbd_server *s)
{
    if (!s)
        return;
    if (s->wake_fd >= 0)
        close(s->wake_fd);
    while (s->pool) {
        struct nbd_req *rq = s->pool;
        s->pool = rq->next;
        io_free(rq->buf);
        free(rq);
    }
    while (s->nspare)
        io_free(s->spare[--s->nspare].buf);
    slots_release(s);
    free(s->name);
    free(s->description);
    free(s->allow);
    free(s);
}

void nbd_server_listen(struct nbd_server *s, int listen_fd)
{
    s->listen_fd = listen_fd;
    s->listening = true;
    co_spawn(listener_run, s);
}

/* After shutdown began, give connections NBD_SHUTDOWN_GRACE_MS to finish
 * their replies, then cut the ones still blocked (a client that does not
 * read its replies would otherwise hold the server forever). */
static void grace_run(void *arg)
{
    struct nbd_server *s = arg;

    for (unsigned ms = 0; s->nconns && ms < NBD_SHUTDOWN_GRACE_MS; ms += 100)
        co_sleep_ms(100);
    if (s->nconns) {
        uq_error("nbd: %u connection(s) still busy after %u ms, closing them",
                 s->nconns, NBD_SHUTDOWN_GRACE_MS);
        for (struct nbd_conn *c = s->conns; c; c = c->next)
            shutdown(c->fd, SHUT_RDWR);
    }
    s->grace_running = false;
    co_queue_wake_all(&s->idle_wait);
}

void nbd_server_shutdown(struct nbd_server *s)
{
    if (s->stopping)
        return;
    s->stopping = true;
    co_queue_wake_all(&s->slot_free);
    if (s->listening)
        wake_listener(s);
    /* Receive loops see EOF; replies to what they already read still go out. */
    for (struct nbd_conn *c = s->conns; c; c = c->next)
        shutdown(c->fd, SHUT_RD);
    if (s->nconns) {
        s->grace_running = true;
        co_spawn(grace_run, s);
    }
}

void nbd_server_wait(struct nbd_server *s)
{
    while (s->listening || s->nconns || s->grace_running || s->ticker_running)
        co_queue_wait(&s->idle_wait);
    if (s->wake_fd >= 0) {
        close(s->wake_fd);
        s->wake_fd = -1;
    }
}

unsigned nbd_server_connections(const struct nbd_server *s)
{
    return s->nconns;
}
