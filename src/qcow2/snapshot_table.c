/* Internal snapshot table parsing (pure, no I/O). */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/format.h"

#define SN_FIXED_SIZE   QCOW2_SNAPSHOT_FIXED
#define SN_EXTRA_V3_MIN 16     /* v3: 64-bit vm-state size + disk size */
#define SN_EXTRA_KNOWN  24     /* ... + instruction count */

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

void qcow2_snapshot_fixed_load(const uint8_t *e, struct qcow2_snapshot *s, uint16_t *id_len,
                               uint16_t *name_len)
{
    s->l1_table_offset = be64_load(e + 0);
    s->l1_size = be32_load(e + 8);
    *id_len = be16_load(e + 12);
    *name_len = be16_load(e + 14);
    s->date_sec = be32_load(e + 16);
    s->date_nsec = be32_load(e + 20);
    s->vm_clock_nsec = be64_load(e + 24);
    s->vm_state_size = be32_load(e + 32);
    s->extra_size = be32_load(e + 36);
}

void qcow2_snapshot_extra_apply(struct qcow2_snapshot *s, uint64_t image_size)
{
    if (s->extra_size >= 8)
        s->vm_state_size = be64_load(s->extra);    /* supersedes the 32-bit field */
    s->disk_size = s->extra_size >= 16 ? be64_load(s->extra + 8) : image_size;
}

/* Entries are written as QEMU writes them: at least the three known words
 * of extra data (64-bit vm-state size, disk size, instruction count, which
 * is "none" (all ones) when the entry had none), unknown extra data kept. */
size_t qcow2_snapshot_entry_len(const struct qcow2_snapshot *s)
{
    size_t extra = s->extra_size > SN_EXTRA_KNOWN ? s->extra_size : SN_EXTRA_KNOWN;
    return SN_FIXED_SIZE + extra + strlen(s->id) + strlen(s->name);
}

void qcow2_snapshot_entry_store(const struct qcow2_snapshot *s, uint8_t *buf)
{
    size_t extra = s->extra_size > SN_EXTRA_KNOWN ? s->extra_size : SN_EXTRA_KNOWN;
    size_t id_len = strlen(s->id), name_len = strlen(s->name);
    memset(buf, 0, SN_FIXED_SIZE + extra);
    be64_store(buf + 0, s->l1_table_offset);
    be32_store(buf + 8, s->l1_size);
    be16_store(buf + 12, (uint16_t)id_len);
    be16_store(buf + 14, (uint16_t)name_len);
    be32_store(buf + 16, s->date_sec);
    be32_store(buf + 20, s->date_nsec);
    be64_store(buf + 24, s->vm_clock_nsec);
    /* A state too large for 32 bits: older readers see a disk-only snapshot. */
    be32_store(buf + 32, s->vm_state_size <= UINT32_MAX ? (uint32_t)s->vm_state_size : 0);
    be32_store(buf + 36, (uint32_t)extra);
    uint8_t *x = buf + SN_FIXED_SIZE;
    if (s->extra_size)
        memcpy(x, s->extra, s->extra_size);
    be64_store(x, s->vm_state_size);
    be64_store(x + 8, s->disk_size);
    if (s->extra_size < SN_EXTRA_KNOWN)
        be64_store(x + 16, UINT64_MAX);
    memcpy(x + extra, s->id, id_len);
    memcpy(x + extra + id_len, s->name, name_len);
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
        uint16_t id_size, name_size;
        qcow2_snapshot_fixed_load(buf + pos, s, &id_size, &name_size);
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
        if (s->extra_size) {
            s->extra = malloc(s->extra_size);
            if (!s->extra)
                goto out_nomem;
            memcpy(s->extra, buf + pos, s->extra_size);
        }
        qcow2_snapshot_extra_apply(s, h->size);
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
