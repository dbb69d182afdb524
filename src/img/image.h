/* The image interface every frontend (NBD, ublk, bench) uses.
 *
 * An image is a raw file or a qcow2 file (with its backing chain).  All
 * calls may park the calling coroutine; outside a coroutine they run
 * synchronously.  Offsets and lengths are multiples of 512 bytes; buffers
 * are IO_ALIGN-aligned (see io/loop.h io_alloc).
 *
 * Errors are returned as -errno: -EIO for I/O failures and for metadata
 * found corrupt, -ENOSPC when the host file system is full, -EROFS for a
 * write to a read-only image, -EINVAL for a misaligned or out-of-range request.
 */
#ifndef UQ_IMG_IMAGE_H
#define UQ_IMG_IMAGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "io/file.h"

enum img_format { IMG_FMT_AUTO = 0, IMG_FMT_RAW, IMG_FMT_QCOW2 };

/* What a discard does (QEMU's discard=ignore|unmap; ignore is the default of
 * qemu-nbd and qemu-storage-daemon too). */
enum img_discard {
    IMG_DISCARD_IGNORE = 0,     /* discard does nothing; write-zeroes never deallocates */
    IMG_DISCARD_UNMAP,          /* discard and write-zeroes may free clusters and punch holes */
};

/* One image of a backing chain being opened, linked to the one above it. */
struct img_chain {
    const char *real_path;      /* realpath() of the image (NULL if unknown) */
    const struct img_chain *up; /* the overlay above; NULL at the top */
    int depth;                  /* 0 for the top image */
};

struct img_opts {
    enum img_format format;     /* AUTO probes the file's magic */
    bool read_only;
    uint64_t cache_size;        /* qcow2 metadata cache bytes; 0 = default */
    enum file_cache cache;      /* O_DIRECT or not (AUTO: direct when possible) */
    enum img_discard discard;
    /* qcow2, with IMG_DISCARD_UNMAP: a discard (or a write-zeroes that may
     * unmap) keeps our clusters allocated, reading as zeros, and only
     * punches their data out of the file (QEMU's discard-no-unref). */
    bool discard_no_unref;
    /* qcow2 LUKS encryption: the passphrase (any bytes; NULL if none given).
     * Only read while opening (also for an encrypted backing file). */
    const void *key;
    size_t key_len;
    bool no_backing;            /* do not open the backing chain (info) */
    /* Set by a format opening its backing file: the images above it (loop
     * and depth checks).  NULL for the image the caller names. */
    const struct img_chain *chain;
    /* qcow2: open this internal snapshot (ID or name, or QEMU's
     * "snapshot.id=ID[,snapshot.name=NAME]") instead of the active image:
     * its L1 table is the mapping and its disk size the size.  Needs
     * read_only (as qemu-nbd -l).  NULL: the active image. */
    const char *snapshot;
};

/* Request flags. */
#define IMG_FUA       (1u << 0)   /* write: durable before completion */
#define IMG_NO_HOLE   (1u << 1)   /* write_zeroes: keep the range allocated (without it the
                                     range may be deallocated: QEMU's MAY_UNMAP) */

struct image;

/* A guest range that lies in one piece in one file (img_map), so a
 * frontend may move its bytes itself, without them passing through the
 * engine's memory (zero copy: the kernel's pages straight to the file). */
struct img_map {
    struct file *file;          /* the file holding the range */
    uint64_t host;              /* where in it the range starts */
    bool flush_at_end;          /* FUA write: img_map_end flushes, which makes the data
                                   durable too (no RWF_DSYNC needed) */
    /* The format's: the request stays open (clusters it maps are not
     * freed and reused) until img_map_end; for a write into new clusters
     * also the allocation in flight (linked into the format's lists, so m
     * must not move). */
    _Alignas(8) unsigned char priv[256];
};
#define IMG_MAP_WRITE (1u << 8)     /* img_map: for a write (with IMG_FUA if asked) */

/* An internal snapshot as `qemu-img snapshot -l` shows it. */
struct img_snapshot {
    char *id, *name;
    uint64_t vm_state_size;
    uint64_t disk_size;         /* the virtual size when it was taken */
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;            /* UINT64_MAX: none recorded */
};

/* The format engine's counters (statistics).  img_get_stats may be called
 * from any thread while the engine runs; each value is read whole, the set
 * is not one consistent snapshot.  Zero where a format has no such thing. */
struct img_stats {
    uint64_t cache_hits, cache_misses;  /* metadata cache (L2 + refcount) lookups */
    uint64_t clusters_allocated;        /* host clusters allocated since open */
    uint64_t zcache_hits, zcache_misses;    /* reads of compressed clusters served from /
                                               not found in the decompressed-cluster cache */
    uint64_t clusters_decompressed;     /* decompressions run (on the worker pool) */
};

/* Progress of a long operation: done of total units so far (ctx is the
 * caller's); called on the engine's thread, may be NULL. */
typedef void (*img_progress_fn)(void *ctx, uint64_t done, uint64_t total);

