/* qcow2 header parsing, validation and rewriting (pure, no I/O). */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "qcow2/format.h"

/* Fixed header field offsets (docs/interop/qcow2.txt, "Header"). */
#define OFF_MAGIC               0
#define OFF_VERSION             4
#define OFF_BACKING_OFFSET      8
#define OFF_BACKING_SIZE        16
#define OFF_CLUSTER_BITS        20
#define OFF_SIZE                24
#define OFF_CRYPT_METHOD        32
#define OFF_L1_SIZE             36
#define OFF_L1_OFFSET           40
#define OFF_REFTABLE_OFFSET     48
#define OFF_REFTABLE_CLUSTERS   56
#define OFF_NB_SNAPSHOTS        60
#define OFF_SNAPSHOTS_OFFSET    64
#define OFF_INCOMPAT            72
#define OFF_COMPAT              80
#define OFF_AUTOCLEAR           88
#define OFF_REFCOUNT_ORDER      96
#define OFF_HEADER_LENGTH       100
#define OFF_COMPRESSION_TYPE    104

#define FEATURE_ENTRY_SIZE      48
#define FEATURE_NAME_LEN        46

__attribute__((format(printf, 4, 5)))
static int fail(int ret, char *err, size_t errlen, const char *fmt, ...)
{
    if (err && errlen) {
        int n = snprintf(err, errlen, "qcow2 header: ");
        va_list ap;
        va_start(ap, fmt);
        if (n >= 0 && (size_t)n < errlen)
            vsnprintf(err + n, errlen - n, fmt, ap);
        va_end(ap);
    }
    return ret;
}

/* Copy a non-terminated on-disk string into dst (capacity dstlen incl. NUL). */
static void copy_name(char *dst, size_t dstlen, const uint8_t *src, size_t n)
{
    if (n >= dstlen)
        n = dstlen - 1;
    memcpy(dst, src, n);
    dst[n] = '\0';
}

/* Is the table [off, off+bytes) inside the file (no overflow)? */
static bool inside_file(uint64_t off, uint64_t bytes, uint64_t file_size)
{
    return off <= file_size && bytes <= file_size - off;
}

/* Append the names of the unknown incompatible bits in `bits` from the feature
 * name table (if the image has one) to msg. */
static void describe_unknown_bits(const uint8_t *table, size_t table_len, uint64_t bits,
                                  char *msg, size_t msglen)
{
    size_t used = strlen(msg);
    bool first = true;

    for (size_t i = 0; table && i + FEATURE_ENTRY_SIZE <= table_len; i += FEATURE_ENTRY_SIZE) {
        const uint8_t *e = table + i;
        if (e[0] != 0 || e[1] > 63 || !(bits & (1ull << e[1])))
            continue;
        char name[FEATURE_NAME_LEN + 1];
        copy_name(name, sizeof(name), e + 2, FEATURE_NAME_LEN);
        if (!name[0])
            continue;
        int n = snprintf(msg + used, msglen - used, "%s%s", first ? " (" : ", ", name);
        if (n < 0 || (size_t)n >= msglen - used)
            return;
        used += n;
        first = false;
    }
    if (!first && used + 1 < msglen) {
        msg[used++] = ')';
        msg[used] = '\0';
    }
}

static void derive_geometry(struct qcow2_header *h)
{
    bool extl2 = h->incompatible_features & QCOW2_INCOMPAT_EXTL2;

    h->cluster_size = 1ull << h->cluster_bits;
    h->l2_entry_size = extl2 ? 16 : 8;
    h->l2_bits = h->cluster_bits - (extl2 ? 4 : 3);
    h->l2_entries = h->cluster_size / h->l2_entry_size;
    h->refcount_bits = 1u << h->refcount_order;
    h->refcount_block_entries = h->cluster_size * 8 / h->refcount_bits;
    h->csize_shift = 62 - (h->cluster_bits - 8);
    h->csize_mask = (1ull << (h->cluster_bits - 8)) - 1;
    h->cluster_offset_mask = (1ull << h->csize_shift) - 1;
    /* One L2 table maps l2_entries clusters; size <= 2^63 so no overflow. */
    uint64_t span_bits = h->cluster_bits + h->l2_bits;
    uint64_t span = 1ull << span_bits;
    h->l1_size_needed = (h->size >> span_bits) + ((h->size & (span - 1)) != 0);
}

