/* Unit tests for the pure qcow2 format logic: header, L2 entries, compressed
 * descriptors, refcount packing, snapshot table. */
#include <errno.h>
#include <stdbool.h>

#include "qcow2/format.h"
#include "unit.h"

#define CB 16                       /* default test cluster_bits */
#define CS (1u << CB)
#define FILE_SIZE (8ull * CS)       /* fake file length for table bounds */

static uint8_t buf[1 << 21];
static uint8_t filler[1 << 17];   /* extension payloads */
static char err[512];

/* A valid v3 image header: 1 GiB, 64 KiB clusters, reftable in cluster 1,
 * L1 in cluster 3, header_length 112, extensions end right after. */
static void make_v3(uint8_t *b)
{
    memset(b, 0, CS);
    be32_store(b + 0, QCOW2_MAGIC);
    be32_store(b + 4, 3);
    be32_store(b + 20, CB);
    be64_store(b + 24, 1ull << 30);
    be32_store(b + 36, 2);                  /* l1_size: 2 * 512 MiB */
    be64_store(b + 40, 3ull * CS);          /* l1_table_offset */
    be64_store(b + 48, 1ull * CS);          /* refcount_table_offset */
    be32_store(b + 56, 1);                  /* refcount_table_clusters */
    be32_store(b + 96, 4);                  /* refcount_order */
    be32_store(b + 100, 112);               /* header_length */
    /* extension area at 112 starts with the end marker (zeros) */
}

static void make_v2(uint8_t *b)
{
    make_v3(b);
    be32_store(b + 4, 2);
    memset(b + 72, 0, 40);
}

/* Append an extension at *off and advance it past the padded data. */
static void put_ext(uint8_t *b, size_t *off, uint32_t type, const void *data, uint32_t len)
{
    be32_store(b + *off, type);
    be32_store(b + *off + 4, len);
    memcpy(b + *off + 8, data, len);
    *off += 8 + ((len + 7) & ~7u);
}

static int parse(size_t len, uint64_t fsize, struct qcow2_header *h)
{
    err[0] = '\0';
    return qcow2_header_parse(buf, len, fsize, h, err, sizeof(err));
}

/* Parse buf, expect `code` and an error message containing `word`. */
#define REJECT(len, fsize, code, word) do { \
    struct qcow2_header _h; \
    int _r = parse((len), (fsize), &_h); \
    CHECK_EQ(_r, (code)); \
    if (!strstr(err, (word))) { \
        printf("#   %s:%d: error '%s' does not mention '%s'\n", __FILE__, __LINE__, err, (word)); \
        unit_cur_failed = 1; \
    } \
    if (strncmp(err, "qcow2 header: ", 14)) { \
        printf("#   %s:%d: error '%s' lacks prefix\n", __FILE__, __LINE__, err); \
        unit_cur_failed = 1; \
    } \
} while (0)

static void test_header_v3_roundtrip(void)
{
    struct qcow2_header h, h2;
    make_v3(buf);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(err[0], 0);
    CHECK_EQ(h.version, 3);
    CHECK_EQ(h.cluster_bits, 16);
    CHECK_EQ(h.cluster_size, 65536);
    CHECK_EQ(h.size, 1ull << 30);
    CHECK_EQ(h.l1_size, 2);
    CHECK_EQ(h.l1_table_offset, 3 * CS);
    CHECK_EQ(h.refcount_table_offset, CS);
    CHECK_EQ(h.refcount_table_clusters, 1);
    CHECK_EQ(h.refcount_order, 4);
    CHECK_EQ(h.refcount_bits, 16);
    CHECK_EQ(h.refcount_block_entries, 32768);
    CHECK_EQ(h.header_length, 112);
    CHECK_EQ(h.compression_type, 0);
    CHECK_EQ(h.l2_entry_size, 8);
    CHECK_EQ(h.l2_entries, 8192);
    CHECK_EQ(h.l2_bits, 13);
    CHECK_EQ(h.csize_shift, 54);
    CHECK_EQ(h.csize_mask, 0xff);
    CHECK_EQ(h.cluster_offset_mask, (1ull << 54) - 1);
    CHECK_EQ(h.l1_size_needed, 2);
    CHECK_EQ(h.ext_end, 120);
    CHECK_EQ(h.backing_file[0], 0);
    CHECK_EQ(h.backing_format[0], 0);
    CHECK(!h.has_bitmaps_ext);

    /* Storing unchanged values reproduces the bytes exactly. */
    static uint8_t copy[CS];
    memcpy(copy, buf, CS);
    qcow2_header_store(&h, copy);
    CHECK(memcmp(copy, buf, CS) == 0);

    /* Changed fields come back through parse. */
    h.size = 3ull << 30;
    h.l1_size = 6;
    h.l1_table_offset = 4ull * CS;
    h.refcount_table_offset = 5ull * CS;
    h.refcount_table_clusters = 2;
    h.incompatible_features = QCOW2_INCOMPAT_DIRTY;
    h.compatible_features = QCOW2_COMPAT_LAZY_REFCOUNTS;
    h.autoclear_features = 0;
    h.refcount_order = 6;
    h.nb_snapshots = 1;
    h.snapshots_offset = 7ull * CS;
    qcow2_header_store(&h, buf);
    CHECK_EQ(parse(CS, FILE_SIZE, &h2), 0);
    CHECK_EQ(h2.size, 3ull << 30);
    CHECK_EQ(h2.l1_size, 6);
    CHECK_EQ(h2.l1_table_offset, 4 * CS);
    CHECK_EQ(h2.refcount_table_offset, 5 * CS);
    CHECK_EQ(h2.refcount_table_clusters, 2);
    CHECK_EQ(h2.incompatible_features, QCOW2_INCOMPAT_DIRTY);
    CHECK_EQ(h2.compatible_features, QCOW2_COMPAT_LAZY_REFCOUNTS);
    CHECK_EQ(h2.refcount_order, 6);
    CHECK_EQ(h2.refcount_bits, 64);
    CHECK_EQ(h2.refcount_block_entries, 8192);
    CHECK_EQ(h2.nb_snapshots, 1);
    CHECK_EQ(h2.snapshots_offset, 7 * CS);
}

static void test_header_v2_roundtrip(void)
{
    struct qcow2_header h, h2;
    make_v2(buf);
    memset(buf + 72, 0xee, 8);      /* v2 has no header_length: this is an (unknown) extension */
    be32_store(buf + 72, 0x12345678);
    be32_store(buf + 76, 0);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.version, 2);
    CHECK_EQ(h.header_length, 72);
    CHECK_EQ(h.refcount_order, 4);
    CHECK_EQ(h.refcount_bits, 16);
    CHECK_EQ(h.incompatible_features, 0);
    CHECK_EQ(h.compression_type, 0);
    CHECK_EQ(h.ext_end, 88);        /* unknown empty extension + end marker */

    static uint8_t copy[CS];
    memcpy(copy, buf, CS);
    h.l1_size = 3;
    h.size = (3ull << 29);
    qcow2_header_store(&h, copy);
    CHECK(memcmp(copy + 72, buf + 72, CS - 72) == 0);   /* v2: nothing stored past 72 */
    CHECK_EQ(qcow2_header_parse(copy, CS, FILE_SIZE, &h2, err, sizeof(err)), 0);
    CHECK_EQ(h2.l1_size, 3);
    CHECK_EQ(h2.size, 3ull << 29);
}

