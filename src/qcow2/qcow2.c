/* qcow2 images: open, close, header updates, and the ordered flush. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/imagelock.h"
#include "io/log.h"
#include "io/loop.h"
#include "qcow2/internal.h"

#define MAX_BACKING_DEPTH 32
#define MIN_L2_SLICES 128
#define MIN_RC_SLICES 64

void qcow2_req_begin(struct qcow2 *q, struct qreq *r)
{
    r->tick = q->tick;
    r->next = &q->reqs;
    r->prev = q->reqs.prev;
    q->reqs.prev->next = r;
    q->reqs.prev = r;
}

void qcow2_req_end(struct qcow2 *q, struct qreq *r)
{
    (void)q;
    r->prev->next = r->next;
    r->next->prev = r->prev;
}

void qcow2_mark_broken(struct qcow2 *q, const char *fmt, ...)
{
    if (!q->broken) {
        char what[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        uq_error("%s: corrupt image: %s; further writes refused", q->img.path, what);
    }
    q->broken = true;
}

/* Rewrite the header's fixed fields.  They all lie in the first sector, so
 * the update is a single atomic sector write; extensions stay untouched. */
int qcow2_write_header_fields(struct qcow2 *q)
{
    int c = qcow2_ol_check(q, 0, 512, OL_HEADER, "the header");
    if (c < 0)
        return c;
    qcow2_header_store(&q->h, q->hdr_buf);
    ssize_t r = file_pwrite(&q->file, q->hdr_buf, 512, 0, false);
    return r < 0 ? (int)r : 0;
}

/* ---- flush ------------------------------------------------------------------- */

struct sector_copy {
    uint64_t off;
    uint8_t *flag;      /* the dirty flag to raise again if the write fails */
    uint8_t data[512];
};

/* Copy the dirty 512-byte sectors of an in-memory table (L1 or refcount
 * table) as they are now, clearing their dirty flags. */
static int snapshot_table(const uint64_t *tab, uint64_t entries, uint8_t *dirty, uint64_t table_off,
                          struct sector_copy **out, uint32_t *n)
{
    uint64_t sectors = (entries * 8 + 511) / 512, count = 0;
    for (uint64_t s = 0; s < sectors; s++)
        count += dirty[s] != 0;
    *n = (uint32_t)count;
    *out = NULL;
    if (!count)
        return 0;
    struct sector_copy *c = calloc(count, sizeof(*c));
    if (!c)
        return -ENOMEM;
    uint32_t k = 0;
    for (uint64_t s = 0; s < sectors; s++) {
        if (!dirty[s])
            continue;
        for (uint64_t i = 0; i < 64; i++) {
            uint64_t e = s * 64 + i;
            /* The table fills whole clusters, so the sector's tail is ours. */
            be64_store(c[k].data + i * 8, e < entries ? tab[e] : 0);
        }
        c[k].off = table_off + s * 512;
        c[k].flag = &dirty[s];
        dirty[s] = 0;
        k++;
    }
    *out = c;
    return 0;
}

/* Write the sector copies unless ret is already an error; whatever is not
 * written is marked dirty again.  Frees the copies.  kind: OL_ACTIVE_L1 or
 * OL_REFTABLE, the table the sectors belong to (overlap check). */
static int write_sector_copies(struct qcow2 *q, struct sector_copy *c, uint32_t n, int ret,
                               unsigned kind)
{
    uint8_t *buf = io_alloc(512);
    for (uint32_t i = 0; i < n; i++) {
        if (ret == 0)
            ret = qcow2_ol_check(q, c[i].off, 512, kind,
                           kind == OL_ACTIVE_L1 ? "an L1 table sector" : "a refcount table sector");
        if (ret == 0) {
            memcpy(buf, c[i].data, 512);
            ssize_t r = file_pwrite(&q->file, buf, 512, c[i].off, false);
            if (r < 0)
                ret = (int)r;
        }
        if (ret < 0)
            *c[i].flag = 1;
    }
    io_free(buf);
    free(c);
    return ret;
}