/* Walk the header extensions in buf[start, limit).  Records what we use and
 * remembers the feature name table for error messages. */
static int walk_extensions(const uint8_t *buf, size_t start, size_t limit,
                           struct qcow2_header *h, const uint8_t **ftable,
                           size_t *ftable_len, char *err, size_t errlen)
{
    size_t off = start;

    *ftable = NULL;
    *ftable_len = 0;
    while (off < limit) {
        if (limit - off < 8)
            return fail(-EINVAL, err, errlen,
                        "header extension at offset %zu runs past the header area (ends at %zu)",
                        off, limit);
        uint32_t type = be32_load(buf + off);
        uint32_t len = be32_load(buf + off + 4);
        off += 8;
        if (type == QCOW2_EXT_END)
            break;
        if (len > limit - off)
            return fail(-EINVAL, err, errlen,
                        "header extension 0x%08x at offset %zu: length %u runs past the header area (ends at %zu)",
                        type, off - 8, len, limit);
        const uint8_t *data = buf + off;
        switch (type) {
        case QCOW2_EXT_BACKING_FORMAT:
            if (len >= sizeof(h->backing_format))
                return fail(-EINVAL, err, errlen,
                            "backing format name length %u exceeds %zu", len,
                            sizeof(h->backing_format) - 1);
            copy_name(h->backing_format, sizeof(h->backing_format), data, len);
            break;
        case QCOW2_EXT_DATA_FILE:
            if (len >= sizeof(h->data_file))
                return fail(-EINVAL, err, errlen,
                            "data file name length %u exceeds %zu", len,
                            sizeof(h->data_file) - 1);
            copy_name(h->data_file, sizeof(h->data_file), data, len);
            break;
        case QCOW2_EXT_CRYPTO:
            if (len != 16)
                return fail(-EINVAL, err, errlen, "encryption header extension has %u bytes, not 16", len);
            h->has_crypto_ext = true;
            h->crypto_offset = be64_load(data);
            h->crypto_length = be64_load(data + 8);
            break;
        case QCOW2_EXT_FEATURE_TABLE:
            *ftable = data;
            *ftable_len = len;
            break;
        case QCOW2_EXT_BITMAPS:
            h->has_bitmaps_ext = true;
            h->bitmaps_ext_len = len;
            if (len >= 24) {
                h->bitmaps_nb = be32_load(data);
                h->bitmaps_reserved = be32_load(data + 4);
                h->bitmaps_dir_size = be64_load(data + 8);
                h->bitmaps_dir_offset = be64_load(data + 16);
            }
            break;
        default:
            /* Unknown: skipped here, preserved since store never touches it. */
            break;
        }
        /* Data is padded to a multiple of 8; padding may end exactly at limit. */
        size_t padded = ((size_t)len + 7) & ~(size_t)7;
        off = padded > limit - off ? limit : off + padded;
    }
    h->ext_end = (uint32_t)off;
    return 0;
}

/* The fields every version has; cluster_bits checked (the rest builds on it). */
static int read_v2_fields(const uint8_t *buf, struct qcow2_header *h, char *err, size_t errlen)
{
    uint32_t magic = be32_load(buf + OFF_MAGIC);
    if (magic != QCOW2_MAGIC)
        return fail(-EINVAL, err, errlen, "bad magic 0x%08x", magic);
    h->version = be32_load(buf + OFF_VERSION);
    if (h->version != 2 && h->version != 3)
        return fail(-ENOTSUP, err, errlen, "version %u is not supported (2 or 3)", h->version);

    h->backing_file_offset = be64_load(buf + OFF_BACKING_OFFSET);
    h->backing_file_size = be32_load(buf + OFF_BACKING_SIZE);
    h->cluster_bits = be32_load(buf + OFF_CLUSTER_BITS);
    h->size = be64_load(buf + OFF_SIZE);
    h->crypt_method = be32_load(buf + OFF_CRYPT_METHOD);
    h->l1_size = be32_load(buf + OFF_L1_SIZE);
    h->l1_table_offset = be64_load(buf + OFF_L1_OFFSET);
    h->refcount_table_offset = be64_load(buf + OFF_REFTABLE_OFFSET);
    h->refcount_table_clusters = be32_load(buf + OFF_REFTABLE_CLUSTERS);
    h->nb_snapshots = be32_load(buf + OFF_NB_SNAPSHOTS);
    h->snapshots_offset = be64_load(buf + OFF_SNAPSHOTS_OFFSET);

    if (h->cluster_bits < QCOW2_MIN_CLUSTER_BITS || h->cluster_bits > QCOW2_MAX_CLUSTER_BITS)
        return fail(-EINVAL, err, errlen, "cluster_bits %u out of range %d..%d",
                    h->cluster_bits, QCOW2_MIN_CLUSTER_BITS, QCOW2_MAX_CLUSTER_BITS);
    return 0;
}

