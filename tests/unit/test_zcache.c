/* The cache of decompressed clusters and the worker pool, on a real image
 * driven by coroutines on an io_uring loop (as the servers drive it):
 *   - reading a compressed cluster piece by piece decompresses it once
 *     (also when all the pieces are requested at once) when the reader is
 *     sequential, twice at most when it is the stream's first cluster;
 *   - a random read decompresses only the prefix it needs; a read beyond a
 *     cached prefix decompresses the whole cluster (zlib and zstd);
 *   - readers running all the time never see a cluster's content from
 *     before a rewrite, discard, or free-and-reuse that completed before
 *     their read started (the reuse places new compressed data at the very
 *     host descriptor the cache holds);
 *   - a failed decompression (fault injected on the worker) fails that read
 *     with EIO and nothing else;
 *   - prefix decompressions expected to be cheap run inline on the engine
 *     thread (after the first has measured the cost), with the same results
 *     and the same failure rule; whole clusters and a threshold of 0 keep
 *     them on the pool;
 *   - while small plain reads are being served, compressed clusters are
 *     loaded one at a time (with none, or only large ones, in parallel),
 *     and every read still gets its data. */
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdlib.h>
#include <unistd.h>

#include "io/coroutine.h"
#include "io/loop.h"
#include "qcow2/internal.h"
#include "tools/tools.h"
#include "unit.h"

#define CS      65536u
#define NCL     16u             /* guest clusters used */
#define PIECE   4096u
#define READERS 8

static char dir[64], path[128];

/* Content of version vid of guest cluster c: every 4 KiB piece starts with
 * (c, vid), then compressible bytes that depend on vid (vid 0: zeros). */
static void content(uint8_t *buf, uint32_t c, uint32_t vid)
{
    if (vid == 0) {
        memset(buf, 0, CS);
        return;
    }
    for (uint32_t p = 0; p < CS; p += PIECE) {
        uint8_t *b = buf + p;
        memcpy(b, &c, 4);
        memcpy(b + 4, &vid, 4);
        for (uint32_t i = 8; i < PIECE; i++)
            b[i] = (uint8_t)((i / 7 + vid * 31 + p / PIECE) & 0x3f);
    }
}

static uint32_t piece_vid(const uint8_t *b, uint32_t c, bool *ok)
{
    uint32_t cc, vid;
    memcpy(&cc, b, 4);
    memcpy(&vid, b + 4, 4);
    bool zero = true;
    for (uint32_t i = 0; i < PIECE && zero; i++)
        zero = b[i] == 0;
    if (zero) {
        *ok = true;
        return 0;
    }
    *ok = cc == c;
    return vid;
}

struct ctx {
    struct image *img;
    struct qcow2 *q;
    /* history of versions per cluster: hist[c][0..n[c]) committed */
    uint32_t hist[NCL][256];
    uint32_t n[NCL];
    uint32_t next_vid;
    bool writer_done;
    int readers_live;
    unsigned reads, bad, errors;
    struct co_queue done_q;
    int fault_r, other_r;
};

static int write_compressed_cluster(struct ctx *x, uint32_t c, uint32_t vid)
{
    uint8_t *raw = io_alloc(CS), *comp = malloc(CS);
    content(raw, c, vid);
    ssize_t n = qcow2_zc_compress(x->q, raw, CS, comp, CS - 1);
    int r = n < 0 ? (int)n : qcow2_co_write_compressed(x->img, comp, (size_t)n, (uint64_t)c * CS);
    /* A compressed write is mapped once its host cluster is written: at the
     * latest by the next flush. */
    if (r == 0)
        r = img_flush(x->img);
    io_free(raw);
    free(comp);
    return r;
}

/* Guest clusters 0..n-1 compressed, cluster c with version vid0 + c. */
static int write_clusters(struct image *img, uint32_t n, uint32_t vid0)
{
    struct ctx x = { .img = img, .q = to_qcow2(img) };
    int r = 0;
    for (uint32_t c = 0; c < n && r == 0; c++)
        r = write_compressed_cluster(&x, c, vid0 + c);
    return r;
}

static void commit(struct ctx *x, uint32_t c, uint32_t vid)
{
    if (x->n[c] < 256)
        x->hist[c][x->n[c]++] = vid;
}

