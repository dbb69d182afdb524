/* ublk-qcow2 bench: drive the image engine directly, without a frontend.
 *
 * One thread, one loop, --depth coroutines ("jobs").  Each job owns its
 * buffers (filled once with non-zero pseudo-random data) and issues one
 * img_read/img_write at a time until the time or I/O budget is spent, so
 * --depth is the number of requests in flight. */
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/resource.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "io/clock.h"
#include "io/coroutine.h"
#include "io/loop.h"
#include "img/image.h"

#define BENCH_MAX_DEPTH 4096u
#define BENCH_MAX_BS    (64ull << 20)

/* Latency histogram: exact below 2^LAT_SUB_BITS ns, then 2^LAT_SUB_BITS
 * buckets per power of two (about 3% wide), so percentiles cost one
 * increment per I/O and no sorting. */
#define LAT_SUB_BITS    5u
#define LAT_SUB         (1u << LAT_SUB_BITS)
#define LAT_BUCKETS     ((64u - LAT_SUB_BITS + 1u) * LAT_SUB)

struct rw_mode {
    const char *name;
    unsigned read_pct;          /* 100 = reads only, 0 = writes only, 50 = mixed */
    bool random;
};

static const struct rw_mode rw_modes[] = {
    { "randread",  100, true  },
    { "randwrite", 0,   true  },
    { "randrw",    50,  true  },
    { "read",      100, false },
    { "write",     0,   false },
    { "rw",        50,  false },  /* sequential mixed, like fio's rw */
};

struct bench_cfg {
    const struct rw_mode *mode;
    uint64_t bs;
    unsigned depth;
    double seconds;             /* 0 = no time limit */
    uint64_t ios;               /* 0 = no I/O count limit */
    uint64_t size_limit;        /* 0 = whole image */
    enum img_format format;
    uint64_t cache_size;
    uint64_t seed;
    bool json;
    const char *path;
    struct cli_key key;         /* passphrase of a LUKS-encrypted image */
};

struct bench_run {
    const struct bench_cfg *cfg;
    struct loop *loop;
    struct image *img;
    uint64_t nblocks;           /* bs-sized blocks in the tested range */
    uint64_t deadline_ns;
    uint64_t start_ns, end_ns;
    struct rusage ru_start, ru_end;     /* CPU time of the measured run only */
    bool stop;
    uint64_t read_ios, write_ios, errors;
    uint64_t lat_ns_total;
    uint64_t lat_ns_max;
    uint64_t lat_hist[LAT_BUCKETS];
    int first_err;              /* -errno of the first failed request */
    bool first_err_write;
    uint64_t first_err_off;
    int flush_err, close_err;
    unsigned jobs_live;
    struct co_queue jobs_done;
};

struct bench_job {
    struct bench_run *run;
    uint64_t rng;
    uint64_t next_block;        /* sequential modes: this job's position */
    uint64_t quota;             /* --ios: this job's share; 0 = unlimited */
    void *rbuf, *wbuf;
};

/* splitmix64: seeds each job's generator from --seed and the job index. */
static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* xorshift64*: cheap per-I/O generator; state must be non-zero. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *s = x;
    return x * 0x2545f4914f6cdd1dull;
}

static unsigned lat_bucket(uint64_t ns)
{
    if (ns < LAT_SUB)
        return (unsigned)ns;
    unsigned e = 63u - (unsigned)__builtin_clzll(ns);           /* >= LAT_SUB_BITS */
    unsigned sub = (unsigned)(ns >> (e - LAT_SUB_BITS)) & (LAT_SUB - 1);
    return (e - LAT_SUB_BITS + 1) * LAT_SUB + sub;
}

/* The middle of bucket b, in ns. */
static double lat_bucket_mid(unsigned b)
{
    if (b < LAT_SUB)
        return b;
    unsigned e = b / LAT_SUB + LAT_SUB_BITS - 1, sub = b % LAT_SUB;
    double width = (double)(1ull << (e - LAT_SUB_BITS));
    return (double)(LAT_SUB + sub) * width + width / 2;
}

