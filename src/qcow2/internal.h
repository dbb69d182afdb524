/* The qcow2 engine's private state, shared by its files:
 *   qcow2.c     requests in flight, header updates, flush ordering
 *   open.c      open (header, tables, caches, backing chain) and close
 *   cache.c     L2-table and refcount-block slices in memory
 *   refcount.c  refcounts, the cluster allocator, deferred frees
 *   cluster.c   guest-to-host mapping, the read and write paths
 *   repair.c    the reference walk and refcount rebuild (dirty images, the checker)
 *   datafile.c  where guest data lives: the image file or an external data file
 *   bitmap.c    persistent dirty bitmaps kept up to date
 *   crypto.c    LUKS encryption of guest data
 *   overlap.c   metadata overlap checks before every write
 *   snapshot.c  internal snapshots: list, create, delete, apply, open one
 *   resize.c    virtual size changes
 *   exclusive.c what the exclusive operations (resize, snapshots) share
 *   zcache.c    recently decompressed clusters; (de)compression on the worker pool
 *   zwrite.c    writing compressed clusters (convert -c)
 */
#ifndef UQ_QCOW2_INTERNAL_H
#define UQ_QCOW2_INTERNAL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/uio.h>

#include "io/coroutine.h"
#include "io/file.h"
#include "io/stat.h"
#include "io/workpool.h"
#include "qcow2/format.h"
#include "img/image.h"
#include "qcow2/verdict.h"

struct qcow2;
struct map_hint;

/* ---- metadata cache (cache.c) ------------------------------------------- */
struct mslice {
    uint64_t off;               /* host offset of the slice; valid when in use */
    uint8_t *data;
    uint32_t refs;              /* pins by requests: never evicted while > 0 */
    bool in_use, loading, dirty;
    int load_err;
    struct co_queue waiters;    /* requests waiting for this slice to load */
    struct mslice *hnext;
    struct mslice *lru_prev, *lru_next;
};

struct mcache {
    struct qcow2 *q;
    const char *name;           /* "L2" or "refcount" (messages) */
    bool is_l2;
    uint32_t slice_size;
    uint32_t slice_shift;       /* log2(slice_size) */
    uint32_t nslices;
    struct mslice *slices;
    uint8_t *mem;
    struct mslice **hash;
    uint32_t hash_mask;
    struct mslice lru;          /* sentinel: lru.lru_next is the least recently used */
    struct co_queue slot_waiters;
    stat_counter hits, misses;  /* read by img_get_stats from other threads */
};

int qcow2_cache_init(struct mcache *c, struct qcow2 *q, const char *name, bool is_l2,
                uint32_t slice_size, uint32_t nslices);
void qcow2_cache_free(struct mcache *c);
/* Pin the slice at host offset off, loading it from disk if needed. */
int qcow2_cache_get(struct mcache *c, uint64_t off, struct mslice **out);
void qcow2_cache_put(struct mcache *c, struct mslice *s);
/* A slice used without qcow2_cache_get (map hints): counted as a hit and
 * made the most recently used. */
void qcow2_cache_touch(struct mcache *c, struct mslice *s);
static inline void qcow2_cache_mark_dirty(struct mslice *s) { s->dirty = true; }
/* Drop every cached slice inside [off, off+len) (a table being freed).
 * Slices pinned (by a request, or by a flush writing their copy) or being
 * loaded cannot go: returns true if any such slice is left. */
bool qcow2_cache_discard_range(struct mcache *c, uint64_t off, uint64_t len);
/* Snapshot (copy) every dirty slice and clear its dirty flag; the copies
 * are what a flush writes, so entries changed after this point wait for the
 * next flush (their data may not be durable yet). */
struct mcopy { struct mslice *s; uint8_t *data; };  /* the slice stays pinned until written */
int qcow2_cache_snapshot_dirty(struct mcache *c, struct mcopy **out, uint32_t *n);
/* Write copies taken by qcow2_cache_snapshot_dirty, unless ret (an earlier
 * error) is already negative: then, as after a failed write, the slices are
 * marked dirty again.  Frees the copies; returns the first error. */
int qcow2_cache_write_copies(struct mcache *c, struct mcopy *copies, uint32_t n, int ret);
bool qcow2_cache_has_dirty(struct mcache *c);

