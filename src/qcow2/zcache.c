/* Compressed clusters on the read side: a bounded cache of recently
 * decompressed clusters, and (de)compression on the worker pool.
 *
 * Key: the host descriptor (byte offset and length of the compressed data),
 * never the guest offset: a guest cluster's mapping may change at any time,
 * the bytes at a host descriptor change only once those host clusters were
 * freed and reused (or a compressed write placed new data there).  Every
 * such path calls qcow2_zc_invalidate first:
 *   - refcount.c, when a cluster's refcount reaches 0 (free: may be reused);
 *   - cluster.c, when an L2 entry lets a compressed cluster go (rewrite,
 *     discard, write-zeroes): the data stays valid for readers already in
 *     flight (rule 5 keeps the clusters until they finish), but nothing new
 *     should find it;
 *   - zwrite.c, before compressed data is placed at a host range.
 * An entry being decompressed when its range is invalidated is taken out of
 * the hash at once: its waiters (requests that started before, entitled to
 * the old bytes) still get the data, but it is never published, so no
 * request that starts later can see it.
 *
 * Only the engine's thread touches the cache (no locks); workers see only a
 * job's own buffers.  Partial decompression: a read of [a, b) needs only
 * the prefix [0, b), and inflating costs about linearly in the output, so a
 * random read decompresses only that prefix (half a cluster on average).
 * The entry remembers how much is valid; a read beyond it is a miss.  The
 * whole cluster is decompressed when the reader is sequential (the read
 * continues where a recent one ended, see want_for) or touches a cluster a
 * second time, so sequential readers decompress each cluster once and the
 * reads after it hit the cache. */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "io/clock.h"
#include "io/log.h"
#include "qcow2/internal.h"

#define ZC_MIN_ENTRIES 4u
#define ZC_STREAMS 16u              /* sequential readers recognised at once */
/* A prefix decompression (a random read) expected to take less than this
 * runs on the engine thread: handing a job to a worker and back costs the engine about 8 us of
 * CPU (two wake-ups), more than a small zstd inflate itself (64 KiB of the
 * bench's data: ~5 us), and the other requests wait no longer than they
 * would for the hand-over.  zlib (~100 us a cluster) stays on the pool. */
#define ZC_INLINE_NS 10000u
/* Compressed clusters loaded (read and decompressed) at once while small
 * plain reads are being served (one within the last ZC_PLAIN_WINDOW_NS).
 * A compressed load costs a whole cluster's compressed bytes at the disk
 * (~half a cluster), a worker's decompression and the engine's hand-overs;
 * a stream of them at depth 32 put a millisecond of disk queue in front of
 * a 4 KiB read (p99 1,270 us vs 118 idle) and, with the queue capped at 2
 * reads, still kept the engine thread saturated (p99 ~2.6x idle; capped at
 * 2 loads ~2.0-2.4x, at 1 load 1.7-2.0x on disk and RAM disk, measured on
 * this 2-CPU machine).  The stream still gets about 250 MB/s then.  Without
 * small plain reads around (a random compressed workload, a sequential copy
 * through partly rewritten clusters, convert) there is no cap: the disk's
 * depth is what makes its bandwidth. */
#define ZC_SHARED_LOADS 1u
#define ZC_PLAIN_SMALL (16u << 10)  /* plain reads up to this count: random I/O, metadata */
#define ZC_PLAIN_WINDOW_NS 1000000u
#define ZC_ALIGN 512u               /* compressed data is read in aligned spans of this */

struct zc_entry {
    uint64_t coff, nbytes;          /* key: the compressed data's host range */
    uint8_t *data;                  /* cluster_size bytes */
    uint32_t valid;                 /* bytes valid from the start (when loaded) */
    uint32_t target;                /* bytes being decompressed (while loading) */
    uint32_t pins;                  /* requests waiting for it to load */
    int err;                        /* the load failed: waiters fail with it */
    bool loading, hashed;
    struct co_queue waiters;
    struct zc_entry *hnext;
    struct zc_entry *prev, *next;   /* LRU (hashed entries only) */
};

