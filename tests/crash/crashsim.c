/* crashsim: power-loss simulation and fault injection for the image engine.
 *
 *   crashsim record IMAGE LOG [--seed N] [--ops N] [--depth N]
 *                   [--discard unmap|ignore] [--discard-no-unref] [--data-file NAME]
 *       Open IMAGE (a scratch copy) with the engine, run a seeded random
 *       workload, and record every write/sync/punch the engine sends to the
 *       image file (LOG.fop, data in LOG.dat) and every request with its
 *       issue and acknowledgement time (LOG.req).  Times are positions in
 *       one global event sequence.  --data-file NAME: the image has an
 *       external data file NAME next to it, recorded too.
 *   crashsim crash LOG INITIAL OUTPREFIX [--seed N] [--count-states K] [--data-file NAME]
 *       Build K crash images OUTPREFIX.<i>.qcow2: INITIAL plus every write
 *       made durable by a sync completed before the crash point, plus a
 *       random subset (whole, dropped, torn per sector, or a prefix) of the
 *       other writes issued before it.  Prints "i t=T dirty=0|1 ..." each.
 *       With --data-file NAME (INITIAL's data file is NAME next to it), each
 *       crash state is a directory OUTPREFIX.<i>/ holding the image (named as
 *       INITIAL) and its data file NAME, each file durable by its own syncs.
 *   crashsim check LOG INITIAL_RAW BACKING_RAW|- LIST
 *       For each "IMAGE RAW T" line of LIST: verify RAW at T (as below),
 *       then reopen IMAGE with --compare RAW (as below).
 *   crashsim verify LOG RAW INITIAL_RAW BACKING_RAW|- T
 *       Check the guest view RAW (qemu-img convert of a crash image) against
 *       the request log: every sector acknowledged before a completed flush
 *       (or FUA) reads back exactly; every other sector holds one of the
 *       values some request could have left there.
 *   crashsim reopen IMAGE [--seed N] [--compare RAW]
 *       Open with the engine (repairing a dirty image), optionally compare
 *       its whole guest view with RAW, write, flush, read back, close.
 *   crashsim op IMAGE LOG OP [ARG] [--class meta|sync --errno EIO|ENOSPC --nth N]
 *       Open IMAGE with the engine and run one exclusive operation on it,
 *       recording its file operations like `record` (for `crash`):
 *       snapshot-create NAME, snapshot-delete SPEC, snapshot-apply SPEC,
 *       resize SIZE, shrink SIZE.  With --class, the nth operation of that
 *       class (from the open on) fails instead.  Prints "op=ok" or
 *       "op=failed: why", then "injected=N"; exits 0 either way (2: usage,
 *       open failure).
 *   crashsim faults IMAGE LOG --class data|meta|sync|hdrsync|read --errno EIO|ENOSPC|SHORT
 *                   [--nth N] [--count N] [--space-limit BYTES] [--at-open] [--seed N] [--ops N] [--depth N]
 *       Run the workload while failing image-file operations (from the open
 *       on with --at-open, else once the image is open), check the errors
 *       each request gets, then run a clean phase and close.  A failed open
 *       exits 2 with the engine's message.  The log
 *       lets `verify LOG ... end` check the data afterwards.
 *
 * Every guest sector written carries a tag (request id, sector number) and
 * pseudo-random content derived from both, so a sector read back names the
 * request that wrote it.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/coroutine.h"
#include "io/file.h"
#include "io/loop.h"
#include "img/image.h"

#define SECTOR 512u
#define TAG_MAGIC 0x4d49534843415243ull     /* "CRACHSIM" */
#define MAX_DEPTH 64

/* Sector values: zeros, the initial guest content, the backing file's
 * content, or request R's data (V_REQ + R). */
enum { V_ZERO = 0, V_INIT = 1, V_BACK = 2, V_REQ = 16 };

enum rq_kind { RQ_WRITE, RQ_ZERO, RQ_DISCARD, RQ_FLUSH, RQ_READ, RQ_CLOSE };
static const char *const rq_names[] = { "write", "zero", "discard", "flush", "read", "close" };

#define FOP_FUA 1u          /* fop_rec.flags: a write with RWF_DSYNC */
#define FOP_DATA 2u         /* ... to the external data file, not the image file */

struct fop_rec {
    uint32_t op;            /* enum file_op */
    uint32_t flags;         /* FOP_* */
    uint64_t off, len;
    uint64_t issue, done;   /* events; done 0 = never completed */
    int64_t result;
    uint64_t data;          /* offset in LOG.dat (writes) */
};

struct req_rec {
    uint32_t kind;
    uint32_t flags;         /* IMG_FUA, IMG_NO_HOLE */
    uint64_t off, len;
    uint64_t id;
    uint64_t issue, done;
    int64_t result;
    uint32_t phase;         /* faults: 0 = with faults, 1 = clean phase */
    uint32_t pad;
};

static uint64_t events;     /* the global event clock */

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "crashsim: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(2);
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static uint64_t rnd(uint64_t *s, uint64_t n)
{
    return n ? splitmix64(s) % n : 0;
}

static void fill_sector(uint8_t *p, uint64_t rid, uint64_t g)
{
    uint64_t w[SECTOR / 8];
    uint64_t s = (rid << 32) ^ g ^ 0x5eed5eed5eedull;
    w[0] = TAG_MAGIC;
    w[1] = rid;
    w[2] = g;
    for (unsigned i = 3; i < SECTOR / 8; i++)
        w[i] = splitmix64(&s);
    memcpy(p, w, SECTOR);
}

static bool all_zero(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i])
            return false;
    return true;
}

static uint64_t num(const char *s)
{
    char *end;
    errno = 0;
    uint64_t v = strtoull(s, &end, 0);
    if (errno || !*s || *end)
        die("invalid number '%s'", s);
    return v;
}

/* ---- growable arrays and log files ------------------------------------------- */

struct vec { void *p; size_t n, cap, elem; };

static void *vec_push(struct vec *v)
{
    if (v->n == v->cap) {
        v->cap = v->cap ? v->cap * 2 : 256;
        v->p = realloc(v->p, v->cap * v->elem);
        if (!v->p)
            die("out of memory");
    }
    void *e = (char *)v->p + v->n * v->elem;
    memset(e, 0, v->elem);
    v->n++;
    return e;
}

static void *load_file(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        die("cannot open '%s': %s", path, strerror(errno));
    struct stat st;
    fstat(fd, &st);
    size_t n = (size_t)st.st_size;
    uint8_t *p = malloc(n ? n : 1);
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, p + got, n - got, got);
        if (r <= 0)
            die("cannot read '%s'", path);
        got += (size_t)r;
    }
    close(fd);
    *len = n;
    return p;
}

static void save_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || (n && fwrite(p, 1, n, f) != n) || fclose(f) != 0)
        die("cannot write '%s'", path);
}

static char *path_cat(const char *a, const char *b)
{
    char *s = malloc(strlen(a) + strlen(b) + 1);
    strcpy(s, a);
    strcat(s, b);
    return s;
}

/* NAME in the directory of PATH, spelled as the engine resolves a data file
 * name against its image (so the hooks recognise the file by its path). */