static void test_header_short_buffers(void)
{
    make_v3(buf);
    REJECT(71, FILE_SIZE, -EINVAL, "too short");
    REJECT(100, FILE_SIZE, -EINVAL, "v3");
    REJECT(108, FILE_SIZE, -EINVAL, "header_length 112");
    /* Every prefix of a valid header is rejected or accepted without reading past it. */
    for (size_t n = 0; n < 200; n++) {
        struct qcow2_header h;
        int r = qcow2_header_parse(buf, n, FILE_SIZE, &h, err, sizeof(err));
        CHECK(n == 112 || n >= 120 ? r == 0 : r == -EINVAL);
    }
    /* err may be NULL or tiny */
    struct qcow2_header h;
    CHECK_EQ(qcow2_header_parse(buf, 10, FILE_SIZE, &h, NULL, 0), -EINVAL);
    char tiny[4];
    CHECK_EQ(qcow2_header_parse(buf, 10, FILE_SIZE, &h, tiny, sizeof(tiny)), -EINVAL);
    CHECK_EQ(strlen(tiny), 3);
}

static void test_header_basic_rejects(void)
{
    make_v3(buf); be32_store(buf, 0x514649fc);
    REJECT(CS, FILE_SIZE, -EINVAL, "magic");
    make_v3(buf); be32_store(buf + 4, 1);
    REJECT(CS, FILE_SIZE, -ENOTSUP, "version 1");
    make_v3(buf); be32_store(buf + 4, 4);
    REJECT(CS, FILE_SIZE, -ENOTSUP, "version 4");
    make_v3(buf); be32_store(buf + 20, 8);
    REJECT(CS, FILE_SIZE, -EINVAL, "cluster_bits 8");
    make_v3(buf); be32_store(buf + 20, 22);
    REJECT(CS, FILE_SIZE, -EINVAL, "cluster_bits 22");
    make_v3(buf); be32_store(buf + 20, 30);
    REJECT(CS, FILE_SIZE, -EINVAL, "cluster_bits 30 out of range 9..21");
    make_v3(buf); be32_store(buf + 100, 100);
    REJECT(CS, FILE_SIZE, -EINVAL, "header_length 100");
    make_v3(buf); be32_store(buf + 100, 108);
    REJECT(CS, FILE_SIZE, -EINVAL, "header_length 108");
    /* header_length larger than a 512-byte cluster */
    make_v3(buf); be32_store(buf + 20, 9); be32_store(buf + 36, 4096);
    be64_store(buf + 40, 2048); be64_store(buf + 48, 512); be32_store(buf + 100, 520);
    REJECT(CS, FILE_SIZE, -EINVAL, "header_length 520");
    make_v3(buf); be32_store(buf + 32, 1);
    REJECT(CS, FILE_SIZE, -ENOTSUP, "legacy AES encryption (crypt_method 1) is not supported");
    make_v3(buf); be32_store(buf + 32, 3);
    REJECT(CS, FILE_SIZE, -ENOTSUP, "unknown encryption method (crypt_method 3)");
    /* LUKS needs its encryption header extension, and only LUKS has one. */
    make_v3(buf); be32_store(buf + 32, 2);
    REJECT(CS, FILE_SIZE, -EINVAL, "LUKS encryption (crypt_method 2) without its encryption header");
    {
        struct qcow2_header h;
        uint8_t ext[16];
        size_t eo = 112;
        be64_store(ext, 4ull * CS); be64_store(ext + 8, 2ull * CS);
        make_v3(buf); be32_store(buf + 32, 2); put_ext(buf, &eo, QCOW2_EXT_CRYPTO, ext, 16);
        CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
        CHECK(h.has_crypto_ext && h.crypto_offset == 4ull * CS && h.crypto_length == 2ull * CS);
        eo = 112;
        make_v3(buf); put_ext(buf, &eo, QCOW2_EXT_CRYPTO, ext, 16);
        REJECT(CS, FILE_SIZE, -EINVAL, "encryption header extension without LUKS");
        eo = 112;
        be64_store(ext, 4ull * CS + 512);
        make_v3(buf); be32_store(buf + 32, 2); put_ext(buf, &eo, QCOW2_EXT_CRYPTO, ext, 16);
        REJECT(CS, FILE_SIZE, -EINVAL, "misaligned or lies outside");
        eo = 112;
        make_v3(buf); be32_store(buf + 32, 2); put_ext(buf, &eo, QCOW2_EXT_CRYPTO, ext, 8);
        REJECT(CS, FILE_SIZE, -EINVAL, "has 8 bytes, not 16");
    }
    make_v3(buf); be32_store(buf + 96, 7);
    REJECT(CS, FILE_SIZE, -EINVAL, "refcount_order 7");
    make_v3(buf); be64_store(buf + 24, (1ull << 63) + 1);
    be32_store(buf + 36, QCOW2_MAX_L1_BYTES / 8);
    REJECT(CS, UINT64_MAX, -EINVAL, "size");
}

