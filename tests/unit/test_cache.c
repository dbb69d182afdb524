/* The metadata cache (src/qcow2/cache.c): hits and misses, LRU eviction,
 * pinning, coroutines waiting for a slice being loaded or for a free slot,
 * dirty write-back, the flush's copies and discarding a range.
 *
 * Each test builds a small cache of its own over a real image's file: the
 * slices are 4 KiB at REG + i * 4 KiB, a region nothing of the image uses,
 * pre-filled so slice i holds the byte i + 1 throughout. */
#include <errno.h>

#include "engine.h"

#define SL 4096u
#define REG (4ull << 20)
#define NPAT 32

static struct qcow2 *q;

static uint64_t soff(int i) { return REG + (uint64_t)i * SL; }

/* Does s hold slice i as loaded from the file (or with byte v if v)? */
static bool holds(const struct mslice *s, int i, uint8_t v)
{
    uint8_t want = v ? v : (uint8_t)(i + 1);
    return s && s->in_use && s->off == soff(i) && s->data[0] == want && s->data[SL - 1] == want;
}

static bool cached(struct mcache *c, int i)
{
    for (uint32_t k = 0; k < c->nslices; k++)
        if (c->slices[k].in_use && c->slices[k].off == soff(i))
            return true;
    return false;
}

static struct mslice *get(struct mcache *c, int i)
{
    struct mslice *s = NULL;
    int r = qcow2_cache_get(c, soff(i), &s);
    if (r < 0) {
        printf("#   qcow2_cache_get(slice %d) = %d\n", i, r);
        unit_cur_failed = 1;
        return NULL;
    }
    return s;
}

static void touch(struct mcache *c, int i)
{
    struct mslice *s = get(c, i);
    if (s)
        qcow2_cache_put(c, s);
}

static void set_byte(struct mslice *s, uint8_t v)
{
    memset(s->data, v, SL);
    qcow2_cache_mark_dirty(s);
}

static uint8_t disk_byte(int i)
{
    uint8_t b[SL];
    fx_peek(q, soff(i), b, SL);
    for (uint32_t k = 1; k < SL; k++)
        if (b[k] != b[0])
            return 0xee;    /* torn: never a value the tests write */
    return b[0];
}

/* ---- tests -------------------------------------------------------------------- */

static struct mcache c;

static void co_hit_miss(void *arg)
{
    struct mslice *s = get(&c, 0);
    CHECK(holds(s, 0, 0));
    CHECK_EQ(s->refs, 1);
    CHECK_EQ(stat_get(&c.misses), 1);
    qcow2_cache_put(&c, s);
    CHECK_EQ(s->refs, 0);
    struct mslice *t = get(&c, 0);
    CHECK(t == s);
    CHECK_EQ(stat_get(&c.hits), 1);
    CHECK_EQ(stat_get(&c.misses), 1);
    qcow2_cache_put(&c, t);
}

static void test_cache_hit_miss(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_hit_miss, NULL), 0);
    qcow2_cache_free(&c);
}

/* The least recently used unpinned slot goes first; a hit refreshes. */
static void co_lru(void *arg)
{
    for (int i = 0; i < 4; i++)
        touch(&c, i);
    touch(&c, 0);               /* order now 1 2 3 0 */
    touch(&c, 4);               /* evicts 1 */
    CHECK(!cached(&c, 1));
    CHECK(cached(&c, 0) && cached(&c, 2) && cached(&c, 3) && cached(&c, 4));
    touch(&c, 5);               /* evicts 2: order 3 0 4 5 */
    CHECK(!cached(&c, 2));
    touch(&c, 2);               /* a miss again, evicts 3 */
    CHECK(!cached(&c, 3));
    CHECK(cached(&c, 0) && cached(&c, 4) && cached(&c, 5) && cached(&c, 2));
    CHECK_EQ(stat_get(&c.misses), 7);
    CHECK_EQ(stat_get(&c.hits), 1);
    struct mslice *s = get(&c, 2);
    CHECK(holds(s, 2, 0));      /* reloaded from the file */
    qcow2_cache_put(&c, s);
}

static void test_cache_lru_eviction(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_lru, NULL), 0);
    qcow2_cache_free(&c);
}