static char *sibling(const char *path, const char *name)
{
    const char *slash = strrchr(path, '/');
    size_t dlen = slash ? (size_t)(slash - path) : 1;
    char *s = malloc(dlen + strlen(name) + 2);
    if (slash)
        memcpy(s, path, dlen);
    else
        s[0] = '.';
    s[dlen] = '/';
    strcpy(s + dlen + 1, name);
    return s;
}

/* ---- per-sector candidate sets ------------------------------------------------ */

#define CSET_MAX 7
struct cset { uint8_t n, any; uint32_t v[CSET_MAX]; };

static void cset_only(struct cset *c, uint32_t v) { c->n = 1; c->any = 0; c->v[0] = v; }

static void cset_add(struct cset *c, uint32_t v)
{
    for (unsigned i = 0; i < c->n; i++)
        if (c->v[i] == v)
            return;
    if (c->n == CSET_MAX)
        c->any = 1;     /* too many possibilities: no check */
    else
        c->v[c->n++] = v;
}

struct views {
    const uint8_t *init, *back;
    uint64_t init_len, back_len;
};

static bool sector_is(uint32_t v, const uint8_t *got, uint64_t g, const struct views *w)
{
    uint8_t exp[SECTOR];
    const uint8_t *ref;
    switch (v) {
    case V_ZERO:
        return all_zero(got, SECTOR);
    case V_INIT:
    case V_BACK:
        ref = v == V_INIT ? w->init : w->back;
        if (!ref || (g + 1) * SECTOR > (v == V_INIT ? w->init_len : w->back_len))
            return all_zero(got, SECTOR);   /* no backing / past its end: zeros */
        return memcmp(got, ref + g * SECTOR, SECTOR) == 0;
    default:
        fill_sector(exp, v - V_REQ, g);
        return memcmp(got, exp, SECTOR) == 0;
    }
}

static void describe(const uint8_t *got, char *out, size_t n)
{
    uint64_t w[3];
    memcpy(w, got, sizeof(w));
    if (all_zero(got, SECTOR))
        snprintf(out, n, "zeros");
    else if (w[0] == TAG_MAGIC)
        snprintf(out, n, "request %" PRIu64 "'s data for sector %" PRIu64, w[1], w[2]);
    else
        snprintf(out, n, "untagged data %02x%02x%02x%02x...", got[0], got[1], got[2], got[3]);
}

static void cset_str(const struct cset *c, char *out, size_t n)
{
    size_t k = 0;
    out[0] = 0;
    for (unsigned i = 0; i < c->n && k < n; i++) {
        uint32_t v = c->v[i];
        k += snprintf(out + k, n - k, "%s%s", i ? "|" : "",
                      v == V_ZERO ? "zeros" : v == V_INIT ? "initial" : v == V_BACK ? "backing" : "");
        if (v >= V_REQ && k < n)
            k += snprintf(out + k, n - k, "req%u", v - V_REQ);
    }
}

/* ---- recording and fault hooks ------------------------------------------------- */

/* hdrsync: the first sync after a header write (refcount-table growth, repair). */
enum fclass { FC_NONE, FC_DATA, FC_META, FC_SYNC, FC_READ, FC_HDRSYNC };

struct inflight { struct co *co; size_t idx; };

struct hookctx {
    const char *target;     /* only this image file is recorded / faulted */
    char *target_data;      /* and its external data file (NULL if none) */
    bool record;
    struct vec fops;        /* struct fop_rec */
    FILE *dat;
    uint64_t dat_off;
    struct inflight fl[MAX_DEPTH * 4];
    /* faults */
    enum fclass fclass;
    int ferr;               /* -errno, or 1 for short reads */
    uint64_t nth, count;    /* fail ops nth .. nth+count-1 of the class (count 0 = all) */
    uint64_t seen[6];
    bool last_write_header;
    uint64_t space_limit;   /* writes ending past this fail with ENOSPC (0 = off) */
    bool armed;
    uint64_t injected;
    uint64_t first_sync_fail;   /* event of the first failed sync (0 = none) */
};

/* 1: the image file, 2: its data file, 0: neither. */
static int is_target(struct hookctx *h, struct file *f)
{
    if (!f->path)
        return 0;
    if (!strcmp(f->path, h->target))
        return 1;
    return h->target_data && !strcmp(f->path, h->target_data) ? 2 : 0;
}

/* Guest data carries tags; metadata (tables, refcounts, header) never does. */
static enum fclass classify(enum file_op op, const struct iovec *iov, int iovcnt)
{
    if (op == FILE_OP_READ)
        return FC_READ;
    if (op == FILE_OP_SYNC)
        return FC_SYNC;
    if (op != FILE_OP_WRITE)
        return FC_META;
    uint64_t pos = 0;
    for (int i = 0; i < iovcnt; i++) {
        const uint8_t *b = iov[i].iov_base;
        for (uint64_t k = (SECTOR - pos % SECTOR) % SECTOR; k + 8 <= iov[i].iov_len; k += SECTOR) {
            uint64_t m;
            memcpy(&m, b + k, 8);
            if (m == TAG_MAGIC)
                return FC_DATA;
        }
        pos += iov[i].iov_len;
    }
    return FC_META;
}

static int hook_before(void *ctx, struct file *f, enum file_op op, uint64_t off, uint64_t len,
                       const struct iovec *iov, int iovcnt, unsigned flags)
{
    struct hookctx *h = ctx;
    int which = is_target(h, f);
    if (!which)
        return 0;
    int verdict = 0;
    if (h->armed) {
        if (h->space_limit && (op == FILE_OP_WRITE || op == FILE_OP_ZERO_RANGE) &&
            off + len > h->space_limit) {
            verdict = -ENOSPC;
        } else if (h->fclass != FC_NONE) {
            enum fclass c = classify(op, iov, iovcnt);
            if (c == FC_SYNC && h->last_write_header)
                c = h->fclass == FC_HDRSYNC ? FC_HDRSYNC : c;
            if (c == h->fclass) {
                uint64_t k = ++h->seen[c];
                if (k >= h->nth && (h->count == 0 || k < h->nth + h->count))
                    verdict = h->ferr < 0 ? h->ferr : (int)(len / 2 > 0 ? len / 2 : 1);
            }
        }
        if (verdict)
            h->injected++;
        /* A header write, then the next sync (whoever issues it). */
        if (op == FILE_OP_WRITE && off == 0)
            h->last_write_header = true;
        if (op == FILE_OP_SYNC)
            h->last_write_header = false;
        if (verdict < 0 && op == FILE_OP_SYNC && !h->first_sync_fail)
            h->first_sync_fail = events + 1;
    }
    if (!h->record || op == FILE_OP_READ)
        return verdict;
    struct fop_rec *r = vec_push(&h->fops);
    r->op = op;
    r->flags = ((flags & FILE_HOOK_FUA) ? FOP_FUA : 0) | (which == 2 ? FOP_DATA : 0);
    r->off = off;
    r->len = len;
    r->issue = ++events;
    r->data = UINT64_MAX;
    if (op == FILE_OP_WRITE) {
        r->data = h->dat_off;
        for (int i = 0; i < iovcnt; i++)
            if (fwrite(iov[i].iov_base, 1, iov[i].iov_len, h->dat) != iov[i].iov_len)
                die("cannot write the data log");
        h->dat_off += len;
    }
    struct co *me = co_self();
    for (unsigned i = 0; i < sizeof(h->fl) / sizeof(h->fl[0]); i++) {
        if (!h->fl[i].co && h->fl[i].idx == 0) {
            h->fl[i].co = me;
            h->fl[i].idx = h->fops.n;     /* index + 1 */
            return verdict;
        }
    }
    die("too many file operations in flight");
}

