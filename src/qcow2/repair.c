/* The reference walk and the refcount rebuild.
 *
 * The walk counts, for every host cluster, the references the metadata
 * makes to it (QEMU calls the result the in-memory refcount table): the
 * header, the active and snapshot L1 tables and everything they reach, the
 * snapshot table, persistent bitmaps.  It has two users:
 *  - the rebuild of an image left dirty (lazy refcounts) at open: strict,
 *    any invalid entry stops it (rc_walk.res == NULL);
 *  - the checker (check.c): problems are counted in rc_walk.res and
 *    described, and the walk goes on, as qemu-img check does.
 *
 * The rebuild writes fresh refcount structures describing exactly the
 * counts past the end of the file, syncs, and switches them in with one
 * header write.  A crash in between leaves the old structures in force (a
 * dirty image is then repaired again at the next open). */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

#define MAX_REPAIR_CLUSTERS (256ull << 20)

void rc_walk_say(struct rc_walk *w, const char *fmt, ...)
{
    if (!w->say)
        return;
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    w->say(w->say_ctx, line);
}

int rc_walk_init(struct rc_walk *w, struct qcow2 *q, uint64_t nclusters, char *err, size_t errlen)
{
    memset(w, 0, sizeof(*w));
    w->q = q;
    w->err = err;
    w->errlen = errlen;
    if (nclusters > MAX_REPAIR_CLUSTERS) {
        snprintf(err, errlen, "image too large to check or repair here (%llu clusters)",
                 (unsigned long long)nclusters);
        return -EFBIG;
    }
    w->counts = calloc(nclusters + 1, sizeof(uint32_t));
    if (!w->counts)
        return -ENOMEM;
    w->nclusters = w->capacity = nclusters;
    w->file_end = q->host_end;
    return 0;
}

void rc_walk_free(struct rc_walk *w)
{
    free(w->counts);
    w->counts = NULL;
}

/* Checker mode: references past the end of the file are counted too (the
 * array grows), so that the comparison sees them. */
static int grow(struct rc_walk *w, uint64_t need)
{
    uint64_t n = need + need / 4 + 64;
    if (n > MAX_REPAIR_CLUSTERS)
        n = MAX_REPAIR_CLUSTERS;
    uint32_t *c = realloc(w->counts, (n + 1) * sizeof(uint32_t));
    if (!c)
        return -ENOMEM;
    memset(c + w->nclusters, 0, (n + 1 - w->nclusters) * sizeof(uint32_t));
    w->counts = c;
    w->nclusters = need;     /* what is in use; the rest is headroom */
    w->capacity = n;
    return 0;
}

/* Checker: does [off, off+len) end a cluster or more past the end of the
 * file?  QEMU reports such a reference as corruption and does not count it
 * (which also bounds what a hostile offset can make us allocate). */
static bool beyond_eof(const struct rc_walk *w, uint64_t off, uint64_t len)
{
    return w->res && (off + len < off || (off + len > w->file_end && off + len - w->file_end >= cl_size(w->q)));
}

int rc_walk_count(struct rc_walk *w, uint64_t off, uint64_t len, const char *what)
{
    if (!len)
        return 0;
    struct qcow2 *q = w->q;
    if (beyond_eof(w, off, len)) {
        rc_walk_say(w, "ERROR: counting reference for region exceeding the end of the file by one cluster "
                    "or more: offset 0x%llx size 0x%llx", (unsigned long long)off, (unsigned long long)len);
        w->res->corruptions++;
        return 0;
    }
    uint64_t first = off >> cl_bits(q), last = (off + len - 1) >> cl_bits(q);
    if (off + len < off || last >= MAX_REPAIR_CLUSTERS || (!w->res && last >= w->nclusters)) {
        snprintf(w->err, w->errlen, "%s at 0x%llx lies past the end of the file", what,
                 (unsigned long long)off);
        if (!w->res)
            return -EINVAL;
        rc_walk_say(w, "ERROR %s at offset 0x%llx lies too far past the end of the image to check",
                    what, (unsigned long long)off);
        w->res->check_errors++;
        return 0;
    }
    if (last >= w->nclusters) {
        if (last < w->capacity) {
            w->nclusters = last + 1;
        } else {
            int r = grow(w, last + 1);
            if (r < 0) {
                w->res->check_errors++;
                return r;
            }
        }
    }
    uint64_t max = qcow2_refcount_max(q->h.refcount_order);
    for (uint64_t c = first; c <= last; c++) {
        if (w->res && w->counts[c] >= max) {
            /* As QEMU: more references than the refcount width holds. */
            rc_walk_say(w, "ERROR: overflow cluster offset=0x%llx", (unsigned long long)(c << cl_bits(q)));
            w->res->corruptions++;
            continue;
        }
        if (++w->counts[c] == 0) {
            snprintf(w->err, w->errlen, "refcount overflow at cluster %llu", (unsigned long long)c);
            return -EINVAL;
        }
    }
    return 0;
}

