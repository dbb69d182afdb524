/* libFuzzer target: open a (mutated) qcow2 image and run a sequence of
 * requests on it: reads, writes (plain and FUA), discards, write-zeroes,
 * flushes, and close + reopen.  The engine runs synchronously (outside
 * coroutines), so every input replays exactly.
 *
 * Input layout (tests/fuzz/mkseeds.py writes seeds in this form):
 *   byte 0      flags: bit 0 small metadata cache (64 KiB: eviction paths),
 *               bit 1 read-only
 *   byte 1      number of requests N (at most MAX_OPS)
 *   N x 8 bytes requests: code, pattern, u32 LE sector, u16 LE sectors - 1
 *   u32 LE      file size in 512-byte sectors (the file is sparse)
 *   records     u32 LE byte offset, u16 LE length, that many bytes: the
 *               non-zero parts of the image file
 * The sparse form keeps 64 KiB-cluster images a few KiB long while their
 * tables still lie where qemu-img put them.  Records past the file size
 * are dropped.
 *
 * The image sits in a scratch directory next to base.raw (and base.qcow2
 * when UQ_FUZZ_BASE names a qcow2 file to copy there), so seeds made with
 * "-b base.raw -F raw" or "-b base.qcow2 -F qcow2" open with their backing
 * file.  Everything must end in an error or a result: no crash, leak,
 * sanitizer report or hang.  UQ_FUZZ_VERBOSE=1 keeps the engine's
 * messages on stderr. */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/file.h"
#include "io/loop.h"
#include "img/image.h"
#include "fuzz_util.h"

#define MAX_OPS 32
#define MAX_FILE_SECTORS (32u << 11)      /* 32 MiB: bounds the tables an input can make us read */
#define MAX_REQ_SECTORS 2048u             /* 1 MiB */

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char dir[256], img_path[300];
static uint8_t *iobuf;

/* No blocks reserved ahead of the file's end: on tmpfs that would cost
 * more than the rest of a run (the engine then extends the file by its
 * writes, as on a file system without fallocate). */
static int no_allocate(void *ctx, struct file *f, uint64_t off, uint64_t len)
{
    (void)ctx, (void)f, (void)off, (void)len;
    return -EOPNOTSUPP;
}
static const struct file_hooks hooks = { .allocate = no_allocate };

static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

static void cleanup(void)
{
    char p[320];
    const char *names[] = { "img.qcow2", "base.raw", "base.qcow2" };
    for (unsigned i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        snprintf(p, sizeof(p), "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

static int write_file(const char *path, const void *buf, size_t len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        return -1;
    ssize_t n = write(fd, buf, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    fuzz_scratch_dir(dir, sizeof(dir), "uq-fuzz-image");
    atexit(cleanup);
    snprintf(img_path, sizeof(img_path), "%s/img.qcow2", dir);

    /* A raw backing file with a recognisable pattern. */
    size_t blen = 1u << 20;
    uint8_t *b = malloc(blen);
    for (size_t i = 0; i < blen; i++)
        b[i] = (uint8_t)(i / 512 * 7 + 1);
    char p[320];
    snprintf(p, sizeof(p), "%s/base.raw", dir);
    if (write_file(p, b, blen) < 0) {
        perror("fuzz_image: base.raw");
        exit(1);
    }
    free(b);

    const char *base = getenv("UQ_FUZZ_BASE");
    if (base && *base) {
        FILE *f = fopen(base, "rb");
        uint8_t *q = malloc(4u << 20);
        size_t n = f ? fread(q, 1, 4u << 20, f) : 0;
        if (f)
            fclose(f);
        snprintf(p, sizeof(p), "%s/base.qcow2", dir);
        if (!n || write_file(p, q, n) < 0) {
            fprintf(stderr, "fuzz_image: cannot copy UQ_FUZZ_BASE '%s'\n", base);
            exit(1);
        }
        free(q);
    }
    iobuf = io_alloc(MAX_REQ_SECTORS * 512);
    file_set_hooks(&hooks);
    fuzz_quiet_stderr();
    return 0;
}

/* Materialise the sparse image; returns 0 or -1 (input too short). */
static int make_image(const uint8_t *d, size_t len)
{
    if (len < 4)
        return -1;
    uint64_t fsize = (uint64_t)(le32(d) % (MAX_FILE_SECTORS + 1)) * 512;
    d += 4;
    len -= 4;
    int fd = open(img_path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0)
        abort();
    if (ftruncate(fd, (off_t)fsize) < 0)
        abort();
    while (len >= 6) {
        uint64_t off = le32(d);
        size_t n = le16(d + 4);
        d += 6;
        len -= 6;
        if (n > len)
            n = len;
        if (off < fsize) {
            size_t w = off + n > fsize ? (size_t)(fsize - off) : n;
            if (pwrite(fd, d, w, (off_t)off) != (ssize_t)w)
                abort();
        }
        d += n;
        len -= n;
    }
    close(fd);
    return 0;
}

static struct image *open_image(const struct img_opts *o)
{
    char err[512];
    return img_open(img_path, o, err, sizeof(err));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 2)
        return 0;
    uint8_t flags = data[0];
    unsigned nops = data[1] % (MAX_OPS + 1);
    if (size < 2 + (size_t)nops * 8)
        return 0;
    const uint8_t *ops = data + 2;
    if (make_image(ops + nops * 8, size - 2 - nops * 8) < 0)
        return 0;

    struct img_opts o = {
        .format = IMG_FMT_QCOW2,
        .read_only = flags & 2,
        .cache_size = (flags & 1) ? 64u << 10 : 0,
        .cache = FILE_CACHE_BUFFERED,   /* page cache: no disk I/O per run */
    };
    struct image *img = open_image(&o);
    for (unsigned i = 0; img && i < nops; i++) {
        const uint8_t *op = ops + i * 8;
        uint64_t sectors = img_size(img) / 512;
        uint64_t off = sectors ? le32(op + 2) % sectors * 512 : 0;
        uint64_t len = (uint64_t)(le16(op + 6) % MAX_REQ_SECTORS + 1) * 512;
        if (len > img_size(img) - off)
            len = img_size(img) - off;
        switch (op[0] % 9) {
        case 0:
            img_read(img, iobuf, off, len);
            break;
        case 1:
        case 2:
            memset(iobuf, op[1], len);
            img_write(img, iobuf, off, len, op[0] % 9 == 2 ? IMG_FUA : 0);
            break;
        case 3:
            img_discard(img, off, len);
            break;
        case 4:
            img_write_zeroes(img, off, len, 0);
            break;
        case 5:
            img_write_zeroes(img, off, len, IMG_NO_HOLE | IMG_FUA);
            break;
        case 6:
            img_flush(img);
            break;
        case 7: {
            /* Misaligned and out-of-range requests are refused up front. */
            uint64_t bad = off + op[1] % 512;
            img_read(img, iobuf, bad, 512);
            img_write(img, iobuf, img_size(img), 512, 0);
            break;
        }
        case 8:
            /* Clean close, then open what we left behind. */
            img_close(img);
            img = open_image(&o);
            break;
        }
    }
    img_close(img);
    return 0;
}
