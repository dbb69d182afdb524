/* Raw images: the guest sees the file's bytes. */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "img/driver.h"
#include "io/log.h"
#include "io/loop.h"

struct raw {
    struct file file;
    bool probed;
    bool flush_failed;      /* a sync failed: never report a later one as success */
};

/* After a failed fdatasync the kernel may have dropped dirty pages, so a
 * later one could succeed without them: fail every later sync (fsyncgate). */
static int raw_sync(struct raw *r)
{
    if (r->flush_failed)
        return -EIO;
    int ret = file_sync(&r->file);
    if (ret < 0) {
        r->flush_failed = true;
        uq_error("%s: flush failed (%s); the image is suspect from now on",
                 r->file.path, strerror(-ret));
    }
    return ret;
}

static int raw_read(struct image *img, void *buf, uint64_t off, uint64_t len)
{
    struct raw *r = img->priv;
    ssize_t n = file_pread(&r->file, buf, len, off);
    if (n < 0)
        return (int)n;
    if ((uint64_t)n < len)      /* file shrank under us: the rest reads as zeros */
        memset((uint8_t *)buf + n, 0, len - n);
    return 0;
}

static int raw_write(struct image *img, const void *buf, uint64_t off, uint64_t len, unsigned flags)
{
    struct raw *r = img->priv;
    /* A probed raw image must never start to look like a qcow2 image (or any
     * other format), or its next open would interpret guest data as metadata
     * (QEMU refuses this too). */
    if (r->probed && off == 0 && img_head_claimed(buf, len < IMG_PROBE_BYTES ? len : IMG_PROBE_BYTES))
        return -EPERM;
    ssize_t n = file_pwrite(&r->file, buf, len, off, flags & IMG_FUA);
    return n < 0 ? (int)n : 0;
}

/* Every range of a raw image is its file's, except that a write to the
 * first sector of a probed image must be checked (raw_write) first. */
static int raw_map(struct image *img, uint64_t off, uint64_t len, unsigned flags, struct img_map *m)
{
    struct raw *r = img->priv;
    (void)len;
    /* A file in memory is read and written inline by the engine (one
     * memory copy); through the ring each request would wait for an io-wq
     * worker (tmpfs has no asynchronous I/O), which costs more. */
    if (r->file.in_memory)
        return 0;
    if ((flags & IMG_MAP_WRITE) && r->probed && off < IMG_PROBE_BYTES)
        return 0;
    m->file = &r->file;
    m->host = off;
    return 1;
}

static int raw_map_end(struct image *img, struct img_map *m, unsigned flags, int result)
{
    (void)img, (void)m, (void)flags;
    return result;      /* FUA: the write itself used RWF_DSYNC, as raw_write does */
}

static int raw_flush(struct image *img)
{
    struct raw *r = img->priv;
    return raw_sync(r);
}

static int raw_discard(struct image *img, uint64_t off, uint64_t len)
{
    struct raw *r = img->priv;
    int ret = file_punch(&r->file, off, len);
    return ret == -EOPNOTSUPP ? 0 : ret;    /* discard is advisory */
}

static int raw_write_zeroes(struct image *img, uint64_t off, uint64_t len, unsigned flags)
{
    struct raw *r = img->priv;
    int ret = (flags & IMG_NO_HOLE) ? file_zero_range(&r->file, off, len)
                                    : file_punch(&r->file, off, len);
    if (ret == -EOPNOTSUPP) {
        /* No fallocate support: write zeros for real. */
        uint64_t chunk = len < (1u << 20) ? len : (1u << 20);
        uint8_t *zero = io_zalloc(chunk);
        ret = 0;
        for (uint64_t done = 0; done < len && ret == 0; done += chunk) {
            uint64_t n = len - done < chunk ? len - done : chunk;
            ssize_t w = file_pwrite(&r->file, zero, n, off + done, false);
            if (w < 0)
                ret = (int)w;
        }
        io_free(zero);
    }
    if (ret == 0 && (flags & IMG_FUA))
        ret = raw_sync(r);
    return ret;
}

