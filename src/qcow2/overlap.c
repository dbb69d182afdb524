/* Metadata overlap checks: before any write to the image file, make sure
 * the target clusters hold none of the image's metadata other than the
 * structure being written (QEMU's "overlap-check" idea).  A damaged or
 * hostile image can name a metadata cluster as a data cluster, point two
 * tables at each other, or have refcounts that call a table's cluster free
 * so that the allocator hands it out; without this check one guest write
 * would then overwrite the header or a table and destroy the image.
 *
 * The structures known:
 *   fixed, checked by comparison: the header cluster, the active L1 table,
 *     the refcount table, the snapshot table, the LUKS header and key
 *     material (QEMU does not check that one; losing it loses every byte of
 *     an encrypted image, so it is checked here);
 *   static, sorted at open: the snapshots' L1 tables (ranges, with a
 *     running maximum of their ends so one binary search answers);
 *   single clusters, a sorted array kept up to date: active L2 tables (from
 *     the L1 table), refcount blocks (from the refcount table) and, when the
 *     snapshots' L1 tables are small enough to read at open, inactive L2
 *     tables.
 * A check is a handful of comparisons and two binary searches, cheap
 * enough for every data write.  Ranges are widened to whole clusters: every
 * structure is allocated in whole clusters, so nothing else may share one. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "qcow2/internal.h"

/* Reading every snapshot's L1 table at open costs I/O; beyond this many
 * bytes in total the inactive L2 tables are not indexed (as QEMU's default
 * "cached" mode, which never checks them). */
#define OL_MAX_SNAPSHOT_L1_BYTES (16u << 20)

static const char *const ol_names[OL_NKINDS] = {
    [OL_BIT_HEADER] = "the image header",
    [OL_BIT_ACTIVE_L1] = "the active L1 table",
    [OL_BIT_REFTABLE] = "the refcount table",
    [OL_BIT_SNAPSHOT_TABLE] = "the snapshot table",
    [OL_BIT_INACTIVE_L1] = "a snapshot's L1 table",
    [OL_BIT_ACTIVE_L2] = "an active L2 table",
    [OL_BIT_INACTIVE_L2] = "a snapshot's L2 table",
    [OL_BIT_REFBLOCK] = "a refcount block",
    [OL_BIT_CRYPTO] = "the LUKS encryption header",
};

#define KIND_MASK 0x7ull   /* entries are cluster offset | kind bit number */

static bool overlaps(uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
    return alen && blen && a < b + blen && b < a + alen;
}