struct zcache {
    uint32_t max, count;            /* entries allowed, entries existing */
    struct zc_entry **hash;         /* by the host cluster the data starts in */
    uint32_t hash_mask;
    struct zc_entry lru;            /* sentinel: lru.next is the least recently used */
    uint64_t ends[ZC_STREAMS];      /* guest offsets where recent reads ended, + 1 (0: none) */
    uint32_t ends_next;
    uint64_t *faults;               /* fault injection: guest clusters whose decompression fails */
    size_t nfaults;
    uint64_t ns_per_kib;            /* recent decompression cost (EWMA; 0: none measured yet) */
    uint64_t inline_ns;             /* ZC_INLINE_NS (tests: UBLK_QCOW2_ZC_INLINE_NS) */
    uint64_t inline_jobs;
    /* Sharing the machine with small plain reads (ZC_SHARED_LOADS). */
    uint64_t plain_reads;           /* counted by qcow2_zc_note_plain_read */
    uint64_t plain_seen, plain_seen_ns, plain_window_ns;
    unsigned loads, loads_peak;     /* compressed clusters being loaded (now, at most) */
    struct co_queue load_turn;      /* loads waiting for their turn */
    stat_counter hits, misses, decompressed;
};

struct zjob {
    struct wp_job wp;
    enum qcow2_compression type;
    const uint8_t *in;
    size_t in_len;
    uint8_t *out;
    size_t out_len, want;
    uint8_t *copy_to;               /* the read's buffer: gets out[copy_off, +copy_len) */
    size_t copy_off, copy_len;
    bool fail;                      /* fault injection */
    ssize_t result;
    uint64_t ns;                    /* how long the decompression took */
    bool compress;
};

static void zjob_run(struct wp_job *w)
{
    struct zjob *j = (struct zjob *)w;
    if (j->fail)
        j->result = -EIO;
    else if (j->compress)
        j->result = qcow2_compress(j->type, j->in, j->in_len, j->out, j->out_len);
    else {
        uint64_t t0 = now_ns();
        j->result = qcow2_decompress_prefix(j->type, j->in, j->in_len, j->out, j->out_len, j->want);
        j->ns = now_ns() - t0;
    }
    /* The reader's copy too: a 64 KiB memcpy is a good part of what a
     * compressed read costs the engine thread, where every other request
     * waits for it.  The buffer is the parked reader's alone. */
    if (!j->compress && j->result > 0 && j->copy_len)
        memcpy(j->copy_to, j->out + j->copy_off, j->copy_len);
}

static void parse_test_env(struct zcache *z)
{
    /* UBLK_QCOW2_ZC_INLINE_NS=N: the inline threshold (tests: 0 never,
     * a huge N always once a cost is known). */
    const char *v = getenv("UBLK_QCOW2_ZC_INLINE_NS");
    z->inline_ns = v && *v ? strtoull(v, NULL, 0) : ZC_INLINE_NS;
    /* UBLK_QCOW2_ZC_PLAIN_WINDOW_NS=N: how long a small plain read keeps
     * loads taking turns (tests: long, so a slow run cannot fall out of it). */
    v = getenv("UBLK_QCOW2_ZC_PLAIN_WINDOW_NS");
    z->plain_window_ns = v && *v ? strtoull(v, NULL, 0) : ZC_PLAIN_WINDOW_NS;
}

static void parse_faults(struct zcache *z)
{
    /* UBLK_QCOW2_FAULT_DECOMPRESS=OFF[,OFF...]: decompressing the guest
     * cluster holding any OFF fails on the worker (tests). */
    const char *env = getenv("UBLK_QCOW2_FAULT_DECOMPRESS");
    if (!env || !*env)
        return;
    for (const char *p = env; *p;) {
        char *end;
        unsigned long long v = strtoull(p, &end, 0);
        if (end == p)
            break;
        uint64_t *n = realloc(z->faults, (z->nfaults + 1) * sizeof(*n));
        if (!n)
            break;
        z->faults = n;
        z->faults[z->nfaults++] = v;
        p = *end == ',' ? end + 1 : end;
    }
}

