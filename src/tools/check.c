/* Check and repair: qemu-img check's job, finding what it finds and fixing
 * what it fixes, on the reference walk of repair.c.
 *
 * In qemu-img check's order:
 *  1. the snapshot table is read as it is on disk (the open left it to us):
 *     too many entries or too much extra data are dropped with -r all;
 *  2. references to every cluster are counted (repair.c), plus the refcount
 *     table and blocks, whose entries are checked here;
 *  3. each cluster's refcount is compared with its references: more is a
 *     leak (-r leaks lowers it), fewer a corruption (-r all raises it); a
 *     referenced cluster with refcount 0, or a broken refcount block, needs
 *     the refcount structures rebuilt (-r all, repair.c);
 *  4. COPIED flags of the active L1/L2 tables must say "refcount is 1";
 *  5. a snapshot table with problems is written anew (-r all);
 *  6. after a repair that left nothing broken, the dirty and corrupt bits
 *     are cleared.
 * Repair writes are ordered so that each step only makes true what is
 * already durable: refcount changes are flushed (synced) before any COPIED
 * flag that relies on them; a new snapshot table and its refcounts are
 * synced before the header names it, and the old one is freed after. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "io/loop.h"
#include "img/driver.h"
#include "qcow2/internal.h"
#include "tools/tools.h"

#define REFT_RESERVED_MASK 0x1ffull
#define PROGRESS_UNITS 1000u
#define WALK_SHARE 700u             /* progress units for the walk; the rest compares */

struct checker {
    struct qcow2 *q;
    const struct check_opts *o;
    struct check_result *res;       /* refcount part of the result */
    struct check_result sres;       /* snapshot table part (added at the end) */
    struct rc_walk w;
    bool rebuild;                   /* the refcount structures need rebuilding */
    uint64_t progress_last;
    char *err;
    size_t errlen;
};

#define say(c, ...) qcow2_walk_say(&(c)->w, __VA_ARGS__)

