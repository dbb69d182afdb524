/* Unit tests for cluster compression: our own round trips, and streams made
 * the way QEMU makes them (raw deflate window 12; zstd streaming frames). */
#include <errno.h>
#include <pthread.h>
#include <zlib.h>
#include <zstd.h>

#include "qcow2/format.h"
#include "unit.h"

#define MAXC (2u << 20)

static uint8_t src[MAXC], comp[2 * MAXC + 4096], out[MAXC + 4096];

/* Compressible but not trivial content. */
static void fill(uint8_t *p, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        p[i] = (i % 97 < 60) ? (uint8_t)(i / 13) : (uint8_t)(seed >> 24);
    }
}

static void fill_random(uint8_t *p, size_t n, uint64_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        p[i] = (uint8_t)seed;
    }
}

/* Raw deflate exactly as QEMU's qcow2 zlib compressor configures it. */
static size_t qemu_style_deflate(const uint8_t *in, size_t n, uint8_t *o, size_t olen)
{
    z_stream zs;
    memset(&zs, 0, sizeof(zs));
    if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
        return 0;
    zs.next_in = (Bytef *)in; zs.avail_in = (uInt)n;
    zs.next_out = o; zs.avail_out = (uInt)olen;
    int r = deflate(&zs, Z_FINISH);
    size_t len = olen - zs.avail_out;
    deflateEnd(&zs);
    return r == Z_STREAM_END ? len : 0;
}

/* One zstd frame written through the streaming API with ZSTD_e_end (QEMU's way). */
static size_t zstd_stream_frame(const uint8_t *in, size_t n, uint8_t *o, size_t olen, bool checksum)
{
    ZSTD_CCtx *c = ZSTD_createCCtx();
    ZSTD_inBuffer ib = { in, n, 0 };
    ZSTD_outBuffer ob = { o, olen, 0 };
    size_t r;
    if (checksum)
        ZSTD_CCtx_setParameter(c, ZSTD_c_checksumFlag, 1);
    do {
        r = ZSTD_compressStream2(c, &ob, &ib, ZSTD_e_end);
    } while (!ZSTD_isError(r) && r != 0);
    ZSTD_freeCCtx(c);
    return ZSTD_isError(r) ? 0 : ob.pos;
}

static void roundtrip(enum qcow2_compression type)
{
    for (uint32_t cb = 9; cb <= 21; cb++) {
        size_t cs = 1u << cb;
        fill(src, cs, cb);
        ssize_t n = qcow2_compress(type, src, cs, comp, cs);
        CHECK(n > 0 && (size_t)n < cs);
        if (n <= 0)
            continue;
        /* The engine reads whole 512-byte sectors: trailing bytes follow. */
        size_t padded = ((size_t)n + 511) & ~(size_t)511;
        memset(comp + n, 0xa5, padded - n);
        memset(out, 0, cs);
        CHECK_EQ(qcow2_decompress(type, comp, padded, out, cs), 0);
        CHECK(memcmp(out, src, cs) == 0);
        /* Exact length works too. */
        CHECK_EQ(qcow2_decompress(type, comp, n, out, cs), 0);
        CHECK(memcmp(out, src, cs) == 0);
        /* Truncated input is an error, never a short cluster. */
        CHECK_EQ(qcow2_decompress(type, comp, n / 2, out, cs), -EIO);
        CHECK_EQ(qcow2_decompress(type, comp, 0, out, cs), -EIO);
    }
}

static void test_zlib_roundtrip(void) { roundtrip(QCOW2_COMP_ZLIB); }
static void test_zstd_roundtrip(void) { roundtrip(QCOW2_COMP_ZSTD); }

static void test_incompressible(void)
{
    size_t cs = 65536;
    fill_random(src, cs, 42);
    CHECK_EQ(qcow2_compress(QCOW2_COMP_ZLIB, src, cs, comp, cs - 512), -ENOSPC);
    CHECK_EQ(qcow2_compress(QCOW2_COMP_ZSTD, src, cs, comp, cs - 512), -ENOSPC);
    CHECK_EQ(qcow2_compress(QCOW2_COMP_ZLIB, src, cs, comp, 0), -ENOSPC);
    CHECK_EQ(qcow2_compress(QCOW2_COMP_ZSTD, src, cs, comp, 1), -ENOSPC);
    /* Given room, it still round-trips. */
    ssize_t n = qcow2_compress(QCOW2_COMP_ZSTD, src, cs, comp, 2 * cs);
    CHECK(n > 0);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, (size_t)n, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);
    n = qcow2_compress(QCOW2_COMP_ZLIB, src, cs, comp, 2 * cs);
    CHECK(n > 0);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, (size_t)n, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);
}