static void test_header_feature_rejects(void)
{
    struct qcow2_header h;

    /* Unknown incompatible bit, no feature table: the bits are named. */
    make_v3(buf); be64_store(buf + 72, 1ull << 5);
    REJECT(CS, FILE_SIZE, -ENOTSUP, "0x20");

    /* With a feature name table, the unknown bits' names appear. */
    make_v3(buf); be64_store(buf + 72, (1ull << 5) | (1ull << 40) | QCOW2_INCOMPAT_DIRTY);
    uint8_t table[4 * 48];
    memset(table, 0, sizeof(table));
    table[0] = 0; table[1] = 0; memcpy(table + 2, "dirty bit", 9);
    table[48] = 0; table[49] = 5; memcpy(table + 50, "frobnication", 12);
    table[96] = 1; table[97] = 40; memcpy(table + 98, "compat forty", 12);   /* compatible: not it */
    table[144] = 0; table[145] = 40; memset(table + 146, 'x', 46);         /* full-length name */
    size_t off = 112;
    put_ext(buf, &off, QCOW2_EXT_FEATURE_TABLE, table, sizeof(table));
    REJECT(CS, FILE_SIZE, -ENOTSUP, "0x10000000020");
    CHECK(strstr(err, "frobnication") != NULL);
    CHECK(strstr(err, "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx") != NULL);
    CHECK(strstr(err, "dirty") == NULL);
    CHECK(strstr(err, "compat forty") == NULL);

    /* External data files are parsed (the engine opens the data file);
     * data_file_raw without one is refused, as QEMU refuses it. */
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_DATA_FILE);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_DATA_FILE); be64_store(buf + 88, QCOW2_AUTOCLEAR_DATA_RAW);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    make_v3(buf); be64_store(buf + 88, QCOW2_AUTOCLEAR_DATA_RAW);
    REJECT(CS, FILE_SIZE, -EINVAL, "data_file_raw is set without an external data file");

    /* Extended L2 needs 16 KiB clusters. */
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_EXTL2); be32_store(buf + 20, 13);
    REJECT(CS, FILE_SIZE, -EINVAL, "cluster_bits >= 14");
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_EXTL2); be32_store(buf + 20, 14);
    be32_store(buf + 36, 64); be64_store(buf + 40, 3 << 14); be64_store(buf + 48, 1 << 14);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.l2_entry_size, 16);
    CHECK_EQ(h.l2_entries, 1024);
    CHECK_EQ(h.l2_bits, 10);
    CHECK_EQ(h.l1_size_needed, 64);

    /* Compression type. */
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_COMPRESSION); be32_store(buf + 100, 104);
    REJECT(CS, FILE_SIZE, -EINVAL, "compression_type absent");
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_COMPRESSION);
    REJECT(CS, FILE_SIZE, -EINVAL, "compression_type is 0");
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_COMPRESSION); buf[104] = 2;
    REJECT(CS, FILE_SIZE, -ENOTSUP, "compression_type 2");
    make_v3(buf); buf[104] = 1;
    REJECT(CS, FILE_SIZE, -EINVAL, "compression_type 1");
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_COMPRESSION); buf[104] = 1;
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.compression_type, QCOW2_COMP_ZSTD);
    /* header_length 104: byte 104 belongs to the extension area, not the field */
    make_v3(buf); be32_store(buf + 100, 104); be32_store(buf + 104, 0); be32_store(buf + 108, 0);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.compression_type, 0);
    CHECK_EQ(h.ext_end, 112);

    /* Dirty, corrupt and lazy refcounts are accepted (the engine acts on them). */
    make_v3(buf); be64_store(buf + 72, QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT);
    be64_store(buf + 80, ~0ull); be64_store(buf + 88, ~QCOW2_AUTOCLEAR_DATA_RAW);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.autoclear_features, ~QCOW2_AUTOCLEAR_DATA_RAW);
}

static void test_header_l1_rejects(void)
{
    struct qcow2_header h;

    make_v3(buf); be32_store(buf + 36, QCOW2_MAX_L1_BYTES / 8 + 1);
    REJECT(CS, UINT64_MAX, -EINVAL, "l1_size 4194305");
    make_v3(buf); be32_store(buf + 36, 0xffffffffu);
    REJECT(CS, UINT64_MAX, -EINVAL, "l1_size 4294967295");
    make_v3(buf); be32_store(buf + 36, 1);
    REJECT(CS, FILE_SIZE, -EINVAL, "l1_size 1 too small");
    make_v3(buf); be64_store(buf + 24, (1ull << 30) + 1);
    REJECT(CS, FILE_SIZE, -EINVAL, "l1_size 2 too small");
    /* Largest size: 2^63 needs 2^63 / 2^29 = 2^34 entries: too small, no overflow. */
    make_v3(buf); be64_store(buf + 24, 1ull << 63);
    REJECT(CS, FILE_SIZE, -EINVAL, "l1_size");
    make_v3(buf); be64_store(buf + 40, 3ull * CS + 512);
    REJECT(CS, FILE_SIZE, -EINVAL, "l1_table_offset");
    CHECK(strstr(err, "aligned") != NULL);
    make_v3(buf); be64_store(buf + 40, 0);
    REJECT(CS, FILE_SIZE, -EINVAL, "l1_table_offset 0");
    make_v3(buf);
    REJECT(CS, 3ull * CS + 15, -EINVAL, "l1_table_offset");
    CHECK(strstr(err, "end of file") != NULL);
    make_v3(buf); be64_store(buf + 40, ~0ull << CB);
    REJECT(CS, FILE_SIZE, -EINVAL, "l1_table_offset");
    /* L1 of exactly 16 bytes ending at EOF is fine. */
    make_v3(buf);
    CHECK_EQ(parse(CS, 3ull * CS + 16, &h), 0);
    /* Size 0, no L1: offset 0 allowed. */
    make_v3(buf); be64_store(buf + 24, 0); be32_store(buf + 36, 0); be64_store(buf + 40, 0);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.l1_size_needed, 0);
    /* Largest L1 allowed. */
    make_v3(buf); be32_store(buf + 36, QCOW2_MAX_L1_BYTES / 8);
    CHECK_EQ(parse(CS, UINT64_MAX, &h), 0);
}

static void test_header_reftable_snapshot_rejects(void)
{
    make_v3(buf); be64_store(buf + 48, CS + 8);
    REJECT(CS, FILE_SIZE, -EINVAL, "refcount_table_offset");
    CHECK(strstr(err, "aligned") != NULL);
    make_v3(buf); be64_store(buf + 48, 0);
    REJECT(CS, FILE_SIZE, -EINVAL, "refcount_table_offset 0");
    make_v3(buf); be32_store(buf + 56, 0);
    REJECT(CS, FILE_SIZE, -EINVAL, "refcount_table_clusters is 0");
    make_v3(buf); be32_store(buf + 56, QCOW2_MAX_REFTABLE_BYTES / CS + 1);
    REJECT(CS, UINT64_MAX, -EINVAL, "refcount_table_clusters 129");
    make_v3(buf); be32_store(buf + 56, 0xffffffffu);
    REJECT(CS, UINT64_MAX, -EINVAL, "refcount_table_clusters");
    make_v3(buf); be32_store(buf + 56, 3);
    REJECT(CS, 3ull * CS + 16, -EINVAL, "refcount_table_offset");
    CHECK(strstr(err, "end of file") != NULL);
    make_v3(buf); be64_store(buf + 48, ~0ull << CB);
    REJECT(CS, FILE_SIZE, -EINVAL, "refcount_table_offset");

    make_v3(buf); be32_store(buf + 60, QCOW2_MAX_SNAPSHOTS + 1); be64_store(buf + 64, 4ull * CS);
    REJECT(CS, UINT64_MAX, -EINVAL, "nb_snapshots 65537");
    make_v3(buf); be32_store(buf + 60, 1); be64_store(buf + 64, 4ull * CS + 8);
    REJECT(CS, FILE_SIZE, -EINVAL, "snapshots_offset");
    make_v3(buf); be32_store(buf + 60, 1); be64_store(buf + 64, 0);
    REJECT(CS, FILE_SIZE, -EINVAL, "snapshots_offset 0");
    make_v3(buf); be32_store(buf + 60, 1); be64_store(buf + 64, FILE_SIZE);
    REJECT(CS, FILE_SIZE, -EINVAL, "snapshots_offset");
    CHECK(strstr(err, "end of file") != NULL);
    /* No snapshots: the offset is not looked at. */
    struct qcow2_header h;
    make_v3(buf); be64_store(buf + 64, 12345);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
}

