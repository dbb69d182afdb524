/* Image creation (qemu-img create's job), with its option rules and defaults.
 *
 * A qcow2 image is laid out up front, in cluster units:
 *   0 header | refcount table | refcount blocks | L1 table |
 *   with preallocation: each L2 table followed by the data clusters it maps.
 * Without preallocation, one refcount table cluster and one block (every
 * image up to a few TiB at 64 KiB clusters), this is exactly the file
 * qemu-img create writes; otherwise QEMU's allocator places refcount blocks
 * differently, but the result has the same meaning and the same options.
 * Everything except the header is written first, the header last, then one
 * fsync: until the header is written the file is not a qcow2 image at all. */
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
#include "io/loop.h"
#include "qcow2/internal.h"
#include "tools/tools.h"

#define V3_HEADER_LENGTH 112        /* what QEMU writes: fields up to compression_type, padded */
#define FEATURE_TABLE_ENTRIES 8
#define ZERO_CHUNK (4u << 20)

int tools_fail(int ret, char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
    return ret;
}

void create_opts_init(struct create_opts *o)
{
    memset(o, 0, sizeof(*o));
    o->format = IMG_FMT_QCOW2;
    o->cluster_size = 65536;
    o->version = 3;
    o->refcount_bits = 16;
    o->compression = QCOW2_COMP_ZLIB;
    o->prealloc = PREALLOC_OFF;
}

const char *prealloc_name(enum prealloc_mode m)
{
    static const char *const names[] = { "off", "metadata", "falloc", "full" };
    return names[m];
}

static bool pow2(uint64_t v) { return v && !(v & (v - 1)); }
static uint64_t div_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }
static uint32_t log2u(uint64_t v) { return 63 - (uint32_t)__builtin_clzll(v); }

/* The qemu-img create rules for qcow2 options that do not need the disk. */
static int validate_qcow2(const struct create_opts *o, char *err, size_t errlen)
{
    if (!pow2(o->cluster_size) || o->cluster_size < (1u << QCOW2_MIN_CLUSTER_BITS) ||
        o->cluster_size > (1u << QCOW2_MAX_CLUSTER_BITS))
        return tools_fail(-EINVAL, err, errlen, "Cluster size must be a power of two between 512 and 2048k");
    if (!pow2(o->refcount_bits) || o->refcount_bits > 64)
        return tools_fail(-EINVAL, err, errlen, "Refcount width must be a power of two and may not exceed 64 bits");
    if (o->version == 2) {
        const char *what = o->refcount_bits != 16 ? "Different refcount widths than 16 bits require"
                         : o->lazy_refcounts ? "Lazy refcounts require"
                         : o->extended_l2 ? "Extended L2 entries require"
                         : o->compression != QCOW2_COMP_ZLIB ? "Non-zlib compression types require" : NULL;
        if (what)
            return tools_fail(-EINVAL, err, errlen, "%s compatibility level 1.1 or above (use compat=1.1)", what);
    }
    if (o->extended_l2 && o->cluster_size < (1u << 14))
        return tools_fail(-EINVAL, err, errlen,
                    "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes");
    if (o->backing_file && o->prealloc != PREALLOC_OFF && !o->extended_l2)
        return tools_fail(-EINVAL, err, errlen,
                    "Backing file and preallocation can only be used at the same time if extended_l2 is on");
    if (o->backing_file && strlen(o->backing_file) > QCOW2_MAX_BACKING_NAME)
        return tools_fail(-EINVAL, err, errlen, "Backing file name too long (more than %d bytes)",
                    QCOW2_MAX_BACKING_NAME);
    return 0;
}

/* The backing file must open (as QEMU checks), and gives the size when
 * none was given.  Its name is resolved against the new image's directory. */
static int check_backing(const char *path, const struct create_opts *o, uint64_t *size,
                         char *err, size_t errlen)
{
    char bpath[PATH_MAX + 1100], msg[600];
    int r = qcow2_resolve_backing(path, o->backing_file, bpath, sizeof(bpath), msg, sizeof(msg));
    if (r < 0)
        return tools_fail(r, err, errlen, "%s", msg);
    struct img_opts bo = { .format = IMG_FMT_AUTO, .read_only = true, .cache = FILE_CACHE_BUFFERED };
    if (!o->backing_fmt) {
        const char *detected = "";
        struct image *b = img_open(bpath, &bo, msg, sizeof(msg));
        if (b) {
            detected = img_format_name(b);
            img_close(b);
        }
        return tools_fail(-EINVAL, err, errlen, "Backing file specified without backing format%s%s%s "
                    "(give it with -F or -o backing_fmt=)", *detected ? " (detected format: " : "",
                    detected, *detected ? ")" : "");
    }
    if (!strcmp(o->backing_fmt, "qcow2"))
        bo.format = IMG_FMT_QCOW2;
    else if (!strcmp(o->backing_fmt, "raw"))
        bo.format = IMG_FMT_RAW;
    else
        return tools_fail(-ENOTSUP, err, errlen, "backing format '%s' is not supported (qcow2 or raw)",
                    o->backing_fmt);
    struct image *b = img_open(bpath, &bo, msg, sizeof(msg));
    if (!b)
        return tools_fail(-ENOENT, err, errlen, "Could not open backing image: %s", msg);
    if (!o->size_set)
        *size = img_size(b);
    img_close(b);
    return 0;
}

