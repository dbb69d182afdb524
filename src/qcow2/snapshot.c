/* Internal snapshots: list, create, delete, apply (QEMU's semantics, see
 * docs/interop/qcow2.txt "Snapshots" and block/qcow2-snapshot.c), and
 * opening one as a read-only view.
 *
 * Refcounts count references per L2 table path: taking a snapshot raises
 * the count of every L2 table the active L1 names and of every cluster
 * those tables map; COPIED (refcount exactly 1, may be written in place)
 * is then cleared in the active L1 and L2 entries.  Deleting lowers the
 * counts of what the snapshot's L1 reaches and frees what drops to 0;
 * COPIED is set again where a count returns to 1.
 *
 * Crash safety.  The snapshot table and the L1 table are switched by one
 * header sector write (nb_snapshots + snapshots_offset, or l1_size +
 * l1_table_offset + size), after everything the new version names is
 * durable, so a crash leaves the old or the new version.  A refcount and
 * the COPIED flag of an entry naming it cannot change together, and
 * `qemu-img check` calls any disagreement between them corruption: on v3
 * images the dirty bit ("refcounts may be inconsistent: rebuild them",
 * which QEMU and we do on the next read-write open) is set for exactly
 * the stretch where they may disagree on disk.  v2 has no dirty bit; there
 * the order keeps any disagreement harmless: a count raised before its
 * snapshot exists only leaks, and a count lowered to 1 before COPIED is set
 * again only makes the next write copy the cluster (`qemu-img check -r
 * all` sets such flags, as after the same crash in QEMU). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "io/loop.h"
#include "qcow2/internal.h"

/* ---- runs of clusters: one reference each -------------------------------- */

struct run { uint64_t c, n; };
struct runs { struct run *v; size_t len, cap; };

static int runs_add(struct runs *r, uint64_t c, uint64_t n)
{
    if (r->len && r->v[r->len - 1].c + r->v[r->len - 1].n == c) {
        r->v[r->len - 1].n += n;
        return 0;
    }
    if (r->len == r->cap) {
        size_t cap = r->cap ? r->cap * 2 : 256;
        struct run *v = realloc(r->v, cap * sizeof(*v));
        if (!v)
            return -ENOMEM;
        r->v = v;
        r->cap = cap;
    }
    r->v[r->len++] = (struct run){ c, n };
    return 0;
}

static void runs_free(struct runs *r)
{
    free(r->v);
    *r = (struct runs){ 0 };
}

/* Progress of a delete in three equal phases (walking the snapshot's
 * tables, releasing its clusters, restoring COPIED flags), each counted
 * in per mille: the length of the later phases is known only later. */
struct del_progress {
    img_progress_fn fn;
    void *ctx;
    unsigned phase;
};
#define PHASES 3u

static void progress_at(struct del_progress *p, uint64_t done, uint64_t total)
{
    if (p && p->fn && total)
        p->fn(p->ctx, p->phase * 1000u + done * 1000u / total, PHASES * 1000u);
}

static uint64_t table_clusters(const struct qcow2 *q, uint64_t entries)
{
    return (entries * 8 + cl_size(q) - 1) >> cl_bits(q);
}

/* Is an L1 entry's L2 table offset usable (aligned, no reserved bits, in
 * the file)?  0 if the entry is empty. */
static int l1_entry_table(struct qcow2 *q, uint64_t e, uint64_t *table)
{
    uint64_t t = e & L1E_OFFSET_MASK;
    *table = t;
    if ((e & L1E_RESERVED_MASK) || (t & (cl_size(q) - 1)) || (t && t + cl_size(q) > q->host_end))
        return -EIO;
    return 0;
}

/* Add the references an L1 table holds: each L2 table it names, each
 * cluster those tables map (a compressed one: every host cluster its data
 * touches).  Validates as it goes, so nothing changes for a corrupt table. */
