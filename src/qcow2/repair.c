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
 * Memory and the structures written grow with the clusters in use, not
 * with the file's size: counts are kept per refcount-block range, only for
 * the ranges something lies in, and only those ranges get a block in the
 * rebuild (a sparse file of terabytes with a few tables costs a few
 * blocks).  The counts of one image may take REPAIR_MEM_BUDGET at most;
 * beyond it the walk stops with a message.
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

#define REPAIR_MEM_BUDGET (256ull << 20)
#define REPAIR_WRITE_BATCH (1u << 20)
/* Work bounds of the strict walk.  An L2 table named by several L1 entries
 * (snapshots share them) is read once and its entries counted once per
 * reference, so the work grows with the distinct tables; these caps bound
 * it whatever the file (snapshot L1 tables may all lie on the same bytes).
 * The checker walks every reference, as qemu-img check does (it reports a
 * shared table's problems once per reference), and only the bitmap cap
 * applies to it. */
#define REPAIR_MAX_L1_BYTES (256ull << 20)      /* snapshot L1 tables read, in total */
#define REPAIR_MAX_L2_BYTES (64ull << 30)       /* distinct L2 tables read */
#define REPAIR_MAX_BITMAP_TABLE_BYTES (64u << 20)

void qcow2_walk_say(struct rc_walk *w, const char *fmt, ...)
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

int qcow2_walk_init(struct rc_walk *w, struct qcow2 *q, uint64_t nclusters, char *err, size_t errlen)
{
    memset(w, 0, sizeof(*w));
    w->q = q;
    w->err = err;
    w->errlen = errlen;
    w->nclusters = nclusters;
    w->rbe = q->h.refcount_block_entries;
    w->file_end = q->host_end;
    return 0;
}

void qcow2_walk_free(struct rc_walk *w)
{
    for (size_t i = 0; i < w->cap; i++)
        free(w->chunks[i]);
    free(w->keys);
    free(w->chunks);
    free(w->tables);
    free(w->refs);
    w->keys = w->tables = NULL;
    w->chunks = NULL;
    w->refs = NULL;
    w->cap = w->used = w->tcap = w->tused = 0;
    w->last = NULL;
}

/* ---- the sparse counter --------------------------------------------------------- */

static uint64_t mem_used(const struct rc_walk *w, size_t chunks, size_t tcap)
{
    return (uint64_t)chunks * w->rbe * sizeof(uint32_t) + (uint64_t)tcap * 12;
}

static size_t chunk_slot(const uint64_t *keys, size_t cap, uint64_t ci)
{
    size_t m = cap - 1, h = (size_t)((ci * 0x9e3779b97f4a7c15ull) >> 29) & m;
    while (keys[h] && keys[h] != ci + 1)
        h = (h + 1) & m;
    return h;
}

static uint32_t *chunk_find(const struct rc_walk *w, uint64_t ci)
{
    if (!w->cap)
        return NULL;
    size_t h = chunk_slot(w->keys, w->cap, ci);
    return w->keys[h] ? w->chunks[h] : NULL;
}

static uint32_t *chunk_get(struct rc_walk *w, uint64_t ci)
{
    uint32_t *c = chunk_find(w, ci);
    if (c)
        return c;
    if (mem_used(w, w->used + 1, w->tcap) > REPAIR_MEM_BUDGET) {
        snprintf(w->err, w->errlen, "the clusters in use are too many to count here (more than "
                 "%llu MiB of refcounts)", REPAIR_MEM_BUDGET >> 20);
        return NULL;
    }
    if ((w->used + 1) * 2 > w->cap) {
        size_t ncap = w->cap ? w->cap * 2 : 64;
        uint64_t *keys = calloc(ncap, sizeof(*keys));
        uint32_t **chunks = calloc(ncap, sizeof(*chunks));
        if (!keys || !chunks) {
            free(keys);
            free(chunks);
            snprintf(w->err, w->errlen, "out of memory");
            return NULL;
        }
        for (size_t i = 0; i < w->cap; i++) {
            if (!w->keys[i])
                continue;
            size_t h = chunk_slot(keys, ncap, w->keys[i] - 1);
            keys[h] = w->keys[i];
            chunks[h] = w->chunks[i];
        }
        free(w->keys);
        free(w->chunks);
        w->keys = keys;
        w->chunks = chunks;
        w->cap = ncap;
    }
    c = calloc(w->rbe, sizeof(uint32_t));
    if (!c) {
        snprintf(w->err, w->errlen, "out of memory");
        return NULL;
    }
    size_t h = chunk_slot(w->keys, w->cap, ci);
    w->keys[h] = ci + 1;
    w->chunks[h] = c;
    w->used++;
    return c;
}