/* Latency at or below which a fraction p of the I/Os completed, in us. */
static double lat_percentile_us(const struct bench_run *r, double p)
{
    uint64_t total = r->read_ios + r->write_ios, seen = 0;
    if (!total)
        return 0;
    uint64_t want = (uint64_t)(p * (double)total + 0.5);
    if (want < 1)
        want = 1;
    for (unsigned b = 0; b < LAT_BUCKETS; b++) {
        seen += r->lat_hist[b];
        if (seen >= want)
            return lat_bucket_mid(b) / 1000.0;
    }
    return (double)r->lat_ns_max / 1000.0;
}

/* Non-zero bytes throughout, so no engine can take a zero-detection shortcut. */
static void fill_random(void *buf, size_t len, uint64_t *rng)
{
    uint64_t *w = buf;
    for (size_t i = 0; i < len / 8; i++)
        w[i] = rng_next(rng) | 0x0101010101010101ull;
}

static void job_main(void *arg)
{
    struct bench_job *j = arg;
    struct bench_run *r = j->run;
    const struct bench_cfg *c = r->cfg;

    for (uint64_t done = 0; !r->stop; done++) {
        if (c->ios && done == j->quota)
            break;

        uint64_t block;
        if (c->mode->random) {
            block = rng_next(&j->rng) % r->nblocks;
        } else {
            block = j->next_block;
            j->next_block = (j->next_block + c->depth) % r->nblocks;
        }
        uint64_t off = block * c->bs;
        bool is_read;
        if (c->mode->read_pct == 100)
            is_read = true;
        else if (c->mode->read_pct == 0)
            is_read = false;
        else
            is_read = (rng_next(&j->rng) >> 63) != 0;

        uint64_t t0 = now_ns();
        int ret = is_read ? img_read(r->img, j->rbuf, off, c->bs)
                          : img_write(r->img, j->wbuf, off, c->bs, 0);
        uint64_t t1 = now_ns();

        if (ret < 0) {
            r->errors++;
            if (!r->first_err) {
                r->first_err = ret;
                r->first_err_write = !is_read;
                r->first_err_off = off;
            }
            /* A failing image would fail every request: stop everyone. */
            r->stop = true;
            break;
        }
        if (is_read)
            r->read_ios++;
        else
            r->write_ios++;
        r->lat_ns_total += t1 - t0;
        r->lat_hist[lat_bucket(t1 - t0)]++;
        if (t1 - t0 > r->lat_ns_max)
            r->lat_ns_max = t1 - t0;
        if (t1 >= r->deadline_ns)
            r->stop = true;
    }
    if (--r->jobs_live == 0)
        co_queue_wake_all(&r->jobs_done);
}

/* The run itself, as a coroutine so flush and close go through the loop too. */
static void bench_main(void *arg)
{
    struct bench_job *jobs = arg;
    struct bench_run *r = jobs[0].run;
    const struct bench_cfg *c = r->cfg;

    getrusage(RUSAGE_SELF, &r->ru_start);
    r->start_ns = now_ns();
    r->deadline_ns = c->seconds > 0 ? r->start_ns + (uint64_t)(c->seconds * 1e9) : UINT64_MAX;
    r->jobs_live = c->depth;
    for (unsigned i = 0; i < c->depth; i++)
        co_spawn(job_main, &jobs[i]);
    while (r->jobs_live)
        co_queue_wait(&r->jobs_done);
    r->end_ns = now_ns();
    getrusage(RUSAGE_SELF, &r->ru_end);

    /* Persist what was written before reporting, as a real client would. */
    if (!r->img->read_only)
        r->flush_err = img_flush(r->img);
    r->close_err = img_close(r->img);
    r->img = NULL;
    loop_stop(r->loop);
}

