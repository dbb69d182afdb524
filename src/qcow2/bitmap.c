/* Persistent dirty bitmaps (docs/interop/qcow2.txt, "Bitmaps"), kept up to
 * date so that QEMU-based incremental backup stays valid for images we serve.
 *
 * At a read-write open every enabled bitmap (flag auto) that is consistent
 * (not in_use) is loaded into memory and flagged in_use in the bitmap
 * directory, as QEMU flags the bitmaps of an image it has open for writing:
 * if we crash, QEMU finds them in_use and treats them as inconsistent, never
 * as silently stale.  Every write, write-zeroes and discard sets the bits of
 * the range it covers (before it changes anything).  A clean close writes
 * each bitmap to new clusters with a new bitmap table, then rewrites the
 * directory in place with the new tables and in_use cleared, and only then
 * frees the old tables.  Disabled bitmaps and bitmaps already in_use are
 * never touched.
 *
 * The directory is rewritten in place the way QEMU does it
 * (update_ext_header_and_dir_in_place): autoclear bit 0 cleared and synced,
 * directory written and synced, bit set again and synced.  While the bit is
 * clear, QEMU ignores (and drops) the whole extension, so no crash point
 * leaves a half-written directory trusted; at worst clusters leak. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/log.h"
#include "io/loop.h"
#include "qcow2/internal.h"

/* Limits as QEMU's (block/qcow2-bitmap.c, block/qcow2.h). */
#define BM_MAX_BITMAPS 65535
#define BM_MAX_DIR_SIZE (1024ull * BM_MAX_BITMAPS)
#define BM_MAX_TABLE_SIZE 0x8000000u
#define BM_MAX_PHYS_SIZE 0x20000000ull
#define BM_MIN_GRAN_BITS 9
#define BM_MAX_GRAN_BITS 31
#define BM_MAX_NAME 1023
#define BM_ENTRY_FIXED 24
#define BM_FLAG_IN_USE (1u << 0)
#define BM_FLAG_AUTO (1u << 1)
#define BM_RESERVED_FLAGS 0xfffffffcu     /* QEMU knows no extra data: bit 2 is refused too */
#define BM_TYPE_DIRTY 1
#define BMT_RESERVED_MASK 0xff000000000001feull
#define BMT_OFFSET_MASK 0x00fffffffffffe00ull
#define BMT_ALL_ONES 1ull

struct tracked {
    char *name;
    uint32_t entry;             /* byte offset of its directory entry */
    uint32_t gran_bits;
    uint64_t nbits;
    uint8_t *bits;              /* LSB first, as stored */
    uint64_t *old_table;        /* host endian; freed once the new one is in place */
    uint64_t old_table_off;
    uint32_t table_size;        /* entries */
    uint64_t new_table_off;
    uint64_t *new_table;
    struct tracked *next;
};

struct bitmaps {
    uint8_t *dir;               /* the directory as on disk */
    uint64_t dir_off, dir_size;
    struct tracked *list;
};

static void free_tracked(struct tracked *t)
{
    free(t->name);
    free(t->bits);
    free(t->old_table);
    free(t->new_table);
    free(t);
}

void qcow2_bitmaps_free(struct qcow2 *q)
{
    struct bitmaps *b = q->bitmaps;
    if (!b)
        return;
    while (b->list) {
        struct tracked *t = b->list;
        b->list = t->next;
        free_tracked(t);
    }
    free(b->dir);
    free(b);
    q->bitmaps = NULL;
}

static bool inside_file(struct qcow2 *q, uint64_t off, uint64_t len)
{
    return off <= q->host_end && len <= q->host_end - off;
}

/* Read len bytes at off (any alignment) or fail. */
static int read_exact(struct qcow2 *q, void *buf, uint64_t len, uint64_t off)
{
    ssize_t n = file_pread_any(&q->file, buf, len, off);
    if (n < 0)
        return (int)n;
    return (uint64_t)n == len ? 0 : -EIO;
}

/* Table entries needed for a bitmap of granularity 2^g over the disk. */
static uint64_t table_entries(struct qcow2 *q, uint32_t g)
{
    uint64_t nbits = (q->h.size + (1ull << g) - 1) >> g;
    uint64_t bytes = (nbits + 7) / 8;
    return (bytes + cl_size(q) - 1) / cl_size(q);
}