uint32_t qcow2_walk_get(const struct rc_walk *w, uint64_t cluster)
{
    const uint32_t *c = chunk_find(w, cluster / w->rbe);
    return c ? c[cluster % w->rbe] : 0;
}

void qcow2_walk_drop(struct rc_walk *w, uint64_t cluster)
{
    uint32_t *c = chunk_find(w, cluster / w->rbe);
    if (c && c[cluster % w->rbe])
        c[cluster % w->rbe]--;
}

bool qcow2_walk_range_used(const struct rc_walk *w, uint64_t ci)
{
    return chunk_find(w, ci) != NULL;
}

static size_t table_slot(const uint64_t *tables, size_t cap, uint64_t t)
{
    size_t m = cap - 1, h = (size_t)((t * 0x9e3779b97f4a7c15ull) >> 29) & m;
    while (tables[h] && tables[h] != t)
        h = (h + 1) & m;
    return h;
}

/* times more references to the L2 table at t; returns its references
 * before them (0: first met), or UINT32_MAX on failure (w->err set). */
static uint32_t table_ref(struct rc_walk *w, uint64_t t, uint32_t times)
{
    if (w->tcap) {
        size_t h = table_slot(w->tables, w->tcap, t);
        if (w->tables[h]) {
            uint32_t before = w->refs[h];
            if (before > UINT32_MAX - 1 - times) {
                snprintf(w->err, w->errlen, "refcount overflow at the L2 table at 0x%llx",
                         (unsigned long long)t);
                return UINT32_MAX;
            }
            w->refs[h] += times;
            return before;
        }
    }
    if ((w->tused + 1) * 2 > w->tcap) {
        size_t ncap = w->tcap ? w->tcap * 2 : 256;
        if (mem_used(w, w->used, ncap) > REPAIR_MEM_BUDGET) {
            snprintf(w->err, w->errlen, "the L1 tables name too many L2 tables to count here");
            return UINT32_MAX;
        }
        uint64_t *nt = calloc(ncap, sizeof(*nt));
        uint32_t *nr = calloc(ncap, sizeof(*nr));
        if (!nt || !nr) {
            free(nt);
            free(nr);
            snprintf(w->err, w->errlen, "out of memory");
            return UINT32_MAX;
        }
        for (size_t i = 0; i < w->tcap; i++) {
            if (!w->tables[i])
                continue;
            size_t h = table_slot(nt, ncap, w->tables[i]);
            nt[h] = w->tables[i];
            nr[h] = w->refs[i];
        }
        free(w->tables);
        free(w->refs);
        w->tables = nt;
        w->refs = nr;
        w->tcap = ncap;
    }
    size_t h = table_slot(w->tables, w->tcap, t);
    w->tables[h] = t;
    w->refs[h] = times;
    w->tused++;
    return 0;
}

/* Checker: does [off, off+len) end a cluster or more past the end of the
 * file?  QEMU reports such a reference as corruption and does not count it
 * (which also bounds what a hostile offset can make us count). */
static bool beyond_eof(const struct rc_walk *w, uint64_t off, uint64_t len)
{
    return w->res && (off + len < off || (off + len > w->file_end && off + len - w->file_end >= cl_size(w->q)));
}

/* times more references to every cluster of [off, off+len) (the checker
 * always counts one at a time). */
static int count_n(struct rc_walk *w, uint64_t off, uint64_t len, const char *what, uint32_t times)
{
    if (!len)
        return 0;
    struct qcow2 *q = w->q;
    if (beyond_eof(w, off, len)) {
        qcow2_walk_say(w, "ERROR: counting reference for region exceeding the end of the file by one cluster "
                    "or more: offset 0x%llx size 0x%llx", (unsigned long long)off, (unsigned long long)len);
        w->res->corruptions++;
        return 0;
    }
    uint64_t first = off >> cl_bits(q), last = (off + len - 1) >> cl_bits(q);
    if (!w->res && (off + len < off || last >= w->nclusters)) {
        snprintf(w->err, w->errlen, "%s at 0x%llx lies past the end of the file", what,
                 (unsigned long long)off);
        return -EINVAL;
    }
    if (last >= w->nclusters)
        w->nclusters = last + 1;    /* checker: less than a cluster past the end */
    uint64_t max = qcow2_refcount_max(q->h.refcount_order);
    for (uint64_t c = first; c <= last; c++) {
        uint64_t ci = c / w->rbe;
        if (!w->last || w->last_ci != ci) {
            w->last = chunk_get(w, ci);
            w->last_ci = ci;
            if (!w->last) {
                if (w->res) {
                    qcow2_walk_say(w, "ERROR %s", w->err);
                    w->res->check_errors++;
                }
                return -EFBIG;
            }
        }
        uint32_t *v = &w->last[c % w->rbe];
        if (w->res && *v >= max) {
            /* As QEMU: more references than the refcount width holds. */
            qcow2_walk_say(w, "ERROR: overflow cluster offset=0x%llx", (unsigned long long)(c << cl_bits(q)));
            w->res->corruptions++;
            continue;
        }
        if (*v > UINT32_MAX - times) {
            snprintf(w->err, w->errlen, "refcount overflow at cluster %llu", (unsigned long long)c);
            return -EINVAL;
        }
        *v += times;
    }
    return 0;
}

