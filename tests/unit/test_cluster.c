/* The cluster mapping (src/qcow2/cluster.c) through the request path:
 * allocation on first write, copy-on-write of a partial cluster (from the
 * backing file, from zeros, from a cluster shared with a snapshot),
 * extended-L2 subclusters, zero clusters, reads of unallocated, zero and
 * allocated ranges, a second writer waiting for an allocation in flight,
 * and a failed data write giving its new cluster back.
 *
 * Every request runs in a coroutine on the loop.  A shadow copy of the
 * first GUEST bytes says what the guest must read; L2 entries, bitmaps and
 * refcounts are read back from the engine, copied bytes from the file. */
#include <errno.h>

#include "engine.h"

#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define CS 65536ull
#define GUEST (16 * CS)
#define BASE_LEN (4ull << 20)

static uint8_t shadow[GUEST], base[BASE_LEN];

enum { OP_READ, OP_WRITE, OP_ZERO, OP_DISCARD, OP_FLUSH };
struct job { struct image *img; int op; uint8_t *buf; uint64_t off, len; unsigned flags; int r; bool done; };

static void co_job(void *arg)
{
    struct job *j = arg;
    switch (j->op) {
    case OP_READ: j->r = img_read(j->img, j->buf, j->off, j->len); break;
    case OP_WRITE: j->r = img_write(j->img, j->buf, j->off, j->len, j->flags); break;
    case OP_ZERO: j->r = img_write_zeroes(j->img, j->off, j->len, j->flags); break;
    case OP_DISCARD: j->r = img_discard(j->img, j->off, j->len); break;
    default: j->r = img_flush(j->img); break;
    }
    j->done = true;
}

static int run_job(struct job *j)
{
    j->r = 1;
    if (fx_run(co_job, j) < 0)
        return -EDEADLK;
    return j->r;
}

/* Write len bytes of pattern seed at off (and into the shadow). */
static int wr(struct qcow2 *q, uint64_t off, uint64_t len, unsigned seed)
{
    uint8_t *buf = io_alloc(len);
    fx_fill(buf, len, seed);
    struct job j = { .img = &q->img, .op = OP_WRITE, .buf = buf, .off = off, .len = len };
    int r = run_job(&j);
    if (r == 0 && off < GUEST)
        memcpy(shadow + off, buf, MIN(len, GUEST - off));
    io_free(buf);
    return r;
}

static int zero(struct qcow2 *q, uint64_t off, uint64_t len, unsigned flags)
{
    struct job j = { .img = &q->img, .op = OP_ZERO, .off = off, .len = len, .flags = flags };
    int r = run_job(&j);
    if (r == 0)
        memset(shadow + off, 0, len);
    return r;
}

static int flush(struct qcow2 *q)
{
    struct job j = { .img = &q->img, .op = OP_FLUSH };
    return run_job(&j);
}

/* Does the guest read what the shadow says (first mismatch printed)? */
static bool reads_shadow(struct image *img)
{
    uint8_t *buf = io_alloc(GUEST);
    struct job j = { .img = img, .op = OP_READ, .buf = buf, .off = 0, .len = GUEST };
    int r = run_job(&j);
    bool ok = r == 0 && memcmp(buf, shadow, GUEST) == 0;
    if (r)
        printf("#   read failed: %d\n", r);
    for (uint64_t i = 0; r == 0 && i < GUEST; i++) {
        if (buf[i] != shadow[i]) {
            printf("#   guest byte 0x%llx reads 0x%02x, want 0x%02x\n", (unsigned long long)i,
                   buf[i], shadow[i]);
            break;
        }
    }
    io_free(buf);
    return ok;
}

/* Do the file's bytes at host equal what the shadow holds at guest off? */
static bool host_holds(struct qcow2 *q, uint64_t host, uint64_t off, uint64_t len)
{
    uint8_t *b = malloc(len);
    fx_peek(q, host, b, len);
    bool ok = memcmp(b, shadow + off, len) == 0;
    free(b);
    if (!ok)
        printf("#   host 0x%llx does not hold guest 0x%llx+%llu\n", (unsigned long long)host,
               (unsigned long long)off, (unsigned long long)len);
    return ok;
}

static void reset_shadow(bool backing)
{
    memset(shadow, 0, GUEST);
    if (backing)
        memcpy(shadow, base, GUEST);
}

#define HOST(e) ((e) & L2E_OFFSET_MASK)

/* ---- tests ----------------------------------------------------------------- */

