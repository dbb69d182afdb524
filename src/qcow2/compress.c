/* Cluster compression as QEMU does it: zlib raw deflate (window 2^12) or zstd.
 * Whole zlib clusters are inflated by libdeflate (about twice zlib's speed
 * here), prefixes and anything libdeflate does not take cleanly by zlib. */
#include <errno.h>
#include <libdeflate.h>
#include <limits.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2/format.h"

/* Decompression contexts cost about a third of a 64 KiB decompression to
 * create, so each thread keeps its own; the key's destructor frees them at
 * thread exit. */
struct dec_ctx {
    ZSTD_DCtx *zstd;
    struct libdeflate_decompressor *deflate;
};

static pthread_key_t ctx_key;
static pthread_once_t ctx_once = PTHREAD_ONCE_INIT;

static void ctx_free(void *p)
{
    struct dec_ctx *c = p;
    if (c->zstd)
        ZSTD_freeDCtx(c->zstd);
    if (c->deflate)
        libdeflate_free_decompressor(c->deflate);
    free(c);
}

static void ctx_key_init(void) { pthread_key_create(&ctx_key, ctx_free); }

static struct dec_ctx *thread_ctx(void)
{
    pthread_once(&ctx_once, ctx_key_init);
    struct dec_ctx *c = pthread_getspecific(ctx_key);
    if (!c) {
        c = calloc(1, sizeof(*c));
        if (c && pthread_setspecific(ctx_key, c) != 0) {
            free(c);
            c = NULL;
        }
    }
    return c;
}

static ZSTD_DCtx *thread_dctx(void)
{
    struct dec_ctx *c = thread_ctx();
    if (!c)
        return NULL;
    if (c->zstd)
        /* Drop any state a failed previous call left behind. */
        ZSTD_DCtx_reset(c->zstd, ZSTD_reset_session_only);
    else
        c->zstd = ZSTD_createDCtx();
    return c->zstd;
}

/* The whole cluster by libdeflate: 0, -EIO (the stream is valid but ends
 * short of the cluster, an error for zlib too), or 1 when zlib must judge
 * (no decompressor, a stream zlib may read differently: bad data after the
 * cluster is full, more output than the cluster).  Input after the end of
 * the stream is the rest of the last sector: ignored, as zlib does. */
static int deflate_whole(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    struct dec_ctx *c = thread_ctx();
    if (c && !c->deflate)
        c->deflate = libdeflate_alloc_decompressor();
    if (!c || !c->deflate)
        return 1;
    size_t got;
    enum libdeflate_result r = libdeflate_deflate_decompress(c->deflate, in, in_len, out, out_len, &got);
    if (r != LIBDEFLATE_SUCCESS)
        return 1;
    return got == out_len ? 0 : -EIO;
}

/* want < out_len: only the first want bytes are needed (a read of the start
 * of a cluster); inflating stops there, unless libdeflate can do the whole
 * cluster as fast.  want == out_len: the whole cluster, which must come out
 * exactly.  Returns the bytes valid from the start (want or out_len). */
static int zlib_decompress(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len, size_t want)
{
    z_stream zs;
    int ret;

    if (in_len > UINT_MAX || out_len > UINT_MAX)
        return -EIO;
    /* Half a cluster or more: libdeflate inflates all of it in about the
     * time zlib takes for half. */
    if (want >= out_len / 2) {
        int r = deflate_whole(in, in_len, out, out_len);
        if (r <= 0)
            return r < 0 ? r : (int)out_len;
    }
    memset(&zs, 0, sizeof(zs));
    /* Negative window bits: raw deflate without zlib header, as QEMU writes it. */
    if (inflateInit2(&zs, -12) != Z_OK)
        return -EIO;
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)in_len;
    zs.next_out = out;
    zs.avail_out = (uInt)want;
    ret = inflate(&zs, want < out_len ? Z_SYNC_FLUSH : Z_FINISH);
    inflateEnd(&zs);
    if (want < out_len)
        return (ret == Z_OK || ret == Z_STREAM_END || ret == Z_BUF_ERROR) && zs.avail_out == 0 ? (int)want : -EIO;
    /* The descriptor only knows the length to 512 bytes, so trailing input is
     * fine (Z_BUF_ERROR once the output is full); a short output is not. */
    if ((ret != Z_STREAM_END && ret != Z_BUF_ERROR) || zs.avail_out != 0)
        return -EIO;
    return (int)out_len;
}

