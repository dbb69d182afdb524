/* Map hints: the zero copy path's memory of single-cluster mappings it
 * has already checked, so that the next 4k request to the same cluster
 * skips the L2 cache lookup and the overlap index search (the two cost
 * most of qcow2_co_map; ublk's 4k requests pay them per I/O).
 *
 * Two ways to trust a hint:
 *  - fast: nothing a verdict depends on has changed since it was reached
 *    (q->map_gen is still what the hint holds).  Every change to an L1 or
 *    L2 entry, to a cached slice, to the overlap index, to a header
 *    structure, to the file's end or to the allocations in flight calls
 *    qcow2_map_changed, so the common case (overwrites of allocated
 *    clusters, no metadata change) costs one comparison and touches no
 *    table (under emulation, every page touched per request shows).
 *  - checked, when the generation moved: the L1 entry and the L2 entry (and
 *    extended-L2 bitmap) are compared with what they were, the slice is
 *    checked to still hold that table's bytes, and everything else the slow
 *    path's verdict depended on is either re-checked (the structures found
 *    from the header, the end of the file, allocations in flight) or
 *    covered by ol.gen (the overlap index: every L2 table or refcount block
 *    added, moved or dropped changes it).  A hint that passes is current
 *    again and takes the generation of now.
 * So a hint gives the slow path's answer or no answer, provided that
 * every such change calls qcow2_map_changed (test_zc_hints_random in
 * tests/unit/test_cluster.c compares hints with the entries under a random
 * mix of them); the checked way alone needs nothing invalidated. */
#include <stdlib.h>
#include <string.h>

#include "qcow2/internal.h"

#define HINT_SLOTS 4096u    /* direct mapped by guest cluster: 192 KiB, on first use */

struct map_hint {
    uint64_t cluster1;          /* guest cluster index + 1; 0: empty */
    uint64_t l1e, e, bm;        /* the entries as validated */
    struct mslice *s;           /* the L2 slice that held e */
    uint64_t map_gen;           /* q->map_gen when the verdict was last known current */
    uint32_t ol_gen;            /* q->ol.gen when the write path checked it */
    bool writable;              /* the write path found it writable in place */
};

void qcow2_hints_free(struct qcow2 *q)
{
    free(q->hints);
    q->hints = NULL;
}

/* The slice holding the L2 entry of guest cluster c under L1 entry l1e,
 * and the entry's index in it. */
static uint64_t slice_of(const struct qcow2 *q, uint64_t l1e, uint64_t c, uint32_t *idx)
{
    return l2_slice_of(q, l1e & L1E_OFFSET_MASK, c & (q->h.l2_entries - 1), idx);
}

void qcow2_hint_store(struct qcow2 *q, uint64_t off, struct mslice *s, uint64_t e, uint64_t bm,
                      bool writable, uint32_t ol_gen, uint64_t map_gen)
{
    uint64_t c = off >> cl_bits(q), l1i = c >> q->h.l2_bits;
    if (!q->hints)          /* first use: only zero copy devices map */
        q->hints = calloc(HINT_SLOTS, sizeof(*q->hints));
    if (!q->hints || l1i >= q->h.l1_size)
        return;
    uint64_t l1e = q->l1[l1i];
    uint32_t idx;
    /* The slice must be the one the L1 entry names now (the verdict was
     * for that table); a write's verdict also holds only if the overlap
     * index has not changed since it was checked. */
    if (!s->in_use || s->loading || s->off != slice_of(q, l1e, c, &idx) ||
        (writable && (ol_gen != q->ol.gen || !(l1e & QCOW_OFLAG_COPIED))))
        return;
    /* The write path checked the written range; the fast way takes any
     * write in the cluster, so all of it must lie inside the file (past
     * its end only the refcounts, which the fast way does not read, say
     * whether the cluster is ours).  The overlap checks are of whole
     * clusters already. */
    if (writable && !has_data_file(q) && (e & L2E_OFFSET_MASK) + cl_size(q) > q->host_end)
        writable = false;
    struct map_hint *h = &q->hints[c & (HINT_SLOTS - 1)];
    *h = (struct map_hint){ .cluster1 = c + 1, .l1e = l1e, .e = e, .bm = bm, .s = s,
                            .map_gen = map_gen, .ol_gen = ol_gen, .writable = writable };
}

bool qcow2_hint_lookup(struct qcow2 *q, uint64_t off, bool write, uint64_t *host)
{
    uint64_t c = off >> cl_bits(q), l1i = c >> q->h.l2_bits, cs = cl_size(q);
    if (!q->hints)
        return false;
    struct map_hint *h = &q->hints[c & (HINT_SLOTS - 1)];
    if (h->cluster1 != c + 1 || (write && !h->writable))
        return false;
    uint64_t cluster = h->e & L2E_OFFSET_MASK;
    if (h->map_gen == q->map_gen) {
        /* Nothing changed since the verdict.  A cache hit, but the slice's
         * place in the LRU is left alone: touching it is what this way
         * saves; if it ages out, its eviction moves the generation. */
        stat_add(&q->l2c.hits, 1);
        *host = cluster + (off & (cs - 1));
        return true;
    }
    if (l1i >= q->h.l1_size || q->l1[l1i] != h->l1e)
        return false;
    struct mslice *s = h->s;
    uint32_t idx;
    if (!s->in_use || s->loading || s->off != slice_of(q, h->l1e, c, &idx) ||
        l2e_get(q, s, idx) != h->e || l2bm_get(q, s, idx) != h->bm)
        return false;
    bool current = true;
    if (h->writable) {
        uint64_t table = h->l1e & L1E_OFFSET_MASK;
        /* What the index does not cover, as the slow path checks it: an
         * allocation in flight on the cluster, the structures found from
         * the header (which may have moved onto either cluster), and data
         * past the end of the file (the refcounts must say it is ours).
         * Checked for reads too: the hint is current for both after this.
         * A read may still take a hint not writable now, which then stays
         * not current (the next lookup checks again). */
        current = h->ol_gen == q->ol.gen && !qcow2_find_alloc(q, c) &&
                  qcow2_ol_fixed_clear(q, table, cs, OL_ACTIVE_L2) &&
                  (has_data_file(q) ||
                   (cluster + cs <= q->host_end && qcow2_ol_fixed_clear(q, cluster, cs, 0)));
        if (!current && write)
            return false;
    }
    qcow2_cache_touch(&q->l2c, s);
    /* Every input of the verdict checked as of now: current again. */
    if (current)
        h->map_gen = q->map_gen;
    *host = cluster + (off & (cs - 1));
    return true;
}