int qcow2_walk_count(struct rc_walk *w, uint64_t off, uint64_t len, const char *what)
{
    return count_n(w, off, len, what, 1);
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
    qcow2_map_changed(q);
    uint64_t sector = (j * q->h.l2_entry_size) & ~511ull;
    char msg[256];
    /* A damaged L1 entry may name other metadata as its L2 table. */
    int r = qcow2_ol_conflict(q, l2_off + sector, 512, OL_ACTIVE_L2 | OL_INACTIVE_L2, "an L2 table entry",
                        msg, sizeof(msg));
    if (r == 0) {
        qcow2_cache_discard_range(&q->l2c, l2_off, cl_size(q));
        ssize_t n = file_pwrite(&q->file, l2 + sector, 512, l2_off + sector, false);
        r = n < 0 ? (int)n : file_sync(&q->file);
    } else {
        qcow2_walk_say(w, "ERROR: %s", msg);
    }
    if (r < 0) {
        qcow2_walk_say(w, "ERROR: Failed to overwrite L2 table entry: %s", strerror(-r));
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
    qcow2_walk_say(w, "%s %s: %llx", fix ? "Repairing" : "ERROR", what, (unsigned long long)e);
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

/* One L2 table being walked. */
struct l2_pass {
    uint8_t *l2;                /* the table's bytes */
    uint64_t l2_off;
    bool active;                /* named by the active L1 table (counts in the statistics) */
    uint32_t times;             /* references each entry stands for */
    uint64_t next_contiguous;   /* where the next data cluster would not be fragmented */
};

/* Read one L2 table into l2 (strict: within the budget of L2 bytes). */
static int read_l2(struct rc_walk *w, uint64_t l2_off, uint8_t *l2)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q);
    if (!w->res) {
        w->l2_read += cs;
        if (w->l2_read > REPAIR_MAX_L2_BYTES) {
            snprintf(w->err, w->errlen, "the L1 tables name more than %llu GiB of L2 tables",
                     REPAIR_MAX_L2_BYTES >> 30);
            return -EFBIG;
        }
    }
    int r = read_exact(q, l2, cs, l2_off);
    if (r < 0) {
        snprintf(w->err, w->errlen, "cannot read the L2 table at 0x%llx: %s",
                 (unsigned long long)l2_off, strerror(-r));
        if (w->res) {
            qcow2_walk_say(w, "ERROR: I/O error in check_refcounts_l2");
            w->res->check_errors++;
        }
    }
    return r;
}

static int walk_compressed(struct rc_walk *w, struct l2_pass *p, uint64_t j, uint64_t e, uint64_t bm)
{
    struct qcow2 *q = w->q;
    struct check_result *res = w->res;
    if (res && (e & QCOW_OFLAG_COPIED)) {
        e = bad_flags(w, p->l2, p->l2_off, j, e, QCOW_OFLAG_COPIED,
                      "copied flag set on a compressed cluster (it must never be)");
        e &= ~QCOW_OFLAG_COPIED;
    }
    if (res && bm) {
        qcow2_walk_say(w, "ERROR compressed cluster %llu with non-zero subcluster allocation bitmap, "
                    "entry=0x%llx", (unsigned long long)j, (unsigned long long)e);
        res->corruptions++;
        return 0;
    }
    uint64_t coff, nbytes;
    qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
    int r = count_n(w, coff, nbytes, "a compressed cluster", p->times);
    if (res && p->active) {
        /* Compressed clusters count as fragmented, as in QEMU. */
        res->allocated_clusters++;
        res->compressed_clusters++;
        res->fragmented_clusters++;
    }
    return r;
}