/* v3's feature bits, refcount order and header length (v2 implies them). */
static int read_v3_fields(const uint8_t *buf, size_t len, struct qcow2_header *h,
                          char *err, size_t errlen)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    if (h->version == 2) {
        /* v2 implies these values (spec: fields absent). */
        h->header_length = QCOW2_V2_HEADER_LEN;
        h->refcount_order = 4;
    } else {
        if (len < QCOW2_V3_MIN_HEADER_LEN)
            return fail(-EINVAL, err, errlen, "image too short for a v3 header (%zu bytes)", len);
        h->incompatible_features = be64_load(buf + OFF_INCOMPAT);
        h->compatible_features = be64_load(buf + OFF_COMPAT);
        h->autoclear_features = be64_load(buf + OFF_AUTOCLEAR);
        h->refcount_order = be32_load(buf + OFF_REFCOUNT_ORDER);
        h->header_length = be32_load(buf + OFF_HEADER_LENGTH);
        if (h->header_length < QCOW2_V3_MIN_HEADER_LEN || h->header_length % 8)
            return fail(-EINVAL, err, errlen,
                        "header_length %u invalid (v3 needs >= %d and a multiple of 8)",
                        h->header_length, QCOW2_V3_MIN_HEADER_LEN);
        if (h->header_length > cluster_size)
            return fail(-EINVAL, err, errlen, "header_length %u exceeds cluster size %" PRIu64,
                        h->header_length, cluster_size);
        if (h->header_length > len)
            return fail(-EINVAL, err, errlen, "header_length %u exceeds the image (%zu bytes)",
                        h->header_length, len);
        /* The field is absent (= zlib) when header_length does not cover byte 104. */
        if (h->header_length > OFF_COMPRESSION_TYPE)
            h->compression_type = buf[OFF_COMPRESSION_TYPE];
        if (h->refcount_order > 6)
            return fail(-EINVAL, err, errlen, "refcount_order %u out of range 0..6",
                        h->refcount_order);
    }
    return 0;
}

static int check_crypt_method(const struct qcow2_header *h, char *err, size_t errlen)
{
    /* LUKS (2) is opened by crypto.c with the user's passphrase; the legacy
     * AES method (1) is refused (QEMU itself only reads it in its tools). */
    if (h->crypt_method == QCOW2_CRYPT_AES)
        return fail(-ENOTSUP, err, errlen, "legacy AES encryption (crypt_method 1) is not supported; "
                    "convert the image to LUKS encryption with qemu-img");
    if (h->crypt_method != QCOW2_CRYPT_NONE && h->crypt_method != QCOW2_CRYPT_LUKS)
        return fail(-ENOTSUP, err, errlen, "unknown encryption method (crypt_method %u)", h->crypt_method);
    return 0;
}