int qcow2_sync(struct qcow2 *q)
{
    if (q->flush_failed)
        return -EIO;
    int r = file_sync(&q->file);
    if (r < 0) {
        /* After a failed sync the kernel may have dropped dirty pages: a
         * later sync could succeed without them, so never claim success
         * again for this image (fsyncgate). */
        q->flush_failed = true;
        uq_error("%s: flush failed (%s); the image is suspect from now on",
                 q->img.path, strerror(-r));
    }
    return r;
}

static void append_frees(struct deferred_free **list, struct deferred_free *more)
{
    while (*list)
        list = &(*list)->next;
    *list = more;
}

/* Make everything acknowledged so far durable, in the order that keeps the
 * image consistent at every instant:
 *   1. refcount blocks (new references counted); refcount table sectors
 *      naming new blocks only after a sync made those blocks durable;
 *   2. sync: guest data, COW copies and refcounts are now on disk;
 *   3. L2 tables; 4. after a sync, L1 sectors naming new L2 tables; sync;
 *   5. only now may references dropped by those L2/L1 changes be released.
 * What is written is a copy taken at the start: entries changed while the
 * flush runs may point at data not yet synced, so they wait for the next. */
int qcow2_flush(struct qcow2 *q)
{
    /* Compressed writes completed so far may still sit in the packing
     * buffer: written and mapped first, so this flush covers them. */
    int zr = qcow2_zw_finish(q);
    co_mutex_lock(&q->flush_lock);
    struct mcopy *rcc = NULL, *l2c = NULL;
    struct sector_copy *rt = NULL, *l1 = NULL;
    uint32_t nrc = 0, nl2 = 0, nrt = 0, nl1 = 0;
    int r = zr < 0 ? zr : qcow2_cache_snapshot_dirty(&q->rcc, &rcc, &nrc);
    if (r == 0)
        r = qcow2_cache_snapshot_dirty(&q->l2c, &l2c, &nl2);
    if (r == 0)
        r = snapshot_table(q->reftable, q->reftable_entries, q->reftable_dirty,
                           q->h.refcount_table_offset, &rt, &nrt);
    if (r == 0)
        r = snapshot_table(q->l1, q->h.l1_size, q->l1_dirty, q->h.l1_table_offset, &l1, &nl1);
    struct deferred_free *frees = q->frees_pending;
    q->frees_pending = NULL;
    q->frees_pending_tail = &q->frees_pending;

    r = qcow2_cache_write_copies(&q->rcc, rcc, nrc, r);
    if (r == 0 && nrt)
        r = qcow2_sync(q);
    r = write_sector_copies(q, rt, nrt, r, OL_REFTABLE);
    if (r == 0)
        r = qcow2_datafile_sync(q);   /* guest data in an external data file: durable first too */
    if (r == 0)
        r = qcow2_sync(q);
    r = qcow2_cache_write_copies(&q->l2c, l2c, nl2, r);
    if (r == 0 && nl1 && nl2)
        r = qcow2_sync(q);
    r = write_sector_copies(q, l1, nl1, r, OL_ACTIVE_L1);
    if (r == 0 && (nl2 || nl1))
        r = qcow2_sync(q);

    if (r == 0) {
        /* The changes that dropped these references are durable now. */
        append_frees(&q->frees_ready, frees);
        r = qcow2_apply_ready_frees(q);
    } else {
        append_frees(&frees, q->frees_pending);
        q->frees_pending = frees;
        q->frees_pending_tail = &q->frees_pending;
        while (*q->frees_pending_tail)
            q->frees_pending_tail = &(*q->frees_pending_tail)->next;
    }
    co_mutex_unlock(&q->flush_lock);
    return r;
}

/* ---- open / close ------------------------------------------------------------ */

static int read_table(struct qcow2 *q, uint64_t off, uint64_t entries, uint64_t **out)
{
    uint64_t bytes = (entries * 8 + 511) & ~511ull;
    uint8_t *buf = io_alloc(bytes ? bytes : 512);
    uint64_t *tab = malloc((entries ? entries : 1) * sizeof(*tab));
    if (!tab) {
        io_free(buf);
        return -ENOMEM;
    }
    ssize_t n = bytes ? file_pread(&q->file, buf, bytes, off) : 0;
    if (n < 0) {
        io_free(buf);
        free(tab);
        return (int)n;
    }
    memset(buf + n, 0, bytes - (uint64_t)n);     /* past the end of the file: zeros */
    for (uint64_t i = 0; i < entries; i++)
        tab[i] = be64_load(buf + i * 8);
    io_free(buf);
    *out = tab;
    return 0;
}

