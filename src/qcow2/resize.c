/* Changing the virtual size of a qcow2 image (QEMU's qcow2_co_truncate
 * without preallocation).
 *
 * Growing: a larger L1 table, when one is needed, is written to fresh
 * clusters and made durable; if a backing file reaches past the old end,
 * the new range is marked as reading zeros first (as QEMU does, so the
 * guest never sees backing data appear there); then one header sector
 * write switches size, L1 offset and L1 length together; only then is the
 * old L1 table freed.  A crash leaves the old or the new size, never a mix.
 *
 * Shrinking needs an unused tail (nothing allocated past the new end, and
 * the rest of the last cluster reading as zeros), so no data is lost; the
 * header switch comes first, then the L2 tables past the end are dropped
 * (their L1 entries cleared, their references released once that is
 * durable).  The L1 table keeps its length, as in QEMU. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

/* ---- shrink --------------------------------------------------------------- */

/* Is everything past size unused: no cluster past it allocated (zero
 * clusters are fine), and the rest of the cluster holding the new end
 * reading as zeros if it is allocated? */
static int tail_unused(struct qcow2 *q, uint64_t size, char *err, size_t errlen)
{
    uint64_t cs = cl_size(q), first_free = (size + cs - 1) >> cl_bits(q);
    uint32_t per = q->l2c.slice_size / q->h.l2_entry_size;
    for (uint64_t i = size >> (cl_bits(q) + q->h.l2_bits); i < q->h.l1_size; i++) {
        uint64_t t = q->l1[i] & L1E_OFFSET_MASK;
        if (!t)
            continue;
        for (uint64_t so = 0; so < cs; so += q->l2c.slice_size) {
            struct mslice *s;
            int r = qcow2_cache_get(&q->l2c, t + so, &s);
            if (r < 0) {
                snprintf(err, errlen, "cannot read the L2 table at 0x%llx: %s", (unsigned long long)t,
                         strerror(-r));
                return r;
            }
            for (uint32_t j = 0; j < per; j++) {
                uint64_t c = (i << q->h.l2_bits) + (so / q->h.l2_entry_size) + j;
                uint64_t e = l2e_get(q, s, j);
                enum qcow2_cluster_type ty = qcow2_l2_entry_type(&q->h, e, q->extl2);
                bool data = ty == QCOW2_CLUSTER_NORMAL || ty == QCOW2_CLUSTER_COMPRESSED ||
                            ty == QCOW2_CLUSTER_INVALID;
                if (!data || (c + 1) * cs <= size)
                    continue;
                if (c >= first_free) {
                    qcow2_cache_put(&q->l2c, s);
                    snprintf(err, errlen, "guest offset 0x%llx, past the new end, holds data "
                             "(discard it first, or keep the size)", (unsigned long long)(c * cs));
                    return -ENOTSUP;
                }
                /* The cluster holding the new end: its tail must be zeros. */
                qcow2_cache_put(&q->l2c, s);
                uint64_t end = (c + 1) * cs < q->img.size ? (c + 1) * cs : q->img.size;
                uint8_t *buf = io_alloc(end - size);
                r = qcow2_co_read(&q->img, buf, size, end - size);
                uint64_t k = 0;
                while (r == 0 && k < end - size && !buf[k])
                    k++;
                io_free(buf);
                if (r < 0) {
                    snprintf(err, errlen, "cannot read guest offset 0x%llx: %s", (unsigned long long)size,
                             strerror(-r));
                    return r;
                }
                if (k < end - size) {
                    snprintf(err, errlen, "guest offset 0x%llx, past the new end, holds data "
                             "(discard it first, or keep the size)", (unsigned long long)(size + k));
                    return -ENOTSUP;
                }
                r = qcow2_cache_get(&q->l2c, t + so, &s);
                if (r < 0)
                    return r;
            }
            qcow2_cache_put(&q->l2c, s);
        }
    }
    return 0;
}

/* Drop the L2 tables wholly past the new end from the active L1 (they map
 * nothing but zero clusters): L1 entries cleared now, their references
 * (the table, its zero clusters) released after the flush that makes the
 * cleared entries durable (rule 5). */