static int collect_refs(struct qcow2 *q, const uint64_t *l1, uint32_t l1_size, const char *what,
                        struct runs *out, struct del_progress *p, char *err, size_t errlen)
{
    uint64_t cs = cl_size(q), nclusters = (q->host_end + cs - 1) / cs;
    uint32_t per = q->l2c.slice_size / q->h.l2_entry_size;
    int r = 0;
    for (uint32_t i = 0; i < l1_size && r == 0; i++) {
        uint64_t t;
        progress_at(p, i, l1_size);
        if (l1_entry_table(q, l1[i], &t) < 0) {
            snprintf(err, errlen, "%s: L1 entry %u is invalid (0x%llx)", what, i, (unsigned long long)l1[i]);
            return -EIO;
        }
        if (!t)
            continue;
        r = runs_add(out, t / cs, 1);
        for (uint64_t so = 0; so < cs && r == 0; so += q->l2c.slice_size) {
            struct mslice *s;
            r = qcow2_cache_get(&q->l2c, t + so, &s);
            if (r < 0) {
                snprintf(err, errlen, "%s: cannot read the L2 table at 0x%llx: %s", what,
                         (unsigned long long)t, strerror(-r));
                break;
            }
            for (uint32_t j = 0; j < per && r == 0; j++) {
                uint64_t e = l2e_get(q, s, j), off, len;
                switch (qcow2_l2_entry_type(&q->h, e, q->extl2)) {
                case QCOW2_CLUSTER_NORMAL:
                case QCOW2_CLUSTER_ZERO_ALLOC:
                    off = e & L2E_OFFSET_MASK;
                    len = cs;
                    break;
                case QCOW2_CLUSTER_COMPRESSED:
                    qcow2_compressed_desc(&q->h, e, &off, &len);
                    break;
                case QCOW2_CLUSTER_INVALID:
                    snprintf(err, errlen, "%s: L2 entry 0x%llx in the table at 0x%llx is invalid",
                             what, (unsigned long long)e, (unsigned long long)t);
                    r = -EIO;
                    continue;
                default:
                    continue;
                }
                uint64_t first = off / cs, last = (off + len - 1) / cs;
                if (last >= nclusters) {
                    snprintf(err, errlen, "%s: L2 entry 0x%llx maps past the end of the file", what,
                             (unsigned long long)e);
                    r = -EIO;
                } else {
                    r = runs_add(out, first, last - first + 1);
                }
            }
            qcow2_cache_put(&q->l2c, s);
        }
    }
    if (r == -ENOMEM)
        snprintf(err, errlen, "out of memory");
    return r;
}

/* One more reference on every cluster of the runs; all or nothing. */
static int refs_inc(struct qcow2 *q, const struct runs *rs, char *err, size_t errlen)
{
    for (size_t i = 0; i < rs->len; i++) {
        for (uint64_t k = 0; k < rs->v[i].n; k++) {
            uint64_t c = rs->v[i].c + k;
            int r = qcow2_rc_update(q, c, 1);
            if (r == 0)
                continue;
            if (r == -ERANGE)
                snprintf(err, errlen, "cluster %llu already has as many references as %u-bit "
                         "refcounts can count (more bits: qemu-img amend -o refcount_bits=16)",
                         (unsigned long long)c, q->h.refcount_bits);
            else
                snprintf(err, errlen, "cannot raise the refcount of cluster %llu: %s",
                         (unsigned long long)c, strerror(-r));
            /* Undo what was raised: nothing refers to it yet. */
            for (size_t j = 0; j <= i; j++)
                for (uint64_t m = 0; m < (j == i ? k : rs->v[j].n); m++)
                    qcow2_rc_update(q, rs->v[j].c + m, -1);
            return r;
        }
    }
    return 0;
}

/* Take back raises whose owner never became durable (nothing names them). */
static void refs_undo(struct qcow2 *q, const struct runs *rs)
{
    for (size_t i = 0; i < rs->len; i++)
        for (uint64_t k = 0; k < rs->v[i].n; k++)
            qcow2_rc_update(q, rs->v[i].c + k, -1);
}

/* Drop one reference per cluster of the runs, whose last referrer is gone
 * from the disk already; clusters left unused are punched, as QEMU discards
 * them (pass-discard-snapshot). */
static int refs_release(struct qcow2 *q, const struct runs *rs, struct del_progress *p)
{
    for (size_t i = 0; i < rs->len; i++) {
        qcow2_free_durable(q, rs->v[i].c << cl_bits(q), rs->v[i].n << cl_bits(q), true);
        /* Applied in batches, to show progress (the order does not matter:
         * nothing on disk names any of these clusters). */
        if (p && p->fn && i % 256 == 255) {
            int r = qcow2_apply_ready_frees(q);
            if (r < 0)
                return r;
            progress_at(p, i, rs->len);
        }
    }
    return qcow2_apply_ready_frees(q);
}

/* ---- COPIED flags ------------------------------------------------------------- */

/* Over the L2 tables an L1 table names (and its entries, when l1_dirty is
 * given: the active one): clear_all clears every COPIED flag (each count
 * was just raised); otherwise COPIED is set exactly where the count is 1
 * (QEMU's refcount pass with addend 0). */