/* A data (or preallocated zero) cluster's entry. */
static int walk_allocated(struct rc_walk *w, struct l2_pass *p, uint64_t j, uint64_t e, uint64_t bm)
{
    struct qcow2 *q = w->q;
    struct check_result *res = w->res;
    uint64_t cs = cl_size(q), off = e & L2E_OFFSET_MASK;
    if (has_data_file(q)) {
        /* Data in an external data file is not refcounted. */
        if (res && p->active)
            res->allocated_clusters++;
        return 0;
    }
    if (res && ((bm >> 32) & bm)) {
        qcow2_walk_say(w, "ERROR offset=%llx: Allocated cluster has corrupted subcluster allocation bitmap",
                    (unsigned long long)off);
        res->corruptions++;
    }
    if (res && (off & (cs - 1))) {
        bool data = q->extl2 ? (bm & EXTL2_ALL_ALLOC) != 0 : !(e & QCOW_OFLAG_ZERO);
        res->corruptions++;
        if (data) {
            qcow2_walk_say(w, "ERROR offset=%llx: Data cluster is not properly aligned; L2 entry corrupted.",
                        (unsigned long long)off);
        } else {
            bool fix = w->fix & CHECK_FIX_ERRORS;
            qcow2_walk_say(w, "%s offset=%llx: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                        fix ? "Repairing" : "ERROR", (unsigned long long)off);
            if (fix && zero_l2_entry(w, p->l2, p->l2_off, j) == 0) {
                res->corruptions--;
                res->corruptions_fixed++;
                return 0;   /* the entry no longer names a cluster */
            }
        }
    }
    if (beyond_eof(w, off, cs) && (w->fix & CHECK_FIX_ERRORS) && can_zero(q)) {
        qcow2_walk_say(w, "Repairing offset=%llx: cluster past the end of the file; L2 entry made "
                    "a zero cluster", (unsigned long long)off);
        if (zero_l2_entry(w, p->l2, p->l2_off, j) == 0) {
            res->corruptions_fixed++;
            return 0;
        }
    }
    if (res && p->active) {
        res->allocated_clusters++;
        if (p->next_contiguous && off != p->next_contiguous)
            res->fragmented_clusters++;
        p->next_contiguous = off + cs;
    }
    /* A misaligned offset counts every cluster the range touches, as QEMU does. */
    return count_n(w, off, cs, "a data cluster", p->times);
}

/* Count the references of one L2 table, times each (strict: a table named
 * times more); the checker also checks every entry. */
static int walk_l2(struct rc_walk *w, uint64_t l2_off, bool active, uint8_t *l2, uint32_t times)
{
    struct qcow2 *q = w->q;
    struct check_result *res = w->res;
    struct l2_pass p = { .l2 = l2, .l2_off = l2_off, .active = active, .times = times };
    int r = read_l2(w, l2_off, l2);
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
        case QCOW2_CLUSTER_COMPRESSED:
            r = walk_compressed(w, &p, j, e, bm);
            break;
        case QCOW2_CLUSTER_NORMAL:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            r = walk_allocated(w, &p, j, e, bm);
            break;
        case QCOW2_CLUSTER_UNALLOCATED:
            if (res && (bm & EXTL2_ALL_ALLOC)) {
                qcow2_walk_say(w, "ERROR: Unallocated cluster has non-zero subcluster allocation map");
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

int qcow2_write_l1_entry(struct qcow2 *q, uint64_t l1_off, const uint64_t *l1, uint32_t l1_size, uint32_t i)
{
    qcow2_map_changed(q);
    uint32_t first = i & ~63u;
    char msg[256];
    if (qcow2_ol_conflict(q, l1_off + (uint64_t)first * 8, 512, OL_ACTIVE_L1 | OL_INACTIVE_L1, "an L1 table entry",
                    msg, sizeof(msg)) < 0)
        return -EIO;
    uint8_t *buf = io_zalloc(512);
    for (uint32_t k = first; k < first + 64 && k < l1_size; k++)
        be64_store(buf + (k - first) * 8, l1[k]);
    ssize_t n = file_pwrite(&q->file, buf, 512, l1_off + (uint64_t)first * 8, false);
    io_free(buf);
    return n < 0 ? (int)n : 0;
}

/* Count one L1 table (times references to it) and everything it reaches.
 * active: the image's own table (its statistics are what qemu-img check
 * reports).  Strict: an L2 table's entries are counted when it is first
 * met; further references (snapshots sharing it) are added by
 * count_shared_tables once every L1 table was walked. */
static int walk_l1(struct rc_walk *w, uint64_t l1_off, uint64_t *l1, uint32_t l1_size, bool active,
                   uint32_t times)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q);
    if (!l1_size)
        return 0;
    int r = count_n(w, l1_off, (uint64_t)l1_size * 8, active ? "the L1 table" : "a snapshot L1 table", times);
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
            qcow2_walk_say(w, "%s found L1 entry with reserved bits set: %llx", fix ? "Repairing" : "ERROR",
                        (unsigned long long)l1[i]);
            uint64_t old = l1[i];
            l1[i] &= ~L1E_RESERVED_MASK;
            if (fix && qcow2_write_l1_entry(q, l1_off, l1, l1_size, i) == 0 && file_sync(&q->file) == 0) {
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
            qcow2_walk_say(w, "Repairing l2_offset=%llx: L2 table past the end of the file; L1 entry cleared",
                        (unsigned long long)t);
            l1[i] = 0;
            r = qcow2_write_l1_entry(q, l1_off, l1, l1_size, i);
            if (r == 0)
                r = file_sync(&q->file);
            if (r < 0) {
                qcow2_walk_say(w, "ERROR: Failed to overwrite L1 table entry: %s", strerror(-r));
                w->res->check_errors++;
                break;
            }
            w->res->corruptions_fixed++;
            continue;
        }
        r = count_n(w, t, cs, "an L2 table", times);
        if (r == 0 && w->res && (t & (cs - 1))) {
            qcow2_walk_say(w, "ERROR l2_offset=%llx: Table is not cluster aligned; L1 entry corrupted",
                        (unsigned long long)t);
            w->res->corruptions++;
        }
        if (r < 0)
            break;
        /* The checker walks every reference, as QEMU (which reports a
         * shared table's problems each time). */
        if (w->res) {
            r = walk_l2(w, t, active, l2, 1);
            continue;
        }
        uint32_t before = table_ref(w, t, times);
        if (before == UINT32_MAX)
            r = -EFBIG;
        else if (before == 0)
            r = walk_l2(w, t, active, l2, 1);
    }
    io_free(l2);
    return r;
}