static void hook_after(void *ctx, struct file *f, enum file_op op, uint64_t off, uint64_t len,
                       int64_t result, unsigned flags)
{
    struct hookctx *h = ctx;
    if (!is_target(h, f) || !h->record || op == FILE_OP_READ)
        return;
    struct co *me = co_self();
    for (unsigned i = 0; i < sizeof(h->fl) / sizeof(h->fl[0]); i++) {
        if (h->fl[i].idx && h->fl[i].co == me) {
            struct fop_rec *r = (struct fop_rec *)h->fops.p + (h->fl[i].idx - 1);
            r->done = ++events;
            r->result = result;
            h->fl[i].co = NULL;
            h->fl[i].idx = 0;
            return;
        }
    }
    die("completion of an unknown file operation");
}

static struct hookctx hk;
static const struct file_hooks hooks = { .before = hook_before, .after = hook_after, .ctx = &hk };

/* ---- the workload --------------------------------------------------------------- */

struct run {
    const char *path;
    struct loop *loop;
    struct image *img;
    uint64_t size, nsect;
    uint32_t cs;                /* cluster size (offset choice only) */
    uint64_t rng;
    uint64_t ops_left;
    unsigned depth, live;
    struct co_queue done_q;
    struct { uint64_t off, len; bool busy; } lock[MAX_DEPTH + 1];
    struct vec reqs;            /* struct req_rec */
    uint64_t next_id;
    struct cset *cur;           /* what each sector must read as now */
    struct views views;
    uint32_t phase;
    bool check_reads, fault_mode;
    unsigned long read_mismatch, bad_errno, unexpected_fail;
    char first_problem[400];
    int open_err;
    char err[512];
};

