/* qcow2 on-disk format: pure logic, no I/O.
 * Authority: QEMU docs/interop/qcow2.txt.  Everything here works on memory
 * buffers so it can be unit-tested and fuzzed in isolation. */
#ifndef UQ_QCOW2_FORMAT_H
#define UQ_QCOW2_FORMAT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <endian.h>
#include <sys/types.h>

#define QCOW2_MAGIC 0x514649fbu          /* "QFI\xfb" */
#define QCOW2_MIN_CLUSTER_BITS 9
#define QCOW2_MAX_CLUSTER_BITS 21
#define QCOW2_V2_HEADER_LEN 72
#define QCOW2_V3_MIN_HEADER_LEN 104
#define QCOW2_MAX_BACKING_NAME 1023
#define QCOW2_MAX_L1_BYTES (32u << 20)       /* QEMU's limit */
#define QCOW2_MAX_REFTABLE_BYTES (8u << 20)  /* QEMU's limit */
#define QCOW2_MAX_SNAPSHOTS 65536
#define QCOW2_MAX_SNAPSHOT_TABLE (64u << 20)

/* Incompatible feature bits */
#define QCOW2_INCOMPAT_DIRTY        (1ull << 0)
#define QCOW2_INCOMPAT_CORRUPT      (1ull << 1)
#define QCOW2_INCOMPAT_DATA_FILE    (1ull << 2)
#define QCOW2_INCOMPAT_COMPRESSION  (1ull << 3)
#define QCOW2_INCOMPAT_EXTL2        (1ull << 4)
#define QCOW2_INCOMPAT_KNOWN        0x1full
/* Compatible */
#define QCOW2_COMPAT_LAZY_REFCOUNTS (1ull << 0)
/* Autoclear */
#define QCOW2_AUTOCLEAR_BITMAPS     (1ull << 0)
#define QCOW2_AUTOCLEAR_DATA_RAW    (1ull << 1)
/* Autoclear bits the engine keeps true while writing (others are cleared
 * before the first write): data_file_raw (datafile.c keeps the raw view),
 * bitmaps (bitmap.c keeps enabled bitmaps up to date). */
#define QCOW2_AUTOCLEAR_KNOWN       (QCOW2_AUTOCLEAR_DATA_RAW | QCOW2_AUTOCLEAR_BITMAPS)

/* Header extension types */
#define QCOW2_EXT_END            0x00000000u
#define QCOW2_EXT_BACKING_FORMAT 0xe2792acau
#define QCOW2_EXT_FEATURE_TABLE  0x6803f857u
#define QCOW2_EXT_BITMAPS        0x23852875u
#define QCOW2_EXT_CRYPTO         0x0537be77u
#define QCOW2_EXT_DATA_FILE      0x44415441u

enum qcow2_compression { QCOW2_COMP_ZLIB = 0, QCOW2_COMP_ZSTD = 1 };

/* crypt_method */
#define QCOW2_CRYPT_NONE 0
#define QCOW2_CRYPT_AES  1      /* legacy, refused */
#define QCOW2_CRYPT_LUKS 2

/* Parsed header plus the derived geometry the engine uses everywhere. */
struct qcow2_header {
    uint32_t version;
    uint64_t backing_file_offset;
    uint32_t backing_file_size;
    uint32_t cluster_bits;
    uint64_t size;
    uint32_t crypt_method;
    uint32_t l1_size;
    uint64_t l1_table_offset;
    uint64_t refcount_table_offset;
    uint32_t refcount_table_clusters;
    uint32_t nb_snapshots;
    uint64_t snapshots_offset;
    uint64_t incompatible_features;
    uint64_t compatible_features;
    uint64_t autoclear_features;
    uint32_t refcount_order;
    uint32_t header_length;
    uint8_t compression_type;

