/* Refcounts, the cluster allocator, and deferred frees.
 *
 * Safety rules (a crash may only leak clusters):
 *  - a refcount is raised (in the cache) before any L2/L1 entry points at
 *    the cluster, and qcow2_flush writes refcount blocks before L2 tables;
 *  - a refcount is lowered only after the change that dropped the reference
 *    is durable (qcow2_defer_free), and only once no request that might still use
 *    the old mapping is in flight (the request tick rule below). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

/* Locate the refcount entry of a host cluster: the cache slice offset and
 * the entry index inside that slice.  Returns 0 if no block exists (all
 * refcounts in its range are 0), 1 if found, -EIO if the table is corrupt. */
static int rc_locate(struct qcow2 *q, uint64_t cluster, uint64_t *slice_off, uint64_t *index)
{
    uint64_t rbe = q->h.refcount_block_entries;
    uint64_t ti = cluster / rbe;
    if (ti >= q->reftable_entries || q->reftable[ti] == 0)
        return 0;
    uint64_t block = q->reftable[ti];
    if ((block & (cl_size(q) - 1)) || (block & ~L1E_OFFSET_MASK)) {
        qcow2_mark_broken(q, "refcount table entry %llu is invalid (0x%llx)",
                          (unsigned long long)ti, (unsigned long long)block);
        return -EIO;
    }
    uint64_t idx = cluster % rbe;
    uint64_t per_slice = (uint64_t)q->rcc.slice_size * 8 >> q->h.refcount_order;
    *slice_off = block + (idx / per_slice) * q->rcc.slice_size;
    *index = idx % per_slice;
    return 1;
}

int qcow2_rc_get(struct qcow2 *q, uint64_t cluster, uint64_t *refcount)
{
    uint64_t soff, idx;
    int r = rc_locate(q, cluster, &soff, &idx);
    if (r <= 0) {
        *refcount = 0;
        return r;
    }
    struct mslice *s;
    r = qcow2_cache_get(&q->rcc, soff, &s);
    if (r < 0)
        return r;
    *refcount = qcow2_refcount_get(s->data, q->h.refcount_order, idx);
    qcow2_cache_put(&q->rcc, s);
    return 0;
}

int qcow2_rc_update(struct qcow2 *q, uint64_t cluster, int64_t delta)
{
    uint64_t soff, idx;
    int r = rc_locate(q, cluster, &soff, &idx);
    if (r < 0)
        return r;
    if (r == 0) {
        qcow2_mark_broken(q, "refcount block missing for cluster %llu", (unsigned long long)cluster);
        return -EIO;
    }
    /* The block must be nothing else (a refcount table entry may name the
     * table itself, an L2 table, the header...). */
    if (qcow2_ol_check(q, soff, q->rcc.slice_size, OL_REFBLOCK, "a refcount block") < 0)
        return -EIO;
    struct mslice *s;
    r = qcow2_cache_get(&q->rcc, soff, &s);
    if (r < 0)
        return r;
    uint64_t old = qcow2_refcount_get(s->data, q->h.refcount_order, idx);
    uint64_t max = qcow2_refcount_max(q->h.refcount_order);
    if ((delta < 0 && old < (uint64_t)-delta) || (delta > 0 && max - old < (uint64_t)delta)) {
        qcow2_cache_put(&q->rcc, s);
        if (delta > 0)
            return -ERANGE;   /* refcount width exhausted (e.g. 1-bit refcounts) */
        qcow2_mark_broken(q, "refcount of cluster %llu would drop below zero",
                          (unsigned long long)cluster);
        return -EIO;
    }
    if (old + delta == 0) {
        /* A cluster that still holds metadata must never become free (the
         * allocator would hand it out): the references dropped were bogus. */
        if (qcow2_ol_check(q, cluster * cl_size(q), cl_size(q), 0, "a free cluster (refcount 0)") < 0) {
            qcow2_cache_put(&q->rcc, s);
            return -EIO;
        }
        /* A free cluster's cached slices describe a former table: drop them
         * before the cluster can be reused.  One still pinned (a flush
         * writing its copy, a load) would land on the reused cluster: the
         * cluster stays allocated until it is not (the caller retries). */
        bool busy = qcow2_cache_discard_range(&q->l2c, cluster * cl_size(q), cl_size(q));
        busy |= qcow2_cache_discard_range(&q->rcc, cluster * cl_size(q), cl_size(q));
        if (busy) {
            qcow2_cache_put(&q->rcc, s);
            return -EBUSY;
        }
        if (cluster < q->free_hint)
            q->free_hint = cluster;
        /* Free: the allocator may hand it out for new data, so no cached
         * decompressed cluster may outlive the bytes it came from. */
        qcow2_zc_invalidate(q, cluster * cl_size(q), cl_size(q));
    }
    qcow2_refcount_set(s->data, q->h.refcount_order, idx, old + delta);
    qcow2_cache_mark_dirty(s);
    qcow2_cache_put(&q->rcc, s);
    return 0;
}

