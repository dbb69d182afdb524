/* qcow2 images: requests in flight, header updates, and the ordered flush. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/imagelock.h"
#include "io/log.h"
#include "io/loop.h"
#include "qcow2/internal.h"

void qcow2_req_begin(struct qcow2 *q, struct qreq *r)
{
    r->tick = q->tick;
    r->next = &q->reqs;
    r->prev = q->reqs.prev;
    q->reqs.prev->next = r;
    q->reqs.prev = r;
}

void qcow2_req_end(struct qcow2 *q, struct qreq *r)
{
    (void)q;
    r->prev->next = r->next;
    r->next->prev = r->prev;
}

void qcow2_mark_broken(struct qcow2 *q, const char *fmt, ...)
{
    if (!q->broken) {
        char what[512];
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(what, sizeof(what), fmt, ap);
        va_end(ap);
        uq_error("%s: corrupt image: %s; further writes refused", q->img.path, what);
    }
    q->broken = true;
}

/* Rewrite the header's fixed fields.  They all lie in the first sector, so
 * the update is a single atomic sector write; extensions stay untouched. */
int qcow2_write_header_fields(struct qcow2 *q)
{
    /* The fields (where the fixed structures are) changed before this. */
    qcow2_map_changed(q);
    int c = qcow2_ol_check(q, 0, 512, OL_HEADER, "the header");
    if (c < 0)
        return c;
    qcow2_header_store(&q->h, q->hdr_buf);
    ssize_t r = file_pwrite(&q->file, q->hdr_buf, 512, 0, false);
    return r < 0 ? (int)r : 0;
}

/* ---- flush ------------------------------------------------------------------- */

struct sector_copy {
    uint64_t off;
    uint8_t *flag;      /* the dirty flag to raise again if the write fails */
    uint8_t data[512];
};

/* Copy the dirty 512-byte sectors of an in-memory table (L1 or refcount
 * table) as they are now, clearing their dirty flags. */
static int snapshot_table(const uint64_t *tab, uint64_t entries, uint8_t *dirty, uint64_t table_off,
                          struct sector_copy **out, uint32_t *n)
{
    uint64_t sectors = (entries * 8 + 511) / 512, count = 0;
    for (uint64_t s = 0; s < sectors; s++)
        count += dirty[s] != 0;
    *n = (uint32_t)count;
    *out = NULL;
    if (!count)
        return 0;
    struct sector_copy *c = calloc(count, sizeof(*c));
    if (!c)
        return -ENOMEM;
    uint32_t k = 0;
    for (uint64_t s = 0; s < sectors; s++) {
        if (!dirty[s])
            continue;
        for (uint64_t i = 0; i < 64; i++) {
            uint64_t e = s * 64 + i;
            /* The table fills whole clusters, so the sector's tail is ours. */
            be64_store(c[k].data + i * 8, e < entries ? tab[e] : 0);
        }
        c[k].off = table_off + s * 512;
        c[k].flag = &dirty[s];
        dirty[s] = 0;
        k++;
    }
    *out = c;
    return 0;
}

/* Write the sector copies unless ret is already an error; whatever is not
 * written is marked dirty again.  Frees the copies.  kind: OL_ACTIVE_L1 or
 * OL_REFTABLE, the table the sectors belong to (overlap check). */
static int write_sector_copies(struct qcow2 *q, struct sector_copy *c, uint32_t n, int ret,
                               unsigned kind)
{
    uint8_t *buf = io_alloc(512);
    for (uint32_t i = 0; i < n; i++) {
        if (ret == 0)
            ret = qcow2_ol_check(q, c[i].off, 512, kind,
                           kind == OL_ACTIVE_L1 ? "an L1 table sector" : "a refcount table sector");
        if (ret == 0) {
            memcpy(buf, c[i].data, 512);
            ssize_t r = file_pwrite(&q->file, buf, 512, c[i].off, false);
            if (r < 0)
                ret = (int)r;
        }
        if (ret < 0)
            *c[i].flag = 1;
    }
    io_free(buf);
    free(c);
    return ret;
}