static int read_backing_name(const uint8_t *buf, size_t len, struct qcow2_header *h,
                             char *err, size_t errlen)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    /* Backing file name: must lie inside the header cluster and the buffer. */
    if (h->backing_file_offset) {
        if (h->backing_file_size > QCOW2_MAX_BACKING_NAME)
            return fail(-EINVAL, err, errlen, "backing_file_size %u exceeds %d",
                        h->backing_file_size, QCOW2_MAX_BACKING_NAME);
        if (h->backing_file_offset >= cluster_size ||
            h->backing_file_offset + h->backing_file_size > cluster_size)
            return fail(-EINVAL, err, errlen,
                        "backing_file_offset %" PRIu64 " + size %u lies outside the header cluster",
                        h->backing_file_offset, h->backing_file_size);
        if (h->backing_file_offset + h->backing_file_size > len)
            return fail(-EINVAL, err, errlen,
                        "backing_file_offset %" PRIu64 " + size %u lies outside the image (%zu bytes)",
                        h->backing_file_offset, h->backing_file_size, len);
        copy_name(h->backing_file, sizeof(h->backing_file), buf + h->backing_file_offset,
                  h->backing_file_size);
    }
    return 0;
}

static int check_crypto_ext(const struct qcow2_header *h, uint64_t file_size,
                            char *err, size_t errlen)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    /* The encryption header pointer exists exactly for LUKS (qcow2.txt). */
    if (h->has_crypto_ext != (h->crypt_method == QCOW2_CRYPT_LUKS))
        return fail(-EINVAL, err, errlen, h->has_crypto_ext
                    ? "encryption header extension without LUKS encryption (crypt_method %u)"
                    : "LUKS encryption (crypt_method %u) without its encryption header extension",
                    h->crypt_method);
    if (h->has_crypto_ext &&
        ((h->crypto_offset & (cluster_size - 1)) || !h->crypto_offset ||
         !inside_file(h->crypto_offset, h->crypto_length, file_size)))
        return fail(-EINVAL, err, errlen, "LUKS encryption header at 0x%" PRIx64 " (%" PRIu64
                    " bytes) is misaligned or lies outside the image", h->crypto_offset, h->crypto_length);
    return 0;
}

/* Feature bits we do not know, and the combinations the spec forbids;
 * ftable names unknown bits in the message. */
static int check_features(const struct qcow2_header *h, const uint8_t *ftable, size_t ftable_len,
                          char *err, size_t errlen)
{
    uint64_t unknown = h->incompatible_features & ~QCOW2_INCOMPAT_KNOWN;
    if (unknown) {
        int r = fail(-ENOTSUP, err, errlen, "unsupported incompatible feature bits 0x%" PRIx64,
                     unknown);
        if (err && errlen)
            describe_unknown_bits(ftable, ftable_len, unknown, err, errlen);
        return r;
    }
    /* As QEMU: the raw-data-file bit needs a data file (qcow2.txt: "may only
     * be set if the External Data File bit is also set"). */
    if ((h->autoclear_features & QCOW2_AUTOCLEAR_DATA_RAW) &&
        !(h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE))
        return fail(-EINVAL, err, errlen, "autoclear bit data_file_raw is set without an external data file");
    if ((h->incompatible_features & QCOW2_INCOMPAT_EXTL2) && h->cluster_bits < 14)
        return fail(-EINVAL, err, errlen, "extended L2 entries need cluster_bits >= 14 (got %u)",
                    h->cluster_bits);
    if (h->incompatible_features & QCOW2_INCOMPAT_COMPRESSION) {
        if (h->header_length <= OFF_COMPRESSION_TYPE)
            return fail(-EINVAL, err, errlen,
                        "compression type bit set but compression_type absent (header_length %u)",
                        h->header_length);
        if (h->compression_type == QCOW2_COMP_ZLIB)
            return fail(-EINVAL, err, errlen, "compression type bit set but compression_type is 0");
        if (h->compression_type != QCOW2_COMP_ZSTD)
            return fail(-ENOTSUP, err, errlen, "compression_type %u is not supported",
                        h->compression_type);
    } else if (h->compression_type != QCOW2_COMP_ZLIB) {
        return fail(-EINVAL, err, errlen,
                    "compression_type %u without the compression type feature bit",
                    h->compression_type);
    }
    return 0;
}