/* The header cluster: fixed fields, the backing format and feature name
 * table extensions, the end marker, then the backing file name. */
static int build_header(uint8_t *buf, const struct create_opts *o, const struct qcow2_header *h,
                        char *err, size_t errlen)
{
    static const struct { uint8_t type, bit; const char *name; } features[FEATURE_TABLE_ENTRIES] = {
        { 0, 0, "dirty bit" }, { 0, 1, "corrupt bit" }, { 0, 2, "external data file" },
        { 0, 3, "compression type" }, { 0, 4, "extended L2 entries" },
        { 1, 0, "lazy refcounts" }, { 2, 0, "bitmaps" }, { 2, 1, "raw external data" },
    };
    uint64_t cs = h->cluster_size;
    qcow2_header_store(h, buf);
    size_t pos = o->version >= 3 ? V3_HEADER_LENGTH : QCOW2_V2_HEADER_LEN;
    size_t need = pos + 8 + (o->backing_fmt ? 8 + ((strlen(o->backing_fmt) + 7) & ~7u) : 0) +
                  (o->backing_file ? strlen(o->backing_file) : 0);
    if (need > cs)
        return tools_fail(-EINVAL, err, errlen, "the backing file name does not fit in a %llu-byte header cluster",
                    (unsigned long long)cs);
    if (o->backing_file && o->backing_fmt) {
        size_t n = strlen(o->backing_fmt);
        be32_store(buf + pos, QCOW2_EXT_BACKING_FORMAT);
        be32_store(buf + pos + 4, (uint32_t)n);
        memcpy(buf + pos + 8, o->backing_fmt, n);
        pos += 8 + ((n + 7) & ~(size_t)7);
    }
    /* QEMU writes the feature name table only into v3 headers of clusters
     * larger than 4 KiB; we do the same so the header bytes match. */
    if (o->version >= 3 && cs > 4096 && need + 8 + FEATURE_TABLE_ENTRIES * 48 <= cs) {
        be32_store(buf + pos, QCOW2_EXT_FEATURE_TABLE);
        be32_store(buf + pos + 4, FEATURE_TABLE_ENTRIES * 48);
        for (int i = 0; i < FEATURE_TABLE_ENTRIES; i++) {
            uint8_t *e = buf + pos + 8 + i * 48;
            e[0] = features[i].type;
            e[1] = features[i].bit;
            memcpy(e + 2, features[i].name, strlen(features[i].name));
        }
        pos += 8 + FEATURE_TABLE_ENTRIES * 48;
    }
    pos += 8;   /* end of extensions: type 0, length 0 (already zero) */
    if (o->backing_file) {
        size_t n = strlen(o->backing_file);
        memcpy(buf + pos, o->backing_file, n);
        be64_store(buf + 8, pos);
        be32_store(buf + 16, (uint32_t)n);
    }
    return 0;
}

static int write_all(struct file *f, const void *buf, size_t len, uint64_t off)
{
    ssize_t n = file_pwrite(f, buf, len, off, false);
    return n < 0 ? (int)n : 0;
}

/* Write zeros over [off, off+len) (preallocation=full), reporting progress. */
static int write_zeros(struct file *f, uint64_t off, uint64_t len, const struct create_opts *o,
                       uint64_t *done, uint64_t total)
{
    static uint8_t zeros[ZERO_CHUNK];
    while (len) {
        size_t n = len < ZERO_CHUNK ? (size_t)len : ZERO_CHUNK;
        int r = write_all(f, zeros, n, off);
        if (r < 0)
            return r;
        off += n;
        len -= n;
        *done += n;
        if (o->progress)
            o->progress(o->progress_ctx, *done, total);
    }
    return 0;
}

