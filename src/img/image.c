/* Format probing and the checks every request passes before the format. */
#include <ctype.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "img/driver.h"
#include "img/image.h"
#include "io/loop.h"

/* Every format, probed in this order; raw last, as the fallback. */
static const struct img_driver *const drivers[] = { &img_qcow2_driver, &img_raw_driver };

static const struct img_driver *driver_of(enum img_format fmt)
{
    for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
        if (drivers[i]->format == fmt)
            return drivers[i];
    return NULL;
}

static enum img_format probe_head(const uint8_t *head, size_t len)
{
    for (size_t i = 0; i < sizeof(drivers) / sizeof(drivers[0]); i++)
        if (drivers[i]->probe && drivers[i]->probe(head, len))
            return drivers[i]->format;
    return IMG_FMT_RAW;
}

bool img_head_claimed(const uint8_t *head, size_t len)
{
    return probe_head(head, len) != IMG_FMT_RAW;
}

enum img_format img_probe(struct file *f)
{
    uint8_t *head = io_zalloc(IMG_PROBE_BYTES);
    ssize_t n = file_pread(f, head, IMG_PROBE_BYTES, 0);
    enum img_format fmt = n > 0 ? probe_head(head, (size_t)n) : IMG_FMT_RAW;
    io_free(head);
    return fmt;
}

struct image *img_open_file(struct file *f, const struct img_opts *opts, char *err, size_t errlen)
{
    struct img_opts o = *opts;
    bool probed = o.format == IMG_FMT_AUTO;
    if (probed)
        o.format = img_probe(f);
    const struct img_driver *d = driver_of(o.format);
    if (!d) {
        snprintf(err, errlen, "%s: unknown image format", f->path);
        return NULL;
    }
    struct image *img = d->open(f, &o, probed, err, errlen);
    if (img)
        img->unmap = o.discard == IMG_DISCARD_UNMAP;
    return img;
}

struct image *img_open(const char *path, const struct img_opts *opts, char *err, size_t errlen)
{
    struct file f;
    if (file_open(&f, path, !opts->read_only, opts->cache, err, errlen) < 0)
        return NULL;
    struct image *img = img_open_file(&f, opts, err, errlen);
    if (!img)
        file_close(&f);
    return img;
}

static int check_range(struct image *img, uint64_t off, uint64_t len)
{
    if ((off | len) & 511)
        return -EINVAL;
    if (off > img->size || len > img->size - off)
        return -EINVAL;
    return 0;
}

int img_read(struct image *img, void *buf, uint64_t off, uint64_t len)
{
    int r = check_range(img, off, len);
    if (r < 0 || len == 0)
        return r;
    return img->ops->read(img, buf, off, len);
}

int img_write(struct image *img, const void *buf, uint64_t off, uint64_t len, unsigned flags)
{
    if (img->read_only)
        return -EROFS;
    int r = check_range(img, off, len);
    if (r < 0 || len == 0)
        return r;
    return img->ops->write(img, buf, off, len, flags);
}

int img_flush(struct image *img)
{
    if (img->read_only)
        return 0;
    return img->ops->flush(img);
}

int img_discard(struct image *img, uint64_t off, uint64_t len)
{
    if (img->read_only)
        return -EROFS;
    int r = check_range(img, off, len);
    if (r < 0 || len == 0 || !img->unmap)
        return r;       /* discard=ignore: discard is advisory, so this is allowed */
    return img->ops->discard(img, off, len);
}

int img_write_zeroes(struct image *img, uint64_t off, uint64_t len, unsigned flags)
{
    if (img->read_only)
        return -EROFS;
    int r = check_range(img, off, len);
    if (r < 0 || len == 0)
        return r;
    /* As QEMU: without discard=unmap, write-zeroes never deallocates. */
    if (!img->unmap)
        flags |= IMG_NO_HOLE;
    return img->ops->write_zeroes(img, off, len, flags);
}

int img_map(struct image *img, uint64_t off, uint64_t len, unsigned flags, struct img_map *m)
{
    if ((flags & IMG_MAP_WRITE) && img->read_only)
        return -EROFS;
    int r = check_range(img, off, len);
    if (r < 0 || len == 0 || !img->ops->map)
        return r;
    m->flush_at_end = false;
    return img->ops->map(img, off, len, flags, m);
}

int img_map_end(struct image *img, struct img_map *m, unsigned flags, int result)
{
    return img->ops->map_end(img, m, flags, result);
}

void img_get_stats(struct image *img, struct img_stats *st)
{
    memset(st, 0, sizeof(*st));
    if (img->ops->stats)
        img->ops->stats(img, st);
}