/* Strict: the references to shared L2 tables past the first (see walk_l1). */
static int count_shared_tables(struct rc_walk *w)
{
    uint8_t *l2 = io_alloc(cl_size(w->q));
    int r = 0;
    for (size_t i = 0; i < w->tcap && r == 0; i++)
        if (w->tables[i] && w->refs[i] > 1)
            r = walk_l2(w, w->tables[i], false, l2, w->refs[i] - 1);
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
    if (dir_size > (64u << 20)) {
        snprintf(w->err, w->errlen, "the bitmap directory (%llu bytes) is too large",
                 (unsigned long long)dir_size);
        return -EINVAL;
    }
    int r = qcow2_walk_count(w, dir_off, dir_size, "the bitmap directory");
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
        w->bitmap_read += (uint64_t)tsize * 8;
        if (w->bitmap_read > REPAIR_MAX_BITMAP_TABLE_BYTES) {
            snprintf(w->err, w->errlen, "the bitmap tables take more than %u MiB",
                     REPAIR_MAX_BITMAP_TABLE_BYTES >> 20);
            r = -EINVAL;
            break;
        }
        r = qcow2_walk_count(w, toff, (uint64_t)tsize * 8, "a bitmap table");
        uint64_t *tab = malloc((uint64_t)tsize * 8 + 1);
        if (r == 0 && !tab)
            r = -ENOMEM;
        if (r == 0)
            r = read_exact(q, tab, (uint64_t)tsize * 8, toff);
        for (uint32_t t = 0; t < tsize && r == 0; t++) {
            uint64_t e = be64_load(&tab[t]) & L2E_OFFSET_MASK;
            if (e)
                r = qcow2_walk_count(w, e, cl_size(q), "a bitmap data cluster");
        }
        free(tab);
    }
    free(dir);
    return r;
}

static int cmp_snapshot_l1(const void *a, const void *b)
{
    const struct qcow2_snapshot *x = *(const struct qcow2_snapshot *const *)a;
    const struct qcow2_snapshot *y = *(const struct qcow2_snapshot *const *)b;
    if (x->l1_table_offset != y->l1_table_offset)
        return x->l1_table_offset < y->l1_table_offset ? -1 : 1;
    return x->l1_size < y->l1_size ? -1 : x->l1_size > y->l1_size;
}

/* The snapshots' L1 tables.  Strict: snapshots naming the same L1 table
 * are counted together (the table is read once), within REPAIR_MAX_L1_BYTES.
 * The checker takes them one by one in table order, as QEMU. */