int qcow2_zc_init(struct qcow2 *q, uint64_t bytes)
{
    int r = wp_port_init(&q->port);
    if (r < 0)
        return r;
    struct zcache *z = calloc(1, sizeof(*z));
    if (!z)
        return -ENOMEM;
    uint64_t n = bytes / cl_size(q);
    if (n < ZC_MIN_ENTRIES)
        n = ZC_MIN_ENTRIES;
    if (n > (1u << 20))
        n = 1u << 20;
    z->max = (uint32_t)n;
    uint32_t buckets = 16;
    while (buckets < z->max * 2)
        buckets <<= 1;
    z->hash = calloc(buckets, sizeof(*z->hash));
    if (!z->hash) {
        free(z);
        return -ENOMEM;
    }
    z->hash_mask = buckets - 1;
    z->lru.prev = z->lru.next = &z->lru;
    parse_faults(z);
    parse_test_env(z);
    z->load_turn = (struct co_queue)CO_QUEUE_INIT;
    q->zc = z;
    return 0;
}

static void entry_free(struct zcache *z, struct zc_entry *e)
{
    free(e->data);
    free(e);
    z->count--;
}

void qcow2_zc_free(struct qcow2 *q)
{
    struct zcache *z = q->zc;
    if (z) {
        for (uint32_t b = 0; b <= z->hash_mask; b++)
            while (z->hash[b]) {
                struct zc_entry *e = z->hash[b];
                z->hash[b] = e->hnext;
                entry_free(z, e);
            }
        free(z->hash);
        free(z->faults);
        free(z);
        q->zc = NULL;
    }
    if (q->port.mb)
        wp_port_destroy(&q->port);
}

static inline uint32_t bucket(const struct qcow2 *q, const struct zcache *z, uint64_t host_cluster)
{
    (void)q;
    return (uint32_t)((host_cluster * 0x9e3779b97f4a7c15ull) >> 32) & z->hash_mask;
}

static void lru_unlink(struct zc_entry *e)
{
    e->prev->next = e->next;
    e->next->prev = e->prev;
    e->prev = e->next = e;
}

static void lru_push(struct zcache *z, struct zc_entry *e)
{
    e->prev = z->lru.prev;
    e->next = &z->lru;
    z->lru.prev->next = e;
    z->lru.prev = e;
}

/* Take e out of the hash and the LRU: no lookup finds it any more.  Freed
 * now if nobody uses it, else by the last user. */
static void unhash(struct qcow2 *q, struct zcache *z, struct zc_entry *e)
{
    struct zc_entry **pp = &z->hash[bucket(q, z, e->coff >> cl_bits(q))];
    while (*pp && *pp != e)
        pp = &(*pp)->hnext;
    if (*pp)
        *pp = e->hnext;
    e->hashed = false;
    lru_unlink(e);
    if (!e->loading && !e->pins)
        entry_free(z, e);
}

void qcow2_zc_invalidate(struct qcow2 *q, uint64_t off, uint64_t len)
{
    struct zcache *z = q->zc;
    if (!z || !z->count || !len)
        return;
    /* Compressed data is shorter than a cluster plus a sector, so an entry
     * overlapping the range starts at most one host cluster before it. */
    uint64_t first = off >> cl_bits(q), last = (off + len - 1) >> cl_bits(q);
    if (first)
        first--;
    if (last - first > z->hash_mask) {
        /* A huge range: walk every entry instead of every cluster. */
        for (uint32_t b = 0; b <= z->hash_mask; b++)
            for (struct zc_entry *e = z->hash[b], *n; e; e = n) {
                n = e->hnext;
                if (e->coff < off + len && off < e->coff + e->nbytes)
                    unhash(q, z, e);
            }
        return;
    }
    for (uint64_t c = first; c <= last; c++)
        for (struct zc_entry *e = z->hash[bucket(q, z, c)], *n; e; e = n) {
            n = e->hnext;
            if ((e->coff >> cl_bits(q)) == c && e->coff < off + len && off < e->coff + e->nbytes)
                unhash(q, z, e);
        }
}

static struct zc_entry *lookup(struct qcow2 *q, struct zcache *z, uint64_t coff, uint64_t nbytes)
{
    for (struct zc_entry *e = z->hash[bucket(q, z, coff >> cl_bits(q))]; e; e = e->hnext)
        if (e->coff == coff && e->nbytes == nbytes)
            return e;
    return NULL;
}

