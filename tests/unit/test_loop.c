/* io_uring loop, I/O primitives in coroutine and sync mode, file layer. */
#include "io/coroutine.h"
#include "io/file.h"
#include "io/loop.h"
#include "unit.h"

#include <errno.h>
#include <fcntl.h>
#include <liburing.h>
#include <linux/magic.h>
#include <sys/socket.h>
#include <sys/vfs.h>
#include <unistd.h>

#define NBLK 64
#define BLK 4096

static char tmp_path[4096];
static struct file tf;

static void make_tmp(void)
{
    const char *dir = getenv("UQ_TMP");
    if (!dir || !*dir)
        dir = "/var/tmp";
    snprintf(tmp_path, sizeof(tmp_path), "%s/test_loop.XXXXXX", dir);
    int fd = mkstemp(tmp_path);
    if (fd < 0) {
        perror("mkstemp");
        exit(1);
    }
    close(fd);
}

static void fill(char *buf, unsigned blk, unsigned gen)
{
    for (unsigned i = 0; i < BLK; i++)
        buf[i] = (char)(blk * 7 + i * 13 + gen);
}

/* Each coroutine writes its block, then reads it back (vectored, in two
 * halves) and checks it. */
static int blk_errors;
static void fn_block(void *arg)
{
    unsigned blk = (unsigned)(uintptr_t)arg;
    char *w = io_alloc(BLK), *r = io_alloc(BLK);
    fill(w, blk, 1);
    if (file_pwrite(&tf, w, BLK, (uint64_t)blk * BLK, blk % 2) != BLK)
        blk_errors++;
    memset(r, 0, BLK);
    struct iovec iov[2] = { { r, BLK / 2 }, { r + BLK / 2, BLK / 2 } };
    if (file_preadv(&tf, iov, 2, (uint64_t)blk * BLK) != BLK || memcmp(w, r, BLK) != 0)
        blk_errors++;
    io_free(w);
    io_free(r);
}

static void coroutine_file_io(unsigned flags)
{
    char err[256];
    CHECK_EQ(file_open(&tf, tmp_path, true, FILE_CACHE_AUTO, err, sizeof(err)), 0);
    printf("#   %s opened %s\n", tmp_path, tf.direct ? "O_DIRECT" : "buffered");
    struct loop *l = loop_new_flags(32, flags);     /* fewer SQEs than coroutines */
    CHECK(l != NULL);
    CHECK(loop_current() == l);
    blk_errors = 0;
    for (unsigned i = 0; i < NBLK; i++)
        co_spawn(fn_block, (void *)(uintptr_t)i);
    CHECK_EQ(loop_run(l), 0);
    CHECK_EQ(blk_errors, 0);
    CHECK_EQ(co_live_count(), 0);
    CHECK_EQ(file_size(&tf), NBLK * BLK);
    loop_free(l);
    CHECK(loop_current() == NULL);
}

static void test_coroutine_file_io(void)
{
    coroutine_file_io(0);
}

/* The same with completions waited for in batches: every one arrives. */
static void test_coroutine_file_io_coalesce(void)
{
    file_close(&tf);
    coroutine_file_io(LOOP_COALESCE);
}

/* A file in memory (tmpfs): reads and writes run inline; the same
 * coroutine I/O reads back what it wrote. */
static void test_in_memory_file(void)
{
    char err[256], path[] = "/dev/shm/test_loop.XXXXXX";
    struct statfs sf;
    if (statfs("/dev/shm", &sf) < 0 || sf.f_type != TMPFS_MAGIC) {
        printf("#   skipped: /dev/shm is not a tmpfs here\n");
        return;
    }
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    close(fd);
    struct file saved = tf;
    CHECK_EQ(file_open(&tf, path, true, FILE_CACHE_AUTO, err, sizeof(err)), 0);
    CHECK(tf.in_memory);
    CHECK(statfs(tmp_path, &sf) == 0);
    CHECK_EQ(saved.in_memory, sf.f_type == TMPFS_MAGIC || sf.f_type == RAMFS_MAGIC);
    struct loop *l = loop_new(32);
    blk_errors = 0;
    for (unsigned i = 0; i < NBLK; i++)
        co_spawn(fn_block, (void *)(uintptr_t)i);
    CHECK_EQ(loop_run(l), 0);
    CHECK_EQ(blk_errors, 0);
    CHECK_EQ(file_size(&tf), NBLK * BLK);
    loop_free(l);
    char *w = io_alloc(BLK), *r = io_alloc(BLK);
    fill(w, 5, 1);
    CHECK_EQ(pread(tf.fd, r, BLK, 5 * BLK), BLK);
    CHECK(memcmp(w, r, BLK) == 0);
    io_free(w);
    io_free(r);
    file_close(&tf);
    unlink(path);
    tf = saved;
}