static int load_bits(struct qcow2 *q, struct tracked *t, char *err, size_t errlen)
{
    uint64_t cs = cl_size(q), bytes = (t->nbits + 7) / 8;
    t->old_table = calloc(t->table_size, 8);
    t->bits = calloc(bytes ? bytes : 1, 1);
    uint8_t *cl = io_alloc(cs);
    int r = !t->old_table || !t->bits ? -ENOMEM : 0;
    if (r == 0 && !inside_file(q, t->old_table_off, (uint64_t)t->table_size * 8)) {
        snprintf(err, errlen, "bitmap '%s': its table lies outside the image", t->name);
        r = -EINVAL;
    }
    if (r == 0)
        r = read_exact(q, t->old_table, (uint64_t)t->table_size * 8, t->old_table_off);
    for (uint32_t i = 0; r == 0 && i < t->table_size; i++) {
        uint64_t e = t->old_table[i] = be64_load(&t->old_table[i]);
        uint64_t off = e & BMT_OFFSET_MASK, from = i * cs;
        uint64_t n = bytes - from < cs ? bytes - from : cs;
        if ((e & BMT_RESERVED_MASK) || (off && ((e & BMT_ALL_ONES) || (off & (cs - 1)))) ||
            (off && !inside_file(q, off, cs))) {
            snprintf(err, errlen, "bitmap '%s': table entry %u is invalid (0x%llx)", t->name, i,
                     (unsigned long long)e);
            r = -EINVAL;
        } else if (off) {
            r = read_exact(q, cl, cs, off);
            if (r == 0)
                memcpy(t->bits + from, cl, n);
        } else if (e & BMT_ALL_ONES) {
            memset(t->bits + from, 0xff, n);
        }
    }
    /* Bits past the end of the disk stay clear (they are written as zeros). */
    if (r == 0 && t->nbits % 8)
        t->bits[bytes - 1] &= (uint8_t)((1u << (t->nbits % 8)) - 1);
    io_free(cl);
    if (r < 0 && !err[0])
        snprintf(err, errlen, "cannot read bitmap '%s': %s", t->name, strerror(-r));
    return r;
}

/* Parse and check the directory as QEMU does (bitmap_list_load,
 * check_dir_entry); QEMU refuses to open an image whose directory fails
 * these checks, and so do we. */
static int parse_directory(struct qcow2 *q, struct bitmaps *b, char *err, size_t errlen)
{
    const struct qcow2_header *h = &q->h;
    uint32_t seen = 0;
    uint64_t p = 0;
    while (p < b->dir_size) {
        const uint8_t *e = b->dir + p;
        if (b->dir_size - p < BM_ENTRY_FIXED) {
            snprintf(err, errlen, "bitmap directory is broken (entry %u truncated)", seen);
            return -EINVAL;
        }
        uint64_t toff = be64_load(e);
        uint32_t tsize = be32_load(e + 8), flags = be32_load(e + 12);
        uint8_t type = e[16], g = e[17];
        uint16_t nlen = be16_load(e + 18);
        uint32_t extra = be32_load(e + 20);
        uint64_t esize = (BM_ENTRY_FIXED + (uint64_t)extra + nlen + 7) & ~7ull;
        if (esize > b->dir_size - p) {
            snprintf(err, errlen, "bitmap directory is broken (entry %u runs past its end)", seen);
            return -EINVAL;
        }
        if (++seen > h->bitmaps_nb) {
            snprintf(err, errlen, "more bitmaps in the directory than the header says (%u)", h->bitmaps_nb);
            return -EINVAL;
        }
        char name[BM_MAX_NAME + 1];
        size_t n = nlen < BM_MAX_NAME ? nlen : BM_MAX_NAME;
        memcpy(name, e + BM_ENTRY_FIXED + extra, n);
        name[n] = '\0';
        uint64_t phys = (uint64_t)tsize * cl_size(q);
        if (extra) {
            snprintf(err, errlen, "bitmap '%s' has extra data, which QEMU does not support either", name);
            return -ENOTSUP;
        }
        if (!tsize || !toff || (toff & (cl_size(q) - 1)) || tsize > BM_MAX_TABLE_SIZE ||
            g > BM_MAX_GRAN_BITS || g < BM_MIN_GRAN_BITS || (flags & BM_RESERVED_FLAGS) ||
            !nlen || nlen > BM_MAX_NAME || type != BM_TYPE_DIRTY || phys > BM_MAX_PHYS_SIZE ||
            (!(flags & BM_FLAG_IN_USE) && h->size > ((phys * 8) << g))) {
            snprintf(err, errlen, "bitmap '%s' does not satisfy the format's constraints", name);
            return -EINVAL;
        }
        /* Enabled and consistent: ours to keep up to date. */
        if ((flags & BM_FLAG_AUTO) && !(flags & BM_FLAG_IN_USE)) {
            if (tsize != table_entries(q, g)) {
                snprintf(err, errlen, "bitmap '%s': table size %u does not fit the disk size", name, tsize);
                return -EINVAL;
            }
            struct tracked *t = calloc(1, sizeof(*t));
            if (!t || !(t->name = strdup(name))) {
                free(t);
                return -ENOMEM;
            }
            t->entry = (uint32_t)p;
            t->gran_bits = g;
            t->nbits = (h->size + (1ull << g) - 1) >> g;
            t->old_table_off = toff;
            t->table_size = tsize;
            t->next = b->list;
            b->list = t;
            int r = load_bits(q, t, err, errlen);
            if (r < 0)
                return r;
        }
        p += esize;
    }
    if (seen != h->bitmaps_nb) {
        snprintf(err, errlen, "fewer bitmaps in the directory (%u) than the header says (%u)", seen, h->bitmaps_nb);
        return -EINVAL;
    }
    return 0;
}