int qcow2_sync(struct qcow2 *q)
{
    if (q->flush_failed)
        return -EIO;
    int r = file_sync(&q->file);
    if (r < 0) {
        /* After a failed sync the kernel may have dropped dirty pages: a
         * later sync could succeed without them, so never claim success
         * again for this image (fsyncgate). */
        q->flush_failed = true;
        uq_error("%s: flush failed (%s); the image is suspect from now on",
                 q->img.path, strerror(-r));
    }
    return r;
}

static void append_frees(struct deferred_free **list, struct deferred_free *more)
{
    while (*list)
        list = &(*list)->next;
    *list = more;
}

/* Make everything acknowledged so far durable, in the order that keeps the
 * image consistent at every instant:
 *   1. refcount blocks (new references counted); refcount table sectors
 *      naming new blocks only after a sync made those blocks durable;
 *   2. sync: guest data, COW copies and refcounts are now on disk;
 *   3. L2 tables; 4. after a sync, L1 sectors naming new L2 tables; sync;
 *   5. only now may references dropped by those L2/L1 changes be released.
 * What is written is a copy taken at the start: entries changed while the
 * flush runs may point at data not yet synced, so they wait for the next. */
int qcow2_flush(struct qcow2 *q)
{
    /* Compressed writes completed so far may still sit in the packing
     * buffer: written and mapped first, so this flush covers them. */
    int zr = qcow2_zw_finish(q);
    co_mutex_lock(&q->flush_lock);
    struct mcopy *rcc = NULL, *l2c = NULL;
    struct sector_copy *rt = NULL, *l1 = NULL;
    uint32_t nrc = 0, nl2 = 0, nrt = 0, nl1 = 0;
    int r = zr < 0 ? zr : qcow2_cache_snapshot_dirty(&q->rcc, &rcc, &nrc);
    if (r == 0)
        r = qcow2_cache_snapshot_dirty(&q->l2c, &l2c, &nl2);
    if (r == 0)
        r = snapshot_table(q->reftable, q->reftable_entries, q->reftable_dirty,
                           q->h.refcount_table_offset, &rt, &nrt);
    if (r == 0)
        r = snapshot_table(q->l1, q->h.l1_size, q->l1_dirty, q->h.l1_table_offset, &l1, &nl1);
    struct deferred_free *frees = q->frees_pending;
    q->frees_pending = NULL;
    q->frees_pending_tail = &q->frees_pending;

    r = qcow2_cache_write_copies(&q->rcc, rcc, nrc, r);
    if (r == 0 && nrt)
        r = qcow2_sync(q);
    r = write_sector_copies(q, rt, nrt, r, OL_REFTABLE);
    if (r == 0)
        r = qcow2_datafile_sync(q);   /* guest data in an external data file: durable first too */
    if (r == 0)
        r = qcow2_sync(q);
    r = qcow2_cache_write_copies(&q->l2c, l2c, nl2, r);
    if (r == 0 && nl1 && nl2)
        r = qcow2_sync(q);
    r = write_sector_copies(q, l1, nl1, r, OL_ACTIVE_L1);
    if (r == 0 && (nl2 || nl1))
        r = qcow2_sync(q);

    if (r == 0) {
        /* The changes that dropped these references are durable now. */
        append_frees(&q->frees_ready, frees);
        r = qcow2_apply_ready_frees(q);
    } else {
        append_frees(&frees, q->frees_pending);
        q->frees_pending = frees;
        q->frees_pending_tail = &q->frees_pending;
        while (*q->frees_pending_tail)
            q->frees_pending_tail = &(*q->frees_pending_tail)->next;
    }
    co_mutex_unlock(&q->flush_lock);
    return r;
}

/* ---- open / close ------------------------------------------------------------ */