/* The same calls with no loop / outside a coroutine: plain syscalls. */
static void test_sync_file_io(void)
{
    blk_errors = 0;
    for (unsigned i = 0; i < NBLK; i++)
        fn_block((void *)(uintptr_t)i);
    CHECK_EQ(blk_errors, 0);
    /* A loop exists but we are not in a coroutine: still sync. */
    struct loop *l = loop_new(8);
    fn_block((void *)(uintptr_t)3);
    CHECK_EQ(blk_errors, 0);
    loop_free(l);
}

/* Read across EOF returns the bytes that exist; unaligned reads bounce. */
static ssize_t eof_res[3];
static void fn_eof(void *arg)
{
    char *buf = io_alloc(4 * BLK);
    eof_res[0] = file_pread(&tf, buf, 4 * BLK, (uint64_t)(NBLK - 1) * BLK);
    eof_res[1] = file_pread(&tf, buf, BLK, (uint64_t)NBLK * BLK);
    eof_res[2] = file_pread_any(&tf, buf + 1, 100, (uint64_t)NBLK * BLK - 30);
    io_free(buf);
}

static void test_short_read_eof(void)
{
    for (int mode = 0; mode < 2; mode++) {
        memset(eof_res, 0xff, sizeof(eof_res));
        struct loop *l = loop_new(8);
        if (mode == 0)
            fn_eof(NULL);
        else {
            co_spawn(fn_eof, NULL);
            CHECK_EQ(loop_run(l), 0);
        }
        loop_free(l);
        CHECK_EQ(eof_res[0], BLK);
        CHECK_EQ(eof_res[1], 0);
        CHECK_EQ(eof_res[2], 30);
    }
}

static int any_errors;
static void fn_unaligned(void *arg)
{
    char *buf = io_alloc(3 * BLK), ref[BLK];
    /* Bytes 100..5100 span blocks 0 and 1. */
    fill(ref, 0, 1);
    ssize_t n = file_pread_any(&tf, buf + 3, 5000, 100);
    if (n != 5000 || memcmp(buf + 3, ref + 100, BLK - 100) != 0)
        any_errors++;
    fill(ref, 1, 1);
    if (memcmp(buf + 3 + BLK - 100, ref, 5000 - (BLK - 100)) != 0)
        any_errors++;
    io_free(buf);
}

static void test_pread_any_unaligned(void)
{
    any_errors = 0;
    fn_unaligned(NULL);
    struct loop *l = loop_new(8);
    co_spawn(fn_unaligned, NULL);
    CHECK_EQ(loop_run(l), 0);
    loop_free(l);
    CHECK_EQ(any_errors, 0);
}

static ssize_t dsync_res[3];
static void fn_dsync(void *arg)
{
    char *buf = io_alloc(BLK), *r = io_alloc(BLK);
    fill(buf, 99, (unsigned)(uintptr_t)arg);
    dsync_res[0] = io_pwrite(tf.fd, buf, BLK, 5 * BLK, RWF_DSYNC);
    struct iovec iov = { buf, BLK };
    dsync_res[1] = io_pwritev(tf.fd, &iov, 1, 6 * BLK, RWF_DSYNC);
    dsync_res[2] = io_pread(tf.fd, r, BLK, 6 * BLK) == BLK && memcmp(buf, r, BLK) == 0;
    io_free(buf);
    io_free(r);
}

static void test_dsync_write(void)
{
    fn_dsync((void *)1);
    CHECK_EQ(dsync_res[0], BLK);
    CHECK_EQ(dsync_res[1], BLK);
    CHECK_EQ(dsync_res[2], 1);
    memset(dsync_res, 0, sizeof(dsync_res));
    struct loop *l = loop_new(8);
    co_spawn(fn_dsync, (void *)2);
    CHECK_EQ(loop_run(l), 0);
    loop_free(l);
    CHECK_EQ(dsync_res[0], BLK);
    CHECK_EQ(dsync_res[1], BLK);
    CHECK_EQ(dsync_res[2], 1);
    CHECK_EQ(file_sync(&tf), 0);
}

static int misc_res[4];
static void fn_misc(void *arg)
{
    misc_res[0] = io_fdatasync(tf.fd);
    misc_res[1] = file_zero_range(&tf, 2 * BLK, BLK);
    misc_res[2] = file_punch(&tf, 3 * BLK, BLK);
    char *buf = io_alloc(2 * BLK);
    misc_res[3] = io_pread(tf.fd, buf, 2 * BLK, 2 * BLK) == 2 * BLK;
    for (int i = 0; i < 2 * BLK; i++)
        if (buf[i])
            misc_res[3] = 0;
    io_free(buf);
}