/* A pinned slice stays, however many others pass through. */
static struct mslice *pinned[4];
static void co_pinned(void *arg)
{
    pinned[0] = get(&c, 0);
    for (int i = 1; i < 20; i++)
        touch(&c, i);
    CHECK(holds(pinned[0], 0, 0));
    CHECK_EQ(pinned[0]->refs, 1);
    CHECK(cached(&c, 19) && cached(&c, 18) && cached(&c, 17));
    /* Three pinned: the one free slot takes every miss. */
    pinned[1] = get(&c, 17);
    pinned[2] = get(&c, 18);
    for (int i = 20; i < 30; i++)
        touch(&c, i);
    CHECK(holds(pinned[0], 0, 0) && holds(pinned[1], 17, 0) && holds(pinned[2], 18, 0));
    CHECK(cached(&c, 29) && !cached(&c, 28) && !cached(&c, 19));
    pinned[3] = get(&c, 29);
}

static void test_cache_pinned_not_evicted(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_pinned, NULL), 0);
    /* Every slot pinned: outside a coroutine nobody can wait for one. */
    struct mslice *s = NULL;
    CHECK_EQ(qcow2_cache_get(&c, soff(30), &s), -ENOMEM);
    CHECK(!cached(&c, 30));
    for (int i = 0; i < 4; i++)
        if (pinned[i])
            qcow2_cache_put(&c, pinned[i]);
    touch(&c, 30);              /* and now it fits (sync mode) */
    CHECK(cached(&c, 30) && !cached(&c, 0));
    qcow2_cache_free(&c);
}

/* ---- waiters ---- */
struct getter { struct mcache *c; int i; int r; bool done; struct mslice *s; };

static void co_getter(void *arg)
{
    struct getter *g = arg;
    g->r = qcow2_cache_get(g->c, soff(g->i), &g->s);
    g->done = true;
}

/* Two requests want a slice: the second waits for the first one's load
 * (one read, one miss, one hit), both get the same slice. */
static void co_load_waiter(void *arg)
{
    struct fx_rule *gate = fx_rule(FILE_OP_READ, soff(7), SL, 0, true);
    struct getter a = { &c, 7, 1, false, NULL }, b = { &c, 7, 1, false, NULL };
    co_spawn(co_getter, &a);
    co_spawn(co_getter, &b);
    fx_settle();
    CHECK_EQ(gate->hits, 1);
    CHECK_EQ(gate->parked, 1);
    CHECK(!a.done && !b.done);
    CHECK(cached(&c, 7));
    CHECK_EQ(stat_get(&c.misses), 1);
    for (uint32_t k = 0; k < c.nslices; k++) {
        if (c.slices[k].in_use && c.slices[k].off == soff(7)) {
            CHECK(c.slices[k].loading);
            CHECK_EQ(c.slices[k].refs, 2);
            CHECK(!co_queue_empty(&c.slices[k].waiters));
        }
    }
    fx_release(gate);
    fx_settle();
    CHECK(a.done && b.done);
    CHECK_EQ(a.r, 0);
    CHECK_EQ(b.r, 0);
    CHECK(a.s == b.s && holds(a.s, 7, 0));
    CHECK_EQ(gate->hits, 1);        /* loaded once */
    CHECK_EQ(stat_get(&c.misses), 1);
    CHECK_EQ(stat_get(&c.hits), 1);
    if (a.s) {
        CHECK_EQ(a.s->refs, 2);
        CHECK(!a.s->loading);
        qcow2_cache_put(&c, a.s);
        qcow2_cache_put(&c, b.s);
        CHECK_EQ(a.s->refs, 0);
    }
}

static void test_cache_wait_for_loading_slice(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_load_waiter, NULL), 0);
    fx_rules_clear();
    qcow2_cache_free(&c);
}

/* A load fails while another request waits for it: both see the error and
 * the slice is gone, so the next request reads it again. */
static void co_load_error(void *arg)
{
    struct fx_rule *gate = fx_rule(FILE_OP_READ, soff(8), SL, -EIO, true);
    struct getter a = { &c, 8, 1, false, NULL }, b = { &c, 8, 1, false, NULL };
    co_spawn(co_getter, &a);
    co_spawn(co_getter, &b);
    fx_settle();
    CHECK(!a.done && !b.done);
    fx_release(gate);
    fx_settle();
    CHECK(a.done && b.done);
    CHECK_EQ(a.r, -EIO);
    CHECK_EQ(b.r, -EIO);
    CHECK(!cached(&c, 8));
    for (uint32_t k = 0; k < c.nslices; k++) {
        CHECK_EQ(c.slices[k].refs, 0);
        CHECK_EQ(c.slices[k].load_err, 0);
    }
    gate->on = false;
    struct mslice *s = get(&c, 8);
    CHECK(holds(s, 8, 0));
    if (s)
        qcow2_cache_put(&c, s);
}