/* Is vid committed at index >= from (or the one in flight)? */
static bool vid_ok(struct ctx *x, uint32_t c, uint32_t from, uint32_t vid, uint32_t inflight)
{
    if (vid == inflight)
        return true;
    for (uint32_t k = from; k < x->n[c]; k++)
        if (x->hist[c][k] == vid)
            return true;
    return false;
}

static uint32_t inflight_vid[NCL];
static int zero_fd = -1;

static void reader(void *arg)
{
    struct ctx *x = arg;
    uint8_t *buf = io_alloc(PIECE);
    unsigned seed = (unsigned)x->readers_live * 7919u + 1;
    while (!x->writer_done) {
        seed = seed * 1103515245u + 12345u;
        uint32_t c = (seed >> 8) % NCL, p = (seed >> 20) % (CS / PIECE);
        uint32_t from = x->n[c] ? x->n[c] - 1 : 0;
        int r = img_read(x->img, buf, (uint64_t)c * CS + p * PIECE, PIECE);
        x->reads++;
        /* A cache hit never parks: go through the ring once, so the loop
         * submits the others' I/O (the writer's) between reads. */
        uint8_t one;
        io_pread(zero_fd, &one, 1, 0);
        if (r < 0) {
            x->errors++;
            continue;
        }
        bool ok;
        uint32_t vid = piece_vid(buf, c, &ok);
        if (!ok || !vid_ok(x, c, from, vid, inflight_vid[c])) {
            if (x->bad++ < 5)
                printf("#   cluster %u piece %u: read version %u, committed from index %u\n", c, p, vid, from);
        }
    }
    io_free(buf);
    if (--x->readers_live == 0)
        co_queue_wake_all(&x->done_q);
}

static void writer(void *arg)
{
    struct ctx *x = arg;
    uint8_t *raw = io_alloc(CS);
    int r = 0;
    for (uint32_t round = 0; round < 24 && r == 0; round++) {
        uint32_t c = (round * 5) % NCL, vid = ++x->next_vid;
        inflight_vid[c] = vid;
        switch (round % 4) {
        case 0:     /* rewrite (uncompressed: the compressed cluster is let go) */
            content(raw, c, vid);
            r = img_write(x->img, raw, (uint64_t)c * CS, CS, 0);
            break;
        case 1:     /* discard */
            inflight_vid[c] = 0;
            r = img_discard(x->img, (uint64_t)c * CS, CS);
            vid = 0;
            break;
        case 2:     /* compressed again */
            r = write_compressed_cluster(x, c, vid);
            break;
        case 3: {
            /* Free and reuse: let go of every cluster (their host clusters
             * reach refcount 0 once flushed), then compress new content:
             * the allocator hands out the same host clusters, the first
             * piece at the very descriptor a cached entry had. */
            for (uint32_t k = 0; k < NCL && r == 0; k++) {
                inflight_vid[k] = 0;
                r = img_discard(x->img, (uint64_t)k * CS, CS);
                if (r == 0)
                    commit(x, k, 0);
            }
            for (int f = 0; f < 2 && r == 0; f++)
                r = img_flush(x->img);
            for (uint32_t k = 0; k < NCL && r == 0; k++) {
                uint32_t v = ++x->next_vid;
                inflight_vid[k] = v;
                r = write_compressed_cluster(x, k, v);
                if (r == 0)
                    commit(x, k, v);
            }
            vid = x->hist[c][x->n[c] - 1];
            break;
        }
        }
        if (r == 0)
            commit(x, c, vid);
        if (r == 0 && round % 3 == 2)
            r = img_flush(x->img);
    }
    CHECK_EQ(r, 0);
    io_free(raw);
    x->writer_done = true;
}

static void run_concurrent(void *arg)
{
    struct ctx *x = arg;
    int r = 0;
    for (uint32_t c = 0; c < NCL && r == 0; c++) {
        uint32_t vid = ++x->next_vid;
        r = write_compressed_cluster(x, c, vid);
        commit(x, c, vid);
    }
    CHECK_EQ(r, 0);
    x->readers_live = READERS;
    for (int i = 0; i < READERS; i++)
        co_spawn(reader, x);
    writer(x);
    while (x->readers_live)
        co_queue_wait(&x->done_q);
}

