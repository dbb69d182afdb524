/* Guest-to-host mapping: the read path, the write path with allocation and
 * copy-on-write, write-zeroes and discard. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>

#include "io/loop.h"
#include "qcow2/internal.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))

static inline uint64_t l2e_get(const struct qcow2 *q, const struct mslice *s, uint32_t idx)
{
    return be64_load(s->data + (size_t)idx * q->h.l2_entry_size);
}

static inline uint64_t l2bm_get(const struct qcow2 *q, const struct mslice *s, uint32_t idx)
{
    return q->extl2 ? be64_load(s->data + (size_t)idx * 16 + 8) : 0;
}

static inline void l2e_set(struct qcow2 *q, struct mslice *s, uint32_t idx, uint64_t e)
{
    be64_store(s->data + (size_t)idx * q->h.l2_entry_size, e);
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

/* Does the old content of a cluster, as the COW source, read as zeros? */
static bool reads_as_zero_for_cow(const struct qcow2 *q, uint64_t e)
{
    enum qcow2_cluster_type t = etype(q, e);
    return t == QCOW2_CLUSTER_ZERO_PLAIN || t == QCOW2_CLUSTER_ZERO_ALLOC ||
           (t == QCOW2_CLUSTER_UNALLOCATED && !q->backing);
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
        if (rc_get(q, c, &rc) < 0 || rc != 1)
            return false;
    }
    return true;
}

