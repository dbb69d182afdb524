/* What qemu-img info shows about an image and its backing chain.  Each
 * image is opened read-only without its backing file, so a missing backing
 * file does not hide the overlay's own description. */
#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "img/driver.h"
#include "qcow2/internal.h"
#include "tools/tools.h"

#define MAX_CHAIN 32
#define BITMAP_FLAG_IN_USE (1u << 0)
#define BITMAP_FLAG_AUTO   (1u << 1)

static char *dup_or_null(const char *s)
{
    return s && *s ? strdup(s) : NULL;
}

void img_info_free(struct image_info *info)
{
    while (info) {
        struct image_info *next = info->backing;
        free(info->filename);
        free(info->backing_file);
        free(info->full_backing_file);
        free(info->backing_format);
        free(info->data_file);
        free(info->luks);
        for (uint32_t i = 0; i < info->nb_snapshots; i++) {
            free(info->snapshots[i].id);
            free(info->snapshots[i].name);
        }
        free(info->snapshots);
        for (uint32_t i = 0; i < info->nb_bitmaps; i++)
            free(info->bitmaps[i].name);
        free(info->bitmaps);
        free(info);
        info = next;
    }
}

/* Persistent bitmaps, from the bitmap directory the header extension names
 * (only when the autoclear bit says they are valid, as QEMU requires). */
static int read_bitmaps(struct qcow2 *q, struct image_info *info)
{
    uint32_t len;
    const uint8_t *x = qcow2_header_find_ext(q->hdr_buf, q->hdr_len, &q->h, QCOW2_EXT_BITMAPS, &len);
    if (!x || len < 24 || !(q->h.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS))
        return 0;
    uint32_t nb = be32_load(x);
    uint64_t dir_size = be64_load(x + 8), dir_off = be64_load(x + 16);
    if (dir_size > (64u << 20) || nb > 65535)
        return -EINVAL;
    uint8_t *dir = malloc(dir_size + 1);
    info->bitmaps = calloc(nb + 1, sizeof(*info->bitmaps));
    if (!dir || !info->bitmaps) {
        free(dir);
        return -ENOMEM;
    }
    ssize_t n = file_pread_any(&q->file, dir, dir_size, dir_off);
    uint64_t p = 0, have = n < 0 ? 0 : (uint64_t)n;
    for (uint32_t b = 0; b < nb && p + 24 <= have; b++) {
        uint32_t flags = be32_load(dir + p + 12);
        uint8_t gbits = dir[p + 17];
        uint16_t name_len = be16_load(dir + p + 18);
        uint32_t extra = be32_load(dir + p + 20);
        uint64_t name_at = p + 24 + extra;
        if (name_at + name_len > have || gbits > 31)
            break;
        struct bitmap_info *bi = &info->bitmaps[info->nb_bitmaps++];
        bi->name = strndup((const char *)dir + name_at, name_len);
        bi->granularity = 1u << gbits;
        bi->in_use = flags & BITMAP_FLAG_IN_USE;
        bi->autoload = flags & BITMAP_FLAG_AUTO;
        p = (name_at + name_len + 7) & ~7ull;
    }
    free(dir);
    info->has_bitmaps = info->nb_bitmaps > 0;
    return 0;
}

/* The LUKS header, as qemu-img info shows it: no passphrase needed. */
static int read_luks_header(struct qcow2 *q, struct image_info *info)
{
    if (q->h.crypt_method != QCOW2_CRYPT_LUKS || q->h.crypto_length < QCOW2_LUKS_HDR_SIZE)
        return 0;
    uint8_t raw[QCOW2_LUKS_HDR_SIZE];
    char msg[200];
    ssize_t n = file_pread_any(&q->file, raw, sizeof(raw), q->h.crypto_offset);
    info->luks = malloc(sizeof(*info->luks));
    if (!info->luks)
        return -ENOMEM;
    if (n != (ssize_t)sizeof(raw) || qcow2_luks_header_parse(raw, info->luks, msg, sizeof(msg)) < 0) {
        free(info->luks);           /* unreadable: shown as encrypted, without details */
        info->luks = NULL;
    }
    return 0;
}

static int describe_qcow2(struct qcow2 *q, struct image_info *info)
{
    const struct qcow2_header *h = &q->h;
    info->encrypted = h->crypt_method != 0;
    info->cluster_size = (uint32_t)h->cluster_size;
    info->version = h->version;
    info->refcount_bits = h->refcount_bits;
    info->compression = h->compression_type;
    info->lazy_refcounts = h->compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS;
    info->corrupt = h->incompatible_features & QCOW2_INCOMPAT_CORRUPT;
    info->extended_l2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;
    info->dirty = h->incompatible_features & QCOW2_INCOMPAT_DIRTY;
    if (h->backing_file[0]) {
        char full[PATH_MAX + 1100], msg[300];
        info->backing_file = strdup(h->backing_file);
        /* As QEMU names it: against the overlay's name as given. */
        info->full_backing_file = strdup(qcow2_resolve_backing(info->filename, h->backing_file, full,
                                                               sizeof(full), msg, sizeof(msg)) == 0
                                         ? full : h->backing_file);
        info->backing_format = dup_or_null(h->backing_format);
    }
    if (h->nb_snapshots) {
        info->snapshots = calloc(h->nb_snapshots, sizeof(*info->snapshots));
        if (!info->snapshots)
            return -ENOMEM;
        info->nb_snapshots = h->nb_snapshots;
        for (uint32_t i = 0; i < h->nb_snapshots; i++) {
            const struct qcow2_snapshot *s = &q->snapshots[i];
            struct snapshot_info *si = &info->snapshots[i];
            si->id = strdup(s->id);
            si->name = strdup(s->name);
            si->vm_state_size = s->vm_state_size;
            si->date_sec = s->date_sec;
            si->date_nsec = s->date_nsec;
            si->vm_clock_nsec = s->vm_clock_nsec;
            /* The instruction count is the third word of the extra data. */
            si->has_icount = s->extra_size >= 24 && be64_load(s->extra + 16) != UINT64_MAX;
            si->icount = si->has_icount ? be64_load(s->extra + 16) : 0;
        }
    }
    if (h->data_file[0]) {
        info->data_file = strdup(h->data_file);
        info->data_file_raw = h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW;
    }
    int r = read_luks_header(q, info);
    return r < 0 ? r : read_bitmaps(q, info);
}