int qcow2_write_new_cluster(struct qcow2 *q, uint64_t off, const uint8_t *content)
{
    /* Before anything cached is dropped: a refcount may have called a
     * table's cluster free. */
    int c = qcow2_ol_check(q, off, cl_size(q), 0, "a new L2 table or refcount block");
    if (c < 0)
        return c;
    uint8_t *buf = io_zalloc(cl_size(q));
    if (content)
        memcpy(buf, content, cl_size(q));
    /* Nothing cached may describe the old use of this cluster. */
    qcow2_cache_discard_range(&q->l2c, off, cl_size(q));
    qcow2_cache_discard_range(&q->rcc, off, cl_size(q));
    ssize_t r = file_pwrite(&q->file, buf, cl_size(q), off, false);
    io_free(buf);
    return r < 0 ? (int)r : 0;
}

/* A new refcount block for table index ti, placed at cluster c inside the
 * range it describes so that it counts itself.  The block is written before
 * its table entry; the entry reaches the disk only in a flush, after a sync. */
static int create_refblock(struct qcow2 *q, uint64_t ti, uint64_t c)
{
    uint8_t *blk = io_zalloc(cl_size(q));
    qcow2_refcount_set(blk, q->h.refcount_order, c % q->h.refcount_block_entries, 1);
    int r = qcow2_write_new_cluster(q, c * cl_size(q), blk);
    io_free(blk);
    if (r < 0)
        return r;
    q->reftable[ti] = c * cl_size(q);
    q->reftable_dirty[ti * 8 / 512] = 1;
    qcow2_ol_add(q, c * cl_size(q), OL_BIT_REFBLOCK);
    qcow2_note_host_end(q, (c + 1) * cl_size(q));
    return 0;
}

void qcow2_install_reftable(struct qcow2 *q, uint64_t *table, uint8_t *dirty, uint64_t entries)
{
    qcow2_map_changed(q);
    free(q->reftable);
    free(q->reftable_dirty);
    q->reftable = table;
    q->reftable_dirty = dirty;
    q->reftable_entries = entries;
    qcow2_ol_reindex_refblocks(q);
}

/* Grow the refcount table so that index need_ti exists.  The new table and
 * the refcount blocks describing it go to a fresh area at cluster `start`
 * (the first cluster the old table cannot describe, so the area is free).
 * Order: new blocks + new table written and synced, then the header switched
 * in one sector write and synced, then the old table freed.  A crash before
 * the header write leaves the old table in force and the area leaked. */