/* First entry >= key. */
static size_t lower_bound(const uint64_t *v, size_t n, uint64_t key)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (v[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int reserve(struct ol_index *x, size_t more)
{
    if (x->n + more <= x->cap)
        return 0;
    size_t cap = x->cap ? x->cap : 64;
    while (cap < x->n + more)
        cap *= 2;
    uint64_t *v = realloc(x->cl, cap * sizeof(*v));
    if (!v)
        return -ENOMEM;
    x->cl = v;
    x->cap = cap;
    return 0;
}

static bool valid_table_offset(const struct qcow2 *q, uint64_t e)
{
    uint64_t off = e & L1E_OFFSET_MASK;
    return off && !(off & (cl_size(q) - 1));
}

/* The index changes: its generation (write hints record it) and the map
 * generation (every hint's fast way) move together. */
static void ol_changed(struct qcow2 *q)
{
    q->ol.gen++;
    qcow2_map_changed(q);
}

/* Active L2 tables are counted once per L1 entry naming them (a damaged
 * image may name one twice; dropping one entry must not forget the other);
 * other kinds once. */
void qcow2_ol_add(struct qcow2 *q, uint64_t off, unsigned bit)
{
    struct ol_index *x = &q->ol;
    uint64_t key = off | bit;
    size_t i = lower_bound(x->cl, x->n, key);
    if (i < x->n && x->cl[i] == key && bit != OL_BIT_ACTIVE_L2)
        return;
    ol_changed(q);
    if (reserve(x, 1) < 0) {
        /* Without the entry a later write could destroy this table:
         * refuse writes rather than run unprotected. */
        qcow2_mark_broken(q, "out of memory for the metadata overlap index");
        return;
    }
    memmove(x->cl + i + 1, x->cl + i, (x->n - i) * sizeof(*x->cl));
    x->cl[i] = key;
    x->n++;
}

void qcow2_ol_remove(struct qcow2 *q, uint64_t off, unsigned bit)
{
    struct ol_index *x = &q->ol;
    uint64_t key = off | bit;
    size_t i = lower_bound(x->cl, x->n, key);
    if (i < x->n && x->cl[i] == key) {
        ol_changed(q);
        memmove(x->cl + i, x->cl + i + 1, (x->n - i - 1) * sizeof(*x->cl));
        x->n--;
    }
}

/* Append every valid table offset of tab with kind bit, unsorted. */
static int append_tables(struct qcow2 *q, const uint64_t *tab, uint64_t n, unsigned bit)
{
    struct ol_index *x = &q->ol;
    if (reserve(x, n) < 0)
        return -ENOMEM;
    for (uint64_t i = 0; i < n; i++)
        if (valid_table_offset(q, tab[i]))
            x->cl[x->n++] = (tab[i] & L1E_OFFSET_MASK) | bit;
    return 0;
}

/* Sort; duplicates are kept only for active L2 tables (see qcow2_ol_add). */
static void sort_unique(struct ol_index *x)
{
    if (!x->n)
        return;
    qsort(x->cl, x->n, sizeof(*x->cl), cmp_u64);
    size_t k = 1;
    for (size_t i = 1; i < x->n; i++)
        if (x->cl[i] != x->cl[k - 1] || (x->cl[i] & KIND_MASK) == OL_BIT_ACTIVE_L2)
            x->cl[k++] = x->cl[i];
    x->n = k;
}

void qcow2_ol_reindex_refblocks(struct qcow2 *q)
{
    struct ol_index *x = &q->ol;
    size_t k = 0;
    ol_changed(q);
    for (size_t i = 0; i < x->n; i++)
        if ((x->cl[i] & KIND_MASK) != OL_BIT_REFBLOCK)
            x->cl[k++] = x->cl[i];
    x->n = k;
    if (append_tables(q, q->reftable, q->reftable_entries, OL_BIT_REFBLOCK) < 0)
        qcow2_mark_broken(q, "out of memory for the metadata overlap index");
    sort_unique(x);
}

static int cmp_range(const void *a, const void *b)
{
    const struct ol_range *x = a, *y = b;
    return x->off < y->off ? -1 : x->off > y->off;
}

/* Snapshot L1 tables as ranges, and (if affordable) the L2 tables they name. */
static int index_snapshots(struct qcow2 *q)
{
    struct ol_index *x = &q->ol;
    uint32_t nb = q->h.nb_snapshots;
    if (!nb || !q->snapshots)
        return 0;
    x->ranges = calloc(nb, sizeof(*x->ranges));
    x->max_end = calloc(nb, sizeof(*x->max_end));
    if (!x->ranges || !x->max_end)
        return -ENOMEM;
    uint64_t total = 0;
    for (uint32_t i = 0; i < nb; i++) {
        const struct qcow2_snapshot *s = &q->snapshots[i];
        /* A misaligned or oversized L1 table (only the checker gets such an
         * entry past the open) is corruption to QEMU, not a table: its
         * clusters count as leaks and may be freed. */
        if (!s->l1_size || (s->l1_table_offset & (cl_size(q) - 1)) ||
            (uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES)
            continue;
        x->ranges[x->nranges].off = s->l1_table_offset;
        x->ranges[x->nranges].len = (uint64_t)s->l1_size * 8;
        x->nranges++;
        total += (uint64_t)s->l1_size * 8;
    }
    qsort(x->ranges, x->nranges, sizeof(*x->ranges), cmp_range);
    uint64_t m = 0;
    for (size_t i = 0; i < x->nranges; i++) {
        uint64_t end = x->ranges[i].off + x->ranges[i].len;
        m = end > m ? end : m;
        x->max_end[i] = m;
    }
    if (total > OL_MAX_SNAPSHOT_L1_BYTES)
        return 0;
    uint8_t *buf = NULL;
    size_t cap = 0;
    int r = 0;
    for (size_t i = 0; i < x->nranges && r == 0; i++) {
        uint64_t len = x->ranges[i].len;
        if (len > cap) {
            io_free(buf);
            buf = io_alloc(len);
            cap = len;
        }
        ssize_t n = file_pread_any(&q->file, buf, len, x->ranges[i].off);
        if (n < 0) {
            r = (int)n;
            break;
        }
        memset(buf + n, 0, len - (uint64_t)n);    /* past EOF: no tables */
        uint64_t *tab = (uint64_t *)buf;
        for (uint64_t j = 0; j < len / 8; j++)
            tab[j] = be64_load(&tab[j]);
        r = append_tables(q, tab, len / 8, OL_BIT_INACTIVE_L2);
    }
    io_free(buf);
    return r;
}

int qcow2_ol_build(struct qcow2 *q)
{
    struct ol_index *x = &q->ol;
    qcow2_ol_free(q);
    int r = append_tables(q, q->l1, q->h.l1_size, OL_BIT_ACTIVE_L2);
    if (r == 0)
        r = append_tables(q, q->reftable, q->reftable_entries, OL_BIT_REFBLOCK);
    if (r == 0)
        r = index_snapshots(q);
    sort_unique(x);
    ol_changed(q);          /* complete only now (reading snapshot tables may wait) */
    return r;
}

void qcow2_ol_free(struct qcow2 *q)
{
    uint32_t gen = q->ol.gen;
    free(q->ol.cl);
    free(q->ol.ranges);
    free(q->ol.max_end);
    memset(&q->ol, 0, sizeof(q->ol));
    q->ol.gen = gen;
    ol_changed(q);          /* never back to a value a map hint may hold */
}

/* The structures checked by comparison with the header's fields (they may
 * move without the index changing). */
static bool ol_find_fixed(const struct qcow2 *q, uint64_t start, uint64_t end, unsigned ignore,
                          unsigned *bit, uint64_t *where)
{
    uint64_t cs = cl_size(q), len = end - start;
#define HIT(b, o) do { *bit = (b); *where = (o); return true; } while (0)
    if (!(ignore & OL_HEADER) && start < cs)
        HIT(OL_BIT_HEADER, 0);
    if (!(ignore & OL_ACTIVE_L1) && overlaps(start, len, q->h.l1_table_offset, (uint64_t)q->h.l1_size * 8))
        HIT(OL_BIT_ACTIVE_L1, q->h.l1_table_offset);
    if (!(ignore & OL_REFTABLE) &&
        overlaps(start, len, q->h.refcount_table_offset, (uint64_t)q->h.refcount_table_clusters * cs))
        HIT(OL_BIT_REFTABLE, q->h.refcount_table_offset);
    if (!(ignore & OL_SNAPSHOT_TABLE) && q->h.nb_snapshots &&
        overlaps(start, len, q->h.snapshots_offset, q->snapshot_table_len))
        HIT(OL_BIT_SNAPSHOT_TABLE, q->h.snapshots_offset);
    if (!(ignore & OL_CRYPTO) && q->h.has_crypto_ext &&
        overlaps(start, len, q->h.crypto_offset, q->h.crypto_length))
        HIT(OL_BIT_CRYPTO, q->h.crypto_offset);
    return false;
}

/* The first structure (kind bit and offset) outside `ignore` that
 * [start, end) overlaps; false if none.  start and end are cluster-aligned. */
static bool ol_find(const struct qcow2 *q, uint64_t start, uint64_t end, unsigned ignore,
                    unsigned *bit, uint64_t *where)
{
    const struct ol_index *x = &q->ol;
    uint64_t len = end - start;
    if (ol_find_fixed(q, start, end, ignore, bit, where))
        return true;
    if (!(ignore & OL_INACTIVE_L1) && x->nranges) {
        /* The last range starting before end; any range up to it that
         * reaches past start overlaps (max_end says whether one does). */
        size_t lo = 0, hi = x->nranges;
        while (lo < hi) {
            size_t mid = lo + (hi - lo) / 2;
            if (x->ranges[mid].off < end)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo && x->max_end[lo - 1] > start) {
            for (size_t i = lo; i-- > 0;)
                if (overlaps(start, len, x->ranges[i].off, x->ranges[i].len))
                    HIT(OL_BIT_INACTIVE_L1, x->ranges[i].off);
        }
    }
    for (size_t i = lower_bound(x->cl, x->n, start); i < x->n && x->cl[i] < end; i++) {
        unsigned b = (unsigned)(x->cl[i] & KIND_MASK);
        if (!(ignore & (1u << b)))
            HIT(b, x->cl[i] & ~KIND_MASK);
    }
    return false;
#undef HIT
}

/* [off, off+len) widened to whole clusters. */
static void whole_clusters(const struct qcow2 *q, uint64_t off, uint64_t len, uint64_t *start, uint64_t *end)
{
    uint64_t cs = cl_size(q), e = off + len;
    *start = off & ~(cs - 1);
    *end = e < off || e > UINT64_MAX - cs ? UINT64_MAX & ~(cs - 1) : (e + cs - 1) & ~(cs - 1);
}

bool qcow2_ol_fixed_clear(const struct qcow2 *q, uint64_t off, uint64_t len, unsigned ignore)
{
    uint64_t start, end, where;
    unsigned bit;
    whole_clusters(q, off, len, &start, &end);
    return !len || !ol_find_fixed(q, start, end, ignore, &bit, &where);
}

int qcow2_ol_conflict(const struct qcow2 *q, uint64_t off, uint64_t len, unsigned ignore,
                const char *what, char *msg, size_t msglen)
{
    if (!len)
        return 0;
    uint64_t start, end, where;
    unsigned bit;
    whole_clusters(q, off, len, &start, &end);
    if (!ol_find(q, start, end, ignore, &bit, &where))
        return 0;
    snprintf(msg, msglen, "refusing to write %s at 0x%llx (%llu bytes): it overlaps %s at 0x%llx",
             what, (unsigned long long)off, (unsigned long long)len, ol_names[bit],
             (unsigned long long)where);
    return -EIO;
}

int qcow2_ol_check(struct qcow2 *q, uint64_t off, uint64_t len, unsigned ignore, const char *what)
{
    char msg[256];
    int r = qcow2_ol_conflict(q, off, len, ignore, what, msg, sizeof(msg));
    if (r < 0)
        qcow2_mark_broken(q, "%s", msg);
    return r;
}
