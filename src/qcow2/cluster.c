/* Guest-to-host mapping: the read path, the write path with allocation and
 * copy-on-write, write-zeroes and discard. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "io/loop.h"
#include "io/log.h"
#include "qcow2/internal.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))

static inline void l2e_set(struct qcow2 *q, struct mslice *s, uint32_t idx, uint64_t e)
{
    qcow2_map_changed(q);
    be64_store(s->data + (size_t)idx * q->h.l2_entry_size, e);
}

static inline void l2bm_set(struct qcow2 *q, struct mslice *s, uint32_t idx, uint64_t bm)
{
    qcow2_map_changed(q);
    if (q->extl2)
        be64_store(s->data + (size_t)idx * 16 + 8, bm);
}

/* ---- units: subclusters with extended L2, else whole clusters ---------------- */
#define SC_ALL 0xffffffffu

static inline uint64_t mkbm(uint32_t alloc, uint32_t zero) { return (uint64_t)zero << 32 | alloc; }
static inline uint64_t unit_size(const struct qcow2 *q)
{
    return q->extl2 ? cl_size(q) / QCOW2_SUBCLUSTERS : cl_size(q);
}
static inline uint32_t unit_count(const struct qcow2 *q) { return q->extl2 ? QCOW2_SUBCLUSTERS : 1; }

/* Bits [from, to) of a subcluster mask (from < 32). */
static inline uint32_t units_mask(uint32_t from, uint32_t to)
{
    if (from >= to)
        return 0;
    uint32_t upto = to >= 32 ? SC_ALL : (1u << to) - 1;
    return upto & ~((1u << from) - 1);
}

/* Subclusters touched by bytes [from, to) of a cluster (to > from). */
static inline uint32_t units_touched(const struct qcow2 *q, uint64_t from, uint64_t to)
{
    uint64_t us = unit_size(q);
    return units_mask((uint32_t)(from / us), (uint32_t)((to + us - 1) / us));
}

static inline uint32_t entries_per_slice(const struct qcow2 *q)
{
    return q->l2c.slice_size / q->h.l2_entry_size;
}

static inline enum qcow2_cluster_type etype(const struct qcow2 *q, uint64_t e)
{
    return qcow2_l2_entry_type(&q->h, e, q->extl2);
}

/* A cluster we own alone (refcount 1): written in place. */
static inline bool is_inplace(const struct qcow2 *q, uint64_t e)
{
    return (e & QCOW_OFLAG_COPIED) && etype(q, e) == QCOW2_CLUSTER_NORMAL;
}

static inline bool is_zero_alloc_owned(const struct qcow2 *q, uint64_t e)
{
    return (e & QCOW_OFLAG_COPIED) && etype(q, e) == QCOW2_CLUSTER_ZERO_ALLOC;
}

/* Clusters past the known end of the file are legitimate only if the
 * refcounts say they are ours (a writer may crash after counting and
 * mapping a cluster but before writing it); a hostile entry pointing far
 * away must not make us grow the file there. */
static bool owned_past_end(struct qcow2 *q, uint64_t host, uint64_t len)
{
    if (host + len <= q->host_end)
        return true;
    for (uint64_t c = host >> cl_bits(q); c <= (host + len - 1) >> cl_bits(q); c++) {
        uint64_t rc;
        if (qcow2_rc_get(q, c, &rc) < 0 || rc != 1)
            return false;
    }
    return true;
}

/* Is (e, bm) a valid entry?  If not, the image is marked broken (with a
 * message naming the entry) and the caller fails with -EIO, as QEMU does.
 * Extended L2 (docs/interop/qcow2.txt, "Extended L2 Entries"): a subcluster
 * is never both allocated and zero, an unallocated cluster has no allocated
 * subclusters, and a compressed cluster's bitmap is all zero. */
static bool entry_ok(struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t off)
{
    enum qcow2_cluster_type t = etype(q, e);
    if (t == QCOW2_CLUSTER_INVALID || !qcow2_datafile_entry_ok(q, e, off)) {
        qcow2_mark_broken(q, "L2 entry 0x%llx for guest offset 0x%llx is invalid%s",
                          (unsigned long long)e, (unsigned long long)off,
                          t == QCOW2_CLUSTER_INVALID ? "" : " with an external data file");
        return false;
    }
    if (!q->extl2)
        return true;
    uint32_t alloc = extl2_alloc_bits(bm), zero = extl2_zero_bits(bm);
    bool bad = t == QCOW2_CLUSTER_COMPRESSED ? bm != 0
             : t == QCOW2_CLUSTER_NORMAL ? (alloc & zero) != 0
             : alloc != 0;
    if (bad)
        qcow2_mark_broken(q, "extended L2 bitmap 0x%llx (entry 0x%llx) for guest offset 0x%llx is invalid",
                          (unsigned long long)bm, (unsigned long long)e, (unsigned long long)off);
    return !bad;
}

/* What unit u of a valid, uncompressed entry holds. */
enum unit_kind { U_DATA, U_ZERO, U_UNALLOC };

static enum unit_kind unit_kind(const struct qcow2 *q, uint64_t e, uint64_t bm, uint32_t u)
{
    if (!q->extl2) {
        enum qcow2_cluster_type t = etype(q, e);
        return t == QCOW2_CLUSTER_NORMAL ? U_DATA
             : t == QCOW2_CLUSTER_ZERO_PLAIN || t == QCOW2_CLUSTER_ZERO_ALLOC ? U_ZERO : U_UNALLOC;
    }
    return (extl2_alloc_bits(bm) >> u) & 1 ? U_DATA : (extl2_zero_bits(bm) >> u) & 1 ? U_ZERO : U_UNALLOC;
}

/* Do bytes [from, to) of the cluster described by a valid (e, bm) read as
 * zeros? */
static bool part_reads_zero(const struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t from, uint64_t to)
{
    if (from >= to)
        return true;
    if (etype(q, e) == QCOW2_CLUSTER_COMPRESSED)
        return false;
    uint32_t m = units_touched(q, from, to);
    for (uint32_t u = 0; u < unit_count(q); u++) {
        if (!((m >> u) & 1))
            continue;
        enum unit_kind k = unit_kind(q, e, bm, u);
        if (k == U_DATA || (k == U_UNALLOC && q->backing))
            return false;
    }
    return true;
}

static void unlink_alloc(struct qcow2 *q, struct inflight_alloc *a)
{
    struct inflight_alloc **pp = &q->allocs;
    while (*pp != a)
        pp = &(*pp)->next;
    *pp = a->next;
    co_queue_wake_all(&a->waiters);
}

/* Drop the reference an L2 entry held, once the entry's replacement is
 * durable (qcow2_defer_free).  Owned and shared clusters alike lose one ref;
 * with punch (a discard), a cluster left unused is punched out of the file. */
static int release_entry(struct qcow2 *q, uint64_t e, bool punch)
{
    void (*drop)(struct qcow2 *, uint64_t, uint64_t) = punch ? qcow2_defer_free_punch : qcow2_defer_free;
    if (has_data_file(q)) {
        /* Nothing to release: data clusters are not refcounted and belong to
         * their guest cluster for good.  A discard punches the data now, as
         * QEMU does: a later write to the cluster can only come after this
         * request's change to the entry, so no hole lands on newer data. */
        enum qcow2_cluster_type t = etype(q, e);
        if (punch && (t == QCOW2_CLUSTER_NORMAL || t == QCOW2_CLUSTER_ZERO_ALLOC))
            return qcow2_data_punch(q, e & L2E_OFFSET_MASK, cl_size(q));
        return 0;
    }
    switch (etype(q, e)) {
    case QCOW2_CLUSTER_NORMAL:
    case QCOW2_CLUSTER_ZERO_ALLOC:
        drop(q, e & L2E_OFFSET_MASK, cl_size(q));
        break;
    case QCOW2_CLUSTER_COMPRESSED: {
        uint64_t coff, nbytes;
        qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
        /* Readers in flight keep the old bytes (rule 5); nothing that
         * starts from now on may find them in the cache. */
        qcow2_zc_invalidate(q, coff, nbytes);
        drop(q, coff, nbytes);
        break;
    }
    default:
        break;
    }
    return 0;
}