static int reftable_grow(struct qcow2 *q, uint64_t need_ti)
{
    uint64_t cs = cl_size(q), rbe = q->h.refcount_block_entries;
    uint64_t start = q->reftable_entries * rbe;
    uint64_t entries = q->reftable_entries * 2;
    if (entries < need_ti + 1)
        entries = need_ti + 1;
    uint64_t nblocks = 1, ntable;
    for (;;) {
        ntable = (entries * 8 + cs - 1) / cs;
        uint64_t need_blocks = (nblocks + ntable + rbe - 1) / rbe;
        uint64_t need_entries = start / rbe + need_blocks;
        if (need_blocks <= nblocks && need_entries <= entries)
            break;
        if (need_blocks > nblocks)
            nblocks = need_blocks;
        if (need_entries > entries)
            entries = need_entries;
    }
    entries = ntable * cs / 8;
    if (ntable * cs > QCOW2_MAX_REFTABLE_BYTES)
        return -EFBIG;

    co_mutex_lock(&q->flush_lock);   /* no flush may write the old table meanwhile */
    int ret = 0;
    uint8_t *area = io_zalloc((nblocks + ntable) * cs);
    for (uint64_t i = 0; i < nblocks + ntable; i++) {
        uint64_t c = start + i;
        qcow2_refcount_set(area + ((c - start) / rbe) * cs, q->h.refcount_order, c % rbe, 1);
    }
    uint64_t *newtab = calloc(entries, sizeof(*newtab));
    uint8_t *newdirty = calloc((entries * 8 + 511) / 512, 1);
    if (!newtab || !newdirty) {
        ret = -ENOMEM;
        goto out;
    }
    memcpy(newtab, q->reftable, q->reftable_entries * 8);
    for (uint64_t j = 0; j < nblocks; j++)
        newtab[start / rbe + j] = (start + j) * cs;
    uint8_t *tab = area + nblocks * cs;
    for (uint64_t e = 0; e < entries; e++)
        be64_store(tab + e * 8, newtab[e]);

    ret = qcow2_ol_check(q, start * cs, (nblocks + ntable) * cs, 0, "a new refcount table");
    if (ret < 0)
        goto out;
    qcow2_cache_discard_range(&q->l2c, start * cs, (nblocks + ntable) * cs);
    qcow2_cache_discard_range(&q->rcc, start * cs, (nblocks + ntable) * cs);
    ssize_t w = file_pwrite(&q->file, area, (nblocks + ntable) * cs, start * cs, false);
    if (w < 0 || (ret = qcow2_sync(q)) < 0) {
        ret = w < 0 ? (int)w : ret;
        goto out;
    }
    uint64_t old_off = q->h.refcount_table_offset;
    uint64_t old_clusters = q->h.refcount_table_clusters;
    q->h.refcount_table_offset = (start + nblocks) * cs;
    q->h.refcount_table_clusters = (uint32_t)ntable;
    ret = qcow2_write_header_fields(q);
    if (ret == 0)
        ret = qcow2_sync(q);    /* a failure here marks the image suspect too */
    if (ret < 0) {
        q->h.refcount_table_offset = old_off;
        q->h.refcount_table_clusters = (uint32_t)old_clusters;
        qcow2_map_changed(q);
        goto out;
    }
    qcow2_install_reftable(q, newtab, newdirty, entries);
    newtab = NULL;
    newdirty = NULL;
    qcow2_note_host_end(q, (start + nblocks + ntable) * cs);
    /* The header no longer names the old table: its clusters are free. */
    for (uint64_t i = 0; i < old_clusters && ret == 0; i++)
        ret = qcow2_rc_update(q, old_off / cs + i, -1);
out:
    free(newtab);
    free(newdirty);
    io_free(area);
    co_mutex_unlock(&q->flush_lock);
    return ret;
}