static int set_copied(struct qcow2 *q, uint64_t *l1, uint32_t l1_size, uint8_t *l1_dirty, bool clear_all,
                      struct del_progress *p)
{
    uint64_t cs = cl_size(q);
    uint32_t per = q->l2c.slice_size / q->h.l2_entry_size;
    int r = 0;
    for (uint32_t i = 0; i < l1_size && r == 0; i++) {
        uint64_t t, rc;
        progress_at(p, i, l1_size);
        if (l1_entry_table(q, l1[i], &t) < 0)
            return -EIO;
        if (!t)
            continue;
        for (uint64_t so = 0; so < cs && r == 0; so += q->l2c.slice_size) {
            struct mslice *s;
            r = qcow2_cache_get(&q->l2c, t + so, &s);
            if (r < 0)
                break;
            for (uint32_t j = 0; j < per && r == 0; j++) {
                uint8_t *p = s->data + (size_t)j * q->h.l2_entry_size;
                uint64_t e = be64_load(p), want = 0;
                enum qcow2_cluster_type ty = qcow2_l2_entry_type(&q->h, e, q->extl2);
                if (ty == QCOW2_CLUSTER_COMPRESSED || ty == QCOW2_CLUSTER_INVALID)
                    continue;
                if (!clear_all && (ty == QCOW2_CLUSTER_NORMAL || ty == QCOW2_CLUSTER_ZERO_ALLOC)) {
                    r = qcow2_rc_get(q, (e & L2E_OFFSET_MASK) >> cl_bits(q), &rc);
                    want = rc == 1 ? QCOW_OFLAG_COPIED : 0;
                }
                if (r == 0 && (e & QCOW_OFLAG_COPIED) != want) {
                    qcow2_map_changed(q);
                    be64_store(p, (e & ~QCOW_OFLAG_COPIED) | want);
                    qcow2_cache_mark_dirty(s);
                }
            }
            qcow2_cache_put(&q->l2c, s);
        }
        uint64_t want = 0;
        if (r == 0 && !clear_all) {
            r = qcow2_rc_get(q, t >> cl_bits(q), &rc);
            want = rc == 1 ? QCOW_OFLAG_COPIED : 0;
        }
        if (r == 0 && (l1[i] & QCOW_OFLAG_COPIED) != want) {
            qcow2_map_changed(q);
            l1[i] = (l1[i] & ~QCOW_OFLAG_COPIED) | want;
            if (l1_dirty)
                l1_dirty[(uint64_t)i * 8 / 512] = 1;
        }
    }
    return r;
}

/* ---- finding a snapshot ------------------------------------------------------------ */

/* Index of the snapshot spec names, or -1: "snapshot.id=ID[,snapshot.name=NAME]"
 * (either part, both must match) as qemu-nbd -l takes it, else an ID or,
 * failing that, a name (as qemu-img snapshot -a looks up). */
static int find_snapshot(const struct qcow2 *q, const char *spec)
{
    if (!strncmp(spec, "snapshot.id=", 12) || !strncmp(spec, "snapshot.name=", 14)) {
        char *copy = strdup(spec), *id = NULL, *name = NULL;
        if (!copy)
            return -1;
        for (char *p = copy; p;) {
            char *next = strstr(p, ",snapshot.");
            if (next)
                *next++ = '\0';
            if (!strncmp(p, "snapshot.id=", 12))
                id = p + 12;
            else if (!strncmp(p, "snapshot.name=", 14))
                name = p + 14;
            p = next;
        }
        int found = -1;
        for (uint32_t i = 0; i < q->h.nb_snapshots && found < 0; i++)
            if ((!id || !strcmp(q->snapshots[i].id, id)) && (!name || !strcmp(q->snapshots[i].name, name)))
                found = (int)i;
        free(copy);
        return found;
    }
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++)
        if (!strcmp(q->snapshots[i].id, spec))
            return (int)i;
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++)
        if (!strcmp(q->snapshots[i].name, spec))
            return (int)i;
    return -1;
}

/* The snapshot's L1 table, read and checked; *n entries. */
static int snapshot_l1(struct qcow2 *q, const struct qcow2_snapshot *sn, uint64_t **l1, char *err, size_t errlen)
{
    int r = qcow2_read_l1_table(q, sn->l1_table_offset, sn->l1_size, l1);
    if (r == -EINVAL)
        snprintf(err, errlen, "snapshot '%s' (ID %s): its L1 table (%u entries at 0x%llx) lies outside "
                 "the image", sn->name, sn->id, sn->l1_size, (unsigned long long)sn->l1_table_offset);
    else if (r < 0)
        snprintf(err, errlen, "snapshot '%s': cannot read its L1 table: %s", sn->name, strerror(-r));
    return r;
}

static int not_found(const struct qcow2 *q, const char *spec, char *err, size_t errlen)
{
    snprintf(err, errlen, "%s: no snapshot '%s' (see 'ublk-qcow2 snapshot list')", q->img.path, spec);
    return -ENOENT;
}

/* ---- list ------------------------------------------------------------------------------ */

int qcow2_snapshot_list(struct image *img, struct img_snapshot **out, uint32_t *n)
{
    struct qcow2 *q = to_qcow2(img);
    *out = NULL;
    *n = 0;
    if (!q->h.nb_snapshots)
        return 0;
    struct img_snapshot *v = calloc(q->h.nb_snapshots, sizeof(*v));
    if (!v)
        return -ENOMEM;
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++) {
        const struct qcow2_snapshot *s = &q->snapshots[i];
        v[i] = (struct img_snapshot){
            .id = strdup(s->id), .name = strdup(s->name), .vm_state_size = s->vm_state_size,
            .disk_size = s->disk_size, .date_sec = s->date_sec, .date_nsec = s->date_nsec,
            .vm_clock_nsec = s->vm_clock_nsec, .icount = s->icount,
        };
        if (!v[i].id || !v[i].name) {
            img_snapshot_list_free(v, i + 1);
            return -ENOMEM;
        }
    }
    *out = v;
    *n = q->h.nb_snapshots;
    return 0;
}