static void test_cache_load_error_wakes_waiters(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_load_error, NULL), 0);
    fx_rules_clear();
    qcow2_cache_free(&c);
}

/* Every slot pinned: requests wait for a free slot; each put wakes them,
 * one takes the slot and the other waits on. */
static void co_slot_waiters(void *arg)
{
    struct mslice *s0 = get(&c, 0), *s1 = get(&c, 1);
    struct getter a = { &c, 2, 1, false, NULL }, b = { &c, 3, 1, false, NULL };
    co_spawn(co_getter, &a);
    co_spawn(co_getter, &b);
    fx_settle();
    CHECK(!a.done && !b.done);
    CHECK(!co_queue_empty(&c.slot_waiters));
    qcow2_cache_put(&c, s0);
    fx_settle();
    CHECK(a.done && !b.done);
    CHECK_EQ(a.r, 0);
    CHECK(holds(a.s, 2, 0));
    CHECK(a.s == s0);                   /* the slot that was freed */
    CHECK(!cached(&c, 0) && holds(s1, 1, 0));
    CHECK(!co_queue_empty(&c.slot_waiters));
    qcow2_cache_put(&c, s1);
    fx_settle();
    CHECK(b.done);
    CHECK_EQ(b.r, 0);
    CHECK(holds(b.s, 3, 0));
    CHECK(holds(a.s, 2, 0));            /* still pinned by a */
    CHECK(co_queue_empty(&c.slot_waiters));
    if (a.s)
        qcow2_cache_put(&c, a.s);
    if (b.s)
        qcow2_cache_put(&c, b.s);
}

static void test_cache_wait_for_free_slot(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 2), 0);
    CHECK_EQ(fx_run(co_slot_waiters, NULL), 0);
    qcow2_cache_free(&c);
}

/* ---- dirty slices ---- */

/* A dirty refcount slice is written back when its slot is needed, once. */
static void co_rc_writeback(void *arg)
{
    struct fx_rule *w = fx_rule(FILE_OP_WRITE, soff(0), SL, 0, false);
    struct mslice *s = get(&c, 0);
    set_byte(s, 0xab);
    qcow2_cache_put(&c, s);
    CHECK(qcow2_cache_has_dirty(&c));
    touch(&c, 1);
    CHECK_EQ(w->hits, 0);
    CHECK_EQ(disk_byte(0), 1);
    touch(&c, 2);               /* evicts 0: written first */
    CHECK_EQ(w->hits, 1);
    CHECK_EQ(disk_byte(0), 0xab);
    CHECK(!cached(&c, 0));
    CHECK(!qcow2_cache_has_dirty(&c));
    s = get(&c, 0);             /* reads back what was written */
    CHECK(holds(s, 0, 0xab));
    qcow2_cache_put(&c, s);
    CHECK_EQ(w->hits, 1);
}

static void test_cache_dirty_refcount_slice_written_on_eviction(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 2), 0);
    CHECK_EQ(fx_run(co_rc_writeback, NULL), 0);
    fx_rules_clear();
    qcow2_cache_free(&c);
}

/* A dirty L2 slice is never written alone: evicting it runs the ordered
 * flush (which syncs before writing L2 tables). */
static void co_l2_evict(void *arg)
{
    struct mcache *l2 = &q->l2c;
    struct mslice *s = get(l2, 0);
    set_byte(s, 0xcd);
    qcow2_cache_put(l2, s);
    touch(l2, 1);
    unsigned syncs = fx_ops[FILE_OP_SYNC];
    touch(l2, 2);
    CHECK(fx_ops[FILE_OP_SYNC] > syncs);
    CHECK_EQ(disk_byte(0), 0xcd);
    CHECK(!cached(l2, 0) && cached(l2, 1) && cached(l2, 2));
    CHECK(!qcow2_cache_has_dirty(l2));
}

static void test_cache_dirty_l2_slice_evicted_by_flush(void)
{
    /* A two-slot L2 cache in place of the image's own. */
    qcow2_cache_free(&q->l2c);
    CHECK_EQ(qcow2_cache_init(&q->l2c, q, "L2", true, SL, 2), 0);
    fx_rule(FILE_OP_WRITE, 0, 0, 0, false);     /* hooks on: count operations */
    CHECK_EQ(fx_run(co_l2_evict, NULL), 0);
    fx_rules_clear();
}