int qcow2_alloc_clusters(struct qcow2 *q, uint64_t n, uint64_t *host_off, uint64_t *got)
{
    uint64_t rbe = q->h.refcount_block_entries;
    uint64_t max_cluster = (1ull << 56) >> cl_bits(q);   /* offsets must fit L2 entries */
    uint64_t c = q->free_hint;
    for (;;) {
        if (c >= max_cluster)
            return -ENOSPC;
        uint64_t ti = c / rbe;
        if (ti >= q->reftable_entries) {
            int r = reftable_grow(q, ti);
            if (r < 0)
                return r;
            c = q->free_hint;
            continue;
        }
        if (q->reftable[ti] == 0) {
            int r = create_refblock(q, ti, c);
            if (r < 0)
                return r;
            c++;
            continue;
        }
        uint64_t rc;
        int r = qcow2_rc_get(q, c, &rc);
        if (r < 0)
            return r;
        if (rc != 0) {
            c++;
            if (q->free_hint < c && rc != 0)
                q->free_hint = c;
            continue;
        }
        /* Extend the run of free clusters inside this refcount block. */
        uint64_t k = 1;
        while (k < n && (c + k) / rbe == ti) {
            r = qcow2_rc_get(q, c + k, &rc);
            if (r < 0)
                return r;
            if (rc != 0)
                break;
            k++;
        }
        for (uint64_t i = 0; i < k; i++) {
            r = qcow2_rc_update(q, c + i, 1);
            if (r < 0)
                return r;
        }
        if (q->free_hint == c)
            q->free_hint = c + k;
        *host_off = c * cl_size(q);
        *got = k;
        stat_add(&q->clusters_allocated, k);
        qcow2_note_host_end(q, (c + k) * cl_size(q));
        return 0;
    }
}

/* Writes past the end of the file extend it, and file systems serialise
 * those (ext4 takes the inode lock exclusively).  As QEMU's preallocate
 * filter does, allocate blocks ahead in large steps so that new clusters
 * are written inside the file; close trims the unused tail again.  The
 * preallocated range reads as zeros, which fresh-cluster writes rely on. */
void qcow2_note_host_end(struct qcow2 *q, uint64_t end)
{
    if (end > q->host_end) {
        q->host_end = end;
        qcow2_map_changed(q);
    }
    if (end <= q->file_len || q->no_prealloc)
        return;
    /* An eighth of the file, at least 16 MiB and at most 256 MiB: a huge
     * (or hugely sparse) file must not reserve gigabytes of real space. */
    uint64_t step = end / 8 > (16u << 20) ? end / 8 : (16u << 20);
    if (step > (256u << 20))
        step = 256u << 20;
    uint64_t want = (end + step + (1u << 20) - 1) & ~((1ull << 20) - 1);
    int r = file_allocate(&q->file, q->file_len, want - q->file_len);
    if (r == 0)
        q->file_len = want;
    else
        q->no_prealloc = true;   /* plain extending writes still work */
}

static void defer(struct qcow2 *q, uint64_t off, uint64_t len, bool punch)
{
    struct deferred_free *d = malloc(sizeof(*d));
    if (!d)
        abort();
    d->off = off;
    d->len = len;
    d->tick = ++q->tick;
    d->punch = punch;
    d->next = NULL;
    *q->frees_pending_tail = d;
    q->frees_pending_tail = &d->next;
}

void qcow2_defer_free(struct qcow2 *q, uint64_t off, uint64_t len)
{
    defer(q, off, len, false);
}

/* Queue a release at the end of the ready list (the durable frees). */
static void push_ready(struct qcow2 *q, uint64_t off, uint64_t len, uint64_t tick, bool punch)
{
    struct deferred_free *d = malloc(sizeof(*d)), **pp = &q->frees_ready;
    if (!d)
        abort();
    *d = (struct deferred_free){ .off = off, .len = len, .tick = tick, .punch = punch };
    while (*pp)
        pp = &(*pp)->next;
    *pp = d;
}

void qcow2_free_durable(struct qcow2 *q, uint64_t off, uint64_t len, bool punch)
{
    push_ready(q, off, len, ++q->tick, punch);
}


void qcow2_defer_free_punch(struct qcow2 *q, uint64_t off, uint64_t len)
{
    defer(q, off, len, true);
}