/* Walk the snapshot table entry by entry (each has a variable length) to
 * learn its size, then read and parse it whole. */
static int read_snapshots(struct qcow2 *q, char *err, size_t errlen)
{
    uint64_t pos = q->h.snapshots_offset, end = q->host_end;
    uint64_t unpadded_end = pos;
    /* The fixed parts come from a window read in large pieces: one read per
     * entry made 65536 snapshots cost 65536 direct reads. */
    const size_t win_size = 64u << 10;
    uint8_t *win = malloc(win_size);
    uint64_t win_off = 0, win_len = 0;
    if (!win)
        return -ENOMEM;
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++) {
        if (pos + 40 > end || pos - q->h.snapshots_offset > QCOW2_MAX_SNAPSHOT_TABLE) {
            snprintf(err, errlen, "snapshot table entry %u lies outside the image", i);
            free(win);
            return -EINVAL;
        }
        if (pos < win_off || pos + 40 > win_off + win_len) {
            ssize_t n = file_pread_any(&q->file, win, win_size, pos);
            if (n < 40) {
                snprintf(err, errlen, "cannot read the snapshot table: %s",
                         n < 0 ? strerror((int)-n) : "short read");
                free(win);
                return n < 0 ? (int)n : -EIO;
            }
            win_off = pos;
            win_len = (uint64_t)n;
        }
        const uint8_t *fixed = win + (pos - win_off);
        uint64_t len = 40 + (uint64_t)be32_load(fixed + 36) + be16_load(fixed + 12) + be16_load(fixed + 14);
        unpadded_end = pos + len;
        pos += (len + 7) & ~7ull;
    }
    free(win);
    uint64_t total = pos - q->h.snapshots_offset;
    q->snapshot_table_len = total;
    /* QEMU does not always write the last entry's padding. */
    if (total > QCOW2_MAX_SNAPSHOT_TABLE || unpadded_end > end) {
        snprintf(err, errlen, "snapshot table (%llu bytes) is too large or lies outside the image",
                 (unsigned long long)total);
        return -EINVAL;
    }
    uint8_t *buf = malloc(total ? total : 1);
    if (!buf)
        return -ENOMEM;
    ssize_t n = file_pread_any(&q->file, buf, total, q->h.snapshots_offset);
    if (n < 0)
        snprintf(err, errlen, "cannot read the snapshot table: %s", strerror((int)-n));
    int r = n < 0 ? (int)n
          : qcow2_snapshots_parse(&q->h, buf, (size_t)n, q->h.nb_snapshots, &q->snapshots, err, errlen);
    free(buf);
    return r;
}

static const char *const protocols[] = {
    "nbd", "nbd+unix", "nbd+tcp", "http", "https", "ftp", "ftps", "ssh", "iscsi", "rbd",
    "gluster", "nfs", "vvfat", "null-co", "null-aio", "blkdebug", "blkverify", "host_device",
    "host_cdrom", "throttle", "quorum", "fd", NULL,
};

/* Names of other files an image refers to (backing file, external data
 * file) are resolved like QEMU resolves backing file names: relative to the
 * directory of the image as named (not the working directory), by putting
 * the image's directory part in front ("dir/top.qcow2" + "base" ->
 * "dir/base"; "top.qcow2" + "base" -> "base").  Pseudo-protocols (json:,
 * nbd: ...) and devices are refused: we only open image files.  `what` names
 * the reference in messages ("backing file", "data file"). */