static void test_header_backing_file(void)
{
    struct qcow2_header h;
    const char *name = "base image.qcow2";

    make_v3(buf);
    be64_store(buf + 8, 512); be32_store(buf + 16, (uint32_t)strlen(name));
    memcpy(buf + 512, name, strlen(name));
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK(strcmp(h.backing_file, name) == 0);
    /* A longest (1023 bytes) name at the end of the cluster. */
    make_v3(buf);
    be64_store(buf + 8, CS - 1023); be32_store(buf + 16, 1023);
    memset(buf + CS - 1023, 'n', 1023);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(strlen(h.backing_file), 1023);

    make_v3(buf); be64_store(buf + 8, 512); be32_store(buf + 16, 1024);
    REJECT(CS, FILE_SIZE, -EINVAL, "backing_file_size 1024");
    make_v3(buf); be64_store(buf + 8, CS - 10); be32_store(buf + 16, 11);
    REJECT(CS, FILE_SIZE, -EINVAL, "backing_file_offset");
    CHECK(strstr(err, "header cluster") != NULL);
    make_v3(buf); be64_store(buf + 8, CS); be32_store(buf + 16, 1);
    REJECT(CS, FILE_SIZE, -EINVAL, "backing_file_offset");
    make_v3(buf); be64_store(buf + 8, ~0ull); be32_store(buf + 16, 1023);
    REJECT(CS, FILE_SIZE, -EINVAL, "backing_file_offset");
    /* Inside the cluster but past the buffer (short file). */
    make_v3(buf); be64_store(buf + 8, 4000); be32_store(buf + 16, 200);
    REJECT(4096, FILE_SIZE, -EINVAL, "backing_file_offset");
    CHECK(strstr(err, "outside the image") != NULL);
    /* backing_file_offset 0: size is undefined and ignored. */
    make_v3(buf); be32_store(buf + 16, 5000);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.backing_file[0], 0);
}

static void test_header_extensions(void)
{
    struct qcow2_header h;
    size_t off = 112;

    make_v3(buf);
    put_ext(buf, &off, 0xdeadbeef, "unknown extension payload", 25);
    put_ext(buf, &off, QCOW2_EXT_BACKING_FORMAT, "qcow2", 5);
    uint8_t bm[24] = { 0 };
    put_ext(buf, &off, QCOW2_EXT_BITMAPS, bm, sizeof(bm));
    put_ext(buf, &off, QCOW2_EXT_DATA_FILE, "data.raw", 8);
    put_ext(buf, &off, 0x01020304, "", 0);
    size_t end = off + 8;
    const char *name = "backing.img";
    be64_store(buf + 8, end); be32_store(buf + 16, (uint32_t)strlen(name));
    memcpy(buf + end, name, strlen(name));
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK(strcmp(h.backing_format, "qcow2") == 0);
    CHECK(strcmp(h.data_file, "data.raw") == 0);
    CHECK(strcmp(h.backing_file, name) == 0);
    CHECK(h.has_bitmaps_ext);
    CHECK_EQ(h.ext_end, end);

    /* Store preserves every extension byte (unknown ones included). */
    static uint8_t before[CS];
    memcpy(before, buf, CS);
    h.size = 1ull << 31;
    h.l1_size = 4;
    h.autoclear_features = 0;
    qcow2_header_store(&h, buf);
    CHECK(memcmp(buf + 112, before + 112, CS - 112) == 0);
    CHECK_EQ(be64_load(buf + 24), 1ull << 31);
    struct qcow2_header h2;
    CHECK_EQ(parse(CS, FILE_SIZE, &h2), 0);
    CHECK(strcmp(h2.backing_format, "qcow2") == 0);
    CHECK_EQ(h2.ext_end, end);

    /* No end marker: the walk stops at the end of the cluster. */
    make_v3(buf); off = 112;
    put_ext(buf, &off, 0xdeadbeef, filler, (uint32_t)(CS - 112 - 8));
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.ext_end, CS);
    /* Odd length with padding past the end of the cluster is tolerated. */
    make_v3(buf); off = 112;
    put_ext(buf, &off, 0xdeadbeef, filler, (uint32_t)(CS - 112 - 8 - 3));
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.ext_end, CS);
    /* Extensions stop where the backing file name starts. */
    make_v3(buf); off = 112;
    put_ext(buf, &off, 0xdeadbeef, "12345678", 8);
    be64_store(buf + 8, off); be32_store(buf + 16, 4); memcpy(buf + off, "abcd", 4);
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(h.ext_end, off);
    CHECK(strcmp(h.backing_file, "abcd") == 0);
}

static void test_header_extension_rejects(void)
{
    size_t off;

    /* Extension data running past the buffer. */
    make_v3(buf); off = 112;
    put_ext(buf, &off, 0xdeadbeef, "x", 1);
    be32_store(buf + 116, 5000);
    REJECT(4096, FILE_SIZE, -EINVAL, "0xdeadbeef");
    CHECK(strstr(err, "length 5000") != NULL);
    /* ... past the cluster. */
    make_v3(buf); be32_store(buf + 112, 0xdeadbeef); be32_store(buf + 116, CS);
    REJECT(CS, FILE_SIZE, -EINVAL, "extension");
    /* ... with a huge length (no overflow). */
    make_v3(buf); be32_store(buf + 112, 0xdeadbeef); be32_store(buf + 116, 0xfffffff9u);
    REJECT(CS, FILE_SIZE, -EINVAL, "extension");
    /* Extension header cut by the end of the buffer. */
    make_v3(buf); be32_store(buf + 112, 0xdeadbeef); be32_store(buf + 116, 0);
    REJECT(124, FILE_SIZE, -EINVAL, "extension at offset 120");
    /* ... or by the backing file name. */
    make_v3(buf); be32_store(buf + 112, QCOW2_EXT_BACKING_FORMAT); be32_store(buf + 116, 8);
    be64_store(buf + 8, 120); be32_store(buf + 16, 4);
    REJECT(CS, FILE_SIZE, -EINVAL, "extension");
    /* Backing format name too long. */
    make_v3(buf); off = 112;
    char longname[64];
    memset(longname, 'f', sizeof(longname));
    put_ext(buf, &off, QCOW2_EXT_BACKING_FORMAT, longname, 64);
    REJECT(CS, FILE_SIZE, -EINVAL, "backing format name length 64");
    make_v3(buf); off = 112;
    put_ext(buf, &off, QCOW2_EXT_BACKING_FORMAT, longname, 63);
    struct qcow2_header h;
    CHECK_EQ(parse(CS, FILE_SIZE, &h), 0);
    CHECK_EQ(strlen(h.backing_format), 63);
    /* Data file name too long. */
    make_v3(buf); off = 112;
    put_ext(buf, &off, QCOW2_EXT_DATA_FILE, filler, 1024);
    REJECT(CS, FILE_SIZE, -EINVAL, "data file name length 1024");
}