int qcow2_punch_host(struct qcow2 *q, uint64_t off, uint64_t len)
{
    if (q->no_punch || !len)
        return 0;
    /* A hole in metadata would destroy the image (a hostile mapping). */
    int c = qcow2_ol_check(q, off, len, 0, "a discard's hole");
    if (c < 0)
        return c;
    int r = file_punch(&q->file, off, len);
    if (r == -EOPNOTSUPP || r == -ENOSYS) {
        q->no_punch = true;     /* discard is advisory: the data just stays */
        r = 0;
    }
    return r;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

struct clist { uint64_t *v; size_t n, cap; };

static int clist_add(struct clist *l, uint64_t c)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 64;
        uint64_t *v = realloc(l->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        l->v = v;
        l->cap = cap;
    }
    l->v[l->n++] = c;
    return 0;
}

/* Punch the clusters of a batch of discard frees whose refcount the batch
 * takes to 0.  It runs before any decrement: while a cluster's refcount
 * still holds it, the allocator cannot hand it out, so no new write can
 * land in it before the hole is made (a hole punched after reuse would
 * destroy the new data).  Nothing maps these clusters any more (the L2
 * changes are durable) and no request in flight predates their release. */
static int punch_freed(struct qcow2 *q, struct deferred_free *batch)
{
    struct clist all = { 0 }, punch = { 0 };
    int r = 0;
    for (struct deferred_free *d = batch; d && r == 0; d = d->next) {
        for (uint64_t c = d->off >> cl_bits(q); c <= (d->off + d->len - 1) >> cl_bits(q) && r == 0; c++) {
            r = clist_add(&all, c);
            if (r == 0 && d->punch)
                r = clist_add(&punch, c);
        }
    }
    if (r == 0 && punch.n) {
        qsort(all.v, all.n, sizeof(*all.v), cmp_u64);
        qsort(punch.v, punch.n, sizeof(*punch.v), cmp_u64);
        uint64_t run = 0, run_len = 0;
        size_t a = 0;
        for (size_t i = 0; i < punch.n && r == 0; i++) {
            uint64_t c = punch.v[i];
            if (i && c == punch.v[i - 1])
                continue;
            /* References the batch drops on c (a host cluster may hold
             * several compressed clusters): freed if that is all of them. */
            while (all.v[a] < c)
                a++;
            uint64_t drops = 0, rc;
            while (a + drops < all.n && all.v[a + drops] == c)
                drops++;
            r = qcow2_rc_get(q, c, &rc);
            if (r < 0 || rc != drops)
                continue;
            if (run_len && run + run_len == c) {
                run_len++;
                continue;
            }
            if (run_len)
                r = qcow2_punch_host(q, run * cl_size(q), run_len * cl_size(q));
            run = c;
            run_len = 1;
        }
        if (r == 0 && run_len)
            r = qcow2_punch_host(q, run * cl_size(q), run_len * cl_size(q));
    }
    free(all.v);
    free(punch.v);
    return r;
}

/* Apply durable frees whose old mapping no request in flight can still be
 * using: every request started before the reference was dropped must have
 * finished, or it might read or write a cluster that is reused meanwhile. */
int qcow2_apply_ready_frees(struct qcow2 *q)
{
    struct deferred_free *batch = q->frees_ready, **tail = &batch;
    struct qreq *oldest = q->reqs.next;
    while (*tail && (oldest == &q->reqs || oldest->tick >= (*tail)->tick))
        tail = &(*tail)->next;
    q->frees_ready = *tail;
    *tail = NULL;
    if (!batch)
        return 0;
    int r = punch_freed(q, batch);
    if (r < 0) {
        /* Nothing was released yet: try the whole batch again next time. */
        *tail = q->frees_ready;
        q->frees_ready = batch;
        return r;
    }
    while (batch) {
        struct deferred_free *d = batch;
        batch = d->next;
        uint64_t first = d->off >> cl_bits(q);
        uint64_t last = (d->off + d->len - 1) >> cl_bits(q);
        for (uint64_t c = first; c <= last && r == 0; c++) {
            r = qcow2_rc_update(q, c, -1);
            if (r == -EBUSY) {
                /* A cached slice of it is still pinned: release the last
                 * reference at a later flush (already punched if asked). */
                push_ready(q, c << cl_bits(q), cl_size(q), d->tick, false);
                r = 0;
            }
        }
        free(d);
        if (r < 0)
            break;
    }
    if (batch) {
        /* A decrement failed: the rest waits for the next flush. */
        *tail = q->frees_ready;
        q->frees_ready = batch;
    }
    return r;
}

