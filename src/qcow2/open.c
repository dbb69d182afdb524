/* Opening a qcow2 image (header, tables, caches, backing chain, repair of a
 * dirty image) and closing it. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "io/imagelock.h"
#include "io/log.h"
#include "io/loop.h"
#include "img/driver.h"
#include "qcow2/internal.h"

#define MAX_BACKING_DEPTH 32
#define MIN_L2_SLICES 128
#define MIN_RC_SLICES 64

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
int qcow2_read_snapshots(struct qcow2 *q, char *err, size_t errlen)
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

#define CHAIN_MSG_MAX 4096
#define CHAIN_PREFIX "backing file of '"

/* The error of q's backing file: "backing file of 'Q': why" when that file
 * itself failed.  A failure further down passes up unchanged (it already
 * names the file at fault), so the root cause is never cut off by one
 * prefix per image of a deep chain; the top image adds where it started. */
static void chain_error(struct qcow2 *q, const struct img_chain *self, const char *msg, char *err,
                        size_t errlen)
{
    bool deeper = !strncmp(msg, CHAIN_PREFIX, strlen(CHAIN_PREFIX)) || !strncmp(msg, "in the backing chain", 20);
    if (!deeper)
        snprintf(err, errlen, CHAIN_PREFIX "%s': %s", q->img.path, msg);
    else if (self->depth == 0)
        snprintf(err, errlen, "in the backing chain of '%s': %s", q->img.path, msg);
    else
        snprintf(err, errlen, "%s", msg);
}

