/* What the exclusive operations (resize.c, snapshot.c) share: starting one
 * with nothing in flight, the header switch that commits it, and writing and
 * reading whole tables outside the metadata cache. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

uint64_t qcow2_l1_entries_for(const struct qcow2 *q, uint64_t size)
{
    uint64_t span_bits = q->h.cluster_bits + q->h.l2_bits;
    return (size >> span_bits) + ((size & ((1ull << span_bits) - 1)) != 0);
}

void qcow2_derive_sizes(struct qcow2 *q)
{
    q->h.l1_size_needed = qcow2_l1_entries_for(q, q->h.size);
    q->img.size = (q->h.size + 511) & ~511ull;
}

int qcow2_header_commit(struct qcow2 *q)
{
    int r = qcow2_write_header_fields(q);
    return r < 0 ? r : qcow2_sync(q);
}

int qcow2_exclusive_begin(struct qcow2 *q, char *err, size_t errlen)
{
    qcow2_map_changed(q);   /* tables and header move from here on */
    if (q->broken) {
        snprintf(err, errlen, "%s: the image was found corrupt; repair it with 'qemu-img check -r all'",
                 q->img.path);
        return -EIO;
    }
    if (q->reqs.next != &q->reqs) {
        snprintf(err, errlen, "%s: requests are in flight (the frontend must quiesce first)", q->img.path);
        return -EBUSY;
    }
    /* Start from a settled image: everything durable, every dropped
     * reference applied (no request is left that could still use one). */
    int r = 0;
    for (int i = 0; i < 4 && r == 0; i++) {
        r = qcow2_flush(q);
        if (!q->frees_pending && !q->frees_ready && !qcow2_cache_has_dirty(&q->rcc) && !qcow2_cache_has_dirty(&q->l2c))
            break;
    }
    if (r < 0)
        snprintf(err, errlen, "%s: flush failed: %s", q->img.path, strerror(-r));
    return r;
}

int qcow2_ol_rebuild(struct qcow2 *q)
{
    qcow2_map_changed(q);
    int r = qcow2_ol_build(q);
    if (r < 0)
        qcow2_mark_broken(q, "cannot index the image's metadata: %s", strerror(-r));
    return r;
}

int qcow2_read_l1_table(struct qcow2 *q, uint64_t off, uint32_t n, uint64_t **out)
{
    uint64_t bytes = (uint64_t)n * 8;
    *out = NULL;
    if (n && ((off & (cl_size(q) - 1)) || !off || off > q->host_end || bytes > q->host_end - off ||
              bytes > QCOW2_MAX_L1_BYTES))
        return -EINVAL;
    uint64_t *t = calloc(n ? n : 1, sizeof(*t));
    uint8_t *buf = io_zalloc(bytes ? (bytes + 511) & ~511ull : 512);
    if (!t) {
        io_free(buf);
        return -ENOMEM;
    }
    ssize_t r = bytes ? file_pread(&q->file, buf, (bytes + 511) & ~511ull, off) : 0;
    for (uint32_t i = 0; r >= 0 && i < n; i++)
        t[i] = be64_load(buf + (uint64_t)i * 8);
    io_free(buf);
    if (r < 0) {
        free(t);
        return (int)r;
    }
    *out = t;
    return 0;
}

int qcow2_write_fresh_table(struct qcow2 *q, const void *data, uint64_t len, uint64_t *off)
{
    uint64_t n = (len + cl_size(q) - 1) >> cl_bits(q), host;
    co_mutex_lock(&q->alloc_lock);
    int r = qcow2_alloc_contiguous(q, n, &host);
    co_mutex_unlock(&q->alloc_lock);
    if (r < 0)
        return r;
    /* Before anything cached is dropped: a refcount may have called a
     * table's cluster free (a damaged image). */
    r = qcow2_ol_check(q, host, n << cl_bits(q), 0, "a new table");
    if (r < 0)
        return r;
    uint8_t *buf = io_zalloc(n << cl_bits(q));
    memcpy(buf, data, len);
    /* Nothing cached may describe an earlier use of these clusters. */
    qcow2_cache_discard_range(&q->l2c, host, n << cl_bits(q));
    qcow2_cache_discard_range(&q->rcc, host, n << cl_bits(q));
    ssize_t w = file_pwrite(&q->file, buf, n << cl_bits(q), host, false);
    io_free(buf);
    if (w < 0) {
        for (uint64_t i = 0; i < n; i++)
            qcow2_rc_update(q, (host >> cl_bits(q)) + i, -1);
        return (int)w;
    }
    *off = host;
    return 0;
}