/* Build a header struct for entry tests. */
static struct qcow2_header geom(uint32_t version, uint32_t cluster_bits, bool extl2)
{
    struct qcow2_header h;
    make_v3(buf);
    be32_store(buf + 20, cluster_bits);
    be64_store(buf + 24, 1ull << 20);
    be32_store(buf + 36, 64);
    be64_store(buf + 40, 4ull << cluster_bits);
    be64_store(buf + 48, 2ull << cluster_bits);
    if (extl2)
        be64_store(buf + 72, QCOW2_INCOMPAT_EXTL2);
    if (version == 2) {
        be32_store(buf + 4, 2);
        memset(buf + 72, 0, 40);
    }
    int r = qcow2_header_parse(buf, 1u << cluster_bits, 1ull << 40, &h, err, sizeof(err));
    if (r)
        printf("# geom: %s\n", err);
    return h;
}

static void test_l2_entry_types(void)
{
    struct qcow2_header h3 = geom(3, 16, false), h2 = geom(2, 16, false), hx = geom(3, 16, true);
    uint64_t off = 5ull << 16;

    CHECK_EQ(qcow2_l2_entry_type(&h3, 0, false), QCOW2_CLUSTER_UNALLOCATED);
    CHECK_EQ(qcow2_l2_entry_type(&h3, off, false), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(qcow2_l2_entry_type(&h3, off | QCOW_OFLAG_COPIED, false), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(qcow2_l2_entry_type(&h3, QCOW_OFLAG_ZERO, false), QCOW2_CLUSTER_ZERO_PLAIN);
    CHECK_EQ(qcow2_l2_entry_type(&h3, off | QCOW_OFLAG_ZERO, false), QCOW2_CLUSTER_ZERO_ALLOC);
    CHECK_EQ(qcow2_l2_entry_type(&h3, off | QCOW_OFLAG_ZERO | QCOW_OFLAG_COPIED, false),
             QCOW2_CLUSTER_ZERO_ALLOC);
    /* Offset 0 with COPIED and no external data file is corruption; with
     * one it is guest cluster 0's data at offset 0 of the data file. */
    CHECK_EQ(qcow2_l2_entry_type(&h3, QCOW_OFLAG_COPIED, false), QCOW2_CLUSTER_INVALID);
    struct qcow2_header hd = h3;
    hd.incompatible_features |= QCOW2_INCOMPAT_DATA_FILE;
    CHECK_EQ(qcow2_l2_entry_type(&hd, QCOW_OFLAG_COPIED, false), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(qcow2_l2_entry_type(&hd, 0, false), QCOW2_CLUSTER_UNALLOCATED);
    CHECK_EQ(qcow2_l2_entry_type(&hd, QCOW_OFLAG_COPIED | QCOW_OFLAG_ZERO, false), QCOW2_CLUSTER_ZERO_PLAIN);
    /* Misaligned host offset. */
    CHECK_EQ(qcow2_l2_entry_type(&h3, off + 512, false), QCOW2_CLUSTER_INVALID);
    CHECK_EQ(qcow2_l2_entry_type(&h3, (off + 4096) | QCOW_OFLAG_ZERO, false), QCOW2_CLUSTER_INVALID);
    /* Every reserved bit. */
    for (int b = 0; b < 64; b++) {
        if (!(L2E_STD_RESERVED_MASK & (1ull << b)))
            continue;
        CHECK_EQ(qcow2_l2_entry_type(&h3, off | (1ull << b), false), QCOW2_CLUSTER_INVALID);
        CHECK_EQ(qcow2_l2_entry_type(&h3, 1ull << b, false), QCOW2_CLUSTER_INVALID);
    }
    /* Offsets up to bit 55 are valid. */
    CHECK_EQ(qcow2_l2_entry_type(&h3, L2E_OFFSET_MASK & ~0xffffull, false), QCOW2_CLUSTER_NORMAL);

    /* v2: bit 0 is reserved. */
    CHECK_EQ(qcow2_l2_entry_type(&h2, off, false), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(qcow2_l2_entry_type(&h2, 0, false), QCOW2_CLUSTER_UNALLOCATED);
    CHECK_EQ(qcow2_l2_entry_type(&h2, QCOW_OFLAG_ZERO, false), QCOW2_CLUSTER_INVALID);
    CHECK_EQ(qcow2_l2_entry_type(&h2, off | QCOW_OFLAG_ZERO, false), QCOW2_CLUSTER_INVALID);
    /* Extended L2: bit 0 is reserved too. */
    CHECK_EQ(qcow2_l2_entry_type(&hx, off, true), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(qcow2_l2_entry_type(&hx, off | QCOW_OFLAG_ZERO, true), QCOW2_CLUSTER_INVALID);
    CHECK_EQ(qcow2_l2_entry_type(&hx, QCOW_OFLAG_ZERO, true), QCOW2_CLUSTER_INVALID);

    /* Compressed: any descriptor, never COPIED. */
    uint64_t c = QCOW_OFLAG_COMPRESSED | (3ull << h3.csize_shift) | 0x12345;
    CHECK_EQ(qcow2_l2_entry_type(&h3, c, false), QCOW2_CLUSTER_COMPRESSED);
    CHECK_EQ(qcow2_l2_entry_type(&h3, c | 1, false), QCOW2_CLUSTER_COMPRESSED);
    CHECK_EQ(qcow2_l2_entry_type(&h2, c | 1, false), QCOW2_CLUSTER_COMPRESSED);
    CHECK_EQ(qcow2_l2_entry_type(&hx, c, true), QCOW2_CLUSTER_COMPRESSED);
    CHECK_EQ(qcow2_l2_entry_type(&h3, c | QCOW_OFLAG_COPIED, false), QCOW2_CLUSTER_INVALID);

    /* Small clusters: 512-byte alignment is enough. */
    struct qcow2_header hs = geom(3, 9, false);
    CHECK_EQ(qcow2_l2_entry_type(&hs, 7ull << 9, false), QCOW2_CLUSTER_NORMAL);
    /* 2 MiB clusters. */
    struct qcow2_header hl = geom(3, 21, false);
    CHECK_EQ(qcow2_l2_entry_type(&hl, 3ull << 21, false), QCOW2_CLUSTER_NORMAL);
    CHECK_EQ(qcow2_l2_entry_type(&hl, (3ull << 21) + (1 << 20), false), QCOW2_CLUSTER_INVALID);
}

static void test_compressed_desc_known(void)
{
    uint64_t off, n;

    /* 64 KiB clusters: x = 54, 8 size bits. */
    struct qcow2_header h = geom(3, 16, false);
    CHECK_EQ(h.csize_shift, 54);
    CHECK_EQ(h.csize_mask, 0xff);
    qcow2_compressed_desc(&h, QCOW_OFLAG_COMPRESSED | (3ull << 54) | 0x12345, &off, &n);
    CHECK_EQ(off, 0x12345);
    CHECK_EQ(n, 4 * 512 - 0x145);
    qcow2_compressed_desc(&h, QCOW_OFLAG_COMPRESSED | 0x10000, &off, &n);
    CHECK_EQ(off, 0x10000);
    CHECK_EQ(n, 512);
    qcow2_compressed_desc(&h, QCOW_OFLAG_COMPRESSED | (0xffull << 54) | 0x101ff, &off, &n);
    CHECK_EQ(off, 0x101ff);
    CHECK_EQ(n, 256 * 512 - 511);

    /* 512-byte clusters: x = 61, one size bit, offset field reaches bit 60. */
    h = geom(3, 9, false);
    CHECK_EQ(h.csize_shift, 61);
    CHECK_EQ(h.csize_mask, 1);
    CHECK_EQ(h.cluster_offset_mask, (1ull << 61) - 1);
    qcow2_compressed_desc(&h, QCOW_OFLAG_COMPRESSED | (1ull << 61) | 0x400, &off, &n);
    CHECK_EQ(off, 0x400);
    CHECK_EQ(n, 1024);
    qcow2_compressed_desc(&h, QCOW_OFLAG_COMPRESSED | 0x4a0, &off, &n);
    CHECK_EQ(off, 0x4a0);
    CHECK_EQ(n, 512 - 0xa0);

    /* 2 MiB clusters: x = 49, 13 size bits. */
    h = geom(3, 21, false);
    CHECK_EQ(h.csize_shift, 49);
    CHECK_EQ(h.csize_mask, 0x1fff);
    CHECK_EQ(h.cluster_offset_mask, (1ull << 49) - 1);
    qcow2_compressed_desc(&h, QCOW_OFLAG_COMPRESSED | (0x1fffull << 49) | 0x200003, &off, &n);
    CHECK_EQ(off, 0x200003);
    CHECK_EQ(n, 8192 * 512 - 3);

    /* Entry from descriptor: QEMU's encoding. */
    h = geom(3, 16, false);
    CHECK_EQ(qcow2_compressed_entry(&h, 0x12345, 4 * 512 - 0x145),
             QCOW_OFLAG_COMPRESSED | (3ull << 54) | 0x12345);
    CHECK_EQ(qcow2_compressed_entry(&h, 0x12345, 1), QCOW_OFLAG_COMPRESSED | 0x12345);
    CHECK_EQ(qcow2_compressed_entry(&h, 0x12345, 0xbb), QCOW_OFLAG_COMPRESSED | 0x12345);
    CHECK_EQ(qcow2_compressed_entry(&h, 0x12345, 0xbc), QCOW_OFLAG_COMPRESSED | (1ull << 54) | 0x12345);
    /* Not describable: no bytes, offset too large, too many sectors. */
    CHECK_EQ(qcow2_compressed_entry(&h, 0x12345, 0), 0);
    CHECK_EQ(qcow2_compressed_entry(&h, 1ull << 54, 100), 0);
    CHECK_EQ(qcow2_compressed_entry(&h, 0x10000, 256 * 512 + 1), 0);
    h = geom(3, 9, false);
    CHECK_EQ(qcow2_compressed_entry(&h, 1ull << 56, 100), 0);
}

static void test_compressed_desc_roundtrip(void)
{
    static const uint32_t bits[] = { 9, 12, 16, 21 };
    uint64_t seed = 0x9e3779b97f4a7c15ull;

    for (size_t i = 0; i < sizeof(bits) / sizeof(bits[0]); i++) {
        struct qcow2_header h = geom(3, bits[i], false);
        for (int k = 0; k < 20000; k++) {
            seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
            uint64_t host = (seed >> 8) & ((1ull << 48) - 1);
            uint64_t nbytes = 1 + (seed % h.cluster_size);
            if (k & 1)
                nbytes = h.cluster_size + 64 - (host & 511);  /* near the largest */
            uint64_t e = qcow2_compressed_entry(&h, host, nbytes);
            CHECK(e != 0);
            CHECK_EQ(qcow2_l2_entry_type(&h, e, false), QCOW2_CLUSTER_COMPRESSED);
            uint64_t off, n;
            qcow2_compressed_desc(&h, e, &off, &n);
            CHECK_EQ(off, host);
            CHECK(n >= nbytes && n - nbytes < 512);
            CHECK_EQ((off + n) % 512, 0);
            CHECK_EQ(qcow2_compressed_entry(&h, off, n), e);
            if (unit_cur_failed)
                return;
        }
    }
}

static void test_refcount_widths(void)
{
    static uint8_t block[4096];

    for (uint32_t order = 0; order <= 6; order++) {
        uint32_t bits = 1u << order;
        uint64_t max = qcow2_refcount_max(order);
        uint64_t n = sizeof(block) * 8 / bits;
        CHECK_EQ(max, bits == 64 ? UINT64_MAX : (1ull << bits) - 1);

        memset(block, 0, sizeof(block));
        for (uint64_t i = 0; i < n; i++)
            CHECK_EQ(qcow2_refcount_get(block, order, i), 0);
        /* Distinct values in every entry, then read all back. */
        for (uint64_t i = 0; i < n; i++)
            qcow2_refcount_set(block, order, i, (i * 2654435761u + 1) & max);
        for (uint64_t i = 0; i < n; i++)
            CHECK_EQ(qcow2_refcount_get(block, order, i), (i * 2654435761u + 1) & max);

        /* Max value in one entry leaves its neighbours untouched. */
        memset(block, 0, sizeof(block));
        qcow2_refcount_set(block, order, 9, max);
        CHECK_EQ(qcow2_refcount_get(block, order, 9), max);
        CHECK_EQ(qcow2_refcount_get(block, order, 8), 0);
        CHECK_EQ(qcow2_refcount_get(block, order, 10), 0);
        memset(block, 0xff, sizeof(block));
        qcow2_refcount_set(block, order, 9, 0);
        CHECK_EQ(qcow2_refcount_get(block, order, 9), 0);
        CHECK_EQ(qcow2_refcount_get(block, order, 8), max);
        CHECK_EQ(qcow2_refcount_get(block, order, 10), max);
        /* Values are masked to the width. */
        memset(block, 0, sizeof(block));
        qcow2_refcount_set(block, order, 3, max + 1 + 1);
        if (bits < 64) {
            CHECK_EQ(qcow2_refcount_get(block, order, 3), 1);
            CHECK_EQ(qcow2_refcount_get(block, order, 2), 0);
            CHECK_EQ(qcow2_refcount_get(block, order, 4), 0);
        }
    }

    /* Byte layout: sub-byte from the LSB, wider ones big-endian. */
    memset(block, 0, sizeof(block));
    qcow2_refcount_set(block, 0, 9, 1);
    CHECK_EQ(block[1], 0x02);
    memset(block, 0, sizeof(block));
    qcow2_refcount_set(block, 1, 5, 3);
    qcow2_refcount_set(block, 1, 6, 1);
    CHECK_EQ(block[1], 0x1c);
    memset(block, 0, sizeof(block));
    qcow2_refcount_set(block, 2, 3, 0xa);
    CHECK_EQ(block[1], 0xa0);
    qcow2_refcount_set(block, 3, 5, 0x7f);
    CHECK_EQ(block[5], 0x7f);
    memset(block, 0, sizeof(block));
    qcow2_refcount_set(block, 4, 1, 0x1234);
    CHECK(block[2] == 0x12 && block[3] == 0x34);
    qcow2_refcount_set(block, 5, 1, 0x01020304);
    CHECK(block[4] == 1 && block[7] == 4);
    qcow2_refcount_set(block, 6, 1, 0x0102030405060708ull);
    CHECK(block[8] == 1 && block[15] == 8);
}

/* Write one snapshot table entry at *pos; returns its unpadded length. */
static size_t put_snapshot(uint8_t *b, size_t *pos, uint64_t l1_off, uint32_t l1_size,
                           const char *id, const char *name, uint32_t vm32,
                           const uint8_t *extra, uint32_t extra_size)
{
    uint8_t *e = b + *pos;
    memset(e, 0, 40);
    be64_store(e, l1_off);
    be32_store(e + 8, l1_size);
    be16_store(e + 12, (uint16_t)strlen(id));
    be16_store(e + 14, (uint16_t)strlen(name));
    be32_store(e + 16, 1700000000);
    be32_store(e + 20, 123);
    be64_store(e + 24, 987654321);
    be32_store(e + 32, vm32);
    be32_store(e + 36, extra_size);
    size_t p = 40;
    if (extra_size)
        memcpy(e + p, extra, extra_size);
    p += extra_size;
    memcpy(e + p, id, strlen(id)); p += strlen(id);
    memcpy(e + p, name, strlen(name)); p += strlen(name);
    *pos += (p + 7) & ~(size_t)7;
    return p;
}

static void test_snapshot_table(void)
{
    struct qcow2_header h = geom(3, 16, false);
    static uint8_t t[4096];
    uint8_t extra[24];
    struct qcow2_snapshot *sn;
    size_t pos = 0;

    memset(t, 0xcc, sizeof(t));
    memset(extra, 0, sizeof(extra));
    be64_store(extra, 5ull << 32);          /* vm state size, 64-bit */
    be64_store(extra + 8, 7ull << 30);      /* disk size */
    extra[16] = 0xab;                       /* unknown extra byte, kept raw */
    put_snapshot(t, &pos, 3ull << 16, 16, "1", "first", 77, extra, 24);
    size_t last = put_snapshot(t, &pos, 9ull << 16, 2, "22", "second snapshot", 0, extra, 16);
    size_t exact = pos - ((last + 7) & ~(size_t)7) + last;   /* table without final padding */

    CHECK_EQ(qcow2_snapshots_parse(&h, t, exact, 2, &sn, err, sizeof(err)), 0);
    CHECK(sn != NULL);
    if (sn) {
        CHECK_EQ(sn[0].l1_table_offset, 3ull << 16);
        CHECK_EQ(sn[0].l1_size, 16);
        CHECK(strcmp(sn[0].id, "1") == 0);
        CHECK(strcmp(sn[0].name, "first") == 0);
        CHECK_EQ(sn[0].date_sec, 1700000000);
        CHECK_EQ(sn[0].date_nsec, 123);
        CHECK_EQ(sn[0].vm_clock_nsec, 987654321);
        CHECK_EQ(sn[0].vm_state_size, 5ull << 32);
        CHECK_EQ(sn[0].disk_size, 7ull << 30);
        CHECK_EQ(sn[0].extra_size, 24);
        CHECK(sn[0].extra && memcmp(sn[0].extra, extra, 24) == 0);
        CHECK(strcmp(sn[1].id, "22") == 0);
        CHECK(strcmp(sn[1].name, "second snapshot") == 0);
        CHECK_EQ(sn[1].extra_size, 16);
        qcow2_snapshots_free(sn, 2);
    }
    /* Fewer entries than the table holds is fine. */
    CHECK_EQ(qcow2_snapshots_parse(&h, t, exact, 1, &sn, err, sizeof(err)), 0);
    qcow2_snapshots_free(sn, 1);
    /* nb 0 */
    CHECK_EQ(qcow2_snapshots_parse(&h, t, 0, 0, &sn, err, sizeof(err)), 0);
    CHECK(sn == NULL);
    qcow2_snapshots_free(NULL, 0);

    /* Every truncation is rejected cleanly. */
    for (size_t n = 0; n < exact; n++) {
        err[0] = '\0';
        sn = (struct qcow2_snapshot *)1;
        CHECK_EQ(qcow2_snapshots_parse(&h, t, n, 2, &sn, err, sizeof(err)), -EINVAL);
        CHECK(sn == NULL);
        CHECK(strstr(err, "snapshot table") != NULL);
    }
    /* More entries than present. */
    CHECK_EQ(qcow2_snapshots_parse(&h, t, exact, 3, &sn, err, sizeof(err)), -EINVAL);
    CHECK(strstr(err, "entry 2") != NULL);
    CHECK_EQ(qcow2_snapshots_parse(&h, t, exact, QCOW2_MAX_SNAPSHOTS + 1, &sn, err, sizeof(err)), -EINVAL);
}

static void test_snapshot_table_rules(void)
{
    struct qcow2_header h3 = geom(3, 16, false), h2 = geom(2, 16, false);
    static uint8_t t[4096];
    uint8_t extra[16];
    struct qcow2_snapshot *sn;
    size_t pos;

    /* v2 without extra data: 32-bit vm state size, disk size = image size. */
    pos = 0;
    put_snapshot(t, &pos, 3ull << 16, 16, "1", "old", 4096, NULL, 0);
    CHECK_EQ(qcow2_snapshots_parse(&h2, t, pos, 1, &sn, err, sizeof(err)), 0);
    if (sn) {
        CHECK_EQ(sn[0].vm_state_size, 4096);
        CHECK_EQ(sn[0].disk_size, h2.size);
        CHECK(sn[0].extra == NULL);
        qcow2_snapshots_free(sn, 1);
    }
    /* v2 with 8 bytes of extra: 64-bit vm state, disk size still the image's. */
    memset(extra, 0, sizeof(extra));
    be64_store(extra, 1ull << 33);
    pos = 0;
    put_snapshot(t, &pos, 3ull << 16, 16, "1", "old", 4096, extra, 8);
    CHECK_EQ(qcow2_snapshots_parse(&h2, t, pos, 1, &sn, err, sizeof(err)), 0);
    if (sn) {
        CHECK_EQ(sn[0].vm_state_size, 1ull << 33);
        CHECK_EQ(sn[0].disk_size, h2.size);
        qcow2_snapshots_free(sn, 1);
    }
    /* v3 needs at least 16 bytes of extra data. */
    CHECK_EQ(qcow2_snapshots_parse(&h3, t, pos, 1, &sn, err, sizeof(err)), -EINVAL);
    CHECK(strstr(err, "extra_size 8") != NULL);
    /* Misaligned snapshot L1. */
    pos = 0;
    put_snapshot(t, &pos, (3ull << 16) + 512, 16, "1", "x", 0, extra, 16);
    CHECK_EQ(qcow2_snapshots_parse(&h3, t, pos, 1, &sn, err, sizeof(err)), -EINVAL);
    CHECK(strstr(err, "l1_table_offset") != NULL);
    /* Oversized snapshot L1. */
    pos = 0;
    put_snapshot(t, &pos, 3ull << 16, QCOW2_MAX_L1_BYTES / 8 + 1, "1", "x", 0, extra, 16);
    CHECK_EQ(qcow2_snapshots_parse(&h3, t, pos, 1, &sn, err, sizeof(err)), -EINVAL);
    CHECK(strstr(err, "l1_size") != NULL);
    /* Huge extra_size / id / name lengths. */
    pos = 0;
    put_snapshot(t, &pos, 3ull << 16, 16, "1", "x", 0, extra, 16);
    be32_store(t + 36, 0xffffffffu);
    CHECK_EQ(qcow2_snapshots_parse(&h3, t, sizeof(t), 1, &sn, err, sizeof(err)), -EINVAL);
    CHECK(strstr(err, "extra_size") != NULL);
    be32_store(t + 36, 16);
    be16_store(t + 12, 0xffff);
    CHECK_EQ(qcow2_snapshots_parse(&h3, t, sizeof(t), 1, &sn, err, sizeof(err)), -EINVAL);
    be16_store(t + 12, 1);
    be16_store(t + 14, 0xffff);
    CHECK_EQ(qcow2_snapshots_parse(&h3, t, sizeof(t), 1, &sn, err, sizeof(err)), -EINVAL);
}

/* Writing the table as QEMU does: 24 known bytes of extra data at least
 * (vm state, disk size, icount), unknown extra data kept, 8-byte aligned
 * entries, no padding after the last; what is written parses back. */
static void test_snapshot_table_write(void)
{
    struct qcow2_header h = geom(3, 16, false);
    static uint8_t t[4096];
    uint8_t extra[40];
    struct qcow2_snapshot *sn, *back;
    size_t pos = 0;

    memset(extra, 0, sizeof(extra));
    be64_store(extra, 5ull << 32);          /* vm state size past 32 bits */
    be64_store(extra + 8, 7ull << 30);
    be64_store(extra + 16, 42);             /* icount */
    memset(extra + 24, 0x5a, 16);           /* unknown to us: kept */
    put_snapshot(t, &pos, 3ull << 16, 16, "1", "first", 77, extra, 40);
    put_snapshot(t, &pos, 9ull << 16, 2, "22", "second snapshot", 4096, extra, 16);
    CHECK_EQ(qcow2_snapshots_parse(&h, t, pos, 2, &sn, err, sizeof(err)), 0);
    if (!sn)
        return;
    CHECK_EQ(sn[0].icount, 42);
    CHECK_EQ(sn[1].icount, UINT64_MAX);     /* absent: -1, as QEMU reads it */
    sn[1].vm_state_size = 4096;

    uint8_t *buf;
    size_t len;
    CHECK_EQ(qcow2_snapshots_serialize(sn, 2, &buf, &len), 0);
    /* 40 + 40 + 1 + 5 = 86 -> padded to 88; 40 + 24 + 2 + 15 = 81, unpadded. */
    CHECK_EQ(len, 88 + 81);
    if (buf) {
        CHECK_EQ(be32_load(buf + 32), 0);           /* vm state too big for the old field */
        CHECK_EQ(be32_load(buf + 36), 40);          /* extra size kept */
        CHECK(memcmp(buf + 40 + 24, extra + 24, 16) == 0);
        CHECK_EQ(be32_load(buf + 88 + 32), 4096);
        CHECK_EQ(be32_load(buf + 88 + 36), 24);     /* 16 bytes grew to QEMU's 24 */
        CHECK_EQ(be64_load(buf + 88 + 40 + 16), UINT64_MAX);
        CHECK_EQ(qcow2_snapshots_parse(&h, buf, len, 2, &back, err, sizeof(err)), 0);
        if (back) {
            for (int i = 0; i < 2; i++) {
                CHECK_EQ(back[i].l1_table_offset, sn[i].l1_table_offset);
                CHECK_EQ(back[i].l1_size, sn[i].l1_size);
                CHECK(strcmp(back[i].id, sn[i].id) == 0 && strcmp(back[i].name, sn[i].name) == 0);
                CHECK_EQ(back[i].date_sec, sn[i].date_sec);
                CHECK_EQ(back[i].date_nsec, sn[i].date_nsec);
                CHECK_EQ(back[i].vm_clock_nsec, sn[i].vm_clock_nsec);
                CHECK_EQ(back[i].vm_state_size, sn[i].vm_state_size);
                CHECK_EQ(back[i].disk_size, sn[i].disk_size);
                CHECK_EQ(back[i].icount, sn[i].icount);
            }
            qcow2_snapshots_free(back, 2);
        }
        free(buf);
    }
    /* An empty table is no table; a name past 65535 bytes cannot be written. */
    CHECK_EQ(qcow2_snapshots_serialize(sn, 0, &buf, &len), 0);
    CHECK(buf == NULL && len == 0);
    char *big = malloc(70000);
    if (big) {
        memset(big, 'n', 69999);
        big[69999] = '\0';
        char *keep = sn[0].name;
        sn[0].name = big;
        CHECK_EQ(qcow2_snapshots_serialize(sn, 2, &buf, &len), -EFBIG);
        sn[0].name = keep;
        free(big);
    }
    qcow2_snapshots_free(sn, 2);
}

int main(void)
{
    RUN_TEST(test_header_v3_roundtrip);
    RUN_TEST(test_header_v2_roundtrip);
    RUN_TEST(test_header_short_buffers);
    RUN_TEST(test_header_basic_rejects);
    RUN_TEST(test_header_feature_rejects);
    RUN_TEST(test_header_l1_rejects);
    RUN_TEST(test_header_reftable_snapshot_rejects);
    RUN_TEST(test_header_backing_file);
    RUN_TEST(test_header_extensions);
    RUN_TEST(test_header_extension_rejects);
    RUN_TEST(test_l2_entry_types);
    RUN_TEST(test_compressed_desc_known);
    RUN_TEST(test_compressed_desc_roundtrip);
    RUN_TEST(test_refcount_widths);
    RUN_TEST(test_snapshot_table);
    RUN_TEST(test_snapshot_table_rules);
    RUN_TEST(test_snapshot_table_write);
    UNIT_EXIT();
}
