/* Shared by the engine unit tests (test_cache, test_refcount, test_cluster):
 * real qcow2 images in a scratch directory (tmpfs when there is one, so
 * I/O runs inline and nothing waits for a device), the engine driven in
 * coroutines on this thread's loop, and file hooks that fail an operation
 * or park it until the test lets it go (deterministic interleavings). */
#ifndef UQ_UNIT_ENGINE_H
#define UQ_UNIT_ENGINE_H

#include <dirent.h>
#include <fcntl.h>
#include <linux/magic.h>
#include <sys/stat.h>
#include <sys/vfs.h>
#include <unistd.h>

#include "img/image.h"
#include "io/coroutine.h"
#include "io/file.h"
#include "io/loop.h"
#include "qcow2/internal.h"
#include "tools/tools.h"
#include "unit.h"

static char fx_dir[1024];
static char fx_pathbuf[1200];
static struct loop *fx_loop;

static inline void fx_setup(const char *name)
{
    struct statfs sf;
    const char *base = "/dev/shm";
    if (statfs(base, &sf) < 0 || sf.f_type != TMPFS_MAGIC || access(base, W_OK) < 0) {
        base = getenv("UQ_TMP");
        if (!base || !*base)
            base = "/tmp";
    }
    snprintf(fx_dir, sizeof(fx_dir), "%s/%s.XXXXXX", base, name);
    if (!mkdtemp(fx_dir)) {
        perror("mkdtemp");
        exit(1);
    }
    fx_loop = loop_new(64);
    if (!fx_loop) {
        fprintf(stderr, "loop_new failed\n");
        exit(1);
    }
}

static inline void fx_teardown(void)
{
    DIR *d = opendir(fx_dir);
    struct dirent *de;
    while (d && (de = readdir(d))) {
        if (de->d_name[0] == '.')
            continue;
        snprintf(fx_pathbuf, sizeof(fx_pathbuf), "%s/%s", fx_dir, de->d_name);
        unlink(fx_pathbuf);
    }
    if (d)
        closedir(d);
    rmdir(fx_dir);
    loop_free(fx_loop);
    co_pool_release();
}

static inline const char *fx_path(const char *file)
{
    snprintf(fx_pathbuf, sizeof(fx_pathbuf), "%s/%s", fx_dir, file);
    return fx_pathbuf;
}

/* A qcow2 image of `size` bytes; cluster_size / refcount_bits 0 = default. */
static inline int fx_create(const char *file, uint64_t size, uint32_t cluster_size, uint32_t refcount_bits,
                     bool extl2, const char *backing, const char *backing_fmt)
{
    struct create_opts o;
    char err[256];
    create_opts_init(&o);
    o.size = size;
    o.size_set = true;
    if (cluster_size)
        o.cluster_size = cluster_size;
    if (refcount_bits)
        o.refcount_bits = refcount_bits;
    o.extended_l2 = extl2;
    o.backing_file = backing;
    o.backing_fmt = backing_fmt;
    int r = img_create(fx_path(file), &o, err, sizeof(err));
    if (r < 0)
        printf("#   img_create %s: %s\n", file, err);
    return r;
}

static inline struct image *fx_open_opts(const char *file, bool unmap, bool read_only, const char *snapshot)
{
    struct img_opts o = { .format = IMG_FMT_QCOW2, .read_only = read_only, .snapshot = snapshot,
                          .discard = unmap ? IMG_DISCARD_UNMAP : IMG_DISCARD_IGNORE };
    char err[512];
    struct image *img = img_open(fx_path(file), &o, err, sizeof(err));
    if (!img)
        printf("#   img_open %s: %s\n", file, err);
    return img;
}

static inline struct qcow2 *fx_open(const char *file)
{
    struct image *img = fx_open_opts(file, false, false, NULL);
    return img ? to_qcow2(img) : NULL;
}

/* Write bytes straight into a file (outside the engine). */
static inline void fx_poke(const char *file, uint64_t off, const void *buf, size_t len)
{
    int fd = open(fx_path(file), O_WRONLY | O_CREAT, 0644);
    if (fd < 0 || pwrite(fd, buf, len, (off_t)off) != (ssize_t)len) {
        perror("fx_poke");
        exit(1);
    }
    close(fd);
}

/* Read bytes straight from an image's file (what is really on "disk"). */
static inline void fx_peek(struct qcow2 *q, uint64_t off, void *buf, size_t len)
{
    memset(buf, 0, len);
    if (pread(q->file.fd, buf, len, (off_t)off) < 0)
        perror("fx_peek");
}

static inline void fx_fill(uint8_t *buf, size_t len, unsigned seed)
{
    for (size_t i = 0; i < len; i++)
        buf[i] = (uint8_t)(seed * 31 + i * 7 + (i >> 9));
}

/* ---- coroutines ------------------------------------------------------------ */
/* Run fn(arg) in a coroutine (with any it spawns) until all have finished. */
static inline int fx_run(co_fn fn, void *arg)
{
    co_spawn(fn, arg);
    int r = loop_run(fx_loop);
    if (r < 0)
        printf("#   loop_run: %d\n", r);
    return r;
}