/* ---- the snapshot table ------------------------------------------------------------------ */

/* Write list (nb entries) as a new snapshot table in fresh clusters; its
 * offset and length (0, 0 for an empty list, as QEMU writes). */
static int write_snapshot_table(struct qcow2 *q, const struct qcow2_snapshot *list, uint32_t nb,
                                uint64_t *off, uint64_t *len, char *err, size_t errlen)
{
    uint8_t *buf;
    size_t n;
    int r = qcow2_snapshots_serialize(list, nb, &buf, &n);
    *off = *len = 0;
    if (r == 0 && n)
        r = qcow2_write_fresh_table(q, buf, n, off);
    free(buf);
    if (r == -EFBIG)
        snprintf(err, errlen, "the snapshot table would exceed QEMU's limit of %u bytes",
                 QCOW2_MAX_SNAPSHOT_TABLE);
    else if (r < 0)
        snprintf(err, errlen, "cannot write the new snapshot table: %s", strerror(-r));
    else
        *len = n;
    return r;
}

/* Give back fresh clusters nothing on disk names (a step that failed). */
static void unalloc(struct qcow2 *q, uint64_t off, uint64_t len)
{
    for (uint64_t c = off >> cl_bits(q); len && c <= (off + len - 1) >> cl_bits(q); c++)
        qcow2_rc_update(q, c, -1);
}

/* The header switch failed: whether the sector reached the disk is not
 * known, so nothing more may be written in this session.  On v3 the dirty
 * bit on disk makes the next open rebuild the refcounts either way. */
static int switch_failed(struct qcow2 *q, int r, const char *what, char *err, size_t errlen)
{
    q->broken = true;
    snprintf(err, errlen, "%s: writing the header failed (%s); the image may need 'qemu-img check -r all'",
             what, strerror(-r));
    return r;
}

/* Set or clear the dirty bit (v3) and make it durable. */
static int set_dirty(struct qcow2 *q, bool on)
{
    if (q->h.version < 3)
        return 0;
    uint64_t was = q->h.incompatible_features;
    if (on)
        q->h.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
    else
        q->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
    int r = qcow2_header_commit(q);
    if (r < 0)
        q->h.incompatible_features = was;
    return r;
}

/* Flush until dropped references are applied and written: the operation
 * leaves nothing behind in memory. */
static int settle(struct qcow2 *q)
{
    int r = 0;
    for (int i = 0; i < 4 && r == 0; i++) {
        r = qcow2_flush(q);
        if (!q->frees_pending && !q->frees_ready && !qcow2_cache_has_dirty(&q->rcc) && !qcow2_cache_has_dirty(&q->l2c))
            break;
    }
    return r;
}

/* Open the window in which counts and COPIED flags may disagree on disk
 * (v3: the dirty bit, durable before the first such write). */
static int begin_dirty(struct qcow2 *q, char *err, size_t errlen)
{
    int r = set_dirty(q, true);
    if (r < 0)
        snprintf(err, errlen, "cannot mark the image dirty: %s", strerror(-r));
    return r;
}

/* Close it: COPIED flags right again, dropped references applied and
 * written, then the dirty bit cleared.  On failure the image stays dirty
 * and is repaired on its next open. */
static int end_dirty(struct qcow2 *q, struct del_progress *p)
{
    int r = set_copied(q, q->l1, q->h.l1_size, q->l1_dirty, false, p);
    if (r == 0)
        r = settle(q);
    if (r == 0)
        r = set_dirty(q, false);
    return r;
}

/* ---- create ---------------------------------------------------------------------------------- */

/* What a create has done so far: undone on failure, before the switch. */
struct create_state {
    struct runs rs;                 /* the clusters the active tables use */
    struct qcow2_snapshot *list;    /* the new table: the old entries plus one */
    uint32_t nb;                    /* entries before */
    uint8_t *l1buf;
    uint64_t l1off, l1bytes;        /* the snapshot's L1 table */
    uint64_t toff, tlen;            /* the new snapshot table */
    bool raised, dirty;
    char id[32];
};