static struct image *open_img(void)
{
    struct img_opts o = { .format = IMG_FMT_QCOW2, .discard = IMG_DISCARD_UNMAP };
    char err[256];
    struct image *img = img_open(path, &o, err, sizeof(err));
    if (!img)
        printf("#   open: %s\n", err);
    return img;
}

static enum qcow2_compression make_type = QCOW2_COMP_ZLIB;

static bool make_image(void)
{
    struct create_opts co;
    create_opts_init(&co);
    co.compression = make_type;
    co.size = (uint64_t)NCL * CS * 4;
    co.size_set = true;
    co.cluster_size = CS;
    char err[256];
    if (img_create(path, &co, err, sizeof(err)) < 0) {
        printf("#   create: %s\n", err);
        return false;
    }
    return true;
}

static void run_in_loop(co_fn fn, void *arg)
{
    struct loop *l = loop_new(256);
    co_spawn(fn, arg);
    CHECK_EQ(loop_run(l), 0);
    loop_free(l);
}

static void test_rewrite_discard_reuse_under_reads(void)
{
    static struct ctx x;
    if (!make_image())
        { CHECK(0); return; }
    x.img = open_img();
    if (!x.img)
        { CHECK(0); return; }
    x.q = to_qcow2(x.img);
    run_in_loop(run_concurrent, &x);
    struct img_stats st;
    img_get_stats(x.img, &st);
    printf("#   %u reads, %llu decompressions, %llu cache hits, %u bad\n", x.reads,
           (unsigned long long)st.clusters_decompressed, (unsigned long long)st.zcache_hits, x.bad);
    CHECK(x.reads > 100);
    CHECK_EQ(x.bad, 0);
    CHECK_EQ(x.errors, 0);
    CHECK(st.zcache_hits > 0);
    CHECK_EQ(img_close(x.img), 0);
}

/* Sequential pieces, one after another and then all at once. */
struct seq { struct image *img; int r; unsigned live; struct co_queue q; uint32_t c, p; };

static void seq_piece(void *arg)
{
    struct seq *s = arg;
    uint32_t p = s->p++;
    uint8_t *buf = io_alloc(PIECE), *want = io_alloc(CS);
    content(want, s->c, 1000 + s->c);
    int r = img_read(s->img, buf, (uint64_t)s->c * CS + p * PIECE, PIECE);
    if (r < 0 || memcmp(buf, want + p * PIECE, PIECE) != 0)
        s->r = r < 0 ? r : -EBADMSG;
    io_free(buf);
    io_free(want);
    if (--s->live == 0)
        co_queue_wake_all(&s->q);
}

static void seq_main(void *arg)
{
    struct seq *s = arg;
    s->r = write_clusters(s->img, 2, 1000);
    if (s->r)
        return;
    /* Cluster 0: one piece at a time. */
    s->c = 0;
    s->p = 0;
    for (uint32_t i = 0; i < CS / PIECE; i++) {
        s->live = 1;
        seq_piece(s);
    }
    /* Cluster 1: all pieces in flight at once. */
    s->c = 1;
    s->p = 0;
    s->live = CS / PIECE;
    for (uint32_t i = 0; i < CS / PIECE; i++)
        co_spawn(seq_piece, s);
    while (s->live)
        co_queue_wait(&s->q);
}

static void test_piecewise_reads_decompress_once(void)
{
    if (!make_image())
        { CHECK(0); return; }
    struct seq s = { .img = open_img() };
    if (!s.img)
        { CHECK(0); return; }
    run_in_loop(seq_main, &s);
    CHECK_EQ(s.r, 0);
    struct img_stats st;
    img_get_stats(s.img, &st);
    /* Cluster 0's first piece starts the cluster: all of it.  Cluster 1
     * continues the stream: decompressed once too, all its pieces waiting
     * for that. */
    CHECK_EQ(st.clusters_decompressed, 2);
    CHECK_EQ(st.zcache_hits, 2 * (CS / PIECE) - 2);
    CHECK_EQ(img_close(s.img), 0);
}

/* Random reads decompress a prefix; one beyond it decompresses the whole
 * cluster; one continuing where the last ended does too. */
struct pre { struct image *img; int r; uint64_t dec, hits; };