static void problem(struct run *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void problem(struct run *r, const char *fmt, ...)
{
    va_list ap;
    char msg[400];
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    fprintf(stderr, "crashsim: %s\n", msg);
    if (!r->first_problem[0])
        snprintf(r->first_problem, sizeof(r->first_problem), "%s", msg);
}

static bool overlaps_locked(struct run *r, uint64_t off, uint64_t len)
{
    for (unsigned i = 0; i <= MAX_DEPTH; i++)
        if (r->lock[i].busy && off < r->lock[i].off + r->lock[i].len && r->lock[i].off < off + len)
            return true;
    return false;
}

/* A range near a cluster boundary half the time; sizes from one sector to
 * a few clusters; whole clusters a third of the time. */
static void pick_range(struct run *r, uint64_t *off, uint64_t *len)
{
    uint64_t cs = r->cs, s = r->size;
    uint64_t o, n, x = rnd(&r->rng, 3);
    if (x == 0) {
        o = rnd(&r->rng, s / cs) * cs;
        n = (1 + rnd(&r->rng, 3)) * cs;
    } else {
        if (rnd(&r->rng, 2))
            o = rnd(&r->rng, s / cs) * cs + (rnd(&r->rng, 16) - 8) * SECTOR;
        else
            o = rnd(&r->rng, s / SECTOR) * SECTOR;
        uint64_t big = 2 * cs > 65536 ? 2 * cs : 65536;
        n = x == 1 ? (1 + rnd(&r->rng, 16)) * SECTOR : (1 + rnd(&r->rng, big / SECTOR + 8)) * SECTOR;
    }
    if (o >= s)
        o = s - SECTOR;
    if (n > 1024 * 1024)
        n = 1024 * 1024;
    if (o + n > s)
        n = s - o;
    *off = o;
    *len = n;
}

static struct req_rec *req_begin(struct run *r, enum rq_kind k, uint64_t off, uint64_t len,
                                 unsigned flags, size_t *idx)
{
    struct req_rec *q = vec_push(&r->reqs);
    q->kind = k;
    q->flags = flags;
    q->off = off;
    q->len = len;
    q->id = r->next_id++;
    q->issue = ++events;
    q->phase = r->phase;
    *idx = r->reqs.n - 1;
    return q;
}

/* The request log may move (realloc) while a request waits: re-fetch by index. */
static struct req_rec *req_at(struct run *r, size_t idx) { return (struct req_rec *)r->reqs.p + idx; }

static void check_errno(struct run *r, struct req_rec *q)
{
    if (q->result >= 0)
        return;
    int e = (int)-q->result;
    if (!r->fault_mode) {
        r->unexpected_fail++;
        problem(r, "%s %" PRIu64 "+%" PRIu64 " failed: %s", rq_names[q->kind], q->off, q->len,
                strerror(e));
        return;
    }
    int want = hk.space_limit ? ENOSPC : hk.ferr < 0 ? -hk.ferr : EIO;
    /* A flush after a failed sync must fail, with EIO. */
    bool ok = e == want || (hk.first_sync_fail && e == EIO);
    if (!ok) {
        r->bad_errno++;
        problem(r, "%s %" PRIu64 "+%" PRIu64 " failed with %s, expected %s", rq_names[q->kind],
                q->off, q->len, strerror(e), strerror(want));
    }
    if (q->phase == 1) {
        /* Clean phase: everything must work again, except what depends on
         * a sync after a failed one (flushes; writes that must evict). */
        bool allowed = hk.first_sync_fail && q->kind != RQ_READ;
        if (hk.space_limit && (q->kind == RQ_WRITE || q->kind == RQ_ZERO))
            allowed = allowed || e == ENOSPC;   /* still no space for new clusters */
        if (!allowed) {
            r->unexpected_fail++;
            problem(r, "clean phase: %s %" PRIu64 "+%" PRIu64 " failed: %s", rq_names[q->kind],
                    q->off, q->len, strerror(e));
        }
    }
}

static void do_one(struct run *r, unsigned slot)
{
    unsigned x = (unsigned)rnd(&r->rng, 100);
    enum rq_kind k = x < 55 ? RQ_WRITE : x < 70 ? RQ_READ : x < 79 ? RQ_ZERO : x < 90 ? RQ_DISCARD : RQ_FLUSH;
    size_t idx;
    if (k == RQ_FLUSH) {
        req_begin(r, k, 0, 0, 0, &idx);
        int ret = img_flush(r->img);
        struct req_rec *q = req_at(r, idx);
        q->done = ++events;
        q->result = ret;
        check_errno(r, q);
        if (ret == 0 && hk.first_sync_fail && q->issue > hk.first_sync_fail) {
            r->unexpected_fail++;
            problem(r, "flush reported success after a failed sync (fsyncgate)");
        }
        return;
    }
    uint64_t off = 0, len = 0;
    int tries = 0;
    do
        pick_range(r, &off, &len);
    while (overlaps_locked(r, off, len) && ++tries < 50);
    if (tries == 50)
        return;
    r->lock[slot].off = off;
    r->lock[slot].len = len;
    r->lock[slot].busy = true;
    unsigned flags = 0;
    if (k == RQ_WRITE && rnd(&r->rng, 8) == 0)
        flags |= IMG_FUA;
    if (k == RQ_ZERO && rnd(&r->rng, 3) == 0)
        flags |= IMG_NO_HOLE;
    if (k == RQ_ZERO && rnd(&r->rng, 6) == 0)
        flags |= IMG_FUA;
    struct req_rec *q = req_begin(r, k, off, len, flags, &idx);
    uint64_t id = q->id, g0 = off / SECTOR, ns = len / SECTOR;
    uint8_t *buf = io_alloc(len);
    int ret = 0;
    switch (k) {
    case RQ_WRITE:
        for (uint64_t i = 0; i < ns; i++)
            fill_sector(buf + i * SECTOR, id, g0 + i);
        ret = img_write(r->img, buf, off, len, flags);
        break;
    case RQ_ZERO:
        ret = img_write_zeroes(r->img, off, len, flags);
        break;
    case RQ_DISCARD:
        ret = img_discard(r->img, off, len);
        break;
    default:
        ret = img_read(r->img, buf, off, len);
        break;
    }
    q = req_at(r, idx);
    q->done = ++events;
    q->result = ret;
    check_errno(r, q);
    for (uint64_t i = 0; i < ns; i++) {
        struct cset *c = &r->cur[g0 + i];
        switch (k) {
        case RQ_WRITE:
            if (ret == 0)
                cset_only(c, V_REQ + (uint32_t)id);
            else
                cset_add(c, V_REQ + (uint32_t)id);
            break;
        case RQ_ZERO:
            if (ret == 0)
                cset_only(c, V_ZERO);
            else
                cset_add(c, V_ZERO);
            break;
        case RQ_DISCARD:
            cset_add(c, V_ZERO);
            cset_add(c, V_BACK);
            break;
        default:
            if (ret == 0 && r->check_reads && !c->any) {
                bool match = false;
                for (unsigned j = 0; j < c->n && !match; j++)
                    match = sector_is(c->v[j], buf + i * SECTOR, g0 + i, &r->views);
                if (!match) {
                    char a[80], b[120];
                    describe(buf + i * SECTOR, a, sizeof(a));
                    cset_str(c, b, sizeof(b));
                    if (r->read_mismatch++ == 0)
                        problem(r, "read of sector %" PRIu64 " returned %s, expected %s",
                                g0 + i, a, b);
                }
            }
            break;
        }
    }
    io_free(buf);
    r->lock[slot].busy = false;
}

struct worker { struct run *r; unsigned slot; };

static void worker_main(void *arg)
{
    struct worker *w = arg;
    struct run *r = w->r;
    while (r->ops_left > 0) {
        r->ops_left--;
        do_one(r, w->slot);
    }
    if (--r->live == 0)
        co_queue_wake_all(&r->done_q);
}

static void run_phase(struct run *r, uint64_t ops)
{
    struct worker w[MAX_DEPTH];
    r->ops_left = ops;
    r->live = r->depth;
    for (unsigned i = 0; i < r->depth; i++) {
        w[i] = (struct worker){ r, i };
        co_spawn(worker_main, &w[i]);
    }
    while (r->live)
        co_queue_wait(&r->done_q);
}

static uint64_t opt_ops = 200, opt_ops2 = 60, opt_seed = 1;
static const char *opt_data_name;   /* --data-file: the image's external data file */
static unsigned opt_depth = 6, opt_count = 1;
static bool opt_at_open;
/* The engine's discard options (--discard, --discard-no-unref): unmap by
 * default, so discards and write-zeroes free and punch clusters. */
static enum img_discard opt_discard = IMG_DISCARD_UNMAP;
static bool opt_no_unref;

static void main_co(void *arg)
{
    struct run *r = arg;
    struct img_opts o = { .format = IMG_FMT_QCOW2, .discard = opt_discard, .discard_no_unref = opt_no_unref };
    r->img = img_open(r->path, &o, r->err, sizeof(r->err));
    if (!r->img) {
        r->open_err = 1;
        loop_stop(r->loop);
        return;
    }
    if (r->fault_mode)
        hk.armed = true;    /* faults start once the image is open (unless --at-open) */
    r->size = img_size(r->img);
    r->nsect = r->size / SECTOR;
    r->phase = 0;
    run_phase(r, opt_ops);
    if (r->fault_mode) {
        hk.armed = hk.space_limit != 0;     /* still no space; other faults stop */
        r->phase = 1;
        run_phase(r, opt_ops2);
    }
    size_t idx;
    req_begin(r, RQ_CLOSE, 0, 0, 0, &idx);
    int ret = img_close(r->img);
    struct req_rec *q = req_at(r, idx);
    q->done = ++events;
    q->result = ret;
    r->img = NULL;
    if (ret < 0 && !hk.first_sync_fail) {
        r->unexpected_fail++;
        problem(r, "close failed: %s", strerror(-ret));
    }
    if (ret == 0 && hk.first_sync_fail) {
        r->unexpected_fail++;
        problem(r, "close reported success after a failed sync (fsyncgate)");
    }
    loop_stop(r->loop);
}

static uint32_t read_cluster_size(const char *path)
{
    uint8_t h[24];
    int fd = open(path, O_RDONLY);
    if (fd < 0 || pread(fd, h, 24, 0) != 24)
        die("cannot read the header of '%s'", path);
    close(fd);
    uint32_t bits = (uint32_t)h[20] << 24 | (uint32_t)h[21] << 16 | (uint32_t)h[22] << 8 | h[23];
    if (bits < 9 || bits > 21)
        die("'%s' is not a qcow2 image", path);
    return 1u << bits;
}

static void write_logs(const char *log, struct run *r)
{
    char *p = path_cat(log, ".req");
    save_file(p, r->reqs.p, r->reqs.n * sizeof(struct req_rec));
    free(p);
    p = path_cat(log, ".fop");
    save_file(p, hk.fops.p, hk.fops.n * sizeof(struct fop_rec));
    free(p);
    p = path_cat(log, ".size");
    char s[32];
    snprintf(s, sizeof(s), "%" PRIu64 "\n", r->size);
    save_file(p, s, strlen(s));
    free(p);
}

/* Record every write and sync of image from now on, the data in LOG.dat. */
static void record_start(const char *image, const char *log)
{
    hk.target = image;
    hk.target_data = opt_data_name ? sibling(image, opt_data_name) : NULL;
    hk.record = true;
    hk.fops.elem = sizeof(struct fop_rec);
    char *dp = path_cat(log, ".dat");
    hk.dat = fopen(dp, "wb");
    if (!hk.dat)
        die("cannot create '%s'", dp);
    free(dp);
}

static int run_workload(const char *image, const char *log, bool faults)
{
    static struct run r;
    r.path = image;
    r.cs = read_cluster_size(image);
    r.rng = opt_seed * 0x9e3779b97f4a7c15ull + 1;
    r.depth = opt_depth;
    r.reqs.elem = sizeof(struct req_rec);
    r.next_id = 1;
    r.fault_mode = faults;
    r.check_reads = !(faults && hk.ferr == 1);  /* short reads may return zeros */
    r.done_q = (struct co_queue)CO_QUEUE_INIT;

    /* In-memory model for read checks: "initial" everywhere at first. */
    struct stat st;
    if (stat(image, &st) < 0)
        die("cannot stat '%s'", image);
    record_start(image, log);
    char *ir = path_cat(log, ".initraw");
    size_t ilen = 0;
    uint8_t *init = access(ir, R_OK) == 0 ? load_file(ir, &ilen) : NULL;
    free(ir);
    char *br = path_cat(log, ".backraw");
    size_t blen = 0;
    uint8_t *back = access(br, R_OK) == 0 ? load_file(br, &blen) : NULL;
    free(br);
    r.views = (struct views){ init, back, ilen, blen };
    if (!init)
        r.check_reads = false;

    file_set_hooks(&hooks);
    hk.armed = faults && opt_at_open;
    r.loop = loop_new(256);
    if (!r.loop)
        die("cannot create the event loop");
    /* The model needs the size before the first request; the open is
     * recorded too (repair of a dirty image), so size the model from the
     * initial raw view, else from the header. */
    uint64_t vsize = 0;
    {
        uint8_t h[32];
        int fd = open(image, O_RDONLY);
        if (fd >= 0 && pread(fd, h, 32, 0) == 32)
            for (int i = 24; i < 32; i++)
                vsize = vsize << 8 | h[i];
        if (fd >= 0)
            close(fd);
    }
    r.cur = calloc(vsize / SECTOR + 1, sizeof(*r.cur));
    for (uint64_t i = 0; i < vsize / SECTOR + 1; i++)
        cset_only(&r.cur[i], V_INIT);
    co_spawn(main_co, &r);
    int lrc = loop_run(r.loop);
    loop_free(r.loop);
    file_set_hooks(NULL);
    fclose(hk.dat);
    if (r.open_err) {
        fprintf(stderr, "crashsim: %s\n", r.err);
        return 2;
    }
    if (lrc < 0)
        die("event loop failed: %s", strerror(-lrc));
    write_logs(log, &r);

    unsigned long nw = 0, nf = 0, nerr = 0;
    for (size_t i = 0; i < r.reqs.n; i++) {
        struct req_rec *q = req_at(&r, i);
        nw += q->kind == RQ_WRITE || q->kind == RQ_ZERO || q->kind == RQ_DISCARD;
        nf += q->kind == RQ_FLUSH;
        nerr += q->result < 0;
    }
    unsigned long nsync = 0, nwr = 0;
    for (size_t i = 0; i < hk.fops.n; i++) {
        struct fop_rec *f = (struct fop_rec *)hk.fops.p + i;
        nsync += f->op == FILE_OP_SYNC;
        nwr += f->op != FILE_OP_SYNC;
    }
    printf("requests=%zu modifying=%lu flushes=%lu failed=%lu file_writes=%lu syncs=%lu "
           "injected=%" PRIu64 " class_ops=%" PRIu64 " read_mismatches=%lu bad_errno=%lu "
           "unexpected=%lu\n",
           r.reqs.n, nw, nf, nerr, nwr, nsync, hk.injected, hk.seen[hk.fclass], r.read_mismatch,
           r.bad_errno, r.unexpected_fail);
    int rc = 0;
    if (r.read_mismatch || r.bad_errno || r.unexpected_fail) {
        printf("problem: %s\n", r.first_problem);
        rc = 1;
    }
    if (faults && hk.injected && !nerr) {
        /* Short reads are silent by design (the file layer reports them
         * like an end of file). */
        if (hk.ferr != 1) {
            printf("problem: %" PRIu64 " faults injected but no request reported an error\n",
                   hk.injected);
            rc = 1;
        }
    }
    free(r.reqs.p);
    free(hk.fops.p);
    free(hk.target_data);
    hk.target_data = NULL;
    free(r.cur);
    free(init);
    free(back);
    return rc;
}

/* ---- one exclusive operation (snapshots, resize) --------------------------------------- */

struct oprun {
    const char *path, *op, *arg;
    struct loop *loop;
    int rc;             /* 0 ran (ok or failed), 2 open failed */
    int result;
    char err[700];
};

static void op_co(void *arg)
{
    struct oprun *o = arg;
    struct img_opts io = { .format = IMG_FMT_AUTO, .discard = opt_discard };
    char err[512];
    struct image *img = img_open(o->path, &io, err, sizeof(err));
    if (!img) {
        snprintf(o->err, sizeof(o->err), "open failed: %s", err);
        o->rc = 2;
        loop_stop(o->loop);
        return;
    }
    hk.armed = hk.fclass != FC_NONE;
    char id[64];
    const char *a = o->arg ? o->arg : "";
    if (!strcmp(o->op, "snapshot-create"))
        o->result = img_snapshot_create(img, a, id, sizeof(id), o->err, sizeof(o->err));
    else if (!strcmp(o->op, "snapshot-delete"))
        o->result = img_snapshot_delete(img, a, NULL, NULL, o->err, sizeof(o->err));
    else if (!strcmp(o->op, "snapshot-apply"))
        o->result = img_snapshot_apply(img, a, o->err, sizeof(o->err));
    else if (!strcmp(o->op, "resize") || !strcmp(o->op, "shrink"))
        o->result = img_resize(img, num(a), !strcmp(o->op, "shrink"), o->err, sizeof(o->err));
    else
        die("unknown operation '%s'", o->op);
    int r = img_close(img);
    if (o->result == 0 && r < 0) {
        o->result = r;
        snprintf(o->err, sizeof(o->err), "close failed: %s", strerror(-r));
    }
    loop_stop(o->loop);
}

static int cmd_op(const char *image, const char *log, const char *op, const char *arg)
{
    static struct oprun o;
    o = (struct oprun){ .path = image, .op = op, .arg = arg };
    record_start(image, log);
    file_set_hooks(&hooks);
    o.loop = loop_new(64);
    if (!o.loop)
        die("cannot create the event loop");
    co_spawn(op_co, &o);
    loop_run(o.loop);
    loop_free(o.loop);
    file_set_hooks(NULL);
    fclose(hk.dat);
    if (o.rc) {
        fprintf(stderr, "crashsim: %s\n", o.err);
        return o.rc;
    }
    struct run r = { .size = 0 };
    r.reqs.elem = sizeof(struct req_rec);
    write_logs(log, &r);
    if (o.result == 0)
        printf("op=ok\n");
    else
        printf("op=failed: %s\n", o.err);
    printf("injected=%" PRIu64 " file_ops=%zu\n", hk.injected, hk.fops.n);
    free(hk.fops.p);
    return 0;
}

/* ---- crash images ------------------------------------------------------------------ */

static struct fop_rec *load_fops(const char *log, size_t *n)
{
    char *p = path_cat(log, ".fop");
    size_t len;
    struct fop_rec *f = load_file(p, &len);
    free(p);
    *n = len / sizeof(*f);
    return f;
}

static struct req_rec *load_reqs(const char *log, size_t *n)
{
    char *p = path_cat(log, ".req");
    size_t len;
    struct req_rec *q = load_file(p, &len);
    free(p);
    *n = len / sizeof(*q);
    return q;
}

struct crashlog {
    struct fop_rec *f;
    size_t nf, nsync;
    uint64_t last;
    int dfd;
    uint8_t *initial[2];    /* the image file; its data file (with --data-file) */
    size_t ilen[2];
    const char *image_name; /* INITIAL's file name (data-file states are directories) */
};

/* One crash image for seed `seed`, written to out; prints its summary. */
static void make_crash(struct crashlog *L, uint64_t seed, const char *out, unsigned idx)
{
    struct fop_rec *f = L->f;
    size_t nf = L->nf;
    uint64_t rng = seed * 0x2545f4914f6cdd1dull + 7;
    /* The crash point: right before or after a sync completes (the edges
     * that matter most), right after some write was issued, or anywhere. */
    uint64_t t, x = rnd(&rng, 10);
    if (x < 4 && L->nsync) {
        size_t k = rnd(&rng, L->nsync), i = 0;
        for (;; i++)
            if (f[i].op == FILE_OP_SYNC && k-- == 0)
                break;
        t = (f[i].done ? f[i].done : f[i].issue + 1) + rnd(&rng, 2);
    } else if (x < 7 && nf) {
        t = f[rnd(&rng, nf)].issue + 1;
    } else if (x < 8 && nf) {
        /* Early: the open itself (repair of a dirty image) and the first
         * allocations. */
        t = 1 + rnd(&rng, f[nf < 10 ? nf - 1 : 9].issue + 1);
    } else {
        t = 1 + rnd(&rng, L->last + 1);
    }
    /* Writes completed before the issue of a sync (of the same file)
     * completed before t are on disk; so are completed FUA writes. */
    uint64_t durable_before[2] = { 0, 0 };
    for (size_t i = 0; i < nf; i++) {
        int k = f[i].flags & FOP_DATA ? 1 : 0;
        if (f[i].op == FILE_OP_SYNC && f[i].done && f[i].done < t && f[i].result == 0 &&
            f[i].issue > durable_before[k])
            durable_before[k] = f[i].issue;
    }

    uint64_t sizes[2], caps[2];
    uint8_t *imgs[2] = { NULL, NULL };
    for (int k = 0; k < 2; k++) {
        sizes[k] = L->ilen[k];
        caps[k] = L->ilen[k] + (8u << 20);
        imgs[k] = malloc(caps[k]);
        if (L->ilen[k])
            memcpy(imgs[k], L->initial[k], L->ilen[k]);
    }
    unsigned long n_durable = 0, n_whole = 0, n_dropped = 0, n_torn = 0, n_prefix = 0;
    uint8_t *data = NULL;
    size_t data_cap = 0;
    for (size_t i = 0; i < nf; i++) {
        struct fop_rec *w = &f[i];
        if (w->op == FILE_OP_SYNC || w->op == FILE_OP_READ || w->issue >= t)
            continue;
        bool completed = w->done && w->done < t;
        if (completed && w->result < 0)
            continue;   /* failed: never reached the disk */
        bool durable = completed && (w->done < durable_before[w->flags & FOP_DATA ? 1 : 0] ||
                                     (w->flags & FOP_FUA));
        uint64_t ns = (w->len + SECTOR - 1) / SECTOR;
        /* Which sectors reach the disk: a disk may drop, reorder and tear
         * writes that no completed sync covers. */
        int mode = durable ? 1 : (int)rnd(&rng, 4);    /* 0 drop, 1 whole, 2 torn, 3 prefix */
        uint64_t prefix = mode == 3 ? rnd(&rng, ns + 1) : ns;
        if (durable)
            n_durable++;
        else if (mode == 0)
            n_dropped++;
        else if (mode == 1)
            n_whole++;
        else if (mode == 2)
            n_torn++;
        else
            n_prefix++;
        if (mode == 0)
            continue;
        if (w->op == FILE_OP_WRITE) {
            if (data_cap < w->len) {
                data_cap = w->len;
                data = realloc(data, data_cap);
            }
            if (pread(L->dfd, data, w->len, (off_t)w->data) != (ssize_t)w->len)
                die("short data log");
        }
        int k = w->flags & FOP_DATA ? 1 : 0;
        uint64_t end = w->off + w->len, size = sizes[k];
        uint8_t *img = imgs[k];
        if (end > caps[k]) {
            caps[k] = end + (8u << 20);
            img = imgs[k] = realloc(img, caps[k]);
        }
        if (end > size && w->op != FILE_OP_PUNCH) {
            memset(img + size, 0, end - size);
            size = sizes[k] = end;
        }
        for (uint64_t s = 0; s < ns; s++) {
            if (mode == 2 && rnd(&rng, 2))
                continue;
            if (mode == 3 && s >= prefix)
                break;
            uint64_t a = w->off + s * SECTOR, b = a + SECTOR < end ? a + SECTOR : end;
            if (a >= size)
                break;
            if (b > size)
                b = size;
            if (w->op == FILE_OP_WRITE)
                memcpy(img + a, data + (a - w->off), b - a);
            else
                memset(img + a, 0, b - a);
        }
    }
    uint8_t *img = imgs[0];
    uint64_t size = sizes[0];
    if (opt_data_name) {
        /* A directory per state: the image and its data file side by side. */
        if (mkdir(out, 0755) < 0 && errno != EEXIST)
            die("cannot create '%s': %s", out, strerror(errno));
        char *dir = path_cat(out, "/");
        char *ip = path_cat(dir, L->image_name), *dp = path_cat(dir, opt_data_name);
        save_file(ip, img, size);
        save_file(dp, imgs[1], sizes[1]);
        free(dir);
        free(ip);
        free(dp);
    } else {
        save_file(out, img, size);
    }
    printf("%u t=%" PRIu64 " dirty=%d durable=%lu whole=%lu dropped=%lu torn=%lu prefix=%lu\n", idx, t,
           size >= 80 && img[7] >= 3 && (img[79] & 1), n_durable, n_whole, n_dropped, n_torn, n_prefix);
    free(imgs[0]);
    free(imgs[1]);
    free(data);
}

static int cmd_crash(const char *log, const char *initial, const char *outprefix, unsigned count)
{
    struct crashlog L = { 0 };
    L.f = load_fops(log, &L.nf);
    char *dp = path_cat(log, ".dat");
    L.dfd = open(dp, O_RDONLY);
    if (L.dfd < 0)
        die("cannot open '%s'", dp);
    free(dp);
    for (size_t i = 0; i < L.nf; i++) {
        if (L.f[i].done > L.last)
            L.last = L.f[i].done;
        if (L.f[i].issue > L.last)
            L.last = L.f[i].issue;
        L.nsync += L.f[i].op == FILE_OP_SYNC;
    }
    L.initial[0] = load_file(initial, &L.ilen[0]);
    const char *slash = strrchr(initial, '/');
    L.image_name = slash ? slash + 1 : initial;
    if (opt_data_name) {
        char *dp = sibling(initial, opt_data_name);
        L.initial[1] = load_file(dp, &L.ilen[1]);
        free(dp);
    }
    for (unsigned i = 0; i < count; i++) {
        char out[4096];
        if (opt_data_name)
            snprintf(out, sizeof(out), "%s.%u", outprefix, i);
        else
            snprintf(out, sizeof(out), "%s.%u.qcow2", outprefix, i);
        make_crash(&L, opt_seed * 100003 + i, out, i);
    }
    free(L.initial[0]);
    free(L.initial[1]);
    free(L.f);
    close(L.dfd);
    return 0;
}

/* ---- verdict on the guest view --------------------------------------------------------- */

/* Check guest view got[] against the request log at crash point t.
 * Returns the number of wrong sectors (the first few are printed). */
static unsigned long verify_view(const struct req_rec *q, size_t nq, uint64_t t, const uint8_t *got,
                                 size_t rlen, const struct views *w, const char *label)
{
    uint64_t nsect = rlen / SECTOR;
    /* Acknowledged before the start of a flush that completed before t. */
    uint64_t flushed_before = 0;
    for (size_t i = 0; i < nq; i++)
        if ((q[i].kind == RQ_FLUSH || q[i].kind == RQ_CLOSE) && q[i].done && q[i].done < t &&
            q[i].result == 0 && q[i].issue > flushed_before)
            flushed_before = q[i].issue;

    struct cset *c = calloc(nsect, sizeof(*c));
    for (uint64_t g = 0; g < nsect; g++)
        cset_only(&c[g], V_INIT);
    unsigned long guaranteed = 0, possible = 0;
    for (size_t i = 0; i < nq; i++) {
        const struct req_rec *r = &q[i];
        if (r->issue >= t || r->kind == RQ_FLUSH || r->kind == RQ_READ || r->kind == RQ_CLOSE)
            continue;
        bool acked = r->done && r->done < t && r->result == 0;
        bool sure = acked && (r->done < flushed_before || (r->flags & IMG_FUA)) && r->kind != RQ_DISCARD;
        guaranteed += sure;
        possible += !sure;
        uint32_t v = r->kind == RQ_WRITE ? V_REQ + (uint32_t)r->id : V_ZERO;
        for (uint64_t g = r->off / SECTOR; g < (r->off + r->len) / SECTOR && g < nsect; g++) {
            if (r->kind == RQ_DISCARD) {
                /* Discard is advisory: old data, zeros, or the backing file. */
                cset_add(&c[g], V_ZERO);
                cset_add(&c[g], V_BACK);
            } else if (sure) {
                cset_only(&c[g], v);
            } else {
                cset_add(&c[g], v);
            }
        }
    }
    unsigned long bad = 0, unchecked = 0;
    for (uint64_t g = 0; g < nsect; g++) {
        if (c[g].any) {
            unchecked++;
            continue;
        }
        bool match = false;
        for (unsigned j = 0; j < c[g].n && !match; j++)
            match = sector_is(c[g].v[j], got + g * SECTOR, g, w);
        if (!match && bad++ < 5) {
            char a[80], b[120];
            describe(got + g * SECTOR, a, sizeof(a));
            cset_str(&c[g], b, sizeof(b));
            printf("%s: sector %" PRIu64 " (offset %" PRIu64 "): found %s, expected %s\n", label, g,
                   g * SECTOR, a, b);
        }
    }
    fprintf(stderr, "%s: %lu sectors, %lu wrong, %lu unchecked; %lu requests guaranteed, %lu possible\n",
            label, (unsigned long)nsect, bad, unchecked, guaranteed, possible);
    free(c);
    return bad;
}

static int cmd_verify(const char *log, const char *raw, const char *initraw, const char *backraw,
                      const char *tstr)
{
    size_t nq, rlen, ilen, blen = 0;
    struct req_rec *q = load_reqs(log, &nq);
    uint64_t t = !strcmp(tstr, "end") ? UINT64_MAX : num(tstr);
    uint8_t *got = load_file(raw, &rlen);
    uint8_t *init = load_file(initraw, &ilen);
    uint8_t *back = strcmp(backraw, "-") ? load_file(backraw, &blen) : NULL;
    struct views w = { init, back, ilen, blen };
    unsigned long bad = verify_view(q, nq, t, got, rlen, &w, raw);
    free(q);
    free(got);
    free(init);
    free(back);
    return bad ? 1 : 0;
}

/* ---- reopen: the engine takes over a crash image ------------------------------------------ */

struct reopen { const char *path, *compare; struct loop *loop; int rc; char msg[600]; };

static void reopen_co(void *arg)
{
    struct reopen *ro = arg;
    struct img_opts o = { .format = IMG_FMT_QCOW2, .discard = opt_discard, .discard_no_unref = opt_no_unref };
    char err[512];
    struct image *img = img_open(ro->path, &o, err, sizeof(err));
    if (!img) {
        snprintf(ro->msg, sizeof(ro->msg), "open failed: %s", err);
        ro->rc = 1;
        loop_stop(ro->loop);
        return;
    }
    uint64_t size = img_size(img);
    if (ro->compare) {
        /* Our reader must see what qemu's reader saw. */
        size_t rlen;
        uint8_t *raw = load_file(ro->compare, &rlen);
        uint8_t *buf = io_alloc(1u << 20);
        for (uint64_t off = 0; off < size && !ro->rc; off += 1u << 20) {
            uint64_t n = size - off < (1u << 20) ? size - off : (1u << 20);
            int r = img_read(img, buf, off, n);
            if (r < 0) {
                snprintf(ro->msg, sizeof(ro->msg), "read at %" PRIu64 " failed: %s", off, strerror(-r));
                ro->rc = 1;
            } else if (off + n > rlen || memcmp(buf, raw + off, n)) {
                uint64_t k = 0;
                while (off + k < rlen && k < n && buf[k] == raw[off + k])
                    k++;
                snprintf(ro->msg, sizeof(ro->msg), "our engine reads offset %" PRIu64
                         " differently from qemu-img convert", off + k);
                ro->rc = 1;
            }
        }
        io_free(buf);
        free(raw);
    }
    /* Allocating and in-place writes, then flush and read back. */
    uint64_t rng = opt_seed * 0x9e3779b97f4a7c15ull + 99, offs[8], lens[8];
    for (unsigned i = 0; i < 8 && !ro->rc; i++) {
        lens[i] = (1 + rnd(&rng, 64)) * SECTOR;
        offs[i] = rnd(&rng, (size - lens[i]) / SECTOR) * SECTOR;
        for (unsigned j = 0; j < i; j++)
            if (offs[i] < offs[j] + lens[j] && offs[j] < offs[i] + lens[i])
                offs[i] = offs[j] = lens[i] = lens[j] = 0;     /* keep it simple: no overlaps */
        if (!lens[i])
            continue;
        uint8_t *b = io_alloc(lens[i]);
        for (uint64_t s = 0; s < lens[i] / SECTOR; s++)
            fill_sector(b + s * SECTOR, 0x40000000u + i, offs[i] / SECTOR + s);
        int r = img_write(img, b, offs[i], lens[i], 0);
        io_free(b);
        if (r < 0) {
            snprintf(ro->msg, sizeof(ro->msg), "write at %" PRIu64 " failed: %s", offs[i], strerror(-r));
            ro->rc = 1;
        }
    }
    int r = ro->rc ? 0 : img_flush(img);
    if (r < 0) {
        snprintf(ro->msg, sizeof(ro->msg), "flush failed: %s", strerror(-r));
        ro->rc = 1;
    }
    for (unsigned i = 0; i < 8 && !ro->rc; i++) {
        if (!lens[i])
            continue;
        uint8_t *b = io_alloc(lens[i]), exp[SECTOR];
        r = img_read(img, b, offs[i], lens[i]);
        for (uint64_t s = 0; r == 0 && s < lens[i] / SECTOR; s++) {
            fill_sector(exp, 0x40000000u + i, offs[i] / SECTOR + s);
            if (memcmp(exp, b + s * SECTOR, SECTOR))
                r = -EILSEQ;
        }
        io_free(b);
        if (r < 0) {
            snprintf(ro->msg, sizeof(ro->msg), "read back at %" PRIu64 ": %s", offs[i], strerror(-r));
            ro->rc = 1;
        }
    }
    r = img_close(img);
    if (r < 0 && !ro->rc) {
        snprintf(ro->msg, sizeof(ro->msg), "close failed: %s", strerror(-r));
        ro->rc = 1;
    }
    loop_stop(ro->loop);
}

static int cmd_reopen(const char *path, const char *compare)
{
    struct reopen ro = { .path = path, .compare = compare };
    ro.loop = loop_new(64);
    if (!ro.loop)
        die("cannot create the event loop");
    co_spawn(reopen_co, &ro);
    loop_run(ro.loop);
    loop_free(ro.loop);
    if (ro.rc)
        printf("reopen: %s\n", ro.msg);
    return ro.rc;
}

/* Every line of LIST is "IMAGE RAW T": verify RAW (qemu's view of the crash
 * image) at crash point T, then let the engine take IMAGE over (reopen,
 * comparing its own view with RAW).  Prints "ok N" / "bad N: why" per line. */
static int cmd_check(const char *log, const char *initraw, const char *backraw, const char *list)
{
    size_t nq, ilen, blen = 0;
    struct req_rec *q = load_reqs(log, &nq);
    uint8_t *init = load_file(initraw, &ilen);
    uint8_t *back = strcmp(backraw, "-") ? load_file(backraw, &blen) : NULL;
    struct views w = { init, back, ilen, blen };
    FILE *lf = fopen(list, "r");
    if (!lf)
        die("cannot open '%s'", list);
    char image[2048], raw[2048];
    unsigned long long t;
    int rc = 0;
    for (unsigned n = 0; fscanf(lf, "%2047s %2047s %llu", image, raw, &t) == 3; n++) {
        size_t rlen;
        uint8_t *got = load_file(raw, &rlen);
        unsigned long bad = verify_view(q, nq, t, got, rlen, &w, image);
        free(got);
        if (bad) {
            printf("bad %s: %lu sectors read back wrong (t=%llu)\n", image, bad, t);
            rc = 1;
            continue;
        }
        if (cmd_reopen(image, raw) != 0) {
            printf("bad %s: the engine could not take the image over (t=%llu)\n", image, t);
            rc = 1;
            continue;
        }
        printf("ok %s\n", image);
    }
    fclose(lf);
    free(q);
    free(init);
    free(back);
    return rc;
}

/* ---- command line ------------------------------------------------------------------------- */

static void usage(void)
{
    fprintf(stderr,
            "usage: crashsim record IMAGE LOG [--seed N] [--ops N] [--depth N] [--data-file NAME]\n"
            "                [--discard unmap|ignore] [--discard-no-unref]   (also for faults, reopen)\n"
            "       crashsim op IMAGE LOG OP [ARG] [--class meta|sync --errno EIO|ENOSPC --nth N]\n"
            "       crashsim crash LOG INITIAL OUTPREFIX [--seed N] [--count-states N] [--data-file NAME]\n"
            "       crashsim check LOG INITIAL_RAW BACKING_RAW|- LIST\n"
            "       crashsim verify LOG RAW INITIAL_RAW BACKING_RAW|- T|end\n"
            "       crashsim reopen IMAGE [--seed N] [--compare RAW]\n"
            "       crashsim faults IMAGE LOG --class data|meta|sync|hdrsync|read --errno EIO|ENOSPC|SHORT\n"
            "                [--nth N] [--count N] [--space-limit BYTES] [--at-open] [--seed N] [--ops N] [--ops2 N] [--depth N]\n");
    exit(2);
}


int main(int argc, char **argv)
{
    static const struct option lo[] = {
        { "seed", required_argument, NULL, 's' },
        { "count-states", required_argument, NULL, 'K' },
        { "at-open", no_argument, NULL, 'A' },
        { "ops", required_argument, NULL, 'o' },
        { "ops2", required_argument, NULL, 'O' },
        { "depth", required_argument, NULL, 'd' },
        { "compare", required_argument, NULL, 'c' },
        { "class", required_argument, NULL, 'C' },
        { "errno", required_argument, NULL, 'e' },
        { "nth", required_argument, NULL, 'n' },
        { "count", required_argument, NULL, 'k' },
        { "space-limit", required_argument, NULL, 'l' },
        { "discard", required_argument, NULL, 'D' },
        { "discard-no-unref", no_argument, NULL, 'U' },
        { "data-file", required_argument, NULL, 'F' },
        { NULL, 0, NULL, 0 },
    };
    const char *compare = NULL;
    hk.nth = 1;
    hk.count = 1;
    int opt;
    while ((opt = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (opt) {
        case 's': opt_seed = num(optarg); break;
        case 'K': opt_count = (unsigned)num(optarg); break;
        case 'A': opt_at_open = true; break;
        case 'o': opt_ops = num(optarg); break;
        case 'O': opt_ops2 = num(optarg); break;
        case 'd':
            opt_depth = (unsigned)num(optarg);
            if (opt_depth < 1 || opt_depth > MAX_DEPTH)
                die("--depth must be 1..%d", MAX_DEPTH);
            break;
        case 'c': compare = optarg; break;
        case 'C':
            hk.fclass = !strcmp(optarg, "data") ? FC_DATA : !strcmp(optarg, "meta") ? FC_META
                      : !strcmp(optarg, "sync") ? FC_SYNC : !strcmp(optarg, "read") ? FC_READ
                      : !strcmp(optarg, "hdrsync") ? FC_HDRSYNC : FC_NONE;
            if (hk.fclass == FC_NONE)
                die("unknown --class '%s'", optarg);
            break;
        case 'e':
            hk.ferr = !strcmp(optarg, "EIO") ? -EIO : !strcmp(optarg, "ENOSPC") ? -ENOSPC
                    : !strcmp(optarg, "SHORT") ? 1 : 0;
            if (!hk.ferr)
                die("unknown --errno '%s'", optarg);
            break;
        case 'n': hk.nth = num(optarg); break;
        case 'k': hk.count = num(optarg); break;
        case 'l': hk.space_limit = num(optarg); break;
        case 'D':
            if (img_parse_discard(optarg, &opt_discard) < 0)
                die("unknown --discard '%s'", optarg);
            break;
        case 'U': opt_no_unref = true; break;
        case 'F': opt_data_name = optarg; break;
        default: usage();
        }
    }
    int n = argc - optind;
    char **a = argv + optind;
    if (n < 1)
        usage();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strcmp(a[0], "record") && n == 3)
        return run_workload(a[1], a[2], false);
    if (!strcmp(a[0], "faults") && n == 3) {
        if (hk.fclass == FC_NONE && !hk.space_limit)
            die("faults: give --class and --errno, or --space-limit");
        if (hk.fclass != FC_NONE && !hk.ferr)
            die("faults: --class needs --errno");
        return run_workload(a[1], a[2], true);
    }
    if (!strcmp(a[0], "op") && (n == 4 || n == 5)) {
        if (hk.fclass != FC_NONE && !hk.ferr)
            die("op: --class needs --errno");
        return cmd_op(a[1], a[2], a[3], n == 5 ? a[4] : NULL);
    }
    if (!strcmp(a[0], "crash") && n == 4)
        return cmd_crash(a[1], a[2], a[3], opt_count);
    if (!strcmp(a[0], "check") && n == 5)
        return cmd_check(a[1], a[2], a[3], a[4]);
    if (!strcmp(a[0], "verify") && n == 6)
        return cmd_verify(a[1], a[2], a[3], a[4], a[5]);
    if (!strcmp(a[0], "reopen") && n == 2)
        return cmd_reopen(a[1], compare);
    usage();
}