static int header_autoclear_bitmaps(struct qcow2 *q, bool on)
{
    if (on)
        q->h.autoclear_features |= QCOW2_AUTOCLEAR_BITMAPS;
    else
        q->h.autoclear_features &= ~QCOW2_AUTOCLEAR_BITMAPS;
    int r = qcow2_write_header_fields(q);
    return r < 0 ? r : qcow2_sync(q);
}

/* Rewrite the directory in place (same size and layout: only flags and
 * table offsets change), bracketed by the autoclear bit as QEMU does. */
static int rewrite_directory(struct qcow2 *q, struct bitmaps *b, const uint8_t *dir)
{
    uint64_t span = (b->dir_size + 511) & ~511ull;
    uint8_t *buf = io_zalloc(span);
    ssize_t n = file_pread(&q->file, buf, span, b->dir_off);     /* keep the bytes after it */
    int r = n < 0 ? (int)n : 0;
    if (r == 0)
        r = header_autoclear_bitmaps(q, false);
    if (r == 0) {
        memcpy(buf, dir, b->dir_size);
        ssize_t w = file_pwrite(&q->file, buf, span, b->dir_off, false);
        r = w < 0 ? (int)w : qcow2_sync(q);
    }
    if (r == 0)
        r = header_autoclear_bitmaps(q, true);
    io_free(buf);
    return r;
}