/* A new entry for (coff, nbytes), loading; NULL when every entry is busy
 * (the read then decompresses into a buffer of its own). */
static struct zc_entry *entry_new(struct qcow2 *q, struct zcache *z, uint64_t coff, uint64_t nbytes)
{
    struct zc_entry *e = NULL;
    if (z->count >= z->max) {
        /* Evict the least recently used entry nobody is using. */
        for (struct zc_entry *v = z->lru.next; v != &z->lru; v = v->next)
            if (!v->loading && !v->pins) {
                e = v;
                break;
            }
        if (!e)
            return NULL;
        uint8_t *data = e->data;
        e->data = NULL;     /* keep the buffer for the new entry */
        e->loading = true;  /* not freed by unhash */
        unhash(q, z, e);
        memset(e, 0, sizeof(*e));
        e->data = data;
    } else {
        e = calloc(1, sizeof(*e));
        if (!e)
            return NULL;
        e->data = malloc(cl_size(q));
        if (!e->data) {
            free(e);
            return NULL;
        }
        z->count++;
    }
    e->coff = coff;
    e->nbytes = nbytes;
    e->loading = true;
    e->hashed = true;
    e->waiters = (struct co_queue)CO_QUEUE_INIT;
    uint32_t b = bucket(q, z, coff >> cl_bits(q));
    e->hnext = z->hash[b];
    z->hash[b] = e;
    lru_push(z, e);
    return e;
}

static bool fault_at(const struct zcache *z, const struct qcow2 *q, uint64_t guest_off)
{
    for (size_t i = 0; i < z->nfaults; i++)
        if (start_of_cluster(q, z->faults[i]) == start_of_cluster(q, guest_off))
            return true;
    return false;
}

/* Run a decompression job inline when it is expected to be cheaper than
 * the hand-over to a worker (ZC_INLINE_NS), else on the pool; learn its
 * cost either way.  The estimate follows the image's data (wall time: a
 * worker's preemption makes it larger, which only errs towards the pool). */
static void run_decompress(struct zcache *z, struct wp_port *port, struct zjob *j)
{
    uint64_t kib = (j->want + 1023) / 1024;
    /* Only prefixes (random reads): a whole cluster is a sequential
     * reader's, whose next reads wait for it anyway while the engine has
     * other readers' I/O to issue; inline, it held zstd sequential 4k
     * reads at 172-212k/s against 302-315k on the pool. */
    if (z && j->want < j->out_len && z->ns_per_kib && z->ns_per_kib * kib <= z->inline_ns) {
        zjob_run(&j->wp);
        z->inline_jobs++;
    } else
        wp_run(port, &j->wp);
    if (!z)
        return;
    stat_add(&z->decompressed, 1);
    if (j->result > 0 && j->ns) {
        uint64_t out_kib = ((uint64_t)j->result + 1023) / 1024;
        uint64_t cost = j->ns / (out_kib ? out_kib : 1);
        z->ns_per_kib = z->ns_per_kib ? (z->ns_per_kib * 7 + cost) / 8 : cost;
    }
}

void qcow2_zc_note_plain_read(struct qcow2 *q, uint64_t len)
{
    if (q->zc && len <= ZC_PLAIN_SMALL)
        q->zc->plain_reads++;
}

/* Were small plain reads served lately (since the last look, or within the
 * window)? */
static bool plain_reads_active(struct zcache *z)
{
    uint64_t now = now_ns();
    if (z->plain_reads != z->plain_seen) {
        z->plain_seen = z->plain_reads;
        z->plain_seen_ns = now;
        return true;
    }
    return now - z->plain_seen_ns < z->plain_window_ns;
}

/* A turn to load one compressed cluster (see ZC_SHARED_LOADS). */
static void load_turn_take(struct zcache *z)
{
    if (!z)
        return;
    while (z->loads >= ZC_SHARED_LOADS && co_in_coroutine() && plain_reads_active(z))
        co_queue_wait(&z->load_turn);
    if (++z->loads > z->loads_peak)
        z->loads_peak = z->loads;
}

static void load_turn_give(struct zcache *z)
{
    if (!z)
        return;
    z->loads--;
    co_queue_wake_one(&z->load_turn);
}