/* The flush writes copies taken at one instant: a change made after the
 * snapshot stays dirty for the next flush; the copied slices stay pinned
 * (never evicted, never discarded) until written. */
static void co_snapshot(void *arg)
{
    struct mslice *s0 = get(&c, 0), *s1 = get(&c, 1), *s2 = get(&c, 2);
    set_byte(s0, 0x11);
    set_byte(s1, 0x22);
    qcow2_cache_put(&c, s0);
    qcow2_cache_put(&c, s1);
    qcow2_cache_put(&c, s2);
    struct mcopy *copies = NULL;
    uint32_t n = 0;
    CHECK_EQ(qcow2_cache_snapshot_dirty(&c, &copies, &n), 0);
    CHECK_EQ(n, 2);
    CHECK(!s0->dirty && !s1->dirty && !qcow2_cache_has_dirty(&c));
    CHECK_EQ(s0->refs, 1);
    CHECK_EQ(s1->refs, 1);
    CHECK_EQ(s2->refs, 0);
    /* A request changes slice 0 after the snapshot. */
    s0 = get(&c, 0);
    set_byte(s0, 0x33);
    qcow2_cache_put(&c, s0);
    /* Pinned by the flush: others cycle through the two free slots. */
    for (int i = 3; i < 8; i++)
        touch(&c, i);
    CHECK(holds(s0, 0, 0x33) && holds(s1, 1, 0x22) && !cached(&c, 2));
    CHECK(qcow2_cache_discard_range(&c, soff(0), 2 * SL));
    CHECK(cached(&c, 0) && cached(&c, 1));
    CHECK_EQ(qcow2_cache_write_copies(&c, copies, n, 0), 0);
    CHECK_EQ(disk_byte(0), 0x11);       /* the copy, not the later change */
    CHECK_EQ(disk_byte(1), 0x22);
    CHECK(s0->dirty && !s1->dirty);
    CHECK_EQ(s0->refs, 0);
    CHECK_EQ(s1->refs, 0);
    /* The next flush writes the later change. */
    CHECK_EQ(qcow2_cache_snapshot_dirty(&c, &copies, &n), 0);
    CHECK_EQ(n, 1);
    CHECK_EQ(qcow2_cache_write_copies(&c, copies, n, 0), 0);
    CHECK_EQ(disk_byte(0), 0x33);
    CHECK(!qcow2_cache_has_dirty(&c));
    /* Nothing dirty: no copies. */
    CHECK_EQ(qcow2_cache_snapshot_dirty(&c, &copies, &n), 0);
    CHECK_EQ(n, 0);
    CHECK(copies == NULL);
}

static void test_cache_snapshot_and_write_copies(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_snapshot, NULL), 0);
    qcow2_cache_free(&c);
}

/* A failed write leaves that slice and every later one dirty (a later
 * flush retries); an error passed in writes nothing and re-marks all. */
static void co_write_error(void *arg)
{
    struct mslice *s[3];
    for (int i = 0; i < 3; i++) {
        s[i] = get(&c, 10 + i);
        set_byte(s[i], (uint8_t)(0x40 + i));
        qcow2_cache_put(&c, s[i]);
    }
    struct fx_rule *fail = fx_rule(FILE_OP_WRITE, soff(11), SL, -EIO, false);
    struct mcopy *copies;
    uint32_t n;
    CHECK_EQ(qcow2_cache_snapshot_dirty(&c, &copies, &n), 0);
    CHECK_EQ(n, 3);
    CHECK(copies[0].s == s[0] && copies[1].s == s[1] && copies[2].s == s[2]);  /* slot order */
    CHECK_EQ(qcow2_cache_write_copies(&c, copies, n, 0), -EIO);
    CHECK_EQ(fail->hits, 1);
    CHECK_EQ(disk_byte(10), 0x40);
    CHECK_EQ(disk_byte(11), 11 + 1);
    CHECK_EQ(disk_byte(12), 12 + 1);    /* not attempted after the error */
    CHECK(!s[0]->dirty && s[1]->dirty && s[2]->dirty);
    for (int i = 0; i < 3; i++)
        CHECK_EQ(s[i]->refs, 0);

    /* An earlier step of the flush failed: nothing is written. */
    unsigned writes = fx_ops[FILE_OP_WRITE];
    CHECK_EQ(qcow2_cache_snapshot_dirty(&c, &copies, &n), 0);
    CHECK_EQ(n, 2);
    CHECK_EQ(qcow2_cache_write_copies(&c, copies, n, -EIO), -EIO);
    CHECK_EQ(fx_ops[FILE_OP_WRITE], writes);
    CHECK(s[1]->dirty && s[2]->dirty);

    /* The fault is gone: the retry writes both. */
    fail->on = false;
    CHECK_EQ(qcow2_cache_snapshot_dirty(&c, &copies, &n), 0);
    CHECK_EQ(n, 2);
    CHECK_EQ(qcow2_cache_write_copies(&c, copies, n, 0), 0);
    CHECK_EQ(disk_byte(11), 0x41);
    CHECK_EQ(disk_byte(12), 0x42);
    CHECK(!qcow2_cache_has_dirty(&c));
}