int qcow2_bitmaps_open(struct qcow2 *q, char *err, size_t errlen)
{
    const struct qcow2_header *h = &q->h;
    err[0] = '\0';
    if (!(h->autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;   /* no bitmaps, or QEMU already considers them all inconsistent */
    if (!h->has_bitmaps_ext) {
        /* The bit without the extension is an error: nothing to keep. */
        int r = header_autoclear_bitmaps(q, false);
        if (r < 0)
            snprintf(err, errlen, "cannot update the header: %s", strerror(-r));
        return r;
    }
    if (h->bitmaps_ext_len < 24 || h->bitmaps_reserved || !h->bitmaps_nb || h->bitmaps_nb > BM_MAX_BITMAPS ||
        !h->bitmaps_dir_size || h->bitmaps_dir_size > BM_MAX_DIR_SIZE ||
        (h->bitmaps_dir_offset & (cl_size(q) - 1)) ||
        !inside_file(q, h->bitmaps_dir_offset, h->bitmaps_dir_size)) {
        snprintf(err, errlen, "the bitmaps extension is invalid (%u bitmaps, directory of %llu bytes at 0x%llx)",
                 h->bitmaps_nb, (unsigned long long)h->bitmaps_dir_size,
                 (unsigned long long)h->bitmaps_dir_offset);
        return -EINVAL;
    }
    struct bitmaps *b = calloc(1, sizeof(*b));
    if (!b)
        return -ENOMEM;
    q->bitmaps = b;
    b->dir_off = h->bitmaps_dir_offset;
    b->dir_size = h->bitmaps_dir_size;
    b->dir = malloc(b->dir_size);
    int r = !b->dir ? -ENOMEM : read_exact(q, b->dir, b->dir_size, b->dir_off);
    if (r < 0)
        snprintf(err, errlen, "cannot read the bitmap directory: %s", strerror(-r));
    if (r == 0)
        r = parse_directory(q, b, err, errlen);
    if (r == 0 && b->list) {
        /* Flag what we track in_use before the first write can change the
         * disk: a crash from now on leaves them marked inconsistent. */
        uint8_t *dir = malloc(b->dir_size);
        r = dir ? 0 : -ENOMEM;
        if (r == 0) {
            memcpy(dir, b->dir, b->dir_size);
            for (struct tracked *t = b->list; t; t = t->next)
                be32_store(dir + t->entry + 12, be32_load(dir + t->entry + 12) | BM_FLAG_IN_USE);
            r = rewrite_directory(q, b, dir);
            if (r == 0)
                memcpy(b->dir, dir, b->dir_size);
            else
                snprintf(err, errlen, "cannot flag the bitmaps in use: %s", strerror(-r));
            free(dir);
        }
    }
    if (r < 0 || !b->list)
        qcow2_bitmaps_free(q);
    return r;
}

static void set_bits(uint8_t *bits, uint64_t first, uint64_t last)
{
    while (first <= last && (first % 8)) {
        bits[first / 8] |= (uint8_t)(1u << (first % 8));
        first++;
    }
    if (first + 8 <= last + 1) {
        uint64_t nbytes = (last + 1 - first) / 8;
        memset(bits + first / 8, 0xff, nbytes);
        first += nbytes * 8;
    }
    for (; first <= last; first++)
        bits[first / 8] |= (uint8_t)(1u << (first % 8));
}

void qcow2_bitmaps_mark(struct qcow2 *q, uint64_t off, uint64_t len)
{
    if (!q->bitmaps || !len)
        return;
    for (struct tracked *t = q->bitmaps->list; t; t = t->next) {
        uint64_t first = off >> t->gran_bits, last = (off + len - 1) >> t->gran_bits;
        if (last >= t->nbits)
            last = t->nbits - 1;
        if (first <= last)
            set_bits(t->bits, first, last);
    }
}

/* n contiguous new clusters.  The allocator hands out runs within one
 * refcount block; when that is too short, later runs are taken until one
 * is long enough (at the end of the file everything is free), and the
 * clusters passed over are given back. */
static int alloc_run(struct qcow2 *q, uint64_t n, uint64_t *off)
{
    uint64_t cs = cl_size(q), start = 0, len = 0, got;
    uint64_t *spare = NULL, nspare = 0;
    int r = 0;
    while (len < n && r == 0) {
        uint64_t o;
        r = qcow2_alloc_clusters(q, n - len, &o, &got);
        if (r < 0)
            break;
        if (len && o == start + len * cs) {
            len += got;
            continue;
        }
        uint64_t *s = realloc(spare, (nspare + 2) * sizeof(*s));
        if (!s) {
            r = -ENOMEM;
            break;
        }
        spare = s;
        if (len) {
            spare[nspare++] = start;
            spare[nspare++] = len;
        }
        start = o;
        len = got;
    }
    if (r < 0 && len) {
        spare = realloc(spare, (nspare + 2) * sizeof(*spare));
        spare[nspare++] = start;
        spare[nspare++] = len;
    }
    /* Never referenced: give them back right away. */
    for (uint64_t i = 0; spare && i < nspare; i += 2)
        for (uint64_t c = 0; c < spare[i + 1]; c++)
            qcow2_rc_update(q, spare[i] / cs + c, -1);
    free(spare);
    *off = start;
    return r;
}

/* Give back the clusters of a table and its data (nothing names them). */
static void free_table(struct qcow2 *q, const uint64_t *tab, uint32_t n, uint64_t toff)
{
    uint64_t cs = cl_size(q);
    for (uint32_t i = 0; tab && i < n; i++)
        if (tab[i] & BMT_OFFSET_MASK)
            qcow2_rc_update(q, (tab[i] & BMT_OFFSET_MASK) / cs, -1);
    for (uint64_t c = 0; toff && c < ((uint64_t)n * 8 + cs - 1) / cs; c++)
        qcow2_rc_update(q, toff / cs + c, -1);
}

/* Write one bitmap to new clusters: data clusters that hold a set bit
 * (all-zero ones are table entries 0, as QEMU writes them), then its table. */
static int store_one(struct qcow2 *q, struct tracked *t)
{
    uint64_t cs = cl_size(q), bytes = (t->nbits + 7) / 8;
    t->new_table = calloc(t->table_size, 8);
    if (!t->new_table)
        return -ENOMEM;
    uint64_t tclusters = ((uint64_t)t->table_size * 8 + cs - 1) / cs;
    uint8_t *buf = io_alloc(cs > tclusters * cs ? cs : tclusters * cs);
    int r = 0;
    co_mutex_lock(&q->alloc_lock);
    for (uint32_t i = 0; i < t->table_size && r == 0; i++) {
        uint64_t from = i * cs, n = bytes - from < cs ? bytes - from : cs, off, got;
        bool any = false;
        for (uint64_t k = 0; k < n && !any; k++)
            any = t->bits[from + k] != 0;
        if (!any)
            continue;
        r = qcow2_alloc_clusters(q, 1, &off, &got);
        if (r < 0)
            break;
        t->new_table[i] = off;
        memset(buf, 0, cs);
        memcpy(buf, t->bits + from, n);
        r = qcow2_write_new_cluster(q, off, buf);
    }
    if (r == 0)
        r = alloc_run(q, tclusters, &t->new_table_off);
    if (r == 0) {
        memset(buf, 0, tclusters * cs);
        for (uint32_t i = 0; i < t->table_size; i++)
            be64_store(buf + (uint64_t)i * 8, t->new_table[i]);
        ssize_t w = file_pwrite(&q->file, buf, tclusters * cs, t->new_table_off, false);
        r = w < 0 ? (int)w : 0;
    }
    co_mutex_unlock(&q->alloc_lock);
    io_free(buf);
    return r;
}

int qcow2_bitmaps_close(struct qcow2 *q)
{
    struct bitmaps *b = q->bitmaps;
    if (!b || q->flush_failed || q->broken)
        return 0;       /* nothing tracked, or they stay in_use: inconsistent, not stale */
    int r = 0;
    for (struct tracked *t = b->list; t && r == 0; t = t->next)
        r = store_one(q, t);
    /* The new tables and their refcounts are durable before the directory
     * names them. */
    if (r == 0)
        r = qcow2_flush(q);
    uint8_t *dir = r == 0 ? malloc(b->dir_size) : NULL;
    if (r == 0 && !dir)
        r = -ENOMEM;
    if (r == 0) {
        memcpy(dir, b->dir, b->dir_size);
        for (struct tracked *t = b->list; t; t = t->next) {
            be64_store(dir + t->entry, t->new_table_off);
            be32_store(dir + t->entry + 12, be32_load(dir + t->entry + 12) & ~BM_FLAG_IN_USE);
        }
        r = rewrite_directory(q, b, dir);
        free(dir);
    }
    /* The old tables are named by nothing now: give them back (their
     * refcounts are written by the flushes that follow on close).  After a
     * failure nothing is freed: what the directory names is uncertain, and
     * a leak is the only damage allowed. */
    for (struct tracked *t = b->list; t && r == 0; t = t->next)
        free_table(q, t->old_table, t->table_size, t->old_table_off);
    if (r < 0)
        uq_warn("%s: could not store the dirty bitmaps (%s); they stay flagged in use "
                "(inconsistent) for QEMU", q->img.path, strerror(-r));
    qcow2_bitmaps_free(q);
    return r;
}