static void test_fallocate_ops(void)
{
    struct loop *l = loop_new(8);
    co_spawn(fn_misc, NULL);
    CHECK_EQ(loop_run(l), 0);
    loop_free(l);
    CHECK_EQ(misc_res[0], 0);
    CHECK(misc_res[1] == 0 || misc_res[1] == -EOPNOTSUPP);
    CHECK(misc_res[2] == 0 || misc_res[2] == -EOPNOTSUPP);
    if (misc_res[1] == 0 && misc_res[2] == 0)
        CHECK_EQ(misc_res[3], 1);
    CHECK_EQ(file_size(&tf), NBLK * BLK);   /* punch keeps the size */
}

static void fn_finish(void *arg) { (*(int *)arg)++; }

static void test_run_returns_when_done(void)
{
    int n = 0;
    struct loop *l = loop_new(8);
    CHECK_EQ(loop_run(l), 0);           /* nothing to do */
    for (int i = 0; i < 10; i++)
        co_spawn(fn_finish, &n);
    CHECK_EQ(loop_run(l), 0);
    CHECK_EQ(n, 10);
    loop_free(l);
}

static struct co *parked;
static void fn_park(void *arg)
{
    parked = co_self();
    co_yield();
    *(int *)arg = 1;
}

static void test_deadlock_detected(void)
{
    int finished = 0;
    struct loop *l = loop_new(8);
    co_spawn(fn_park, &finished);
    CHECK_EQ(loop_run(l), -EDEADLK);
    CHECK_EQ(co_live_count(), 1);
    co_wake(parked);                    /* clean up */
    CHECK_EQ(loop_run(l), 0);
    CHECK_EQ(finished, 1);
    CHECK_EQ(co_live_count(), 0);
    loop_free(l);
}

static void nop_prep(struct io_uring_sqe *sqe, void *arg) { io_uring_prep_nop(sqe); }
static int stop_res;
static void fn_stop(void *arg)
{
    stop_res = io_submit_wait(nop_prep, NULL);
    loop_stop(loop_current());
}

static void test_submit_wait_and_stop(void)
{
    CHECK_EQ(io_submit_wait(nop_prep, NULL), -EINVAL);
    struct loop *l = loop_new(8);
    stop_res = -1;
    co_spawn(fn_stop, NULL);
    CHECK(!loop_stopping(l));
    CHECK_EQ(loop_run(l), 0);
    CHECK(loop_stopping(l));
    CHECK_EQ(stop_res, 0);
    loop_free(l);
}

/* Two coroutines exchange messages over a socketpair. */
static int sv[2];
static ssize_t sock_res[6];
static char big_out[256 * 1024], big_in[256 * 1024];

static void fn_server(void *arg)
{
    char req[16];
    sock_res[0] = io_recv_all(sv[1], req, sizeof(req));
    sock_res[1] = io_send_all(sv[1], big_out, sizeof(big_out));
    sock_res[2] = io_recv_all(sv[1], req, sizeof(req));     /* peer closed: 0 */
}

static void fn_client(void *arg)
{
    sock_res[3] = io_send_all(sv[0], "0123456789abcdef", 16);
    sock_res[4] = io_recv_all(sv[0], big_in, sizeof(big_in));
    close(sv[0]);
}

static void test_socket_exchange(void)
{
    for (size_t i = 0; i < sizeof(big_out); i++)
        big_out[i] = (char)(i * 31);
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    struct loop *l = loop_new(8);
    co_spawn(fn_server, NULL);
    co_spawn(fn_client, NULL);
    CHECK_EQ(loop_run(l), 0);
    CHECK_EQ(sock_res[0], 16);
    CHECK_EQ(sock_res[1], sizeof(big_out));
    CHECK_EQ(sock_res[2], 0);
    CHECK_EQ(sock_res[3], 16);
    CHECK_EQ(sock_res[4], sizeof(big_in));
    CHECK(memcmp(big_in, big_out, sizeof(big_in)) == 0);

    /* Peer closes mid-message (sync mode this time). */
    int p[2];
    char buf[32];
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, p), 0);
    CHECK_EQ(io_send_all(p[0], "half", 4), 4);
    close(p[0]);
    CHECK_EQ(io_recv_all(p[1], buf, sizeof(buf)), -ECONNRESET);
    CHECK(io_send_all(p[1], "x", 1) == -EPIPE);
    close(p[1]);
    close(sv[1]);
    loop_free(l);
}

/* Reads and writes whose buffer lies inside the registered region go out
 * as READ_FIXED/WRITE_FIXED; one that runs past its end takes the plain
 * path.  Both move the right bytes.  loop_wait_file_turn parks only while
 * enough file I/O is in flight, and the loop's next wakeup resumes it. */
