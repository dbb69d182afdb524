/* Metadata cache: L2 tables and refcount blocks, in slices of up to 4 KiB.
 *
 * A slice is pinned (refs > 0) while a request uses it.  Loads are never
 * duplicated: a second request wanting a slice that is being loaded parks
 * on the slice's waiting list.  Dirty slices are written only by a flush
 * (which orders them; see qcow2_flush) or, for refcount blocks, on eviction. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

static uint32_t hash_off(const struct mcache *c, uint64_t off)
{
    uint64_t x = off >> c->slice_shift;     /* slice sizes are powers of two */
    x ^= x >> 17;
    x *= 0x9e3779b97f4a7c15ull;
    return (uint32_t)(x >> 32) & c->hash_mask;
}

static void lru_unlink(struct mslice *s)
{
    s->lru_prev->lru_next = s->lru_next;
    s->lru_next->lru_prev = s->lru_prev;
}

static void lru_push_recent(struct mcache *c, struct mslice *s)
{
    s->lru_prev = c->lru.lru_prev;
    s->lru_next = &c->lru;
    c->lru.lru_prev->lru_next = s;
    c->lru.lru_prev = s;
}

/* Make s the most recently used (no work when it is already). */
static void lru_touch(struct mcache *c, struct mslice *s)
{
    if (c->lru.lru_prev != s) {
        lru_unlink(s);
        lru_push_recent(c, s);
    }
}

int qcow2_cache_init(struct mcache *c, struct qcow2 *q, const char *name, bool is_l2,
                uint32_t slice_size, uint32_t nslices)
{
    memset(c, 0, sizeof(*c));
    c->q = q;
    c->name = name;
    c->is_l2 = is_l2;
    c->slice_size = slice_size;
    c->slice_shift = (uint32_t)__builtin_ctz(slice_size);
    c->nslices = nslices;
    uint32_t buckets = 1;
    while (buckets < nslices * 2)
        buckets <<= 1;
    c->hash_mask = buckets - 1;
    c->hash = calloc(buckets, sizeof(*c->hash));
    c->slices = calloc(nslices, sizeof(*c->slices));
    c->mem = io_alloc((size_t)slice_size * nslices);
    if (!c->hash || !c->slices)
        return -ENOMEM;
    c->lru.lru_next = c->lru.lru_prev = &c->lru;
    for (uint32_t i = 0; i < nslices; i++) {
        c->slices[i].data = c->mem + (size_t)i * slice_size;
        lru_push_recent(c, &c->slices[i]);
    }
    return 0;
}

void qcow2_cache_free(struct mcache *c)
{
    free(c->hash);
    free(c->slices);
    io_free(c->mem);
    memset(c, 0, sizeof(*c));
}

static struct mslice *lookup(struct mcache *c, uint64_t off)
{
    for (struct mslice *s = c->hash[hash_off(c, off)]; s; s = s->hnext)
        if (s->off == off)
            return s;
    return NULL;
}

static void hash_remove(struct mcache *c, struct mslice *s)
{
    struct mslice **pp = &c->hash[hash_off(c, s->off)];
    while (*pp != s)
        pp = &(*pp)->hnext;
    *pp = s->hnext;
    s->hnext = NULL;
    qcow2_map_changed(c->q);    /* the slot no longer holds that table */
    s->in_use = false;
    s->dirty = false;
}

static void hash_insert(struct mcache *c, struct mslice *s, uint64_t off)
{
    uint32_t h = hash_off(c, off);
    qcow2_map_changed(c->q);
    s->off = off;
    s->in_use = true;
    s->hnext = c->hash[h];
    c->hash[h] = s;
}

/* Write one dirty refcount slice back so its slot can be reused.  Refcount
 * blocks may reach the disk at any time: an early increment only leaks, and
 * decrements are applied in memory only once the unreferencing change is
 * durable.  The write uses a copy so changes made meanwhile stay dirty. */
static int write_back_refcount_slice(struct mcache *c, struct mslice *s)
{
    int ol = qcow2_ol_check(c->q, s->off, c->slice_size, OL_REFBLOCK, "a refcount block");
    if (ol < 0)
        return ol;
    uint8_t *copy = io_alloc(c->slice_size);
    memcpy(copy, s->data, c->slice_size);
    uint64_t off = s->off;
    s->dirty = false;
    s->refs++;
    ssize_t r = file_pwrite(&c->q->file, copy, c->slice_size, off, false);
    s->refs--;
    io_free(copy);
    if (r < 0) {
        s->dirty = true;
        return (int)r;
    }
    return 0;
}