/* Read the compressed bytes and decompress the first want bytes into out,
 * then copy out[from, from+len) into buf (on the pool).  The bytes of out
 * valid from its start (want, or the whole cluster), or -errno (logged). */
static int load(struct qcow2 *q, uint64_t coff, uint64_t nbytes, uint64_t guest_off,
                uint8_t *out, size_t want, uint64_t from, uint64_t len, uint8_t *buf)
{
    uint64_t cs = cl_size(q);
    /* The 512-byte-aligned span around the compressed bytes (the file's
     * O_DIRECT alignment), into an aligned buffer: an unaligned read would
     * go through a bounce buffer and a copy on the engine thread.  Not 4 KiB:
     * random compressed reads are bound by the disk's bandwidth, and 4 KiB
     * spans read ~10% more bytes (26k vs 30-36k zstd reads/s here). */
    uint64_t head = coff & (ZC_ALIGN - 1), span = (head + nbytes + ZC_ALIGN - 1) & ~(uint64_t)(ZC_ALIGN - 1);
    void *mem;
    if (posix_memalign(&mem, ZC_ALIGN, span) != 0)
        return -ENOMEM;
    uint8_t *in = mem;
    /* The turn covers the decompression too: that is what keeps the
     * engine and the CPUs free for the plain reads. */
    load_turn_take(q->zc);
    ssize_t n = file_pread_any(&q->file, in, span, coff - head);
    int r = (int)(n < 0 ? n : 0);
    if (r == 0) {
        /* Short at the end of the file: what is there (the stream judges). */
        uint64_t got = (uint64_t)n > head ? (uint64_t)n - head : 0;
        size_t in_len = (size_t)(got < nbytes ? got : nbytes);
        struct zjob j = {
            .wp.fn = zjob_run, .type = q->h.compression_type, .in = in + head, .in_len = in_len,
            .out = out, .out_len = cs, .want = want,
            .copy_to = buf, .copy_off = (size_t)from, .copy_len = (size_t)len,
            .fail = q->zc && q->zc->nfaults && fault_at(q->zc, q, guest_off),
        };
        run_decompress(q->zc, &q->port, &j);
        r = (int)j.result;
        if (r < 0)
            uq_error("%s: compressed cluster at 0x%llx (guest offset 0x%llx) does not decompress",
                     q->img.path, (unsigned long long)coff, (unsigned long long)start_of_cluster(q, guest_off));
    }
    load_turn_give(q->zc);
    free(in);
    return r;
}

/* Does a read at guest_off continue one that ended there recently (a
 * sequential reader)?  Then note where this one ends, for the next. */
static bool continues(struct zcache *z, uint64_t guest_off, uint64_t len)
{
    bool seq = false;
    for (uint32_t i = 0; i < ZC_STREAMS && !seq; i++)
        seq = z->ends[i] == guest_off + 1;
    z->ends[z->ends_next++ % ZC_STREAMS] = guest_off + len + 1;
    return seq;
}

/* How much of the cluster to decompress for a read of [in, in+len): all of
 * it for a sequential reader (it reads the rest next), for a read from the
 * cluster's first byte (several sequential readers at once, e.g. a deep
 * queue of interleaved jobs, defeat `continues`: with prefixes there the
 * engine's 4k sequential reads cost 4x the CPU), or when the cluster was
 * touched before (its prefix was too short: locality, do not creep up on
 * it 4 KiB at a time); else the prefix up to the read's end, rounded to
 * 4 KiB so that small reads of one page share it. */
static size_t want_for(const struct qcow2 *q, uint64_t in, uint64_t len, bool whole)
{
    uint64_t cs = cl_size(q), need = (in + len + 4095) & ~4095ull;
    return whole || in == 0 || need >= cs ? cs : need;
}