static void test_read_unallocated(void)
{
    CHECK_EQ(fx_create("ra.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    CHECK_EQ(fx_create("rb.qcow2", 64 << 20, 0, 0, false, "base.raw", "raw"), 0);
    struct qcow2 *q = fx_open("ra.qcow2");
    if (q) {
        reset_shadow(false);
        CHECK_EQ(q->l1[0], 0);
        CHECK(reads_shadow(&q->img));       /* zeros */
        CHECK_EQ(img_close(&q->img), 0);
    }
    q = fx_open("rb.qcow2");
    if (q) {
        reset_shadow(true);
        CHECK(q->backing != NULL);
        CHECK(reads_shadow(&q->img));       /* the backing file */
        CHECK_EQ(img_close(&q->img), 0);
    }
}

/* The first write allocates an L2 table and a data cluster (refcount 1,
 * COPIED); the rest of the cluster reads as zeros; a write over several
 * unallocated clusters gets one contiguous run. */
static void test_first_write_allocates(void)
{
    CHECK_EQ(fx_create("fw.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("fw.qcow2");
    if (!q)
        return;
    reset_shadow(false);
    uint64_t alloc0 = stat_get(&q->clusters_allocated);
    CHECK_EQ(wr(q, 8192, 4096, 1), 0);
    uint64_t l1e = q->l1[0];
    CHECK(l1e & QCOW_OFLAG_COPIED);
    CHECK_EQ(fx_rc(q, l1e & L1E_OFFSET_MASK), 1);
    uint64_t e = fx_l2e(q, 0, NULL);
    CHECK(e & QCOW_OFLAG_COPIED);
    CHECK_EQ(HOST(e) % CS, 0);
    CHECK_EQ(qcow2_l2_entry_type(&q->h, e, false), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(fx_rc(q, HOST(e)), 1);
    CHECK_EQ(stat_get(&q->clusters_allocated) - alloc0, 2);     /* L2 table + data */
    CHECK(host_holds(q, HOST(e), 0, CS));
    CHECK(reads_shadow(&q->img));

    /* Clusters 2..4 from the middle of 2: one run, entries in order. */
    CHECK_EQ(wr(q, 2 * CS + 60 * 1024, 2 * CS, 2), 0);
    uint64_t e2 = fx_l2e(q, 2 * CS, NULL), e3 = fx_l2e(q, 3 * CS, NULL), e4 = fx_l2e(q, 4 * CS, NULL);
    CHECK_EQ(HOST(e3), HOST(e2) + CS);
    CHECK_EQ(HOST(e4), HOST(e2) + 2 * CS);
    CHECK_EQ(fx_l2e(q, CS, NULL), 0);
    CHECK(host_holds(q, HOST(e2), 2 * CS, 3 * CS));
    CHECK(reads_shadow(&q->img));
    /* An owned cluster is overwritten in place. */
    CHECK_EQ(wr(q, 3 * CS + 4096, 8192, 3), 0);
    CHECK_EQ(fx_l2e(q, 3 * CS, NULL), e3);
    CHECK(host_holds(q, HOST(e3), 3 * CS, CS));
    CHECK_EQ(img_close(&q->img), 0);

    q = fx_open("fw.qcow2");
    if (!q)
        return;
    CHECK_EQ(fx_l2e(q, 0, NULL), e);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("fw.qcow2"));
}

/* A partial write into an unallocated cluster over a backing file: the new
 * cluster holds the backing file's head and tail around the data. */
static void test_cow_partial_from_backing(void)
{
    CHECK_EQ(fx_create("cow.qcow2", 64 << 20, 0, 0, false, "base.raw", "raw"), 0);
    struct qcow2 *q = fx_open("cow.qcow2");
    if (!q)
        return;
    reset_shadow(true);
    CHECK_EQ(wr(q, CS + 16384, 4096, 4), 0);
    uint64_t e = fx_l2e(q, CS, NULL);
    CHECK(e & QCOW_OFLAG_COPIED);
    CHECK(host_holds(q, HOST(e), CS, CS));          /* head + data + tail copied */
    CHECK_EQ(fx_l2e(q, 0, NULL), 0);
    CHECK_EQ(fx_l2e(q, 2 * CS, NULL), 0);
    /* Unaligned head and tail across two clusters: both partial. */
    CHECK_EQ(wr(q, 5 * CS + CS / 2, CS, 5), 0);
    uint64_t e5 = fx_l2e(q, 5 * CS, NULL), e6 = fx_l2e(q, 6 * CS, NULL);
    CHECK_EQ(HOST(e6), HOST(e5) + CS);
    CHECK(host_holds(q, HOST(e5), 5 * CS, 2 * CS));
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("cow.qcow2"));
}

/* Zero clusters: on an unallocated cluster over a backing file the zero
 * flag hides the backing data, and a partial write there copies zeros, not
 * the backing file.  On our own cluster without unmap it stays allocated
 * (ZERO_ALLOC) and the next write reuses it. */
static void test_zero_clusters(void)
{
    CHECK_EQ(fx_create("z.qcow2", 64 << 20, 0, 0, false, "base.raw", "raw"), 0);
    struct qcow2 *q = fx_open("z.qcow2");
    if (!q)
        return;
    reset_shadow(true);
    CHECK_EQ(wr(q, 0, CS, 6), 0);                  /* an L2 table, cluster 0 ours */
    CHECK_EQ(zero(q, 3 * CS, CS, 0), 0);
    CHECK_EQ(fx_l2e(q, 3 * CS, NULL), QCOW_OFLAG_ZERO);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(wr(q, 3 * CS + 8192, 4096, 7), 0);
    uint64_t e3 = fx_l2e(q, 3 * CS, NULL);
    CHECK_EQ(qcow2_l2_entry_type(&q->h, e3, false), QCOW2_CLUSTER_NORMAL);
    CHECK(host_holds(q, HOST(e3), 3 * CS, CS));     /* zeros around the data */
    CHECK(reads_shadow(&q->img));

    /* Our cluster, NO_HOLE: the zero flag on the same cluster. */
    uint64_t e0 = fx_l2e(q, 0, NULL);
    CHECK_EQ(zero(q, 0, CS, IMG_NO_HOLE), 0);
    uint64_t z0 = fx_l2e(q, 0, NULL);
    CHECK_EQ(z0, e0 | QCOW_OFLAG_ZERO);
    CHECK_EQ(qcow2_l2_entry_type(&q->h, z0, false), QCOW2_CLUSTER_ZERO_ALLOC);
    CHECK_EQ(fx_rc(q, HOST(e0)), 1);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(wr(q, 4096, 4096, 8), 0);             /* reuses it, zeros around */
    CHECK_EQ(fx_l2e(q, 0, NULL), e0);
    CHECK(host_holds(q, HOST(e0), 0, CS));
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("z.qcow2"));

    /* With discard=unmap, write-zeroes (may unmap) and discard let our
     * clusters go once the change is durable. */
    struct image *img = fx_open_opts("z.qcow2", true, false, NULL);
    if (!img)
        return;
    q = to_qcow2(img);
    uint64_t h3 = HOST(fx_l2e(q, 3 * CS, NULL));
    CHECK_EQ(zero(q, 0, CS, 0), 0);
    CHECK_EQ(fx_l2e(q, 0, NULL), QCOW_OFLAG_ZERO);
    CHECK_EQ(fx_rc(q, HOST(e0)), 1);               /* until the flush */
    struct job j = { .img = img, .op = OP_DISCARD, .off = 3 * CS, .len = CS };
    CHECK_EQ(run_job(&j), 0);
    memset(shadow + 3 * CS, 0, CS);
    CHECK_EQ(fx_l2e(q, 3 * CS, NULL), QCOW_OFLAG_ZERO);
    CHECK_EQ(flush(q), 0);
    CHECK_EQ(fx_rc(q, HOST(e0)), 0);
    CHECK_EQ(fx_rc(q, h3), 0);
    CHECK(reads_shadow(img));
    CHECK_EQ(img_close(img), 0);
    CHECK(fx_check_clean("z.qcow2"));
}

/* A write into a cluster shared with a snapshot: the L2 table is copied,
 * the cluster gets a new home (head and tail copied from the shared one),
 * and after the flush the old cluster and table keep only the snapshot's
 * reference.  The snapshot still reads the old content. */
static void test_write_to_snapshot_shared_cluster(void)
{
    CHECK_EQ(fx_create("snap.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = fx_open("snap.qcow2");
    if (!q)
        return;
    reset_shadow(false);
    CHECK_EQ(wr(q, 0, 2 * CS, 9), 0);
    static uint8_t before[GUEST];
    memcpy(before, shadow, GUEST);
    uint64_t old_l2 = q->l1[0] & L1E_OFFSET_MASK, e0 = fx_l2e(q, 0, NULL), e1 = fx_l2e(q, CS, NULL);
    char id[64], err[256];
    CHECK_EQ(img_snapshot_create(&q->img, "s1", id, sizeof(id), err, sizeof(err)), 0);
    CHECK(!(q->l1[0] & QCOW_OFLAG_COPIED));
    CHECK_EQ(fx_rc(q, old_l2), 2);
    CHECK_EQ(fx_rc(q, HOST(e0)), 2);
    CHECK(!(fx_l2e(q, 0, NULL) & QCOW_OFLAG_COPIED));

    CHECK_EQ(wr(q, 8192, 4096, 10), 0);
    uint64_t new_l2 = q->l1[0] & L1E_OFFSET_MASK, n0 = fx_l2e(q, 0, NULL);
    CHECK(new_l2 != old_l2 && (q->l1[0] & QCOW_OFLAG_COPIED));
    CHECK(HOST(n0) != HOST(e0) && (n0 & QCOW_OFLAG_COPIED));
    CHECK(host_holds(q, HOST(n0), 0, CS));
    CHECK_EQ(fx_l2e(q, CS, NULL), e1 & ~QCOW_OFLAG_COPIED);     /* copied table, still shared */
    CHECK_EQ(fx_rc(q, HOST(e0)), 2);               /* the drop waits for a flush */
    CHECK_EQ(fx_rc(q, old_l2), 2);
    CHECK_EQ(flush(q), 0);
    CHECK_EQ(fx_rc(q, HOST(e0)), 1);
    CHECK_EQ(fx_rc(q, old_l2), 1);
    CHECK_EQ(fx_rc(q, HOST(n0)), 1);
    CHECK_EQ(fx_rc(q, new_l2), 1);
    CHECK_EQ(fx_rc(q, HOST(e1)), 2);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("snap.qcow2"));

    struct image *img = fx_open_opts("snap.qcow2", false, true, "s1");
    if (!img)
        return;
    memcpy(shadow, before, GUEST);
    CHECK(reads_shadow(img));
    CHECK_EQ(img_close(img), 0);
}

/* Extended L2: a write allocates only the subclusters it touches (partial
 * ones filled from what they read as), others stay unallocated (backing
 * file) or zero. */
static void test_extl2_subclusters(void)
{
    const uint64_t SC = CS / 32;
    CHECK_EQ(fx_create("x.qcow2", 64 << 20, 0, 0, true, "base.raw", "raw"), 0);
    struct qcow2 *q = fx_open("x.qcow2");
    if (!q)
        return;
    CHECK(q->extl2);
    reset_shadow(true);
    uint64_t bm;
    CHECK_EQ(wr(q, 3 * SC, SC, 11), 0);            /* subcluster 3 exactly */
    uint64_t e = fx_l2e(q, 0, &bm);
    CHECK(e & QCOW_OFLAG_COPIED);
    CHECK_EQ(bm, 1ull << 3);
    CHECK(host_holds(q, HOST(e) + 3 * SC, 3 * SC, SC));
    /* Part of subcluster 5 of our cluster: filled from the backing file. */
    CHECK_EQ(wr(q, 5 * SC + 512, 1024, 12), 0);
    CHECK_EQ(fx_l2e(q, 0, &bm), e);
    CHECK_EQ(bm, (1ull << 3) | (1ull << 5));
    CHECK(host_holds(q, HOST(e) + 5 * SC, 5 * SC, SC));
    /* A new cluster, partial subcluster 2: only it is copied and allocated. */
    CHECK_EQ(wr(q, CS + 2 * SC + 512, 1024, 13), 0);
    uint64_t e1 = fx_l2e(q, CS, &bm);
    CHECK(HOST(e1) && HOST(e1) != HOST(e));
    CHECK_EQ(bm, 1ull << 2);
    CHECK(host_holds(q, HOST(e1) + 2 * SC, CS + 2 * SC, SC));
    /* Subcluster 7 zeroed: its zero bit, reading zeros over the backing. */
    CHECK_EQ(zero(q, CS + 7 * SC, SC, 0), 0);
    CHECK_EQ(fx_l2e(q, CS, &bm), e1);
    CHECK_EQ(bm, (1ull << 2) | (1ull << (32 + 7)));
    /* Writing it again: allocated, zero bit gone, the rest of it zeros. */
    CHECK_EQ(wr(q, CS + 7 * SC + 1024, 512, 14), 0);
    CHECK_EQ(fx_l2e(q, CS, &bm), e1);
    CHECK_EQ(bm, (1ull << 2) | (1ull << 7));
    CHECK(host_holds(q, HOST(e1) + 7 * SC, CS + 7 * SC, SC));
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("x.qcow2"));
}

/* Two requests write different parts of one unallocated cluster: the
 * second waits for the first one's allocation (parked in its data write)
 * and then writes in place: one cluster, both parts. */
static struct qcow2 *cq;
static void co_two_writers(void *arg)
{
    uint8_t *a = io_alloc(4096), *b = io_alloc(4096);
    fx_fill(a, 4096, 20);
    fx_fill(b, 4096, 21);
    struct fx_rule *gate = fx_rule(FILE_OP_WRITE, cq->host_end, 1ull << 40, 0, true);
    struct job ja = { .img = &cq->img, .op = OP_WRITE, .buf = a, .off = 5 * CS, .len = 4096 };
    struct job jb = { .img = &cq->img, .op = OP_WRITE, .buf = b, .off = 5 * CS + 32768, .len = 4096 };
    uint64_t alloc0 = stat_get(&cq->clusters_allocated);
    co_spawn(co_job, &ja);
    co_spawn(co_job, &jb);
    fx_settle();
    CHECK_EQ(gate->parked, 1);                     /* a, in its data write */
    CHECK(!ja.done && !jb.done);
    CHECK(cq->allocs != NULL && cq->allocs->first == 5 && cq->allocs->last == 5);
    CHECK(!co_queue_empty(&cq->allocs->waiters));  /* b waits for it */
    fx_release(gate);
    fx_settle();
    CHECK(ja.done && jb.done);
    CHECK_EQ(ja.r, 0);
    CHECK_EQ(jb.r, 0);
    CHECK_EQ(stat_get(&cq->clusters_allocated) - alloc0, 1);
    memcpy(shadow + 5 * CS, a, 4096);
    memcpy(shadow + 5 * CS + 32768, b, 4096);
    io_free(a);
    io_free(b);
}

static void test_second_writer_waits_for_allocation(void)
{
    CHECK_EQ(fx_create("w2.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    cq = fx_open("w2.qcow2");
    if (!cq)
        return;
    reset_shadow(false);
    CHECK_EQ(wr(cq, 0, 4096, 19), 0);              /* the L2 table exists */
    CHECK_EQ(fx_run(co_two_writers, NULL), 0);
    fx_rules_clear();
    uint64_t e = fx_l2e(cq, 5 * CS, NULL);
    CHECK(e & QCOW_OFLAG_COPIED);
    CHECK(host_holds(cq, HOST(e), 5 * CS, CS));
    CHECK(reads_shadow(&cq->img));
    CHECK_EQ(img_close(&cq->img), 0);
    CHECK(fx_check_clean("w2.qcow2"));
}

/* The data write of a new cluster fails: the entry is unchanged and the
 * cluster (never referenced) is free again. */
static void test_failed_write_frees_new_cluster(void)
{
    CHECK_EQ(fx_create("wf.qcow2", 64 << 20, 0, 0, false, "base.raw", "raw"), 0);
    struct qcow2 *q = fx_open("wf.qcow2");
    if (!q)
        return;
    reset_shadow(true);
    CHECK_EQ(wr(q, 0, 4096, 22), 0);
    uint64_t next = q->host_end;
    struct fx_rule *f = fx_rule(FILE_OP_WRITE, next, 1ull << 40, -EIO, false);
    CHECK_EQ(wr(q, 2 * CS + 4096, 4096, 23), -EIO);
    CHECK_EQ(f->hits, 1);
    fx_rules_clear();
    CHECK_EQ(fx_l2e(q, 2 * CS, NULL), 0);
    CHECK_EQ(fx_rc(q, next), 0);
    CHECK(!q->broken);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(wr(q, 2 * CS + 4096, 4096, 24), 0);   /* the retry gets that cluster */
    CHECK_EQ(HOST(fx_l2e(q, 2 * CS, NULL)), next);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("wf.qcow2"));
}

/* ---- zero copy: allocating writes through img_map ------------------------------ */

/* One zero copy write as the ublk frontend does it: img_map, the data
 * written straight into the file where the map says (what WRITE_FIXED
 * does), img_map_end with that write's result (io_result forces one).
 * With hold it parks between the map and the write until released. */
struct mjob {
    struct image *img;
    uint64_t off, len;
    unsigned flags;
    const uint8_t *data;
    int io_result, mapped, r;
    bool hold, released, done;
    struct co_queue q;
    struct img_map m;
};

static void co_map(void *arg)
{
    struct mjob *j = arg;
    j->mapped = img_map(j->img, j->off, j->len, j->flags | IMG_MAP_WRITE, &j->m);
    if (j->mapped == 1) {
        while (j->hold && !j->released)
            co_queue_wait(&j->q);
        int res = j->io_result;
        if (res == 0 && pwrite(j->m.file->fd, j->data, j->len, (off_t)j->m.host) != (ssize_t)j->len)
            res = -EIO;
        j->r = img_map_end(j->img, &j->m, j->flags | IMG_MAP_WRITE, res);
    }
    j->done = true;
}

/* Map and write len bytes of pattern seed at off; the map's answer (1:
 * zero copy, then *r is img_map_end's result).  The shadow follows a
 * successful write. */
static bool zc_flush_at_end;    /* the last zc_wr's map said: img_map_end flushes */

static int zc_wr(struct qcow2 *q, uint64_t off, uint64_t len, unsigned seed, unsigned flags, int io_result,
                 uint64_t *host, int *r)
{
    uint8_t *buf = io_alloc(len);
    fx_fill(buf, len, seed);
    struct mjob j = { .img = &q->img, .off = off, .len = len, .flags = flags, .data = buf,
                      .io_result = io_result, .mapped = -999, .r = -999, .q = CO_QUEUE_INIT };
    if (fx_run(co_map, &j) < 0)
        j.mapped = -EDEADLK;
    if (j.mapped == 1 && j.r == 0 && off < GUEST)
        memcpy(shadow + off, buf, MIN(len, GUEST - off));
    if (host)
        *host = j.m.host;
    if (r)
        *r = j.r;
    zc_flush_at_end = j.m.flush_at_end;
    io_free(buf);
    return j.mapped;
}

/* The unit tests' images live on tmpfs, which img_map never maps (such
 * files are served inline): pretend the file is on a disk. */
static struct qcow2 *zc_open(const char *file)
{
    struct qcow2 *q = fx_open(file);
    if (q)
        q->data->in_memory = false;
    return q;
}

/* Whole clusters of an empty image map: new clusters, named by their L2
 * entries (COPIED, refcount 1) only in img_map_end; a failed data write
 * gives them back (no leak, the next write gets them; a partial write
 * that would need zeros written into it does not map). */
static void test_zc_alloc_whole_clusters(void)
{
    CHECK_EQ(fx_create("zc.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = zc_open("zc.qcow2");
    if (!q)
        return;
    reset_shadow(false);
    uint64_t alloc0 = stat_get(&q->clusters_allocated), host = 0;
    int r = -999;
    CHECK_EQ(zc_wr(q, CS, 2 * CS, 30, 0, 0, &host, &r), 1);
    CHECK_EQ(r, 0);
    CHECK_EQ(stat_get(&q->clusters_allocated) - alloc0, 3);     /* L2 table + 2 data */
    uint64_t e1 = fx_l2e(q, CS, NULL), e2 = fx_l2e(q, 2 * CS, NULL);
    CHECK_EQ(e1, host | QCOW_OFLAG_COPIED);
    CHECK_EQ(e2, (host + CS) | QCOW_OFLAG_COPIED);
    CHECK_EQ(fx_rc(q, host), 1);
    CHECK_EQ(fx_rc(q, host + CS), 1);
    CHECK(q->allocs == NULL);
    CHECK(reads_shadow(&q->img));

    /* The data write fails: the entry stays empty, the cluster is free. */
    uint64_t h4 = 0;
    CHECK_EQ(zc_wr(q, 4 * CS, CS, 31, 0, -EIO, &h4, &r), 1);
    CHECK_EQ(r, -EIO);
    CHECK_EQ(fx_l2e(q, 4 * CS, NULL), 0);
    CHECK_EQ(fx_rc(q, h4), 0);
    CHECK(q->allocs == NULL);
    CHECK(reads_shadow(&q->img));
    /* Part of a cluster, zeros around it, but the cluster the allocator
     * gives is that freed one, inside the file: its zeros would have to
     * be written, so the map gives it back and says 0 (the copy path). */
    uint64_t alloc1 = stat_get(&q->clusters_allocated);
    CHECK_EQ(zc_wr(q, 7 * CS + 4096, 4096, 45, 0, 0, NULL, NULL), 0);
    CHECK_EQ(stat_get(&q->clusters_allocated) - alloc1, 1);
    CHECK_EQ(fx_l2e(q, 7 * CS, NULL), 0);
    CHECK_EQ(fx_rc(q, h4), 0);
    CHECK(q->allocs == NULL);
    CHECK_EQ(wr(q, 4 * CS, CS, 32), 0);            /* the copy path gets it again */
    CHECK_EQ(HOST(fx_l2e(q, 4 * CS, NULL)), h4);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("zc.qcow2"));
    q = fx_open("zc.qcow2");
    if (!q)
        return;
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
}

/* Part of a cluster: without a backing file a new cluster at the end of
 * the file needs no zeros written around the data, so it maps; over a
 * backing file the head and tail must be copied: the copy path, nothing
 * allocated.  Whole clusters over a backing file map; with extended L2 so
 * does a whole subcluster (only it becomes allocated). */
static void test_zc_alloc_partial(void)
{
    CHECK_EQ(fx_create("zp.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = zc_open("zp.qcow2");
    if (q) {
        reset_shadow(false);
        uint64_t host = 0;
        int r = -999;
        CHECK_EQ(zc_wr(q, 6 * CS + 4096, 8192, 33, 0, 0, &host, &r), 1);
        CHECK_EQ(r, 0);
        CHECK_EQ(fx_l2e(q, 6 * CS, NULL), (host - 4096) | QCOW_OFLAG_COPIED);
        CHECK(reads_shadow(&q->img));
        CHECK_EQ(img_close(&q->img), 0);
        CHECK(fx_check_clean("zp.qcow2"));
    }
    CHECK_EQ(fx_create("zb.qcow2", 64 << 20, 0, 0, false, "base.raw", "raw"), 0);
    q = zc_open("zb.qcow2");
    if (q) {
        reset_shadow(true);
        CHECK_EQ(wr(q, 0, 4096, 34), 0);           /* the L2 table exists */
        uint64_t alloc0 = stat_get(&q->clusters_allocated), end0 = q->host_end;
        CHECK_EQ(zc_wr(q, 6 * CS + 4096, 8192, 35, 0, 0, NULL, NULL), 0);
        CHECK_EQ(stat_get(&q->clusters_allocated), alloc0);
        CHECK_EQ(q->host_end, end0);
        CHECK_EQ(fx_l2e(q, 6 * CS, NULL), 0);
        int r = -999;
        CHECK_EQ(zc_wr(q, 6 * CS, CS, 36, 0, 0, NULL, &r), 1);
        CHECK_EQ(r, 0);
        CHECK(fx_l2e(q, 6 * CS, NULL) & QCOW_OFLAG_COPIED);
        CHECK(reads_shadow(&q->img));
        CHECK_EQ(img_close(&q->img), 0);
        CHECK(fx_check_clean("zb.qcow2"));
    }
    const uint64_t SC = CS / 32;
    CHECK_EQ(fx_create("zx.qcow2", 64 << 20, 0, 0, true, "base.raw", "raw"), 0);
    q = zc_open("zx.qcow2");
    if (q) {
        reset_shadow(true);
        uint64_t host = 0, bm;
        int r = -999;
        CHECK_EQ(zc_wr(q, 2 * CS + 3 * SC, SC, 37, 0, 0, &host, &r), 1);
        CHECK_EQ(r, 0);
        CHECK_EQ(fx_l2e(q, 2 * CS, &bm), (host - 3 * SC) | QCOW_OFLAG_COPIED);
        CHECK_EQ(bm, 1ull << 3);
        CHECK_EQ(zc_wr(q, 3 * CS + 512, 1024, 38, 0, 0, NULL, NULL), 0);
        CHECK(reads_shadow(&q->img));
        CHECK_EQ(img_close(&q->img), 0);
        CHECK(fx_check_clean("zx.qcow2"));
    }
}

/* While a zero copy allocation is open (mapped, data not yet written) a
 * second writer to the same cluster waits for it (the allocation in
 * flight), then writes in place into the cluster it made. */
static struct mjob zja;
static struct job zjb;

static void co_zc_two_writers(void *arg)
{
    co_spawn(co_map, &zja);
    fx_settle();
    CHECK_EQ(zja.mapped, 1);
    co_spawn(co_job, &zjb);
    fx_settle();
    CHECK(!zja.done && !zjb.done);
    CHECK(cq->allocs != NULL && cq->allocs->first == 5 && cq->allocs->last == 5);
    CHECK(cq->allocs != NULL && !co_queue_empty(&cq->allocs->waiters));     /* b waits */
    CHECK_EQ(fx_l2e(cq, 5 * CS, NULL), 0);        /* nothing names the cluster yet */
    zja.released = true;
    co_queue_wake_all(&zja.q);
}

static void test_zc_second_writer_waits(void)
{
    CHECK_EQ(fx_create("zw.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    cq = zc_open("zw.qcow2");
    if (!cq)
        return;
    reset_shadow(false);
    CHECK_EQ(wr(cq, 0, 4096, 39), 0);              /* the L2 table exists */
    uint8_t *a = io_alloc(CS), *b = io_alloc(4096);
    fx_fill(a, CS, 40);
    fx_fill(b, 4096, 41);
    zja = (struct mjob){ .img = &cq->img, .off = 5 * CS, .len = CS, .data = a, .hold = true,
                         .q = CO_QUEUE_INIT };
    zjb = (struct job){ .img = &cq->img, .op = OP_WRITE, .buf = b, .off = 5 * CS + 32768, .len = 4096 };
    uint64_t alloc0 = stat_get(&cq->clusters_allocated);
    CHECK_EQ(fx_run(co_zc_two_writers, NULL), 0);
    CHECK(zja.done && zjb.done);
    CHECK_EQ(zja.r, 0);
    CHECK_EQ(zjb.r, 0);
    CHECK_EQ(stat_get(&cq->clusters_allocated) - alloc0, 1);
    CHECK_EQ(fx_l2e(cq, 5 * CS, NULL), zja.m.host | QCOW_OFLAG_COPIED);
    memcpy(shadow + 5 * CS, a, CS);
    memcpy(shadow + 5 * CS + 32768, b, 4096);
    io_free(a);
    io_free(b);
    CHECK(reads_shadow(&cq->img));
    CHECK_EQ(img_close(&cq->img), 0);
    CHECK(fx_check_clean("zw.qcow2"));
}

/* FUA: the new entries are on disk when img_map_end returns (a flush,
 * with its syncs, which also make the data durable: the map tells the
 * frontend it need not write with RWF_DSYNC); without FUA nothing is
 * synced. */
static void test_zc_alloc_fua_flushes(void)
{
    CHECK_EQ(fx_create("zf.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = zc_open("zf.qcow2");
    if (!q)
        return;
    reset_shadow(false);
    CHECK_EQ(wr(q, 0, 4096, 42), 0);
    CHECK_EQ(flush(q), 0);
    struct fx_rule *sync = fx_rule(FILE_OP_SYNC, 0, 1, 0, false);
    int r = -999;
    CHECK_EQ(zc_wr(q, 2 * CS, CS, 43, 0, 0, NULL, &r), 1);
    CHECK_EQ(r, 0);
    CHECK(!zc_flush_at_end);
    CHECK_EQ(sync->hits, 0);
    uint64_t host = 0;
    CHECK_EQ(zc_wr(q, 3 * CS, CS, 44, IMG_FUA, 0, &host, &r), 1);
    CHECK_EQ(r, 0);
    CHECK(zc_flush_at_end);
    CHECK(sync->hits >= 1);
    fx_rules_clear();
    /* The entry as the file holds it (the L2 table is the first cluster's). */
    uint64_t l2 = q->l1[0] & L1E_OFFSET_MASK, ondisk = 0;
    fx_peek(q, l2 + 3 * 8, &ondisk, 8);
    CHECK_EQ(be64_load((uint8_t *)&ondisk), host | QCOW_OFLAG_COPIED);
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("zf.qcow2"));
}

/* A zero copy map of one cluster leaves a hint (hint.c) that the next map
 * of the cluster takes without looking up the L2 cache; it must give the
 * long way's answer or none, whatever changed since: a discard, a
 * snapshot sharing the cluster, a reverted snapshot, an evicted slice, a
 * structure (indexed, or found from the header) moved onto the cluster. */
static int zc_rd(struct qcow2 *q, uint64_t off, uint64_t len, uint64_t *host)
{
    struct img_map m;
    int r = img_map(&q->img, off, len, 0, &m);
    if (r == 1) {
        *host = m.host;
        img_map_end(&q->img, &m, 0, 0);
    }
    return r;
}

static void test_zc_hints_follow_changes(void)
{
    CHECK_EQ(fx_create("zh.qcow2", 64 << 20, 0, 0, false, NULL, NULL), 0);
    struct qcow2 *q = zc_open("zh.qcow2");
    if (!q)
        return;
    reset_shadow(false);
    CHECK_EQ(wr(q, 0, 4 * CS, 50), 0);
    uint64_t h1 = 0, h = 0, e = fx_l2e(q, CS, NULL);
    int r = -999;
    /* The long way leaves the hint; the next write and read take it. */
    CHECK_EQ(zc_wr(q, CS + 4096, 4096, 51, 0, 0, &h1, &r), 1);
    CHECK_EQ(h1, HOST(e) + 4096);
    CHECK(qcow2_hint_lookup(q, CS + 8192, true, &h) && h == HOST(e) + 8192);
    uint64_t hits0 = stat_get(&q->l2c.hits);
    CHECK_EQ(zc_wr(q, CS + 8192, 4096, 52, 0, 0, &h, &r), 1);
    CHECK_EQ(r, 0);
    CHECK_EQ(h, HOST(e) + 8192);
    CHECK_EQ(zc_rd(q, CS, 4096, &h), 1);
    CHECK_EQ(h, HOST(e));
    CHECK_EQ(stat_get(&q->l2c.hits) - hits0, 2);     /* counted as cache hits */
    CHECK(reads_shadow(&q->img));

    /* Zeroed: the hint is dead. */
    CHECK_EQ(zero(q, CS, CS, 0), 0);
    CHECK(!qcow2_hint_lookup(q, CS, false, &h));
    CHECK(!qcow2_hint_lookup(q, CS, true, &h));
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(zc_wr(q, CS, CS, 53, 0, 0, &h, &r), 1);
    CHECK_EQ(r, 0);
    CHECK_EQ(fx_l2e(q, CS, NULL), h | QCOW_OFLAG_COPIED);
    CHECK(reads_shadow(&q->img));

    /* A snapshot shares the cluster: no write in place any more (the
     * long way copies it), reads may still go straight to it. */
    CHECK_EQ(zc_wr(q, 2 * CS, 4096, 54, 0, 0, &h1, &r), 1);
    CHECK(qcow2_hint_lookup(q, 2 * CS, true, &h));
    static uint8_t before[GUEST];
    memcpy(before, shadow, GUEST);
    char id[64], err[256];
    CHECK_EQ(img_snapshot_create(&q->img, "s1", id, sizeof(id), err, sizeof(err)), 0);
    CHECK(!qcow2_hint_lookup(q, 2 * CS, true, &h));
    CHECK_EQ(zc_wr(q, 2 * CS, 4096, 55, 0, 0, &h, &r), 0);       /* copy-on-write: copy path */
    CHECK_EQ(wr(q, 2 * CS, 4096, 55), 0);
    CHECK(HOST(fx_l2e(q, 2 * CS, NULL)) != h1);
    CHECK_EQ(zc_wr(q, 2 * CS + 4096, 4096, 56, 0, 0, &h, &r), 1);
    CHECK_EQ(h, HOST(fx_l2e(q, 2 * CS, NULL)) + 4096);
    CHECK(reads_shadow(&q->img));

    /* Back to the snapshot: the L1 entries change under the hints. */
    CHECK_EQ(flush(q), 0);
    CHECK_EQ(img_snapshot_apply(&q->img, "s1", err, sizeof(err)), 0);
    memcpy(shadow, before, GUEST);
    CHECK(!qcow2_hint_lookup(q, 2 * CS, false, &h) || h == h1);
    CHECK(!qcow2_hint_lookup(q, 2 * CS, true, &h));
    CHECK(reads_shadow(&q->img));

    /* An evicted slice: no hint; the long way loads it again.  (A write
     * that allocates leaves none: the next write in place does.) */
    CHECK_EQ(zc_wr(q, 3 * CS, CS, 57, 0, 0, &h, &r), 1);
    CHECK_EQ(r, 0);
    CHECK(!qcow2_hint_lookup(q, 3 * CS, true, &h));
    CHECK_EQ(zc_wr(q, 3 * CS + 4096, 4096, 57, 0, 0, &h, &r), 1);
    CHECK(qcow2_hint_lookup(q, 3 * CS, true, &h));
    CHECK_EQ(flush(q), 0);
    CHECK(!qcow2_cache_discard_range(&q->l2c, 0, UINT64_MAX));
    CHECK(!qcow2_hint_lookup(q, 3 * CS, true, &h));
    CHECK_EQ(zc_wr(q, 3 * CS, 4096, 58, 0, 0, &h, &r), 1);
    CHECK(qcow2_hint_lookup(q, 3 * CS, true, &h));

    /* A structure found from the header over the cluster (here the LUKS
     * header's fields): no write by hint. */
    uint64_t data = HOST(fx_l2e(q, 3 * CS, NULL));
    bool had = q->h.has_crypto_ext;
    uint64_t co = q->h.crypto_offset, cl = q->h.crypto_length;
    q->h.has_crypto_ext = true, q->h.crypto_offset = data, q->h.crypto_length = 512;
    qcow2_map_changed(q);       /* as every header change does */
    CHECK(!qcow2_hint_lookup(q, 3 * CS, true, &h));
    CHECK(qcow2_hint_lookup(q, 3 * CS, false, &h));        /* reading it is harmless */
    q->h.has_crypto_ext = had, q->h.crypto_offset = co, q->h.crypto_length = cl;
    qcow2_map_changed(q);
    CHECK(reads_shadow(&q->img));

    /* An indexed structure over the cluster (a damaged image): the hint
     * is dead and the long way refuses the write. */
    CHECK(qcow2_hint_lookup(q, 3 * CS, true, &h));
    qcow2_ol_add(q, data, OL_BIT_REFBLOCK);
    CHECK(!qcow2_hint_lookup(q, 3 * CS, true, &h));
    CHECK_EQ(zc_wr(q, 3 * CS, 4096, 59, 0, 0, &h, &r), -EIO);
    CHECK(q->broken);
    qcow2_ol_remove(q, data, OL_BIT_REFBLOCK);
    q->broken = false;
    CHECK(reads_shadow(&q->img));
    CHECK_EQ(img_close(&q->img), 0);
    CHECK(fx_check_clean("zh.qcow2"));
}

/* Hints against the truth under a random mix of everything that changes
 * mappings: copy-path and zero copy writes, write-zeroes and discard
 * (unmapping), snapshots created, deleted and reverted to, flushes and
 * evicted slices.  After every step each cluster's hint answers (read and
 * write) are taken first (so that the fast way, by generation, is what
 * answers), then compared with the L2 entry read through the cache: a
 * plain cluster at that host offset, and for a write one the active L1
 * and L2 entries say is ours alone (COPIED, refcount 1).  The guest must
 * read what was written throughout. */
static uint32_t hint_rng = 12345;
static uint32_t hrand(uint32_t n)
{
    hint_rng = hint_rng * 1103515245u + 12345u;
    return (hint_rng >> 8) % n;
}

static void test_zc_hints_random(void)
{
    CHECK_EQ(fx_create("zr.qcow2", GUEST, 0, 0, false, NULL, NULL), 0);
    struct image *img = fx_open_opts("zr.qcow2", true, false, NULL);
    if (!img)
        return;
    struct qcow2 *q = to_qcow2(img);
    q->data->in_memory = false;
    reset_shadow(false);
    static uint8_t snap_shadow[3][GUEST];
    char names[3][16], id[64], err[256];
    unsigned nsnap = 0, snap_seq = 0, bad = 0, fast = 0;
    for (unsigned step = 0; step < 400 && !bad; step++) {
        uint64_t c = hrand(16), off = c * CS;
        int r = 0;
        unsigned op = hrand(10);
        err[0] = 0;
        switch (op) {
        case 0: case 1:
        {
            uint64_t o = off + hrand(128) * 512, len = 512 + hrand(2 * CS / 512) * 512;
            r = wr(q, o, MIN(len, GUEST - o), 60 + step);
        }
            break;
        case 2: case 3: {
            uint64_t h;
            int mr = -999;
            r = zc_wr(q, off + hrand(16) * 4096, 4096, 60 + step, 0, 0, &h, &mr);
            r = r < 0 ? r : mr == -999 ? 0 : mr;
            break;
        }
        case 4: {
            uint64_t h;
            r = zc_rd(q, off + hrand(16) * 4096, 4096, &h);
            r = r < 0 ? r : 0;
            break;
        }
        case 5:
            r = zero(q, off, CS, 0);
            break;
        case 6: {
            struct job j = { .img = img, .op = OP_DISCARD, .off = off, .len = CS };
            r = run_job(&j);
            if (r == 0)
                memset(shadow + off, 0, CS);    /* discard=unmap, no backing file: zeros */
            break;
        }
        case 7:
            r = flush(q);
            if (r == 0 && hrand(2))
                CHECK(!qcow2_cache_discard_range(&q->l2c, 0, UINT64_MAX));
            break;
        case 8:
            if (nsnap < 3) {
                snprintf(names[nsnap], sizeof(names[nsnap]), "r%u", snap_seq++);
                r = img_snapshot_create(img, names[nsnap], id, sizeof(id), err, sizeof(err));
                if (r == 0)
                    memcpy(snap_shadow[nsnap++], shadow, GUEST);
            } else {
                r = img_snapshot_delete(img, names[0], NULL, NULL, err, sizeof(err));
                if (r == 0) {
                    memmove(names[0], names[1], sizeof(names[0]) * 2);
                    memmove(snap_shadow[0], snap_shadow[1], GUEST * 2);
                    nsnap--;
                }
            }
            break;
        default:
            if (nsnap) {
                unsigned k = hrand(nsnap);
                r = flush(q);
                if (r == 0)
                    r = img_snapshot_apply(img, names[k], err, sizeof(err));
                if (r == 0)
                    memcpy(shadow, snap_shadow[k], GUEST);
            }
            break;
        }
        if (r != 0) {
            printf("#   step %u (op %u) failed: %d %s\n", step, op, r, err);
            bad++;
            break;
        }
        /* Every hint's answer first, then the truth. */
        bool got[16][2];
        uint64_t host[16][2];
        uint64_t gen = q->map_gen;
        for (unsigned k = 0; k < 16; k++)
            for (unsigned w = 0; w < 2; w++)
                got[k][w] = qcow2_hint_lookup(q, k * CS + 4096 * w, w, &host[k][w]);
        if (q->map_gen == gen)
            fast++;
        for (unsigned k = 0; k < 16; k++) {
            uint64_t bm, e = fx_l2e(q, k * CS, &bm), rc = 0;
            for (unsigned w = 0; w < 2; w++) {
                if (!got[k][w])
                    continue;
                bool ok = qcow2_l2_entry_type(&q->h, e, q->extl2) == QCOW2_CLUSTER_NORMAL &&
                          host[k][w] == HOST(e) + 4096 * w;
                if (ok && w)
                    ok = (e & QCOW_OFLAG_COPIED) && (q->l1[0] & QCOW_OFLAG_COPIED) &&
                         qcow2_rc_get(q, HOST(e) >> cl_bits(q), &rc) == 0 && rc == 1;
                if (!ok) {
                    printf("#   step %u: cluster %u %s hint gives 0x%llx, entry 0x%llx\n", step, k,
                           w ? "write" : "read", (unsigned long long)host[k][w], (unsigned long long)e);
                    bad++;
                }
            }
        }
        if (step % 16 == 15 && !reads_shadow(img))
            bad++;
    }
    CHECK_EQ(bad, 0);
    CHECK(fast > 0);
    CHECK(reads_shadow(img));
    CHECK_EQ(img_close(img), 0);
    CHECK(fx_check_clean("zr.qcow2"));
}

int main(void)
{
    fx_setup("test_cluster");
    fx_fill(base, BASE_LEN, 99);
    fx_poke("base.raw", 0, base, BASE_LEN);
    RUN_TEST(test_read_unallocated);
    RUN_TEST(test_first_write_allocates);
    RUN_TEST(test_cow_partial_from_backing);
    RUN_TEST(test_zero_clusters);
    RUN_TEST(test_write_to_snapshot_shared_cluster);
    RUN_TEST(test_extl2_subclusters);
    RUN_TEST(test_second_writer_waits_for_allocation);
    RUN_TEST(test_failed_write_frees_new_cluster);
    RUN_TEST(test_zc_alloc_whole_clusters);
    RUN_TEST(test_zc_alloc_partial);
    RUN_TEST(test_zc_second_writer_waits);
    RUN_TEST(test_zc_alloc_fua_flushes);
    RUN_TEST(test_zc_hints_follow_changes);
    RUN_TEST(test_zc_hints_random);
    fx_teardown();
    UNIT_EXIT();
}