int img_snapshot_list(struct image *img, struct img_snapshot **out, uint32_t *n)
{
    *out = NULL;
    *n = 0;
    return img->ops->snapshot_list ? img->ops->snapshot_list(img, out, n) : -ENOTSUP;
}

void img_snapshot_list_free(struct img_snapshot *s, uint32_t n)
{
    for (uint32_t i = 0; s && i < n; i++) {
        free(s[i].id);
        free(s[i].name);
    }
    free(s);
}

/* Checks shared by the exclusive operations; 0 if op may run. */
static int exclusive_ok(struct image *img, const void *op, const char *what, char *err, size_t errlen)
{
    if (!op) {
        snprintf(err, errlen, "%s: %s images do not support %s", img->path, img->ops->name, what);
        return -ENOTSUP;
    }
    if (img->read_only) {
        snprintf(err, errlen, "%s: the image is open read-only", img->path);
        return -EROFS;
    }
    return 0;
}

int img_snapshot_create(struct image *img, const char *name, char *id_out, size_t idlen,
                        char *err, size_t errlen)
{
    int r = exclusive_ok(img, img->ops->snapshot_create, "internal snapshots", err, errlen);
    return r < 0 ? r : img->ops->snapshot_create(img, name, id_out, idlen, err, errlen);
}

int img_snapshot_delete(struct image *img, const char *spec, img_progress_fn progress, void *ctx,
                        char *err, size_t errlen)
{
    int r = exclusive_ok(img, img->ops->snapshot_delete, "internal snapshots", err, errlen);
    return r < 0 ? r : img->ops->snapshot_delete(img, spec, progress, ctx, err, errlen);
}

int img_snapshot_apply(struct image *img, const char *spec, char *err, size_t errlen)
{
    int r = exclusive_ok(img, img->ops->snapshot_apply, "internal snapshots", err, errlen);
    return r < 0 ? r : img->ops->snapshot_apply(img, spec, err, errlen);
}

int img_resize(struct image *img, uint64_t size, bool shrink, char *err, size_t errlen)
{
    int r = exclusive_ok(img, img->ops->resize, "resizing", err, errlen);
    return r < 0 ? r : img->ops->resize(img, size, shrink, err, errlen);
}

int img_close(struct image *img)
{
    if (!img)
        return 0;
    return img->ops->close(img);
}

void img_describe_files(struct image *img, char *buf, size_t len)
{
    size_t n = 0;
    buf[0] = '\0';
    const char *sep = "backing chain: ";
    for (struct image *b = img->ops->backing ? img->ops->backing(img) : NULL; b && n < len;
         b = b->ops->backing ? b->ops->backing(b) : NULL) {
        n += (size_t)snprintf(buf + n, len - n, "%s%s (%s)", sep, b->path, img_format_name(b));
        sep = ", ";
    }
    const char *df = img->ops->data_file ? img->ops->data_file(img) : NULL;
    if (df && n < len)
        snprintf(buf + n, len - n, "%sdata file: %s", n ? "; " : "", df);
}

int img_parse_discard(const char *s, enum img_discard *out)
{
    if (!strcmp(s, "ignore") || !strcmp(s, "off"))
        *out = IMG_DISCARD_IGNORE;
    else if (!strcmp(s, "unmap") || !strcmp(s, "on"))
        *out = IMG_DISCARD_UNMAP;
    else
        return -1;
    return 0;
}

int64_t parse_size(const char *s)
{
    char *end;
    errno = 0;
    if (!s || !*s || !isdigit((unsigned char)*s))
        return -1;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno)
        return -1;
    /* A fraction ("1.5G", as qemu-img takes) only with a unit. */
    uint64_t frac = 0, den = 1;
    if (*end == '.') {
        if (!isdigit((unsigned char)*++end))
            return -1;
        for (; isdigit((unsigned char)*end); end++)
            if (den < 1000000000000ull) {
                frac = frac * 10 + (uint64_t)(*end - '0');
                den *= 10;
            }
    }
    unsigned shift = 0;
    switch (toupper((unsigned char)*end)) {
    case '\0': break;
    case 'K': shift = 10; break;
    case 'M': shift = 20; break;
    case 'G': shift = 30; break;
    case 'T': shift = 40; break;
    case 'P': shift = 50; break;
    case 'E': shift = 60; break;
    default: return -1;
    }
    if (*end) {
        end++;
        if (*end == 'i' && end[1] == 'B') end += 2;
        else if (toupper((unsigned char)*end) == 'B') end++;
        if (*end)
            return -1;
    }
    if (den > 1 && !shift)
        return -1;
    if (shift && v > (UINT64_MAX >> 1) >> shift)
        return -1;
    v <<= shift;
    v += (uint64_t)(((unsigned __int128)frac << shift) / den);
    if (v > INT64_MAX)
        return -1;
    return (int64_t)v;
}
