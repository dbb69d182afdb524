/* Rebuilding refcounts of an image left dirty (lazy refcounts, or a crash
 * of a writer that used them).  Every cluster in use is counted by walking
 * all metadata; then fresh refcount structures describing exactly that are
 * written past the end of the file, synced, and switched in with one header
 * write.  A crash in between leaves the old (dirty) structures in force, and
 * the next open repairs again.
 *
 * Memory and the structures written grow with the clusters in use, not
 * with the file's size: counts are kept per refcount-block range, only for
 * the ranges something lies in, and only those ranges get a block (a
 * sparse file of terabytes with a few tables costs a few blocks).  The
 * counts of one image may take REPAIR_MEM_BUDGET at most; beyond it the
 * repair is refused with a message (qemu-img check -r all can do it). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

#define REPAIR_MEM_BUDGET (256ull << 20)
#define REPAIR_WRITE_BATCH (1u << 20)
/* Work bounds.  An L2 table named by several L1 entries (snapshots share
 * them) is read once and its entries counted once per reference, so the
 * work grows with the distinct tables; these caps bound it whatever the
 * file (snapshot L1 tables may all lie on the same bytes). */
#define REPAIR_MAX_L1_BYTES (256ull << 20)      /* snapshot L1 tables read, in total */
#define REPAIR_MAX_L2_BYTES (64ull << 30)       /* distinct L2 tables read */
#define REPAIR_MAX_BITMAP_TABLE_BYTES (64u << 20)

/* Reference counts of the clusters in use, one array per refcount-block
 * range (chunk) that holds any, found through an open-addressing table. */
struct counter {
    struct qcow2 *q;
    uint64_t nclusters;         /* clusters of the file: nothing in use lies beyond */
    uint64_t rbe;               /* clusters per chunk (refcount block entries) */
    uint64_t *keys;             /* chunk index + 1; 0 = empty slot */
    uint32_t **chunks;
    size_t cap, used;
    uint64_t last_ci;           /* the chunk count_range touched last */
    uint32_t *last;
    uint64_t l1_read, l2_read, bitmap_read;  /* bytes of tables read so far */
    /* Distinct L2 tables seen: offset (0 = empty slot), references. */
    uint64_t *tables;
    uint32_t *refs;
    size_t tcap, tused;
    char *err;
    size_t errlen;
};

static size_t chunk_slot(const struct counter *k, uint64_t ci)
{
    size_t m = k->cap - 1, h = (size_t)((ci * 0x9e3779b97f4a7c15ull) >> 29) & m;
    while (k->keys[h] && k->keys[h] != ci + 1)
        h = (h + 1) & m;
    return h;
}

static uint32_t *chunk_find(const struct counter *k, uint64_t ci)
{
    if (!k->cap)
        return NULL;
    size_t h = chunk_slot(k, ci);
    return k->keys[h] ? k->chunks[h] : NULL;
}

static uint32_t *chunk_get(struct counter *k, uint64_t ci)
{
    uint32_t *c = chunk_find(k, ci);
    if (c)
        return c;
    if ((uint64_t)(k->used + 1) * k->rbe * sizeof(uint32_t) + (uint64_t)k->tcap * 12 > REPAIR_MEM_BUDGET) {
        snprintf(k->err, k->errlen, "the clusters in use are too many to count here (more than "
                 "%llu MiB of refcounts)", REPAIR_MEM_BUDGET >> 20);
        return NULL;
    }
    if ((k->used + 1) * 2 > k->cap) {
        size_t ncap = k->cap ? k->cap * 2 : 64;
        struct counter n = *k;
        n.cap = ncap;
        n.keys = calloc(ncap, sizeof(*n.keys));
        n.chunks = calloc(ncap, sizeof(*n.chunks));
        if (!n.keys || !n.chunks) {
            free(n.keys);
            free(n.chunks);
            snprintf(k->err, k->errlen, "out of memory");
            return NULL;
        }
        for (size_t i = 0; i < k->cap; i++) {
            if (!k->keys[i])
                continue;
            size_t h = chunk_slot(&n, k->keys[i] - 1);
            n.keys[h] = k->keys[i];
            n.chunks[h] = k->chunks[i];
        }
        free(k->keys);
        free(k->chunks);
        k->keys = n.keys;
        k->chunks = n.chunks;
        k->cap = ncap;
    }
    c = calloc(k->rbe, sizeof(uint32_t));
    if (!c) {
        snprintf(k->err, k->errlen, "out of memory");
        return NULL;
    }
    size_t h = chunk_slot(k, ci);
    k->keys[h] = ci + 1;
    k->chunks[h] = c;
    k->used++;
    return c;
}