static void test_zlib_qemu_stream(void)
{
    size_t cs = 65536;
    memset(src, 0x5a, cs);                          /* qemu-io write -c -P 0x5a */
    size_t n = qemu_style_deflate(src, cs, comp, sizeof(comp));
    CHECK(n > 0);
    memset(comp + n, 0, 1024);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, n + 1024, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);

    fill(src, cs, 7);
    n = qemu_style_deflate(src, cs, comp, sizeof(comp));
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, n, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);
    /* Stream longer than the cluster: its first cs bytes, as QEMU takes
     * them (libdeflate refuses it, zlib judges). */
    fill(src, 2 * cs, 8);
    n = qemu_style_deflate(src, 2 * cs, comp, sizeof(comp));
    CHECK(n > 0);
    memset(out, 0, cs);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, n, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);
    /* Stream shorter than the cluster: error. */
    n = qemu_style_deflate(src, cs / 2, comp, sizeof(comp));
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, n + 100, out, cs), -EIO);
    /* Garbage. */
    fill_random(comp, 4096, 9);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, 4096, out, cs), -EIO);
    /* A zlib-wrapped (not raw) stream is not what qcow2 stores. */
    uLongf zl = sizeof(comp);
    compress2(comp, &zl, src, cs, 6);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZLIB, comp, zl, out, cs), -EIO);
}

static void test_zstd_qemu_stream(void)
{
    size_t cs = 65536;

    /* One streaming frame plus sector padding. */
    memset(src, 0x5a, cs);
    size_t n = zstd_stream_frame(src, cs, comp, sizeof(comp), false);
    CHECK(n > 0);
    memset(comp + n, 0, 512);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, n + 512, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);

    /* With a content checksum at the end of the frame. */
    fill(src, cs, 3);
    n = zstd_stream_frame(src, cs, comp, sizeof(comp), true);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, n, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);
    /* ... and a corrupted checksum is detected. */
    comp[n - 1] ^= 0xff;
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, n, out, cs), -EIO);

    /* Several frames making up one cluster, then trailing bytes. */
    fill(src, cs, 5);
    size_t a = zstd_stream_frame(src, 10000, comp, sizeof(comp), false);
    size_t b = zstd_stream_frame(src + 10000, 30000, comp + a, sizeof(comp) - a, true);
    size_t c = zstd_stream_frame(src + 40000, cs - 40000, comp + a + b, sizeof(comp) - a - b, false);
    CHECK(a && b && c);
    memset(comp + a + b + c, 0x77, 300);
    memset(out, 0, cs);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, a + b + c + 300, out, cs), 0);
    CHECK(memcmp(out, src, cs) == 0);
    /* Frames ending before the cluster is full: error. */
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, a + b, out, cs), -EIO);
    /* Frame content larger than the cluster: error. */
    n = zstd_stream_frame(src, cs, comp, sizeof(comp), false);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, n, out, cs / 2), -EIO);
    /* Truncated frame. */
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, n - 1, out, cs), -EIO);
    /* Garbage. */
    fill_random(comp, 4096, 11);
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, 4096, out, cs), -EIO);
    /* A zlib stream handed to zstd (wrong compression type). */
    n = qemu_style_deflate(src, cs, comp, sizeof(comp));
    CHECK_EQ(qcow2_decompress(QCOW2_COMP_ZSTD, comp, n, out, cs), -EIO);
}

/* Partial decompression (a read needing only the start of a cluster): at
 * least the first want bytes come out right (zlib: all of the cluster from
 * half of it on, by libdeflate), the count returned, and nothing after
 * them is written; input
 * that ends, or is malformed, before the prefix is complete is an error,
 * never a short or garbage prefix; input broken only after the prefix still
 * gives it (those bytes are intact), while the whole cluster fails. */