/* Read piece p of cluster c and check it; what it cost in decompressions
 * and cache hits goes to s->dec and s->hits. */
static void pre_read(struct pre *s, uint32_t c, uint32_t p)
{
    struct img_stats a, b;
    uint8_t *buf = io_alloc(PIECE), *want = io_alloc(CS);
    content(want, c, 500 + c);
    img_get_stats(s->img, &a);
    int r = img_read(s->img, buf, (uint64_t)c * CS + p * PIECE, PIECE);
    img_get_stats(s->img, &b);
    if (s->r == 0 && (r < 0 || memcmp(buf, want + p * PIECE, PIECE) != 0))
        s->r = r < 0 ? r : -EBADMSG;
    s->dec = b.clusters_decompressed - a.clusters_decompressed;
    s->hits = b.zcache_hits - a.zcache_hits;
    io_free(buf);
    io_free(want);
}

static void pre_main(void *arg)
{
    struct pre *s = arg;
    s->r = write_clusters(s->img, 4, 500);
    if (s->r)
        return;
    pre_read(s, 2, 5);          /* random: the prefix [0, 24k) */
    CHECK(s->dec == 1 && s->hits == 0);
    pre_read(s, 2, 2);          /* inside the prefix: a hit */
    CHECK(s->dec == 0 && s->hits == 1);
    pre_read(s, 2, 0);
    CHECK(s->dec == 0 && s->hits == 1);
    pre_read(s, 2, 9);          /* beyond it: the whole cluster */
    CHECK(s->dec == 1 && s->hits == 0);
    pre_read(s, 2, 13);
    CHECK(s->dec == 0 && s->hits == 1);
    pre_read(s, 2, 15);         /* ends where cluster 3 starts */
    CHECK(s->dec == 0 && s->hits == 1);
    pre_read(s, 3, 0);          /* sequential: the whole cluster at once */
    CHECK(s->dec == 1 && s->hits == 0);
    pre_read(s, 3, 12);
    CHECK(s->dec == 0 && s->hits == 1);
    pre_read(s, 0, 0);          /* random, at a cluster's start: all of it */
    CHECK(s->dec == 1 && s->hits == 0);
    pre_read(s, 0, 7);
    CHECK(s->dec == 0 && s->hits == 1);
    pre_read(s, 1, 3);          /* random: the prefix [0, 16k) */
    CHECK(s->dec == 1 && s->hits == 0);
    pre_read(s, 1, 7);          /* a second touch: all of it */
    CHECK(s->dec == 1 && s->hits == 0);
    pre_read(s, 1, 12);
    CHECK(s->dec == 0 && s->hits == 1);
}

static void prefix_reads(enum qcow2_compression type)
{
    make_type = type;
    bool made = make_image();
    make_type = QCOW2_COMP_ZLIB;
    if (!made)
        { CHECK(0); return; }
    struct pre s = { .img = open_img() };
    if (!s.img)
        { CHECK(0); return; }
    CHECK_EQ(to_qcow2(s.img)->h.compression_type, type);
    run_in_loop(pre_main, &s);
    CHECK_EQ(s.r, 0);
    CHECK_EQ(img_close(s.img), 0);
}

static void test_prefix_reads_zlib(void) { prefix_reads(QCOW2_COMP_ZLIB); }
static void test_prefix_reads_zstd(void) { prefix_reads(QCOW2_COMP_ZSTD); }

/* Fault injection: decompressing guest cluster 3 fails on the worker. */
struct fault { struct image *img; int bad_r, good_r, again_r; unsigned live; struct co_queue q; };

static void fault_good(void *arg)
{
    struct fault *f = arg;
    uint8_t *buf = io_alloc(CS), *want = io_alloc(CS);
    for (uint32_t c = 0; c < NCL && f->good_r == 0; c++) {
        if (c == 3)
            continue;
        content(want, c, 1 + c);
        int r = img_read(f->img, buf, (uint64_t)c * CS, CS);
        if (r < 0 || memcmp(buf, want, CS) != 0)
            f->good_r = r < 0 ? r : -EBADMSG;
    }
    io_free(buf);
    io_free(want);
    if (--f->live == 0)
        co_queue_wake_all(&f->q);
}