static ssize_t zlib_compress(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    z_stream zs;
    ssize_t ret;

    if (in_len > UINT_MAX)
        return -EIO;
    if (out_len > UINT_MAX)
        out_len = UINT_MAX;
    memset(&zs, 0, sizeof(zs));
    /* Same parameters as QEMU: default level, raw deflate, 4 KiB window. */
    if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, -12, 9, Z_DEFAULT_STRATEGY) != Z_OK)
        return -EIO;
    zs.next_in = (Bytef *)in;
    zs.avail_in = (uInt)in_len;
    zs.next_out = out;
    zs.avail_out = (uInt)out_len;
    int zret = deflate(&zs, Z_FINISH);
    if (zret == Z_STREAM_END)
        ret = (ssize_t)(out_len - zs.avail_out);
    else if (zret == Z_OK || zret == Z_BUF_ERROR)
        ret = -ENOSPC;      /* ran out of output space */
    else
        ret = -EIO;
    deflateEnd(&zs);
    return ret;
}

static int zstd_decompress(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len, size_t want)
{
    ZSTD_DCtx *dctx = thread_dctx();
    ZSTD_inBuffer input = { in, in_len, 0 };
    ZSTD_outBuffer output = { out, want, 0 };
    size_t zret = 1;
    int ret = 0;

    if (!dctx)
        return -EIO;
    /* The data may be several frames; stop as soon as the cluster is full.
     * Bytes after the last frame are the rest of the final sector: ignored. */
    while (output.pos < output.size) {
        size_t in_before = input.pos, out_before = output.pos;
        zret = ZSTD_decompressStream(dctx, &output, &input);
        if (ZSTD_isError(zret)) {
            ret = -EIO;
            break;
        }
        if (input.pos == in_before && output.pos == out_before) {
            ret = -EIO;     /* no progress: input ended inside a frame */
            break;
        }
    }
    /* Output full but the frame not finished: let it consume the frame
     * epilogue (e.g. a checksum); more data means the cluster was too big.
     * A prefix (want < out_len) stops as soon as it is there. */
    if (ret == 0 && zret != 0 && want == out_len) {
        zret = ZSTD_decompressStream(dctx, &output, &input);
        if (ZSTD_isError(zret) || zret != 0)
            ret = -EIO;
    }
    return ret < 0 ? ret : (int)want;
}

static ssize_t zstd_compress(const uint8_t *in, size_t in_len, uint8_t *out, size_t out_len)
{
    ZSTD_CCtx *cctx = ZSTD_createCCtx();
    ssize_t ret;

    if (!cctx)
        return -EIO;
    /* One frame with the content size recorded, like QEMU's single-frame output. */
    size_t zret = ZSTD_compress2(cctx, out, out_len, in, in_len);
    if (!ZSTD_isError(zret))
        ret = (ssize_t)zret;
    else if (ZSTD_getErrorCode(zret) == ZSTD_error_dstSize_tooSmall)
        ret = -ENOSPC;
    else
        ret = -EIO;
    ZSTD_freeCCtx(cctx);
    return ret;
}

int qcow2_decompress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
                     uint8_t *out, size_t out_len)
{
    int r = qcow2_decompress_prefix(type, in, in_len, out, out_len, out_len);
    return r < 0 ? r : 0;
}

int qcow2_decompress_prefix(enum qcow2_compression type, const uint8_t *in, size_t in_len,
                            uint8_t *out, size_t out_len, size_t want)
{
    if (want == 0 || want > out_len)
        want = out_len;
    switch (type) {
    case QCOW2_COMP_ZLIB:
        return zlib_decompress(in, in_len, out, out_len, want);
    case QCOW2_COMP_ZSTD:
        return zstd_decompress(in, in_len, out, out_len, want);
    }
    return -EIO;
}

ssize_t qcow2_compress(enum qcow2_compression type, const uint8_t *in, size_t in_len,
                       uint8_t *out, size_t out_len)
{
    switch (type) {
    case QCOW2_COMP_ZLIB:
        return zlib_compress(in, in_len, out, out_len);
    case QCOW2_COMP_ZSTD:
        return zstd_compress(in, in_len, out, out_len);
    }
    return -EIO;
}