/* Give L1 entry l1i a table we own alone: allocate an empty one, or copy a
 * table shared with a snapshot.  The new table is on disk before the L1
 * entry names it (the L1 reaches the disk only in a flush, after a sync). */
static int l2_make_writable(struct qcow2 *q, uint64_t l1i)
{
    co_mutex_lock(&q->alloc_lock);
    uint64_t e = q->l1[l1i];
    uint64_t old = e & L1E_OFFSET_MASK;
    int r = 0;
    if ((e & QCOW_OFLAG_COPIED) && old)
        goto out;   /* someone else did it while we waited */
    uint64_t cs = cl_size(q), host, got;
    r = qcow2_alloc_clusters(q, 1, &host, &got);
    if (r < 0)
        goto out;
    uint8_t *table = io_zalloc(cs);
    for (uint64_t so = 0; old && so < cs && r == 0; so += q->l2c.slice_size) {
        struct mslice *s;
        r = qcow2_cache_get(&q->l2c, old + so, &s);
        if (r == 0) {
            memcpy(table + so, s->data, q->l2c.slice_size);
            qcow2_cache_put(&q->l2c, s);
        }
    }
    if (r == 0)
        r = qcow2_write_new_cluster(q, host, table);
    io_free(table);
    if (r < 0) {
        qcow2_rc_update(q, host / cs, -1);   /* never referenced */
        goto out;
    }
    qcow2_map_changed(q);
    q->l1[l1i] = host | QCOW_OFLAG_COPIED;
    q->l1_dirty[l1i * 8 / 512] = 1;
    qcow2_ol_add(q, host, OL_BIT_ACTIVE_L2);
    if (old) {
        qcow2_ol_remove(q, old, OL_BIT_ACTIVE_L2);
        qcow2_defer_free(q, old, cs);
    }
out:
    co_mutex_unlock(&q->alloc_lock);
    return r;
}

/* The L2 slice mapping guest offset off, pinned.  Returns 1 with *sp set,
 * 0 when no L2 table exists (the whole range is unallocated), or -errno.
 * for_write makes sure the table exists and is ours alone. */
static int l2_lookup(struct qcow2 *q, uint64_t off, bool for_write, struct mslice **sp, uint32_t *idxp)
{
    uint64_t cs = cl_size(q);
    uint64_t l1i = off >> (cl_bits(q) + q->h.l2_bits);
    uint64_t l2i = (off >> cl_bits(q)) & (q->h.l2_entries - 1);
    if (l1i >= q->h.l1_size)
        return -EIO;
    uint64_t e = q->l1[l1i];
    if (for_write && (!(e & QCOW_OFLAG_COPIED) || !(e & L1E_OFFSET_MASK))) {
        int r = l2_make_writable(q, l1i);
        if (r < 0)
            return r;
        e = q->l1[l1i];
    }
    uint64_t t = e & L1E_OFFSET_MASK;
    if ((e & L1E_RESERVED_MASK) || (t & (cs - 1)) || (t && t + cs > q->host_end)) {
        qcow2_mark_broken(q, "L1 entry %llu is invalid (0x%llx)", (unsigned long long)l1i,
                          (unsigned long long)e);
        return -EIO;
    }
    if (!t)
        return 0;
    /* An entry about to change lives in a table that must be nothing else
     * (an L1 entry may name the header, the L1 or the refcount table). */
    if (for_write && qcow2_ol_check(q, t, cs, OL_ACTIVE_L2, "an L2 table") < 0)
        return -EIO;
    int r = qcow2_cache_get(&q->l2c, l2_slice_of(q, t, l2i, idxp), sp);
    return r < 0 ? r : 1;
}

/* Pin the writable L2 slice mapping guest offset off, once no allocation
 * is in flight on its cluster: the entry may then be changed safely. */
static int pin_entry_for_update(struct qcow2 *q, uint64_t off, struct mslice **sp, uint32_t *idxp)
{
    uint64_t c = off >> cl_bits(q);
    for (;;) {
        struct inflight_alloc *a = qcow2_find_alloc(q, c);
        if (a) {
            co_queue_wait(&a->waiters);
            continue;
        }
        int r = l2_lookup(q, off, true, sp, idxp);
        if (r < 0)
            return r;
        if (!qcow2_find_alloc(q, c))
            return 0;
        qcow2_cache_put(&q->l2c, *sp);   /* one started while we waited for the table */
    }
}

/* Copy the L2 entry (and extended-L2 bitmap) for guest offset off; both
 * are 0 with *has_table false when no L2 table exists.  The slice is not
 * kept: a freed cluster is not reused while this request is in flight.
 * *seen (if asked) names the slice it was in, unpinned (for map hints). */
static int peek_entry_seen(struct qcow2 *q, uint64_t off, uint64_t *e, uint64_t *bm, bool *has_table,
                           struct mslice **seen)
{
    struct mslice *s = NULL;
    uint32_t idx;
    *has_table = false;     /* defined on errors too: callers may look before checking */
    *e = *bm = 0;
    int r = l2_lookup(q, off, false, &s, &idx);
    if (r < 0)
        return r;
    *has_table = r == 1;
    if (r == 1) {
        *e = l2e_get(q, s, idx);
        *bm = l2bm_get(q, s, idx);
        qcow2_cache_put(&q->l2c, s);
    }
    if (seen)
        *seen = s;
    return 0;
}

static int peek_entry(struct qcow2 *q, uint64_t off, uint64_t *e, uint64_t *bm, bool *has_table)
{
    return peek_entry_seen(q, off, e, bm, has_table, NULL);
}

/* ---- reading --------------------------------------------------------------- */

static int read_host(struct qcow2 *q, uint64_t host, uint64_t len, uint8_t *buf)
{
    qcow2_zc_note_plain_read(q, len);
    return qcow2_data_read(q, buf, len, host);
}

static int read_backing(struct qcow2 *q, uint64_t off, uint64_t len, uint8_t *buf)
{
    uint64_t have = 0;
    if (q->backing && off < q->backing->size) {
        have = MIN(len, q->backing->size - off);
        int r = img_read(q->backing, buf, off, have);
        if (r < 0)
            return r;
    }
    /* Past the end of a shorter backing file the guest reads zeros. */
    if (have < len)
        memset(buf + have, 0, len - have);
    return 0;
}

static int read_compressed(struct qcow2 *q, uint64_t e, uint64_t off, uint64_t len, uint8_t *buf)
{
    uint64_t coff, nbytes, cs = cl_size(q);
    qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
    if (coff >= q->host_end) {
        qcow2_mark_broken(q, "compressed cluster at 0x%llx lies past the end of the image",
                          (unsigned long long)coff);
        return -EIO;
    }
    if (nbytes > q->host_end - coff)
        nbytes = q->host_end - coff;   /* the last compressed cluster may end the file */
    (void)cs;
    /* Through the cache of decompressed clusters, inflated on the pool. */
    return qcow2_zc_read(q, coff, nbytes, off, offset_into_cluster(q, off), len, buf);
}

enum ext_kind { EXT_NONE, EXT_HOST, EXT_ZERO, EXT_BACKING };

/* Read guest range [off, off+len) inside one cluster described by (e, bm). */
static int read_cluster_part(struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t off, uint64_t len,
                             uint8_t *buf)
{
    if (!entry_ok(q, e, bm, off))
        return -EIO;
    if (etype(q, e) == QCOW2_CLUSTER_COMPRESSED)
        return read_compressed(q, e, off, len, buf);
    /* Unit by unit (one unit without extended L2): allocated, zero, or
     * unallocated (backing file or zeros); runs of one kind in one I/O. */
    uint64_t host = e & L2E_OFFSET_MASK, us = unit_size(q);
    while (len) {
        uint64_t in = offset_into_cluster(q, off);
        enum unit_kind k = unit_kind(q, e, bm, (uint32_t)(in / us));
        uint64_t n = MIN(len, us - in % us);
        for (uint32_t u = (uint32_t)(in / us) + 1; n < len && unit_kind(q, e, bm, u) == k; u++)
            n += MIN(len - n, us);
        int r = k == U_DATA ? read_host(q, host + in, n, buf)
              : k == U_UNALLOC ? read_backing(q, off, n, buf)
              : (memset(buf, 0, n), 0);
        if (r < 0)
            return r;
        off += n;
        buf += n;
        len -= n;
    }
    return 0;
}