static int walk_snapshots(struct rc_walk *w)
{
    struct qcow2 *q = w->q;
    uint32_t nb = q->h.nb_snapshots;
    const struct qcow2_snapshot **order = malloc(nb * sizeof(*order) + 1);
    if (!order)
        return -ENOMEM;
    for (uint32_t i = 0; i < nb; i++)
        order[i] = &q->snapshots[i];
    if (!w->res)
        qsort(order, nb, sizeof(*order), cmp_snapshot_l1);
    int r = 0;
    for (uint32_t i = 0, n; i < nb && r == 0; i += n) {
        const struct qcow2_snapshot *s = order[i];
        for (n = 1; !w->res && i + n < nb && !cmp_snapshot_l1(&order[i], &order[i + n]); n++)
            ;
        uint64_t bytes = (uint64_t)s->l1_size * 8;
        if (w->res && (s->l1_table_offset & (cl_size(q) - 1))) {
            qcow2_walk_say(w, "ERROR snapshot %s (%s) l1_offset=%#llx: L1 table is not cluster aligned; "
                        "snapshot table entry corrupted", s->id, s->name, (unsigned long long)s->l1_table_offset);
            w->res->corruptions++;
            w->work_done += s->l1_size;
            continue;
        }
        if (w->res && bytes > QCOW2_MAX_L1_BYTES) {
            qcow2_walk_say(w, "ERROR snapshot %s (%s) l1_size=%#x: L1 table is too large; "
                        "snapshot table entry corrupted", s->id, s->name, s->l1_size);
            w->res->corruptions++;
            w->work_done += s->l1_size;
            continue;
        }
        if (!w->res) {
            w->l1_read += bytes;
            if (w->l1_read > REPAIR_MAX_L1_BYTES) {
                snprintf(w->err, w->errlen, "the snapshot L1 tables take more than %llu MiB",
                         REPAIR_MAX_L1_BYTES >> 20);
                r = -EFBIG;
                break;
            }
        }
        uint64_t *sl1 = calloc(s->l1_size + 1, 8);
        r = !sl1 ? -ENOMEM : read_exact(q, sl1, bytes, s->l1_table_offset);
        for (uint32_t j = 0; j < s->l1_size && r == 0; j++)
            sl1[j] = be64_load(&sl1[j]);
        if (r == 0)
            r = walk_l1(w, s->l1_table_offset, sl1, s->l1_size, false, n);
        free(sl1);
    }
    free(order);
    return r;
}

int qcow2_walk_image(struct rc_walk *w)
{
    struct qcow2 *q = w->q;
    qcow2_map_changed(q);   /* -r may rewrite tables outside the cache */
    w->work_done = 0;
    w->work_total = q->h.l1_size;
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++)
        w->work_total += q->snapshots[i].l1_size;

    int r = qcow2_walk_count(w, 0, cl_size(q), "the header");
    if (r == 0)
        r = walk_l1(w, q->h.l1_table_offset, q->l1, q->h.l1_size, true, 1);
    if (r == 0 && q->h.nb_snapshots)
        r = walk_snapshots(w);
    if (r == 0 && q->h.nb_snapshots)
        r = qcow2_walk_count(w, q->h.snapshots_offset, q->snapshot_table_len, "the snapshot table");
    if (r == 0 && q->h.has_crypto_ext)  /* LUKS header and key material */
        r = qcow2_walk_count(w, q->h.crypto_offset, q->h.crypto_length, "the encryption header");
    if (r == 0 && !w->res)
        r = count_shared_tables(w);
    if (r == 0)
        r = count_bitmaps(w);
    if (w->progress && w->work_total)
        w->progress(w->progress_ctx, w->work_total, w->work_total);
    return r;
}

/* Make COPIED flags in the active L1/L2 tables say "refcount is exactly 1".
 * Strict walks only: it visits the L2 tables the walk met (w->tables). */
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
        uint64_t want = qcow2_walk_get(w, t >> cl_bits(q)) == 1 ? QCOW_OFLAG_COPIED : 0;
        if ((q->l1[i] & QCOW_OFLAG_COPIED) != want) {
            qcow2_map_changed(q);
            q->l1[i] = (q->l1[i] & ~QCOW_OFLAG_COPIED) | want;
            l1_changed = true;
        }
        /* Each table once (the active L1 may name one several times). */
        size_t h = w->tcap ? table_slot(w->tables, w->tcap, t) : 0;
        if (!w->tcap || !w->tables[h] || !w->refs[h])
            continue;
        w->refs[h] = 0;
        r = read_exact(q, l2, cs, t);
        bool changed = false;
        for (uint64_t j = 0; j < q->h.l2_entries && r == 0; j++) {
            uint8_t *p = l2 + j * q->h.l2_entry_size;
            uint64_t e = be64_load(p);
            enum qcow2_cluster_type ty = qcow2_l2_entry_type(&q->h, e, q->extl2);
            if ((ty != QCOW2_CLUSTER_NORMAL && ty != QCOW2_CLUSTER_ZERO_ALLOC) || has_data_file(q))
                continue;   /* data-file clusters keep COPIED: their refcount is 1 by definition */
            uint64_t v = qcow2_walk_get(w, (e & L2E_OFFSET_MASK) >> cl_bits(q)) == 1 ? QCOW_OFLAG_COPIED : 0;
            if ((e & QCOW_OFLAG_COPIED) != v) {
                be64_store(p, (e & ~QCOW_OFLAG_COPIED) | v);
                changed = true;
            }
        }
        if (r == 0 && changed)
            r = qcow2_ol_conflict(q, t, cs, OL_ACTIVE_L2, "an L2 table", w->err, w->errlen);
        if (r == 0 && changed) {
            ssize_t n = file_pwrite(&q->file, l2, cs, t, false);
            r = n < 0 ? (int)n : 0;
        }
    }
    io_free(l2);
    if (r == 0 && l1_changed)
        r = qcow2_ol_conflict(q, q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8, OL_ACTIVE_L1,
                        "the L1 table", w->err, w->errlen);
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

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Write the new refcount blocks (range indexes blk[0..nblocks), placed
 * from cluster start on): counts, and 1 for the clusters of the new area
 * [start, area_end).  Consecutive blocks go out together. */