static void prefix(enum qcow2_compression type)
{
    size_t cs = 65536;
    fill(src, cs, 17);
    ssize_t n = qcow2_compress(type, src, cs, comp, cs);
    CHECK(n > 64);
    if (n <= 64)
        return;
    for (size_t want = 512; want <= cs; want *= 2) {
        memset(out, 0xee, cs);
        int got = qcow2_decompress_prefix(type, comp, (size_t)n, out, cs, want);
        size_t expect = type == QCOW2_COMP_ZLIB && want >= cs / 2 ? cs : want;
        CHECK_EQ(got, (int)expect);
        if (got <= 0)
            continue;
        CHECK(memcmp(out, src, (size_t)got) == 0);
        size_t k = (size_t)got;
        while (k < cs && out[k] == 0xee)
            k++;
        CHECK_EQ(k, cs);
    }
    /* Input ending inside the prefix: 16 bytes cannot hold 4 KiB of it. */
    CHECK_EQ(qcow2_decompress_prefix(type, comp, 16, out, cs, 4096), -EIO);
    CHECK_EQ(qcow2_decompress_prefix(type, comp, 0, out, cs, 4096), -EIO);
    /* Input cut short of the end: the whole cluster fails; a prefix either
     * comes out right (zlib decodes as it goes) or fails (zstd decodes a
     * block at a time), never anything else. */
    CHECK_EQ(qcow2_decompress(type, comp, (size_t)n * 3 / 4, out, cs), -EIO);
    memset(out, 0, cs);
    int r = qcow2_decompress_prefix(type, comp, (size_t)n / 2, out, cs, 4096);
    if (type == QCOW2_COMP_ZLIB)
        CHECK_EQ(r, 4096);
    CHECK(r == -EIO || (r == 4096 && memcmp(out, src, 4096) == 0));
    /* A stream whose content ends before the prefix does: error. */
    n = qcow2_compress(type, src, cs / 4, comp, cs);
    CHECK(n > 0);
    CHECK_EQ(qcow2_decompress_prefix(type, comp, (size_t)n, out, cs, cs / 4), (int)(cs / 4));
    CHECK_EQ(qcow2_decompress_prefix(type, comp, (size_t)n, out, cs, cs / 2), -EIO);
    /* Malformed from the start: a deflate block of the reserved type 3
     * (zlib), a damaged frame magic (zstd). */
    n = qcow2_compress(type, src, cs, comp, cs);
    if (type == QCOW2_COMP_ZLIB)
        comp[0] |= 6;
    else
        comp[0] ^= 0xff;
    CHECK_EQ(qcow2_decompress_prefix(type, comp, (size_t)n, out, cs, 4096), -EIO);
    CHECK_EQ(qcow2_decompress_prefix(type, comp, (size_t)n, out, cs, 512), -EIO);
}

static void test_zlib_prefix(void) { prefix(QCOW2_COMP_ZLIB); }
static void test_zstd_prefix(void) { prefix(QCOW2_COMP_ZSTD); }

/* Per-thread zstd contexts: each thread decompresses on its own and frees its
 * context at exit (LeakSanitizer in the debug build checks the latter). */
struct thread_arg { const uint8_t *in; size_t in_len; int ok; };

static void *decompress_thread(void *p)
{
    struct thread_arg *a = p;
    static __thread uint8_t tout[65536];
    a->ok = 1;
    for (int i = 0; i < 20; i++) {
        if (qcow2_decompress(QCOW2_COMP_ZSTD, a->in, a->in_len / 2, tout, sizeof(tout)) != -EIO ||
            qcow2_decompress(QCOW2_COMP_ZSTD, a->in, a->in_len, tout, sizeof(tout)) != 0 ||
            memcmp(tout, src, sizeof(tout)) != 0)
            a->ok = 0;
    }
    return NULL;
}

static void test_zstd_threads(void)
{
    fill(src, 65536, 99);
    ssize_t n = qcow2_compress(QCOW2_COMP_ZSTD, src, 65536, comp, 65536);
    CHECK(n > 0);
    struct thread_arg args[3];
    pthread_t th[3];
    for (int i = 0; i < 3; i++) {
        args[i] = (struct thread_arg){ comp, (size_t)n, 0 };
        CHECK_EQ(pthread_create(&th[i], NULL, decompress_thread, &args[i]), 0);
    }
    for (int i = 0; i < 3; i++) {
        pthread_join(th[i], NULL);
        CHECK(args[i].ok);
    }
}

static void test_bad_type(void)
{
    memset(src, 1, 4096);
    CHECK_EQ(qcow2_compress((enum qcow2_compression)7, src, 4096, comp, 4096), -EIO);
    CHECK_EQ(qcow2_decompress((enum qcow2_compression)7, comp, 4096, out, 4096), -EIO);
}

int main(void)
{
    RUN_TEST(test_zlib_roundtrip);
    RUN_TEST(test_zstd_roundtrip);
    RUN_TEST(test_incompressible);
    RUN_TEST(test_zlib_qemu_stream);
    RUN_TEST(test_zstd_qemu_stream);
    RUN_TEST(test_zlib_prefix);
    RUN_TEST(test_zstd_prefix);
    RUN_TEST(test_zstd_threads);
    RUN_TEST(test_bad_type);
    UNIT_EXIT();
}
