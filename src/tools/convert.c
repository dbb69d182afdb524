/* convert: copy an image (raw, qcow2 with its backing chain, or one of its
 * internal snapshots) into a new or existing raw or qcow2 image, optionally
 * with compressed clusters, as qemu-img convert does.
 *
 * The copy runs on an io_uring loop: `parallel` coroutines each take the next
 * chunk, read it from the source, compare it block by block (the target's
 * cluster, or 4 KiB / -S for raw) with what the target reads there now
 * (zeros for a new image, the backing file with -B, the old data with -n),
 * and write only the blocks that differ: zeros as write-zeroes (a zero flag,
 * or a hole), data plainly or compressed.  Compression runs on the worker
 * pool (io/workpool.h), so all cores compress while the loop reads and
 * writes.  Without `unordered` (-W) writes go out in chunk order, so the
 * target's layout follows the guest's as qemu-img's does. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/coroutine.h"
#include "io/imagelock.h"
#include "io/loop.h"
#include "qcow2/internal.h"
#include "tools/tools.h"

struct conv {
    const struct convert_opts *o;
    struct image *src, *dst;
    struct qcow2 *dq;           /* dst when qcow2 */
    uint64_t size;              /* bytes to copy */
    uint64_t chunk, block;      /* work unit; comparison unit (divides chunk) */
    uint64_t next;              /* next chunk to hand out */
    uint64_t next_write;        /* ordered mode: the chunk whose turn it is to write */
    struct co_queue turn;
    uint64_t done;
    int err;
    const char *err_what;
    uint64_t err_off;
    unsigned live;
    struct co_queue all_done;
};

static bool all_zero(const uint8_t *p, size_t n)
{
    /* Word at a time; the buffers are IO_ALIGN-aligned. */
    const uint64_t *w = (const uint64_t *)p;
    for (size_t i = 0; i < n / 8; i++)
        if (w[i])
            return false;
    for (size_t i = n / 8 * 8; i < n; i++)
        if (p[i])
            return false;
    return true;
}

static void set_err(struct conv *c, int r, const char *what, uint64_t off)
{
    if (!c->err) {
        c->err = r;
        c->err_what = what;
        c->err_off = off;
    }
}

enum act { A_SKIP, A_ZERO, A_DATA, A_COMP };

/* Write runs of blocks [k0, k1) of one kind in one request. */
static int put_run(struct conv *c, enum act a, const uint8_t *sbuf, uint64_t off, uint64_t from,
                   uint64_t to)
{
    if (a == A_ZERO)
        return img_write_zeroes(c->dst, off + from, to - from, 0);
    return img_write(c->dst, sbuf + from, off + from, to - from, 0);
}