static void usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 bench [OPTIONS] IMAGE\n\n"
        "Drive the image engine directly (no frontend) and report IOPS, MiB/s and\n"
        "request latency (average, p50, p99).\n\n"
        "  --rw MODE          randread|randwrite|randrw|read|write|rw (default randread)\n"
        "  --bs SIZE          request size, a multiple of 512 (default 4k)\n"
        "  --depth N          requests in flight, 1..%u (default 32)\n"
        "  --seconds N        run time (default 10, or unlimited with --ios)\n"
        "  --ios N            stop after N requests in total\n"
        "  --size-limit SIZE  only touch the first SIZE bytes of the image\n"
        "  --format FMT       auto|raw|qcow2 (default auto)\n"
        "  --cache-size SIZE  qcow2 metadata cache size\n"
        "  --compress-threads N  threads that decompress compressed clusters (default: the CPUs)\n"
        "  --seed N           random seed (default 1)\n"
        "  --key-file FILE    passphrase of a LUKS-encrypted image (FILE's exact bytes)\n"
        "  --key-env VAR      the passphrase from the environment variable VAR\n"
        "  --json             print one JSON object instead of a line of text\n"
        "  -h, --help         show this help\n",
        BENCH_MAX_DEPTH);
}

static bool parse_u64(const char *s, uint64_t *out)
{
    char *end;
    if (!s || !*s || *s == '-')
        return false;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end)
        return false;
    *out = v;
    return true;
}

static int take_rw(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                   char **argv)
{
    for (size_t i = 0; i < sizeof(rw_modes) / sizeof(rw_modes[0]); i++)
        if (!strcmp(arg, rw_modes[i].name)) {
            *(const struct rw_mode **)o->dest = &rw_modes[i];
            return CLI_GO_ON;
        }
    cli_error("bench: unknown --rw mode '%s' (randread, randwrite, randrw, read, write, rw)", arg);
    return 2;
}

static int take_bs(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                   char **argv)
{
    int64_t sz = parse_size(arg);
    if (sz <= 0 || sz % 512 || (uint64_t)sz > BENCH_MAX_BS) {
        cli_error("bench: invalid --bs '%s' (a multiple of 512, at most 64M)", arg);
        return 2;
    }
    *(uint64_t *)o->dest = (uint64_t)sz;
    return CLI_GO_ON;
}

static int take_depth(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                      char **argv)
{
    uint64_t v;
    if (!parse_u64(arg, &v) || v < 1 || v > BENCH_MAX_DEPTH) {
        cli_error("bench: invalid --depth '%s' (1..%u)", arg, BENCH_MAX_DEPTH);
        return 2;
    }
    *(unsigned *)o->dest = (unsigned)v;
    return CLI_GO_ON;
}

static int take_seconds(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                        char **argv)
{
    char *end;
    errno = 0;
    double v = strtod(arg, &end);
    if (errno || end == arg || *end || !(v > 0) || v > 1e6) {
        cli_error("bench: invalid --seconds '%s' (a positive number)", arg);
        return 2;
    }
    *(double *)o->dest = v;
    return CLI_GO_ON;
}

/* --ios (at least 1) and --seed (any): o->min says which. */
static int take_u64(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                    char **argv)
{
    uint64_t v;
    if (!parse_u64(arg, &v) || v < o->min) {
        cli_error("bench: invalid --%s '%s' (a %s integer)", o->name, arg,
                  o->min ? "positive" : "non-negative");
        return 2;
    }
    *(uint64_t *)o->dest = v;
    return CLI_GO_ON;
}

