/* Offline image tools: the engine side of the create, info and check
 * commands (create.c, info.c, check.c).  No terminal output here: progress
 * and detail lines go to callbacks the command supplies.  Option names,
 * defaults, results and exit-code meanings follow qemu-img. */
#ifndef UQ_TOOLS_TOOLS_H
#define UQ_TOOLS_TOOLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "qcow2/format.h"
#include "img/image.h"
#include "qcow2/verdict.h"

/* done out of total units of work (total > 0; done reaches total at the end). */
typedef img_progress_fn tool_progress_fn;

/* ---- create (create.c) ------------------------------------------------------ */
enum prealloc_mode { PREALLOC_OFF, PREALLOC_METADATA, PREALLOC_FALLOC, PREALLOC_FULL };

struct create_opts {
    enum img_format format;         /* IMG_FMT_QCOW2 (default) or IMG_FMT_RAW */
    uint64_t size;                  /* virtual size in bytes (rounded up to 512) */
    bool size_set;                  /* false: take the backing file's size */
    uint32_t cluster_size;          /* 512 .. 2 MiB, a power of two (default 64 KiB) */
    uint32_t version;               /* 2 (compat=0.10) or 3 (compat=1.1, default) */
    uint32_t refcount_bits;         /* 1 .. 64, a power of two (default 16) */
    bool lazy_refcounts, extended_l2;
    enum qcow2_compression compression;
    enum prealloc_mode prealloc;
    const char *backing_file;       /* stored as given; relative = to the image's directory */
    const char *backing_fmt;        /* "qcow2" or "raw"; required with a backing file */
    tool_progress_fn progress;      /* preallocation progress (may be NULL) */
    void *progress_ctx;
};

void create_opts_init(struct create_opts *o);
/* Create (or truncate and overwrite, as qemu-img does) the image PATH.
 * Validates the options as qemu-img does; on failure removes a file it
 * created and returns -errno with a one-line reason in err. */
int img_create(const char *path, const struct create_opts *o, char *err, size_t errlen);
const char *prealloc_name(enum prealloc_mode m);

/* ---- info (info.c) ------------------------------------------------------------ */
struct snapshot_info {
    char *id, *name;
    uint64_t vm_state_size;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t icount;
    bool has_icount;
};

struct bitmap_info {
    char *name;
    uint32_t granularity;
    bool in_use, autoload;
};

struct image_info {
    char *filename;                 /* as given (or as the overlay names it) */
    enum img_format format;
    uint64_t virtual_size;
    uint64_t actual_size;           /* bytes allocated on the host file system */
    /* qcow2 only */
    uint32_t cluster_size;
    uint32_t version;
    uint32_t refcount_bits;
    enum qcow2_compression compression;
    bool lazy_refcounts, corrupt, extended_l2, dirty, encrypted;
    char *backing_file;             /* NULL if none: the name as stored */
    char *full_backing_file;        /* the name as QEMU resolves it against filename */
    char *backing_format;           /* NULL if the image does not say */
    char *data_file;                /* external data file as stored; NULL if none */
    bool data_file_raw;
    struct qcow2_luks_header *luks; /* LUKS encryption header (no key needed); NULL if none */
    struct snapshot_info *snapshots;
    uint32_t nb_snapshots;
    struct bitmap_info *bitmaps;    /* when the image has persistent bitmaps */
    uint32_t nb_bitmaps;
    bool has_bitmaps;
    struct image_info *backing;     /* the next image of the chain (with chain=true) */
};

/* Describe PATH (format AUTO probes), and with chain=true every image of its
 * backing chain.  Images are opened read-only, without their backing files. */
int img_info(const char *path, enum img_format fmt, bool chain, struct image_info **out,
             char *err, size_t errlen);
void img_info_free(struct image_info *info);

/* ---- check and repair (check.c) ------------------------------------------------ */
struct check_opts {
    unsigned fix;                   /* CHECK_FIX_* */
    tool_progress_fn progress;
    void *progress_ctx;
    /* One line of detail per problem found or repaired (no newline). */
    void (*message)(void *ctx, const char *line);
    void *message_ctx;
};

/* Check a qcow2 image, repairing what opts->fix allows.  Returns 0 when the
 * check ran (the verdict is in res), -ENOTSUP for a format without checks
 * (raw), another -errno with err set when the image cannot be opened or the
 * check could not complete (res->check_errors counts the latter). */
int img_check(const char *path, enum img_format fmt, const struct check_opts *opts,
              struct check_result *res, char *err, size_t errlen);

/* ---- convert (convert.c) ------------------------------------------------------- */
struct convert_opts {
    const char *src;                /* the source image (any format, its chain is followed) */
    enum img_format src_format;     /* -f (AUTO probes) */
    const char *snapshot;           /* -l: copy this internal snapshot of the source */
    bool force_share;               /* -U: read a source others may be writing */
    const char *dst;
    struct create_opts create;      /* -O (create.format), -o, -B/-F: the target's options */
    bool format_given;              /* -O was given (with -n: write that format into the file) */
    bool compress;                  /* -c: compressed clusters (the target's compression_type) */
    bool existing;                  /* -n: write into an existing image, do not create it */
    uint64_t min_sparse;            /* -S: zero runs of this size (bytes) stay holes; 0: none */
    unsigned parallel;              /* -m: coroutines (default 8) */
    bool unordered;                 /* -W: writes may go out of order */
    tool_progress_fn progress;      /* bytes copied of the source's size */
    void *progress_ctx;
};

void convert_opts_init(struct convert_opts *o);
/* Copy o->src to o->dst as qemu-img convert does: blocks that read the same
 * in the target already (zeros in a new image, the backing file with -B,
 * the old data with -n) are not written; zero blocks become write-zeroes.
 * Refuses (-EINVAL/-EBUSY/-EEXIST, reason in err) to write the source or a
 * file of its chain, an image in use (locked), or an existing file of
 * another format (without -n and an explicit -O). */
int img_convert(const struct convert_opts *o, char *err, size_t errlen);

/* Write the one-line reason into err (printf-style) and return ret: the
 * tools' way to fail with a message. */
int tools_fail(int ret, char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 4, 5)));

#endif