static void fault_bad(void *arg)
{
    struct fault *f = arg;
    uint8_t *buf = io_alloc(PIECE);
    f->bad_r = img_read(f->img, buf, 3 * CS + PIECE, PIECE);
    f->again_r = img_read(f->img, buf, 3 * CS, PIECE);
    io_free(buf);
    if (--f->live == 0)
        co_queue_wake_all(&f->q);
}

static void fault_main(void *arg)
{
    struct fault *f = arg;
    CHECK_EQ(write_clusters(f->img, NCL, 1), 0);
    f->live = 2;
    co_spawn(fault_bad, f);
    co_spawn(fault_good, f);
    while (f->live)
        co_queue_wait(&f->q);
}

static void test_fault_fails_that_read_only(void)
{
    if (!make_image())
        { CHECK(0); return; }
    setenv("UBLK_QCOW2_FAULT_DECOMPRESS", "0x30000", 1);
    struct fault f = { .img = open_img() };
    unsetenv("UBLK_QCOW2_FAULT_DECOMPRESS");
    if (!f.img)
        { CHECK(0); return; }
    run_in_loop(fault_main, &f);
    CHECK_EQ(f.bad_r, -EIO);
    CHECK_EQ(f.again_r, -EIO);      /* a failure is never cached */
    CHECK_EQ(f.good_r, 0);
    CHECK_EQ(img_close(f.img), 0);
}

/* The inline rule, made deterministic by its threshold: huge (every prefix
 * decompression after the first runs inline) or 0 (none does); whole
 * clusters always go to the pool.  Data and a failure are the same either
 * way. */
struct inl { struct image *img; int r, bad_r; };

static void inline_main(void *arg)
{
    struct inl *x = arg;
    x->r = write_clusters(x->img, NCL, 1);
    uint8_t *buf = io_alloc(CS), *want = io_alloc(CS);
    /* The second piece of each cluster: a random read's prefix. */
    for (uint32_t c = 0; c < NCL && x->r == 0; c++) {
        int r = img_read(x->img, buf, (uint64_t)c * CS + PIECE, PIECE);
        if (c == 3) {
            x->bad_r = r;
            continue;
        }
        content(want, c, 1 + c);
        if (r < 0 || memcmp(buf, want + PIECE, PIECE) != 0)
            x->r = r < 0 ? r : -EBADMSG;
    }
    /* A whole cluster: never inline. */
    if (x->r == 0)
        x->r = img_read(x->img, buf, 5 * CS, CS);
    io_free(buf);
    io_free(want);
}

static void inline_rule(const char *threshold, bool want_inline)
{
    if (!make_image())
        { CHECK(0); return; }
    setenv("UBLK_QCOW2_ZC_INLINE_NS", threshold, 1);
    setenv("UBLK_QCOW2_FAULT_DECOMPRESS", "0x30000", 1);
    struct inl x = { .img = open_img() };
    unsetenv("UBLK_QCOW2_FAULT_DECOMPRESS");
    unsetenv("UBLK_QCOW2_ZC_INLINE_NS");
    if (!x.img)
        { CHECK(0); return; }
    run_in_loop(inline_main, &x);
    CHECK_EQ(x.r, 0);
    CHECK_EQ(x.bad_r, -EIO);
    uint64_t n = qcow2_zc_inline_jobs(to_qcow2(x.img));
    if (want_inline)
        CHECK_EQ(n, (uint64_t)NCL - 1);   /* every prefix but the first (it measures) */
    else
        CHECK_EQ(n, 0);
    CHECK_EQ(img_close(x.img), 0);
}

static void test_cheap_decompression_inline(void) { inline_rule("1000000000000", true); }
static void test_inline_threshold_zero_uses_pool(void) { inline_rule("0", false); }

/* Loads taking turns: 8 whole-cluster compressed reads at once, with a
 * reader of plain data (guest cluster PLAIN_C, written uncompressed)
 * running alongside in pieces of plain_len bytes, or none. */
#define PLAIN_C (NCL + 1)

/* Let the other ready coroutines run, then go on. */
static void pass_turn(void)
{
    co_wake(co_self());
    co_yield();
}

struct turns { struct image *img; int r; unsigned live, plain_len; bool stop; struct co_queue q; uint32_t next; };