/* ---- deferred refcount decrements (refcount.c) --------------------------- */
struct deferred_free {
    uint64_t off, len;          /* host byte range; each cluster touched loses one ref */
    uint64_t tick;              /* when the last reference was dropped in memory */
    bool punch;                 /* a discard: punch clusters whose refcount reaches 0 */
    struct deferred_free *next;
};

/* ---- requests in flight (for safe reuse of freed clusters) --------------- */
struct qreq {
    uint64_t tick;
    struct qreq *prev, *next;
};

/* A guest cluster range whose allocation is in flight: other writers to it wait. */
struct inflight_alloc {
    uint64_t first, last;       /* guest cluster indexes, inclusive */
    struct co_queue waiters;
    struct inflight_alloc *next;
};

/* ---- metadata overlap index (overlap.c) ----------------------------------- */
enum {
    OL_BIT_HEADER, OL_BIT_ACTIVE_L1, OL_BIT_REFTABLE, OL_BIT_SNAPSHOT_TABLE,
    OL_BIT_INACTIVE_L1, OL_BIT_ACTIVE_L2, OL_BIT_INACTIVE_L2, OL_BIT_REFBLOCK,
    OL_BIT_CRYPTO,      /* the LUKS header: a fixed range, never in ol_index.cl (3 kind bits) */
    OL_NKINDS
};
#define OL_HEADER         (1u << OL_BIT_HEADER)
#define OL_ACTIVE_L1      (1u << OL_BIT_ACTIVE_L1)
#define OL_REFTABLE       (1u << OL_BIT_REFTABLE)
#define OL_SNAPSHOT_TABLE (1u << OL_BIT_SNAPSHOT_TABLE)
#define OL_INACTIVE_L1    (1u << OL_BIT_INACTIVE_L1)
#define OL_ACTIVE_L2      (1u << OL_BIT_ACTIVE_L2)
#define OL_INACTIVE_L2    (1u << OL_BIT_INACTIVE_L2)
#define OL_REFBLOCK       (1u << OL_BIT_REFBLOCK)
#define OL_CRYPTO         (1u << OL_BIT_CRYPTO)

struct ol_range { uint64_t off, len; };
struct ol_index {
    uint64_t *cl;               /* sorted: cluster offset | OL_BIT_* of single-cluster tables */
    size_t n, cap;
    struct ol_range *ranges;    /* snapshot L1 tables, sorted by offset */
    uint64_t *max_end;          /* max end of ranges[0..i] */
    size_t nranges;
    uint32_t gen;               /* changes with cl and ranges (map hints, hint.c) */
};

struct qcow2 {
    struct image img;
    struct file file;
    struct qcow2_header h;
    uint8_t *hdr_buf;           /* the header cluster as on disk (extensions kept) */
    uint32_t hdr_len;           /* bytes of hdr_buf (min(cluster, 64 KiB)) */

    uint64_t *l1;               /* active L1, host endian; l1_alloc entries allocated */
    uint32_t l1_alloc;
    uint8_t *l1_dirty;          /* one flag per 512-byte sector of the L1 table */

    uint64_t *reftable;         /* host endian */
    uint64_t reftable_entries;
    uint8_t *reftable_dirty;    /* one flag per 512-byte sector */

    struct qcow2_snapshot *snapshots;
    uint64_t snapshot_table_len;   /* bytes, as measured when read */
    struct image *backing;      /* NULL if none */
    int backing_lock_fd;        /* holds QEMU-style reader locks on the backing file; -1 if none */

    struct mcache l2c, rcc;

    /* allocator */
    struct co_mutex alloc_lock;
    uint64_t free_hint;         /* no free cluster below this index */
    struct inflight_alloc *allocs;
    stat_counter clusters_allocated;    /* since open (statistics) */

    /* ordering and freeing */
    struct co_mutex flush_lock;
    uint64_t tick;
    struct qreq reqs;           /* sentinel of the FIFO of requests in flight */
    struct deferred_free *frees_pending;   /* L2 change not yet durable */
    struct deferred_free **frees_pending_tail;  /* its end: a trim may queue millions */
    struct deferred_free *frees_ready;     /* durable; apply once no old request runs */