struct image_ops {
    const char *name;
    int (*read)(struct image *img, void *buf, uint64_t off, uint64_t len);
    int (*write)(struct image *img, const void *buf, uint64_t off, uint64_t len, unsigned flags);
    int (*flush)(struct image *img);
    int (*discard)(struct image *img, uint64_t off, uint64_t len);
    int (*write_zeroes)(struct image *img, uint64_t off, uint64_t len, unsigned flags);
    int (*close)(struct image *img);
    void (*stats)(struct image *img, struct img_stats *st);    /* optional */
    /* Optional (NULL: -ENOTSUP); see img_snapshot_* and img_resize. */
    int (*snapshot_list)(struct image *img, struct img_snapshot **out, uint32_t *n);
    int (*snapshot_create)(struct image *img, const char *name, char *id_out, size_t idlen,
                           char *err, size_t errlen);
    int (*snapshot_delete)(struct image *img, const char *spec, img_progress_fn progress, void *ctx,
                           char *err, size_t errlen);
    int (*snapshot_apply)(struct image *img, const char *spec, char *err, size_t errlen);
    int (*resize)(struct image *img, uint64_t size, bool shrink, char *err, size_t errlen);
    /* Optional (NULL: never mapped); see img_map. */
    int (*map)(struct image *img, uint64_t off, uint64_t len, unsigned flags, struct img_map *m);
    int (*map_end)(struct image *img, struct img_map *m, unsigned flags, int result);
    /* Optional: the backing image (NULL if none) and the external data
     * file's path (NULL if none), for messages. */
    struct image *(*backing)(struct image *img);
    const char *(*data_file)(struct image *img);
};

struct image {
    const struct image_ops *ops;
    uint64_t size;              /* virtual size in bytes */
    bool read_only;
    bool unmap;                 /* opened with IMG_DISCARD_UNMAP */
    char *path;
    void *priv;                 /* the format's own state */
};

/* Open an image.  Returns NULL and writes a one-line reason (naming the file
 * and the problem) into err on failure. */
struct image *img_open(const char *path, const struct img_opts *opts, char *err, size_t errlen);

/* Check the request's range and alignment, then dispatch to the format. */
int img_read(struct image *img, void *buf, uint64_t off, uint64_t len);
int img_write(struct image *img, const void *buf, uint64_t off, uint64_t len, unsigned flags);
int img_flush(struct image *img);
int img_discard(struct image *img, uint64_t off, uint64_t len);
int img_write_zeroes(struct image *img, uint64_t off, uint64_t len, unsigned flags);
/* Flush, mark clean, release.  Returns the flush's error, if any; the image
 * is released either way. */
int img_close(struct image *img);

void img_get_stats(struct image *img, struct img_stats *st);

/* Zero copy.  img_map: is [off, off+len) plain data in one contiguous
 * extent of one file, which the caller may read (or, with IMG_MAP_WRITE,
 * write: clusters ours to overwrite, or new ones allocated for the whole
 * range, no copy-on-write needed) in place with the file's alignment
 * rules (file->direct)?  1: yes, m says where; the caller does the I/O (a
 * write with RWF_DSYNC if IMG_FUA, unless m->flush_at_end), then must
 * call img_map_end with the I/O's result (0 or -errno) and the same
 * flags, which finishes the request (a new mapping takes effect only then,
 * or is given back on an error; for a FUA write: a flush when the mapping
 * itself is not durable yet) and returns its final result.  m must stay where it is until then.
 * 0: not that simple (zeros, backing file, compressed, encrypted,
 * copy-on-write, a file in memory...): use img_read/img_write.
 * -errno: the request fails. */
int img_map(struct image *img, uint64_t off, uint64_t len, unsigned flags, struct img_map *m);
int img_map_end(struct image *img, struct img_map *m, unsigned flags, int result);

/* What else the image reads from, for the log: "backing chain: A (qcow2),
 * B (raw); data file: D", or "" when nothing. */
void img_describe_files(struct image *img, char *buf, size_t len);

/* ---- internal snapshots and resize ------------------------------------------
 * Exclusive operations: no request may be in flight on the image (offline
 * tools, or a frontend that quiesced its I/O first; -EBUSY otherwise).  They
 * flush first and leave everything durable when they return 0.  Errors
 * come with a one-line reason in err.  A snapshot is named by its ID or its
 * name (ID first, as `qemu-img snapshot -a`), or by QEMU's
 * "snapshot.id=ID[,snapshot.name=NAME]".
 *
 * list: a malloc'ed copy (free with img_snapshot_list_free); raw images
 * have none (0).  create: a new snapshot of the current content named NAME
 * (QEMU's semantics: the next numeric ID, which goes to id_out; names may
 * repeat).  delete: drop it and release what only it used.  apply: make
 * its content (and disk size) the image's.  resize: set the virtual size;
 * a smaller one needs shrink and an unused tail (nothing allocated past
 * the new end, which must read as zeros), else -ENOTSUP with the reason. */
int img_snapshot_list(struct image *img, struct img_snapshot **out, uint32_t *n);
void img_snapshot_list_free(struct img_snapshot *s, uint32_t n);
int img_snapshot_create(struct image *img, const char *name, char *id_out, size_t idlen,
                        char *err, size_t errlen);
int img_snapshot_delete(struct image *img, const char *spec, img_progress_fn progress, void *ctx,
                        char *err, size_t errlen);
int img_snapshot_apply(struct image *img, const char *spec, char *err, size_t errlen);
int img_resize(struct image *img, uint64_t size, bool shrink, char *err, size_t errlen);

static inline uint64_t img_size(const struct image *img) { return img->size; }
static inline const char *img_format_name(const struct image *img) { return img->ops->name; }

/* Parse a --discard mode as QEMU does: ignore (off) or unmap (on); -1 on error. */
int img_parse_discard(const char *s, enum img_discard *out);

/* Parse "64M", "1G", "4096" etc. into bytes; -1 on error. */
int64_t parse_size(const char *s);

#endif