static void worker_co(void *arg)
{
    struct conv *c = arg;
    const struct convert_opts *o = c->o;
    uint64_t nb = c->chunk / c->block;
    uint8_t *sbuf = io_alloc(c->chunk), *tbuf = io_alloc(c->chunk);
    uint8_t *cbuf = o->compress ? malloc(c->chunk) : NULL;
    enum act *act = calloc(nb, sizeof(*act));
    const uint8_t **zin = calloc(nb, sizeof(*zin));
    uint8_t **zout = calloc(nb, sizeof(*zout));
    ssize_t *zres = calloc(nb, sizeof(*zres));
    size_t *zidx = calloc(nb, sizeof(*zidx));
    bool fresh_zero = !o->existing && !o->create.backing_file;
    if (!act || !zin || !zout || !zres || !zidx || (o->compress && !cbuf))
        set_err(c, -ENOMEM, "allocating buffers", 0);
    while (!c->err && c->next * c->chunk < c->size) {
        uint64_t idx = c->next++;
        uint64_t off = idx * c->chunk, len = c->size - off < c->chunk ? c->size - off : c->chunk;
        int r = img_read(c->src, sbuf, off, len);
        if (r < 0) {
            set_err(c, r, "reading the source", off);
            break;
        }
        /* The last block may be partial: zeros after the end (a compressed
         * last cluster is padded with them, as QEMU pads it). */
        uint64_t blocks = (len + c->block - 1) / c->block;
        memset(sbuf + len, 0, blocks * c->block - len);
        /* What the target reads now: zeros (new), the backing file (-B),
         * or the old content (-n).  Equal blocks are not written. */
        if (!fresh_zero) {
            r = img_read(c->dst, tbuf, off, len);
            if (r < 0) {
                set_err(c, r, "reading the target", off);
                break;
            }
        }
        size_t nz = 0;
        for (uint64_t k = 0; k < blocks; k++) {
            uint64_t b = k * c->block, n = len - b < c->block ? len - b : c->block;
            bool zero = all_zero(sbuf + b, n);
            bool same = fresh_zero ? zero : !memcmp(sbuf + b, tbuf + b, n);
            if (same)
                /* -S 0: a new image gets everything allocated, zeros too. */
                act[k] = o->min_sparse || !fresh_zero ? A_SKIP : A_DATA;
            else if (zero && o->min_sparse)
                act[k] = A_ZERO;
            else if (o->compress) {
                act[k] = A_COMP;
                zin[nz] = sbuf + b;
                zout[nz] = cbuf + b;
                zidx[nz++] = k;
            } else
                act[k] = A_DATA;
        }
        /* Compression first, in parallel with the other chunks'; only the
         * writes wait for their turn. */
        if (nz)
            qcow2_zc_compress_many(c->dq, nz, zin, c->block, zout, c->block - 1, zres);
        for (size_t i = 0; i < nz; i++) {
            if (zres[i] == -ENOSPC)
                act[zidx[i]] = A_DATA;      /* does not compress: stored as it is (QEMU too) */
            else if (zres[i] <= 0)
                r = zres[i] < 0 ? (int)zres[i] : -EIO;
        }
        if (r < 0) {
            set_err(c, r, "compressing", off);
            break;
        }
        /* Ordered mode: wait for this chunk's turn before writing. */
        while (!o->unordered && c->next_write != idx && !c->err)
            co_queue_wait(&c->turn);
        size_t zi = 0;
        for (uint64_t k = 0; k < blocks && r == 0 && !c->err;) {
            uint64_t b = k * c->block;
            if (act[k] == A_COMP) {
                while (zidx[zi] != k)
                    zi++;
                r = qcow2_co_write_compressed(c->dst, cbuf + b, (size_t)zres[zi], off + b);
                k++;
                continue;
            }
            uint64_t k1 = k + 1;
            while (k1 < blocks && act[k1] == act[k])
                k1++;
            uint64_t to = k1 * c->block < len ? k1 * c->block : len;
            if (act[k] != A_SKIP)
                r = put_run(c, act[k], sbuf, off, b, to);
            k = k1;
        }
        if (r < 0)
            set_err(c, r, "writing the target", off);
        c->next_write = idx + 1;
        co_queue_wake_all(&c->turn);
        c->done += len;
        if (o->progress)
            o->progress(o->progress_ctx, c->done, c->size);
    }
    io_free(sbuf);
    io_free(tbuf);
    free(cbuf);
    free(act);
    free(zin);
    free(zout);
    free(zres);
    free(zidx);
    if (c->err)
        co_queue_wake_all(&c->turn);
    if (--c->live == 0)
        co_queue_wake_all(&c->all_done);
}

static void main_co(void *arg)
{
    struct conv *c = arg;
    c->live = c->o->parallel;
    for (unsigned i = 0; i < c->o->parallel; i++)
        co_spawn(worker_co, c);
    while (c->live)
        co_queue_wait(&c->all_done);
    /* Packed compressed clusters still in memory, then every metadata
     * change: one flush makes the whole target durable. */
    int r = img_flush(c->dst);
    if (r < 0)
        set_err(c, r, "flushing the target", 0);
}

static bool same_file(const struct stat *a, const char *path)
{
    struct stat b;
    return stat(path, &b) == 0 && a->st_dev == b.st_dev && a->st_ino == b.st_ino;
}

/* Is the file at dst (stat dst_st) the source or any image of its chain? */
static bool is_source(const struct stat *dst_st, struct image *src)
{
    for (struct image *i = src; i; ) {
        if (same_file(dst_st, i->path))
            return true;
        if (strcmp(img_format_name(i), "qcow2"))
            break;
        struct qcow2 *q = to_qcow2(i);
        if (has_data_file(q) && same_file(dst_st, q->data_file.path))
            return true;
        i = q->backing;
    }
    return false;
}