    /* From header extensions (NUL-terminated copies). */
    char backing_file[QCOW2_MAX_BACKING_NAME + 1];  /* "" if none */
    char backing_format[64];                        /* "" if absent */
    char data_file[1024];                           /* "" if absent */
    bool has_bitmaps_ext;
    /* The bitmaps extension's fields when present (validated by bitmap.c). */
    uint32_t bitmaps_nb, bitmaps_ext_len, bitmaps_reserved;
    uint64_t bitmaps_dir_size, bitmaps_dir_offset;
    bool has_crypto_ext;        /* full disk encryption header pointer (LUKS) */
    uint64_t crypto_offset, crypto_length;
    uint32_t ext_end;           /* offset just past the last extension (incl. end marker) */

    /* Derived geometry. */
    uint64_t cluster_size;
    uint32_t l2_bits;           /* log2(entries per L2 table) */
    uint64_t l2_entries;        /* entries per L2 table */
    uint32_t l2_entry_size;     /* 8, or 16 with extended L2 */
    uint32_t refcount_bits;     /* 1 << refcount_order */
    uint64_t refcount_block_entries;
    uint32_t csize_shift;       /* compressed descriptor: 62 - (cluster_bits - 8) */
    uint64_t csize_mask;
    uint64_t cluster_offset_mask;
    uint64_t l1_size_needed;    /* L1 entries needed to map `size` */
};

/* Parse and validate a header from the first bytes of an image (buf holds
 * min(cluster_size, file_size) bytes, at least 72 are required; pass as much
 * as is available, up to 2 MiB).  file_size bounds table offsets.
 * Returns 0, or -EINVAL (malformed), -ENOTSUP (unsupported feature:
 * unknown incompatible bit, legacy AES encryption) with a
 * one-line reason in err naming the problem. */
int qcow2_header_parse(const uint8_t *buf, size_t len, uint64_t file_size,
                       struct qcow2_header *h, char *err, size_t errlen);

/* The data of the first header extension of the given type in the header
 * cluster buf (len bytes), or NULL; its length in *ext_len. */
const uint8_t *qcow2_header_find_ext(const uint8_t *buf, size_t len, const struct qcow2_header *h,
                                     uint32_t type, uint32_t *ext_len);

/* Patch the fixed header fields of h into buf (a copy of the header
 * cluster), leaving extensions and unknown bytes untouched. */
void qcow2_header_store(const struct qcow2_header *h, uint8_t *buf);

/* ---- the LUKS1 encryption header (crypt_method 2) ---------------------------- */
#define QCOW2_LUKS_HDR_SIZE 592u
#define QCOW2_LUKS_SLOTS 8
#define QCOW2_LUKS_SLOT_ACTIVE 0x00AC71F3u
#define QCOW2_LUKS_DIGEST_SIZE 20
#define QCOW2_LUKS_SALT_SIZE 32

/* The LUKS1 partition header's fields (big endian on disk); strings are
 * NUL-terminated copies. */
struct qcow2_luks_header {
    char cipher[33], mode[33], hash[33], uuid[41];
    uint32_t payload_offset;        /* sectors (unused by qcow2, shown by info) */
    uint32_t key_bytes;
    uint8_t mk_digest[QCOW2_LUKS_DIGEST_SIZE], mk_salt[QCOW2_LUKS_SALT_SIZE];
    uint32_t mk_iter;
    struct {
        uint32_t active, iter, km_offset, stripes;  /* km_offset in sectors */
        uint8_t salt[QCOW2_LUKS_SALT_SIZE];
    } slot[QCOW2_LUKS_SLOTS];
};

/* Parse the QCOW2_LUKS_HDR_SIZE bytes at b; -EINVAL (not LUKS) or -ENOTSUP
 * (not LUKS1) with the reason in err.  No key is needed (info shows it). */
int qcow2_luks_header_parse(const uint8_t *b, struct qcow2_luks_header *h, char *err, size_t errlen);