static int drop_tail_tables(struct qcow2 *q)
{
    uint64_t cs = cl_size(q);
    uint32_t per = q->l2c.slice_size / q->h.l2_entry_size;
    for (uint64_t i = qcow2_l1_entries_for(q, q->h.size); i < q->h.l1_size; i++) {
        uint64_t t = q->l1[i] & L1E_OFFSET_MASK;
        if (!t)
            continue;
        for (uint64_t so = 0; so < cs; so += q->l2c.slice_size) {
            struct mslice *s;
            int r = qcow2_cache_get(&q->l2c, t + so, &s);
            if (r < 0)
                return r;
            for (uint32_t j = 0; j < per; j++) {
                uint64_t e = l2e_get(q, s, j);
                if (qcow2_l2_entry_type(&q->h, e, q->extl2) == QCOW2_CLUSTER_ZERO_ALLOC)
                    qcow2_defer_free(q, e & L2E_OFFSET_MASK, cs);
            }
            qcow2_cache_put(&q->l2c, s);
        }
        qcow2_map_changed(q);
        q->l1[i] = 0;
        q->l1_dirty[i * 8 / 512] = 1;
        qcow2_ol_remove(q, t, OL_BIT_ACTIVE_L2);     /* no longer a table once freed */
        qcow2_defer_free(q, t, cs);
    }
    return 0;
}

/* ---- the operation ---------------------------------------------------------- */

/* The refusals that come before any change; size != the current size. */
static int resize_allowed(struct qcow2 *q, uint64_t size, bool shrink, char *err, size_t errlen)
{
    const char *path = q->img.path;
    uint64_t old_size = q->h.size;
    /* Not handled here (refused rather than leaving them stale): the data
     * file's length, and persistent bitmaps, which must grow with the disk. */
    uint32_t ext_len;
    if (has_data_file(q) ||
        qcow2_header_find_ext(q->hdr_buf, q->hdr_len, &q->h, QCOW2_EXT_BITMAPS, &ext_len)) {
        snprintf(err, errlen, "cannot resize %s: images with %s are not resized here (qemu-img resize "
                 "can)", path, has_data_file(q) ? "an external data file" : "persistent bitmaps");
        return -ENOTSUP;
    }
    /* v2 snapshot entries need not record a disk size: QEMU refuses too. */
    if (q->h.version < 3 && q->h.nb_snapshots) {
        snprintf(err, errlen, "cannot resize %s: a v2 image with snapshots cannot be resized (as in "
                 "QEMU; upgrade it with qemu-img amend -o compat=1.1, or delete the snapshots)", path);
        return -ENOTSUP;
    }
    if (size < old_size && !shrink) {
        snprintf(err, errlen, "%llu bytes is smaller than the image (%llu bytes): shrinking needs "
                 "--shrink", (unsigned long long)size, (unsigned long long)old_size);
        return -EINVAL;
    }
    return 0;
}

/* Shrink: only an unused tail; the header first, then the tables past the
 * new end are released. */
static int shrink_to(struct qcow2 *q, uint64_t size, char *err, size_t errlen)
{
    uint64_t old_size = q->h.size;
    char why[300];
    int r = tail_unused(q, size, why, sizeof(why));
    if (r < 0) {
        snprintf(err, errlen, "cannot shrink %s to %llu bytes: %s", q->img.path, (unsigned long long)size, why);
        return r;
    }
    q->h.size = size;
    r = qcow2_header_commit(q);
    if (r < 0) {
        q->h.size = old_size;
        q->broken = true;
        snprintf(err, errlen, "writing the header failed: %s", strerror(-r));
        return r;
    }
    qcow2_derive_sizes(q);
    r = drop_tail_tables(q);
    if (r == 0)
        r = qcow2_flush(q);     /* cleared L1 entries durable, then released */
    for (int i = 0; i < 3 && r == 0 && (q->frees_ready || qcow2_cache_has_dirty(&q->rcc)); i++)
        r = qcow2_flush(q);
    if (r < 0)
        snprintf(err, errlen, "the image is resized, but releasing the tables past the end failed "
                 "(%s): they leak", strerror(-r));
    return r;
}

/* A larger L1 table of need entries, written and durable, in use in memory;
 * *old_l1 and *old_dirty get the old one's arrays (the caller frees them). */