/* The format a file holds: qcow2 by its magic, else raw. */
static enum img_format probe(const char *path)
{
    uint8_t m[4] = { 0 };
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return IMG_FMT_AUTO;
    ssize_t n = pread(fd, m, 4, 0);
    close(fd);
    return n == 4 && be32_load(m) == QCOW2_MAGIC ? IMG_FMT_QCOW2 : IMG_FMT_RAW;
}

void convert_opts_init(struct convert_opts *o)
{
    memset(o, 0, sizeof(*o));
    create_opts_init(&o->create);
    o->create.format = IMG_FMT_RAW;     /* qemu-img convert's default output format */
    o->min_sparse = 4096;
    o->parallel = 8;
}

/* The target as it is: never the source (or a file of its chain: it would
 * be read while overwritten), never its own backing file, never a served
 * image (its lock: *dst_lock holds ours), and an existing file of another
 * format only with -n and -O. */
static int check_target(const struct convert_opts *o, struct image *src, enum img_format dfmt,
                        bool *exists, int *dst_lock, char *err, size_t errlen)
{
    char msg[1024];
    struct stat dst_st;
    *exists = stat(o->dst, &dst_st) == 0;
    if (!*exists)
        return 0;
    if (is_source(&dst_st, src))
        return tools_fail(-EINVAL, err, errlen, "%s is the source image (or part of its backing chain)", o->dst);
    if (o->create.backing_file) {
        char bpath[PATH_MAX];
        if (qcow2_resolve_backing(o->dst, o->create.backing_file, bpath, sizeof(bpath), msg, sizeof(msg)) == 0 &&
            same_file(&dst_st, bpath))
            return tools_fail(-EINVAL, err, errlen, "%s cannot be its own backing file", o->dst);
    }
    if (!S_ISREG(dst_st.st_mode))
        return 0;
    /* A served image (ours or QEMU's) holds the lock: refuse it. */
    *dst_lock = image_lock(o->dst, true, msg, sizeof(msg));
    if (*dst_lock == -EBUSY)
        return tools_fail(-EBUSY, err, errlen, "%s", msg);
    enum img_format have = dst_st.st_size ? probe(o->dst) : dfmt;
    if (have != dfmt && (!o->existing || !o->format_given))
        return tools_fail(-EEXIST, err, errlen, "%s exists and is a %s image, not %s; remove it first%s", o->dst,
                    have == IMG_FMT_QCOW2 ? "qcow2" : "raw", dfmt == IMG_FMT_QCOW2 ? "qcow2" : "raw",
                    o->existing ? " or give -O explicitly" : " (or use -n to write into it)");
    return 0;
}

/* Create the target (unless -n), sized as the source unless -o says, and
 * hold its lock in *dst_lock. */
static int make_target(const struct convert_opts *o, uint64_t size, bool exists, int *dst_lock,
                       char *err, size_t errlen)
{
    char msg[1024];
    if (o->existing)
        return exists ? 0 : tools_fail(-ENOENT, err, errlen, "%s does not exist (-n writes into an existing image)", o->dst);
    /* img_create takes the lock itself while it writes. */
    if (*dst_lock >= 0) {
        close(*dst_lock);
        *dst_lock = -1;
    }
    struct create_opts co = o->create;
    if (!co.size_set) {
        co.size = size;
        co.size_set = true;
    }
    co.progress = NULL;
    int r = img_create(o->dst, &co, msg, sizeof(msg));
    if (r < 0)
        return tools_fail(r, err, errlen, "%s", msg);
    *dst_lock = image_lock(o->dst, true, msg, sizeof(msg));
    if (*dst_lock == -EBUSY)
        return tools_fail(-EBUSY, err, errlen, "%s", msg);
    return 0;
}