static int read_exact(struct qcow2 *q, void *buf, uint64_t len, uint64_t off)
{
    ssize_t n = file_pread_any(&q->file, buf, len, off);
    if (n < 0)
        return (int)n;
    if ((uint64_t)n < len)
        memset((uint8_t *)buf + n, 0, len - n);
    return 0;
}

/* How qemu-img check classifies an L2 entry (first word): by its flags
 * alone, whatever reserved bits or misalignment it has (those are reported
 * separately). */
static enum qcow2_cluster_type check_type(const struct qcow2 *q, uint64_t e)
{
    if (e & QCOW_OFLAG_COMPRESSED)
        return QCOW2_CLUSTER_COMPRESSED;
    if ((e & QCOW_OFLAG_ZERO) && !q->extl2)
        return (e & L2E_OFFSET_MASK) ? QCOW2_CLUSTER_ZERO_ALLOC : QCOW2_CLUSTER_ZERO_PLAIN;
    return (e & L2E_OFFSET_MASK) ? QCOW2_CLUSTER_NORMAL : QCOW2_CLUSTER_UNALLOCATED;
}

#define EXTL2_ALL_ALLOC 0xffffffffull
#define EXTL2_ALL_ZERO  (0xffffffffull << 32)

/* Checker, -r all: an entry naming a cluster that holds no data (misaligned
 * preallocated zeros, or past the end of the file, which reads as zeros)
 * becomes a plain zero entry, so the guest reads what it read before; on
 * v2 (no zero flag) an unallocated entry, allowed only without a backing
 * file.  Written in place and synced. */
static bool can_zero(const struct qcow2 *q)
{
    return q->h.version >= 3 || !q->h.backing_file[0];
}

/* Write entry j of the L2 table l2 (at l2_off) as it now is in memory. */
static int write_l2_entry(struct rc_walk *w, uint8_t *l2, uint64_t l2_off, uint64_t j)
{
    struct qcow2 *q = w->q;
    uint64_t sector = (j * q->h.l2_entry_size) & ~511ull;
    mcache_discard_range(&q->l2c, l2_off, cl_size(q));
    ssize_t n = file_pwrite(&q->file, l2 + sector, 512, l2_off + sector, false);
    int r = n < 0 ? (int)n : file_sync(&q->file);
    if (r < 0) {
        rc_walk_say(w, "ERROR: Failed to overwrite L2 table entry: %s", strerror(-r));
        w->res->check_errors++;
    }
    return r;
}

static int zero_l2_entry(struct rc_walk *w, uint8_t *l2, uint64_t l2_off, uint64_t j)
{
    struct qcow2 *q = w->q;
    uint8_t *p = l2 + j * q->h.l2_entry_size;
    if (q->extl2) {
        be64_store(p, 0);
        be64_store(p + 8, EXTL2_ALL_ZERO);
    } else {
        be64_store(p, q->h.version >= 3 ? QCOW_OFLAG_ZERO : 0);
    }
    return write_l2_entry(w, l2, l2_off, j);
}