struct extent {
    enum ext_kind kind;
    uint64_t host, off, len;
    uint8_t *buf;
};

static int extent_issue(struct qcow2 *q, struct extent *x)
{
    int r = 0;
    switch (x->kind) {
    case EXT_HOST: r = read_host(q, x->host, x->len, x->buf); break;
    case EXT_ZERO: memset(x->buf, 0, x->len); break;
    case EXT_BACKING: r = read_backing(q, x->off, x->len, x->buf); break;
    case EXT_NONE: break;
    }
    x->kind = EXT_NONE;
    return r;
}

/* The compressed clusters of one multi-cluster read are decompressed in
 * parallel: each by a child coroutine (parked on the worker pool), all
 * finished before the read returns (so they are covered by its qreq). */
struct zgroup { unsigned live; int err; struct co_queue done; };
struct zchild { struct qcow2 *q; uint64_t e, off, n; uint8_t *buf; struct zgroup *g; };

static void zchild_run(void *arg)
{
    struct zchild *c = arg;
    int r = read_cluster_part(c->q, c->e, 0, c->off, c->n, c->buf);
    if (r < 0 && !c->g->err)
        c->g->err = r;
    if (--c->g->live == 0)
        co_queue_wake_all(&c->g->done);
    free(c);
}

int qcow2_co_read(struct image *img, void *vbuf, uint64_t off, uint64_t len)
{
    struct qcow2 *q = to_qcow2(img);
    uint8_t *buf = vbuf;
    struct qreq rq;
    struct extent x = { .kind = EXT_NONE };
    struct zgroup zg = { .live = 0, .err = 0, .done = CO_QUEUE_INIT };
    int r = 0;
    qcow2_req_begin(q, &rq);
    while (len && r == 0) {
        uint64_t n = MIN(len, cl_size(q) - offset_into_cluster(q, off));
        uint64_t e, bm;
        bool has_table;
        r = peek_entry(q, off, &e, &bm, &has_table);
        if (r < 0)
            break;
        /* Simple mappings merge into one extent (one I/O for contiguous
         * host clusters); anything else is read cluster by cluster. */
        enum qcow2_cluster_type t = etype(q, e);
        enum ext_kind k = EXT_NONE;
        uint64_t host = 0;
        if (t == QCOW2_CLUSTER_NORMAL && (!q->extl2 || bm == SC_ALL) && qcow2_datafile_entry_ok(q, e, off)) {
            k = EXT_HOST;
            host = (e & L2E_OFFSET_MASK) + offset_into_cluster(q, off);
        } else if (t == QCOW2_CLUSTER_ZERO_PLAIN || t == QCOW2_CLUSTER_ZERO_ALLOC ||
                   (t == QCOW2_CLUSTER_UNALLOCATED && bm == 0 && !q->backing)) {
            k = EXT_ZERO;
        } else if (t == QCOW2_CLUSTER_UNALLOCATED && bm == 0) {
            k = EXT_BACKING;
        }
        bool extends = k != EXT_NONE && k == x.kind && x.off + x.len == off &&
                       (k != EXT_HOST || x.host + x.len == host);
        if (extends) {
            x.len += n;
        } else {
            r = extent_issue(q, &x);
            struct zchild *zc = NULL;
            if (r == 0 && k == EXT_NONE && t == QCOW2_CLUSTER_COMPRESSED && len > n && co_in_coroutine())
                zc = malloc(sizeof(*zc));
            if (zc) {
                *zc = (struct zchild){ .q = q, .e = e, .off = off, .n = n, .buf = buf, .g = &zg };
                zg.live++;
                co_spawn(zchild_run, zc);
            } else if (r == 0 && k == EXT_NONE)
                r = read_cluster_part(q, e, bm, off, n, buf);
            else
                x = (struct extent){ .kind = k, .host = host, .off = off, .len = n, .buf = buf };
        }
        off += n;
        buf += n;
        len -= n;
    }
    if (r == 0)
        r = extent_issue(q, &x);
    while (zg.live)
        co_queue_wait(&zg.done);
    if (r == 0)
        r = zg.err;
    qcow2_req_end(q, &rq);
    return r;
}

/* ---- writing ----------------------------------------------------------------- */

/* Guest data may be written (or punched) at [host, host+len) of a cluster
 * we own only if that is none of the image's metadata (overlap.c) nor past
 * the end of the file without the refcounts saying the cluster is ours:
 * a hostile or damaged image may map guest data anywhere. */
static int check_own_range(struct qcow2 *q, uint64_t off, uint64_t host, uint64_t len)
{
    if (has_data_file(q))
        return 0;   /* the data file holds no metadata; entry_ok checked host == guest */
    int r = qcow2_ol_check(q, host, len, 0, "guest data");
    if (r < 0)
        return r;
    if (owned_past_end(q, host, len))
        return 0;
    qcow2_mark_broken(q, "guest offset 0x%llx maps to an unowned cluster past the end of the file "
                      "at 0x%llx", (unsigned long long)off, (unsigned long long)host);
    return -EIO;
}

/* Extended L2: where the copy into a new cluster replacing (e, bm) starts,
 * for guest data from byte o of the cluster.  Only subclusters that hold
 * something are copied, as QEMU does: all of a compressed cluster; of a
 * cluster shared with a snapshot, from its first allocated subcluster; of
 * an unallocated one, only the start of the subcluster the data begins in
 * (the rest keeps reading from the backing file or as zeros).  Without
 * extended L2 the whole cluster is copied. */
static uint64_t cow_start(const struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t o)
{
    if (!q->extl2)
        return 0;
    uint64_t us = unit_size(q);
    uint32_t u = (uint32_t)(o / us), alloc = extl2_alloc_bits(bm);
    switch (etype(q, e)) {
    case QCOW2_CLUSTER_COMPRESSED:
        return 0;
    case QCOW2_CLUSTER_NORMAL:
        return MIN(u, alloc ? (uint32_t)__builtin_ctz(alloc) : u) * us;
    default:
        return u * us;
    }
}

/* ... and where it ends, for data ending at byte eo (0 < eo <= cluster size). */
static uint64_t cow_end(const struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t eo)
{
    if (!q->extl2)
        return cl_size(q);
    uint64_t us = unit_size(q);
    uint32_t u = (uint32_t)((eo - 1) / us), alloc = extl2_alloc_bits(bm);
    switch (etype(q, e)) {
    case QCOW2_CLUSTER_COMPRESSED:
        return cl_size(q);
    case QCOW2_CLUSTER_NORMAL: {
        uint32_t last = alloc ? 31 - (uint32_t)__builtin_clz(alloc) : u;
        return ((u > last ? u : last) + 1) * us;
    }
    default:
        return (u + 1) * us;
    }
}

/* ---- allocating writes, in phases ----------------------------------------------
 * write_alloc runs them in one go; img_map (zero copy) runs alloc_begin,
 * lets the frontend write the data, and commits in img_map_end. */

/* One allocating write into the clusters mapped by slice s from entry idx
 * on, from alloc_begin to alloc_finish. */