/* The copy itself: the coroutines on a loop of their own. */
static int run_copy(struct conv *c, char *err, size_t errlen)
{
    struct loop *l = loop_new(256);
    if (!l)
        return tools_fail(-ENOMEM, err, errlen, "cannot set up io_uring");
    co_spawn(main_co, c);
    int r = loop_run(l);
    loop_free(l);
    co_pool_release();
    if (r == 0 && c->err) {
        r = c->err;
        tools_fail(r, err, errlen, "%s at offset %llu failed: %s", c->err_what, (unsigned long long)c->err_off,
             strerror(-r));
    } else if (r < 0) {
        tools_fail(r, err, errlen, "the I/O loop failed: %s", strerror(-r));
    }
    return r;
}

int img_convert(const struct convert_opts *o, char *err, size_t errlen)
{
    char msg[1024];
    enum img_format dfmt = o->create.format;
    err[0] = '\0';
    if (o->compress && dfmt != IMG_FMT_QCOW2)
        return tools_fail(-EINVAL, err, errlen, "compression is not supported for the %s format (use -O qcow2)",
                    dfmt == IMG_FMT_RAW ? "raw" : "target");
    if (o->parallel < 1 || o->parallel > 64)
        return tools_fail(-EINVAL, err, errlen, "-m takes 1 to 64 coroutines");
    if (o->min_sparse % 512)
        return tools_fail(-EINVAL, err, errlen, "-S takes a multiple of 512 bytes");

    /* The source (its whole chain) is opened read-only; its lock keeps
     * writers away while it is copied. */
    int src_lock = -1, dst_lock = -1;
    if (!o->force_share) {
        src_lock = image_lock(o->src, false, msg, sizeof(msg));
        if (src_lock == -EBUSY)
            return tools_fail(-EBUSY, err, errlen, "%s (-U reads it anyway)", msg);
    }
    struct img_opts so = { .format = o->src_format, .read_only = true, .snapshot = o->snapshot };
    struct image *src = img_open(o->src, &so, msg, sizeof(msg));
    if (!src) {
        if (src_lock >= 0)
            close(src_lock);
        return tools_fail(-EINVAL, err, errlen, "%s", msg);
    }
    struct conv c = { .o = o, .src = src, .size = img_size(src) };
    struct image *dst = NULL;
    bool exists;
    int r = check_target(o, src, dfmt, &exists, &dst_lock, err, errlen);
    if (r == 0)
        r = make_target(o, c.size, exists, &dst_lock, err, errlen);
    if (r < 0)
        goto out;
    struct img_opts dopt = { .format = dfmt, .discard = IMG_DISCARD_UNMAP };
    dst = img_open(o->dst, &dopt, msg, sizeof(msg));
    if (!dst) {
        r = tools_fail(-EINVAL, err, errlen, "%s", msg);
        goto out;
    }
    if (img_size(dst) < c.size) {
        r = tools_fail(-ENOSPC, err, errlen, "%s is smaller (%llu bytes) than the source (%llu bytes)", o->dst,
                 (unsigned long long)img_size(dst), (unsigned long long)c.size);
        goto out;
    }
    c.dst = dst;
    c.dq = dfmt == IMG_FMT_QCOW2 ? to_qcow2(dst) : NULL;
    if (o->compress && (has_data_file(c.dq) || c.dq->crypto)) {
        r = tools_fail(-ENOTSUP, err, errlen, "%s: compressed clusters cannot go to an external data file "
                 "or an encrypted image", o->dst);
        goto out;
    }
    /* Blocks: the target's clusters (qcow2 allocates whole clusters), or
     * -S's size for raw (4 KiB by default); chunks: at least 1 MiB. */
    c.block = c.dq ? cl_size(c.dq) : (o->min_sparse ? o->min_sparse : 65536);
    c.chunk = c.block >= (1u << 20) ? c.block : (1u << 20) / c.block * c.block;
    if (c.size)
        r = run_copy(&c, err, errlen);
out:
    if (dst) {
        int cr = img_close(dst);
        if (r == 0 && cr < 0)
            r = tools_fail(cr, err, errlen, "closing %s failed: %s", o->dst, strerror(-cr));
    }
    img_close(src);
    if (src_lock >= 0)
        close(src_lock);
    if (dst_lock >= 0)
        close(dst_lock);
    return r;
}