/* info's own open of a qcow2 image: the header and the snapshot table
 * only, so neither a passphrase nor the data file is needed (qemu-img info
 * shows an encrypted image without its key). */
static int open_header_only(struct file *f, struct qcow2 **out, char *err, size_t errlen)
{
    struct img_opts o = { .format = IMG_FMT_QCOW2, .read_only = true, .no_backing = true,
                          .cache = FILE_CACHE_BUFFERED };
    char msg[400];
    struct qcow2 *q = qcow2_alloc(f, &o, err, errlen);
    if (!q)
        return -ENOMEM;
    int r = qcow2_read_header(q, false, err, errlen);
    if (r == 0 && q->h.nb_snapshots && (r = qcow2_read_snapshots(q, msg, sizeof(msg))) < 0)
        snprintf(err, errlen, "%s: %s", f->path, msg);
    if (r < 0) {
        qcow2_abandon(q);
        return r;
    }
    *out = q;
    return 0;
}

static int describe(const char *path, enum img_format fmt, struct image_info **out, char *err, size_t errlen)
{
    struct file f;
    if (file_open(&f, path, false, FILE_CACHE_BUFFERED, err, errlen) < 0)
        return -EINVAL;
    if (fmt == IMG_FMT_AUTO)
        fmt = img_probe(&f);
    struct image *img = NULL;
    struct qcow2 *q = NULL;
    struct img_opts o = { .format = fmt, .read_only = true, .no_backing = true, .cache = FILE_CACHE_BUFFERED };
    int r = fmt == IMG_FMT_QCOW2 ? open_header_only(&f, &q, err, errlen)
          : (img = img_open_file(&f, &o, err, errlen)) ? 0 : -EINVAL;
    if (r < 0) {
        file_close(&f);
        return r;
    }
    if (q)
        img = &q->img;
    struct image_info *info = calloc(1, sizeof(*info));
    r = info ? 0 : -ENOMEM;
    if (r == 0) {
        struct stat st;
        info->filename = strdup(path);
        bool have_st = stat(path, &st) == 0;
        info->virtual_size = img_size(img);
        info->actual_size = have_st ? (uint64_t)st.st_blocks * 512 : 0;
        info->format = q ? IMG_FMT_QCOW2 : IMG_FMT_RAW;
        /* A raw file's partial last sector counts as a whole one (QEMU); it
         * is served without it. */
        if (info->format == IMG_FMT_RAW && have_st && S_ISREG(st.st_mode))
            info->virtual_size = ((uint64_t)st.st_size + 511) & ~511ull;
        if (q)
            r = describe_qcow2(q, info);
        if (r < 0)
            snprintf(err, errlen, "%s: cannot describe the image: %s", path, strerror(-r));
    }
    img_close(img);
    if (r < 0) {
        img_info_free(info);
        return r;
    }
    *out = info;
    return 0;
}

int img_info(const char *path, enum img_format fmt, bool chain, struct image_info **out,
             char *err, size_t errlen)
{
    char *seen[MAX_CHAIN + 1] = { NULL };
    struct image_info *head = NULL, **tail = &head;
    int r = 0, depth = 0;
    char next[PATH_MAX + 1100];
    snprintf(next, sizeof(next), "%s", path);
    for (;;) {
        char *real = realpath(next, NULL);
        for (int i = 0; real && i < depth; i++)
            if (!strcmp(seen[i], real)) {
                snprintf(err, errlen, "backing chain loops: '%s' is its own backing file", next);
                r = -ELOOP;
            }
        if (r == 0 && depth > MAX_CHAIN) {
            snprintf(err, errlen, "backing chain of '%s' is deeper than %d images", path, MAX_CHAIN);
            r = -ELOOP;
        }
        if (r < 0) {
            free(real);
            break;
        }
        seen[depth++] = real;
        r = describe(next, fmt, tail, err, errlen);
        if (r < 0 || !chain || !(*tail)->backing_file)
            break;
        struct image_info *cur = *tail;
        char msg[400];
        r = qcow2_resolve_backing(cur->filename, cur->backing_file, next, sizeof(next), msg, sizeof(msg));
        if (r < 0) {
            snprintf(err, errlen, "%s", msg);
            break;
        }
        const char *bf = cur->backing_format;
        fmt = !bf ? IMG_FMT_AUTO : !strcmp(bf, "qcow2") ? IMG_FMT_QCOW2 : !strcmp(bf, "raw") ? IMG_FMT_RAW : -1;
        if ((int)fmt < 0) {
            snprintf(err, errlen, "backing file '%s' has format '%s', which is not supported", next, bf);
            r = -ENOTSUP;
            break;
        }
        tail = &cur->backing;
    }
    for (int i = 0; i <= MAX_CHAIN; i++)
        free(seen[i]);
    if (r < 0) {
        img_info_free(head);
        return r;
    }
    *out = head;
    return 0;
}
