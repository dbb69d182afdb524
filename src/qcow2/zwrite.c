/* Writing compressed clusters (convert -c), in the layout QEMU writes:
 * the compressed bytes of consecutive clusters are packed one after another
 * into host clusters, at any byte offset; a piece that does not fit in the
 * rest of a host cluster continues in the next one if that is the next free
 * cluster (else the rest of the first stays unused).  Each host cluster's
 * refcount is the number of pieces that touch it; entries are never COPIED.
 *
 * The host cluster being filled is kept in memory and written whole (so
 * O_DIRECT works): once full, at a flush, or at close.  Ordering (see
 * docs/design.md):
 *   - a host cluster's refcount is raised (allocation, or +1 per further
 *     piece) before any L2 entry names it (rule 1);
 *   - a piece's L2 entry changes only after every host cluster holding its
 *     bytes was written (rule 2); until then it waits in a pending list;
 *   - qcow2_flush calls qcow2_zw_finish first, so a FLUSH covers every
 *     compressed write completed before it.
 * Writers are serialised by the packer's mutex; compression itself runs
 * before, in parallel, on the worker pool. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

struct zpend {
    uint64_t off;           /* guest cluster */
    uint64_t entry;         /* its new L2 entry (a compressed descriptor) */
    uint64_t end;           /* host end of its bytes */
};

struct zwriter {
    struct co_mutex lock;
    uint64_t host;          /* host offset of the cluster being filled; 0: none */
    uint64_t used;          /* bytes of it used */
    uint8_t *buf;           /* two clusters: the open one and the one a piece spills into */
    struct zpend *pend;
    size_t npend, cap;
};

static struct zwriter *zw_get(struct qcow2 *q)
{
    if (!q->zw) {
        struct zwriter *w = calloc(1, sizeof(*w));
        if (!w)
            return NULL;
        w->lock = (struct co_mutex)CO_MUTEX_INIT;
        w->buf = io_zalloc(2 * cl_size(q));
        q->zw = w;
    }
    return q->zw;
}

void qcow2_zw_free(struct qcow2 *q)
{
    if (!q->zw)
        return;
    io_free(q->zw->buf);
    free(q->zw->pend);
    free(q->zw);
    q->zw = NULL;
}

/* Point the entries whose bytes all lie below host offset done at them. */
static int apply_pending(struct qcow2 *q, struct zwriter *w, uint64_t done)
{
    size_t k = 0;
    int r = 0;
    for (size_t i = 0; i < w->npend; i++) {
        if (w->pend[i].end <= done && r == 0) {
            r = qcow2_map_compressed(q, w->pend[i].off, w->pend[i].entry);
            continue;
        }
        if (w->pend[i].end <= done)
            continue;       /* after an error: dropped (the data never got mapped) */
        w->pend[k++] = w->pend[i];
    }
    w->npend = k;
    return r;
}

/* Write the open cluster (its unused tail as zeros) and map what lies in it. */
static int write_open(struct qcow2 *q, struct zwriter *w)
{
    uint64_t cs = cl_size(q);
    if (!w->host)
        return 0;
    memset(w->buf + w->used, 0, cs - w->used);
    int r = qcow2_ol_check(q, w->host, cs, 0, "compressed data");
    if (r == 0) {
        struct iovec iov = { w->buf, cs };
        r = qcow2_data_writev(q, &iov, 1, w->host, false);
    }
    if (r == 0)
        r = apply_pending(q, w, w->host + cs);
    return r;
}

int qcow2_zw_finish(struct qcow2 *q)
{
    struct zwriter *w = q->zw;
    if (!w || !w->host)
        return 0;
    co_mutex_lock(&w->lock);
    int r = write_open(q, w);
    /* The next piece starts a new host cluster: nothing is written into a
     * cluster again after a flush made its entries durable. */
    w->host = w->used = 0;
    co_mutex_unlock(&w->lock);
    return r;
}

int qcow2_co_write_compressed(struct image *img, const void *cdata, size_t clen, uint64_t off)
{
    struct qcow2 *q = to_qcow2(img);
    uint64_t cs = cl_size(q);
    if (img->read_only)
        return -EROFS;
    if (q->broken)
        return -EIO;
    if (has_data_file(q) || q->crypto)
        return -ENOTSUP;    /* QEMU cannot compress there either */
    if (off & (cs - 1) || off >= img->size || clen == 0 || clen >= cs)
        return -EINVAL;
    struct zwriter *w = zw_get(q);
    if (!w)
        return -ENOMEM;
    qcow2_bitmaps_mark(q, off, cs);
    struct qreq rq;
    qcow2_req_begin(q, &rq);
    co_mutex_lock(&w->lock);
    int r = 0;
    uint64_t start = 0;
    co_mutex_lock(&q->alloc_lock);
    if (w->host && w->used + clen <= cs) {
        /* Fits in the open cluster: one more piece counts on it. */
        start = w->host + w->used;
        r = qcow2_rc_update(q, w->host / cs, 1);
    } else {
        uint64_t h, got;
        r = qcow2_alloc_clusters(q, 1, &h, &got);
        if (r == 0 && w->host && w->used < cs && h == w->host + cs) {
            /* Spills into the next cluster, which is free: the piece
             * counts on both (the new one got its 1 from the allocation). */
            start = w->host + w->used;
            r = qcow2_rc_update(q, w->host / cs, 1);
            if (r < 0)
                qcow2_rc_update(q, h / cs, -1);
        } else if (r == 0) {
            /* A fresh cluster: the open one is done (its tail stays unused). */
            co_mutex_unlock(&q->alloc_lock);
            r = write_open(q, w);
            co_mutex_lock(&q->alloc_lock);
            if (r < 0) {
                qcow2_rc_update(q, h / cs, -1);     /* never referenced */
            } else {
                w->host = h;
                w->used = 0;
                start = h;
            }
        }
    }
    co_mutex_unlock(&q->alloc_lock);
    if (r < 0)
        goto out;
    uint64_t e = qcow2_compressed_entry(&q->h, start, clen);
    if (!e) {
        r = -EINVAL;
        goto out;
    }
    /* New bytes at this host range: nothing cached from it may survive. */
    qcow2_zc_invalidate(q, start, clen);
    uint64_t in = start - w->host;
    memcpy(w->buf + in, cdata, clen);
    if (w->npend == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 16;
        struct zpend *p = realloc(w->pend, cap * sizeof(*p));
        if (!p) {
            r = -ENOMEM;
            goto out;
        }
        w->pend = p;
        w->cap = cap;
    }
    w->pend[w->npend++] = (struct zpend){ .off = off, .entry = e, .end = start + clen };
    w->used = in + clen;
    if (w->used >= cs) {
        /* The open cluster is full: write it, keep going in the next one. */
        uint64_t spill = w->used - cs;
        w->used = cs;
        r = write_open(q, w);
        if (r == 0 && spill) {
            memmove(w->buf, w->buf + cs, spill);
            w->host += cs;
            w->used = spill;
        } else {
            w->host = w->used = 0;
        }
    }
out:
    co_mutex_unlock(&w->lock);
    qcow2_req_end(q, &rq);
    return r;
}