struct alloc_plan {
    struct inflight_alloc a;    /* in q->allocs: other writers to these clusters wait */
    struct mslice *s;           /* pinned until alloc_finish */
    uint32_t idx;
    bool reuse;                 /* our own zeroed cluster (ZERO_ALLOC), filled in place */
    uint64_t c0;                /* the first guest cluster */
    uint64_t host, got;         /* the run of host clusters: where, how many */
    uint64_t e0, bm0, el, bml;  /* the first and the last entry the run replaces */
    uint64_t off, data_end;     /* the guest data the run takes: [off, data_end) */
    uint64_t cow_from, cow_to;  /* what the run holds once written (guest offsets) */
    uint64_t head_len, tail_len;    /* copied from the old content around the data */
    uint64_t wr;                /* where the write starts: cow_from, or off without a head */
};

/* [cow_from, cow_to): the part of the clusters from off's to data_end's
 * that a write of [off, data_end) replacing entries (e0, bm0) .. (el, bml)
 * leaves holding something (see cow_start). */
static void cow_range(const struct qcow2 *q, struct alloc_plan *p)
{
    uint64_t span_start = start_of_cluster(q, p->off), last_start = start_of_cluster(q, p->data_end - 1);
    p->cow_from = span_start + cow_start(q, p->e0, p->bm0, p->off - span_start);
    p->cow_to = last_start + cow_end(q, p->el, p->bml, p->data_end - last_start);
}

/* Do the copy-on-write head and tail read as zeros? */
static bool padding_reads_zero(const struct qcow2 *q, const struct alloc_plan *p)
{
    uint64_t span_start = start_of_cluster(q, p->off), last_start = start_of_cluster(q, p->data_end - 1);
    return part_reads_zero(q, p->e0, p->bm0, p->cow_from - span_start, p->off - span_start) &&
           part_reads_zero(q, p->el, p->bml, p->data_end - last_start, p->cow_to - last_start);
}

/* Where in the file the write of the plan starts. */
static uint64_t alloc_host(const struct qcow2 *q, const struct alloc_plan *p)
{
    return p->host + (p->wr - p->c0 * cl_size(q));
}

/* A refcount may have called a table's cluster free (a damaged image):
 * the range about to be written must be no metadata.  A data file holds
 * none. */
static int alloc_check(struct qcow2 *q, const struct alloc_plan *p)
{
    if (has_data_file(q))
        return 0;
    uint64_t n = p->head_len + (p->data_end - p->off) + p->tail_len;
    return qcow2_ol_check(q, alloc_host(q, p), n, 0, "guest data");
}

/* The write failed (or is not done after all): nothing names the new
 * clusters yet, so they are free again at once. */
static void alloc_abort(struct qcow2 *q, struct alloc_plan *p)
{
    if (p->reuse || has_data_file(q))
        return;
    for (uint64_t i = 0; i < p->got; i++)
        qcow2_rc_update(q, p->host / cl_size(q) + i, -1);
}

/* The end of every plan: unpin the slice, let waiting writers go. */
static void alloc_finish(struct qcow2 *q, struct alloc_plan *p)
{
    qcow2_cache_put(&q->l2c, p->s);
    unlink_alloc(q, &p->a);
}

/* Begin an allocating write of [off, off+len) whose first cluster is
 * mapped by entry idx of the pinned slice s: take a run of new clusters
 * (contiguous in the file) for as many of the write's clusters as need
 * one in this slice, or our own zeroed cluster, and work out the copy-on-
 * write around the data.  The clusters count as in flight until
 * alloc_finish; nothing names them before alloc_commit (their refcount is
 * raised first, rule 1).  0: the plan owns s; -errno: all given back. */
static int alloc_begin(struct qcow2 *q, struct mslice *s, uint32_t idx, uint64_t off, uint64_t len,
                       struct alloc_plan *p)
{
    uint64_t cs = cl_size(q), c0 = off >> cl_bits(q), end = off + len;
    *p = (struct alloc_plan){ .s = s, .idx = idx, .c0 = c0, .off = off,
                              .e0 = l2e_get(q, s, idx), .bm0 = l2bm_get(q, s, idx) };
    p->reuse = is_zero_alloc_owned(q, p->e0);
    uint64_t want = 1;
    while (!p->reuse && idx + want < entries_per_slice(q) && (c0 + want) * cs < end) {
        uint64_t ek = l2e_get(q, s, idx + want);
        if (is_inplace(q, ek) || is_zero_alloc_owned(q, ek) || qcow2_find_alloc(q, c0 + want))
            break;
        want++;
    }
    p->a = (struct inflight_alloc){ .first = c0, .last = c0 + want - 1, .waiters = CO_QUEUE_INIT,
                                    .next = q->allocs };
    q->allocs = &p->a;
    qcow2_map_changed(q);   /* hints check allocations in flight */
    if (!entry_ok(q, p->e0, p->bm0, off)) {
        alloc_finish(q, p);
        return -EIO;
    }
    bool fresh = false;
    if (p->reuse) {
        p->host = p->e0 & L2E_OFFSET_MASK;
        p->got = 1;
    } else if (has_data_file(q)) {
        /* The data file has a place for every guest cluster: its own. */
        p->host = c0 * cs;
        p->got = want;
    } else {
        co_mutex_lock(&q->alloc_lock);
        uint64_t end_before = q->host_end;
        int r = qcow2_alloc_clusters(q, want, &p->host, &p->got);
        co_mutex_unlock(&q->alloc_lock);
        if (r < 0) {
            p->got = 0;
            alloc_finish(q, p);
            return r;
        }
        p->a.last = c0 + p->got - 1;
        /* Clusters past the file's end were never written: they read as
         * zeros already, so COW from zeros needs no write at all (not when
         * encrypted: plain zeros must be stored encrypted). */
        fresh = p->host >= end_before && !q->crypto;
    }
    uint64_t last_start = (c0 + p->got - 1) * cs;
    uint32_t li = idx + (uint32_t)p->got - 1;
    p->data_end = MIN(end, last_start + cs);
    p->el = l2e_get(q, s, li);
    p->bml = l2bm_get(q, s, li);
    if (li != idx && !entry_ok(q, p->el, p->bml, last_start)) {
        alloc_abort(q, p);
        alloc_finish(q, p);
        return -EIO;
    }
    cow_range(q, p);
    p->head_len = off - p->cow_from;
    p->tail_len = p->cow_to - p->data_end;
    p->wr = p->cow_from;
    if (fresh && padding_reads_zero(q, p)) {
        p->head_len = p->tail_len = 0;
        p->wr = off;
    }
    return 0;
}

/* The data (with the copied head and tail) is written: now the L2 entries
 * (and subcluster bitmaps) name the new clusters, never before (rule 2),
 * and the flush that makes them durable syncs the data first (rule 4). */
static void alloc_commit(struct qcow2 *q, struct alloc_plan *p)
{
    uint64_t cs = cl_size(q), span_start = p->c0 * cs, last_start = span_start + (p->got - 1) * cs;
    for (uint64_t i = 0; i < p->got; i++) {
        uint32_t k = p->idx + (uint32_t)i;
        uint64_t old = l2e_get(q, p->s, k), obm = l2bm_get(q, p->s, k);
        l2e_set(q, p->s, k, (p->host + i * cs) | QCOW_OFLAG_COPIED);
        if (q->extl2) {
            /* The subclusters written are allocated now; the others keep
             * their state (zero, or unallocated: backing file). */
            uint64_t from = i == 0 ? p->cow_from - span_start : 0;
            uint64_t to = i == p->got - 1 ? p->cow_to - last_start : cs;
            uint32_t m = units_touched(q, from, to);
            l2bm_set(q, p->s, k, mkbm(extl2_alloc_bits(obm) | m, extl2_zero_bits(obm) & ~m));
        }
        /* The old reference goes once this change is durable (rule 5). */
        if (!p->reuse)
            release_entry(q, old, false);   /* never fails without punch */
    }
    qcow2_cache_mark_dirty(p->s);
}

/* Allocate and write clusters for the start of [off, off+len), all mapped by
 * slice s at idx.  The parts of the new clusters around the data are copied
 * from the old content (backing file, zeros, shared or compressed cluster;
 * with extended L2 only the subclusters that need it, see cow_start) and
 * written together with the guest data in one I/O.  The L2 entries (and
 * subcluster bitmaps) change only after that write completed; the flush
 * that makes them durable syncs the data first.  Releases s.
 * *done = bytes written. */