#define REG_BLKS 8
static struct file rf;
static char *reg;
static int reg_errors, turn_waited = -1, turn_idle = -1;

static void fn_reg_block(void *arg)
{
    unsigned blk = (unsigned)(uintptr_t)arg;
    char *w = reg + (size_t)blk * BLK;
    fill(w, blk, 3);
    if (file_pwrite(&rf, w, BLK, (uint64_t)blk * BLK, 0) != BLK)
        reg_errors++;
    memset(w, 0, BLK);
    if (file_pread(&rf, w, BLK, (uint64_t)blk * BLK) != BLK)
        reg_errors++;
    char want[BLK];
    fill(want, blk, 3);
    if (memcmp(w, want, BLK) != 0)
        reg_errors++;
}

static void fn_turn(void *arg)
{
    turn_waited = loop_wait_file_turn(REG_BLKS);
}

static void fn_turn_idle(void *arg)
{
    turn_idle = loop_wait_file_turn(1);
}

static void test_registered_buffer(void)
{
    char err[256];
    CHECK_EQ(file_open(&rf, tmp_path, true, FILE_CACHE_AUTO, err, sizeof(err)), 0);
    struct loop *l = loop_new_flags(32, LOOP_COALESCE);
    CHECK(l != NULL);
    reg = io_alloc((REG_BLKS + 1) * BLK);   /* one block more than registered */
    int r = loop_register_buffer(l, reg, REG_BLKS * BLK);
    if (r < 0) {
        printf("#   not tested: registering a buffer: %s\n", strerror(-r));
    } else {
        CHECK_EQ(loop_register_buffer(l, reg, BLK), -EBUSY);
        reg_errors = 0;
        for (unsigned i = 0; i <= REG_BLKS; i++)   /* the last one is not inside */
            co_spawn(fn_reg_block, (void *)(uintptr_t)i);
        co_spawn(fn_turn, NULL);
        CHECK_EQ(loop_run(l), 0);
        CHECK_EQ(reg_errors, 0);
        CHECK_EQ(turn_waited, 1);
        loop_unregister_buffer(l);
        co_spawn(fn_turn_idle, NULL);           /* nothing in flight: no wait */
        CHECK_EQ(loop_run(l), 0);
        CHECK_EQ(turn_idle, 0);
    }
    io_free(reg);
    loop_free(l);
    file_close(&rf);
}

static void test_open_errors(void)
{
    struct file f;
    char err[256];
    CHECK_EQ(file_open(&f, "/nonexistent/x.qcow2", false, FILE_CACHE_AUTO, err, sizeof(err)), -ENOENT);
    CHECK(strstr(err, "'/nonexistent/x.qcow2'") != NULL);
    CHECK(strstr(err, "No such file or directory") != NULL);
    CHECK(file_open(&f, "/tmp", false, FILE_CACHE_AUTO, err, sizeof(err)) < 0);
    CHECK(strstr(err, "'/tmp'") != NULL);
    /* Buffered never uses O_DIRECT; direct either works or fails clearly. */
    CHECK_EQ(file_open(&f, tmp_path, false, FILE_CACHE_BUFFERED, err, sizeof(err)), 0);
    CHECK(!f.direct);
    CHECK(!f.writable);
    CHECK((fcntl(f.fd, F_GETFD) & FD_CLOEXEC) != 0);
    file_close(&f);
    int ret = file_open(&f, tmp_path, true, FILE_CACHE_DIRECT, err, sizeof(err));
    if (ret == 0) {
        CHECK(f.direct);
        CHECK((fcntl(f.fd, F_GETFL) & O_DIRECT) != 0);
        file_close(&f);
    } else {
        CHECK(strstr(err, "O_DIRECT") != NULL);
    }
}

int main(void)
{
    make_tmp();
    RUN_TEST(test_coroutine_file_io);
    RUN_TEST(test_coroutine_file_io_coalesce);
    RUN_TEST(test_sync_file_io);
    RUN_TEST(test_in_memory_file);
    RUN_TEST(test_short_read_eof);
    RUN_TEST(test_pread_any_unaligned);
    RUN_TEST(test_dsync_write);
    RUN_TEST(test_fallocate_ops);
    RUN_TEST(test_run_returns_when_done);
    RUN_TEST(test_deadlock_detected);
    RUN_TEST(test_submit_wait_and_stop);
    RUN_TEST(test_socket_exchange);
    RUN_TEST(test_open_errors);
    RUN_TEST(test_registered_buffer);
    file_close(&tf);
    unlink(tmp_path);
    UNIT_EXIT();
}