static int check_size_and_l1(struct qcow2_header *h, uint64_t file_size, char *err, size_t errlen)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    /* Virtual size and L1 table. */
    if (h->size > (1ull << 63))
        return fail(-EINVAL, err, errlen, "size %" PRIu64 " too large", h->size);
    if ((uint64_t)h->l1_size * 8 > QCOW2_MAX_L1_BYTES)
        return fail(-EINVAL, err, errlen, "l1_size %u too large (max %u entries)", h->l1_size,
                    QCOW2_MAX_L1_BYTES / 8);
    derive_geometry(h);
    if (h->l1_size < h->l1_size_needed)
        return fail(-EINVAL, err, errlen, "l1_size %u too small for size %" PRIu64 " (need %" PRIu64 ")",
                    h->l1_size, h->size, h->l1_size_needed);
    if (h->l1_table_offset & (cluster_size - 1))
        return fail(-EINVAL, err, errlen, "l1_table_offset 0x%" PRIx64 " not cluster-aligned",
                    h->l1_table_offset);
    if (h->l1_size) {
        if (h->l1_table_offset == 0)
            return fail(-EINVAL, err, errlen, "l1_table_offset 0 overlaps the header");
        if (!inside_file(h->l1_table_offset, (uint64_t)h->l1_size * 8, file_size))
            return fail(-EINVAL, err, errlen,
                        "l1_table_offset 0x%" PRIx64 " + %u entries past end of file (%" PRIu64 " bytes)",
                        h->l1_table_offset, h->l1_size, file_size);
    }
    return 0;
}

static int check_refcount_table(const struct qcow2_header *h, uint64_t file_size,
                                char *err, size_t errlen)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    /* Refcount table. */
    if (h->refcount_table_offset & (cluster_size - 1))
        return fail(-EINVAL, err, errlen, "refcount_table_offset 0x%" PRIx64 " not cluster-aligned",
                    h->refcount_table_offset);
    if (h->refcount_table_offset == 0)
        return fail(-EINVAL, err, errlen, "refcount_table_offset 0 overlaps the header");
    if (h->refcount_table_clusters == 0)
        return fail(-EINVAL, err, errlen, "refcount_table_clusters is 0");
    uint64_t rt_bytes = (uint64_t)h->refcount_table_clusters << h->cluster_bits;
    if (rt_bytes > QCOW2_MAX_REFTABLE_BYTES)
        return fail(-EINVAL, err, errlen, "refcount_table_clusters %u too large (max %u bytes)",
                    h->refcount_table_clusters, QCOW2_MAX_REFTABLE_BYTES);
    if (!inside_file(h->refcount_table_offset, rt_bytes, file_size))
        return fail(-EINVAL, err, errlen,
                    "refcount_table_offset 0x%" PRIx64 " + %u clusters past end of file (%" PRIu64 " bytes)",
                    h->refcount_table_offset, h->refcount_table_clusters, file_size);
    return 0;
}

static int check_snapshot_table(const struct qcow2_header *h, uint64_t file_size,
                                char *err, size_t errlen)
{
    uint64_t cluster_size = 1ull << h->cluster_bits;
    /* Snapshot table: entries are at least 40 bytes each. */
    if (h->nb_snapshots > QCOW2_MAX_SNAPSHOTS)
        return fail(-EINVAL, err, errlen, "nb_snapshots %u too large (max %d)", h->nb_snapshots,
                    QCOW2_MAX_SNAPSHOTS);
    if (h->nb_snapshots) {
        if (h->snapshots_offset & (cluster_size - 1))
            return fail(-EINVAL, err, errlen, "snapshots_offset 0x%" PRIx64 " not cluster-aligned",
                        h->snapshots_offset);
        if (h->snapshots_offset == 0)
            return fail(-EINVAL, err, errlen, "snapshots_offset 0 overlaps the header");
        if (!inside_file(h->snapshots_offset, (uint64_t)h->nb_snapshots * 40, file_size))
            return fail(-EINVAL, err, errlen,
                        "snapshots_offset 0x%" PRIx64 " + %u snapshots past end of file (%" PRIu64 " bytes)",
                        h->snapshots_offset, h->nb_snapshots, file_size);
    }
    return 0;
}

