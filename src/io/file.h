/* An image file as the engines see it: an fd, whether it is opened with
 * O_DIRECT, and the I/O calls routed through the thread's loop.
 * All engine I/O goes through here, so tests can interpose on it. */
#ifndef UQ_IO_FILE_H
#define UQ_IO_FILE_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct file {
    int fd;
    bool direct;        /* opened O_DIRECT: offsets, lengths, buffers 512-aligned */
    bool writable;
    bool in_memory;     /* on tmpfs/ramfs: reads and writes run inline (io_pwritev_now) */
    char *path;
};

enum file_cache { FILE_CACHE_AUTO, FILE_CACHE_DIRECT, FILE_CACHE_BUFFERED };

/* Open path.  FILE_CACHE_AUTO tries O_DIRECT and falls back to buffered I/O
 * when the file system refuses it or needs more than 512-byte alignment.
 * On error returns -errno and writes a message naming the file into err. */
int file_open(struct file *f, const char *path, bool writable, enum file_cache cache,
              char *err, size_t errlen);
void file_close(struct file *f);
/* Current size in bytes, or -errno. */
int64_t file_size(struct file *f);

/* Full-length I/O (see io_pread/io_pwrite).  With O_DIRECT, callers pass
 * 512-aligned offsets, lengths and buffers; file_pread_any accepts any. */
ssize_t file_pread(struct file *f, void *buf, size_t len, uint64_t off);
ssize_t file_pread_any(struct file *f, void *buf, size_t len, uint64_t off);
ssize_t file_pwrite(struct file *f, const void *buf, size_t len, uint64_t off, bool fua);
ssize_t file_pwritev(struct file *f, const struct iovec *iov, int iovcnt, uint64_t off, bool fua);
ssize_t file_preadv(struct file *f, const struct iovec *iov, int iovcnt, uint64_t off);
int file_sync(struct file *f);
/* Deallocate (punch hole) or zero a range; -EOPNOTSUPP where unsupported. */
int file_punch(struct file *f, uint64_t off, uint64_t len);
int file_zero_range(struct file *f, uint64_t off, uint64_t len);
/* Allocate blocks for [off, off+len), extending the file size (fallocate
 * mode 0); -EOPNOTSUPP where unsupported. */
int file_allocate(struct file *f, uint64_t off, uint64_t len);
int file_truncate(struct file *f, uint64_t size);

/* ---- test hooks ------------------------------------------------------------
 * Fault injection and power-loss recording (tests/crash).  When hooks are
 * set, every call above that does I/O reports to them; by default there are
 * none and the cost is one predictable branch. */
enum file_op { FILE_OP_READ, FILE_OP_WRITE, FILE_OP_SYNC, FILE_OP_PUNCH, FILE_OP_ZERO_RANGE };
#define FILE_HOOK_FUA (1u << 0)     /* a write with RWF_DSYNC */

struct file_hooks {
    /* Before the operation (iov is the data of a write, NULL otherwise).
     * Return 0 to run it, -errno to fail it with that error without running
     * it, or for a read a positive n < len to read only n bytes (as if the
     * file ended there). */
    int (*before)(void *ctx, struct file *f, enum file_op op, uint64_t off, uint64_t len,
                  const struct iovec *iov, int iovcnt, unsigned flags);
    /* After it completed (or failed, including by injection): the result as
     * returned to the caller.  May be NULL. */
    void (*after)(void *ctx, struct file *f, enum file_op op, uint64_t off, uint64_t len,
                  int64_t result, unsigned flags);
    void *ctx;
    /* Before file_allocate (blocks reserved ahead of the end of the file):
     * 0 to run it, -errno to fail it instead (-EOPNOTSUPP: as on a file
     * system without fallocate).  May be NULL. */
    int (*allocate)(void *ctx, struct file *f, uint64_t off, uint64_t len);
};

/* Install hooks for every file of the process (NULL removes them).  The
 * structure must outlive its use.  Not for production paths. */
void file_set_hooks(const struct file_hooks *hooks);

#endif