static uint64_t div_up(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

static void report(struct checker *c, uint64_t units)
{
    if (!c->o->progress || units <= c->progress_last)
        return;
    c->progress_last = units;
    c->o->progress(c->o->progress_ctx, units, PROGRESS_UNITS);
}

static void walk_progress(void *ctx, uint64_t done, uint64_t total)
{
    struct checker *c = ctx;
    report(c, WALK_SHARE * done / total);
}

/* ---- 1. the snapshot table ------------------------------------------------------- */

static int fail_check(struct checker *c, struct check_result *res, int r, const char *fmt, const char *what)
{
    res->check_errors++;
    say(c, fmt, what);
    snprintf(c->err, c->errlen, fmt, what);
    return r;
}

/* Read the table entry by entry as QEMU does.  With -r all, entries past
 * what QEMU accepts are dropped (their clusters then count as leaks) and
 * extra data beyond its limit is cut; the header's count is updated at
 * once (the refcount check relies on it). */
/* Where the snapshot table lies, by the header (nb, off); 1 when there is
 * nothing to read, 0 to read nb entries, or the check's failure. */
static int snapshot_table_bounds(struct checker *c, uint32_t *nb_out, uint64_t *off_out, uint32_t *reduced)
{
    struct qcow2 *q = c->q;
    bool fix = c->o->fix & CHECK_FIX_ERRORS;
    uint32_t nb = be32_load(q->hdr_buf + 60);
    uint64_t off = be64_load(q->hdr_buf + 64);
    q->h.snapshots_offset = off;
    if (nb > QCOW2_MAX_SNAPSHOTS && fix) {
        say(c, "Discarding %u overhanging snapshots", nb - QCOW2_MAX_SNAPSHOTS);
        *reduced = nb - QCOW2_MAX_SNAPSHOTS;
        nb = QCOW2_MAX_SNAPSHOTS;
    }
    *nb_out = nb;
    *off_out = off;
    if (!nb) {
        q->h.nb_snapshots = 0;
        return 1;
    }
    if (nb > QCOW2_MAX_SNAPSHOTS)
        return fail_check(c, &c->sres, -EFBIG, "ERROR %s too large", "snapshot table");
    if ((off & (cl_size(q) - 1)) || off == 0 || off > q->open_len ||
        (uint64_t)nb * QCOW2_SNAPSHOT_FIXED > q->open_len - off)
        return fail_check(c, &c->sres, -EINVAL, "ERROR %s offset invalid", "snapshot table");
    return 0;
}

#define ENTRY_OVERHANGS 1   /* read_snapshot_entry: the table grew past QEMU's limit */

/* Entry i at *pos (then past it); *len counts the table as QEMU would
 * rewrite it.  0, ENTRY_OVERHANGS, or a failure. */
static int read_snapshot_entry(struct checker *c, struct qcow2_snapshot *s, uint32_t i, uint64_t *pos,
                               uint64_t *len, uint32_t *dropped)
{
    struct qcow2 *q = c->q;
    struct check_result *res = &c->sres;
    bool fix = c->o->fix & CHECK_FIX_ERRORS;
    uint8_t fixed[QCOW2_SNAPSHOT_FIXED];
    uint16_t id_len, name_len;
    *pos = (*pos + 7) & ~7ull;
    *len = (*len + 7) & ~7ull;
    ssize_t n = file_pread_any(&q->file, fixed, sizeof(fixed), *pos);
    if (n < 0)
        return fail_check(c, res, (int)n, "ERROR failed to read the %s", "snapshot table");
    if ((size_t)n < sizeof(fixed))
        memset(fixed + n, 0, sizeof(fixed) - n);
    qcow2_snapshot_fixed_load(fixed, s, &id_len, &name_len);
    *pos += sizeof(fixed);
    uint32_t on_disk_extra = s->extra_size;
    if (s->extra_size > QCOW2_SNAPSHOT_MAX_EXTRA) {
        if (!fix) {
            res->check_errors++;
            say(c, "ERROR failed to read the snapshot table: Too much extra metadata in snapshot "
                "table entry %u", i);
            say(c, "You can force-remove this extra metadata during offline repair");
            snprintf(c->err, c->errlen, "too much extra metadata in snapshot table entry %u", i);
            return -EFBIG;
        }
        say(c, "Discarding too much extra metadata in snapshot table entry %u (%u > %u)", i,
            s->extra_size, QCOW2_SNAPSHOT_MAX_EXTRA);
        (*dropped)++;
        s->extra_size = QCOW2_SNAPSHOT_MAX_EXTRA;
    }
    s->extra = malloc(s->extra_size + 1);
    s->id = calloc(1, id_len + 1u);
    s->name = calloc(1, name_len + 1u);
    if (!s->extra || !s->id || !s->name)
        return -ENOMEM;
    n = file_pread_any(&q->file, s->extra, s->extra_size, *pos);
    if (n >= 0 && (size_t)n < s->extra_size)
        memset(s->extra + n, 0, s->extra_size - n);
    *pos += on_disk_extra;
    ssize_t n1 = n < 0 ? n : file_pread_any(&q->file, s->id, id_len, *pos);
    ssize_t n2 = n1 < 0 ? n1 : file_pread_any(&q->file, s->name, name_len, *pos + id_len);
    if (n2 < 0)
        return fail_check(c, res, (int)n2, "ERROR failed to read the %s", "snapshot table");
    *pos += id_len + name_len;
    qcow2_snapshot_extra_apply(s, q->img.size);
    *len += QCOW2_SNAPSHOT_FIXED + s->extra_size + id_len + name_len;
    return *len > QCOW2_MAX_SNAPSHOT_TABLE ? ENTRY_OVERHANGS : 0;
}

/* Fewer entries than the header said: write the count at once (the
 * dropped ones' clusters become leaks, which the refcount check that
 * follows repairs). */
static int commit_reduced_count(struct checker *c, uint32_t reduced)
{
    struct check_result *res = &c->sres;
    int r = qcow2_write_header_fields(c->q);
    if (r == 0)
        r = qcow2_sync(c->q);
    if (r < 0) {
        res->check_errors++;
        say(c, "ERROR failed to update the snapshot count in the image header: %s", strerror(-r));
        snprintf(c->err, c->errlen, "cannot update the snapshot count: %s", strerror(-r));
        return r;
    }
    res->corruptions -= reduced;
    res->corruptions_fixed += reduced;
    return 0;
}

static int read_snapshot_table(struct checker *c)
{
    struct qcow2 *q = c->q;
    struct check_result *res = &c->sres;
    bool fix = c->o->fix & CHECK_FIX_ERRORS;
    uint32_t nb, reduced = 0, dropped = 0;
    uint64_t off;
    int r = snapshot_table_bounds(c, &nb, &off, &reduced);
    if (r != 0)
        return r > 0 ? 0 : r;

    struct qcow2_snapshot *sn = calloc(nb, sizeof(*sn));
    if (!sn)
        return -ENOMEM;
    uint64_t pos = off, len = 0;
    uint32_t i;
    for (i = 0; i < nb; i++) {
        uint64_t entry_start = pos;
        r = read_snapshot_entry(c, &sn[i], i, &pos, &len, &dropped);
        if (r < 0)
            break;
        if (r == ENTRY_OVERHANGS) {
            r = 0;
            if (!fix) {
                r = fail_check(c, res, -EFBIG, "ERROR %s is too big", "snapshot table");
                say(c, "You can force-remove all %u overhanging snapshots during offline repair", nb - i);
                break;
            }
            say(c, "Discarding %u overhanging snapshots (snapshot table is too big)", nb - i);
            reduced += nb - i;
            free(sn[i].extra);
            free(sn[i].id);
            free(sn[i].name);
            memset(&sn[i], 0, sizeof(sn[i]));
            pos = entry_start;
            nb = i;
            break;
        }
    }
    if (r < 0) {
        qcow2_snapshots_free(sn, nb);
        return r;
    }
    q->snapshots = sn;
    q->h.nb_snapshots = nb;
    q->snapshot_table_len = pos - off;
    res->corruptions += reduced + dropped;
    if (reduced && (r = commit_reduced_count(c, reduced)) < 0)
        return r;
    if (q->h.version >= 3)
        for (i = 0; i < nb; i++)
            if (sn[i].extra_size < 16) {
                res->corruptions++;
                say(c, "%s snapshot table entry %u is incomplete", fix ? "Repairing" : "ERROR", i);
            }
    return 0;
}

/* Step 5: write the snapshot table anew (complete entries, extra data cut
 * to QEMU's limit) in new clusters; sync; switch the header; free the old. */
static int write_snapshot_table(struct checker *c)
{
    struct qcow2 *q = c->q;
    uint64_t cs = cl_size(q);
    uint8_t *tab = NULL;
    size_t len = 0;
    int r = qcow2_snapshots_serialize(q->snapshots, q->h.nb_snapshots, &tab, &len);
    uint64_t new_off = 0, got = 0, nclusters = div_up(len, cs);
    if (r == 0 && nclusters) {
        co_mutex_lock(&q->alloc_lock);
        r = qcow2_alloc_clusters(q, nclusters, &new_off, &got);
        co_mutex_unlock(&q->alloc_lock);
        if (r == 0 && got < nclusters) {
            r = -ENOSPC;     /* no contiguous run: give the partial one back */
            for (uint64_t k = 0; k < got; k++)
                qcow2_rc_update(q, new_off / cs + k, -1);
        }
    }
    uint8_t *buf = io_zalloc(nclusters * cs + cs);
    if (len)
        memcpy(buf, tab, len);
    free(tab);
    if (r == 0 && nclusters) {
        ssize_t n = file_pwrite(&q->file, buf, nclusters * cs, new_off, false);
        r = n < 0 ? (int)n : 0;
    }
    io_free(buf);
    /* The new table and its refcounts are durable before the header names it. */
    if (r == 0)
        r = qcow2_flush(q);
    if (r == 0)
        r = qcow2_sync(q);
    uint64_t old_off = q->h.snapshots_offset, old_len = q->snapshot_table_len;
    if (r == 0) {
        q->h.snapshots_offset = new_off;
        r = qcow2_write_header_fields(q);
        if (r == 0)
            r = qcow2_sync(q);
    }
    if (r == 0) {
        q->snapshot_table_len = len;
        for (uint64_t k = old_len ? old_off / cs : 1; old_len && k <= (old_off + old_len - 1) / cs && r == 0; k++)
            r = qcow2_rc_update(q, k, -1);
        if (r == 0)
            r = qcow2_flush(q);
    }
    if (r < 0) {
        c->sres.check_errors++;
        say(c, "ERROR failed to update snapshot table: %s", strerror(-r));
    }
    return r;
}

/* ---- 2. references and the refcount table ----------------------------------------- */

/* Where a refcount table entry's block is, and whether it can be read. */
static bool refblock_valid(const struct qcow2 *q, uint64_t e)
{
    return !(e & REFT_RESERVED_MASK) && !(e & (cl_size(q) - 1));
}

static int check_refblocks(struct checker *c)
{
    struct qcow2 *q = c->q;
    struct check_result *res = c->res;
    uint64_t cs = cl_size(q);
    bool fix = c->o->fix & CHECK_FIX_ERRORS;
    int r = 0;
    for (uint64_t i = 0; i < q->reftable_entries && r == 0; i++) {
        uint64_t e = q->reftable[i], off = e & ~REFT_RESERVED_MASK, cluster = off / cs;
        if (e & REFT_RESERVED_MASK) {
            say(c, "ERROR refcount table entry %llu has reserved bits set", (unsigned long long)i);
            res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (off & (cs - 1)) {
            say(c, "ERROR refcount block %llu is not cluster aligned; refcount table entry corrupted",
                (unsigned long long)i);
            res->corruptions++;
            c->rebuild = true;
            continue;
        }
        if (off && cluster >= c->w.nclusters) {
            res->corruptions++;
            say(c, "%s refcount block %llu is outside image", fix ? "Repairing" : "ERROR", (unsigned long long)i);
            if (!fix)
                continue;
            /* The block reads as zeros past the end: make the file hold it. */
            r = off > q->open_len + (1ull << 30) ? -EFBIG : file_truncate(&q->file, off + cs);
            if (r < 0) {
                say(c, "ERROR could not resize image: %s", strerror(-r));
                c->rebuild = true;
                r = 0;
                continue;
            }
            qcow2_note_host_end(q, off + cs);
            c->w.file_end = q->host_end;
            res->corruptions--;
            res->corruptions_fixed++;
            r = qcow2_walk_count(&c->w, off, cs, "a refcount block");
            continue;
        }
        if (off) {
            r = qcow2_walk_count(&c->w, off, cs, "a refcount block");
            if (r == 0 && qcow2_walk_get(&c->w, cluster) != 1) {
                say(c, "ERROR refcount block %llu refcount=%u", (unsigned long long)i, qcow2_walk_get(&c->w, cluster));
                res->corruptions++;
                c->rebuild = true;
            }
        }
    }
    return r;
}

/* References of the whole image, refcount structures included. */
static int count_references(struct checker *c)
{
    struct qcow2 *q = c->q;
    uint64_t nclusters = div_up(q->host_end, cl_size(q));
    int r = qcow2_walk_init(&c->w, q, nclusters, c->err, c->errlen);
    if (r < 0) {
        c->res->check_errors++;
        return r;
    }
    c->w.res = c->res;
    c->w.fix = c->o->fix;
    c->w.say = c->o->message;
    c->w.say_ctx = c->o->message_ctx;
    c->w.progress = walk_progress;
    c->w.progress_ctx = c;
    r = qcow2_walk_image(&c->w);
    if (r == 0)
        r = qcow2_walk_count(&c->w, q->h.refcount_table_offset,
                          (uint64_t)q->h.refcount_table_clusters * cl_size(q), "the refcount table");
    if (r == 0)
        r = check_refblocks(c);
    if (r < 0 && c->res->check_errors == 0)
        c->res->check_errors++;
    return r;
}

/* ---- 3. refcounts against references ---------------------------------------------- */

/* The refcount on disk (as the engine reads it); 0 where no valid block is. */
static int refcount_of(struct qcow2 *q, uint64_t cluster, uint64_t *rc)
{
    uint64_t ti = cluster / q->h.refcount_block_entries;
    if (ti >= q->reftable_entries || !refblock_valid(q, q->reftable[ti])) {
        *rc = 0;
        return 0;
    }
    return qcow2_rc_get(q, cluster, rc);
}

/* Does refcount-block range ci have a block the engine reads? */
static bool has_refblock(const struct qcow2 *q, uint64_t ci)
{
    return ci < q->reftable_entries && q->reftable[ci] && refblock_valid(q, q->reftable[ci]);
}

static void compare_refcounts(struct checker *c, unsigned fix, uint64_t *highest)
{
    struct qcow2 *q = c->q;
    struct check_result *res = c->res;
    uint64_t rbe = q->h.refcount_block_entries;
    *highest = 0;
    for (uint64_t i = 0; i < c->w.nclusters; i++) {
        if (i % rbe == 0) {
            report(c, WALK_SHARE + (PROGRESS_UNITS - WALK_SHARE) * i / c->w.nclusters);
            /* Neither references nor refcounts here: nothing to compare
             * (a huge sparse file costs time for its ranges in use only). */
            if (!qcow2_walk_range_used(&c->w, i / rbe) && !has_refblock(q, i / rbe)) {
                i += rbe - 1;
                continue;
            }
        }
        uint64_t rc1, rc2 = qcow2_walk_get(&c->w, i);
        int r = refcount_of(q, i, &rc1);
        if (r < 0) {
            say(c, "Can't get refcount for cluster %llu: %s", (unsigned long long)i, strerror(-r));
            res->check_errors++;
            continue;
        }
        if (rc1 || rc2)
            *highest = i;
        if (rc1 == rc2)
            continue;
        uint64_t *fixed = NULL;
        if (rc1 == 0)
            c->rebuild = true;      /* no block to hold it, or one the walk does not trust */
        else if (rc1 > rc2 && (fix & CHECK_FIX_LEAKS))
            fixed = &res->leaks_fixed;
        else if (rc1 < rc2 && (fix & CHECK_FIX_ERRORS))
            fixed = &res->corruptions_fixed;
        say(c, "%s cluster %llu refcount=%llu reference=%llu",
            fixed ? "Repairing" : rc1 < rc2 ? "ERROR" : "Leaked",
            (unsigned long long)i, (unsigned long long)rc1, (unsigned long long)rc2);
        /* In the cache; flushed (refcount blocks, then a sync) before any
         * COPIED flag relies on it. */
        if (fixed && qcow2_rc_update(q, i, (int64_t)(rc2 - rc1)) == 0) {
            (*fixed)++;
            continue;
        }
        if (rc1 < rc2)
            res->corruptions++;
        else
            res->leaks++;
    }
    report(c, PROGRESS_UNITS - 1);
}

/* The rebuild gives back what the old refcount structures held: they are
 * not counted in the new ones. */
static void uncount_refcount_structures(struct checker *c)
{
    struct qcow2 *q = c->q;
    uint64_t cs = cl_size(q);
    for (uint64_t k = 0; k < q->h.refcount_table_clusters; k++) {
        uint64_t cl = q->h.refcount_table_offset / cs + k;
        qcow2_walk_drop(&c->w, cl);
    }
    for (uint64_t i = 0; i < q->reftable_entries; i++) {
        uint64_t e = q->reftable[i], cl = e / cs;
        if (e && refblock_valid(q, e))
            qcow2_walk_drop(&c->w, cl);
    }
}

static int rebuild(struct checker *c, uint64_t *highest)
{
    struct check_result *res = c->res, old = *res;
    say(c, "Rebuilding refcount structure");
    uncount_refcount_structures(c);
    int r = qcow2_rc_rebuild(&c->w, false);
    qcow2_walk_free(&c->w);
    if (r < 0) {
        res->check_errors++;
        say(c, "ERROR %s", c->err);
        return r;
    }
    /* Count again against the new structures. */
    res->corruptions = res->leaks = 0;
    res->allocated_clusters = res->fragmented_clusters = res->compressed_clusters = 0;
    c->rebuild = false;
    r = count_references(c);
    if (r < 0)
        return r;
    struct check_result saved = *res;
    *res = (struct check_result){ 0 };
    compare_refcounts(c, CHECK_FIX_LEAKS, highest);
    if (c->rebuild)
        say(c, "ERROR rebuilt refcount structure is still broken");
    uint64_t fresh_leaks = res->leaks;
    *res = saved;
    if (res->corruptions < old.corruptions)
        res->corruptions_fixed += old.corruptions - res->corruptions;
    if (res->leaks < old.leaks)
        res->leaks_fixed += old.leaks - res->leaks;
    res->leaks += fresh_leaks;
    return 0;
}

/* ---- 4. COPIED flags ----------------------------------------------------------------- */

static int check_copied(struct checker *c)
{
    struct qcow2 *q = c->q;
    struct check_result *res = c->res;
    uint64_t cs = cl_size(q);
    unsigned fix = c->o->fix;
    bool repair = (fix & CHECK_FIX_ERRORS) ||
                  ((fix & CHECK_FIX_LEAKS) && !res->check_errors && !res->corruptions && !res->leaks);
    uint8_t *l2 = io_alloc(cs);
    int r = 0;
    for (uint32_t i = 0; i < q->h.l1_size && r == 0; i++) {
        uint64_t l2_off = q->l1[i] & L1E_OFFSET_MASK, rc;
        if (!l2_off || refcount_of(q, l2_off / cs, &rc) < 0)
            continue;
        if ((rc == 1) != !!(q->l1[i] & QCOW_OFLAG_COPIED)) {
            res->corruptions++;
            say(c, "%s OFLAG_COPIED L2 cluster: l1_index=%u l1_entry=%llx refcount=%llu",
                repair ? "Repairing" : "ERROR", i, (unsigned long long)q->l1[i], (unsigned long long)rc);
            if (repair) {
                q->l1[i] = rc == 1 ? q->l1[i] | QCOW_OFLAG_COPIED : q->l1[i] & ~QCOW_OFLAG_COPIED;
                r = qcow2_write_l1_entry(q, q->h.l1_table_offset, q->l1, q->h.l1_size, i);
                if (r < 0) {
                    res->check_errors++;
                    break;
                }
                res->corruptions--;
                res->corruptions_fixed++;
            }
        }
        ssize_t n = file_pread_any(&q->file, l2, cs, l2_off);
        if (n < 0) {
            say(c, "ERROR: Could not read L2 table: %s", strerror((int)-n));
            res->check_errors++;
            r = (int)n;
            break;
        }
        if ((size_t)n < cs)
            memset(l2 + n, 0, cs - n);
        uint64_t dirty = 0;
        for (uint64_t j = 0; j < q->h.l2_entries; j++) {
            uint8_t *p = l2 + j * q->h.l2_entry_size;
            uint64_t e = be64_load(p);
            /* Data-file clusters are not refcounted: COPIED is theirs by definition. */
            if ((e & QCOW_OFLAG_COMPRESSED) || !(e & L2E_OFFSET_MASK) || has_data_file(q) ||
                refcount_of(q, (e & L2E_OFFSET_MASK) / cs, &rc) < 0)
                continue;
            if ((rc == 1) != !!(e & QCOW_OFLAG_COPIED)) {
                res->corruptions++;
                say(c, "%s OFLAG_COPIED data cluster: l2_entry=%llx refcount=%llu",
                    repair ? "Repairing" : "ERROR", (unsigned long long)e, (unsigned long long)rc);
                if (repair) {
                    be64_store(p, rc == 1 ? e | QCOW_OFLAG_COPIED : e & ~QCOW_OFLAG_COPIED);
                    dirty++;
                }
            }
        }
        if (!dirty)
            continue;
        /* A damaged L1 entry may name other metadata as its L2 table. */
        char msg[256];
        if ((l2_off & (cs - 1)) ||
            qcow2_ol_conflict(q, l2_off, cs, OL_ACTIVE_L2 | OL_INACTIVE_L2, "an L2 table", msg, sizeof(msg)) < 0) {
            say(c, "ERROR: Could not write L2 table; metadata overlap check failed");
            res->check_errors++;
            r = -EIO;
            break;
        }
        qcow2_cache_discard_range(&q->l2c, l2_off, cs);
        n = file_pwrite(&q->file, l2, cs, l2_off, false);
        if (n < 0) {
            say(c, "ERROR: Could not write L2 table: %s", strerror((int)-n));
            res->check_errors++;
            r = (int)n;
            break;
        }
        res->corruptions -= dirty;
        res->corruptions_fixed += dirty;
    }
    io_free(l2);
    if (r == 0 && repair)
        r = qcow2_sync(q);
    return r;
}

/* ---- the whole check -------------------------------------------------------------------- */

static int check_refcounts(struct checker *c)
{
    struct qcow2 *q = c->q;
    struct check_result *res = c->res;
    unsigned fix = c->o->fix;
    uint64_t highest = 0;
    res->total_clusters = div_up(q->img.size, cl_size(q));
    int r = count_references(c);
    if (r < 0)
        return r;
    struct check_result pre = *res;
    compare_refcounts(c, 0, &highest);
    if (c->rebuild && (fix & CHECK_FIX_ERRORS)) {
        r = rebuild(c, &highest);
        if (r < 0)
            return r;
    } else if (fix) {
        if (c->rebuild) {
            say(c, "ERROR need to rebuild refcount structures");
            res->check_errors++;
            snprintf(c->err, c->errlen, "the refcount structures need rebuilding (use -r all)");
            return -EIO;
        }
        if (res->leaks || res->corruptions) {
            *res = pre;
            compare_refcounts(c, fix, &highest);
        }
    }
    /* Refcount fixes are durable before COPIED flags are made to match them. */
    if (fix) {
        r = qcow2_flush(q);
        if (r < 0) {
            res->check_errors++;
            snprintf(c->err, c->errlen, "writing refcounts failed: %s", strerror(-r));
            return r;
        }
    }
    r = check_copied(c);
    res->image_end_offset = (highest + 1) * cl_size(q);
    return r;
}

static void add_result(struct check_result *to, const struct check_result *from)
{
    to->corruptions += from->corruptions;
    to->leaks += from->leaks;
    to->check_errors += from->check_errors;
    to->corruptions_fixed += from->corruptions_fixed;
    to->leaks_fixed += from->leaks_fixed;
}

/* The checker's own open: the metadata as it is, for the check to judge.
 * Unlike a normal open it parses the header as if there were no snapshot
 * table (read_snapshot_table reads and judges it), keeps a corrupt image
 * writable when repairing, and leaves the dirty bit, the autoclear bits and
 * the bitmaps alone (a repair does not change guest data); no backing file. */
static int check_open(const char *path, enum img_format fmt, bool fix, struct qcow2 **out,
                      char *err, size_t errlen)
{
    struct img_opts o = { .format = fmt, .read_only = !fix, .no_backing = true,
                          .cache = FILE_CACHE_BUFFERED };
    struct file f;
    if (file_open(&f, path, fix, o.cache, err, errlen) < 0)
        return -EINVAL;
    if (fmt == IMG_FMT_AUTO)
        fmt = img_probe(&f);
    if (fmt != IMG_FMT_QCOW2) {
        file_close(&f);
        snprintf(err, errlen, "This image format does not support checks");
        return -ENOTSUP;
    }
    struct qcow2 *q = qcow2_alloc(&f, &o, err, errlen);
    if (!q) {
        file_close(&f);
        return -ENOMEM;
    }
    int r = qcow2_read_header(q, true, err, errlen);
    if (r == 0)
        r = qcow2_load_metadata(q, &o, err, errlen);
    if (r < 0) {
        qcow2_abandon(q);
        file_close(&f);
        return -EINVAL;
    }
    *out = q;
    return 0;
}

int img_check(const char *path, enum img_format fmt, const struct check_opts *opts,
              struct check_result *res, char *err, size_t errlen)
{
    memset(res, 0, sizeof(*res));
    struct qcow2 *q0;
    int r = check_open(path, fmt, opts->fix != 0, &q0, err, errlen);
    if (r < 0)
        return r;
    struct image *img = &q0->img;
    struct checker c = { .q = q0, .o = opts, .res = res, .err = err, .errlen = errlen };
    struct qcow2 *q = c.q;
    c.w.say = opts->message;        /* for messages before the walk exists */
    c.w.say_ctx = opts->message_ctx;
    err[0] = '\0';
    report(&c, 1);

    r = read_snapshot_table(&c);
    /* The open left the snapshots out of the overlap index (the table was
     * ours to read): index them too before any repair writes. */
    if (r == 0 && q->h.nb_snapshots)
        r = qcow2_ol_build(q);
    if (r == 0)
        r = check_refcounts(&c);
    if (r == 0 && c.sres.corruptions && (opts->fix & CHECK_FIX_ERRORS)) {
        r = write_snapshot_table(&c);
        if (r == 0) {
            c.sres.corruptions_fixed += c.sres.corruptions;
            c.sres.corruptions = 0;
        }
    }
    add_result(res, &c.sres);
    qcow2_walk_free(&c.w);

    /* Nothing left broken: the image is clean and consistent again. */
    if (r == 0 && opts->fix && !res->check_errors && !res->corruptions &&
        (q->h.incompatible_features & (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT))) {
        r = qcow2_flush(q);
        if (r == 0) {
            q->h.incompatible_features &= ~(QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
            r = qcow2_write_header_fields(q);
        }
        if (r == 0)
            r = qcow2_sync(q);
        if (r < 0) {
            res->check_errors++;
            snprintf(err, errlen, "cannot mark the image clean: %s", strerror(-r));
        }
    }
    int cr = img_close(img);
    if (r == 0 && cr < 0) {
        res->check_errors++;
        snprintf(err, errlen, "writing the repaired metadata failed: %s", strerror(-cr));
        r = cr;
    }
    report(&c, PROGRESS_UNITS);
    if (r < 0 && !err[0])
        snprintf(err, errlen, "%s", strerror(-r));
    return r;
}
