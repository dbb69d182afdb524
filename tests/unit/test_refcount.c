/* Refcounts and the cluster allocator (src/qcow2/refcount.c): allocation
 * and free_hint, refcount get/update at every width, deferred frees (only
 * after a flush made the unreferencing change durable, and only once no
 * older request is in flight), refcount-block and refcount-table growth.
 *
 * Each test ends by giving back what it allocated and closing the image;
 * the project's checker then must find it exactly consistent (no leak, no
 * corruption), which also proves what reached the disk. */
#include <errno.h>

#include "engine.h"

static uint64_t cs;

static uint64_t alloc1(struct qcow2 *q)
{
    uint64_t off = 0, got = 0;
    CHECK_EQ(qcow2_alloc_clusters(q, 1, &off, &got), 0);
    CHECK_EQ(got, 1);
    return off;
}

/* Give back n clusters from off (nothing references them). */
static void give_back(struct qcow2 *q, uint64_t off, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        CHECK_EQ(qcow2_rc_update(q, (off >> cl_bits(q)) + i, -1), 0);
}

static uint64_t first_free(struct qcow2 *q)
{
    uint64_t c = 0;
    while (fx_rc(q, c * cl_size(q)) != 0)
        c++;
    return c * cl_size(q);
}

static void test_rc_fresh_image(void)
{
    CHECK_EQ(fx_create("fresh.qcow2", 1 << 30, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("fresh.qcow2");
    if (!q)
        return;
    cs = cl_size(q);
    CHECK_EQ(fx_rc(q, 0), 1);                           /* header */
    CHECK_EQ(fx_rc(q, q->h.refcount_table_offset), 1);
    CHECK_EQ(fx_rc(q, q->reftable[0]), 1);
    CHECK_EQ(fx_rc(q, q->h.l1_table_offset), 1);
    uint64_t ff = first_free(q);
    CHECK(ff >= q->h.l1_table_offset + cs);
    CHECK_EQ(fx_rc(q, ff + cs), 0);
    /* Past the refcount table's reach everything reads as free. */
    CHECK_EQ(fx_rc(q, q->reftable_entries * q->h.refcount_block_entries * cs), 0);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("fresh.qcow2"));
}

/* First fit from free_hint; runs are contiguous inside one refcount
 * block; a freed cluster lowers the hint and is handed out next. */
static void test_alloc_clusters_and_free_hint(void)
{
    CHECK_EQ(fx_create("alloc.qcow2", 1 << 30, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("alloc.qcow2");
    if (!q)
        return;
    uint64_t ff = first_free(q), off, got, stats0 = stat_get(&q->clusters_allocated);
    off = alloc1(q);
    CHECK_EQ(off, ff);
    CHECK_EQ(fx_rc(q, off), 1);
    CHECK_EQ(q->free_hint, ff / cs + 1);
    CHECK_EQ(qcow2_alloc_clusters(q, 4, &off, &got), 0);
    CHECK_EQ(off, ff + cs);
    CHECK_EQ(got, 4);
    for (int i = 0; i < 4; i++)
        CHECK_EQ(fx_rc(q, off + i * cs), 1);
    CHECK_EQ(stat_get(&q->clusters_allocated) - stats0, 5);
    CHECK(q->host_end >= ff + 5 * cs);
    CHECK(q->file_len >= q->host_end);      /* preallocated ahead */

    /* ff+2 freed: the hint drops to it; a run there stops at ff+3 (used). */
    give_back(q, ff + 2 * cs, 1);
    CHECK_EQ(q->free_hint, ff / cs + 2);
    CHECK_EQ(qcow2_alloc_clusters(q, 4, &off, &got), 0);
    CHECK_EQ(off, ff + 2 * cs);
    CHECK_EQ(got, 1);
    CHECK_EQ(q->free_hint, ff / cs + 3);    /* a lower bound: nothing free below */

    /* alloc_contiguous: a 1-cluster hole is too short for 3; it is kept
     * free and the run comes after everything in use. */
    give_back(q, ff + cs, 1);
    CHECK_EQ(qcow2_alloc_contiguous(q, 3, &off), 0);
    CHECK_EQ(off, ff + 5 * cs);
    CHECK_EQ(fx_rc(q, ff + cs), 0);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(fx_rc(q, off + i * cs), 1);
    CHECK_EQ(q->free_hint, ff / cs + 1);
    give_back(q, ff, 1);
    give_back(q, ff + 2 * cs, 3);
    give_back(q, ff + 5 * cs, 3);
    CHECK_EQ(q->free_hint, ff / cs);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("alloc.qcow2"));
}

/* Every refcount width: values up to the maximum, neighbours untouched,
 * overflow refused (-ERANGE), stored and read back after a reopen. */
static void one_width(uint32_t bits)
{
    char file[32];
    snprintf(file, sizeof(file), "w%u.qcow2", bits);
    CHECK_EQ(fx_create(file, 64 << 20, 4096, bits, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open(file);
    if (!q)
        return;
    CHECK_EQ(q->h.refcount_bits, bits);
    uint64_t a, max = qcow2_refcount_max(q->h.refcount_order);
    CHECK_EQ(qcow2_alloc_contiguous(q, 3, &a), 0);
    uint64_t ca = a / 4096, b = a + 4096, cb = ca + 1;
    /* a to the maximum (64 bits: by INT64_MAX, then the rest), b to 2 (or refused). */
    uint64_t want_a = max;
    if (bits == 64) {
        CHECK_EQ(qcow2_rc_update(q, ca, INT64_MAX), 0);
        CHECK_EQ(qcow2_rc_update(q, ca, INT64_MAX), 0);
        CHECK_EQ(fx_rc(q, a), max);
    } else if (max > 1) {
        CHECK_EQ(qcow2_rc_update(q, ca, (int64_t)(max - 1)), 0);
    }
    CHECK_EQ(fx_rc(q, a), want_a);
    CHECK_EQ(qcow2_rc_update(q, ca, 1), -ERANGE);
    CHECK_EQ(fx_rc(q, a), want_a);
    CHECK(!q->broken);
    uint64_t want_b = 1;
    if (bits == 1) {
        CHECK_EQ(qcow2_rc_update(q, cb, 1), -ERANGE);
    } else {
        CHECK_EQ(qcow2_rc_update(q, cb, 1), 0);
        want_b = 2;
    }
    CHECK_EQ(fx_rc(q, b), want_b);
    CHECK_EQ(fx_rc(q, b + 4096), 1);
    CHECK_EQ(fx_rc(q, a - 4096), 1);        /* the L1 or a metadata cluster before */
    CHECK_EQ(img_close(&q->img), 0);

    q = fx_open(file);
    if (!q)
        return;
    CHECK_EQ(fx_rc(q, a), want_a);
    CHECK_EQ(fx_rc(q, b), want_b);
    CHECK_EQ(fx_rc(q, b + 4096), 1);
    if (bits == 64) {
        CHECK_EQ(qcow2_rc_update(q, ca, -INT64_MAX), 0);
        CHECK_EQ(qcow2_rc_update(q, ca, -INT64_MAX), 0);
    } else if (max > 1) {
        CHECK_EQ(qcow2_rc_update(q, ca, -(int64_t)(max - 1)), 0);
    }
    CHECK_EQ(fx_rc(q, a), 1);
    if (want_b == 2)
        CHECK_EQ(qcow2_rc_update(q, cb, -1), 0);
    give_back(q, a, 3);
    CHECK_EQ(fx_rc(q, a), 0);
    CHECK(q->free_hint <= ca);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean(file));
}

static void test_refcount_widths(void)
{
    for (uint32_t bits = 1; bits <= 64; bits *= 2) {
        int before = unit_cur_failed;
        unit_cur_failed = 0;
        one_width(bits);
        if (unit_cur_failed)
            printf("#   ... with refcount_bits=%u\n", bits);
        unit_cur_failed |= before;
    }
}

/* Below zero is corruption: refused, and the image refuses writes. */
static void test_refcount_below_zero_marks_broken(void)
{
    CHECK_EQ(fx_create("neg.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("neg.qcow2");
    if (!q)
        return;
    uint64_t ff = first_free(q);
    CHECK_EQ(qcow2_rc_update(q, ff / cs, -1), -EIO);
    CHECK(q->broken);
    CHECK_EQ(fx_rc(q, ff), 0);
    uint8_t *buf = io_zalloc(4096);
    CHECK_EQ(img_write(&q->img, buf, 0, 4096, 0), -EIO);
    io_free(buf);
    /* A cluster holding metadata never becomes free (the allocator would
     * hand it out): refused too. */
    q->broken = false;
    CHECK_EQ(qcow2_rc_update(q, q->h.l1_table_offset / cs, -1), -EIO);
    CHECK_EQ(fx_rc(q, q->h.l1_table_offset), 1);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("neg.qcow2"));
}

/* ---- deferred frees ---- */

/* A deferred free waits for the flush that makes the unreferencing change
 * durable; then (no request in flight) the refcount drops. */
static void test_defer_free_after_flush(void)
{
    CHECK_EQ(fx_create("df.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("df.qcow2");
    if (!q)
        return;
    uint64_t x = alloc1(q);
    qcow2_defer_free(q, x, cs);
    CHECK_EQ(fx_rc(q, x), 1);
    CHECK(q->frees_pending != NULL);
    CHECK_EQ(qcow2_apply_ready_frees(q), 0);    /* not durable yet: not ready */
    CHECK_EQ(fx_rc(q, x), 1);
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, x), 0);
    CHECK(q->frees_pending == NULL && q->frees_ready == NULL);
    CHECK(q->free_hint <= x / cs);
    CHECK_EQ(alloc1(q), x);                     /* reused */
    give_back(q, x, 1);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("df.qcow2"));
}

/* The request tick rule: a durable free waits for every request that
 * started before the reference was dropped; later requests do not hold it. */
static void test_defer_free_waits_for_older_requests(void)
{
    CHECK_EQ(fx_create("tick.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("tick.qcow2");
    if (!q)
        return;
    uint64_t x = alloc1(q), y = alloc1(q);
    struct qreq r1, r2, r3;
    qcow2_req_begin(q, &r1);        /* may still use x and y */
    qcow2_defer_free(q, x, cs);
    qcow2_req_begin(q, &r2);        /* started after x's drop: may use y */
    qcow2_defer_free(q, y, cs);
    qcow2_req_begin(q, &r3);        /* uses neither */
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, x), 1);
    CHECK_EQ(fx_rc(q, y), 1);
    CHECK(q->frees_pending == NULL && q->frees_ready != NULL);
    qcow2_req_end(q, &r1);
    CHECK_EQ(qcow2_apply_ready_frees(q), 0);
    CHECK_EQ(fx_rc(q, x), 0);
    CHECK_EQ(fx_rc(q, y), 1);
    /* Requests ending out of order: r3 is no reason to wait, r2 is. */
    qcow2_req_end(q, &r3);
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, y), 1);
    qcow2_req_end(q, &r2);
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, y), 0);
    CHECK(q->frees_ready == NULL);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("tick.qcow2"));
}