static void test_cache_write_copies_error_marks_dirty_again(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_write_error, NULL), 0);
    fx_rules_clear();
    qcow2_cache_free(&c);
}

/* Discarding a range drops its unpinned slices (dirty or not), keeps and
 * reports pinned or loading ones, and leaves the rest alone. */
static void co_discard(void *arg)
{
    touch(&c, 0);
    struct mslice *s1 = get(&c, 1);
    set_byte(s1, 0x55);
    qcow2_cache_put(&c, s1);
    struct mslice *s2 = get(&c, 2);
    touch(&c, 5);
    CHECK(qcow2_cache_discard_range(&c, soff(0), 3 * SL));      /* 2 is pinned */
    CHECK(!cached(&c, 0) && !cached(&c, 1) && cached(&c, 2) && cached(&c, 5));
    CHECK(!qcow2_cache_has_dirty(&c));      /* a freed table's changes are moot */
    CHECK(disk_byte(1) != 0x55);          /* never written */
    qcow2_cache_put(&c, s2);
    CHECK(!qcow2_cache_discard_range(&c, soff(0), 3 * SL));
    CHECK(!cached(&c, 2) && cached(&c, 5));
    CHECK(!qcow2_cache_discard_range(&c, soff(100), 1 << 20));  /* nothing there */

    /* A slice being loaded cannot go either. */
    struct fx_rule *gate = fx_rule(FILE_OP_READ, soff(6), SL, 0, true);
    struct getter g = { &c, 6, 1, false, NULL };
    co_spawn(co_getter, &g);
    fx_settle();
    CHECK(!g.done);
    CHECK(qcow2_cache_discard_range(&c, soff(6), SL));
    fx_release(gate);
    fx_settle();
    CHECK(g.done && holds(g.s, 6, 0));
    if (g.s)
        qcow2_cache_put(&c, g.s);
    CHECK(!qcow2_cache_discard_range(&c, soff(6), SL));
    CHECK(!cached(&c, 6));
}

static void test_cache_discard_range(void)
{
    CHECK_EQ(qcow2_cache_init(&c, q, "test", false, SL, 4), 0);
    CHECK_EQ(fx_run(co_discard, NULL), 0);
    fx_rules_clear();
    qcow2_cache_free(&c);
}

int main(void)
{
    fx_setup("test_cache");
    if (fx_create("c.qcow2", 64 << 20, 0, 0, false, NULL, NULL) < 0)
        return 1;
    uint8_t pat[SL];
    for (int i = 0; i < NPAT; i++) {
        memset(pat, i + 1, SL);
        fx_poke("c.qcow2", soff(i), pat, SL);
    }
    q = fx_open("c.qcow2");
    if (!q)
        return 1;
    RUN_TEST(test_cache_hit_miss);
    RUN_TEST(test_cache_lru_eviction);
    RUN_TEST(test_cache_pinned_not_evicted);
    RUN_TEST(test_cache_wait_for_loading_slice);
    RUN_TEST(test_cache_load_error_wakes_waiters);
    RUN_TEST(test_cache_wait_for_free_slot);
    RUN_TEST(test_cache_dirty_refcount_slice_written_on_eviction);
    RUN_TEST(test_cache_snapshot_and_write_copies);
    RUN_TEST(test_cache_write_copies_error_marks_dirty_again);
    RUN_TEST(test_cache_discard_range);
    RUN_TEST(test_cache_dirty_l2_slice_evicted_by_flush);    /* last: replaces the image's L2 cache */
    img_close(&q->img);
    fx_teardown();
    UNIT_EXIT();
}