/* n contiguous clusters when n does not fit one refcount block's span:
 * a fresh area past everything allocated, starting on a block boundary,
 * whose first clusters are the new refcount blocks describing the whole
 * area (so the run itself is unbroken).  As for refcount-table growth, the
 * blocks are written before the table entries naming them change in
 * memory; those reach the disk in a flush, after a sync. */
static int alloc_area(struct qcow2 *q, uint64_t n, uint64_t *host_off)
{
    uint64_t cs = cl_size(q), rbe = q->h.refcount_block_entries;
    for (;;) {
        uint64_t start = ((q->host_end + cs - 1) / cs + rbe - 1) / rbe * rbe;
        uint64_t nb = 1;
        while ((nb + n + rbe - 1) / rbe > nb)
            nb = (nb + n + rbe - 1) / rbe;
        uint64_t ti0 = start / rbe;
        if (ti0 + nb > q->reftable_entries) {
            int r = reftable_grow(q, ti0 + nb - 1);
            if (r < 0)
                return r;
            continue;   /* the table moved to the end: look again */
        }
        uint8_t *blocks = io_zalloc(nb * cs);
        for (uint64_t c = start; c < start + nb + n; c++)
            qcow2_refcount_set(blocks + ((c - start) / rbe) * cs, q->h.refcount_order, c % rbe, 1);
        qcow2_cache_discard_range(&q->l2c, start * cs, (nb + n) * cs);
        qcow2_cache_discard_range(&q->rcc, start * cs, (nb + n) * cs);
        ssize_t w = file_pwrite(&q->file, blocks, nb * cs, start * cs, false);
        io_free(blocks);
        if (w < 0)
            return (int)w;
        for (uint64_t j = 0; j < nb; j++) {
            q->reftable[ti0 + j] = (start + j) * cs;
            q->reftable_dirty[(ti0 + j) * 8 / 512] = 1;
            /* Metadata from now on: no data write may land on it. */
            qcow2_ol_add(q, (start + j) * cs, OL_BIT_REFBLOCK);
        }
        qcow2_note_host_end(q, (start + nb + n) * cs);
        stat_add(&q->clusters_allocated, n);
        *host_off = (start + nb) * cs;
        return 0;
    }
}

int qcow2_alloc_contiguous(struct qcow2 *q, uint64_t n, uint64_t *host_off)
{
    if (n >= q->h.refcount_block_entries)
        return alloc_area(q, n, host_off);
    /* Runs too short on the way are kept while looking further (so the
     * allocator moves past them) and given back afterwards.  A fresh
     * refcount block leaves rbe - 1 free clusters after it, so this ends. */
    struct { uint64_t off, n; } *spare = NULL;
    size_t nspare = 0;
    int r;
    for (;;) {
        uint64_t off, got;
        r = qcow2_alloc_clusters(q, n, &off, &got);
        if (r < 0)
            break;
        if (got == n) {
            *host_off = off;
            break;
        }
        if (!(nspare & (nspare - 1))) {
            void *p = realloc(spare, (nspare ? nspare * 2 : 1) * sizeof(*spare));
            if (!p) {
                for (uint64_t i = 0; i < got; i++)
                    qcow2_rc_update(q, off / cl_size(q) + i, -1);
                r = -ENOMEM;
                break;
            }
            spare = p;
        }
        spare[nspare].off = off;
        spare[nspare++].n = got;
    }
    /* A give-back that fails (the refcount block cannot be loaded) only
     * leaks those clusters, the one damage a crash may leave too: the
     * allocation itself stands. */
    for (size_t k = 0; k < nspare; k++)
        for (uint64_t i = 0; i < spare[k].n; i++)
            (void)qcow2_rc_update(q, spare[k].off / cl_size(q) + i, -1);
    free(spare);
    return r;
}