static int preallocate_file(struct file *f, uint64_t len, char *err, size_t errlen)
{
    int r = file_allocate(f, 0, len);
    if (r == -EOPNOTSUPP)
        return tools_fail(r, err, errlen, "preallocation=falloc is not supported by this file system "
                    "(use preallocation=full)");
    return r < 0 ? tools_fail(r, err, errlen, "cannot preallocate: %s", strerror(-r)) : 0;
}

static int create_raw(struct file *f, const struct create_opts *o, uint64_t size, char *err, size_t errlen)
{
    int r = 0;
    if (o->prealloc == PREALLOC_METADATA)
        return tools_fail(-EINVAL, err, errlen, "Unsupported preallocation mode: metadata (raw: off, falloc or full)");
    if (o->prealloc == PREALLOC_FALLOC) {
        r = preallocate_file(f, size, err, errlen);
    } else if (o->prealloc == PREALLOC_FULL) {
        uint64_t done = 0;
        r = write_zeros(f, 0, size, o, &done, size);
    }
    if (r == 0)
        r = file_truncate(f, size);
    /* As qemu-img does, the first block is written (zeros), so that it is
     * allocated: block-size probing for O_DIRECT can read it. */
    if (r == 0 && o->prealloc == PREALLOC_OFF && size) {
        static const uint8_t zeros[4096];
        r = write_all(f, zeros, size < sizeof(zeros) ? size : sizeof(zeros), 0);
    }
    return r;
}

static int create_qcow2(struct file *f, const struct create_opts *o, uint64_t size, char *err, size_t errlen)
{
    struct qcow2_header h;
    memset(&h, 0, sizeof(h));
    h.version = o->version;
    h.cluster_bits = log2u(o->cluster_size);
    h.cluster_size = o->cluster_size;
    h.size = size;
    h.refcount_order = log2u(o->refcount_bits);
    h.header_length = o->version >= 3 ? V3_HEADER_LENGTH : QCOW2_V2_HEADER_LEN;
    if (o->extended_l2)
        h.incompatible_features |= QCOW2_INCOMPAT_EXTL2;
    if (o->compression == QCOW2_COMP_ZSTD) {
        h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
        h.compression_type = QCOW2_COMP_ZSTD;
    }
    if (o->lazy_refcounts)
        h.compatible_features |= QCOW2_COMPAT_LAZY_REFCOUNTS;

    uint64_t cs = o->cluster_size;
    uint64_t entry = o->extended_l2 ? 16 : 8, l2_entries = cs / entry;
    uint64_t span = cs * l2_entries;                 /* guest bytes one L2 table maps */
    uint64_t l1_size = div_up(size, span);
    if (l1_size * 8 > QCOW2_MAX_L1_BYTES)
        return tools_fail(-EFBIG, err, errlen, "The image size is too large for file format 'qcow2' "
                    "(try using a larger cluster size)");
    bool prealloc = o->prealloc != PREALLOC_OFF;
    uint64_t l1_clusters = div_up(l1_size * 8, cs);
    uint64_t data = prealloc ? div_up(size, cs) : 0, l2_tables = prealloc ? l1_size : 0;
    uint64_t fixed = 1 + l1_clusters + l2_tables + data;
    /* Refcount blocks and table clusters that count themselves too. */
    uint64_t rbe = cs * 8 / o->refcount_bits, nblocks = 1, ntable = 1;
    for (;;) {
        uint64_t b = div_up(fixed + nblocks + ntable, rbe), t = div_up(b * 8, cs);
        if (b == nblocks && t == ntable)
            break;
        nblocks = b;
        ntable = t;
    }
    if (ntable * cs > QCOW2_MAX_REFTABLE_BYTES)
        return tools_fail(-EFBIG, err, errlen, "The image is too large for its refcount table at this cluster size "
                    "(try using a larger cluster size)");
    uint64_t total = fixed + nblocks + ntable;
    uint64_t first_block = 1 + ntable, l1_cluster = first_block + nblocks, area = l1_cluster + l1_clusters;

    h.l1_size = (uint32_t)l1_size;
    h.l1_table_offset = l1_size ? l1_cluster * cs : 0;
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = (uint32_t)ntable;

    /* Refcount table and blocks: every cluster of the layout counts once. */
    uint8_t *meta = io_zalloc((ntable + nblocks) * cs);
    for (uint64_t b = 0; b < nblocks; b++)
        be64_store(meta + b * 8, (first_block + b) * cs);
    for (uint64_t c = 0; c < total; c++)
        qcow2_refcount_set(meta + (ntable + c / rbe) * cs, h.refcount_order, c % rbe, 1);
    int r = write_all(f, meta, (ntable + nblocks) * cs, cs);
    io_free(meta);

    /* L1 (naming each L2 table when preallocated), then the L2 tables, each
     * mapping the data clusters right after it. */
    uint8_t *l1 = io_zalloc(l1_size * 8 + 8);
    uint8_t *l2 = io_alloc(cs);
    uint64_t c = area, left = data;
    uint64_t progress_total = o->prealloc == PREALLOC_FULL ? data * cs : l2_tables, done = 0;
    for (uint64_t i = 0; i < l2_tables && r == 0; i++) {
        uint64_t l2_cluster = c++, n = left < l2_entries ? left : l2_entries;
        be64_store(l1 + i * 8, QCOW_OFLAG_COPIED | l2_cluster * cs);
        memset(l2, 0, cs);
        /* Preallocated data clusters are plain allocated clusters, as QEMU
         * makes them (extended L2: no subcluster allocated yet). */
        for (uint64_t j = 0; j < n; j++)
            be64_store(l2 + j * entry, QCOW_OFLAG_COPIED | (c + j) * cs);
        r = write_all(f, l2, cs, l2_cluster * cs);
        if (r == 0 && o->prealloc == PREALLOC_FULL)
            r = write_zeros(f, c * cs, n * cs, o, &done, progress_total);
        else if (r == 0 && o->progress)
            o->progress(o->progress_ctx, ++done, progress_total);
        c += n;
        left -= n;
    }
    io_free(l2);
    if (r == 0 && l1_size)
        r = write_all(f, l1, l1_size * 8, l1_cluster * cs);
    io_free(l1);
    if (r == 0 && prealloc)
        r = file_truncate(f, total * cs);
    if (r == 0 && o->prealloc == PREALLOC_FALLOC)
        r = preallocate_file(f, total * cs, err, errlen);

    if (r == 0) {
        uint8_t *hdr = io_zalloc(cs);
        r = build_header(hdr, o, &h, err, errlen);
        if (r == 0)
            r = write_all(f, hdr, cs, 0);
        io_free(hdr);
    }
    return r;
}