/* A flush that fails keeps the frees pending: the unreferencing change may
 * not be on disk, so the cluster must not be reused. */
static void test_defer_free_kept_when_flush_fails(void)
{
    CHECK_EQ(fx_create("dff.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("dff.qcow2");
    if (!q)
        return;
    uint64_t x = alloc1(q);
    CHECK_EQ(qcow2_flush(q), 0);
    alloc1(q);                      /* a dirty refcount slice for the flush to write */
    qcow2_defer_free(q, x, cs);
    struct fx_rule *f = fx_rule(FILE_OP_WRITE, q->reftable[0], cs, -EIO, false);
    CHECK_EQ(qcow2_flush(q), -EIO);
    CHECK_EQ(f->hits, 1);
    CHECK_EQ(fx_rc(q, x), 1);
    CHECK(q->frees_pending != NULL);
    CHECK(qcow2_cache_has_dirty(&q->rcc));
    CHECK(!q->flush_failed);        /* no sync failed: later flushes may succeed */
    fx_rules_clear();
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, x), 0);
    give_back(q, x + cs, 1);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("dff.qcow2"));
}

/* A cluster whose cached slice is still pinned keeps its last reference
 * (-EBUSY): the free is retried at a later flush. */
static void test_defer_free_of_pinned_slice_retried(void)
{
    CHECK_EQ(fx_create("busy.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("busy.qcow2");
    if (!q)
        return;
    uint64_t x = alloc1(q), y = alloc1(q);
    CHECK_EQ(qcow2_rc_update(q, y / cs, 1), 0);     /* y: two references */
    struct mslice *s;
    CHECK_EQ(qcow2_cache_get(&q->l2c, x, &s), 0);   /* x read as an L2 table, pinned */
    CHECK_EQ(qcow2_rc_update(q, x / cs, -1), -EBUSY);
    CHECK_EQ(fx_rc(q, x), 1);
    qcow2_defer_free(q, x, cs);
    qcow2_defer_free(q, y, cs);
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, x), 1);
    CHECK_EQ(fx_rc(q, y), 1);                       /* not pinned: applied */
    CHECK(q->frees_ready != NULL);
    qcow2_cache_put(&q->l2c, s);
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(fx_rc(q, x), 0);
    CHECK(q->frees_ready == NULL);
    give_back(q, y, 1);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("busy.qcow2"));
}