/* ---- L1 / L2 entries ---------------------------------------------------- */
#define QCOW_OFLAG_COPIED      (1ull << 63)
#define QCOW_OFLAG_COMPRESSED  (1ull << 62)
#define QCOW_OFLAG_ZERO        (1ull << 0)
#define L1E_OFFSET_MASK        0x00fffffffffffe00ull
#define L2E_OFFSET_MASK        0x00fffffffffffe00ull
#define L1E_RESERVED_MASK      0x7f000000000001ffull
#define L2E_STD_RESERVED_MASK  0x3f000000000001feull

enum qcow2_cluster_type {
    QCOW2_CLUSTER_UNALLOCATED,   /* read from backing, or zeros */
    QCOW2_CLUSTER_ZERO_PLAIN,    /* zero flag, no host cluster */
    QCOW2_CLUSTER_ZERO_ALLOC,    /* zero flag, host cluster kept (reuse, don't leak) */
    QCOW2_CLUSTER_NORMAL,
    QCOW2_CLUSTER_COMPRESSED,
    QCOW2_CLUSTER_INVALID,       /* reserved bits set / misaligned: corruption */
};

/* Classify a standard (8-byte) L2 entry; extended L2 entries' first word too
 * (pass extl2=true: bit 0 is then reserved-zero). */
enum qcow2_cluster_type qcow2_l2_entry_type(const struct qcow2_header *h, uint64_t l2e, bool extl2);

/* Compressed descriptor: host byte offset and the number of bytes to read
 * (may extend into the next host cluster). */
void qcow2_compressed_desc(const struct qcow2_header *h, uint64_t l2e,
                           uint64_t *host_off, uint64_t *nbytes);
/* Inverse of qcow2_compressed_desc: the L2 entry for nbytes of compressed data
 * at host_off; 0 if they cannot be described (nbytes 0 or too large for the
 * size field, host_off past the offset field or bit 55). */
uint64_t qcow2_compressed_entry(const struct qcow2_header *h, uint64_t host_off, uint64_t nbytes);

/* Extended L2 subcluster bitmap word (second 64 bits). */
#define QCOW2_SUBCLUSTERS 32
static inline uint32_t extl2_alloc_bits(uint64_t bm) { return (uint32_t)bm; }
static inline uint32_t extl2_zero_bits(uint64_t bm) { return (uint32_t)(bm >> 32); }

/* ---- refcount blocks ------------------------------------------------------ */
/* Get / set entry `index` of a refcount block (or slice) of refcount_order. */
uint64_t qcow2_refcount_get(const uint8_t *block, uint32_t refcount_order, uint64_t index);
void qcow2_refcount_set(uint8_t *block, uint32_t refcount_order, uint64_t index, uint64_t value);
static inline uint64_t qcow2_refcount_max(uint32_t refcount_order)
{
    return refcount_order == 6 ? UINT64_MAX : (1ull << (1u << refcount_order)) - 1;
}

/* ---- snapshot table --------------------------------------------------------- */
struct qcow2_snapshot {
    uint64_t l1_table_offset;
    uint32_t l1_size;
    char *id;
    char *name;
    uint32_t date_sec, date_nsec;
    uint64_t vm_clock_nsec;
    uint64_t vm_state_size;
    uint64_t disk_size;         /* from extra data, or the image size if absent */
    uint64_t icount;            /* record/replay instruction count; UINT64_MAX if absent */
    uint32_t extra_size;
    uint8_t *extra;             /* raw extra data (kept to rewrite unchanged) */
};

/* Extra data QEMU (5.0+) writes for every entry: 64-bit vm-state size, disk
 * size, icount.  Anything past it is unknown to us and rewritten unchanged. */
#define QCOW2_SNAPSHOT_EXTRA_KNOWN 24
#define QCOW2_MAX_SNAPSHOT_NAME 255     /* QEMU's QEMUSnapshotInfo.name holds 255 bytes */