int qcow2_zc_read(struct qcow2 *q, uint64_t coff, uint64_t nbytes, uint64_t guest_off,
                  uint64_t in, uint64_t len, uint8_t *buf)
{
    struct zcache *z = q->zc;
    uint64_t cs = cl_size(q);
    bool whole = z && continues(z, guest_off, len);
    for (;;) {
        struct zc_entry *e = z ? lookup(q, z, coff, nbytes) : NULL;
        if (e && !e->loading && e->valid >= in + len) {
            stat_add(&z->hits, 1);
            memcpy(buf, e->data + in, len);
            lru_unlink(e);
            lru_push(z, e);
            return 0;
        }
        if (e && e->loading && e->target >= in + len) {
            /* Someone is decompressing what we need: wait for it. */
            stat_add(&z->hits, 1);
            e->pins++;
            co_queue_wait(&e->waiters);
            e->pins--;
            int r = e->err;
            if (r == 0)
                memcpy(buf, e->data + in, len);
            if (!e->hashed && !e->loading && !e->pins)
                entry_free(z, e);
            return r;
        }
        if (e && e->loading) {
            /* A shorter prefix is on its way; wait, then decompress all. */
            whole = true;
            e->pins++;
            co_queue_wait(&e->waiters);
            e->pins--;
            if (!e->hashed && !e->loading && !e->pins)
                entry_free(z, e);
            continue;
        }
        if (e) {
            whole = true;
            unhash(q, z, e);    /* too short a prefix: replaced by the whole cluster */
        }
        break;
    }
    if (z)
        stat_add(&z->misses, 1);
    size_t want = want_for(q, in, len, whole);
    struct zc_entry *e = z ? entry_new(q, z, coff, nbytes) : NULL;
    if (!e) {
        uint8_t *out = malloc(cs);
        if (!out)
            return -ENOMEM;
        int r = load(q, coff, nbytes, guest_off, out, want, in, len, buf);
        free(out);
        return r < 0 ? r : 0;
    }
    e->target = (uint32_t)want;
    int r = load(q, coff, nbytes, guest_off, e->data, want, in, len, buf);
    e->loading = false;
    e->err = r < 0 ? r : 0;
    if (r > 0)
        e->valid = (uint32_t)r;
    co_queue_wake_all(&e->waiters);
    /* Failed, or invalidated while it was loading: never published.  The
     * waiters (started before the invalidation) copy out first. */
    if (r < 0 && e->hashed)
        unhash(q, z, e);
    else if (!e->hashed && !e->pins)
        entry_free(z, e);
    return r < 0 ? r : 0;
}

ssize_t qcow2_zc_compress(struct qcow2 *q, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    struct zjob j = {
        .wp.fn = zjob_run, .type = q->h.compression_type, .in = in, .in_len = in_len,
        .out = out, .out_len = out_len, .compress = true,
    };
    wp_run(&q->port, &j.wp);
    return j.result;
}

void qcow2_zc_compress_many(struct qcow2 *q, size_t n, const uint8_t *const *in, size_t in_len,
                            uint8_t *const *out, size_t out_len, ssize_t *res)
{
    struct zjob *j = calloc(n, sizeof(*j));
    if (!j) {
        for (size_t i = 0; i < n; i++)
            res[i] = -ENOMEM;
        return;
    }
    /* All on the pool at once: the workers take them in parallel. */
    for (size_t i = 0; i < n; i++) {
        j[i] = (struct zjob){
            .wp.fn = zjob_run, .type = q->h.compression_type, .in = in[i],
            .in_len = in_len, .out = out[i], .out_len = out_len, .compress = true,
        };
        wp_submit(&q->port, &j[i].wp);
    }
    for (size_t i = 0; i < n; i++) {
        wp_wait(&q->port, &j[i].wp);
        res[i] = j[i].result;
    }
    free(j);
}

uint64_t qcow2_zc_inline_jobs(const struct qcow2 *q)
{
    return q->zc ? q->zc->inline_jobs : 0;
}

unsigned qcow2_zc_loads_peak(struct qcow2 *q, bool reset)
{
    if (!q->zc)
        return 0;
    unsigned n = q->zc->loads_peak;
    if (reset)
        q->zc->loads_peak = 0;
    return n;
}

void qcow2_zc_stats(struct qcow2 *q, struct img_stats *st)
{
    if (!q->zc)
        return;
    st->zcache_hits = stat_get(&q->zc->hits);
    st->zcache_misses = stat_get(&q->zc->misses);
    st->clusters_decompressed = stat_get(&q->zc->decompressed);
}