static int write_alloc(struct qcow2 *q, struct mslice *s, uint32_t idx, const uint8_t *buf,
                       uint64_t off, uint64_t len, uint64_t *done)
{
    struct alloc_plan p;
    int r = alloc_begin(q, s, idx, off, len, &p);
    if (r < 0)
        return r;
    uint8_t *head = NULL, *tail = NULL;
    struct iovec iov[3];
    int niov = 0;
    if (p.head_len) {
        head = io_alloc(p.head_len);
        r = read_cluster_part(q, p.e0, p.bm0, p.cow_from, p.head_len, head);
        iov[niov++] = (struct iovec){ head, p.head_len };
    }
    iov[niov++] = (struct iovec){ (void *)buf, p.data_end - off };
    if (r == 0 && p.tail_len) {
        tail = io_alloc(p.tail_len);
        r = read_cluster_part(q, p.el, p.bml, p.data_end, p.tail_len, tail);
        iov[niov++] = (struct iovec){ tail, p.tail_len };
    }
    if (r == 0)
        r = alloc_check(q, &p);
    if (r == 0)
        r = qcow2_data_writev(q, iov, niov, alloc_host(q, &p), false);
    if (r == 0) {
        alloc_commit(q, &p);
        *done = p.data_end - off;
    } else {
        alloc_abort(q, &p);
    }
    io_free(head);
    io_free(tail);
    alloc_finish(q, &p);
    return r;
}

/* Extended L2: write [off, off+n) (inside one cluster) into a cluster we
 * own where some of the subclusters it touches are not allocated yet.  The
 * parts of those subclusters the data does not cover are filled with what
 * they read as now (zeros or the backing file) in the same I/O as the data;
 * only then are they marked allocated (data before the L2 change, as for a
 * new cluster).  Other writers to this cluster wait meanwhile (it counts
 * as an allocation in flight), so two partial writes into one subcluster
 * never both fill it from the old content.  Releases s. */
static int write_subclusters(struct qcow2 *q, struct mslice *s, uint32_t idx, const uint8_t *buf,
                             uint64_t off, uint64_t n)
{
    uint64_t us = unit_size(q), c = off >> cl_bits(q), cstart = c * cl_size(q), in = off - cstart;
    uint64_t e = l2e_get(q, s, idx), bm = l2bm_get(q, s, idx), host = e & L2E_OFFSET_MASK;
    uint32_t alloc = extl2_alloc_bits(bm);
    uint64_t from = in, to = in + n;
    if (!((alloc >> (in / us)) & 1))
        from = in / us * us;
    if (!((alloc >> ((to - 1) / us)) & 1))
        to = (to + us - 1) / us * us;
    struct inflight_alloc a = { .first = c, .last = c, .waiters = CO_QUEUE_INIT, .next = q->allocs };
    q->allocs = &a;
    qcow2_map_changed(q);
    uint8_t *head = NULL, *tail = NULL;
    struct iovec iov[3];
    int niov = 0;
    int r = check_own_range(q, off, host + from, to - from);
    if (r == 0 && from < in) {
        head = io_alloc(in - from);
        r = read_cluster_part(q, e, bm, cstart + from, in - from, head);
        iov[niov++] = (struct iovec){ head, in - from };
    }
    iov[niov++] = (struct iovec){ (void *)buf, n };
    if (r == 0 && to > in + n) {
        tail = io_alloc(to - in - n);
        r = read_cluster_part(q, e, bm, off + n, to - in - n, tail);
        iov[niov++] = (struct iovec){ tail, to - in - n };
    }
    if (r == 0)
        r = qcow2_data_writev(q, iov, niov, host + from, false);
    if (r == 0) {
        uint64_t now = l2bm_get(q, s, idx);
        uint32_t m = units_touched(q, from, to);
        l2bm_set(q, s, idx, mkbm(extl2_alloc_bits(now) | m, extl2_zero_bits(now) & ~m));
        qcow2_cache_mark_dirty(s);
    }
    io_free(head);
    io_free(tail);
    qcow2_cache_put(&q->l2c, s);
    unlink_alloc(q, &a);
    return r;
}

/* May the part [from, from+len) of the cluster mapped by entry k of s be
 * overwritten in place: ours, and (extended L2) every subcluster it touches
 * allocated? */
static bool writable_in_place(struct qcow2 *q, const struct mslice *s, uint32_t k, uint64_t from, uint64_t len)
{
    if (!is_inplace(q, l2e_get(q, s, k)))
        return false;
    if (!q->extl2)
        return true;
    uint64_t bm = l2bm_get(q, s, k);
    uint32_t m = units_touched(q, from, from + len);
    return (extl2_alloc_bits(bm) & m) == m && !(extl2_zero_bits(bm) & m);
}

/* A write of len bytes whose first n land in place at first_host (entry
 * idx of s): how many of them can go in place as one host extent, taking
 * the following entries while they are writable in place and contiguous. */
static uint64_t inplace_extent(struct qcow2 *q, const struct mslice *s, uint32_t idx, uint64_t n,
                               uint64_t len, uint64_t first_host)
{
    uint64_t cs = cl_size(q);
    for (uint32_t k = idx + 1; n < len && k < entries_per_slice(q); k++) {
        if (!writable_in_place(q, s, k, 0, MIN(len - n, cs)) ||
            (l2e_get(q, s, k) & L2E_OFFSET_MASK) != first_host + (k - idx) * cs)
            break;
        n += MIN(len - n, cs);
    }
    return n;
}

/* Are the L2 entries in slice s, and the L1 entries naming L2 tables, on
 * disk as they are in memory?  Conservative: any dirty L1 sector or a flush
 * (or refcount-table growth) in progress counts as "not yet". */
static bool mapping_durable(struct qcow2 *q, const struct mslice *s)
{
    if (s->dirty || q->flush_lock.locked)
        return false;
    uint64_t sectors = ((uint64_t)q->h.l1_size * 8 + 511) / 512;
    for (uint64_t i = 0; i < sectors; i++)
        if (q->l1_dirty[i])
            return false;
    return true;
}

int qcow2_co_write(struct image *img, const void *vbuf, uint64_t off, uint64_t len, unsigned flags)
{
    struct qcow2 *q = to_qcow2(img);
    const uint8_t *buf = vbuf;
    bool fua = flags & IMG_FUA, metadata_changed = false;
    struct qreq rq;
    int r = 0;
    if (q->broken)
        return -EIO;
    qcow2_bitmaps_mark(q, off, len);
    qcow2_req_begin(q, &rq);
    while (len) {
        uint64_t cs = cl_size(q), in = offset_into_cluster(q, off), n = MIN(len, cs - in);
        struct mslice *s;
        uint32_t idx;
        r = pin_entry_for_update(q, off, &s, &idx);
        if (r < 0)
            break;
        uint64_t e = l2e_get(q, s, idx);
        if (is_inplace(q, e) && !entry_ok(q, e, l2bm_get(q, s, idx), off)) {
            qcow2_cache_put(&q->l2c, s);
            r = -EIO;
            break;
        }
        if (writable_in_place(q, s, idx, in, n)) {
            /* Owned clusters are overwritten in place; contiguous host
             * clusters in this slice merge into one write. */
            uint64_t first_host = e & L2E_OFFSET_MASK;
            n = inplace_extent(q, s, idx, n, len, first_host);
            /* RWF_DSYNC makes only the data durable: if the entries
             * mapping it are not on disk yet (allocated since the last
             * flush, or a flush is writing them now), FUA needs a flush. */
            if (fua && !mapping_durable(q, s))
                metadata_changed = true;
            qcow2_cache_put(&q->l2c, s);
            r = check_own_range(q, off, first_host + in, n);
            if (r < 0)
                break;
            /* With that flush to come, RWF_DSYNC would sync the data twice:
             * the flush syncs it before the entries (rule 4). */
            struct iovec iov = { (void *)buf, n };
            r = qcow2_data_writev(q, &iov, 1, first_host + in, fua && !metadata_changed);
            if (r < 0)
                break;
        } else if (is_inplace(q, e)) {
            r = write_subclusters(q, s, idx, buf, off, n);
            if (r < 0)
                break;
            metadata_changed = true;
        } else {
            r = write_alloc(q, s, idx, buf, off, len, &n);
            if (r < 0)
                break;
            metadata_changed = true;
        }
        r = 0;
        off += n;
        buf += n;
        len -= n;
    }
    qcow2_req_end(q, &rq);
    /* FUA: in-place writes to durable mappings used RWF_DSYNC; new or
     * not yet durable mappings need a full flush. */
    if (r == 0 && fua && metadata_changed)
        r = qcow2_flush(q);
    return r;
}