/* Parse nb entries from a snapshot table buffer.  Returns 0 and a malloc'ed
 * array in *out (NULL when nb is 0; free with qcow2_snapshots_free), or
 * -EINVAL (-ENOMEM) with err set and *out NULL. */
int qcow2_snapshots_parse(const struct qcow2_header *h, const uint8_t *buf, size_t len,
                          uint32_t nb, struct qcow2_snapshot **out, char *err, size_t errlen);
void qcow2_snapshots_free(struct qcow2_snapshot *s, uint32_t nb);
#define QCOW2_SNAPSHOT_FIXED 40          /* bytes of an entry before its extra data */
#define QCOW2_SNAPSHOT_MAX_EXTRA 1024    /* QEMU's limit on extra data per entry */
/* The fixed part of one entry (extra data, id and name follow it). */
void qcow2_snapshot_fixed_load(const uint8_t *e, struct qcow2_snapshot *s, uint16_t *id_len,
                               uint16_t *name_len);
/* What s->extra says: 64-bit vm-state size, disk size (else image_size),
 * icount (else UINT64_MAX). */
void qcow2_snapshot_extra_apply(struct qcow2_snapshot *s, uint64_t image_size);
/* Length of one entry as written (unpadded), and the entry itself. */
size_t qcow2_snapshot_entry_len(const struct qcow2_snapshot *s);
void qcow2_snapshot_entry_store(const struct qcow2_snapshot *s, uint8_t *buf);

/* The on-disk table for nb entries, as QEMU writes it: every entry gets at
 * least the 24 known bytes of extra data (vm-state size and disk size from
 * the struct, icount as the entry had it), then the rest of its extra data; entries start
 * on 8-byte boundaries; the last one is not padded.  Returns 0 with a
 * malloc'ed buffer of *len bytes (NULL and 0 for nb == 0), -EFBIG if it
 * would exceed QEMU's 64 MiB limit or a name 65535 bytes, -ENOMEM. */
int qcow2_snapshots_serialize(const struct qcow2_snapshot *s, uint32_t nb, uint8_t **out, size_t *len);

/* ---- compression ------------------------------------------------------------ */
/* Decompress one cluster: returns 0 when exactly out_len bytes were produced,
 * -EIO when the input is not a valid stream for the image's compression type. */
int qcow2_decompress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
                     uint8_t *out, size_t out_len);
/* At least the first want bytes (0 < want <= out_len) of the cluster: zlib
 * stops inflating there (or inflates all of it by libdeflate when want is
 * half the cluster or more), zstd after the block holding it; the rest of
 * out untouched.  Returns how many bytes from the start are valid (want or
 * out_len); want == out_len is qcow2_decompress.  -EIO when the input ends or
 * is malformed before those bytes came out (what follows is not judged). */
int qcow2_decompress_prefix(enum qcow2_compression type, const uint8_t *in, size_t in_len,
                            uint8_t *out, size_t out_len, size_t want);
/* Compress one cluster; returns the compressed length, or -ENOSPC if it does
 * not fit in out_len (store uncompressed then), -EIO on failure. */
ssize_t qcow2_compress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
                       uint8_t *out, size_t out_len);

/* ---- big-endian helpers ----------------------------------------------------- */
static inline uint64_t be64_load(const void *p) { uint64_t v; __builtin_memcpy(&v, p, 8); return be64toh(v); }
static inline uint32_t be32_load(const void *p) { uint32_t v; __builtin_memcpy(&v, p, 4); return be32toh(v); }
static inline uint16_t be16_load(const void *p) { uint16_t v; __builtin_memcpy(&v, p, 2); return be16toh(v); }
static inline void be64_store(void *p, uint64_t v) { v = htobe64(v); __builtin_memcpy(p, &v, 8); }
static inline void be32_store(void *p, uint32_t v) { v = htobe32(v); __builtin_memcpy(p, &v, 4); }
static inline void be16_store(void *p, uint16_t v) { v = htobe16(v); __builtin_memcpy(p, &v, 2); }

#endif