int qcow2_cache_get(struct mcache *c, uint64_t off, struct mslice **out)
{
    for (;;) {
        struct mslice *s = lookup(c, off);
        if (s) {
            s->refs++;
            lru_touch(c, s);
            while (s->loading)
                co_queue_wait(&s->waiters);
            if (s->load_err) {
                int err = s->load_err;
                if (--s->refs == 0 && s->in_use && s->off == off) {
                    s->load_err = 0;
                    hash_remove(c, s);
                }
                return err;
            }
            stat_add(&c->hits, 1);
            *out = s;
            return 0;
        }

        /* Miss: take the least recently used unpinned slot. */
        struct mslice *victim = NULL;
        for (struct mslice *v = c->lru.lru_next; v != &c->lru; v = v->lru_next) {
            if (v->refs == 0 && !v->loading) {
                victim = v;
                break;
            }
        }
        if (!victim) {
            if (!co_in_coroutine())
                return -ENOMEM;
            co_queue_wait(&c->slot_waiters);
            continue;
        }
        if (victim->in_use && victim->dirty) {
            /* A dirty L2 slice may only reach the disk after the data and
             * refcounts it depends on: the full ordered flush does that. */
            int r = c->is_l2 ? qcow2_flush(c->q) : write_back_refcount_slice(c, victim);
            if (r < 0)
                return r;
            continue;   /* we may have yielded: look again */
        }
        if (victim->in_use)
            hash_remove(c, victim);
        stat_add(&c->misses, 1);
        hash_insert(c, victim, off);
        victim->refs = 1;
        victim->loading = true;
        victim->load_err = 0;
        lru_touch(c, victim);

        ssize_t n = file_pread(&c->q->file, victim->data, c->slice_size, off);
        if (n >= 0 && (size_t)n < c->slice_size)
            memset(victim->data + n, 0, c->slice_size - n);   /* past EOF reads as zeros */
        victim->loading = false;
        qcow2_map_changed(c->q);    /* new bytes in the slot */
        if (n < 0) {
            victim->load_err = (int)n;
            co_queue_wake_all(&victim->waiters);
            if (--victim->refs == 0) {
                victim->load_err = 0;
                hash_remove(c, victim);
            }
            return (int)n;
        }
        co_queue_wake_all(&victim->waiters);
        *out = victim;
        return 0;
    }
}

void qcow2_cache_touch(struct mcache *c, struct mslice *s)
{
    stat_add(&c->hits, 1);
    lru_touch(c, s);
}

void qcow2_cache_put(struct mcache *c, struct mslice *s)
{
    if (--s->refs == 0 && !co_queue_empty(&c->slot_waiters))
        co_queue_wake_all(&c->slot_waiters);
}

bool qcow2_cache_discard_range(struct mcache *c, uint64_t off, uint64_t len)
{
    bool busy = false;
    for (uint32_t i = 0; i < c->nslices; i++) {
        struct mslice *s = &c->slices[i];
        if (!s->in_use || s->off < off || s->off >= off + len)
            continue;
        if (s->loading || s->refs)
            busy = true;
        else
            hash_remove(c, s);
    }
    return busy;
}

bool qcow2_cache_has_dirty(struct mcache *c)
{
    for (uint32_t i = 0; i < c->nslices; i++)
        if (c->slices[i].in_use && c->slices[i].dirty)
            return true;
    return false;
}

int qcow2_cache_snapshot_dirty(struct mcache *c, struct mcopy **out, uint32_t *n)
{
    uint32_t count = 0;
    for (uint32_t i = 0; i < c->nslices; i++)
        if (c->slices[i].in_use && c->slices[i].dirty && !c->slices[i].loading)
            count++;
    *n = count;
    *out = NULL;
    if (!count)
        return 0;
    struct mcopy *copies = calloc(count, sizeof(*copies));
    if (!copies)
        return -ENOMEM;
    uint32_t k = 0;
    for (uint32_t i = 0; i < c->nslices; i++) {
        struct mslice *s = &c->slices[i];
        if (s->in_use && s->dirty && !s->loading) {
            /* Pinned until written, so it cannot be evicted and reloaded
             * from disk before this write lands. */
            s->refs++;
            copies[k].s = s;
            copies[k].data = io_alloc(c->slice_size);
            memcpy(copies[k].data, s->data, c->slice_size);
            s->dirty = false;
            k++;
        }
    }
    *out = copies;
    return 0;
}

int qcow2_cache_write_copies(struct mcache *c, struct mcopy *copies, uint32_t n, int ret)
{
    for (uint32_t i = 0; i < n; i++) {
        struct mslice *s = copies[i].s;
        if (ret == 0)
            ret = qcow2_ol_check(c->q, s->off, c->slice_size, c->is_l2 ? OL_ACTIVE_L2 : OL_REFBLOCK,
                           c->is_l2 ? "an L2 table" : "a refcount block");
        if (ret == 0) {
            ssize_t r = file_pwrite(&c->q->file, copies[i].data, c->slice_size, s->off, false);
            if (r < 0)
                ret = (int)r;
        }
        if (ret < 0)
            s->dirty = true;    /* not written: a later flush retries */
        io_free(copies[i].data);
        qcow2_cache_put(c, s);
    }
    free(copies);
    return ret;
}