static uint32_t count_of(const struct counter *k, uint64_t cluster)
{
    uint32_t *c = chunk_find(k, cluster / k->rbe);
    return c ? c[cluster % k->rbe] : 0;
}

static void counter_free(struct counter *k)
{
    for (size_t i = 0; i < k->cap; i++)
        free(k->chunks[i]);
    free(k->keys);
    free(k->chunks);
    free(k->tables);
    free(k->refs);
}

static size_t table_slot(const uint64_t *tables, size_t cap, uint64_t t)
{
    size_t m = cap - 1, h = (size_t)((t * 0x9e3779b97f4a7c15ull) >> 29) & m;
    while (tables[h] && tables[h] != t)
        h = (h + 1) & m;
    return h;
}

/* times more references to the L2 table at t; returns its references
 * before them (0: first met), or UINT32_MAX on failure (k->err set). */
static uint32_t table_ref(struct counter *k, uint64_t t, uint32_t times)
{
    if (k->tcap) {
        size_t h = table_slot(k->tables, k->tcap, t);
        if (k->tables[h]) {
            uint32_t before = k->refs[h];
            if (before > UINT32_MAX - 1 - times) {
                snprintf(k->err, k->errlen, "refcount overflow at the L2 table at 0x%llx",
                         (unsigned long long)t);
                return UINT32_MAX;
            }
            k->refs[h] += times;
            return before;
        }
    }
    uint64_t mem = (uint64_t)k->used * k->rbe * sizeof(uint32_t) + (uint64_t)k->tcap * 12;
    if ((k->tused + 1) * 2 > k->tcap) {
        size_t ncap = k->tcap ? k->tcap * 2 : 256;
        if (mem + (uint64_t)ncap * 12 > REPAIR_MEM_BUDGET) {
            snprintf(k->err, k->errlen, "the L1 tables name too many L2 tables to count here");
            return UINT32_MAX;
        }
        uint64_t *nt = calloc(ncap, sizeof(*nt));
        uint32_t *nr = calloc(ncap, sizeof(*nr));
        if (!nt || !nr) {
            free(nt);
            free(nr);
            snprintf(k->err, k->errlen, "out of memory");
            return UINT32_MAX;
        }
        for (size_t i = 0; i < k->tcap; i++) {
            if (!k->tables[i])
                continue;
            size_t h = table_slot(nt, ncap, k->tables[i]);
            nt[h] = k->tables[i];
            nr[h] = k->refs[i];
        }
        free(k->tables);
        free(k->refs);
        k->tables = nt;
        k->refs = nr;
        k->tcap = ncap;
    }
    size_t h = table_slot(k->tables, k->tcap, t);
    k->tables[h] = t;
    k->refs[h] = times;
    k->tused++;
    return 0;
}

/* times more references to every cluster of [off, off+len). */
static int count_range_n(struct counter *k, uint64_t off, uint64_t len, const char *what,
                         uint32_t times)
{
    if (!len)
        return 0;
    uint64_t first = off >> cl_bits(k->q), last = (off + len - 1) >> cl_bits(k->q);
    if (last >= k->nclusters || off + len < off) {
        snprintf(k->err, k->errlen, "%s at 0x%llx lies past the end of the file", what,
                 (unsigned long long)off);
        return -EINVAL;
    }
    for (uint64_t c = first; c <= last; c++) {
        uint64_t ci = c / k->rbe;
        if (!k->last || k->last_ci != ci) {
            k->last = chunk_get(k, ci);
            k->last_ci = ci;
            if (!k->last)
                return -EFBIG;
        }
        uint32_t *v = &k->last[c % k->rbe];
        if (*v > UINT32_MAX - times) {
            snprintf(k->err, k->errlen, "refcount overflow at cluster %llu", (unsigned long long)c);
            return -EINVAL;
        }
        *v += times;
    }
    return 0;
}