    uint64_t host_end;          /* end of everything allocated or present at open */
    uint64_t file_len;          /* the file's size as we set it (>= host_end) */
    uint64_t open_len;          /* the file's size at open */
    bool no_prealloc;           /* fallocate unsupported here */
    bool flush_failed;          /* a sync failed: never report a later one as success */
    bool need_repair;           /* dirty bit: rebuild refcounts before writing */
    bool broken;                /* metadata found corrupt at run time: refuse writes */
    bool extl2;                 /* extended L2 entries: 32 subclusters per cluster */
    bool no_unref;              /* --discard-no-unref: discards keep our clusters */
    bool no_punch;              /* the file system cannot punch holes */

    /* Guest data (datafile.c): in the image file, or in an external data
     * file at host offset == guest offset, nothing refcounted there. */
    struct file *data;          /* &file, or &data_file */
    struct file data_file;
    int data_lock_fd;           /* QEMU-style locks on the data file; -1 if none */
    bool data_raw;              /* data_file_raw: the data file is a raw image of the guest */

    /* Compressed clusters (zcache.c, zwrite.c). */
    struct zcache *zc;          /* recently decompressed clusters; NULL if none */
    struct wp_port port;        /* completions of this engine's pool jobs */
    struct zwriter *zw;         /* compressed-cluster packing state; NULL until used */

    struct bitmaps *bitmaps;    /* enabled dirty bitmaps kept up to date (bitmap.c); NULL if none */
    struct luks *crypto;        /* LUKS master key contexts (crypto.c); NULL if not encrypted */
    struct ol_index ol;         /* where the metadata is (overlap.c) */
    struct map_hint *hints;     /* checked single-cluster mappings (hint.c) */
    uint64_t map_gen;           /* changes with anything a map verdict depends on (hint.c) */
};

/* Anything a mapping verdict may depend on changes now (an L1 or L2
 * entry, a cached slice, the overlap index, a header structure, the file's
 * end, the allocations in flight): hints stop being trusted without a
 * recheck (hint.c).  Called before or with the change, never after a wait. */
static inline void qcow2_map_changed(struct qcow2 *q) { q->map_gen++; }

static inline struct qcow2 *to_qcow2(struct image *img) { return (struct qcow2 *)img; }
static inline uint64_t cl_size(const struct qcow2 *q) { return q->h.cluster_size; }
static inline uint64_t cl_bits(const struct qcow2 *q) { return q->h.cluster_bits; }
static inline uint64_t start_of_cluster(const struct qcow2 *q, uint64_t off) { return off & ~(cl_size(q) - 1); }
static inline uint64_t offset_into_cluster(const struct qcow2 *q, uint64_t off) { return off & (cl_size(q) - 1); }
static inline bool has_data_file(const struct qcow2 *q) { return q->data != &q->file; }

/* Entry idx of an L2 slice, and its extended-L2 subcluster bitmap (0 without). */
static inline uint64_t l2e_get(const struct qcow2 *q, const struct mslice *s, uint32_t idx)
{
    return be64_load(s->data + (size_t)idx * q->h.l2_entry_size);
}

static inline uint64_t l2bm_get(const struct qcow2 *q, const struct mslice *s, uint32_t idx)
{
    return q->extl2 ? be64_load(s->data + (size_t)idx * 16 + 8) : 0;
}

/* The slice of the L2 table at host offset table holding its entry l2i,
 * and the entry's index in that slice. */
static inline uint64_t l2_slice_of(const struct qcow2 *q, uint64_t table, uint64_t l2i, uint32_t *idx)
{
    uint64_t byte = table + l2i * q->h.l2_entry_size;
    uint64_t soff = byte & ~(uint64_t)(q->l2c.slice_size - 1);
    *idx = (uint32_t)((byte - soff) / q->h.l2_entry_size);
    return soff;
}

/* The allocation in flight that covers guest cluster c, if any. */
static inline struct inflight_alloc *qcow2_find_alloc(const struct qcow2 *q, uint64_t c)
{
    for (struct inflight_alloc *a = q->allocs; a; a = a->next)
        if (c >= a->first && c <= a->last)
            return a;
    return NULL;
}

/* qcow2.c */
/* Resolve a file name an image refers to (backing or data file) against the
 * image's directory; refuses protocols and non-regular files. */
int qcow2_resolve_name(const char *image, const char *name, const char *what, char *out,
                       size_t outlen, char *err, size_t errlen);