/* ---- write-zeroes and discard ------------------------------------------------- */

/* What a write-zeroes or a discard asks for. */
struct zop {
    bool discard;   /* a discard (only reaches here with discard=unmap), else write-zeroes */
    bool unmap;     /* clusters may be let go and data punched out of the file: a discard,
                       or a write-zeroes without NO_HOLE under discard=unmap (MAY_UNMAP) */
};

/* The new state of one cluster's entry once units [u0, u1) of it are
 * zeroed or discarded (without extended L2 the unit is the whole cluster),
 * and the I/O that goes with it. */
struct zplan {
    uint64_t e, bm;     /* the new entry and subcluster bitmap */
    bool release;       /* drop the old entry's reference once the new one is durable */
    uint32_t punch;     /* units of our own cluster whose data is punched out now */
    bool in_place;      /* zero our whole cluster in the file (v2 has no zero flag) */
    bool write_zeroes;  /* write zero bytes through the write path (allocates) */
};

/* Decide how to zero units [u0, u1) of the cluster described by a valid
 * (e, bm).  The rules follow QEMU (zero_in_l2_slice, discard_in_l2_slice):
 *  - the range must read as zeros afterwards, never as backing-file data:
 *    the zero flag (v3), the subclusters' zero bits (extended L2), or, in
 *    v2, zeros written (with a backing file; a v2 discard does nothing
 *    there, see qcow2_co_discard) or the cluster made unallocated (without);
 *  - with unmap, a cluster that no longer holds data is let go (its
 *    reference dropped once the change is durable, then punched out of the
 *    file when its refcount reaches 0), unless --discard-no-unref keeps it
 *    (still ours, reading as zeros) and only punches its data now;
 *  - without unmap (NO_HOLE, or discard=ignore) our cluster stays allocated
 *    and reads as zeros through its zero flag or bits;
 *  - a cluster shared with a snapshot, or compressed, is never written:
 *    our reference goes once nothing of it is used, and it is punched only
 *    if that was its last reference. */
static void plan_zero(struct qcow2 *q, uint64_t e, uint64_t bm, uint32_t u0, uint32_t u1,
                      const struct zop *z, struct zplan *p)
{
    enum qcow2_cluster_type t = etype(q, e);
    bool owned = (e & QCOW_OFLAG_COPIED) && (t == QCOW2_CLUSTER_NORMAL || t == QCOW2_CLUSTER_ZERO_ALLOC);
    bool let_go = z->unmap && !q->no_unref;
    *p = (struct zplan){ .e = e, .bm = bm };
    if (q->extl2) {
        uint32_t m = units_mask(u0, u1), alloc = extl2_alloc_bits(bm), zero = extl2_zero_bits(bm);
        if (t == QCOW2_CLUSTER_COMPRESSED) {
            /* No subclusters: all of it, or (write-zeroes) zeros written. */
            if (m == SC_ALL) {
                p->e = 0;
                p->bm = mkbm(0, SC_ALL);
                p->release = true;
            } else {
                p->write_zeroes = !z->discard;
            }
        } else if (t == QCOW2_CLUSTER_UNALLOCATED) {
            if (q->backing)     /* else they read as zeros already */
                p->bm = mkbm(0, zero | m);
        } else if (!(alloc & ~m) && (!owned || let_go)) {
            p->e = 0;           /* nothing of it left in use */
            p->bm = mkbm(0, zero | m);
            p->release = true;
        } else {
            p->bm = mkbm(alloc & ~m, zero | m);
            if (owned && z->unmap)
                p->punch = alloc & m;
        }
        return;
    }
    bool v3 = q->h.version >= 3;
    if (t == QCOW2_CLUSTER_ZERO_PLAIN || (t == QCOW2_CLUSTER_UNALLOCATED && !q->backing))
        return;
    if (t == QCOW2_CLUSTER_UNALLOCATED) {
        if (v3)
            p->e = QCOW_OFLAG_ZERO;
        else
            p->write_zeroes = !z->discard;
    } else if (owned && !let_go) {
        /* Ours and kept: zero flag (ZERO_ALLOC: the next write reuses it). */
        if (v3)
            p->e = e | QCOW_OFLAG_ZERO;
        else
            p->in_place = true;
        if (v3 && z->unmap)
            p->punch = 1;
    } else if (v3 || !q->backing) {
        p->e = v3 ? QCOW_OFLAG_ZERO : 0;
        p->release = true;
    } else if (owned) {
        p->in_place = true;     /* v2 over a backing file: our cluster zeroed in the file */
    } else {
        p->write_zeroes = true; /* v2 over a backing file: a new cluster of zeros */
    }
}

static int write_zero_bytes(struct qcow2 *q, uint64_t off, uint64_t len)
{
    if (off + len > q->img.size)
        len = q->img.size - off;
    uint8_t *zero = io_zalloc(len);
    int r = qcow2_co_write(&q->img, zero, off, len, 0);
    io_free(zero);
    return r;
}

/* Zero [host, host+len) of a cluster we own right in the file: a hole
 * (unmap) or FALLOC_FL_ZERO_RANGE (stays allocated); zero bytes where the
 * file system can do neither.  Like any data write it is durable at the
 * next flush. */
static int zero_in_place(struct qcow2 *q, uint64_t off, uint64_t host, uint64_t len, bool unmap)
{
    int r = check_own_range(q, off, host, len);
    return r < 0 ? r : qcow2_data_zero(q, host, len, unmap);
}

/* Zero or discard units [u0, u1) of the cluster at guest offset coff. */
static int zero_units(struct qcow2 *q, uint64_t coff, uint32_t u0, uint32_t u1, const struct zop *z)
{
    uint64_t e, bm;
    bool has_table;
    int r = peek_entry(q, coff, &e, &bm, &has_table);
    if (r < 0 || (!has_table && !q->backing))
        return r;       /* no L2 table and no backing file: reads as zeros */
    if (!entry_ok(q, e, bm, coff))
        return -EIO;
    struct zplan p;
    plan_zero(q, e, bm, u0, u1, z, &p);
    if (p.e != e || p.bm != bm || p.punch || p.in_place) {
        /* Decide again on the entry as it is once no allocation is in
         * flight on the cluster (and its L2 table is ours). */
        struct mslice *s;
        uint32_t idx;
        r = pin_entry_for_update(q, coff, &s, &idx);
        if (r < 0)
            return r;
        e = l2e_get(q, s, idx);
        bm = l2bm_get(q, s, idx);
        if (!entry_ok(q, e, bm, coff)) {
            qcow2_cache_put(&q->l2c, s);
            return -EIO;
        }
        plan_zero(q, e, bm, u0, u1, z, &p);
        if (p.e != e || p.bm != bm) {
            /* Only the entry changes here; a dropped reference is released
             * after the flush that makes this change durable (rule 5). */
            l2e_set(q, s, idx, p.e);
            l2bm_set(q, s, idx, p.bm);
            qcow2_cache_mark_dirty(s);
            if (p.release)
                r = release_entry(q, e, z->unmap);
        }
        qcow2_cache_put(&q->l2c, s);
    }
    /* The cluster stays ours: punch the data of the zeroed units now.  A
     * crash before the entry change is durable leaves the old entry over a
     * hole: the range reads as zeros, which a discard or write-zeroes not
     * yet flushed may. */
    uint64_t host = e & L2E_OFFSET_MASK, us = unit_size(q);
    for (uint32_t u = 0; u < unit_count(q) && r == 0; u++) {
        if (!((p.punch >> u) & 1))
            continue;
        uint32_t v = u;
        while (v < unit_count(q) && ((p.punch >> v) & 1))
            v++;
        r = check_own_range(q, coff + u * us, host + u * us, (v - u) * us);
        if (r == 0)
            r = qcow2_data_punch(q, host + u * us, (v - u) * us);
        u = v;
    }
    if (r == 0 && p.in_place)
        r = zero_in_place(q, coff, host, cl_size(q), z->unmap);
    if (r == 0 && p.write_zeroes)
        r = write_zero_bytes(q, coff + u0 * us, (u1 - u0) * us);
    return r;
}