int qcow2_resolve_name(const char *image, const char *name, const char *what, char *out,
                       size_t outlen, char *err, size_t errlen)
{
    if (!strncmp(name, "json:", 5)) {
        snprintf(err, errlen, "%s '%s' uses the json: pseudo-protocol, which is not supported", what, name);
        return -ENOTSUP;
    }
    if (!strncmp(name, "file:", 5))
        name += 5;
    const char *colon = strchr(name, ':'), *slash = strchr(name, '/');
    if (colon && (!slash || colon < slash)) {
        for (int i = 0; protocols[i]; i++) {
            size_t n = strlen(protocols[i]);
            if ((size_t)(colon - name) == n && !strncmp(name, protocols[i], n)) {
                snprintf(err, errlen, "%s '%s' uses the %s: protocol, which is not supported",
                         what, name, protocols[i]);
                return -ENOTSUP;
            }
        }
    }
    const char *dir_end = strrchr(image, '/');
    if (name[0] == '/' || !dir_end)
        snprintf(out, outlen, "%s", name);
    else
        snprintf(out, outlen, "%.*s%s", (int)(dir_end - image + 1), image, name);
    struct stat st;
    if (stat(out, &st) == 0 && !S_ISREG(st.st_mode)) {
        snprintf(err, errlen, "%s '%s' is not a regular file", what, out);
        return -ENOTSUP;
    }
    return 0;
}

int qcow2_resolve_backing(const char *overlay, const char *name, char *out, size_t outlen,
                          char *err, size_t errlen)
{
    return qcow2_resolve_name(overlay, name, "backing file", out, outlen, err, errlen);
}

/* Real paths of the images being opened down the chain (loop detection). */
static char *chain_paths[MAX_BACKING_DEPTH + 2];

static int open_backing(struct qcow2 *q, const struct img_opts *o, int depth, char *err, size_t errlen)
{
    char path[PATH_MAX + 1100], msg[512];
    int r = qcow2_resolve_backing(q->img.path, q->h.backing_file, path, sizeof(path), err, errlen);
    if (r < 0)
        return r;
    if (depth + 1 > MAX_BACKING_DEPTH) {
        snprintf(err, errlen, "backing chain of '%s' is deeper than %d images", q->img.path, MAX_BACKING_DEPTH);
        return -ELOOP;
    }
    char *real = realpath(path, NULL);
    for (int i = 0; real && i <= depth; i++) {
        if (chain_paths[i] && !strcmp(chain_paths[i], real)) {
            snprintf(err, errlen, "backing chain loops: '%s' is its own backing file", path);
            free(real);
            return -ELOOP;
        }
    }
    free(real);

    struct img_opts bo = *o;
    bo.read_only = true;
    bo.cache_size = 0;
    bo.snapshot = NULL;     /* a snapshot reads through the overlay's backing file as it is */
    const char *fmt = q->h.backing_format;
    if (!strcmp(fmt, "qcow2"))
        bo.format = IMG_FMT_QCOW2;
    else if (!strcmp(fmt, "raw"))
        bo.format = IMG_FMT_RAW;
    else if (!fmt[0])
        bo.format = IMG_FMT_AUTO;
    else {
        snprintf(err, errlen, "backing file '%s' has format '%s', which is not supported", path, fmt);
        return -ENOTSUP;
    }
    /* A reader's locks, as QEMU takes them on a backing file: nobody may
     * write or resize it while an overlay reads through to it. */
    int lock_fd = image_lock(path, false, msg, sizeof(msg));
    if (lock_fd < 0) {
        snprintf(err, errlen, "backing file of '%s': %s", q->img.path, msg);
        return lock_fd;
    }
    struct file f;
    if (file_open(&f, path, false, o->cache, msg, sizeof(msg)) < 0) {
        close(lock_fd);
        snprintf(err, errlen, "backing file of '%s': %s", q->img.path, msg);
        return -ENOENT;
    }
    if (bo.format == IMG_FMT_AUTO) {
        uint8_t *b = io_alloc(512);
        ssize_t n = file_pread(&f, b, 512, 0);
        bo.format = n >= 4 && be32_load(b) == QCOW2_MAGIC ? IMG_FMT_QCOW2 : IMG_FMT_RAW;
        io_free(b);
    }
    struct image *bimg = bo.format == IMG_FMT_QCOW2 ? qcow2_open(&f, &bo, depth + 1, msg, sizeof(msg))
                                                    : raw_open(&f, &bo, false, msg, sizeof(msg));
    if (!bimg) {
        file_close(&f);
        close(lock_fd);
        snprintf(err, errlen, "backing file of '%s': %s", q->img.path, msg);
        return -EINVAL;
    }
    q->backing = bimg;
    q->backing_lock_fd = lock_fd;
    return 0;
}