int img_create(const char *path, const struct create_opts *o, char *err, size_t errlen)
{
    uint64_t size = o->size;
    int r = 0;
    err[0] = '\0';
    if (o->format == IMG_FMT_QCOW2) {
        r = validate_qcow2(o, err, errlen);
        if (r == 0 && o->backing_file)
            r = check_backing(path, o, &size, err, errlen);
        if (r < 0)
            return r;
    } else if (o->backing_file) {
        return tools_fail(-EINVAL, err, errlen, "raw images cannot have a backing file");
    }
    if (!o->size_set && !o->backing_file)
        return tools_fail(-EINVAL, err, errlen, "Image creation needs a size parameter");
    if (size > (1ull << 63) - 512)
        return tools_fail(-EFBIG, err, errlen, "Image size must be less than 8 EiB");
    size = (size + 511) & ~511ull;   /* QEMU rounds the size up to whole sectors */

    /* An existing image is overwritten, as qemu-img does, but never one that
     * QEMU or our daemon has open: take its write lock first. */
    char msg[600];
    int lock_fd = -1;
    struct stat st;
    bool existed = stat(path, &st) == 0;
    if (existed && !S_ISREG(st.st_mode))
        return tools_fail(-EINVAL, err, errlen, "%s exists and is not a regular file", path);
    if (existed) {
        lock_fd = image_lock(path, true, msg, sizeof(msg));
        if (lock_fd == -EBUSY)
            return tools_fail(-EBUSY, err, errlen, "%s", msg);
    }
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        r = -errno;
        if (lock_fd >= 0)
            close(lock_fd);
        return tools_fail(r, err, errlen, "cannot create %s: %s", path, strerror(-r));
    }
    close(fd);
    struct file f;
    r = file_open(&f, path, true, FILE_CACHE_BUFFERED, msg, sizeof(msg));
    if (r < 0) {
        tools_fail(r, err, errlen, "%s", msg);
    } else {
        r = o->format == IMG_FMT_RAW ? create_raw(&f, o, size, err, errlen)
                                     : create_qcow2(&f, o, size, err, errlen);
        if (r == 0)
            r = file_sync(&f);
        if (r < 0 && !err[0])
            tools_fail(r, err, errlen, "writing %s failed: %s", path, strerror(-r));
        file_close(&f);
    }
    if (r < 0 && !existed)
        unlink(path);
    if (lock_fd >= 0)
        close(lock_fd);
    return r;
}