/* Zero or discard [off, off+len), part of one unit. */
static int zero_piece(struct qcow2 *q, uint64_t off, uint64_t len, const struct zop *z)
{
    uint64_t e, bm;
    bool has_table;
    int r = peek_entry(q, off, &e, &bm, &has_table);
    if (r < 0)
        return r;
    if (has_table && !entry_ok(q, e, bm, off))
        return -EIO;
    uint64_t in = offset_into_cluster(q, off), host = (e & L2E_OFFSET_MASK) + in;
    bool compressed = etype(q, e) == QCOW2_CLUSTER_COMPRESSED;
    enum unit_kind k = !has_table ? U_UNALLOC : compressed ? U_DATA
                     : unit_kind(q, e, bm, (uint32_t)(in / unit_size(q)));
    bool own_data = k == U_DATA && !compressed && (e & QCOW_OFLAG_COPIED);
    if (z->discard) {
        /* Advisory: the part of our own data is punched (reads as zeros,
         * its blocks go back to the file system); elsewhere nothing, as
         * QEMU ignores partial clusters. */
        if (!own_data || q->crypto)     /* a hole would not read as zeros once decrypted */
            return 0;
        r = check_own_range(q, off, host, len);
        return r < 0 ? r : qcow2_data_punch(q, host, len);
    }
    if (k == U_ZERO || (k == U_UNALLOC && !q->backing))
        return 0;
    return own_data ? zero_in_place(q, off, host, len, z->unmap) : write_zero_bytes(q, off, len);
}

/* Units entirely inside the range go through zero_units; the unaligned
 * head and tail of each cluster's part through zero_piece. */
static int zero_range(struct qcow2 *q, uint64_t off, uint64_t len, const struct zop *z)
{
    uint64_t cs = cl_size(q), us = unit_size(q);
    int r = 0;
    while (len && r == 0) {
        uint64_t coff = start_of_cluster(q, off), in = off - coff, n = MIN(len, cs - in);
        uint64_t end = in + n;
        if (off + n >= q->img.size)
            end = (end + us - 1) / us * us;     /* past the guest's end counts as covered */
        uint64_t a = (in + us - 1) / us * us, b = end / us * us;
        if (a < b)
            r = zero_units(q, coff, (uint32_t)(a / us), (uint32_t)(b / us), z);
        if (r == 0 && in < MIN(a, in + n))
            r = zero_piece(q, off, MIN(a, in + n) - in, z);
        uint64_t t = a > b ? a : b;
        if (r == 0 && t < in + n)
            r = zero_piece(q, coff + t, in + n - t, z);
        off += n;
        len -= n;
    }
    return r;
}

int qcow2_co_write_zeroes(struct image *img, uint64_t off, uint64_t len, unsigned flags)
{
    struct qcow2 *q = to_qcow2(img);
    struct zop z = { .discard = false, .unmap = !(flags & IMG_NO_HOLE) };
    struct qreq rq;
    if (q->broken)
        return -EIO;
    qcow2_bitmaps_mark(q, off, len);
    qcow2_req_begin(q, &rq);
    int r = qcow2_datafile_zero_raw(q, off, len, z.unmap);
    if (r == 0)
        r = zero_range(q, off, len, &z);
    qcow2_req_end(q, &rq);
    /* FUA always flushes: even a range that already reads as zeros may do
     * so only through entries not yet durable (a discard since the last
     * flush), and the zero-byte writes above ran without FUA. */
    if (r == 0 && (flags & IMG_FUA))
        r = qcow2_flush(q);
    return r;
}

int qcow2_co_discard(struct image *img, uint64_t off, uint64_t len)
{
    struct qcow2 *q = to_qcow2(img);
    struct zop z = { .discard = true, .unmap = true };
    struct qreq rq;
    if (q->broken)
        return -EIO;
    /* v2 has no zero flag: a discarded cluster would uncover the backing
     * file's stale data, so (as QEMU) discard does nothing there. */
    if (q->h.version < 3 && q->backing)
        return 0;
    qcow2_bitmaps_mark(q, off, len);
    qcow2_req_begin(q, &rq);
    /* data_file_raw: the range reads as zeros afterwards, so the data file
     * is zeroed first (the entries change after that, never before). */
    int r = qcow2_datafile_zero_raw(q, off, len, true);
    if (r == 0)
        r = zero_range(q, off, len, &z);
    qcow2_req_end(q, &rq);
    return r;
}

/* ---- compressed clusters (zwrite.c places the data) ---------------------------- */

int qcow2_map_compressed(struct qcow2 *q, uint64_t off, uint64_t ce)
{
    struct mslice *s;
    uint32_t idx;
    int r = pin_entry_for_update(q, off, &s, &idx);
    if (r < 0)
        return r;
    uint64_t old = l2e_get(q, s, idx), obm = l2bm_get(q, s, idx);
    if (!entry_ok(q, old, obm, off)) {
        qcow2_cache_put(&q->l2c, s);
        return -EIO;
    }
    /* The data is on disk already (zwrite.c writes it before calling
     * here); a compressed entry is never COPIED and, with extended L2,
     * has an all-zero bitmap: it covers the whole cluster. */
    l2e_set(q, s, idx, ce);
    l2bm_set(q, s, idx, 0);
    qcow2_cache_mark_dirty(s);
    qcow2_cache_put(&q->l2c, s);
    /* The old reference goes once this change is durable (rule 5). */
    return release_entry(q, old, false);
}

/* ---- zero copy: ranges a frontend may move itself (img_map) ------------------- */

struct qmap {
    struct qreq rq;             /* open from map to map_end: mapped clusters stay ours */
    bool flush;                 /* FUA write whose mapping is not on disk yet */
    bool alloc;                 /* an allocating write: plan is open until map_end */
    struct alloc_plan plan;
};
_Static_assert(sizeof(struct qmap) <= sizeof(((struct img_map *)0)->priv), "img_map.priv too small");

/* A read maps only what qcow2_co_read would read as one host extent
 * (normal clusters, every subcluster allocated, contiguous in one file). */
static int map_read(struct qcow2 *q, uint64_t off, uint64_t len, struct img_map *m)
{
    uint64_t cs = cl_size(q), end = off + len, host = 0;
    for (uint64_t o = off; o < end;) {
        uint64_t in = offset_into_cluster(q, o), n = MIN(end - o, cs - in), e, bm;
        bool has_table;
        struct mslice *s;
        int r = peek_entry_seen(q, o, &e, &bm, &has_table, &s);
        if (r < 0)
            return r;
        if (etype(q, e) != QCOW2_CLUSTER_NORMAL || (q->extl2 && bm != SC_ALL) ||
            !qcow2_datafile_entry_ok(q, e, o))
            return 0;
        /* One cluster: the next read of it may skip all this.  Nothing
         * waited since the entry was read: the verdict is of now. */
        if (n == len)
            qcow2_hint_store(q, o, s, e, bm, false, 0, q->map_gen);
        uint64_t h = (e & L2E_OFFSET_MASK) + in;
        if (o == off)
            host = h;
        else if (h != host + (o - off))
            return 0;
        o += n;
    }
    qcow2_zc_note_plain_read(q, len);
    m->file = q->data;
    m->host = host;
    return 1;
}