/* Returns CLI_GO_ON to continue, else the exit code. */
static int parse_args(int argc, char **argv, struct bench_cfg *c)
{
    bool seconds_set = false;
    *c = (struct bench_cfg){ .mode = &rw_modes[0], .bs = 4096, .depth = 32, .seconds = 10,
                             .format = IMG_FMT_AUTO, .seed = 1 };
    const struct cli_opt opts[] = {
        { "rw", 0, CLI_CALL, .dest = &c->mode, .take = take_rw },
        { "bs", 0, CLI_CALL, .dest = &c->bs, .take = take_bs },
        { "depth", 0, CLI_CALL, .dest = &c->depth, .take = take_depth },
        { "seconds", 0, CLI_CALL, .dest = &c->seconds, .seen = &seconds_set, .take = take_seconds },
        { "ios", 0, CLI_CALL, .dest = &c->ios, .min = 1, .take = take_u64 },
        { "size-limit", 0, CLI_SIZE, .dest = &c->size_limit, .min = 1, .bad = "invalid --size-limit '%s'" },
        { "format", 0, CLI_FORMAT, .dest = &c->format, .bad = "unknown --format '%s' (auto, raw, qcow2)" },
        { "cache-size", 0, CLI_SIZE, .dest = &c->cache_size, .bad = "invalid --cache-size '%s' (" SIZE_RANGE ")" },
        CLI_OPT_COMPRESS_THREADS,
        { "seed", 0, CLI_CALL, .dest = &c->seed, .take = take_u64 },
        { "json", 0, CLI_FLAG, .dest = &c->json },
        { "key-file", 0, CLI_KEY_FILE, .dest = &c->key },
        { "key-env", 0, CLI_KEY_ENV, .dest = &c->key },
        { 0 },
    };
    const struct cli_cmd cmd = { "bench", usage, opts, .usage_exit = 2, .own_errors = true,
                                 .missing_arg = "a value", .operands = CLI_OPERAND_IMAGE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    c->path = argv[optind];
    /* --ios alone means "run until done"; both means "whichever comes first". */
    if (c->ios && !seconds_set)
        c->seconds = 0;
    return CLI_GO_ON;
}

static unsigned ring_entries(unsigned depth)
{
    unsigned n = 64;
    while (n < 2 * depth && n < 4096)
        n *= 2;
    return n;
}

static double tv_diff(struct timeval a, struct timeval b)
{
    return (double)(b.tv_sec - a.tv_sec) + (double)(b.tv_usec - a.tv_usec) / 1e6;
}

static void print_result(const struct bench_cfg *c, const struct bench_run *r, const char *fmt)
{
    uint64_t ios = r->read_ios + r->write_ios;
    double secs = (double)(r->end_ns - r->start_ns) / 1e9;
    if (secs <= 0)
        secs = 1e-9;
    double iops = (double)ios / secs;
    double mib_s = (double)ios * (double)c->bs / secs / (1024.0 * 1024.0);
    double lat_us = ios ? (double)r->lat_ns_total / (double)ios / 1000.0 : 0;
    double p50 = lat_percentile_us(r, 0.50), p99 = lat_percentile_us(r, 0.99);

    if (c->json) {
        printf("{\"rw\":\"%s\",\"format\":\"%s\",\"bs\":%" PRIu64 ",\"depth\":%u,"
               "\"seconds\":%.3f,\"ios\":%" PRIu64 ",\"iops\":%.1f,\"mib_s\":%.2f,"
               "\"read_ios\":%" PRIu64 ",\"write_ios\":%" PRIu64 ",\"errors\":%" PRIu64 ","
               "\"lat_avg_us\":%.1f,\"lat_p50_us\":%.1f,\"lat_p99_us\":%.1f,"
               "\"lat_max_us\":%.1f,\"cpu_user_s\":%.3f,\"cpu_sys_s\":%.3f}\n",
               c->mode->name, fmt, c->bs, c->depth, secs, ios, iops, mib_s,
               r->read_ios, r->write_ios, r->errors, lat_us, p50, p99,
               (double)r->lat_ns_max / 1000.0, tv_diff(r->ru_start.ru_utime, r->ru_end.ru_utime),
               tv_diff(r->ru_start.ru_stime, r->ru_end.ru_stime));
    } else {
        printf("%s bs=%" PRIu64 " depth=%u: %.0f IOPS, %.1f MiB/s, %.1f s, lat avg %.1f us,"
               " p50 %.1f us, p99 %.1f us", c->mode->name, c->bs, c->depth, iops, mib_s, secs,
               lat_us, p50, p99);
        if (c->mode->read_pct != 0 && c->mode->read_pct != 100)
            printf(" (read %.0f / write %.0f IOPS)", (double)r->read_ios / secs,
                   (double)r->write_ios / secs);
        if (r->errors)
            printf(", %" PRIu64 " errors", r->errors);
        printf(" [%s]\n", fmt);
    }
    fflush(stdout);
}

int cmd_bench(int argc, char **argv)
{
    struct bench_cfg cfg;
    int rc = parse_args(argc, argv, &cfg);
    if (rc != CLI_GO_ON) {
        cli_key_clear(&cfg.key);
        return rc;
    }

    struct loop *loop = loop_new(ring_entries(cfg.depth));
    if (!loop) {
        cli_error("bench: cannot create the io_uring loop: %s", strerror(errno));
        cli_key_clear(&cfg.key);
        return 1;
    }

    char err[256] = "";
    struct img_opts opts = {
        .format = cfg.format,
        .read_only = cfg.mode->read_pct == 100,   /* pure reads: never dirty the image */
        .cache_size = cfg.cache_size,
        .cache = FILE_CACHE_AUTO,
        .key = cfg.key.data, .key_len = cfg.key.len,
    };
    struct image *img = img_open(cfg.path, &opts, err, sizeof(err));
    cli_key_clear(&cfg.key);    /* only needed to open */
    if (!img) {
        cli_error("bench: %s", err[0] ? err : cfg.path);
        loop_free(loop);
        return 1;
    }
    char fmt[16];
    snprintf(fmt, sizeof(fmt), "%s", img_format_name(img));

    uint64_t range = img_size(img);
    if (cfg.size_limit && cfg.size_limit < range)
        range = cfg.size_limit;
    if (range < cfg.bs) {
        cli_error("bench: %s: tested range of %" PRIu64 " bytes is smaller than --bs %" PRIu64,
                  cfg.path, range, cfg.bs);
        img_close(img);
        loop_free(loop);
        return 2;
    }

    struct bench_run run = { .cfg = &cfg, .loop = loop, .img = img, .nblocks = range / cfg.bs,
                             .jobs_done = CO_QUEUE_INIT };
    struct bench_job *jobs = calloc(cfg.depth, sizeof(*jobs));
    if (!jobs) {
        cli_error("bench: out of memory");
        img_close(img);
        loop_free(loop);
        return 1;
    }
    uint64_t seed = cfg.seed;
    for (unsigned i = 0; i < cfg.depth; i++) {
        struct bench_job *j = &jobs[i];
        j->run = &run;
        do
            j->rng = splitmix64(&seed);
        while (!j->rng);
        j->next_block = i % run.nblocks;
        /* Fixed shares keep the offsets each job visits independent of timing. */
        if (cfg.ios)
            j->quota = cfg.ios / cfg.depth + (i < cfg.ios % cfg.depth);
        if (cfg.mode->read_pct > 0)
            j->rbuf = io_alloc(cfg.bs);
        if (cfg.mode->read_pct < 100) {
            j->wbuf = io_alloc(cfg.bs);
            fill_random(j->wbuf, cfg.bs, &j->rng);
        }
        if (j->rbuf)
            fill_random(j->rbuf, cfg.bs, &j->rng);
    }

    co_spawn(bench_main, jobs);
    int lrc = loop_run(loop);
    if (lrc < 0 || run.img) {
        cli_error("bench: event loop failed: %s", strerror(lrc < 0 ? -lrc : EIO));
        if (run.img)
            img_close(run.img);
        rc = 1;
    } else {
        print_result(&cfg, &run, fmt);
        rc = 0;
        if (run.first_err) {
            cli_error("bench: %" PRIu64 " I/O error(s); first: %s of %" PRIu64 " bytes at offset %"
                      PRIu64 ": %s", run.errors, run.first_err_write ? "write" : "read", cfg.bs,
                      run.first_err_off, strerror(-run.first_err));
            rc = 1;
        }
        if (run.flush_err < 0) {
            cli_error("bench: flush failed: %s", strerror(-run.flush_err));
            rc = 1;
        }
        if (run.close_err < 0) {
            cli_error("bench: close failed: %s", strerror(-run.close_err));
            rc = 1;
        }
    }

    for (unsigned i = 0; i < cfg.depth; i++) {
        if (jobs[i].rbuf)
            io_free(jobs[i].rbuf);
        if (jobs[i].wbuf)
            io_free(jobs[i].wbuf);
    }
    free(jobs);
    loop_free(loop);
    return rc;
}