static void qcow2_free(struct qcow2 *q)
{
    qcow2_bitmaps_free(q);
    qcow2_crypto_free(q);
    qcow2_datafile_close(q);
    if (q->backing)
        img_close(q->backing);
    if (q->backing_lock_fd >= 0)
        close(q->backing_lock_fd);
    if (q->snapshots)
        qcow2_snapshots_free(q->snapshots, q->h.nb_snapshots);
    qcow2_cache_free(&q->l2c);
    qcow2_cache_free(&q->rcc);
    qcow2_zw_free(q);
    qcow2_zc_free(q);
    qcow2_ol_free(q);
    while (q->frees_pending) {
        struct deferred_free *d = q->frees_pending;
        q->frees_pending = d->next;
        free(d);
    }
    while (q->frees_ready) {
        struct deferred_free *d = q->frees_ready;
        q->frees_ready = d->next;
        free(d);
    }
    free(q->l1);
    free(q->l1_dirty);
    free(q->reftable);
    free(q->reftable_dirty);
    io_free(q->hdr_buf);
    file_close(&q->file);
    free(q->img.path);
    free(q);
}

static int qcow2_close(struct image *img)
{
    struct qcow2 *q = to_qcow2(img);
    int r = 0;
    if (!img->read_only) {
        /* Dirty bitmaps first: storing them allocates and frees clusters. */
        qcow2_bitmaps_close(q);
        /* Twice: the first flush releases dropped references, the second
         * writes those refcounts, so a clean close leaves no leaks. */
        r = qcow2_flush(q);
        if (r == 0 && (q->frees_ready || qcow2_cache_has_dirty(&q->rcc)))
            r = qcow2_flush(q);
        /* Give back the preallocated tail nothing was allocated in. */
        uint64_t keep = q->host_end > q->open_len ? q->host_end : q->open_len;
        if (r == 0 && q->file_len > keep)
            file_truncate(&q->file, keep);
    }
    qcow2_free(q);
    return r;
}

static int qcow2_img_flush(struct image *img)
{
    return qcow2_flush(to_qcow2(img));
}

static void qcow2_stats(struct image *img, struct img_stats *st)
{
    struct qcow2 *q = to_qcow2(img);
    st->cache_hits = stat_get(&q->l2c.hits) + stat_get(&q->rcc.hits);
    st->cache_misses = stat_get(&q->l2c.misses) + stat_get(&q->rcc.misses);
    st->clusters_allocated = stat_get(&q->clusters_allocated);
    qcow2_zc_stats(q, st);
}

static const struct image_ops qcow2_ops = {
    .name = "qcow2",
    .read = qcow2_co_read,
    .write = qcow2_co_write,
    .flush = qcow2_img_flush,
    .discard = qcow2_co_discard,
    .write_zeroes = qcow2_co_write_zeroes,
    .close = qcow2_close,
    .stats = qcow2_stats,
    .snapshot_list = qcow2_snapshot_list,
    .snapshot_create = qcow2_snapshot_create,
    .snapshot_delete = qcow2_snapshot_delete,
    .snapshot_apply = qcow2_snapshot_apply,
    .resize = qcow2_resize,
};

static uint32_t slices_for(uint64_t bytes, uint32_t slice, uint32_t min)
{
    uint64_t n = bytes / slice;
    if (n < min)
        n = min;
    if (n > (1u << 24))
        n = 1u << 24;
    return (uint32_t)n;
}

struct image *qcow2_open(struct file *f, const struct img_opts *o, int depth, char *err, size_t errlen)
{
    char msg[400];
    int r;
    struct qcow2 *q = calloc(1, sizeof(*q));
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    q->backing_lock_fd = -1;
    q->data_lock_fd = -1;
    q->file = *f;
    q->data = &q->file;
    q->img.ops = &qcow2_ops;
    q->img.priv = q;
    q->img.path = strdup(f->path);
    q->img.read_only = o->read_only;
    q->reqs.next = q->reqs.prev = &q->reqs;
    q->frees_pending_tail = &q->frees_pending;
    q->alloc_lock = (struct co_mutex)CO_MUTEX_INIT;
    q->flush_lock = (struct co_mutex)CO_MUTEX_INIT;

    int64_t fsize = file_size(f);
    if (fsize < 0) {
        snprintf(err, errlen, "%s: cannot stat: %s", f->path, strerror((int)-fsize));
        goto fail_nofile;
    }
    q->host_end = q->file_len = q->open_len = (uint64_t)fsize;