/* The checks before anything is touched (as QEMU's, where QEMU has them). */
static int create_allowed(struct qcow2 *q, const char *name, char *err, size_t errlen)
{
    const char *path = q->img.path;
    if (!name[0] || strlen(name) > QCOW2_MAX_SNAPSHOT_NAME) {
        snprintf(err, errlen, "a snapshot name must have 1 to %d bytes", QCOW2_MAX_SNAPSHOT_NAME);
        return -EINVAL;
    }
    if (q->h.nb_snapshots >= QCOW2_MAX_SNAPSHOTS) {
        snprintf(err, errlen, "%s already has %d snapshots, QEMU's limit", path, QCOW2_MAX_SNAPSHOTS);
        return -EFBIG;
    }
    /* QEMU refuses too: the data file's clusters have no refcounts to share. */
    if (has_data_file(q)) {
        snprintf(err, errlen, "%s has an external data file: internal snapshots are not supported "
                 "with one (as in QEMU)", path);
        return -ENOTSUP;
    }
    if (q->h.refcount_bits == 1) {
        snprintf(err, errlen, "%s has 1-bit refcounts, which cannot count a snapshot's references "
                 "(more bits: qemu-img amend -o refcount_bits=16)", path);
        return -ERANGE;
    }
    return 0;
}

/* QEMU's rule: the next ID after the largest numeric one. */
static void next_snapshot_id(const struct qcow2 *q, char *id, size_t len)
{
    unsigned long long max_id = 0;
    for (uint32_t i = 0; i < q->h.nb_snapshots; i++) {
        unsigned long long v = strtoull(q->snapshots[i].id, NULL, 10);
        if (v > max_id)
            max_id = v;
    }
    snprintf(id, len, "%llu", max_id + 1);
}

/* Raise the count of every cluster the active tables use: they become
 * shared with the snapshot. */
static int share_active_clusters(struct qcow2 *q, struct create_state *c, char *err, size_t errlen)
{
    /* From here until the header switch, counts and COPIED flags may
     * disagree on disk (v3: dirty; see the top of the file). */
    int r = begin_dirty(q, err, errlen);
    if (r < 0)
        return r;
    c->dirty = true;
    /* COPIED flags go first, durably: a count of 1 without COPIED only makes
     * a write copy the cluster, while COPIED over a raised count would let
     * one overwrite a shared cluster (the order that matters on v2). */
    r = set_copied(q, q->l1, q->h.l1_size, q->l1_dirty, true, NULL);
    if (r == 0)
        r = qcow2_flush(q);
    if (r < 0) {
        snprintf(err, errlen, "cannot update the active tables: %s", strerror(-r));
        return r;
    }
    r = refs_inc(q, &c->rs, err, errlen);
    if (r < 0)
        return r;
    c->raised = true;
    return 0;
}

/* The snapshot's L1 table: the active one as it is now (without COPIED:
 * a snapshot's tables are never written in place). */
static int write_snapshot_l1(struct qcow2 *q, struct create_state *c, char *err, size_t errlen)
{
    if (!c->l1bytes)
        return 0;
    int r = 0;
    c->l1buf = malloc(c->l1bytes);
    if (!c->l1buf)
        r = -ENOMEM;
    for (uint32_t i = 0; r == 0 && i < q->h.l1_size; i++)
        be64_store(c->l1buf + (uint64_t)i * 8, q->l1[i] & ~QCOW_OFLAG_COPIED);
    if (r == 0)
        r = qcow2_write_fresh_table(q, c->l1buf, c->l1bytes, &c->l1off);
    if (r < 0) {
        c->l1off = 0;
        snprintf(err, errlen, "cannot write the snapshot's L1 table: %s", strerror(-r));
    }
    return r;
}

/* The new snapshot table (the old entries and the new one), written and
 * flushed but not yet named by the header. */