/* Open the backing file of q, linked below `self` (q's place in the chain). */
static int open_backing(struct qcow2 *q, const struct img_opts *o, const struct img_chain *self,
                        char *err, size_t errlen)
{
    char path[PATH_MAX + 1100], msg[CHAIN_MSG_MAX];
    int r = qcow2_resolve_backing(q->img.path, q->h.backing_file, path, sizeof(path), err, errlen);
    if (r < 0)
        return r;
    if (self->depth + 1 > MAX_BACKING_DEPTH) {
        snprintf(err, errlen, "backing chain of '%s' is deeper than %d images", q->img.path, MAX_BACKING_DEPTH);
        return -ELOOP;
    }
    char *real = realpath(path, NULL);
    for (const struct img_chain *c = self; real && c; c = c->up) {
        if (c->real_path && !strcmp(c->real_path, real)) {
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
    bo.chain = self;
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
    struct image *bimg = img_open_file(&f, &bo, msg, sizeof(msg));
    if (!bimg) {
        file_close(&f);
        close(lock_fd);
        chain_error(q, self, msg, err, errlen);
        return -EINVAL;
    }
    q->backing = bimg;
    q->backing_lock_fd = lock_fd;
    return 0;
}

/* The backing chain below q (unless o->no_backing). */
static int open_backing_chain(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen)
{
    if (!q->h.backing_file[0] || o->no_backing)
        return 0;
    struct img_chain self = {
        .real_path = realpath(q->img.path, NULL),
        .up = o->chain,
        .depth = o->chain ? o->chain->depth + 1 : 0,
    };
    int r = open_backing(q, o, &self, err, errlen);
    free((char *)self.real_path);
    return r;
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
    qcow2_hints_free(q);    /* they point into the L2 cache */
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

static struct image *qcow2_backing(struct image *img)
{
    return to_qcow2(img)->backing;
}

static const char *qcow2_data_file(struct image *img)
{
    struct qcow2 *q = to_qcow2(img);
    return has_data_file(q) ? q->data_file.path : NULL;
}

static const struct image_ops qcow2_ops = {
    .name = "qcow2",
    .read = qcow2_co_read,
    .write = qcow2_co_write,
    .flush = qcow2_img_flush,
    .discard = qcow2_co_discard,
    .write_zeroes = qcow2_co_write_zeroes,
    .map = qcow2_co_map,
    .map_end = qcow2_co_map_end,
    .close = qcow2_close,
    .stats = qcow2_stats,
    .snapshot_list = qcow2_snapshot_list,
    .snapshot_create = qcow2_snapshot_create,
    .snapshot_delete = qcow2_snapshot_delete,
    .snapshot_apply = qcow2_snapshot_apply,
    .resize = qcow2_resize,
    .backing = qcow2_backing,
    .data_file = qcow2_data_file,
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

struct qcow2 *qcow2_alloc(struct file *f, const struct img_opts *o, char *err, size_t errlen)
{
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
    return q;
}

void qcow2_abandon(struct qcow2 *q)
{
    /* The caller closes the file it passed in. */
    q->file.fd = -1;
    q->file.path = NULL;
    qcow2_free(q);
}

/* The header cluster: read 4 KiB to learn the cluster size, then all of it
 * (up to 2 MiB) so extensions and the backing name are in view. */
static int read_header_cluster(struct qcow2 *q, char *err, size_t errlen)
{
    struct file *f = &q->file;
    uint32_t want = 4096;
    q->hdr_buf = io_zalloc(want);
    ssize_t n = file_pread(f, q->hdr_buf, want, 0);
    if (n >= 24) {
        uint32_t cb = be32_load(q->hdr_buf + 20);
        if (cb >= QCOW2_MIN_CLUSTER_BITS && cb <= QCOW2_MAX_CLUSTER_BITS && (1u << cb) > want) {
            want = 1u << cb;
            io_free(q->hdr_buf);
            q->hdr_buf = io_zalloc(want);
            n = file_pread(f, q->hdr_buf, want, 0);
        }
    }
    if (n < 0) {
        snprintf(err, errlen, "%s: cannot read header: %s", f->path, strerror((int)-n));
        return (int)n;
    }
    q->hdr_len = (uint32_t)n;
    return 0;
}

int qcow2_read_header(struct qcow2 *q, bool without_snapshots, char *err, size_t errlen)
{
    char msg[400];
    const char *path = q->file.path;
    int64_t fsize = file_size(&q->file);
    if (fsize < 0) {
        snprintf(err, errlen, "%s: cannot stat: %s", path, strerror((int)-fsize));
        return (int)fsize;
    }
    q->host_end = q->file_len = q->open_len = (uint64_t)fsize;
    int r = read_header_cluster(q, err, errlen);
    if (r < 0)
        return r;
    /* The checker parses the header as if there were no snapshot table (it
     * may be damaged) and reads the real fields from hdr_buf itself. */
    uint8_t sn_fields[12];
    bool hide = without_snapshots && q->hdr_len >= 72;
    if (hide) {
        memcpy(sn_fields, q->hdr_buf + 60, sizeof(sn_fields));
        memset(q->hdr_buf + 60, 0, sizeof(sn_fields));
    }
    if (q->hdr_len < 4 || be32_load(q->hdr_buf) != QCOW2_MAGIC) {
        snprintf(err, errlen, "%s is not a qcow2 image (it does not start with the qcow2 magic); "
                 "for a raw image give -f raw, or leave -f out to probe the format", path);
        return -EINVAL;
    }
    r = qcow2_header_parse(q->hdr_buf, q->hdr_len, (uint64_t)fsize, &q->h, msg, sizeof(msg));
    if (hide)
        memcpy(q->hdr_buf + 60, sn_fields, sizeof(sn_fields));
    if (r < 0) {
        snprintf(err, errlen, "%s: %s", path, msg);
        return r;
    }
    q->extl2 = q->h.incompatible_features & QCOW2_INCOMPAT_EXTL2;
    q->img.size = (q->h.size + 511) & ~511ull;
    return 0;
}

/* The active L1 and the refcount table, with their dirty-sector maps. */
static int load_tables(struct qcow2 *q, char *err, size_t errlen)
{
    int r = read_table(q, q->h.l1_table_offset, q->h.l1_size, &q->l1);
    q->l1_dirty = calloc(((uint64_t)q->h.l1_size * 8 + 511) / 512 + 1, 1);
    q->reftable_entries = (uint64_t)q->h.refcount_table_clusters * q->h.cluster_size / 8;
    if (r == 0)
        r = read_table(q, q->h.refcount_table_offset, q->reftable_entries, &q->reftable);
    q->reftable_dirty = calloc((q->reftable_entries * 8 + 511) / 512 + 1, 1);
    if (r < 0 || !q->l1_dirty || !q->reftable_dirty) {
        snprintf(err, errlen, "%s: cannot read the L1 or refcount table: %s", q->file.path,
                 strerror(r < 0 ? -r : ENOMEM));
        return r < 0 ? r : -ENOMEM;
    }
    return 0;
}

/* Snapshot table, data file, encryption, and a snapshot to serve instead of
 * the active image. */
static int open_features(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen)
{
    char msg[400];
    const char *path = q->file.path;
    int r = 0;
    if (q->h.nb_snapshots && (r = qcow2_read_snapshots(q, msg, sizeof(msg))) < 0)
        goto fail;
    q->data_raw = q->h.autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW;
    if ((q->h.incompatible_features & QCOW2_INCOMPAT_DATA_FILE) &&
        (r = qcow2_datafile_open(q, o, msg, sizeof(msg))) < 0)
        goto fail;
    if (q->h.crypt_method == QCOW2_CRYPT_LUKS && (r = qcow2_crypto_open(q, o, msg, sizeof(msg))) < 0)
        goto fail;
    if (o->snapshot) {
        /* A snapshot is served as it was taken: never written (qemu-nbd -l). */
        if (!o->read_only) {
            snprintf(err, errlen, "%s: a snapshot can only be opened read-only", path);
            return -EINVAL;
        }
        if ((r = qcow2_open_snapshot(q, o->snapshot, msg, sizeof(msg))) < 0)
            goto fail;
    }
    return 0;
fail:
    snprintf(err, errlen, "%s: %s", path, msg);
    return r;
}

/* Metadata cache, bounded by --cache-size.  Default as QEMU: enough L2 to
 * map the whole image, up to 32 MiB, and a quarter of that for refcount
 * blocks. */
static int init_caches(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen)
{
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
        snprintf(err, errlen, "%s: out of memory for the metadata cache", q->file.path);
        return -ENOMEM;
    }
    return 0;
}

int qcow2_load_metadata(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen)
{
    q->no_unref = o->discard_no_unref;
    int r = load_tables(q, err, errlen);
    if (r == 0)
        r = open_features(q, o, err, errlen);
    if (r < 0)
        return r;
    /* Where the metadata lies, so that no write can land on it. */
    r = qcow2_ol_build(q);
    if (r < 0) {
        snprintf(err, errlen, "%s: cannot index the image's metadata: %s", q->file.path, strerror(-r));
        return r;
    }
    return init_caches(q, o, err, errlen);
}

/* Before the first write: repair a dirty image, clear the autoclear bits
 * we do not maintain, and load the dirty bitmaps we keep up to date. */
static int prepare_writes(struct qcow2 *q, char *err, size_t errlen)
{
    char msg[400];
    const char *path = q->file.path;
    bool header_changed = false;
    int r;
    /* Dirty bit: refcounts may be stale (lazy refcounts); rebuild them
     * before the first write, as QEMU does on open. */
    if (q->h.incompatible_features & QCOW2_INCOMPAT_DIRTY) {
        r = qcow2_rebuild_refcounts(q, msg, sizeof(msg));
        if (r < 0) {
            snprintf(err, errlen, "%s: image was not closed cleanly and its refcounts could not be "
                     "repaired: %s", path, msg);
            return r;
        }
        q->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
        header_changed = true;
    }
    /* Autoclear bits we do not maintain must be cleared before we write,
     * so no reader trusts data (e.g. dirty bitmaps) we do not keep up to
     * date. */
    if (q->h.autoclear_features & ~QCOW2_AUTOCLEAR_KNOWN) {
        q->h.autoclear_features &= QCOW2_AUTOCLEAR_KNOWN;
        header_changed = true;
    }
    if (header_changed) {
        r = qcow2_write_header_fields(q);
        if (r == 0)
            r = file_sync(&q->file);
        if (r < 0) {
            snprintf(err, errlen, "%s: cannot update the header: %s", path, strerror(-r));
            return r;
        }
    }
    if (qcow2_bitmaps_open(q, msg, sizeof(msg)) < 0) {
        snprintf(err, errlen, "%s: persistent dirty bitmaps: %s", path, msg);
        return -EINVAL;
    }
    return 0;
}

static struct image *qcow2_open(struct file *f, const struct img_opts *o, bool probed, char *err,
                                size_t errlen)
{
    struct qcow2 *q = qcow2_alloc(f, o, err, errlen);
    if (!q)
        return NULL;
    int r = qcow2_read_header(q, false, err, errlen);
    if (r == 0 && (q->h.incompatible_features & QCOW2_INCOMPAT_CORRUPT)) {
        if (!o->read_only)
            uq_warn("%s: image is marked corrupt; serving it read-only "
                    "(repair it with 'ublk-qcow2 check -r all')", f->path);
        q->img.read_only = true;
    }
    if (r == 0)
        r = qcow2_load_metadata(q, o, err, errlen);
    if (r == 0)
        r = open_backing_chain(q, o, err, errlen);
    if (r == 0 && !q->img.read_only)
        r = prepare_writes(q, err, errlen);
    if (r < 0) {
        qcow2_abandon(q);
        return NULL;
    }
    return &q->img;
}

static bool qcow2_probe(const uint8_t *head, size_t len)
{
    return len >= 4 && be32_load(head) == QCOW2_MAGIC;
}

const struct img_driver img_qcow2_driver = {
    .format = IMG_FMT_QCOW2,
    .name = "qcow2",
    .probe = qcow2_probe,
    .open = qcow2_open,
};