/* Read len bytes of guest cluster c (version vid) and check them. */
static void turns_read(struct turns *t, uint32_t c, uint32_t vid, uint32_t len)
{
    uint8_t *buf = io_alloc(CS), *want = io_alloc(CS);
    content(want, c, vid);
    int r = img_read(t->img, buf, (uint64_t)c * CS, len);
    if (r < 0 || memcmp(buf, want, len) != 0)
        t->r = r < 0 ? r : -EBADMSG;
    io_free(buf);
    io_free(want);
}

static void turns_done(struct turns *t)
{
    t->live--;
    co_queue_wake_all(&t->q);
}

static void turns_compressed(void *arg)
{
    struct turns *t = arg;
    uint32_t c = t->next++;
    turns_read(t, c, 1 + c, CS);
    turns_done(t);
}

static void turns_plain(void *arg)
{
    struct turns *t = arg;
    do {
        turns_read(t, PLAIN_C, 7, t->plain_len);
        pass_turn();
    } while (!t->stop && t->r == 0);
    turns_done(t);
}

static void turns_main(void *arg)
{
    struct turns *t = arg;
    uint8_t *plain = io_alloc(CS);
    content(plain, PLAIN_C, 7);
    t->r = write_clusters(t->img, 8, 1);
    if (t->r == 0)
        t->r = img_write(t->img, plain, (uint64_t)PLAIN_C * CS, CS, 0);
    io_free(plain);
    if (t->r < 0)
        return;
    t->q = (struct co_queue)CO_QUEUE_INIT;
    if (t->plain_len) {
        t->live++;
        co_spawn(turns_plain, t);
        pass_turn();    /* its first read is served before the loads start */
    }
    for (int i = 0; i < 8; i++) {
        t->live++;
        co_spawn(turns_compressed, t);
    }
    while (t->live > (t->plain_len ? 1u : 0u))
        co_queue_wait(&t->q);
    t->stop = true;
    while (t->live)
        co_queue_wait(&t->q);
}

static unsigned loads_at_once(unsigned plain_len)
{
    if (!make_image())
        { CHECK(0); return 0; }
    setenv("UBLK_QCOW2_ZC_PLAIN_WINDOW_NS", "60000000000", 1);
    struct turns t = { .img = open_img(), .plain_len = plain_len };
    unsetenv("UBLK_QCOW2_ZC_PLAIN_WINDOW_NS");
    if (!t.img)
        { CHECK(0); return 0; }
    run_in_loop(turns_main, &t);
    CHECK_EQ(t.r, 0);
    unsigned peak = qcow2_zc_loads_peak(to_qcow2(t.img), false);
    printf("#   plain reads of %u bytes: at most %u loads at once\n", plain_len, peak);
    CHECK_EQ(img_close(t.img), 0);
    return peak;
}

static void test_loads_take_turns_with_small_plain_reads(void)
{
    CHECK_EQ(loads_at_once(4096), 1);
}

static void test_loads_parallel_without_small_plain_reads(void)
{
    CHECK(loads_at_once(0) > 1);
    CHECK(loads_at_once(CS) > 1);     /* a 64 KiB plain read is a stream's, not a latency probe */
}

int main(void)
{
    snprintf(dir, sizeof(dir), "/tmp/uq-zcache.XXXXXX");
    if (!mkdtemp(dir))
        return 1;
    snprintf(path, sizeof(path), "%s/c.qcow2", dir);
    zero_fd = open("/dev/zero", O_RDONLY | O_CLOEXEC);
    RUN_TEST(test_piecewise_reads_decompress_once);
    RUN_TEST(test_prefix_reads_zlib);
    RUN_TEST(test_prefix_reads_zstd);
    RUN_TEST(test_rewrite_discard_reuse_under_reads);
    RUN_TEST(test_fault_fails_that_read_only);
    RUN_TEST(test_cheap_decompression_inline);
    RUN_TEST(test_inline_threshold_zero_uses_pool);
    RUN_TEST(test_loads_take_turns_with_small_plain_reads);
    RUN_TEST(test_loads_parallel_without_small_plain_reads);
    unlink(path);
    rmdir(dir);
    close(zero_fd);
    co_pool_release();
    UNIT_EXIT();
}