static int write_blocks(struct rc_walk *w, const uint64_t *blk, uint64_t nblocks, uint64_t start,
                        uint64_t area_end)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q), per = REPAIR_WRITE_BATCH / cs ? REPAIR_WRITE_BATCH / cs : 1;
    uint8_t *buf = io_alloc(per * cs);
    int r = 0;
    for (uint64_t b = 0; b < nblocks && r == 0; b += per) {
        uint64_t n = nblocks - b < per ? nblocks - b : per;
        memset(buf, 0, n * cs);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t ci = blk[b + i];
            const uint32_t *c = chunk_find(w, ci);
            for (uint64_t j = 0; j < w->rbe; j++) {
                uint64_t cl = ci * w->rbe + j;
                uint64_t v = cl >= start && cl < area_end ? 1 : c ? c[j] : 0;
                if (v)
                    qcow2_refcount_set(buf + i * cs, q->h.refcount_order, j, v);
            }
        }
        ssize_t n2 = file_pwrite(&q->file, buf, n * cs, (start + b) * cs, false);
        r = n2 < 0 ? (int)n2 : 0;
    }
    io_free(buf);
    return r;
}

/* Where the rebuilt refcount structures go: after everything counted. */
struct rebuild_plan {
    uint64_t *blk;              /* refcount block ranges: those in use, then the area's */
    uint64_t nused;             /* ranges in use */
    uint64_t start;             /* the new area's first cluster */
    uint64_t nblocks, ntable;   /* its refcount blocks, then its table clusters */
};

/* The ranges in use, in order; every count must fit the refcount width. */
static int ranges_in_use(struct rc_walk *w, struct rebuild_plan *pl)
{
    struct qcow2 *q = w->q;
    uint64_t max = qcow2_refcount_max(q->h.refcount_order);
    pl->blk = malloc((w->used + 2) * sizeof(*pl->blk));
    if (!pl->blk)
        return -ENOMEM;
    for (size_t i = 0; i < w->cap; i++) {
        if (!w->keys[i])
            continue;
        pl->blk[pl->nused++] = w->keys[i] - 1;
        for (uint64_t j = 0; j < w->rbe; j++)
            if (w->chunks[i][j] > max) {
                snprintf(w->err, w->errlen, "cluster %llu needs refcount %u, more than %u-bit refcounts hold",
                         (unsigned long long)((w->keys[i] - 1) * w->rbe + j), w->chunks[i][j],
                         q->h.refcount_bits);
                return -ERANGE;
            }
    }
    qsort(pl->blk, pl->nused, sizeof(*pl->blk), cmp_u64);
    return 0;
}

/* New refcount blocks and table after everything counted and the end
 * of the file, so nothing they overwrite is in use: a block for each
 * range in use and each range the new area itself falls in (at most
 * two more: the area is far smaller than a range, except for tiny
 * clusters), then the table.  pl->blk gets the area's ranges after those
 * in use (the first may be the last in use). */