/* Before allocating for a zero copy write of [off, off+len) whose first
 * entry is idx of s: could new clusters take the data alone, with no
 * copy-on-write head or tail?  Yes when nothing around the data needs
 * copying (cluster bounds; with extended L2 subcluster bounds of clusters
 * holding no data), or maybe when what is around it reads as zeros (no
 * backing file): new clusters past the end of the file need no zeros
 * written (alloc_begin decides).  A cheap guess, so that writes which
 * cannot map do not allocate only to give the clusters back. */
static bool alloc_may_skip_cow(struct qcow2 *q, const struct mslice *s, uint32_t idx, uint64_t off,
                               uint64_t len)
{
    uint64_t span = ((off + len - 1) >> cl_bits(q)) - (off >> cl_bits(q));
    if (idx + span >= entries_per_slice(q))
        return false;       /* more than this slice: never one run */
    struct alloc_plan p = { .off = off, .data_end = off + len,
                            .e0 = l2e_get(q, s, idx), .bm0 = l2bm_get(q, s, idx),
                            .el = l2e_get(q, s, idx + (uint32_t)span),
                            .bml = l2bm_get(q, s, idx + (uint32_t)span) };
    cow_range(q, &p);
    if (p.cow_from == off && p.cow_to == off + len)
        return true;
    /* Zeros are left unwritten only in new clusters at the file's end. */
    return !has_data_file(q) && !is_zero_alloc_owned(q, p.e0) && padding_reads_zero(q, &p);
}

/* The write_alloc branch of qcow2_co_write split around the frontend's
 * data write: the clusters are allocated here, the frontend writes the
 * data, and qcow2_co_map_end names them in the L2 entries (alloc_commit).
 * Only when the new run takes the whole request with no copy-on-write
 * head or tail; else nothing is kept and the copy path does it (0).
 * Takes s. */
static int map_alloc(struct qcow2 *q, struct mslice *s, uint32_t idx, uint64_t off, uint64_t len,
                     bool fua, struct qmap *st, struct img_map *m)
{
    if (!alloc_may_skip_cow(q, s, idx, off, len)) {
        qcow2_cache_put(&q->l2c, s);
        return 0;
    }
    struct alloc_plan *p = &st->plan;
    int r = alloc_begin(q, s, idx, off, len, p);
    if (r < 0)
        return r;
    bool whole = p->data_end == off + len && !p->head_len && !p->tail_len;
    r = whole ? alloc_check(q, p) : 0;
    if (!whole || r < 0) {
        alloc_abort(q, p);
        alloc_finish(q, p);
        return r;
    }
    /* Dirty bitmaps are marked before the data changes, as for any write. */
    qcow2_bitmaps_mark(q, off, len);
    st->alloc = true;
    /* The entries change only in map_end: a FUA write needs the flush that
     * makes them durable, as write_alloc's caller does. */
    st->flush = fua;
    m->file = q->data;
    m->host = alloc_host(q, p);
    return 1;
}

/* A write maps what qcow2_co_write would overwrite in place (the same
 * steps as its in-place branch, for the whole range at once: one slice,
 * contiguous host clusters), or allocate without copy-on-write (map_alloc). */
static int map_write(struct qcow2 *q, uint64_t off, uint64_t len, bool fua, struct qmap *st,
                     struct img_map *m)
{
    uint64_t in = offset_into_cluster(q, off), n = MIN(len, cl_size(q) - in);
    uint32_t ol_gen = q->ol.gen;    /* the overlap checks below are of this index */
    struct mslice *s;
    uint32_t idx;
    int r = pin_entry_for_update(q, off, &s, &idx);
    if (r < 0)
        return r;
    uint64_t e = l2e_get(q, s, idx), bm = l2bm_get(q, s, idx);
    uint64_t map_gen = q->map_gen;  /* the verdict below is of this moment */
    if (!is_inplace(q, e))
        return map_alloc(q, s, idx, off, len, fua, st, m);
    if (!entry_ok(q, e, bm, off)) {
        qcow2_cache_put(&q->l2c, s);
        return -EIO;
    }
    if (!writable_in_place(q, s, idx, in, n)) {
        qcow2_cache_put(&q->l2c, s);
        return 0;           /* subclusters to fill: write_subclusters */
    }
    uint64_t first_host = e & L2E_OFFSET_MASK;
    n = inplace_extent(q, s, idx, n, len, first_host);
    /* RWF_DSYNC makes only the data durable: entries not on disk yet
     * need a flush after it (map_end), as in qcow2_co_write. */
    if (fua && !mapping_durable(q, s))
        st->flush = true;
    /* A one-cluster write whose every subcluster is ours: later writes
     * anywhere in the cluster go in place the same way (hint.c).  Judged
     * from (e, bm) while the slice is pinned: the checks below may wait. */
    bool hint = in + len <= cl_size(q) && writable_in_place(q, s, idx, 0, cl_size(q));
    qcow2_cache_put(&q->l2c, s);
    if (n < len)
        return 0;
    r = check_own_range(q, off, first_host + in, len);
    if (r < 0)
        return r;
    if (hint)
        qcow2_hint_store(q, off, s, e, bm, true, ol_gen, map_gen);
    /* Dirty bitmaps are marked before the data changes, as for any write. */
    qcow2_bitmaps_mark(q, off, len);
    m->file = q->data;
    m->host = first_host + in;
    return 1;
}

/* Anything that needs the bytes (zeros, backing file, compressed, LUKS) or
 * a copy-on-write goes the copy way. */
int qcow2_co_map(struct image *img, uint64_t off, uint64_t len, unsigned flags, struct img_map *m)
{
    struct qcow2 *q = to_qcow2(img);
    struct qmap *st = (struct qmap *)m->priv;
    bool write = flags & IMG_MAP_WRITE;
    /* Encrypted data needs its bytes; a data file in memory is served
     * inline (see raw_map). */
    if (q->crypto || q->data->in_memory)
        return 0;
    if (write && q->broken)
        return -EIO;
    st->flush = st->alloc = false;
    uint64_t host;
    /* FUA writes take the long way: they need mapping_durable. */
    if (!(flags & IMG_FUA) && offset_into_cluster(q, off) + len <= cl_size(q) &&
        qcow2_hint_lookup(q, off, write, &host)) {
        qcow2_req_begin(q, &st->rq);
        if (write)
            qcow2_bitmaps_mark(q, off, len);    /* before the data changes */
        else
            qcow2_zc_note_plain_read(q, len);
        m->file = q->data;
        m->host = host;
        m->flush_at_end = false;
        return 1;
    }
    qcow2_req_begin(q, &st->rq);
    int r = write ? map_write(q, off, len, flags & IMG_FUA, st, m) : map_read(q, off, len, m);
    if (r != 1)
        qcow2_req_end(q, &st->rq);
    m->flush_at_end = r == 1 && st->flush;
    return r;
}

int qcow2_co_map_end(struct image *img, struct img_map *m, unsigned flags, int result)
{
    struct qcow2 *q = to_qcow2(img);
    struct qmap *st = (struct qmap *)m->priv;
    if (st->alloc) {
        /* The frontend's data write has completed: only now may the L2
         * entries name the new clusters (rule 2), as in write_alloc.  A
         * failed write leaves them unnamed: free them. */
        if (result == 0)
            alloc_commit(q, &st->plan);
        else
            alloc_abort(q, &st->plan);
        alloc_finish(q, &st->plan);
    }
    qcow2_req_end(q, &st->rq);
    /* FUA on a mapping that is not on disk yet (allocated since the last
     * flush, or just now): the L2/L1 entries naming the data are durable
     * only after this flush, which syncs the data first (rule 4); so the
     * frontend wrote it without RWF_DSYNC (m->flush_at_end). */
    if (result == 0 && (flags & IMG_MAP_WRITE) && (flags & IMG_FUA) && st->flush)
        result = qcow2_flush(q);
    return result;
}
