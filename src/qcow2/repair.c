/* Rebuilding refcounts of an image left dirty (lazy refcounts, or a crash
 * of a writer that used them).  Every cluster in use is counted by walking
 * all metadata; then fresh refcount structures describing exactly that are
 * written past the end of the file, synced, and switched in with one header
 * write.  A crash in between leaves the old (dirty) structures in force, and
 * the next open repairs again. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

#define MAX_REPAIR_CLUSTERS (256ull << 20)

struct counter {
    struct qcow2 *q;
    uint32_t *counts;
    uint64_t nclusters;
    char *err;
    size_t errlen;
};

static int count_range(struct counter *k, uint64_t off, uint64_t len, const char *what)
{
    if (!len)
        return 0;
    uint64_t first = off >> cl_bits(k->q), last = (off + len - 1) >> cl_bits(k->q);
    if (last >= k->nclusters || off + len < off) {
        snprintf(k->err, k->errlen, "%s at 0x%llx lies past the end of the file", what,
                 (unsigned long long)off);
        return -EINVAL;
    }
    for (uint64_t c = first; c <= last; c++)
        if (++k->counts[c] == 0) {
            snprintf(k->err, k->errlen, "refcount overflow at cluster %llu", (unsigned long long)c);
            return -EINVAL;
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

/* Count one L1 table and everything it reaches.  For the active table
 * (fix_flags), also set each COPIED flag to match the final refcounts in a
 * second pass (see fix_copied_flags). */
static int count_l1(struct counter *k, const uint64_t *l1, uint32_t l1_size)
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
        r = count_range(k, t, cs, "an L2 table");
        if (r == 0)
            r = read_exact(q, l2, cs, t);
        for (uint64_t j = 0; j < q->h.l2_entries && r == 0; j++) {
            uint64_t e = be64_load(l2 + j * q->h.l2_entry_size);
            switch (qcow2_l2_entry_type(&q->h, e, q->extl2)) {
            case QCOW2_CLUSTER_NORMAL:
            case QCOW2_CLUSTER_ZERO_ALLOC:
                if (!has_data_file(q))  /* data in a data file is not refcounted */
                    r = count_range(k, e & L2E_OFFSET_MASK, cs, "a data cluster");
                break;
            case QCOW2_CLUSTER_COMPRESSED: {
                uint64_t coff, nbytes;
                qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
                r = count_range(k, coff, nbytes, "a compressed cluster");
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
    }
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
            if (dir_size > (64u << 20))
                return -EINVAL;
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
                if ((uint64_t)tsize * 8 > (64u << 20)) {
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
        uint64_t want = k->counts[t >> cl_bits(q)] == 1 ? QCOW_OFLAG_COPIED : 0;
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
            if ((ty != QCOW2_CLUSTER_NORMAL && ty != QCOW2_CLUSTER_ZERO_ALLOC) || has_data_file(q))
                continue;   /* data-file clusters keep COPIED: their refcount is 1 by definition */
            uint64_t w = k->counts[(e & L2E_OFFSET_MASK) >> cl_bits(q)] == 1 ? QCOW_OFLAG_COPIED : 0;
            if ((e & QCOW_OFLAG_COPIED) != w) {
                be64_store(p, (e & ~QCOW_OFLAG_COPIED) | w);
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

int qcow2_rebuild_refcounts(struct qcow2 *q, char *err, size_t errlen)
{
    uint64_t cs = cl_size(q), rbe = q->h.refcount_block_entries;
    uint64_t nclusters = (q->host_end + cs - 1) / cs;
    if (nclusters > MAX_REPAIR_CLUSTERS) {
        snprintf(err, errlen, "image too large to repair here (%llu clusters)", (unsigned long long)nclusters);
        return -EFBIG;
    }
    struct counter k = { q, calloc(nclusters + 1, sizeof(uint32_t)), nclusters, err, errlen };
    if (!k.counts)
        return -ENOMEM;
    int r = count_range(&k, 0, cs, "the header");
    if (r == 0)
        r = count_range(&k, q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8, "the L1 table");
    if (r == 0)
        r = count_l1(&k, q->l1, q->h.l1_size);
    if (r == 0 && q->h.nb_snapshots) {
        r = count_range(&k, q->h.snapshots_offset, q->snapshot_table_len, "the snapshot table");
        for (uint32_t i = 0; i < q->h.nb_snapshots && r == 0; i++) {
            struct qcow2_snapshot *s = &q->snapshots[i];
            uint64_t *sl1 = NULL;
            r = count_range(&k, s->l1_table_offset, (uint64_t)s->l1_size * 8, "a snapshot L1 table");
            if (r == 0) {
                sl1 = calloc(s->l1_size + 1, 8);
                uint64_t bytes = (uint64_t)s->l1_size * 8;
                r = !sl1 ? -ENOMEM : read_exact(q, sl1, bytes, s->l1_table_offset);
                for (uint32_t j = 0; j < s->l1_size && r == 0; j++)
                    sl1[j] = be64_load(&sl1[j]);
            }
            if (r == 0)
                r = count_l1(&k, sl1, s->l1_size);
            free(sl1);
        }
    }
    if (r == 0)
        r = count_bitmaps(&k);
    if (r < 0)
        goto out;

    uint64_t max = qcow2_refcount_max(q->h.refcount_order);
    for (uint64_t c = 0; c < nclusters; c++)
        if (k.counts[c] > max) {
            snprintf(err, errlen, "cluster %llu needs refcount %u, more than %u-bit refcounts hold",
                     (unsigned long long)c, k.counts[c], q->h.refcount_bits);
            r = -ERANGE;
            goto out;
        }

    /* New refcount blocks and table after the end of the file. */
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
        snprintf(err, errlen, "the rebuilt refcount table would exceed QEMU's limit");
        r = -EFBIG;
        goto out;
    }
    uint64_t area = nblocks + ntable;
    uint8_t *buf = io_zalloc(area * cs);
    for (uint64_t c = 0; c < start + area; c++) {
        uint64_t v = c < start ? k.counts[c] : 1;
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
        r = -ENOMEM;
        goto out;
    }
    for (uint64_t b = 0; b < nblocks; b++) {
        newtab[b] = (start + b) * cs;
        be64_store(buf + nblocks * cs + b * 8, newtab[b]);
    }
    /* COPIED flags first (they only describe refcounts we are about to
     * make true), then the new structures, a sync, and the header switch. */
    r = fix_copied_flags(&k);
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
        snprintf(err, errlen, "writing new refcount structures failed: %s", strerror(-r));
        free(newtab);
        free(newdirty);
        goto out;
    }
    install_reftable(q, newtab, newdirty, entries);
    note_host_end(q, (start + area) * cs);
    q->free_hint = 0;
    mcache_discard_range(&q->rcc, 0, UINT64_MAX);
    mcache_discard_range(&q->l2c, 0, UINT64_MAX);
out:
    free(k.counts);
    return r;
}