/* Checker: flags an entry must not have (reserved bits; COPIED on a
 * compressed cluster) are corruption.  -r all clears them (QEMU 7.2 only
 * reports them): offset and meaning stay, so the guest reads what the
 * entry names.  Returns the entry as it is now. */
static uint64_t bad_flags(struct rc_walk *w, uint8_t *l2, uint64_t l2_off, uint64_t j, uint64_t e,
                          uint64_t bad, const char *what)
{
    bool fix = w->fix & CHECK_FIX_ERRORS;
    rc_walk_say(w, "%s %s: %llx", fix ? "Repairing" : "ERROR", what, (unsigned long long)e);
    if (fix) {
        be64_store(l2 + j * w->q->h.l2_entry_size, e & ~bad);
        if (write_l2_entry(w, l2, l2_off, j) == 0) {
            w->res->corruptions_fixed++;
            return e & ~bad;
        }
    }
    w->res->corruptions++;
    return e;
}

/* Count one L2 table's references; the checker also checks every entry. */
static int walk_l2(struct rc_walk *w, uint64_t l2_off, bool active, uint8_t *l2)
{
    struct qcow2 *q = w->q;
    struct check_result *res = w->res;
    uint64_t cs = cl_size(q), next_contiguous = 0;
    int r = read_exact(q, l2, cs, l2_off);
    if (r < 0) {
        snprintf(w->err, w->errlen, "cannot read the L2 table at 0x%llx: %s",
                 (unsigned long long)l2_off, strerror(-r));
        if (res) {
            rc_walk_say(w, "ERROR: I/O error in check_refcounts_l2");
            res->check_errors++;
        }
        return r;
    }
    for (uint64_t j = 0; j < q->h.l2_entries && r == 0; j++) {
        uint64_t e = be64_load(l2 + j * q->h.l2_entry_size);
        uint64_t bm = q->extl2 ? be64_load(l2 + j * q->h.l2_entry_size + 8) : 0;
        enum qcow2_cluster_type t;
        if (!res) {
            t = qcow2_l2_entry_type(&q->h, e, q->extl2);
            if (t == QCOW2_CLUSTER_INVALID) {
                snprintf(w->err, w->errlen, "L2 entry 0x%llx in the table at 0x%llx is invalid",
                         (unsigned long long)e, (unsigned long long)l2_off);
                return -EINVAL;
            }
        } else {
            t = check_type(q, e);
            if (t != QCOW2_CLUSTER_COMPRESSED && (e & L2E_STD_RESERVED_MASK))
                e = bad_flags(w, l2, l2_off, j, e, L2E_STD_RESERVED_MASK, "found l2 entry with reserved bits set");
        }
        switch (t) {
        case QCOW2_CLUSTER_COMPRESSED: {
            if (res && (e & QCOW_OFLAG_COPIED)) {
                e = bad_flags(w, l2, l2_off, j, e, QCOW_OFLAG_COPIED,
                              "copied flag set on a compressed cluster (it must never be)");
                e &= ~QCOW_OFLAG_COPIED;
            }
            if (res && bm) {
                rc_walk_say(w, "ERROR compressed cluster %llu with non-zero subcluster allocation bitmap, "
                            "entry=0x%llx", (unsigned long long)j, (unsigned long long)e);
                res->corruptions++;
                break;
            }
            uint64_t coff, nbytes;
            qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
            r = rc_walk_count(w, coff, nbytes, "a compressed cluster");
            if (res && active) {
                /* Compressed clusters count as fragmented, as in QEMU. */
                res->allocated_clusters++;
                res->compressed_clusters++;
                res->fragmented_clusters++;
            }
            break;
        }
        case QCOW2_CLUSTER_NORMAL:
        case QCOW2_CLUSTER_ZERO_ALLOC: {
            uint64_t off = e & L2E_OFFSET_MASK;
            if (res && ((bm >> 32) & bm)) {
                rc_walk_say(w, "ERROR offset=%llx: Allocated cluster has corrupted subcluster allocation bitmap",
                            (unsigned long long)off);
                res->corruptions++;
            }
            if (res && (off & (cs - 1))) {
                bool data = q->extl2 ? (bm & EXTL2_ALL_ALLOC) != 0 : !(e & QCOW_OFLAG_ZERO);
                res->corruptions++;
                if (data) {
                    rc_walk_say(w, "ERROR offset=%llx: Data cluster is not properly aligned; L2 entry corrupted.",
                                (unsigned long long)off);
                } else {
                    bool fix = w->fix & CHECK_FIX_ERRORS;
                    rc_walk_say(w, "%s offset=%llx: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                fix ? "Repairing" : "ERROR", (unsigned long long)off);
                    if (fix && zero_l2_entry(w, l2, l2_off, j) == 0) {
                        res->corruptions--;
                        res->corruptions_fixed++;
                        continue;   /* the entry no longer names a cluster */
                    }
                }
            }
            if (beyond_eof(w, off, cs) && (w->fix & CHECK_FIX_ERRORS) && can_zero(q)) {
                rc_walk_say(w, "Repairing offset=%llx: cluster past the end of the file; L2 entry made "
                            "a zero cluster", (unsigned long long)off);
                if (zero_l2_entry(w, l2, l2_off, j) == 0) {
                    res->corruptions_fixed++;
                    continue;
                }
            }
            if (res && active) {
                res->allocated_clusters++;
                if (next_contiguous && off != next_contiguous)
                    res->fragmented_clusters++;
                next_contiguous = off + cs;
            }
            /* A misaligned offset counts every cluster the range touches, as QEMU does. */
            r = rc_walk_count(w, off, cs, "a data cluster");
            break;
        }
        case QCOW2_CLUSTER_UNALLOCATED:
            if (res && (bm & EXTL2_ALL_ALLOC)) {
                rc_walk_say(w, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
                res->corruptions++;
            }
            break;
        default:
            break;
        }
    }
    return r;
}

static void progress_step(struct rc_walk *w)
{
    w->work_done++;
    if (w->progress && w->work_total && (w->work_done & 15) == 0)
        w->progress(w->progress_ctx, w->work_done, w->work_total);
}

int rc_write_l1_entry(struct qcow2 *q, uint64_t l1_off, const uint64_t *l1, uint32_t l1_size, uint32_t i)
{
    uint8_t *buf = io_zalloc(512);
    uint32_t first = i & ~63u;
    for (uint32_t k = first; k < first + 64 && k < l1_size; k++)
        be64_store(buf + (k - first) * 8, l1[k]);
    ssize_t n = file_pwrite(&q->file, buf, 512, l1_off + (uint64_t)first * 8, false);
    io_free(buf);
    return n < 0 ? (int)n : 0;
}

/* Count one L1 table and everything it reaches.  active: the image's own
 * table (its statistics are what qemu-img check reports). */
static int walk_l1(struct rc_walk *w, uint64_t l1_off, uint64_t *l1, uint32_t l1_size, bool active)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q);
    if (!l1_size)
        return 0;
    int r = rc_walk_count(w, l1_off, (uint64_t)l1_size * 8, active ? "the L1 table" : "a snapshot L1 table");
    uint8_t *l2 = io_alloc(cs);
    for (uint32_t i = 0; i < l1_size && r == 0; i++) {
        progress_step(w);
        if (!l1[i])
            continue;
        uint64_t t = l1[i] & L1E_OFFSET_MASK;
        if (!w->res) {
            if (!t)
                continue;
            if ((t & (cs - 1)) || (l1[i] & L1E_RESERVED_MASK)) {
                snprintf(w->err, w->errlen, "L1 entry %u is invalid (0x%llx)", i, (unsigned long long)l1[i]);
                r = -EINVAL;
                break;
            }
        } else if (l1[i] & L1E_RESERVED_MASK) {
            /* As for L2 entries (bad_flags): -r all clears the bits. */
            bool fix = w->fix & CHECK_FIX_ERRORS;
            rc_walk_say(w, "%s found L1 entry with reserved bits set: %llx", fix ? "Repairing" : "ERROR",
                        (unsigned long long)l1[i]);
            uint64_t old = l1[i];
            l1[i] &= ~L1E_RESERVED_MASK;
            if (fix && rc_write_l1_entry(q, l1_off, l1, l1_size, i) == 0 && file_sync(&q->file) == 0) {
                w->res->corruptions_fixed++;
            } else {
                l1[i] = old;
                w->res->corruptions++;
            }
            t = l1[i] & L1E_OFFSET_MASK;
        }
        if (beyond_eof(w, t, cs) && (w->fix & CHECK_FIX_ERRORS)) {
            /* Past the end it reads as an empty table: an empty L1 entry
             * means the same. */
            rc_walk_say(w, "Repairing l2_offset=%llx: L2 table past the end of the file; L1 entry cleared",
                        (unsigned long long)t);
            l1[i] = 0;
            r = rc_write_l1_entry(q, l1_off, l1, l1_size, i);
            if (r == 0)
                r = file_sync(&q->file);
            if (r < 0) {
                rc_walk_say(w, "ERROR: Failed to overwrite L1 table entry: %s", strerror(-r));
                w->res->check_errors++;
                break;
            }
            w->res->corruptions_fixed++;
            continue;
        }
        r = rc_walk_count(w, t, cs, "an L2 table");
        if (r == 0 && w->res && (t & (cs - 1))) {
            rc_walk_say(w, "ERROR l2_offset=%llx: Table is not cluster aligned; L1 entry corrupted",
                        (unsigned long long)t);
            w->res->corruptions++;
        }
        if (r == 0)
            r = walk_l2(w, t, active, l2);
    }
    io_free(l2);
    return r;
}