    /* The header cluster: read 4 KiB to learn the cluster size, then all of
     * it (up to 2 MiB) so extensions and the backing name are in view. */
    uint32_t want = 4096;
    q->hdr_buf = io_zalloc(want);
    ssize_t n = file_pread(f, q->hdr_buf, want, 0);
    if (n < 0) {
        snprintf(err, errlen, "%s: cannot read header: %s", f->path, strerror((int)-n));
        goto fail_nofile;
    }
    if (n >= 24) {
        uint32_t cb = be32_load(q->hdr_buf + 20);
        if (cb >= QCOW2_MIN_CLUSTER_BITS && cb <= QCOW2_MAX_CLUSTER_BITS && (1u << cb) > want) {
            want = 1u << cb;
            io_free(q->hdr_buf);
            q->hdr_buf = io_zalloc(want);
            n = file_pread(f, q->hdr_buf, want, 0);
            if (n < 0) {
                snprintf(err, errlen, "%s: cannot read header: %s", f->path, strerror((int)-n));
                goto fail_nofile;
            }
        }
    }
    q->hdr_len = (uint32_t)n;
    /* For check/repair the snapshot table is the checker's business (it may
     * be damaged): parse the header as if it had none; the checker reads the
     * real fields from hdr_buf before anything can rewrite the header. */
    uint8_t sn_fields[12];
    if (o->check && n >= 72) {
        memcpy(sn_fields, q->hdr_buf + 60, sizeof(sn_fields));
        memset(q->hdr_buf + 60, 0, sizeof(sn_fields));
    }
    r = qcow2_header_parse(q->hdr_buf, (size_t)n, (uint64_t)fsize, &q->h, msg, sizeof(msg));
    if (o->check && n >= 72)
        memcpy(q->hdr_buf + 60, sn_fields, sizeof(sn_fields));
    if (r < 0) {
        snprintf(err, errlen, "%s: %s", f->path, msg);
        goto fail_nofile;
    }
    if ((q->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT) && !o->check) {
        if (!o->read_only)
            uq_warn("%s: image is marked corrupt; serving it read-only "
                    "(repair it with 'ublk-qcow2 check -r all')", f->path);
        q->img.read_only = true;
    }
    q->extl2 = q->h.incompatible_features & QCOW2_INCOMPAT_EXTL2;
    q->no_unref = o->discard_no_unref;
    q->img.size = (q->h.size + 511) & ~511ull;