static struct inflight_alloc *find_alloc(struct qcow2 *q, uint64_t cluster)
{
    for (struct inflight_alloc *a = q->allocs; a; a = a->next)
        if (cluster >= a->first && cluster <= a->last)
            return a;
    return NULL;
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
 * durable (defer_free).  Owned and shared clusters alike lose one ref. */
static void release_entry(struct qcow2 *q, uint64_t e)
{
    switch (etype(q, e)) {
    case QCOW2_CLUSTER_NORMAL:
    case QCOW2_CLUSTER_ZERO_ALLOC:
        defer_free(q, e & L2E_OFFSET_MASK, cl_size(q));
        break;
    case QCOW2_CLUSTER_COMPRESSED: {
        uint64_t coff, nbytes;
        qcow2_compressed_desc(&q->h, e, &coff, &nbytes);
        defer_free(q, coff, nbytes);
        break;
    }
    default:
        break;
    }
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
    r = alloc_clusters(q, 1, &host, &got);
    if (r < 0)
        goto out;
    uint8_t *table = io_zalloc(cs);
    for (uint64_t so = 0; old && so < cs && r == 0; so += q->l2c.slice_size) {
        struct mslice *s;
        r = mcache_get(&q->l2c, old + so, &s);
        if (r == 0) {
            memcpy(table + so, s->data, q->l2c.slice_size);
            mcache_put(&q->l2c, s);
        }
    }
    if (r == 0)
        r = write_new_cluster(q, host, table);
    io_free(table);
    if (r < 0) {
        rc_update(q, host / cs, -1);   /* never referenced */
        goto out;
    }
    q->l1[l1i] = host | QCOW_OFLAG_COPIED;
    q->l1_dirty[l1i * 8 / 512] = 1;
    ol_add(q, host, OL_BIT_ACTIVE_L2);
    if (old) {
        ol_remove(q, old, OL_BIT_ACTIVE_L2);
        defer_free(q, old, cs);
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
    if (for_write && ol_check(q, t, cs, OL_ACTIVE_L2, "an L2 table") < 0)
        return -EIO;
    uint64_t byte = t + l2i * q->h.l2_entry_size;
    uint64_t soff = byte & ~(uint64_t)(q->l2c.slice_size - 1);
    int r = mcache_get(&q->l2c, soff, sp);
    if (r < 0)
        return r;
    *idxp = (uint32_t)((byte - soff) / q->h.l2_entry_size);
    return 1;
}

/* Pin the writable L2 slice mapping guest offset off, once no allocation
 * is in flight on its cluster: the entry may then be changed safely. */
static int pin_entry_for_update(struct qcow2 *q, uint64_t off, struct mslice **sp, uint32_t *idxp)
{
    uint64_t c = off >> cl_bits(q);
    for (;;) {
        struct inflight_alloc *a = find_alloc(q, c);
        if (a) {
            co_queue_wait(&a->waiters);
            continue;
        }
        int r = l2_lookup(q, off, true, sp, idxp);
        if (r < 0)
            return r;
        if (!find_alloc(q, c))
            return 0;
        mcache_put(&q->l2c, *sp);   /* one started while we waited for the table */
    }
}

/* Copy the L2 entry (and extended-L2 bitmap) for guest offset off; both
 * are 0 with *has_table false when no L2 table exists.  The slice is not
 * kept: a freed cluster is not reused while this request is in flight. */
static int peek_entry(struct qcow2 *q, uint64_t off, uint64_t *e, uint64_t *bm, bool *has_table)
{
    struct mslice *s;
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
        mcache_put(&q->l2c, s);
    }
    return 0;
}

/* ---- reading --------------------------------------------------------------- */

static int read_host(struct qcow2 *q, uint64_t host, uint64_t len, uint8_t *buf)
{
    ssize_t n = file_pread(&q->file, buf, len, host);
    if (n < 0)
        return (int)n;
    if ((uint64_t)n < len)      /* allocated past the end of the file: zeros */
        memset(buf + n, 0, len - n);
    return 0;
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
    uint8_t *in = malloc(nbytes);
    uint8_t *out = malloc(cs);
    int r = -ENOMEM;
    if (in && out) {
        ssize_t n = file_pread_any(&q->file, in, nbytes, coff);
        r = n < 0 ? (int)n : qcow2_decompress(q->h.compression_type, in, n, out, cs);
        if (r == 0)
            memcpy(buf, out + offset_into_cluster(q, off), len);
        else if (n >= 0)
            fprintf(stderr, "ublk-qcow2: %s: compressed cluster at 0x%llx does not decompress\n",
                    q->img.path, (unsigned long long)coff);
    }
    free(in);
    free(out);
    return r;
}

enum ext_kind { EXT_NONE, EXT_HOST, EXT_ZERO, EXT_BACKING };

/* Read guest range [off, off+len) inside one cluster described by (e, bm). */
static int read_cluster_part(struct qcow2 *q, uint64_t e, uint64_t bm, uint64_t off, uint64_t len,
                             uint8_t *buf)
{
    enum qcow2_cluster_type t = etype(q, e);
    uint64_t host = e & L2E_OFFSET_MASK;
    switch (t) {
    case QCOW2_CLUSTER_INVALID:
        qcow2_mark_broken(q, "L2 entry 0x%llx for guest offset 0x%llx is invalid",
                          (unsigned long long)e, (unsigned long long)off);
        return -EIO;
    case QCOW2_CLUSTER_COMPRESSED:
        return read_compressed(q, e, off, len, buf);
    case QCOW2_CLUSTER_ZERO_PLAIN:
    case QCOW2_CLUSTER_ZERO_ALLOC:
        memset(buf, 0, len);
        return 0;
    default:
        break;
    }
    if (!q->extl2)
        return t == QCOW2_CLUSTER_NORMAL ? read_host(q, host + offset_into_cluster(q, off), len, buf)
                                         : read_backing(q, off, len, buf);

    /* Extended L2: each subcluster is allocated, zero, or unallocated. */
    uint32_t alloc = extl2_alloc_bits(bm), zero = extl2_zero_bits(bm);
    if ((alloc & zero) || (alloc && t != QCOW2_CLUSTER_NORMAL)) {
        qcow2_mark_broken(q, "extended L2 bitmap 0x%llx for guest offset 0x%llx is invalid",
                          (unsigned long long)bm, (unsigned long long)off);
        return -EIO;
    }
    uint64_t scs = cl_size(q) / QCOW2_SUBCLUSTERS;
    while (len) {
        uint64_t in = offset_into_cluster(q, off);
        uint32_t sc = (uint32_t)(in / scs);
        enum ext_kind k = (alloc >> sc) & 1 ? EXT_HOST : (zero >> sc) & 1 ? EXT_ZERO : EXT_BACKING;
        uint64_t n = MIN(len, scs - in % scs);
        for (uint32_t j = sc + 1; n < len; j++) {
            enum ext_kind kj = (alloc >> j) & 1 ? EXT_HOST : (zero >> j) & 1 ? EXT_ZERO : EXT_BACKING;
            if (kj != k)
                break;
            n += MIN(len - n, scs);
        }
        int r = k == EXT_HOST ? read_host(q, host + in, n, buf)
              : k == EXT_BACKING ? read_backing(q, off, n, buf)
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

int qcow2_co_read(struct image *img, void *vbuf, uint64_t off, uint64_t len)
{
    struct qcow2 *q = to_qcow2(img);
    uint8_t *buf = vbuf;
    struct qreq rq;
    struct extent x = { .kind = EXT_NONE };
    int r = 0;
    qreq_begin(q, &rq);
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
        if (!q->extl2 && t == QCOW2_CLUSTER_NORMAL) {
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
            if (r == 0 && k == EXT_NONE)
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
    qreq_end(q, &rq);
    return r;
}

/* ---- writing ----------------------------------------------------------------- */

/* Allocate and write clusters for the start of [off, off+len), all mapped by
 * slice s at idx.  The untouched head and tail of the new clusters are
 * copied from the old content (backing file, zeros, shared or compressed
 * cluster) and written together with the guest data in one I/O.  The L2
 * entries change only after that write completed; the flush that makes
 * them durable syncs the data first.  Releases s.  *done = bytes written. */
static int write_alloc(struct qcow2 *q, struct mslice *s, uint32_t idx, const uint8_t *buf,
                       uint64_t off, uint64_t len, uint64_t *done)
{
    uint64_t cs = cl_size(q), c0 = off >> cl_bits(q), end = off + len;
    uint64_t e0 = l2e_get(q, s, idx);
    bool reuse = is_zero_alloc_owned(q, e0);   /* our own zeroed cluster: fill it in place */
    uint64_t want = 1;
    while (!reuse && idx + want < entries_per_slice(q) && (c0 + want) * cs < end) {
        uint64_t ek = l2e_get(q, s, idx + want);
        if (is_inplace(q, ek) || is_zero_alloc_owned(q, ek) || find_alloc(q, c0 + want))
            break;
        want++;
    }
    struct inflight_alloc a = { .first = c0, .last = c0 + want - 1, .waiters = CO_QUEUE_INIT };
    a.next = q->allocs;
    q->allocs = &a;

    uint64_t host = e0 & L2E_OFFSET_MASK, got = 1;
    uint8_t *head = NULL, *tail = NULL;
    bool fresh = false;
    int r = 0;
    if (!reuse) {
        co_mutex_lock(&q->alloc_lock);
        uint64_t end_before = q->host_end;
        r = alloc_clusters(q, want, &host, &got);
        co_mutex_unlock(&q->alloc_lock);
        if (r < 0)
            goto out;
        a.last = c0 + got - 1;
        /* Clusters past the file's end were never written: they read as
         * zeros already, so COW from zeros needs no write at all. */
        fresh = host >= end_before;
    }
    uint64_t span_start = c0 * cs, span_end = (c0 + got) * cs;
    uint64_t data_end = MIN(end, span_end);
    uint64_t head_len = off - span_start, tail_len = span_end - data_end;
    if (fresh && reads_as_zero_for_cow(q, e0) &&
        reads_as_zero_for_cow(q, l2e_get(q, s, idx + (uint32_t)got - 1))) {
        head_len = tail_len = 0;
        host += off - span_start;
    }
    struct iovec iov[3];
    int niov = 0;
    if (head_len) {
        head = io_alloc(head_len);
        r = read_cluster_part(q, e0, l2bm_get(q, s, idx), span_start, head_len, head);
        iov[niov++] = (struct iovec){ head, head_len };
    }
    iov[niov++] = (struct iovec){ (void *)buf, data_end - off };
    if (r == 0 && tail_len) {
        uint32_t li = idx + (uint32_t)got - 1;
        tail = io_alloc(tail_len);
        r = read_cluster_part(q, l2e_get(q, s, li), l2bm_get(q, s, li), data_end, tail_len, tail);
        iov[niov++] = (struct iovec){ tail, tail_len };
    }
    if (r == 0)   /* a refcount may have called a table's cluster free */
        r = ol_check(q, host, head_len + (data_end - off) + tail_len, 0, "guest data");
    if (r == 0) {
        ssize_t w = file_pwritev(&q->file, iov, niov, host, false);
        r = w < 0 ? (int)w : 0;
    }
    host -= host & (cs - 1);    /* back to the first cluster if only data was written */
    if (r < 0) {
        if (!reuse)     /* nothing points at the new clusters yet: free them now */
            for (uint64_t i = 0; i < got; i++)
                rc_update(q, host / cs + i, -1);
        goto out;
    }
    for (uint64_t i = 0; i < got; i++) {
        uint64_t old = l2e_get(q, s, idx + (uint32_t)i);
        l2e_set(q, s, idx + (uint32_t)i, (host + i * cs) | QCOW_OFLAG_COPIED);
        if (!reuse)
            release_entry(q, old);
    }
    mcache_mark_dirty(s);
    *done = data_end - off;
out:
    io_free(head);
    io_free(tail);
    mcache_put(&q->l2c, s);
    unlink_alloc(q, &a);
    return r;
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
    qreq_begin(q, &rq);
    while (len) {
        uint64_t cs = cl_size(q), n = 0;
        struct mslice *s;
        uint32_t idx;
        r = pin_entry_for_update(q, off, &s, &idx);
        if (r < 0)
            break;
        uint64_t e = l2e_get(q, s, idx);
        if (is_inplace(q, e)) {
            /* Owned clusters are overwritten in place; contiguous host
             * clusters in this slice merge into one write. */
            uint64_t first_host = e & L2E_OFFSET_MASK;
            n = MIN(len, cs - offset_into_cluster(q, off));
            for (uint32_t k = idx + 1; n < len && k < entries_per_slice(q); k++) {
                uint64_t ek = l2e_get(q, s, k);
                if (!is_inplace(q, ek) || (ek & L2E_OFFSET_MASK) != first_host + (k - idx) * cs)
                    break;
                n += MIN(len - n, cs);
            }
            /* RWF_DSYNC makes only the data durable: if the entries
             * mapping it are not on disk yet (allocated since the last
             * flush, or a flush is writing them now), FUA needs a flush. */
            if (fua && !mapping_durable(q, s))
                metadata_changed = true;
            mcache_put(&q->l2c, s);
            uint64_t span = n + offset_into_cluster(q, off);
            /* A hostile or damaged image may map guest data onto its own
             * metadata, or far past its end. */
            r = ol_check(q, first_host + offset_into_cluster(q, off), n, 0, "guest data");
            if (r < 0)
                break;
            if (!owned_past_end(q, first_host, span)) {
                qcow2_mark_broken(q, "guest offset 0x%llx maps to an unowned cluster past the end of "
                                  "the file at 0x%llx", (unsigned long long)off, (unsigned long long)first_host);
                r = -EIO;
                break;
            }
            ssize_t w = file_pwrite(&q->file, buf, n, first_host + offset_into_cluster(q, off), fua);
            if (w < 0) {
                r = (int)w;
                break;
            }
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
    qreq_end(q, &rq);
    /* FUA: in-place writes to durable mappings used RWF_DSYNC; new or
     * not yet durable mappings need a full flush. */
    if (r == 0 && fua && metadata_changed)
        r = qcow2_flush(q);
    return r;
}

/* Does the whole of [off, off+len) inside one cluster already read as zeros? */
static bool reads_as_zero(struct qcow2 *q, uint64_t e, bool has_table)
{
    enum qcow2_cluster_type t = has_table ? etype(q, e) : QCOW2_CLUSTER_UNALLOCATED;
    if (t == QCOW2_CLUSTER_ZERO_PLAIN || t == QCOW2_CLUSTER_ZERO_ALLOC)
        return true;
    return t == QCOW2_CLUSTER_UNALLOCATED && !q->backing && (!q->extl2 || !has_table);
}

static int write_zero_bytes(struct qcow2 *q, uint64_t off, uint64_t len, unsigned flags)
{
    uint8_t *zero = io_zalloc(len);
    int r = qcow2_co_write(&q->img, zero, off, len, flags);
    io_free(zero);
    return r;
}

/* Change the L2 entry of whole cluster at guest offset off with fn.
 * Waits for allocations in flight on it. */
typedef uint64_t (*entry_fn)(struct qcow2 *q, uint64_t old);

static int update_whole_cluster(struct qcow2 *q, uint64_t off, entry_fn fn)
{
    struct mslice *s;
    uint32_t idx;
    int r = pin_entry_for_update(q, off, &s, &idx);
    if (r < 0)
        return r;
    uint64_t old = l2e_get(q, s, idx);
    uint64_t e = fn(q, old);
    if (e != old) {
        l2e_set(q, s, idx, e);
        mcache_mark_dirty(s);
    }
    mcache_put(&q->l2c, s);
    return 0;
}

/* Write-zeroes on a whole cluster (v3): the zero flag, keeping a cluster we
 * own as ZERO_ALLOC (reused by the next write, never leaked); a shared or
 * compressed cluster loses our reference once the flag is durable. */
static uint64_t zero_entry(struct qcow2 *q, uint64_t old)
{
    if (is_inplace(q, old) || is_zero_alloc_owned(q, old))
        return old | QCOW_OFLAG_ZERO;
    if (etype(q, old) == QCOW2_CLUSTER_ZERO_PLAIN)
        return old;
    release_entry(q, old);
    return QCOW_OFLAG_ZERO;
}

/* Discard of a whole cluster, as QEMU does it: v3 keeps the guest reading
 * zeros (zero flag) and frees the cluster; v2 has no zero flag and makes
 * the cluster unallocated. */
static uint64_t discard_entry(struct qcow2 *q, uint64_t old)
{
    release_entry(q, old);
    return q->h.version >= 3 ? QCOW_OFLAG_ZERO : 0;
}

int qcow2_co_write_zeroes(struct image *img, uint64_t off, uint64_t len, unsigned flags)
{
    struct qcow2 *q = to_qcow2(img);
    struct qreq rq;
    int r = 0;
    if (q->broken)
        return -EIO;
    qreq_begin(q, &rq);
    while (len && r == 0) {
        uint64_t n = MIN(len, cl_size(q) - offset_into_cluster(q, off));
        bool whole = offset_into_cluster(q, off) == 0 && (n == cl_size(q) || off + n >= img->size);
        uint64_t e, bm;
        bool has_table;
        r = peek_entry(q, off, &e, &bm, &has_table);
        if (r < 0)
            break;
        if (reads_as_zero(q, e, has_table) && !q->extl2) {
            /* nothing to do */
        } else if (whole && q->h.version >= 3 && !q->extl2) {
            r = update_whole_cluster(q, off, zero_entry);
        } else {
            r = write_zero_bytes(q, off, n, 0);
        }
        off += n;
        len -= n;
    }
    qreq_end(q, &rq);
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
    struct qreq rq;
    int r = 0;
    if (q->broken)
        return -EIO;
    if (q->extl2)
        return 0;       /* discard is advisory; extended L2 is read-only for now */
    qreq_begin(q, &rq);
    while (len && r == 0) {
        uint64_t n = MIN(len, cl_size(q) - offset_into_cluster(q, off));
        bool whole = offset_into_cluster(q, off) == 0 && (n == cl_size(q) || off + n >= img->size);
        /* Partial clusters are left alone, as QEMU does. */
        if (whole) {
            uint64_t e, bm;
            bool has_table;
            r = peek_entry(q, off, &e, &bm, &has_table);
            enum qcow2_cluster_type t = has_table ? etype(q, e) : QCOW2_CLUSTER_UNALLOCATED;
            bool allocated = t == QCOW2_CLUSTER_NORMAL || t == QCOW2_CLUSTER_ZERO_ALLOC ||
                             t == QCOW2_CLUSTER_COMPRESSED;
            bool backing_shows = t == QCOW2_CLUSTER_UNALLOCATED && q->backing && q->h.version >= 3;
            if (r == 0 && (allocated || backing_shows))
                r = update_whole_cluster(q, off, discard_entry);
        }
        off += n;
        len -= n;
    }
    qreq_end(q, &rq);
    return r;
}