/* qcow2_resolve_name for the backing file NAME of the image OVERLAY. */
int qcow2_resolve_backing(const char *overlay, const char *name, char *out, size_t outlen,
                          char *err, size_t errlen);
int qcow2_flush(struct qcow2 *q);
/* fdatasync the image file; once one failed, every later call fails (the
 * kernel may have dropped dirty pages: fsyncgate). */
int qcow2_sync(struct qcow2 *q);
int qcow2_write_header_fields(struct qcow2 *q);
void qcow2_mark_broken(struct qcow2 *q, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void qcow2_req_begin(struct qcow2 *q, struct qreq *r);
void qcow2_req_end(struct qcow2 *q, struct qreq *r);

/* refcount.c */
int qcow2_rc_get(struct qcow2 *q, uint64_t cluster, uint64_t *refcount);
/* Change a refcount in the cache.  A cluster whose count would reach 0
 * while a cached slice of it is still pinned or loading keeps its count
 * and -EBUSY is returned: a flush still writing its copy of that slice (or a
 * load) must not land on the cluster once the allocator reuses it. */
int qcow2_rc_update(struct qcow2 *q, uint64_t cluster, int64_t delta);
/* Allocate up to n contiguous free clusters (at least one) with refcount 1;
 * returns the host offset and the count in *got. Caller holds alloc_lock. */
int qcow2_alloc_clusters(struct qcow2 *q, uint64_t n, uint64_t *host_off, uint64_t *got);
/* Record that [0, end) is now in use; preallocates the file ahead. */
void qcow2_note_host_end(struct qcow2 *q, uint64_t end);
/* Switch to a refcount table already on disk and named by the header. */
void qcow2_install_reftable(struct qcow2 *q, uint64_t *table, uint8_t *dirty, uint64_t entries);
/* Queue one reference drop on every cluster of [off, off+len) after the next
 * flush makes the unreferencing L2/L1 change durable. */
void qcow2_defer_free(struct qcow2 *q, uint64_t off, uint64_t len);
/* The same for a reference dropped by a discard (or a write-zeroes that may
 * unmap): a cluster whose refcount reaches 0 is also punched out of the file. */
void qcow2_defer_free_punch(struct qcow2 *q, uint64_t off, uint64_t len);
int qcow2_apply_ready_frees(struct qcow2 *q);
/* Drop one reference on every cluster of [off, off+len) whose unreferencing
 * change is already durable and that no request in flight can be using
 * (exclusive operations): queued as ready, applied by qcow2_apply_ready_frees.
 * punch: a cluster left unused is punched out of the file, as QEMU discards
 * the clusters a deleted snapshot alone used. */
void qcow2_free_durable(struct qcow2 *q, uint64_t off, uint64_t len, bool punch);
/* Allocate n contiguous clusters (refcount 1 each; runs too short on the
 * way are given back).  Caller holds alloc_lock or runs exclusively. */
int qcow2_alloc_contiguous(struct qcow2 *q, uint64_t n, uint64_t *host_off);
/* Punch [off, off+len) out of the image file (advisory: 0 where the file
 * system cannot).  Refuses ranges holding the header or the fixed tables. */
int qcow2_punch_host(struct qcow2 *q, uint64_t off, uint64_t len);
/* Write one whole new cluster (content, or zeros if NULL), dropping any
 * cached slice of its previous use. */
int qcow2_write_new_cluster(struct qcow2 *q, uint64_t off, const uint8_t *content);

/* cluster.c */
int qcow2_co_read(struct image *img, void *buf, uint64_t off, uint64_t len);
int qcow2_co_write(struct image *img, const void *buf, uint64_t off, uint64_t len, unsigned flags);
int qcow2_co_map(struct image *img, uint64_t off, uint64_t len, unsigned flags, struct img_map *m);
int qcow2_co_map_end(struct image *img, struct img_map *m, unsigned flags, int result);
int qcow2_co_write_zeroes(struct image *img, uint64_t off, uint64_t len, unsigned flags);
int qcow2_co_discard(struct image *img, uint64_t off, uint64_t len);

/* datafile.c: every guest-data I/O of the read and write paths */
int qcow2_datafile_open(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen);
void qcow2_datafile_close(struct qcow2 *q);
int qcow2_datafile_sync(struct qcow2 *q);
int qcow2_data_read(struct qcow2 *q, uint8_t *buf, uint64_t len, uint64_t host);
int qcow2_data_writev(struct qcow2 *q, const struct iovec *iov, int niov, uint64_t host, bool fua);
int qcow2_data_zero(struct qcow2 *q, uint64_t host, uint64_t len, bool unmap);
int qcow2_data_punch(struct qcow2 *q, uint64_t host, uint64_t len);
int qcow2_datafile_zero_raw(struct qcow2 *q, uint64_t off, uint64_t len, bool unmap);
bool qcow2_datafile_entry_ok(struct qcow2 *q, uint64_t e, uint64_t guest_off);

/* crypto.c: LUKS (crypt_method 2); data is en/decrypted in place per
 * 512-byte sector, the IV from the host offset */
int qcow2_crypto_open(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen);
void qcow2_crypto_free(struct qcow2 *q);
int qcow2_crypto_encrypt(struct qcow2 *q, uint64_t host, uint8_t *buf, size_t len);
int qcow2_crypto_decrypt(struct qcow2 *q, uint64_t host, uint8_t *buf, size_t len);

/* bitmap.c: persistent dirty bitmaps */
int qcow2_bitmaps_open(struct qcow2 *q, char *err, size_t errlen);  /* read-write opens */
void qcow2_bitmaps_mark(struct qcow2 *q, uint64_t off, uint64_t len);  /* guest data changes there */
int qcow2_bitmaps_close(struct qcow2 *q);     /* store them (clean close) */
void qcow2_bitmaps_free(struct qcow2 *q);

/* overlap.c: call qcow2_ol_build once the tables are read; qcow2_ol_add/qcow2_ol_remove
 * whenever an L1 or refcount table entry starts or stops naming a table,
 * qcow2_ol_reindex_refblocks after a new refcount table is installed. */
int qcow2_ol_build(struct qcow2 *q);
void qcow2_ol_free(struct qcow2 *q);
void qcow2_ol_add(struct qcow2 *q, uint64_t off, unsigned bit);
void qcow2_ol_remove(struct qcow2 *q, uint64_t off, unsigned bit);
void qcow2_ol_reindex_refblocks(struct qcow2 *q);
/* Does [off, off+len) miss the structures found from the header's fields
 * (header, L1, refcount table, snapshot table, LUKS), outside ignore?  The
 * indexed ones are covered by ol.gen. */
bool qcow2_ol_fixed_clear(const struct qcow2 *q, uint64_t off, uint64_t len, unsigned ignore);

/* ---- map hints (hint.c) ---------------------------------------------------- */
void qcow2_hints_free(struct qcow2 *q);
/* Remember that guest offset off's cluster maps plainly by entry (e, bm)
 * of slice s: readable as one extent; writable in place too if the write
 * path said so while the overlap index was at ol_gen.  map_gen: q->map_gen
 * when the verdict was reached (from e, bm in the pinned slice). */
void qcow2_hint_store(struct qcow2 *q, uint64_t off, struct mslice *s, uint64_t e, uint64_t bm,
                      bool writable, uint32_t ol_gen, uint64_t map_gen);
/* The host offset of guest offset off if a hint still gives the answer the
 * map path would for a read or a (non-FUA) write that stays in off's
 * cluster (a hint's verdict is for the whole cluster). */
bool qcow2_hint_lookup(struct qcow2 *q, uint64_t off, bool write, uint64_t *host);
/* Does writing [off, off+len) touch metadata other than the kinds in
 * ignore (OL_* mask: the structure being written)?  0 if not; else -EIO
 * and a message naming `what` and the structure hit. */
int qcow2_ol_conflict(const struct qcow2 *q, uint64_t off, uint64_t len, unsigned ignore,
                const char *what, char *msg, size_t msglen);
/* qcow2_ol_conflict, and on a conflict mark the image broken with the message. */
int qcow2_ol_check(struct qcow2 *q, uint64_t off, uint64_t len, unsigned ignore, const char *what);

/* repair.c: the reference walk (references per host cluster, from all
 * metadata) and the refcount rebuild, shared by the open-time repair of
 * dirty images and the checker (check.c).  Counts are sparse: one array
 * per refcount-block range holding any (a hash table), so memory grows
 * with the clusters in use, never with the file's size, up to a budget. */
struct rc_walk {
    struct qcow2 *q;
    uint64_t nclusters;         /* strict: the file's clusters (nothing counted beyond);
                                 * checker: also past the last cluster counted */
    uint64_t file_end;          /* checker: references a cluster past this are corrupt */
    uint64_t rbe;               /* clusters per range (refcount block entries) */
    uint64_t *keys;             /* range index + 1; 0 = empty slot */
    uint32_t **chunks;          /* counts of the range */
    size_t cap, used;
    uint64_t last_ci;           /* the range counted last (runs stay in one range) */
    uint32_t *last;
    uint64_t *tables;           /* distinct L2 tables met (0 = empty slot) ... */
    uint32_t *refs;             /* ... and the references to each */
    size_t tcap, tused;
    uint64_t l1_read, l2_read, bitmap_read;   /* strict: work bounds, bytes read */
    /* The checker sets res: problems are counted there and described via
     * say, and the walk goes on.  Without res the walk is strict: any
     * invalid entry or reference past nclusters stops it (err says why). */
    struct check_result *res;
    unsigned fix;               /* checker: CHECK_FIX_* */
    void (*say)(void *ctx, const char *line);
    void *say_ctx;
    img_progress_fn progress;
    void *progress_ctx;
    uint64_t work_done, work_total;   /* L1 entries visited / to visit */
    char *err;
    size_t errlen;
};
int qcow2_walk_init(struct rc_walk *w, struct qcow2 *q, uint64_t nclusters, char *err, size_t errlen);
void qcow2_walk_free(struct rc_walk *w);
void qcow2_walk_say(struct rc_walk *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* One more reference to every cluster of [off, off+len). */
int qcow2_walk_count(struct rc_walk *w, uint64_t off, uint64_t len, const char *what);
/* The references counted to a cluster; one fewer (if any). */
uint32_t qcow2_walk_get(const struct rc_walk *w, uint64_t cluster);
void qcow2_walk_drop(struct rc_walk *w, uint64_t cluster);
/* Was anything counted in refcount-block range ci (clusters ci*rbe...)? */
bool qcow2_walk_range_used(const struct rc_walk *w, uint64_t ci);
/* Count every reference except those of the refcount structures themselves. */
int qcow2_walk_image(struct rc_walk *w);
/* Replace the refcount structures by new ones holding exactly the counts,
 * blocks only for the ranges in use (written past them and the end of the
 * file, then switched in by one header write); fix_copied first makes the
 * active COPIED flags agree. */
int qcow2_rc_rebuild(struct rc_walk *w, bool fix_copied);

/* snapshot.c (exclusive operations: see img_snapshot_* in image.h) */
int qcow2_snapshot_list(struct image *img, struct img_snapshot **out, uint32_t *n);
int qcow2_snapshot_create(struct image *img, const char *name, char *id_out, size_t idlen,
                          char *err, size_t errlen);
int qcow2_snapshot_delete(struct image *img, const char *spec, img_progress_fn progress, void *ctx,
                          char *err, size_t errlen);
int qcow2_snapshot_apply(struct image *img, const char *spec, char *err, size_t errlen);
/* At open: make snapshot spec's L1 table and disk size the (read-only) mapping. */
int qcow2_open_snapshot(struct qcow2 *q, const char *spec, char *err, size_t errlen);

/* resize.c */
int qcow2_resize(struct image *img, uint64_t size, bool shrink, char *err, size_t errlen);

/* exclusive.c: what resize and snapshots share */
/* Start an exclusive operation: no request in flight (-EBUSY), not broken,
 * everything flushed and every dropped reference applied. */
int qcow2_exclusive_begin(struct qcow2 *q, char *err, size_t errlen);
/* Write the header's fixed fields (one sector: atomic) and sync. */
int qcow2_header_commit(struct qcow2 *q);
/* L1 entries needed to map size bytes. */
uint64_t qcow2_l1_entries_for(const struct qcow2 *q, uint64_t size);
/* After h.size changed: the derived sizes (img.size, l1_size_needed). */
void qcow2_derive_sizes(struct qcow2 *q);
/* After an exclusive operation switched tables: index the metadata anew
 * (before anything the old version named is freed); marks the image
 * broken on failure. */
int qcow2_ol_rebuild(struct qcow2 *q);
/* Read n L1 entries at off (checked to lie in the image: -EINVAL). */
int qcow2_read_l1_table(struct qcow2 *q, uint64_t off, uint32_t n, uint64_t **out);
/* Write len bytes (a table) into freshly allocated contiguous clusters. */
int qcow2_write_fresh_table(struct qcow2 *q, const void *data, uint64_t len, uint64_t *off);

/* open.c: the steps of opening, for img_qcow2_driver and the checker's own
 * open (tools/check.c).  qcow2_alloc takes f (the caller still closes it if a
 * later step fails, after qcow2_abandon); qcow2_read_header reads and
 * validates the header (without_snapshots: parsed as if there were no
 * snapshot table); qcow2_load_metadata reads the tables, opens data file,
 * encryption and snapshot, indexes the metadata and sets up the caches. */
struct qcow2 *qcow2_alloc(struct file *f, const struct img_opts *o, char *err, size_t errlen);
int qcow2_read_header(struct qcow2 *q, bool without_snapshots, char *err, size_t errlen);
int qcow2_load_metadata(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen);
void qcow2_abandon(struct qcow2 *q);
/* Read and parse the snapshot table the header names (q->snapshots). */
int qcow2_read_snapshots(struct qcow2 *q, char *err, size_t errlen);

/* repair.c */
int qcow2_rebuild_refcounts(struct qcow2 *q, char *err, size_t errlen);
/* Write the 512-byte sector of the L1 table at l1_off holding entry i. */
int qcow2_write_l1_entry(struct qcow2 *q, uint64_t l1_off, const uint64_t *l1, uint32_t l1_size, uint32_t i);

/* zcache.c: a bounded cache of decompressed clusters, keyed by their host
 * descriptor (offset and byte length of the compressed data).  Whatever frees
 * or changes a compressed cluster's host bytes calls qcow2_zc_invalidate on
 * the host range first (refcount reaching 0, an L2 entry letting a
 * compressed cluster go, a compressed write placing data); entries being
 * decompressed when that happens are never published. */
int qcow2_zc_init(struct qcow2 *q, uint64_t bytes);
void qcow2_zc_free(struct qcow2 *q);
void qcow2_zc_invalidate(struct qcow2 *q, uint64_t off, uint64_t len);
/* Read [in, in+len) of the compressed cluster at host [coff, coff+nbytes),
 * guest_off naming the guest cluster (fault injection). */
int qcow2_zc_read(struct qcow2 *q, uint64_t coff, uint64_t nbytes, uint64_t guest_off,
                  uint64_t in, uint64_t len, uint8_t *buf);
/* Compress a cluster on the worker pool (parks the coroutine): the length
 * of the compressed data, -ENOSPC if it does not fit in out_len. */
ssize_t qcow2_zc_compress(struct qcow2 *q, const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len);
/* n clusters of in_len bytes at in[i] into out[i] (out_len bytes), all in
 * parallel on the pool; res[i] as qcow2_zc_compress. */
void qcow2_zc_compress_many(struct qcow2 *q, size_t n, const uint8_t *const *in, size_t in_len,
                            uint8_t *const *out, size_t out_len, ssize_t *res);
void qcow2_zc_stats(struct qcow2 *q, struct img_stats *st);
/* A read of len bytes of uncompressed data is being served (compressed
 * loads then take turns while small ones are: zcache.c, ZC_SHARED_LOADS). */
void qcow2_zc_note_plain_read(struct qcow2 *q, uint64_t len);
/* Decompressions run inline on the engine thread so far (tests). */
uint64_t qcow2_zc_inline_jobs(const struct qcow2 *q);
/* The most compressed loads at once so far (tests); reset: start again. */
unsigned qcow2_zc_loads_peak(struct qcow2 *q, bool reset);

/* zwrite.c: compressed clusters, packed into host clusters as QEMU packs them */
int qcow2_co_write_compressed(struct image *img, const void *cdata, size_t clen, uint64_t off);
int qcow2_zw_finish(struct qcow2 *q);      /* write the partly filled host cluster */
void qcow2_zw_free(struct qcow2 *q);

/* cluster.c: point the L2 entry of guest cluster off at compressed data
 * (entry e, a compressed descriptor), dropping the old reference. */
int qcow2_map_compressed(struct qcow2 *q, uint64_t off, uint64_t e);

#endif
