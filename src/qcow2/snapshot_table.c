/* Internal snapshot table parsing (pure, no I/O). */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/format.h"

#define SN_FIXED_SIZE   40     /* bytes 0..39 of an entry */
#define SN_EXTRA_V3_MIN 16     /* v3: 64-bit vm-state size + disk size */

__attribute__((format(printf, 4, 5)))
static int fail(int ret, char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, errlen, fmt, ap);
        va_end(ap);
    }
    return ret;
}

static char *dup_name(const uint8_t *src, size_t n)
{
    char *s = malloc(n + 1);
    if (s) {
        memcpy(s, src, n);
        s[n] = '\0';
    }
    return s;
}

void qcow2_snapshots_free(struct qcow2_snapshot *s, uint32_t nb)
{
    if (!s)
        return;
    for (uint32_t i = 0; i < nb; i++) {
        free(s[i].id);
        free(s[i].name);
        free(s[i].extra);
    }
    free(s);
}

int qcow2_snapshots_parse(const struct qcow2_header *h, const uint8_t *buf, size_t len,
                          uint32_t nb, struct qcow2_snapshot **out, char *err, size_t errlen)
{
    *out = NULL;
    if (nb == 0)
        return 0;
    if (nb > QCOW2_MAX_SNAPSHOTS)
        return fail(-EINVAL, err, errlen, "qcow2 snapshot table: %u snapshots (max %d)", nb,
                    QCOW2_MAX_SNAPSHOTS);
    if (len > QCOW2_MAX_SNAPSHOT_TABLE)
        len = QCOW2_MAX_SNAPSHOT_TABLE;   /* anything past the limit is not part of a valid table */

    /* Every entry has a 40-byte fixed part: reject before allocating nb entries. */
    if ((uint64_t)nb * SN_FIXED_SIZE > len)
        return fail(-EINVAL, err, errlen,
                    "qcow2 snapshot table: %zu bytes cannot hold %u snapshots", len, nb);

    struct qcow2_snapshot *sn = calloc(nb, sizeof(*sn));
    if (!sn)
        return fail(-ENOMEM, err, errlen, "qcow2 snapshot table: out of memory");

    size_t pos = 0;
    int ret;
    for (uint32_t i = 0; i < nb; i++) {
        struct qcow2_snapshot *s = &sn[i];
        if (len - pos < SN_FIXED_SIZE) {
            ret = fail(-EINVAL, err, errlen,
                       "qcow2 snapshot table: entry %u at offset %zu truncated (table is %zu bytes)",
                       i, pos, len);
            goto out_free;
        }
        const uint8_t *e = buf + pos;
        s->l1_table_offset = be64_load(e + 0);
        s->l1_size = be32_load(e + 8);
        uint16_t id_size = be16_load(e + 12);
        uint16_t name_size = be16_load(e + 14);
        s->date_sec = be32_load(e + 16);
        s->date_nsec = be32_load(e + 20);
        s->vm_clock_nsec = be64_load(e + 24);
        s->vm_state_size = be32_load(e + 32);
        s->extra_size = be32_load(e + 36);
        pos += SN_FIXED_SIZE;

        if (s->extra_size > len - pos ||
            (size_t)id_size + name_size > len - pos - s->extra_size) {
            ret = fail(-EINVAL, err, errlen,
                       "qcow2 snapshot table: entry %u (extra_size %u, id %u, name %u bytes) runs past the table (%zu bytes)",
                       i, s->extra_size, id_size, name_size, len);
            goto out_free;
        }
        if (h->version >= 3 && s->extra_size < SN_EXTRA_V3_MIN) {
            ret = fail(-EINVAL, err, errlen,
                       "qcow2 snapshot table: entry %u extra_size %u too small (v3 needs >= %d)",
                       i, s->extra_size, SN_EXTRA_V3_MIN);
            goto out_free;
        }
        const uint8_t *extra = buf + pos;
        if (s->extra_size >= 8)
            s->vm_state_size = be64_load(extra);    /* supersedes the 32-bit field */
        s->disk_size = s->extra_size >= 16 ? be64_load(extra + 8) : h->size;
        s->icount = s->extra_size >= QCOW2_SNAPSHOT_EXTRA_KNOWN ? be64_load(extra + 16) : UINT64_MAX;
        if (s->extra_size) {
            s->extra = malloc(s->extra_size);
            if (!s->extra)
                goto out_nomem;
            memcpy(s->extra, extra, s->extra_size);
        }
        pos += s->extra_size;
        s->id = dup_name(buf + pos, id_size);
        pos += id_size;
        s->name = dup_name(buf + pos, name_size);
        pos += name_size;
        if (!s->id || !s->name)
            goto out_nomem;
        /* Entries are padded to 8; the last one's padding may lie past len. */
        pos = (pos + 7) & ~(size_t)7;
        if (pos > len)
            pos = len;

        if (s->l1_table_offset & (h->cluster_size - 1)) {
            ret = fail(-EINVAL, err, errlen,
                       "qcow2 snapshot table: entry %u l1_table_offset 0x%" PRIx64 " not cluster-aligned",
                       i, s->l1_table_offset);
            goto out_free;
        }
        if ((uint64_t)s->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
            ret = fail(-EINVAL, err, errlen,
                       "qcow2 snapshot table: entry %u l1_size %u too large (max %u entries)",
                       i, s->l1_size, QCOW2_MAX_L1_BYTES / 8);
            goto out_free;
        }
    }
    *out = sn;
    return 0;

out_nomem:
    ret = fail(-ENOMEM, err, errlen, "qcow2 snapshot table: out of memory");
out_free:
    qcow2_snapshots_free(sn, nb);
    return ret;
}