static int write_new_table(struct qcow2 *q, struct create_state *c, const char *name,
                           char *err, size_t errlen)
{
    if (c->nb)
        memcpy(c->list, q->snapshots, c->nb * sizeof(*c->list));
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct qcow2_snapshot *sn = &c->list[c->nb];
    *sn = (struct qcow2_snapshot){
        .l1_table_offset = c->l1off, .l1_size = q->h.l1_size, .id = strdup(c->id), .name = strdup(name),
        .date_sec = (uint32_t)now.tv_sec, .date_nsec = (uint32_t)(now.tv_nsec / 1000 * 1000),
        .vm_clock_nsec = 0, .vm_state_size = 0, .disk_size = q->h.size,
        .icount = UINT64_MAX,   /* as QEMU records outside record/replay */
        .extra_size = 0,        /* written with QEMU's 24 known bytes (entry_store) */
    };
    if (!sn->id || !sn->name) {
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    int r = write_snapshot_table(q, c->list, c->nb + 1, &c->toff, &c->tlen, err, errlen);
    if (r < 0)
        return r;
    /* Everything the new table names is durable before the header names
     * it: the raised counts, the new L1 copy and table (the flush syncs). */
    r = qcow2_flush(q);
    if (r < 0)
        snprintf(err, errlen, "flush failed: %s", strerror(-r));
    return r;
}

static void create_state_free(struct create_state *c)
{
    free(c->list);
    free(c->l1buf);
    runs_free(&c->rs);
}

/* Before the switch nothing on disk names what was raised or allocated:
 * take it back. */
static void create_undo(struct qcow2 *q, struct create_state *c)
{
    if (c->toff)
        unalloc(q, c->toff, c->tlen);
    if (c->l1off)
        unalloc(q, c->l1off, c->l1bytes);
    if (c->raised)
        refs_undo(q, &c->rs);
    if (c->list) {
        free(c->list[c->nb].id);
        free(c->list[c->nb].name);
    }
    create_state_free(c);
    if (c->dirty)
        end_dirty(q, NULL);
}

/* The switch: one sector write (atomic) names the new table and, on v3,
 * clears the dirty bit (counts and flags agree again).  Then the old
 * table is freed. */
static int switch_to_new_table(struct qcow2 *q, struct create_state *c, const char *name,
                               char *id_out, size_t idlen, char *err, size_t errlen)
{
    uint64_t old_off = q->h.snapshots_offset, old_len = q->snapshot_table_len;
    q->h.nb_snapshots = c->nb + 1;
    q->h.snapshots_offset = c->toff;
    q->h.incompatible_features &= ~QCOW2_INCOMPAT_DIRTY;
    int r = qcow2_header_commit(q);
    if (r < 0) {
        q->h.nb_snapshots = c->nb;     /* keeps q->snapshots freeable */
        qcow2_map_changed(q);
        free(c->list[c->nb].id);
        free(c->list[c->nb].name);
        create_state_free(c);
        return switch_failed(q, r, "snapshot create", err, errlen);
    }
    free(q->snapshots);
    q->snapshots = c->list;
    c->list = NULL;
    q->snapshot_table_len = c->tlen;
    qcow2_map_changed(q);
    if (id_out)
        snprintf(id_out, idlen, "%s", c->id);
    create_state_free(c);
    /* The new L1 copy and the tables it names are metadata now. */
    r = qcow2_ol_rebuild(q);
    /* The old table is unreferenced once the header is durable. */
    if (r == 0 && c->nb && old_len)
        qcow2_free_durable(q, old_off, old_len, true);
    if (r == 0)
        r = qcow2_apply_ready_frees(q);
    if (r == 0)
        r = settle(q);
    if (r < 0)
        snprintf(err, errlen, "snapshot '%s' (ID %s) was created, but freeing the old snapshot table "
                 "failed: %s", name, c->id, strerror(-r));
    return r;
}

int qcow2_snapshot_create(struct image *img, const char *name, char *id_out, size_t idlen,
                          char *err, size_t errlen)
{
    struct qcow2 *q = to_qcow2(img);
    int r = create_allowed(q, name, err, errlen);
    if (r < 0)
        return r;
    r = qcow2_exclusive_begin(q, err, errlen);
    if (r < 0)
        return r;
    struct create_state c = { .nb = q->h.nb_snapshots, .l1bytes = (uint64_t)q->h.l1_size * 8 };
    next_snapshot_id(q, c.id, sizeof(c.id));
    r = collect_refs(q, q->l1, q->h.l1_size, "the active L1 table", &c.rs, NULL, err, errlen);
    if (r < 0) {
        runs_free(&c.rs);
        return r;
    }
    c.list = calloc(c.nb + 1, sizeof(*c.list));
    if (!c.list) {
        r = -ENOMEM;
        snprintf(err, errlen, "out of memory");
    }
    if (r == 0)
        r = share_active_clusters(q, &c, err, errlen);
    if (r == 0)
        r = write_snapshot_l1(q, &c, err, errlen);
    if (r == 0)
        r = write_new_table(q, &c, name, err, errlen);
    if (r < 0) {
        create_undo(q, &c);
        return r;
    }
    return switch_to_new_table(q, &c, name, id_out, idlen, err, errlen);
}

/* ---- delete ---------------------------------------------------------------------------------- */

int qcow2_snapshot_delete(struct image *img, const char *spec, img_progress_fn progress, void *ctx,
                          char *err, size_t errlen)
{
    struct del_progress prog = { .fn = progress, .ctx = ctx };
    struct qcow2 *q = to_qcow2(img);
    int idx = find_snapshot(q, spec);
    if (idx < 0)
        return not_found(q, spec, err, errlen);
    int r = qcow2_exclusive_begin(q, err, errlen);
    if (r < 0)
        return r;
    struct qcow2_snapshot *sn = &q->snapshots[idx];
    char what[300];
    snprintf(what, sizeof(what), "snapshot '%.255s'", sn->name);
    uint64_t *sl1 = NULL;
    struct runs rs = { 0 };
    /* Everything it references, checked before anything changes. */
    r = snapshot_l1(q, sn, &sl1, err, errlen);
    if (r == 0)
        r = collect_refs(q, sl1, sn->l1_size, what, &rs, &prog, err, errlen);
    if (r == 0 && sn->l1_size)
        r = runs_add(&rs, sn->l1_table_offset >> cl_bits(q), table_clusters(q, sn->l1_size));
    free(sl1);
    uint32_t nb = q->h.nb_snapshots;
    struct qcow2_snapshot *list = r == 0 ? calloc(nb, sizeof(*list)) : NULL;
    if (r == 0 && !list)
        r = -ENOMEM;
    uint64_t toff = 0, tlen = 0;
    if (r == 0) {
        memcpy(list, q->snapshots, idx * sizeof(*list));
        memcpy(list + idx, q->snapshots + idx + 1, (nb - idx - 1) * sizeof(*list));
        r = write_snapshot_table(q, list, nb - 1, &toff, &tlen, err, errlen);
    }
    if (r == 0) {
        r = qcow2_flush(q);
        if (r < 0)
            snprintf(err, errlen, "flush failed: %s", strerror(-r));
    }
    if (r < 0) {
        if (r == -ENOMEM)
            snprintf(err, errlen, "out of memory");
        if (toff)
            unalloc(q, toff, tlen);
        free(list);
        runs_free(&rs);
        return r;
    }
    /* The switch: the table without the snapshot, and (v3) the dirty bit,
     * in one sector write.  From here on the snapshot's counts go down
     * and COPIED flags come back: they may disagree on disk until done. */
    uint64_t old_off = q->h.snapshots_offset, old_len = q->snapshot_table_len;
    q->h.nb_snapshots = nb - 1;
    q->h.snapshots_offset = toff;
    if (q->h.version >= 3)
        q->h.incompatible_features |= QCOW2_INCOMPAT_DIRTY;
    r = qcow2_header_commit(q);
    if (r < 0) {
        q->h.nb_snapshots = nb;
        qcow2_map_changed(q);
        free(list);
        runs_free(&rs);
        return switch_failed(q, r, "snapshot delete", err, errlen);
    }
    struct qcow2_snapshot gone = q->snapshots[idx];
    free(q->snapshots);
    q->snapshots = list;
    q->snapshot_table_len = tlen;
    qcow2_map_changed(q);
    free(gone.id);
    free(gone.name);
    free(gone.extra);
    /* The snapshot's tables leave the index before they can be freed. */
    r = qcow2_ol_rebuild(q);
    if (r == 0 && old_len)
        qcow2_free_durable(q, old_off, old_len, true);
    if (r == 0) {
        prog.phase = 1;
        r = refs_release(q, &rs, &prog);
    }
    runs_free(&rs);
    if (r == 0) {
        prog.phase = 2;
        r = end_dirty(q, &prog);
    }
    if (r == 0)
        progress_at(&prog, 1, 1);
    if (r < 0)
        snprintf(err, errlen, "the snapshot is deleted, but releasing its clusters failed (%s); "
                 "the image is left to be repaired on its next open", strerror(-r));
    return r;
}

/* ---- apply ----------------------------------------------------------------------------------- */

int qcow2_snapshot_apply(struct image *img, const char *spec, char *err, size_t errlen)
{
    struct qcow2 *q = to_qcow2(img);
    int idx = find_snapshot(q, spec);
    if (idx < 0)
        return not_found(q, spec, err, errlen);
    int r = qcow2_exclusive_begin(q, err, errlen);
    if (r < 0)
        return r;
    const struct qcow2_snapshot *sn = &q->snapshots[idx];
    char what[300];
    snprintf(what, sizeof(what), "snapshot '%.255s'", sn->name);
    uint64_t size = sn->disk_size, need = qcow2_l1_entries_for(q, size);
    uint64_t n = q->h.l1_size;
    if (sn->l1_size > n)
        n = sn->l1_size;
    if (need > n)
        n = need;
    if ((size & 511) || n * 8 > QCOW2_MAX_L1_BYTES) {
        snprintf(err, errlen, "%s records a disk size (%llu bytes) this image cannot have", what,
                 (unsigned long long)size);
        return -EINVAL;
    }
    uint64_t *sl1 = NULL, *nl1 = NULL;
    uint8_t *l1buf = NULL, *ndirty = NULL;
    struct runs now = { 0 }, old = { 0 };
    uint64_t noff = 0;
    bool raised = false, dirty = false;
    /* What the snapshot references (raised now) and what the active table
     * references (dropped once the switch is durable), both checked first. */
    r = snapshot_l1(q, sn, &sl1, err, errlen);
    if (r == 0)
        r = collect_refs(q, sl1, sn->l1_size, what, &now, NULL, err, errlen);
    if (r == 0)
        r = collect_refs(q, q->l1, q->h.l1_size, "the active L1 table", &old, NULL, err, errlen);
    if (r == 0 && q->h.l1_size)
        r = runs_add(&old, q->h.l1_table_offset >> cl_bits(q), table_clusters(q, q->h.l1_size));
    nl1 = r == 0 ? calloc(n, sizeof(*nl1)) : NULL;
    l1buf = r == 0 ? io_zalloc(table_clusters(q, n) << cl_bits(q)) : NULL;
    ndirty = r == 0 ? calloc((n * 8 + 511) / 512 + 1, 1) : NULL;
    if (r == 0 && (!nl1 || !ndirty)) {
        r = -ENOMEM;
        snprintf(err, errlen, "out of memory");
    }
    if (r < 0)
        goto out;
    r = begin_dirty(q, err, errlen);
    if (r < 0)
        goto out;
    dirty = true;
    r = refs_inc(q, &now, err, errlen);
    if (r < 0)
        goto out;
    raised = true;
    /* The new active table: the snapshot's entries, none COPIED (every
     * count was just raised to at least 2), also in its L2 tables. */
    for (uint32_t i = 0; i < sn->l1_size; i++)
        nl1[i] = sl1[i] & ~QCOW_OFLAG_COPIED;
    for (uint64_t i = 0; i < n; i++)
        be64_store(l1buf + i * 8, nl1[i]);
    r = set_copied(q, nl1, (uint32_t)n, NULL, true, NULL);
    if (r == 0)
        r = qcow2_write_fresh_table(q, l1buf, n * 8, &noff);
    if (r == 0)
        r = qcow2_flush(q);
    if (r < 0) {
        snprintf(err, errlen, "cannot write the new active tables: %s", strerror(-r));
        goto out;
    }
    /* The switch: size, L1 offset and length in one sector write. */
    struct qcow2_header was = q->h;
    q->h.l1_table_offset = noff;
    q->h.l1_size = (uint32_t)n;
    q->h.size = size;
    r = qcow2_header_commit(q);
    if (r < 0) {
        q->h = was;
        qcow2_map_changed(q);
        raised = false;     /* may be in force on disk: keep the counts */
        noff = 0;
        r = switch_failed(q, r, "snapshot apply", err, errlen);
        goto out;
    }
    qcow2_derive_sizes(q);
    qcow2_map_changed(q);
    free(q->l1);
    free(q->l1_dirty);
    q->l1 = nl1;
    q->l1_dirty = ndirty;
    nl1 = NULL;
    ndirty = NULL;
    raised = false;
    noff = 0;
    /* The new active tables in the index, the old ones out of it, before
     * those are freed. */
    r = qcow2_ol_rebuild(q);
    /* The old active tables are unreferenced on disk now. */
    if (r == 0)
        r = refs_release(q, &old, NULL);
    if (r == 0)
        r = end_dirty(q, NULL);
    if (r < 0)
        snprintf(err, errlen, "the snapshot is applied, but releasing the old clusters failed (%s); "
                 "the image is left to be repaired on its next open", strerror(-r));
    dirty = false;
out:
    if (noff)
        unalloc(q, noff, n * 8);
    if (raised)
        refs_undo(q, &now);
    if (dirty)
        end_dirty(q, NULL);
    free(sl1);
    free(nl1);
    free(ndirty);
    io_free(l1buf);
    runs_free(&now);
    runs_free(&old);
    return r;
}

/* ---- a snapshot as a read-only image ----------------------------------------------------------- */

int qcow2_open_snapshot(struct qcow2 *q, const char *spec, char *err, size_t errlen)
{
    int idx = find_snapshot(q, spec);
    if (idx < 0) {
        snprintf(err, errlen, "no snapshot '%s' in the image (see 'ublk-qcow2 snapshot list')", spec);
        return -ENOENT;
    }
    const struct qcow2_snapshot *sn = &q->snapshots[idx];
    /* As QEMU loads a snapshot (qemu-nbd -l, qemu-img convert -l): its L1
     * table becomes the mapping, the image keeps its current virtual size,
     * and whatever lies past the snapshot's own table reads as unallocated. */
    uint64_t n = sn->l1_size > q->h.l1_size ? sn->l1_size : q->h.l1_size;
    uint64_t *sl1;
    int r = snapshot_l1(q, sn, &sl1, err, errlen);
    if (r < 0)
        return r;
    uint64_t *l1 = calloc(n ? n : 1, sizeof(*l1));
    uint8_t *dirty = calloc((n * 8 + 511) / 512 + 1, 1);
    if (!l1 || !dirty) {
        free(sl1);
        free(l1);
        free(dirty);
        snprintf(err, errlen, "out of memory");
        return -ENOMEM;
    }
    if (sn->l1_size)
        memcpy(l1, sl1, (uint64_t)sn->l1_size * 8);
    free(sl1);
    qcow2_map_changed(q);
    free(q->l1);
    free(q->l1_dirty);
    q->l1 = l1;
    q->l1_dirty = dirty;
    q->h.l1_size = (uint32_t)n;
    q->h.l1_table_offset = sn->l1_table_offset;
    return 0;
}