static int grow_l1(struct qcow2 *q, uint64_t need, uint64_t **old_l1, uint8_t **old_dirty,
                   char *err, size_t errlen)
{
    int r = 0;
    uint64_t *nl1 = calloc(need, sizeof(*nl1));
    uint8_t *ndirty = calloc((need * 8 + 511) / 512 + 1, 1);
    uint8_t *buf = malloc(need * 8);
    uint64_t noff = 0;
    if (!nl1 || !ndirty || !buf)
        r = -ENOMEM;
    if (r == 0) {
        memcpy(nl1, q->l1, (uint64_t)q->h.l1_size * 8);
        for (uint64_t i = 0; i < need; i++)
            be64_store(buf + i * 8, nl1[i]);
        r = qcow2_write_fresh_table(q, buf, need * 8, &noff);
    }
    /* The new table and its refcounts durable before anything (also a
     * refcount-table growth rewriting the header) can name it. */
    if (r == 0)
        r = qcow2_flush(q);
    free(buf);
    if (r < 0) {
        if (noff)
            for (uint64_t c = noff >> cl_bits(q); c <= (noff + need * 8 - 1) >> cl_bits(q); c++)
                qcow2_rc_update(q, c, -1);
        free(nl1);
        free(ndirty);
        snprintf(err, errlen, "cannot write a larger L1 table: %s", strerror(-r));
        return r;
    }
    /* In memory only: the header still names the old table until the
     * switch; entries changed meanwhile go to the new one. */
    *old_l1 = q->l1;
    *old_dirty = q->l1_dirty;
    qcow2_map_changed(q);
    q->l1 = nl1;
    q->l1_dirty = ndirty;
    q->h.l1_size = (uint32_t)need;
    q->h.l1_table_offset = noff;
    return 0;
}

/* A backing file reaching past the old end would show through the new
 * range: make it read as zeros (zero flags, or zeros written on v2),
 * durably, before the new size is. */
static int zero_over_backing(struct qcow2 *q, uint64_t old_size, uint64_t size, char *err, size_t errlen)
{
    if (!q->backing || q->backing->size <= old_size)
        return 0;
    uint64_t end = q->backing->size < size ? (q->backing->size + 511) & ~511ull : size;
    q->img.size = size;
    int r = qcow2_co_write_zeroes(&q->img, old_size, end - old_size, IMG_NO_HOLE);
    if (r == 0)
        r = qcow2_flush(q);
    if (r < 0)
        snprintf(err, errlen, "cannot zero the new range over the backing file: %s", strerror(-r));
    return r;
}

static int grow_to(struct qcow2 *q, uint64_t size, uint64_t need, char *err, size_t errlen)
{
    uint64_t old_size = q->h.size;
    uint64_t old_l1_off = q->h.l1_table_offset, old_l1_size = q->h.l1_size;
    uint64_t *old_l1 = NULL;
    uint8_t *old_dirty = NULL;
    int r;
    if (need > q->h.l1_size) {
        r = grow_l1(q, need, &old_l1, &old_dirty, err, errlen);
        if (r < 0)
            return r;
    }
    int zr = zero_over_backing(q, old_size, size, err, errlen);
    /* The switch.  Even when the zeroing failed, a new L1 table in use in
     * memory must become the one the header names (with the old size). */
    q->h.size = zr == 0 ? size : old_size;
    r = qcow2_header_commit(q);
    if (r < 0) {
        q->broken = true;
        snprintf(err, errlen, "writing the header failed: %s", strerror(-r));
    }
    if (r == 0)
        r = zr;
    qcow2_derive_sizes(q);
    free(old_l1);
    free(old_dirty);
    if (q->broken)
        return r;
    /* The old table is unreferenced once the header is durable. */
    if (old_l1_size && q->h.l1_table_offset != old_l1_off)
        qcow2_free_durable(q, old_l1_off, old_l1_size * 8, true);
    int r2 = qcow2_apply_ready_frees(q);
    for (int i = 0; i < 3 && r2 == 0 && (i == 0 || q->frees_ready || qcow2_cache_has_dirty(&q->rcc)); i++)
        r2 = qcow2_flush(q);
    if (r2 < 0 && r == 0)
        snprintf(err, errlen, "the image is resized, but freeing the old L1 table failed: %s", strerror(-r2));
    return r < 0 ? r : r2;
}

int qcow2_resize(struct image *img, uint64_t size, bool shrink, char *err, size_t errlen)
{
    struct qcow2 *q = to_qcow2(img);
    uint64_t need = qcow2_l1_entries_for(q, size);
    if (size & 511) {
        snprintf(err, errlen, "the new size (%llu bytes) is not a multiple of 512 bytes",
                 (unsigned long long)size);
        return -EINVAL;
    }
    if (need * 8 > QCOW2_MAX_L1_BYTES || size > (1ull << 62)) {
        snprintf(err, errlen, "%llu bytes is too large for this image's cluster size (QEMU's L1 table "
                 "limit)", (unsigned long long)size);
        return -EFBIG;
    }
    if (size == q->h.size)
        return 0;
    int r = resize_allowed(q, size, shrink, err, errlen);
    if (r == 0)
        r = qcow2_exclusive_begin(q, err, errlen);
    if (r < 0)
        return r;
    return size < q->h.size ? shrink_to(q, size, err, errlen) : grow_to(q, size, need, err, errlen);
}