int qcow2_snapshots_serialize(const struct qcow2_snapshot *s, uint32_t nb, uint8_t **out, size_t *len)
{
    *out = NULL;
    *len = 0;
    uint64_t total = 0;
    for (uint32_t i = 0; i < nb; i++) {
        size_t idn = strlen(s[i].id), namen = strlen(s[i].name);
        if (idn > UINT16_MAX || namen > UINT16_MAX)
            return -EFBIG;
        uint32_t extra = s[i].extra_size > QCOW2_SNAPSHOT_EXTRA_KNOWN ? s[i].extra_size
                                                                       : QCOW2_SNAPSHOT_EXTRA_KNOWN;
        total = (total + 7) & ~7ull;
        total += SN_FIXED_SIZE + (uint64_t)extra + idn + namen;
        if (total > QCOW2_MAX_SNAPSHOT_TABLE)
            return -EFBIG;
    }
    if (!nb)
        return 0;
    uint8_t *buf = calloc(1, total);
    if (!buf)
        return -ENOMEM;
    size_t pos = 0;
    for (uint32_t i = 0; i < nb; i++) {
        const struct qcow2_snapshot *e = &s[i];
        size_t idn = strlen(e->id), namen = strlen(e->name);
        uint32_t extra = e->extra_size > QCOW2_SNAPSHOT_EXTRA_KNOWN ? e->extra_size
                                                                     : QCOW2_SNAPSHOT_EXTRA_KNOWN;
        pos = (pos + 7) & ~(size_t)7;
        uint8_t *p = buf + pos;
        be64_store(p + 0, e->l1_table_offset);
        be32_store(p + 8, e->l1_size);
        be16_store(p + 12, (uint16_t)idn);
        be16_store(p + 14, (uint16_t)namen);
        be32_store(p + 16, e->date_sec);
        be32_store(p + 20, e->date_nsec);
        be64_store(p + 24, e->vm_clock_nsec);
        /* A vm-state size that does not fit 32 bits is written as 0 here, so
         * older readers see a disk-only snapshot rather than a cut one. */
        be32_store(p + 32, e->vm_state_size <= UINT32_MAX ? (uint32_t)e->vm_state_size : 0);
        be32_store(p + 36, extra);
        p += SN_FIXED_SIZE;
        be64_store(p + 0, e->vm_state_size);
        be64_store(p + 8, e->disk_size);
        be64_store(p + 16, e->icount);
        if (e->extra_size > QCOW2_SNAPSHOT_EXTRA_KNOWN)
            memcpy(p + QCOW2_SNAPSHOT_EXTRA_KNOWN, e->extra + QCOW2_SNAPSHOT_EXTRA_KNOWN,
                   e->extra_size - QCOW2_SNAPSHOT_EXTRA_KNOWN);
        p += extra;
        memcpy(p, e->id, idn);
        memcpy(p + idn, e->name, namen);
        pos += SN_FIXED_SIZE + extra + idn + namen;
    }
    *out = buf;
    *len = total;
    return 0;
}