/* Persistent bitmaps own clusters too (directory, tables, data): count them
 * so the rebuild does not hand them out again.  The checker counts them only
 * where QEMU trusts them (autoclear bit set). */
static int count_bitmaps(struct rc_walk *w)
{
    struct qcow2 *q = w->q;
    if (w->res && !(q->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    uint32_t len;
    const uint8_t *x = qcow2_header_find_ext(q->hdr_buf, q->hdr_len, &q->h, QCOW2_EXT_BITMAPS, &len);
    if (!x || len < 24)
        return 0;
    uint32_t nb = be32_load(x);
    uint64_t dir_size = be64_load(x + 8), dir_off = be64_load(x + 16);
    if (dir_size > (64u << 20))
        return -EINVAL;
    int r = rc_walk_count(w, dir_off, dir_size, "the bitmap directory");
    uint8_t *dir = malloc(dir_size ? dir_size : 1);
    if (r == 0 && !dir)
        r = -ENOMEM;
    if (r == 0)
        r = read_exact(q, dir, dir_size, dir_off);
    uint64_t p = 0;
    for (uint32_t b = 0; b < nb && r == 0 && p + 24 <= dir_size; b++) {
        uint64_t toff = be64_load(dir + p);
        uint32_t tsize = be32_load(dir + p + 8);
        uint16_t name = be16_load(dir + p + 18);
        uint32_t extra = be32_load(dir + p + 20);
        p += (24 + (uint64_t)extra + name + 7) & ~7ull;
        if ((uint64_t)tsize * 8 > (64u << 20)) {
            r = -EINVAL;
            break;
        }
        r = rc_walk_count(w, toff, (uint64_t)tsize * 8, "a bitmap table");
        uint64_t *tab = malloc((uint64_t)tsize * 8 + 1);
        if (r == 0 && !tab)
            r = -ENOMEM;
        if (r == 0)
            r = read_exact(q, tab, (uint64_t)tsize * 8, toff);
        for (uint32_t t = 0; t < tsize && r == 0; t++) {
            uint64_t e = be64_load(&tab[t]) & L2E_OFFSET_MASK;
            if (e)
                r = rc_walk_count(w, e, cl_size(q), "a bitmap data cluster");
        }
        free(tab);
    }
    free(dir);
    return r;
}

int rc_walk_image(struct rc_walk *w)
{
    struct qcow2 *q = w->q;
    w->work_done = 0;
    w->work_total = q->h.l1_size;
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++)
        w->work_total += q->snapshots[i].l1_size;

    int r = rc_walk_count(w, 0, cl_size(q), "the header");
    if (r == 0)
        r = walk_l1(w, q->h.l1_table_offset, q->l1, q->h.l1_size, true);
    for (uint32_t i = 0; i < q->h.nb_snapshots && r == 0; i++) {
        struct qcow2_snapshot *s = &q->snapshots[i];
        if (w->res && (s->l1_table_offset & (cl_size(q) - 1))) {
            rc_walk_say(w, "ERROR snapshot %s (%s) l1_offset=%#llx: L1 table is not cluster aligned; "
                        "snapshot table entry corrupted", s->id, s->name, (unsigned long long)s->l1_table_offset);
            w->res->corruptions++;
            w->work_done += s->l1_size;
            continue;
        }
        if (w->res && (uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            rc_walk_say(w, "ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; "
                        "snapshot table entry corrupted", s->id, s->name, s->l1_size);
            w->res->corruptions++;
            w->work_done += s->l1_size;
            continue;
        }
        uint64_t bytes = (uint64_t)s->l1_size * 8;
        uint64_t *sl1 = calloc(s->l1_size + 1, 8);
        r = !sl1 ? -ENOMEM : read_exact(q, sl1, bytes, s->l1_table_offset);
        for (uint32_t j = 0; j < s->l1_size && r == 0; j++)
            sl1[j] = be64_load(&sl1[j]);
        if (r == 0)
            r = walk_l1(w, s->l1_table_offset, sl1, s->l1_size, false);
        free(sl1);
    }
    if (r == 0 && q->h.nb_snapshots)
        r = rc_walk_count(w, q->h.snapshots_offset, q->snapshot_table_len, "the snapshot table");
    if (r == 0)
        r = count_bitmaps(w);
    if (w->progress && w->work_total)
        w->progress(w->progress_ctx, w->work_total, w->work_total);
    return r;
}

/* Make COPIED flags in the active L1/L2 tables say "refcount is exactly 1". */
static int fix_copied_flags(struct rc_walk *w)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q);
    uint8_t *l2 = io_alloc(cs);
    int r = 0;
    bool l1_changed = false;
    for (uint32_t i = 0; i < q->h.l1_size && r == 0; i++) {
        uint64_t t = q->l1[i] & L1E_OFFSET_MASK;
        if (!t)
            continue;
        uint64_t want = w->counts[t >> cl_bits(q)] == 1 ? QCOW_OFLAG_COPIED : 0;
        if ((q->l1[i] & QCOW_OFLAG_COPIED) != want) {
            q->l1[i] = (q->l1[i] & ~QCOW_OFLAG_COPIED) | want;
            l1_changed = true;
        }
        r = read_exact(q, l2, cs, t);
        bool changed = false;
        for (uint64_t j = 0; j < q->h.l2_entries && r == 0; j++) {
            uint8_t *p = l2 + j * q->h.l2_entry_size;
            uint64_t e = be64_load(p);
            enum qcow2_cluster_type ty = qcow2_l2_entry_type(&q->h, e, q->extl2);
            if (ty != QCOW2_CLUSTER_NORMAL && ty != QCOW2_CLUSTER_ZERO_ALLOC)
                continue;
            uint64_t v = w->counts[(e & L2E_OFFSET_MASK) >> cl_bits(q)] == 1 ? QCOW_OFLAG_COPIED : 0;
            if ((e & QCOW_OFLAG_COPIED) != v) {
                be64_store(p, (e & ~QCOW_OFLAG_COPIED) | v);
                changed = true;
            }
        }
        if (r == 0 && changed) {
            ssize_t n = file_pwrite(&q->file, l2, cs, t, false);
            r = n < 0 ? (int)n : 0;
        }
    }
    io_free(l2);
    if (r == 0 && l1_changed) {
        uint64_t bytes = ((uint64_t)q->h.l1_size * 8 + 511) & ~511ull;
        uint8_t *buf = io_zalloc(bytes);
        for (uint32_t i = 0; i < q->h.l1_size; i++)
            be64_store(buf + (uint64_t)i * 8, q->l1[i]);
        ssize_t n = file_pwrite(&q->file, buf, bytes, q->h.l1_table_offset, false);
        io_free(buf);
        r = n < 0 ? (int)n : 0;
    }
    return r;
}