static int count_range(struct counter *k, uint64_t off, uint64_t len, const char *what)
{
    return count_range_n(k, off, len, what, 1);
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

/* Count the entries of the L2 table at t, times references each. */
static int count_l2_entries(struct counter *k, uint8_t *l2, uint64_t t, uint32_t times)
{
    struct qcow2 *q = k->q;
    uint64_t cs = cl_size(q);
    k->l2_read += cs;
    if (k->l2_read > REPAIR_MAX_L2_BYTES) {
        snprintf(k->err, k->errlen, "the L1 tables name more than %llu GiB of L2 tables",
                 REPAIR_MAX_L2_BYTES >> 30);
        return -EFBIG;
    }
    int r = read_exact(q, l2, cs, t);
    for (uint64_t j = 0; j < q->h.l2_entries && r == 0; j++) {
        uint64_t e = be64_load(l2 + j * q->h.l2_entry_size);
        switch (qcow2_l2_entry_type(&q->h, e, q->extl2)) {
        case QCOW2_CLUSTER_NORMAL:
        case QCOW2_CLUSTER_ZERO_ALLOC:
            if (!has_data_file(q))  /* data in a data file is not refcounted */
                r = count_range_n(k, e & L2E_OFFSET_MASK, cs, "a data cluster", times);
            break;
        case QCOW2_CLUSTER_COMPRESSED: {
            uint64_t coff, nbytes;
            qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
            r = count_range_n(k, coff, nbytes, "a compressed cluster", times);
            break;
        }
        case QCOW2_CLUSTER_INVALID:
            snprintf(k->err, k->errlen, "L2 entry 0x%llx in the table at 0x%llx is invalid",
                     (unsigned long long)e, (unsigned long long)t);
            r = -EINVAL;
            break;
        default:
            break;
        }
    }
    return r;
}

/* Count one L1 table (times references to it) and the L2 tables it names.
 * A table's entries are counted when it is first met; further references
 * (snapshots sharing it) are added by count_shared_tables once every L1
 * table was walked. */
static int count_l1(struct counter *k, const uint64_t *l1, uint32_t l1_size, uint32_t times)
{
    struct qcow2 *q = k->q;
    uint64_t cs = cl_size(q);
    uint8_t *l2 = io_alloc(cs);
    int r = 0;
    for (uint32_t i = 0; i < l1_size && r == 0; i++) {
        uint64_t t = l1[i] & L1E_OFFSET_MASK;
        if (!t)
            continue;
        if ((t & (cs - 1)) || (l1[i] & L1E_RESERVED_MASK)) {
            snprintf(k->err, k->errlen, "L1 entry %u is invalid (0x%llx)", i, (unsigned long long)l1[i]);
            r = -EINVAL;
            break;
        }
        r = count_range_n(k, t, cs, "an L2 table", times);
        if (r < 0)
            break;
        uint32_t before = table_ref(k, t, times);
        if (before == UINT32_MAX)
            r = -EFBIG;
        else if (before == 0)
            r = count_l2_entries(k, l2, t, 1);
    }
    io_free(l2);
    return r;
}

static int count_shared_tables(struct counter *k)
{
    uint8_t *l2 = io_alloc(cl_size(k->q));
    int r = 0;
    for (size_t i = 0; i < k->tcap && r == 0; i++)
        if (k->tables[i] && k->refs[i] > 1)
            r = count_l2_entries(k, l2, k->tables[i], k->refs[i] - 1);
    io_free(l2);
    return r;
}

/* Persistent bitmaps own clusters too (directory, tables, data): count them
 * so the rebuild does not hand them out again. */
static int count_bitmaps(struct counter *k)
{
    struct qcow2 *q = k->q;
    uint32_t pos = q->h.version >= 3 ? q->h.header_length : QCOW2_V2_HEADER_LEN;
    uint32_t limit = q->hdr_len < q->h.cluster_size ? q->hdr_len : (uint32_t)q->h.cluster_size;
    while (pos + 8 <= limit) {
        uint32_t type = be32_load(q->hdr_buf + pos), len = be32_load(q->hdr_buf + pos + 4);
        if (type == QCOW2_EXT_END || pos + 8 + (uint64_t)len > limit)
            break;
        if (type == QCOW2_EXT_BITMAPS && len >= 24) {
            const uint8_t *x = q->hdr_buf + pos + 8;
            uint32_t nb = be32_load(x);
            uint64_t dir_size = be64_load(x + 8), dir_off = be64_load(x + 16);
            if (dir_size > (64u << 20)) {
                snprintf(k->err, k->errlen, "the bitmap directory (%llu bytes) is too large",
                         (unsigned long long)dir_size);
                return -EINVAL;
            }
            int r = count_range(k, dir_off, dir_size, "the bitmap directory");
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
                k->bitmap_read += (uint64_t)tsize * 8;
                if (k->bitmap_read > REPAIR_MAX_BITMAP_TABLE_BYTES) {
                    snprintf(k->err, k->errlen, "the bitmap tables take more than %u MiB",
                             REPAIR_MAX_BITMAP_TABLE_BYTES >> 20);
                    r = -EINVAL;
                    break;
                }
                r = count_range(k, toff, (uint64_t)tsize * 8, "a bitmap table");
                uint64_t *tab = malloc((uint64_t)tsize * 8 + 1);
                if (r == 0 && !tab)
                    r = -ENOMEM;
                if (r == 0)
                    r = read_exact(q, tab, (uint64_t)tsize * 8, toff);
                for (uint32_t t = 0; t < tsize && r == 0; t++) {
                    uint64_t e = be64_load(&tab[t]) & L2E_OFFSET_MASK;
                    if (e)
                        r = count_range(k, e, cl_size(q), "a bitmap data cluster");
                }
                free(tab);
            }
            free(dir);
            if (r < 0)
                return r;
        }
        pos += 8 + ((len + 7) & ~7u);
    }
    return 0;
}