    r = read_table(q, q->h.l1_table_offset, q->h.l1_size, &q->l1);
    q->l1_dirty = calloc(((uint64_t)q->h.l1_size * 8 + 511) / 512 + 1, 1);
    q->reftable_entries = (uint64_t)q->h.refcount_table_clusters * q->h.cluster_size / 8;
    if (r == 0)
        r = read_table(q, q->h.refcount_table_offset, q->reftable_entries, &q->reftable);
    q->reftable_dirty = calloc((q->reftable_entries * 8 + 511) / 512 + 1, 1);
    if (r < 0 || !q->l1_dirty || !q->reftable_dirty) {
        snprintf(err, errlen, "%s: cannot read the L1 or refcount table: %s", f->path, strerror(r < 0 ? -r : ENOMEM));
        goto fail_nofile;
    }
    if (q->h.nb_snapshots && read_snapshots(q, msg, sizeof(msg)) < 0) {
        snprintf(err, errlen, "%s: %s", f->path, msg);
        goto fail_nofile;
    }
    q->data_raw = q->h.autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW;
    if ((q->h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
        qcow2_datafile_open(q, o, msg, sizeof(msg)) < 0) {
        snprintf(err, errlen, "%s: %s", f->path, msg);
        goto fail_nofile;
    }
    if (q->h.crypt_method == QCOW2_CRYPT_LUKS && qcow2_crypto_open(q, o, msg, sizeof(msg)) < 0) {
        snprintf(err, errlen, "%s: %s", f->path, msg);
        goto fail_nofile;
    }
    if (o->snapshot) {
        /* A snapshot is served as it was taken: never written (qemu-nbd -l). */
        if (!o->read_only) {
            snprintf(err, errlen, "%s: a snapshot can only be opened read-only", f->path);
            goto fail_nofile;
        }
        if (qcow2_open_snapshot(q, o->snapshot, msg, sizeof(msg)) < 0) {
            snprintf(err, errlen, "%s: %s", f->path, msg);
            goto fail_nofile;
        }
    }
    /* Where the metadata lies, so that no write can land on it. */
    r = qcow2_ol_build(q);
    if (r < 0) {
        snprintf(err, errlen, "%s: cannot index the image's metadata: %s", f->path, strerror(-r));
        goto fail_nofile;
    }

    /* Metadata cache, bounded by --cache-size.  Default as QEMU: enough L2
     * to map the whole image, up to 32 MiB, and a quarter of that for
     * refcount blocks. */
    uint32_t slice = q->h.cluster_size < 4096 ? (uint32_t)q->h.cluster_size : 4096;
    uint64_t l2_need = ((q->h.size + q->h.cluster_size - 1) >> q->h.cluster_bits) * q->h.l2_entry_size;
    uint64_t l2_bytes, rc_bytes, zc_bytes;
    if (o->cache_size) {
        /* An eighth for decompressed clusters (zcache.c, filled only by
         * compressed reads). */
        rc_bytes = o->cache_size / 4;
        zc_bytes = o->cache_size / 8;
        l2_bytes = o->cache_size - rc_bytes - zc_bytes;
    } else {
        l2_bytes = l2_need < (32u << 20) ? l2_need : (32u << 20);
        rc_bytes = l2_bytes / 4;
        zc_bytes = 8u << 20;
    }
    if (qcow2_cache_init(&q->l2c, q, "L2", true, slice, slices_for(l2_bytes, slice, MIN_L2_SLICES)) < 0 ||
        qcow2_cache_init(&q->rcc, q, "refcount", false, slice, slices_for(rc_bytes, slice, MIN_RC_SLICES)) < 0 ||
        qcow2_zc_init(q, zc_bytes) < 0) {
        snprintf(err, errlen, "%s: out of memory for the metadata cache", f->path);
        goto fail_nofile;
    }

    if (q->h.backing_file[0] && !o->no_backing) {
        chain_paths[depth] = realpath(f->path, NULL);
        r = open_backing(q, o, depth, msg, sizeof(msg));
        free(chain_paths[depth]);
        chain_paths[depth] = NULL;
        if (r < 0) {
            snprintf(err, errlen, "%s", msg);
            goto fail_nofile;
        }
    }

    /* A check leaves the dirty bit and the autoclear bits to the checker
     * (bitmaps stay valid: a repair does not change guest data). */
    if (!q->img.read_only && !o->check) {
        bool header_changed = false;
        /* Dirty bit: refcounts may be stale (lazy refcounts); rebuild them
         * before the first write, as QEMU does on open. */
        if (q->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
            r = qcow2_rebuild_refcounts(q, msg, sizeof(msg));
            if (r < 0) {
                snprintf(err, errlen, "%s: image was not closed cleanly and its refcounts could not be "
                         "repaired: %s", f->path, msg);
                goto fail_nofile;
            }
            q->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
            header_changed = true;
        }
        /* Autoclear bits we do not maintain must be cleared before we
         * write, so no reader trusts data (e.g. dirty bitmaps) we do not
         * keep up to date. */
        if (q->h.autoclear_features & ~QCOW2_AUTOCLEAR_KNOWN) {
            q->h.autoclear_features &= QCOW2_AUTOCLEAR_KNOWN;
            header_changed = true;
        }
        if (header_changed) {
            r = qcow2_write_header_fields(q);
            if (r == 0)
                r = file_sync(&q->file);
            if (r < 0) {
                snprintf(err, errlen, "%s: cannot update the header: %s", f->path, strerror(-r));
                goto fail_nofile;
            }
        }
        if (qcow2_bitmaps_open(q, msg, sizeof(msg)) < 0) {
            snprintf(err, errlen, "%s: persistent dirty bitmaps: %s", f->path, msg);
            goto fail_nofile;
        }
    }
    return &q->img;

fail_nofile:
    /* The caller closes the file it passed in. */
    q->file.fd = -1;
    q->file.path = NULL;
    qcow2_free(q);
    return NULL;
}