static int place_area(struct rc_walk *w, struct rebuild_plan *pl)
{
    uint64_t cs = cl_size(w->q), rbe = w->rbe, nused = pl->nused;
    uint64_t start = w->nclusters, nblocks = nused, ntable = 1, first_a = 0, last_a = 0;
    for (;;) {
        uint64_t end = start + nblocks + ntable;
        first_a = start / rbe;
        last_a = (end - 1) / rbe;
        uint64_t na = last_a - first_a + 1 - (nused && pl->blk[nused - 1] == first_a);
        uint64_t need_blocks = nused + na;
        uint64_t need_table = ((last_a + 1) * 8 + cs - 1) / cs;
        if (need_blocks <= nblocks && need_table <= ntable)
            break;
        nblocks = need_blocks > nblocks ? need_blocks : nblocks;
        ntable = need_table > ntable ? need_table : ntable;
        if (ntable * cs > QCOW2_MAX_REFTABLE_BYTES)
            break;
    }
    if (ntable * cs > QCOW2_MAX_REFTABLE_BYTES) {
        snprintf(w->err, w->errlen, "the rebuilt refcount table would exceed QEMU's limit");
        return -EFBIG;
    }
    uint64_t *nb = realloc(pl->blk, (nblocks + 1) * sizeof(*pl->blk));
    if (!nb)
        return -ENOMEM;
    pl->blk = nb;
    uint64_t n = nused;
    for (uint64_t ci = first_a; ci <= last_a && n < nblocks; ci++)
        if (!nused || ci != pl->blk[nused - 1])
            pl->blk[n++] = ci;
    pl->start = start;
    pl->nblocks = n;
    pl->ntable = ntable;
    return 0;
}

/* COPIED flags first (they only describe refcounts we are about to make
 * true), then the new structures, a sync, and the header switch. */
static int write_rebuilt(struct rc_walk *w, const struct rebuild_plan *pl, const uint8_t *tab,
                         bool fix_copied)
{
    struct qcow2 *q = w->q;
    uint64_t cs = cl_size(q), area = pl->nblocks + pl->ntable;
    w->err[0] = '\0';
    int r = fix_copied ? fix_copied_flags(w) : 0;
    /* Past everything counted; the old refcount blocks, about to be
     * replaced, may lie anywhere. */
    if (r == 0)
        r = qcow2_ol_conflict(q, pl->start * cs, area * cs, OL_REFBLOCK, "the rebuilt refcount structures",
                        w->err, w->errlen);
    if (r == 0)
        r = write_blocks(w, pl->blk, pl->nblocks, pl->start, pl->start + area);
    if (r == 0) {
        ssize_t wr = file_pwrite(&q->file, tab, pl->ntable * cs, (pl->start + pl->nblocks) * cs, false);
        r = wr < 0 ? (int)wr : file_sync(&q->file);
    }
    if (r == 0) {
        q->h.refcount_table_offset = (pl->start + pl->nblocks) * cs;
        q->h.refcount_table_clusters = (uint32_t)pl->ntable;
        r = qcow2_write_header_fields(q);
        if (r == 0)
            r = file_sync(&q->file);
    }
    if (r < 0 && !w->err[0])
        snprintf(w->err, w->errlen, "writing new refcount structures failed: %s", strerror(-r));
    return r;
}

int qcow2_rc_rebuild(struct rc_walk *w, bool fix_copied)
{
    struct qcow2 *q = w->q;
    qcow2_map_changed(q);
    uint64_t cs = cl_size(q);
    struct rebuild_plan pl = { .nused = 0 };
    uint64_t *newtab = NULL;
    uint8_t *newdirty = NULL, *tab = NULL;
    int r = ranges_in_use(w, &pl);
    if (r == 0)
        r = place_area(w, &pl);
    if (r < 0)
        goto out;
    uint64_t area = pl.nblocks + pl.ntable;
    uint64_t entries = pl.ntable * cs / 8;
    newtab = calloc(entries, sizeof(uint64_t));
    newdirty = calloc((entries * 8 + 511) / 512 + 1, 1);
    tab = io_zalloc(pl.ntable * cs);
    if (!newtab || !newdirty) {
        r = -ENOMEM;
        goto out;
    }
    for (uint64_t b = 0; b < pl.nblocks; b++) {
        newtab[pl.blk[b]] = (pl.start + b) * cs;
        be64_store(tab + pl.blk[b] * 8, newtab[pl.blk[b]]);
    }
    r = write_rebuilt(w, &pl, tab, fix_copied);
    if (r < 0)
        goto out;
    qcow2_install_reftable(q, newtab, newdirty, entries);
    newtab = NULL;
    newdirty = NULL;
    qcow2_note_host_end(q, (pl.start + area) * cs);
    q->free_hint = 0;
    qcow2_cache_discard_range(&q->rcc, 0, UINT64_MAX);
    qcow2_cache_discard_range(&q->l2c, 0, UINT64_MAX);
out:
    io_free(tab);
    free(newtab);
    free(newdirty);
    free(pl.blk);
    return r;
}

int qcow2_rebuild_refcounts(struct qcow2 *q, char *err, size_t errlen)
{
    struct rc_walk w;
    int r = qcow2_walk_init(&w, q, (q->host_end + cl_size(q) - 1) / cl_size(q), err, errlen);
    if (r == 0)
        r = qcow2_walk_image(&w);
    if (r == 0)
        r = qcow2_rc_rebuild(&w, true);
    qcow2_walk_free(&w);
    return r;
}