/* Make COPIED flags in the active L1/L2 tables say "refcount is exactly 1". */
static int fix_copied_flags(struct counter *k)
{
    struct qcow2 *q = k->q;
    uint64_t cs = cl_size(q);
    uint8_t *l2 = io_alloc(cs);
    int r = 0;
    bool l1_changed = false;
    for (uint32_t i = 0; i < q->h.l1_size && r == 0; i++) {
        uint64_t t = q->l1[i] & L1E_OFFSET_MASK;
        if (!t)
            continue;
        uint64_t want = count_of(k, t >> cl_bits(q)) == 1 ? QCOW_OFLAG_COPIED : 0;
        if ((q->l1[i] & QCOW_OFLAG_COPIED) != want) {
            q->l1[i] = (q->l1[i] & ~QCOW_OFLAG_COPIED) | want;
            l1_changed = true;
        }
        /* Each table once (the active L1 may name one several times). */
        size_t h = k->tcap ? table_slot(k->tables, k->tcap, t) : 0;
        if (!k->tcap || !k->tables[h] || !k->refs[h])
            continue;
        k->refs[h] = 0;
        r = read_exact(q, l2, cs, t);
        bool changed = false;
        for (uint64_t j = 0; j < q->h.l2_entries && r == 0; j++) {
            uint8_t *p = l2 + j * q->h.l2_entry_size;
            uint64_t e = be64_load(p);
            enum qcow2_cluster_type ty = qcow2_l2_entry_type(&q->h, e, q->extl2);
            if ((ty != QCOW2_CLUSTER_NORMAL && ty != QCOW2_CLUSTER_ZERO_ALLOC) || has_data_file(q))
                continue;   /* data-file clusters keep COPIED: their refcount is 1 by definition */
            uint64_t w = count_of(k, (e & L2E_OFFSET_MASK) >> cl_bits(q)) == 1 ? QCOW_OFLAG_COPIED : 0;
            if ((e & QCOW_OFLAG_COPIED) != w) {
                be64_store(p, (e & ~QCOW_OFLAG_COPIED) | w);
                changed = true;
            }
        }
        if (r == 0 && changed)
            r = ol_conflict(q, t, cs, OL_ACTIVE_L2, "an L2 table", k->err, k->errlen);
        if (r == 0 && changed) {
            ssize_t n = file_pwrite(&q->file, l2, cs, t, false);
            r = n < 0 ? (int)n : 0;
        }
    }
    io_free(l2);
    if (r == 0 && l1_changed)
        r = ol_conflict(q, q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8, OL_ACTIVE_L1,
                        "the L1 table", k->err, k->errlen);
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

static int cmp_snapshot_l1(const void *a, const void *b)
{
    const struct qcow2_snapshot *x = *(const struct qcow2_snapshot *const *)a;
    const struct qcow2_snapshot *y = *(const struct qcow2_snapshot *const *)b;
    if (x->l1_table_offset != y->l1_table_offset)
        return x->l1_table_offset < y->l1_table_offset ? -1 : 1;
    return x->l1_size < y->l1_size ? -1 : x->l1_size > y->l1_size;
}

/* The snapshot table and the snapshots' L1 tables.  Snapshots naming the
 * same L1 table are counted together: the table is read once. */
static int count_snapshots(struct counter *k)
{
    struct qcow2 *q = k->q;
    uint32_t nb = q->h.nb_snapshots;
    int r = count_range(k, q->h.snapshots_offset, q->snapshot_table_len, "the snapshot table");
    const struct qcow2_snapshot **order = malloc(nb * sizeof(*order));
    if (!order)
        return -ENOMEM;
    for (uint32_t i = 0; i < nb; i++)
        order[i] = &q->snapshots[i];
    qsort(order, nb, sizeof(*order), cmp_snapshot_l1);
    for (uint32_t i = 0, n; i < nb && r == 0; i += n) {
        const struct qcow2_snapshot *s = order[i];
        for (n = 1; i + n < nb && !cmp_snapshot_l1(&order[i], &order[i + n]); n++)
            ;
        uint64_t bytes = (uint64_t)s->l1_size * 8;
        r = count_range_n(k, s->l1_table_offset, bytes, "a snapshot L1 table", n);
        k->l1_read += bytes;
        if (r == 0 && k->l1_read > REPAIR_MAX_L1_BYTES) {
            snprintf(k->err, k->errlen, "the snapshot L1 tables take more than %llu MiB",
                     REPAIR_MAX_L1_BYTES >> 20);
            r = -EFBIG;
        }
        uint64_t *sl1 = NULL;
        if (r == 0) {
            sl1 = calloc(s->l1_size + 1, 8);
            r = !sl1 ? -ENOMEM : read_exact(q, sl1, bytes, s->l1_table_offset);
            for (uint32_t j = 0; j < s->l1_size && r == 0; j++)
                sl1[j] = be64_load(&sl1[j]);
        }
        if (r == 0)
            r = count_l1(k, sl1, s->l1_size, n);
        free(sl1);
    }
    free(order);
    return r;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Write the new refcount blocks (chunk indexes blk[0..nblocks), placed
 * from cluster start on): counts, and 1 for the clusters of the new area
 * [start, area_end).  Consecutive blocks go out together. */
static int write_blocks(struct counter *k, const uint64_t *blk, uint64_t nblocks, uint64_t start,
                        uint64_t area_end)
{
    struct qcow2 *q = k->q;
    uint64_t cs = cl_size(q), per = REPAIR_WRITE_BATCH / cs ? REPAIR_WRITE_BATCH / cs : 1;
    uint8_t *buf = io_alloc(per * cs);
    int r = 0;
    for (uint64_t b = 0; b < nblocks && r == 0; b += per) {
        uint64_t n = nblocks - b < per ? nblocks - b : per;
        memset(buf, 0, n * cs);
        for (uint64_t i = 0; i < n; i++) {
            uint64_t ci = blk[b + i];
            const uint32_t *c = chunk_find(k, ci);
            for (uint64_t j = 0; j < k->rbe; j++) {
                uint64_t cl = ci * k->rbe + j;
                uint64_t v = cl >= start && cl < area_end ? 1 : c ? c[j] : 0;
                if (v)
                    qcow2_refcount_set(buf + i * cs, q->h.refcount_order, j, v);
            }
        }
        ssize_t w = file_pwrite(&q->file, buf, n * cs, (start + b) * cs, false);
        r = w < 0 ? (int)w : 0;
    }
    io_free(buf);
    return r;
}

int qcow2_rebuild_refcounts(struct qcow2 *q, char *err, size_t errlen)
{
    uint64_t cs = cl_size(q), rbe = q->h.refcount_block_entries;
    uint64_t nclusters = (q->host_end + cs - 1) / cs;
    struct counter k = { .q = q, .nclusters = nclusters, .rbe = rbe, .err = err, .errlen = errlen };
    uint64_t *blk = NULL, *newtab = NULL;
    uint8_t *newdirty = NULL;
    int r = count_range(&k, 0, cs, "the header");
    if (r == 0)
        r = count_range(&k, q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8, "the L1 table");
    if (r == 0 && q->h.has_crypto_ext)  /* LUKS header and key material */
        r = count_range(&k, q->h.crypto_offset, q->h.crypto_length, "the encryption header");
    if (r == 0)
        r = count_l1(&k, q->l1, q->h.l1_size, 1);
    if (r == 0 && q->h.nb_snapshots)
        r = count_snapshots(&k);
    if (r == 0)
        r = count_shared_tables(&k);
    if (r == 0)
        r = count_bitmaps(&k);
    if (r < 0)
        goto out;

    /* The chunks in use, in order; every count must fit the refcount width. */
    uint64_t nused = 0, max = qcow2_refcount_max(q->h.refcount_order);
    blk = malloc((k.used + 2) * sizeof(*blk));
    if (!blk) {
        r = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < k.cap; i++) {
        if (!k.keys[i])
            continue;
        blk[nused++] = k.keys[i] - 1;
        for (uint64_t j = 0; j < rbe; j++)
            if (k.chunks[i][j] > max) {
                snprintf(err, errlen, "cluster %llu needs refcount %u, more than %u-bit refcounts hold",
                         (unsigned long long)((k.keys[i] - 1) * rbe + j), k.chunks[i][j],
                         q->h.refcount_bits);
                r = -ERANGE;
                goto out;
            }
    }
    qsort(blk, nused, sizeof(*blk), cmp_u64);

    /* New refcount blocks and table after the end of the file: a block for
     * each chunk in use and each chunk the new area itself falls in (at
     * most two more: the area is far smaller than a chunk's range, except
     * for tiny clusters), then the table. */
    uint64_t start = nclusters, nblocks = nused, ntable = 1, first_a = 0, last_a = 0;
    for (;;) {
        uint64_t end = start + nblocks + ntable;
        first_a = start / rbe;
        last_a = (end - 1) / rbe;
        uint64_t na = last_a - first_a + 1 - (blk[nused - 1] == first_a);
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
        snprintf(err, errlen, "the rebuilt refcount table would exceed QEMU's limit");
        r = -EFBIG;
        goto out;
    }
    /* The area's chunks after those in use (the first may be the last in use). */
    uint64_t *nb = realloc(blk, (nblocks + 1) * sizeof(*blk));
    if (!nb) {
        r = -ENOMEM;
        goto out;
    }
    blk = nb;
    uint64_t n = nused;
    for (uint64_t ci = first_a; ci <= last_a && n < nblocks; ci++)
        if (ci != blk[nused - 1])
            blk[n++] = ci;
    nblocks = n;
    uint64_t area = nblocks + ntable;
    uint64_t entries = ntable * cs / 8;
    newtab = calloc(entries, sizeof(uint64_t));
    newdirty = calloc((entries * 8 + 511) / 512 + 1, 1);
    uint8_t *tab = io_zalloc(ntable * cs);
    if (!newtab || !newdirty) {
        io_free(tab);
        r = -ENOMEM;
        goto out;
    }
    for (uint64_t b = 0; b < nblocks; b++) {
        newtab[blk[b]] = (start + b) * cs;
        be64_store(tab + blk[b] * 8, newtab[blk[b]]);
    }
    /* COPIED flags first (they only describe refcounts we are about to
     * make true), then the new structures, a sync, and the header switch. */
    err[0] = '\0';
    r = fix_copied_flags(&k);
    /* Past everything counted; the old refcount blocks, about to be
     * replaced, may lie anywhere. */
    if (r == 0)
        r = ol_conflict(q, start * cs, area * cs, OL_REFBLOCK, "the rebuilt refcount structures",
                        err, errlen);
    if (r == 0)
        r = write_blocks(&k, blk, nblocks, start, start + area);
    if (r == 0) {
        ssize_t w = file_pwrite(&q->file, tab, ntable * cs, (start + nblocks) * cs, false);
        r = w < 0 ? (int)w : file_sync(&q->file);
    }
    io_free(tab);
    if (r == 0) {
        q->h.refcount_table_offset = (start + nblocks) * cs;
        q->h.refcount_table_clusters = (uint32_t)ntable;
        r = qcow2_write_header_fields(q);
        if (r == 0)
            r = file_sync(&q->file);
    }
    if (r < 0) {
        if (!err[0])
            snprintf(err, errlen, "writing new refcount structures failed: %s", strerror(-r));
        goto out;
    }
    install_reftable(q, newtab, newdirty, entries);
    newtab = NULL;
    newdirty = NULL;
    note_host_end(q, (start + area) * cs);
    q->free_hint = 0;
    mcache_discard_range(&q->rcc, 0, UINT64_MAX);
    mcache_discard_range(&q->l2c, 0, UINT64_MAX);
out:
    free(newtab);
    free(newdirty);
    free(blk);
    counter_free(&k);
    return r;
}