static int raw_close(struct image *img)
{
    struct raw *r = img->priv;
    int ret = img->read_only ? 0 : raw_sync(r);
    file_close(&r->file);
    free(r);
    free(img->path);
    free(img);
    return ret;
}

/* Raw: the file's size is the image's.  Shrinking needs the tail to read
 * as zeros (holes are skipped without reading), so no data goes. */
static int raw_resize(struct image *img, uint64_t size, bool shrink, char *err, size_t errlen)
{
    struct raw *r = img->priv;
    int64_t cur = file_size(&r->file);
    if (cur < 0) {
        snprintf(err, errlen, "%s: cannot stat: %s", img->path, strerror((int)-cur));
        return (int)cur;
    }
    if (size < (uint64_t)cur) {
        if (!shrink) {
            snprintf(err, errlen, "%llu bytes is smaller than the image (%lld bytes): shrinking needs "
                     "--shrink", (unsigned long long)size, (long long)cur);
            return -EINVAL;
        }
        uint8_t *buf = malloc(1u << 20);
        if (!buf)
            return -ENOMEM;
        for (uint64_t off = size; off < (uint64_t)cur;) {
            off_t d = lseek(r->file.fd, (off_t)off, SEEK_DATA);
            if (d < 0 || (uint64_t)d >= (uint64_t)cur)
                break;      /* only holes left (or no SEEK_DATA: checked below) */
            off = (uint64_t)d;
            uint64_t n = (uint64_t)cur - off < (1u << 20) ? (uint64_t)cur - off : (1u << 20);
            ssize_t got = file_pread_any(&r->file, buf, n, off);
            if (got <= 0) {
                free(buf);
                snprintf(err, errlen, "%s: cannot read offset %llu: %s", img->path,
                         (unsigned long long)off, got < 0 ? strerror((int)-got) : "end of file");
                return got < 0 ? (int)got : -EIO;
            }
            for (ssize_t k = 0; k < got; k++) {
                if (buf[k]) {
                    free(buf);
                    snprintf(err, errlen, "cannot shrink %s to %llu bytes: offset %llu, past the new end, "
                             "holds data (discard it first, or keep the size)", img->path,
                             (unsigned long long)size, (unsigned long long)(off + (uint64_t)k));
                    return -ENOTSUP;
                }
            }
            off += (uint64_t)got;
        }
        free(buf);
    }
    int ret = file_truncate(&r->file, size);
    if (ret == 0)
        ret = raw_sync(r);
    if (ret < 0) {
        snprintf(err, errlen, "%s: cannot resize: %s", img->path, strerror(-ret));
        return ret;
    }
    img->size = size & ~511ull;
    return 0;
}

static const struct image_ops raw_ops = {
    .name = "raw",
    .read = raw_read,
    .write = raw_write,
    .flush = raw_flush,
    .discard = raw_discard,
    .write_zeroes = raw_write_zeroes,
    .map = raw_map,
    .map_end = raw_map_end,
    .close = raw_close,
    .resize = raw_resize,
};

static struct image *raw_open(struct file *f, const struct img_opts *o, bool probed, char *err, size_t errlen)
{
    if (o->snapshot) {
        snprintf(err, errlen, "%s is a raw image: it has no internal snapshots", f->path);
        return NULL;
    }
    int64_t size = file_size(f);
    if (size < 0) {
        snprintf(err, errlen, "cannot stat '%s': %s", f->path, strerror((int)-size));
        return NULL;
    }
    struct raw *r = calloc(1, sizeof(*r));
    struct image *img = calloc(1, sizeof(*img));
    if (!r || !img) {
        free(r);
        free(img);
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    r->file = *f;
    r->probed = probed;
    img->ops = &raw_ops;
    img->size = (uint64_t)size & ~511ull;   /* block devices expose whole sectors */
    img->read_only = o->read_only;
    img->path = strdup(f->path);
    img->priv = r;
    return img;
}

const struct img_driver img_raw_driver = {
    .format = IMG_FMT_RAW,
    .name = "raw",
    .probe = NULL,          /* claims nothing: the fallback */
    .open = raw_open,
};