/* From a coroutine: let every other ready coroutine run until it parks. */
static inline void fx_settle(void)
{
    for (int i = 0; i < 4; i++) {
        co_wake(co_self());
        co_yield();
    }
}

/* ---- file hooks -------------------------------------------------------------- */
struct fx_rule {
    bool on;
    enum file_op op;
    uint64_t off, len;      /* matches operations overlapping [off, off+len) */
    int err;                /* fail a match with this (0: run it) */
    int skip;               /* let this many matches through first */
    bool gate;              /* park a match (in a coroutine) until fx_release */
    bool released;
    struct co_queue q;
    unsigned hits, parked;
};
#define FX_RULES 4
static struct fx_rule fx_rules[FX_RULES];
static unsigned fx_ops[5];              /* operations seen, by enum file_op */

static inline int fx_before(void *ctx, struct file *f, enum file_op op, uint64_t off, uint64_t len,
                     const struct iovec *iov, int iovcnt, unsigned flags)
{
    fx_ops[op]++;
    for (int i = 0; i < FX_RULES; i++) {
        struct fx_rule *r = &fx_rules[i];
        bool overlap = op == FILE_OP_SYNC || (off < r->off + r->len && r->off < off + len);
        if (!r->on || r->op != op || !overlap)
            continue;
        if (r->skip > 0) {
            r->skip--;
            continue;
        }
        r->hits++;
        if (r->gate && co_in_coroutine()) {
            r->parked++;
            while (!r->released)
                co_queue_wait(&r->q);
            r->parked--;
        }
        if (r->err)
            return r->err;
    }
    return 0;
}

static const struct file_hooks fx_hooks = { .before = fx_before };

/* Install a rule (and the hooks); returns it for the test to inspect. */
static inline struct fx_rule *fx_rule(enum file_op op, uint64_t off, uint64_t len, int err, bool gate)
{
    for (int i = 0; i < FX_RULES; i++) {
        if (fx_rules[i].on)
            continue;
        fx_rules[i] = (struct fx_rule){ .on = true, .op = op, .off = off, .len = len, .err = err,
                                        .gate = gate, .q = CO_QUEUE_INIT };
        file_set_hooks(&fx_hooks);
        return &fx_rules[i];
    }
    abort();
}

static inline void fx_release(struct fx_rule *r)
{
    r->released = true;
    co_queue_wake_all(&r->q);
}

static inline void fx_rules_clear(void)
{
    memset(fx_rules, 0, sizeof(fx_rules));
    memset(fx_ops, 0, sizeof(fx_ops));
    file_set_hooks(NULL);
}

/* ---- engine state read back --------------------------------------------------- */
static inline uint64_t fx_rc(struct qcow2 *q, uint64_t host_off)
{
    uint64_t rc = UINT64_MAX;
    if (qcow2_rc_get(q, host_off >> cl_bits(q), &rc) < 0)
        printf("#   qcow2_rc_get(0x%llx) failed\n", (unsigned long long)host_off);
    return rc;
}

/* The L2 entry (and extended-L2 bitmap) mapping guest offset off, read
 * through the cache; 0 with no L2 table. */
static inline uint64_t fx_l2e(struct qcow2 *q, uint64_t off, uint64_t *bm)
{
    uint64_t l1i = off >> (cl_bits(q) + q->h.l2_bits);
    uint64_t l2i = (off >> cl_bits(q)) & (q->h.l2_entries - 1);
    uint64_t t = q->l1[l1i] & L1E_OFFSET_MASK;
    if (bm)
        *bm = 0;
    if (!t)
        return 0;
    uint64_t byte = t + l2i * q->h.l2_entry_size;
    uint64_t soff = byte & ~(uint64_t)(q->l2c.slice_size - 1);
    struct mslice *s;
    if (qcow2_cache_get(&q->l2c, soff, &s) < 0) {
        printf("#   L2 slice 0x%llx unreadable\n", (unsigned long long)soff);
        return UINT64_MAX;
    }
    uint64_t e = be64_load(s->data + (byte - soff));
    if (bm && q->extl2)
        *bm = be64_load(s->data + (byte - soff) + 8);
    qcow2_cache_put(&q->l2c, s);
    return e;
}

/* The project's own checker finds FILE clean: no corruption, leak or error. */
static inline bool fx_check_clean(const char *file)
{
    struct check_opts o = { 0 };
    struct check_result res;
    char err[256];
    memset(&res, 0, sizeof(res));
    int r = img_check(fx_path(file), IMG_FMT_QCOW2, &o, &res, err, sizeof(err));
    if (r < 0 || res.corruptions || res.leaks || res.check_errors) {
        printf("#   check %s: r=%d corruptions=%llu leaks=%llu errors=%llu %s\n", file, r,
               (unsigned long long)res.corruptions, (unsigned long long)res.leaks,
               (unsigned long long)res.check_errors, r < 0 ? err : "");
        return false;
    }
    return true;
}

#endif