int rc_rebuild(struct rc_walk *w, bool fix_copied)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q), rbe = q->h.refcount_block_entries;
    uint64_t nclusters = w->nclusters;
    uint64_t max = qcow2_refcount_max(q->h.refcount_order);
    for (uint64_t c = 0; c < nclusters; c++)
        if (w->counts[c] > max) {
            snprintf(w->err, w->errlen, "cluster %llu needs refcount %u, more than %u-bit refcounts hold",
                     (unsigned long long)c, w->counts[c], q->h.refcount_bits);
            return -ERANGE;
        }

    /* New refcount blocks and table after everything in use and the end of
     * the file, so nothing they overwrite is in use. */
    uint64_t start = nclusters, nblocks = 1, ntable = 1;
    for (;;) {
        uint64_t total = start + nblocks + ntable;
        uint64_t need_blocks = (total + rbe - 1) / rbe;
        uint64_t need_table = (need_blocks * 8 + cs - 1) / cs;
        if (need_blocks == nblocks && need_table == ntable)
            break;
        nblocks = need_blocks;
        ntable = need_table;
    }
    if (ntable * cs > QCOW2_MAX_REFTABLE_BYTES) {
        snprintf(w->err, w->errlen, "the rebuilt refcount table would exceed QEMU's limit");
        return -EFBIG;
    }
    uint64_t area = nblocks + ntable;
    uint8_t *buf = io_zalloc(area * cs);
    for (uint64_t c = 0; c < start + area; c++) {
        uint64_t v = c < start ? w->counts[c] : 1;
        if (v)
            qcow2_refcount_set(buf + (c / rbe) * cs, q->h.refcount_order, c % rbe, v);
    }
    uint64_t entries = ntable * cs / 8;
    uint64_t *newtab = calloc(entries, sizeof(uint64_t));
    uint8_t *newdirty = calloc((entries * 8 + 511) / 512 + 1, 1);
    if (!newtab || !newdirty) {
        io_free(buf);
        free(newtab);
        free(newdirty);
        return -ENOMEM;
    }
    for (uint64_t b = 0; b < nblocks; b++) {
        newtab[b] = (start + b) * cs;
        be64_store(buf + nblocks * cs + b * 8, newtab[b]);
    }
    /* COPIED flags first (they only describe refcounts we are about to
     * make true), then the new structures, a sync, and the header switch. */
    int r = fix_copied ? fix_copied_flags(w) : 0;
    if (r == 0) {
        ssize_t n = file_pwrite(&q->file, buf, area * cs, start * cs, false);
        r = n < 0 ? (int)n : file_sync(&q->file);
    }
    io_free(buf);
    if (r == 0) {
        q->h.refcount_table_offset = (start + nblocks) * cs;
        q->h.refcount_table_clusters = (uint32_t)ntable;
        r = qcow2_write_header_fields(q);
        if (r == 0)
            r = file_sync(&q->file);
    }
    if (r < 0) {
        snprintf(w->err, w->errlen, "writing new refcount structures failed: %s", strerror(-r));
        free(newtab);
        free(newdirty);
        return r;
    }
    install_reftable(q, newtab, newdirty, entries);
    note_host_end(q, (start + area) * cs);
    q->free_hint = 0;
    mcache_discard_range(&q->rcc, 0, UINT64_MAX);
    mcache_discard_range(&q->l2c, 0, UINT64_MAX);
    return 0;
}

int qcow2_rebuild_refcounts(struct qcow2 *q, char *err, size_t errlen)
{
    struct rc_walk w;
    int r = rc_walk_init(&w, q, (q->host_end + cl_size(q) - 1) / cl_size(q), err, errlen);
    if (r == 0)
        r = rc_walk_image(&w);
    if (r == 0)
        r = rc_rebuild(&w, true);
    rc_walk_free(&w);
    return r;
}
