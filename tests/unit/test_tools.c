/* Unit tests for the pieces of the image tools that need no files: size
 * parsing (qemu-img's suffixes and fractions), snapshot entries written
 * for a rewritten table, and the header extension lookup. */
#include <errno.h>
#include <stdbool.h>

#include "qcow2/format.h"
#include "img/image.h"
#include "unit.h"

static void test_parse_size(void)
{
    CHECK_EQ(parse_size("0"), 0);
    CHECK_EQ(parse_size("4096"), 4096);
    CHECK_EQ(parse_size("64k"), 65536);
    CHECK_EQ(parse_size("64K"), 65536);
    CHECK_EQ(parse_size("1M"), 1 << 20);
    CHECK_EQ(parse_size("1G"), 1ull << 30);
    CHECK_EQ(parse_size("2T"), 2ull << 40);
    CHECK_EQ(parse_size("1P"), 1ull << 50);
    CHECK_EQ(parse_size("7E"), 7ull << 60);
    CHECK_EQ(parse_size("1.5M"), 3 << 19);
    CHECK_EQ(parse_size("0.5k"), 512);
    CHECK_EQ(parse_size("1.25GiB"), 5ull << 28);
    CHECK_EQ(parse_size("32MB"), 32 << 20);
    CHECK(parse_size("8E") < 0);            /* 2^63 does not fit */
    CHECK(parse_size("1.5") < 0);           /* fractions of a byte */
    CHECK(parse_size("1.") < 0);
    CHECK(parse_size("-1") < 0);
    CHECK(parse_size("1x") < 0);
    CHECK(parse_size("") < 0);
    CHECK(parse_size("G") < 0);
    CHECK(parse_size("1Gx") < 0);
}

/* An entry written for a rewritten table reads back the same, with at
 * least the three known words of extra data. */
static void test_snapshot_entry_roundtrip(void)
{
    struct qcow2_header h = { .version = 3, .cluster_size = 65536, .size = 1 << 30 };
    uint8_t extra[40] = { 0 };
    be64_store(extra, 12345);           /* vm-state size */
    be64_store(extra + 8, 1 << 29);     /* disk size */
    be64_store(extra + 16, 77);         /* icount */
    extra[39] = 0xab;                   /* unknown extra data is kept */
    struct qcow2_snapshot s = {
        .l1_table_offset = 0x50000, .l1_size = 2, .id = "7", .name = "before upgrade",
        .date_sec = 1700000000, .date_nsec = 5, .vm_clock_nsec = 3000000001ull,
        .vm_state_size = 12345, .disk_size = 1 << 29, .extra_size = sizeof(extra), .extra = extra,
    };
    uint8_t buf[256] = { 0 };
    size_t len = qcow2_snapshot_entry_len(&s);
    CHECK_EQ(len, 40 + sizeof(extra) + 1 + 14);
    qcow2_snapshot_entry_store(&s, buf);
    struct qcow2_snapshot *out = NULL;
    char err[256];
    CHECK_EQ(qcow2_snapshots_parse(&h, buf, len, 1, &out, err, sizeof(err)), 0);
    if (!out)
        return;
    CHECK_EQ(out->l1_table_offset, 0x50000);
    CHECK_EQ(out->l1_size, 2);
    CHECK(!strcmp(out->id, "7") && !strcmp(out->name, "before upgrade"));
    CHECK_EQ(out->vm_state_size, 12345);
    CHECK_EQ(out->disk_size, 1 << 29);
    CHECK_EQ(out->vm_clock_nsec, 3000000001ull);
    CHECK_EQ(out->extra_size, sizeof(extra));
    CHECK_EQ(be64_load(out->extra + 16), 77);
    CHECK_EQ(out->extra[39], 0xab);
    qcow2_snapshots_free(out, 1);

    /* An incomplete entry (no extra data) is written complete: icount "none". */
    s.extra_size = 0;
    s.extra = NULL;
    len = qcow2_snapshot_entry_len(&s);
    CHECK_EQ(len, 40 + 24 + 1 + 14);
    memset(buf, 0, sizeof(buf));
    qcow2_snapshot_entry_store(&s, buf);
    CHECK_EQ(be32_load(buf + 36), 24);
    CHECK_EQ(be64_load(buf + 40), 12345);
    CHECK_EQ(be64_load(buf + 48), 1 << 29);
    CHECK_EQ(be64_load(buf + 56), UINT64_MAX);
}

static void test_find_extension(void)
{
    static uint8_t b[65536];
    struct qcow2_header h = { .version = 3, .header_length = 112, .cluster_size = 65536 };
    memset(b, 0, sizeof(b));
    be32_store(b + 112, QCOW2_EXT_BACKING_FORMAT);
    be32_store(b + 116, 5);
    memcpy(b + 120, "qcow2", 5);
    be32_store(b + 128, QCOW2_EXT_BITMAPS);
    be32_store(b + 132, 24);
    be32_store(b + 136, 3);
    uint32_t len = 0;
    const uint8_t *x = qcow2_header_find_ext(b, sizeof(b), &h, QCOW2_EXT_BITMAPS, &len);
    CHECK(x == b + 136);
    CHECK_EQ(len, 24);
    CHECK(qcow2_header_find_ext(b, sizeof(b), &h, QCOW2_EXT_FEATURE_TABLE, &len) == NULL);
    /* A length running past the buffer ends the walk. */
    be32_store(b + 116, 70000);
    CHECK(qcow2_header_find_ext(b, sizeof(b), &h, QCOW2_EXT_BITMAPS, &len) == NULL);
    /* v2: extensions start at 72. */
    h.version = 2;
    be32_store(b + 72, QCOW2_EXT_BITMAPS);
    be32_store(b + 76, 24);
    CHECK(qcow2_header_find_ext(b, sizeof(b), &h, QCOW2_EXT_BITMAPS, &len) == b + 80);
}

int main(void)
{
    RUN_TEST(test_parse_size);
    RUN_TEST(test_snapshot_entry_roundtrip);
    RUN_TEST(test_find_extension);
    UNIT_EXIT();
}