int qcow2_header_parse(const uint8_t *buf, size_t len, uint64_t file_size,
                       struct qcow2_header *h, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = '\0';
    memset(h, 0, sizeof(*h));
    if (!buf || len < QCOW2_V2_HEADER_LEN)
        return fail(-EINVAL, err, errlen, "image too short (%zu bytes, need %d)", len,
                    QCOW2_V2_HEADER_LEN);
    const uint8_t *ftable = NULL;
    size_t ftable_len = 0;
    int ret;
    if ((ret = read_v2_fields(buf, h, err, errlen)) < 0 ||
        (ret = read_v3_fields(buf, len, h, err, errlen)) < 0 ||
        (ret = check_crypt_method(h, err, errlen)) < 0 ||
        (ret = read_backing_name(buf, len, h, err, errlen)) < 0)
        return ret;

    /* Extensions end where the backing file name starts (the name may only be
     * followed by nothing), else at the end of the header cluster. */
    uint64_t cluster_size = 1ull << h->cluster_bits;
    size_t limit = len < cluster_size ? len : (size_t)cluster_size;
    if (h->backing_file_offset && h->backing_file_offset < limit)
        limit = (size_t)h->backing_file_offset;
    ret = walk_extensions(buf, h->header_length, limit, h, &ftable, &ftable_len, err, errlen);
    if (ret < 0)
        return ret;

    if ((ret = check_crypto_ext(h, file_size, err, errlen)) < 0 ||
        (ret = check_features(h, ftable, ftable_len, err, errlen)) < 0 ||
        (ret = check_size_and_l1(h, file_size, err, errlen)) < 0 ||
        (ret = check_refcount_table(h, file_size, err, errlen)) < 0 ||
        (ret = check_snapshot_table(h, file_size, err, errlen)) < 0)
        return ret;
    return 0;
}

void qcow2_header_store(const struct qcow2_header *h, uint8_t *buf)
{
    be32_store(buf + OFF_MAGIC, QCOW2_MAGIC);
    be32_store(buf + OFF_VERSION, h->version);
    be64_store(buf + OFF_BACKING_OFFSET, h->backing_file_offset);
    be32_store(buf + OFF_BACKING_SIZE, h->backing_file_size);
    be32_store(buf + OFF_CLUSTER_BITS, h->cluster_bits);
    be64_store(buf + OFF_SIZE, h->size);
    be32_store(buf + OFF_CRYPT_METHOD, h->crypt_method);
    be32_store(buf + OFF_L1_SIZE, h->l1_size);
    be64_store(buf + OFF_L1_OFFSET, h->l1_table_offset);
    be64_store(buf + OFF_REFTABLE_OFFSET, h->refcount_table_offset);
    be32_store(buf + OFF_REFTABLE_CLUSTERS, h->refcount_table_clusters);
    be32_store(buf + OFF_NB_SNAPSHOTS, h->nb_snapshots);
    be64_store(buf + OFF_SNAPSHOTS_OFFSET, h->snapshots_offset);
    if (h->version < 3)
        return;     /* v2 header ends at 72: bytes after it are extensions */
    be64_store(buf + OFF_INCOMPAT, h->incompatible_features);
    be64_store(buf + OFF_COMPAT, h->compatible_features);
    be64_store(buf + OFF_AUTOCLEAR, h->autoclear_features);
    be32_store(buf + OFF_REFCOUNT_ORDER, h->refcount_order);
    be32_store(buf + OFF_HEADER_LENGTH, h->header_length);
    if (h->header_length > OFF_COMPRESSION_TYPE)
        buf[OFF_COMPRESSION_TYPE] = h->compression_type;
}

const uint8_t *qcow2_header_find_ext(const uint8_t *buf, size_t len, const struct qcow2_header *h,
                                     uint32_t type, uint32_t *ext_len)
{
    size_t pos = h->version >= 3 ? h->header_length : QCOW2_V2_HEADER_LEN;
    size_t limit = len < h->cluster_size ? len : (size_t)h->cluster_size;
    while (pos + 8 <= limit) {
        uint32_t t = be32_load(buf + pos), n = be32_load(buf + pos + 4);
        if (t == QCOW2_EXT_END || n > limit - pos - 8)
            return NULL;
        if (t == type) {
            *ext_len = n;
            return buf + pos + 8;
        }
        pos += 8 + (((size_t)n + 7) & ~(size_t)7);
    }
    return NULL;
}