/* A discard's free punches a cluster whose last reference goes, before
 * the refcount drops; a cluster still referenced elsewhere is not. */
static void test_defer_free_punch(void)
{
    CHECK_EQ(fx_create("punch.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("punch.qcow2");
    if (!q)
        return;
    uint64_t x = alloc1(q), y = alloc1(q);
    CHECK_EQ(qcow2_rc_update(q, y / cs, 1), 0);
    struct fx_rule *px = fx_rule(FILE_OP_PUNCH, x, cs, 0, false);
    struct fx_rule *py = fx_rule(FILE_OP_PUNCH, y, cs, 0, false);
    qcow2_defer_free_punch(q, x, cs);
    qcow2_defer_free_punch(q, y, cs);
    CHECK_EQ(qcow2_flush(q), 0);
    CHECK_EQ(px->hits, q->no_punch ? 0 : 1);
    CHECK_EQ(py->hits, 0);
    CHECK_EQ(fx_rc(q, x), 0);
    CHECK_EQ(fx_rc(q, y), 1);
    fx_rules_clear();
    give_back(q, y, 1);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("punch.qcow2"));
}

/* ---- growth ---- */

struct run { uint64_t off, n; };

/* Allocate until a cluster at or past `limit` was handed out; returns the
 * runs (for giving them back). */
static size_t alloc_past(struct qcow2 *q, uint64_t limit, struct run *runs, size_t max)
{
    size_t n = 0;
    while (n < max) {
        uint64_t off, got;
        if (qcow2_alloc_clusters(q, 1000, &off, &got) < 0) {
            CHECK(0);
            break;
        }
        runs[n++] = (struct run){ off, got };
        if (off + got * cl_size(q) > limit)
            break;
    }
    return n;
}

static void give_back_runs(struct qcow2 *q, const struct run *runs, size_t n)
{
    for (size_t i = 0; i < n; i++)
        give_back(q, runs[i].off, runs[i].n);
}

/* Past the first refcount block's range a new block is created in the
 * range it describes, counting itself. */
static void test_refblock_growth(void)
{
    /* 512-byte clusters, 16-bit refcounts: a block covers 256 clusters. */
    CHECK_EQ(fx_create("rb.qcow2", 64 << 20, 512, 16, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("rb.qcow2");
    if (!q)
        return;
    uint64_t rbe = q->h.refcount_block_entries, c = 512;
    CHECK_EQ(rbe, 256);
    CHECK_EQ(q->reftable[1], 0);
    static struct run runs[64];
    size_t n = alloc_past(q, rbe * c, runs, 64);
    CHECK_EQ(q->reftable[1], rbe * c);              /* block 1 at its range's first cluster */
    CHECK_EQ(fx_rc(q, rbe * c), 1);                 /* it counts itself */
    CHECK_EQ(runs[n - 1].off, (rbe + 1) * c);       /* allocation goes on right after it */
    CHECK(q->reftable_dirty[0]);
    char msg[200];
    CHECK(qcow2_ol_conflict(q, rbe * c, c, 0, "test", msg, sizeof(msg)) < 0);  /* metadata now */
    CHECK_EQ(img_close(&q->img), 0);

    q = fx_open("rb.qcow2");
    if (!q)
        return;
    CHECK_EQ(q->reftable[1], rbe * c);
    CHECK_EQ(fx_rc(q, runs[n - 1].off), 1);
    CHECK_EQ(fx_rc(q, rbe * c), 1);
    give_back_runs(q, runs, n);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("rb.qcow2"));
}

/* Past what the refcount table covers, the allocator grows it: a new table
 * (with the blocks describing it) at the first cluster the old one could
 * not describe, switched in by the header, the old table freed. */
static void test_reftable_growth(void)
{
    /* 512-byte clusters, 64-bit refcounts: 64 clusters per block. */
    CHECK_EQ(fx_create("rt.qcow2", 64 << 20, 512, 64, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("rt.qcow2");
    if (!q)
        return;
    uint64_t c = 512, rbe = q->h.refcount_block_entries;
    CHECK_EQ(rbe, 64);
    uint64_t old_off = q->h.refcount_table_offset, old_clusters = q->h.refcount_table_clusters;
    uint64_t old_entries = q->reftable_entries, covered = old_entries * rbe;
    static struct run runs[4096];
    size_t n = alloc_past(q, covered * c, runs, 4096);
    CHECK(q->reftable_entries > old_entries);
    CHECK(q->h.refcount_table_clusters > old_clusters);
    CHECK(q->h.refcount_table_offset >= covered * c);   /* the area past the old reach */
    CHECK_EQ(q->reftable[covered / rbe], covered * c);  /* its first block describes it */
    for (uint64_t i = 0; i < q->h.refcount_table_clusters; i++)
        CHECK_EQ(fx_rc(q, q->h.refcount_table_offset + i * c), 1);
    /* The old table was freed, and being the lowest free clusters, handed
     * out again by this very loop. */
    for (uint64_t i = 0; i < old_clusters; i++) {
        bool reused = false;
        for (size_t k = 0; k < n; k++)
            reused |= old_off + i * c >= runs[k].off && old_off + i * c < runs[k].off + runs[k].n * c;
        CHECK(reused);
        CHECK_EQ(fx_rc(q, old_off + i * c), 1);
    }
    uint64_t new_off = q->h.refcount_table_offset, new_clusters = q->h.refcount_table_clusters;
    CHECK_EQ(img_close(&q->img), 0);

    q = fx_open("rt.qcow2");        /* the header names the new table */
    if (!q)
        return;
    CHECK_EQ(q->h.refcount_table_offset, new_off);
    CHECK_EQ(q->h.refcount_table_clusters, new_clusters);
    CHECK_EQ(fx_rc(q, runs[n - 1].off), 1);
    give_back_runs(q, runs, n);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("rt.qcow2"));
}

/* A contiguous run longer than a block's range: a fresh area whose first
 * clusters are the blocks describing it, growing the table if needed. */
static void test_alloc_contiguous_area(void)
{
    CHECK_EQ(fx_create("area.qcow2", 64 << 20, 512, 64, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("area.qcow2");
    if (!q)
        return;
    uint64_t c = 512, rbe = q->h.refcount_block_entries;
    uint64_t covered = q->reftable_entries * rbe, old_off = q->h.refcount_table_offset;
    uint64_t n = covered + 10, off;     /* more than the whole table covers */
    CHECK_EQ(qcow2_alloc_contiguous(q, n, &off), 0);
    CHECK(q->h.refcount_table_offset != old_off);
    CHECK_EQ(fx_rc(q, old_off), 0);
    /* The area: nb blocks, then the run; the blocks describe all of it. */
    uint64_t first = off / c, nb = 1;
    while ((nb + n + rbe - 1) / rbe > nb)
        nb++;
    uint64_t start = first - nb;
    CHECK_EQ(start % rbe, 0);
    for (uint64_t b = start; b < first; b++) {
        CHECK_EQ(q->reftable[start / rbe + (b - start)], b * c);   /* block j: range j of the area */
        CHECK_EQ(fx_rc(q, b * c), 1);
        /* Indexed as metadata at once: a data write there is refused. */
        char msg[200];
        CHECK(qcow2_ol_conflict(q, b * c, c, 0, "test", msg, sizeof(msg)) < 0);
    }
    bool all = true;
    for (uint64_t i = 0; i < n; i++)
        all &= fx_rc(q, off + i * c) == 1;
    CHECK(all);
    CHECK_EQ(fx_rc(q, off + n * c), 0);
    CHECK_EQ(img_close(&q->img), 0);
    q = fx_open("area.qcow2");
    if (!q)
        return;
    give_back(q, off, n);
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("area.qcow2"));
}

int main(void)
{
    fx_setup("test_refcount");
    RUN_TEST(test_rc_fresh_image);
    RUN_TEST(test_alloc_clusters_and_free_hint);
    RUN_TEST(test_refcount_widths);
    RUN_TEST(test_refcount_below_zero_marks_broken);
    RUN_TEST(test_defer_free_after_flush);
    RUN_TEST(test_defer_free_waits_for_older_requests);
    RUN_TEST(test_defer_free_kept_when_flush_fails);
    RUN_TEST(test_defer_free_of_pinned_slice_retried);
    RUN_TEST(test_defer_free_punch);
    RUN_TEST(test_refblock_growth);
    RUN_TEST(test_reftable_growth);
    RUN_TEST(test_alloc_contiguous_area);
    fx_teardown();
    UNIT_EXIT();
}
