/* One ublk device's life: set-up, serving, teardown (see server.h). */
#include "util/json.h"
#include "io/log.h"
#include "ublk/server.h"
#include "io/imagelock.h"
#include "ublk/ctl_socket.h"
#include "ublk/inuse.h"
#include "ublk/kernel_ctrl.h"
#include "ublk/queue.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

#ifndef PR_SET_IO_FLUSHER
#define PR_SET_IO_FLUSHER 57
#endif
#ifndef MCL_ONFAULT
#define MCL_ONFAULT 4
#endif


static bool notify(int fd, const char *what, uint32_t id)
{
    if (fd < 0)
        return true;
    char line[32];
    int n = snprintf(line, sizeof(line), "%s %u\n", what, id);
    ssize_t w;
    do
        w = write(fd, line, (size_t)n);
    while (w < 0 && errno == EINTR);
    return w == n;
}

/* Memory reclaim may wait for writeback through this very device: the
 * daemon must neither be throttled as a writer nor have its pages reclaimed. */
static void protect_from_reclaim(void)
{
    if (geteuid() != 0) {
        /* Both need privileges (CAP_SYS_RESOURCE, a large RLIMIT_MEMLOCK). */
        uq_info("not root: memory is not locked and reclaim may wait on this daemon");
        return;
    }
    if (prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) < 0 && errno != EINVAL)
        uq_warn("PR_SET_IO_FLUSHER failed: %s", strerror(errno));
    /* ONFAULT: lock pages as they are touched, not every reserved stack. */
    if (mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) < 0 &&
        (errno != EINVAL || mlockall(MCL_CURRENT | MCL_FUTURE) < 0))
        uq_warn("mlockall failed: %s (memory pressure could stall the device)",
            strerror(errno));
}

static void log_to_file(uint32_t id)
{
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/ublk%u.log", UBLK_STATE_DIR, id);
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    int null = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        if (fd < 0)
            fd = null;
    }
    if (fd >= 0) {
        fflush(stdout);
        fflush(stderr);
        dup2(fd, STDOUT_FILENO);
        dup2(fd, STDERR_FILENO);
    }
    if (fd >= 0 && fd != null)
        close(fd);
    if (null >= 0)
        close(null);
}

/* No I/O scheduler on the device, as the kernel gives loop and NVMe devices:
 * requests reach the engine in the order they were issued and the host file
 * system below schedules the real I/O; mq-deadline in between only adds a
 * lock and a sort per request (measured: write IOPS down by a third). */
static void use_no_scheduler(uint32_t id)
{
    char path[96];
    snprintf(path, sizeof(path), "/sys/block/ublkb%u/queue/scheduler", id);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0)
        return;     /* no sysfs here, or not root: keep the kernel's default */
    if (write(fd, "none", 4) < 0)
        uq_warn("cannot set the I/O scheduler of ublkb%u to none: %s", id, strerror(errno));
    close(fd);
}

/* What the control socket's requests see of the running device. */
struct served {
    uint32_t id;
    const struct ublk_server_opts *o;
    struct image *img;
    struct ublk_queues *qs;
    struct ublk_ctrl *ctrl;
    bool read_only;
    uint64_t dev_flags;         /* UBLK_F_* the device was given */
    struct timespec started;
    /* restart: set (before anything irreversible) while this daemon hands
     * the device over; handed_fd wakes the main thread once it has. */
    atomic_bool *handing_over;
    int handed_fd;
};

/* "stats": the counters as one JSON object (see ublk-qcow2 stats). */
static void answer_stats(struct served *sv, char *reply, size_t len)
{
    struct ublk_io_stats io;
    struct img_stats is;
    struct timespec now;
    ublk_queues_stats(sv->qs, &io);
    img_get_stats(sv->img, &is);
    clock_gettime(CLOCK_MONOTONIC, &now);
    double up = (double)(now.tv_sec - sv->started.tv_sec) + (now.tv_nsec - sv->started.tv_nsec) / 1e9;
    FILE *f = fmemopen(reply, len, "w");
    if (!f) {
        snprintf(reply, len, "{\"error\": \"out of memory\"}");
        return;
    }
    fprintf(f, "{\"id\": %u, \"pid\": %d, \"image\": ", sv->id, (int)getpid());
    json_put_string(f, sv->o->image);
    fprintf(f, ", \"format\": ");
    json_put_string(f, img_format_name(sv->img));
    /* Which path serves the device: the ublk features it was granted. */
    fprintf(f, ", \"zero_copy\": %s, \"batch_io\": %s", ublk_uses_zero_copy(sv->dev_flags) ? "true" : "false",
            ublk_uses_batch_io(sv->dev_flags) ? "true" : "false");
    fprintf(f, ", \"uptime_s\": %.3f, \"reads\": %llu, \"writes\": %llu, \"read_bytes\": %llu, "
               "\"write_bytes\": %llu, \"flushes\": %llu, \"discards\": %llu, \"write_zeroes\": %llu, "
               "\"errors\": %llu, \"in_flight\": %llu, \"cache_hits\": %llu, \"cache_misses\": %llu, "
               "\"clusters_allocated\": %llu, \"zcache_hits\": %llu, \"zcache_misses\": %llu, "
               "\"clusters_decompressed\": %llu",
            up, (unsigned long long)io.reads, (unsigned long long)io.writes,
            (unsigned long long)io.read_bytes, (unsigned long long)io.write_bytes,
            (unsigned long long)io.flushes, (unsigned long long)io.discards,
            (unsigned long long)io.write_zeroes, (unsigned long long)io.errors,
            (unsigned long long)io.in_flight, (unsigned long long)is.cache_hits,
            (unsigned long long)is.cache_misses, (unsigned long long)is.clusters_allocated,
            (unsigned long long)is.zcache_hits, (unsigned long long)is.zcache_misses,
            (unsigned long long)is.clusters_decompressed);
    fprintf(f, ", \"zero_copy_reads\": %llu, \"zero_copy_writes\": %llu, \"copied_reads\": %llu, "
               "\"copied_writes\": %llu",
            (unsigned long long)io.zero_copy_reads, (unsigned long long)io.zero_copy_writes,
            (unsigned long long)io.copied_reads, (unsigned long long)io.copied_writes);
    /* The ublk features the device uses (granted at ADD_DEV). */
    fprintf(f, ", \"features\": ");
    ublk_put_feature_names(f, sv->dev_flags);
    fprintf(f, "}");
    bool ok = !ferror(f) && ftell(f) < (long)len - 1;
    fclose(f);
    if (!ok)
        snprintf(reply, len, "{\"error\": \"reply too long\"}");
}

/* A reply {"error": MSG}. */
static void reply_error(char *reply, size_t len, const char *msg)
{
    FILE *f = fmemopen(reply, len, "w");
    if (!f) {
        snprintf(reply, len, "{\"error\": \"out of memory\"}");
        return;
    }
    fprintf(f, "{\"error\": ");
    json_put_string(f, msg);
    fprintf(f, "}");
    bool ok = !ferror(f) && ftell(f) < (long)len - 1;
    fclose(f);
    if (!ok)
        snprintf(reply, len, "{\"error\": \"reply too long\"}");
}

/* The exclusive operations of the control socket, run on the engine
 * thread with the device quiesced (ublk_queues_exclusive). */
struct excl_op {
    struct image *img;
    const char *name;           /* snapshot create */
    uint64_t size;              /* resize */
    char id[64];
    char err[700];
};

static int run_snapshot_create(void *arg)
{
    struct excl_op *x = arg;
    return img_snapshot_create(x->img, x->name, x->id, sizeof(x->id), x->err, sizeof(x->err));
}

static int run_resize(void *arg)
{
    struct excl_op *x = arg;
    return img_resize(x->img, x->size, false, x->err, sizeof(x->err));
}

/* "snapshot-create NAME": the device's content at this instant (every
 * request completed before it, none after) as internal snapshot NAME. */
static void answer_snapshot(struct served *sv, const char *name, char *reply, size_t len)
{
    if (sv->read_only) {
        reply_error(reply, len, "the device is read-only: its image cannot take a snapshot");
        return;
    }
    struct excl_op x;
    memset(&x, 0, sizeof(x));
    x.img = sv->img;
    x.name = name;
    int r = ublk_queues_exclusive(sv->qs, run_snapshot_create, &x);
    if (r < 0) {
        reply_error(reply, len, x.err[0] ? x.err : strerror(-r));
        return;
    }
    uq_info("snapshot '%s' (ID %s) taken", name, x.id);
    FILE *f = fmemopen(reply, len, "w");
    if (!f) {
        snprintf(reply, len, "{\"error\": \"out of memory\"}");
        return;
    }
    fprintf(f, "{\"id\": ");
    json_put_string(f, x.id);
    fprintf(f, ", \"name\": ");
    json_put_string(f, name);
    fprintf(f, "}");
    fclose(f);
}

/* "resize [+]BYTES": grow the image, then the device (UPDATE_SIZE). */
static void answer_resize(struct served *sv, const char *arg, char *reply, size_t len)
{
    char msg[800];
    uint64_t cur = img_size(sv->img);
    bool rel = *arg == '+';
    int64_t v = parse_size(arg + rel);
    if (v < 0) {
        reply_error(reply, len, "invalid size (0 to 8 EiB - 1 bytes, a number with an optional k, M, G, T, P or E suffix)");
        return;
    }
    uint64_t size = rel ? cur + (uint64_t)v : (uint64_t)v;
    if (sv->read_only) {
        reply_error(reply, len, "the device is read-only: its image cannot be resized");
        return;
    }
    if (size < cur) {
        snprintf(msg, sizeof(msg), "a live device can only grow (it has %llu bytes); shrink the image "
                 "offline with 'ublk-qcow2 resize --shrink'", (unsigned long long)cur);
        reply_error(reply, len, msg);
        return;
    }
    uint64_t features = 0;
    ublk_ctrl_features(sv->ctrl, &features);
    if (!(features & UBLK_F_UPDATE_SIZE)) {
        struct utsname u;
        snprintf(msg, sizeof(msg), "this kernel (Linux %s) cannot change the size of a live ublk device: "
                 "that needs UBLK_F_UPDATE_SIZE, in Linux 6.16 or newer; the image is unchanged",
                 uname(&u) == 0 ? u.release : "?");
        reply_error(reply, len, msg);
        return;
    }
    if (size > cur) {
        static struct excl_op x;
        memset(&x, 0, sizeof(x));
        x.img = sv->img;
        x.size = size;
        int r = ublk_queues_exclusive(sv->qs, run_resize, &x);
        if (r < 0) {
            reply_error(reply, len, x.err[0] ? x.err : strerror(-r));
            return;
        }
        r = ublk_ctrl_update_size(sv->ctrl, sv->id, img_size(sv->img) >> 9);
        if (r < 0) {
            snprintf(msg, sizeof(msg), "the image now has %llu bytes, but the kernel refused the new "
                     "device size: %s", (unsigned long long)img_size(sv->img), strerror(-r));
            reply_error(reply, len, msg);
            return;
        }
        uq_info("resized to %llu bytes", (unsigned long long)img_size(sv->img));
    }
    snprintf(reply, len, "{\"size\": %llu}", (unsigned long long)img_size(sv->img));
}

/* "restart": stop taking requests, finish those in flight, flush, and let
 * the main thread exit without STOP_DEV/DEL_DEV, leaving the device to a
 * new daemon (`ublk-qcow2 restart` starts it as `recover` does).  The
 * reply comes once the image is flushed and the exit is under way. */
static void answer_restart(struct served *sv, char *reply, size_t len)
{
    char msg[600];
    if (!(sv->dev_flags & UBLK_F_USER_RECOVERY)) {
        snprintf(msg, sizeof(msg), "ublk device %u was not added with --recovery: without a daemon it "
                 "would be removed, not kept for the next one; to restart it live, 'ublk-qcow2 del -n %u' "
                 "and add it again with 'ublk-qcow2 add --recovery'; nothing was changed", sv->id, sv->id);
        reply_error(reply, len, msg);
        return;
    }
    if (sv->handed_fd < 0) {
        reply_error(reply, len, "this daemon cannot hand over (no eventfd); nothing was changed");
        return;
    }
    /* Set first: on the QUIESCE path every tag may be aborted and the
     * engine end on its own, which must not read as a STOP_DEV (delete). */
    if (atomic_exchange(sv->handing_over, true)) {
        reply_error(reply, len, "a restart of this device is already under way");
        return;
    }
    bool quiesced = false;
    /* Not with batch I/O: there QUIESCE_DEV aborts the queues' fetches the
     * way STOP_DEV does (Linux 7.2), and the requests that come while no
     * daemon serves the device fail with EIO instead of waiting.  The
     * fallback below leaves them waiting (the device QUIESCED at our exit). */
    if ((sv->dev_flags & UBLK_F_QUIESCE) && !(sv->dev_flags & UBLK_F_BATCH_IO)) {
        /* The kernel stops handing us requests (new ones wait in its
         * requeue list for the next daemon) and aborts our idle fetches,
         * while the engine, its gate still open, finishes what it has:
         * QUIESCE_DEV waits for an idle tag per queue, which a closed
         * gate could withhold. */
        int r = ublk_ctrl_quiesce_dev(sv->ctrl, sv->id, 30000);
        if (r < 0)
            uq_warn("QUIESCE_DEV failed (%s); handing over without it", strerror(-r));
        quiesced = r >= 0;
    }
    /* Gate before drain before flush: whatever the kernel still hands us is
     * held unexecuted (reissued to the next daemon: USER_RECOVERY_REISSUE),
     * what was executing completes and is committed, then the flush makes
     * every acknowledged write durable before we let go of the image. */
    int r = ublk_queues_hand_over(sv->qs);
    if (r == -ESHUTDOWN && quiesced) {
        r = 0;      /* every tag aborted after its last commit: drained; img_close flushes */
    } else if (r < 0 && !quiesced) {
        atomic_store(sv->handing_over, false);
        snprintf(msg, sizeof(msg), "%s; the daemon keeps serving ublk device %u",
                 r == -ESHUTDOWN ? "the device is being stopped" : strerror(-r), sv->id);
        reply_error(reply, len, msg);
        return;
    } else if (r < 0) {
        /* Quiesced: no more requests can come to us, so the next daemon
         * must take over anyway; img_close tries the flush again. */
        uq_error("flush before the hand-over failed: %s", strerror(-r));
    }
    uq_info("handing ublk device %u over to a new daemon%s", sv->id, quiesced ? " (quiesced by the kernel)" : "");
    uint64_t one = 1;
    if (write(sv->handed_fd, &one, sizeof(one)) < 0)
        uq_error("cannot wake the main thread: %s", strerror(errno));
    snprintf(reply, len, "{\"pid\": %d, \"quiesce\": %s}", (int)getpid(), quiesced ? "true" : "false");
}

/* Runs on a control client's thread (several may run at once): stats only
 * reads counters; the operations that change the device take turns. */
static void answer(void *arg, const char *request, char *reply, size_t len)
{
    static pthread_mutex_t one_operation = PTHREAD_MUTEX_INITIALIZER;
    if (!strcmp(request, "stats")) {
        answer_stats(arg, reply, len);
        return;
    }
    pthread_mutex_lock(&one_operation);
    if (!strncmp(request, "snapshot-create ", 16))
        answer_snapshot(arg, request + 16, reply, len);
    else if (!strncmp(request, "resize ", 7))
        answer_resize(arg, request + 7, reply, len);
    else if (!strcmp(request, "restart"))
        answer_restart(arg, reply, len);
    else
        snprintf(reply, len, "{\"error\": \"unknown request\"}");
    pthread_mutex_unlock(&one_operation);
}

/* The nodes of an unprivileged device are given to its owner by udev, a
 * moment after they appear (the char node at ADD_DEV: every later control
 * command needs it; the block node at START_DEV).  Wait for that, so that
 * commands work and the path we print opens at once: 30 s at most (udev runs
 * a program per node and may lag on a loaded machine), not at all when no
 * udev is running. */
static bool wait_for_own_node(const char *kind, uint32_t id)
{
    char path[64];
    snprintf(path, sizeof(path), "/dev/ublk%s%u", kind, id);
    int tries = access("/run/udev/control", F_OK) == 0 ? 3000 : 1;
    for (int i = 0; i < tries; i++) {
        if (access(path, R_OK | W_OK) == 0)
            return true;
        struct timespec ts = { 0, 10 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    uq_warn("%s does not belong to this user: is the ublk-qcow2 udev rule installed?", path);
    return false;
}

static const char *format_name(const struct image *img)
{
    return img_format_name(img);
}

/* ADD_DEV with the options; info gets the kernel's view (queues may be
 * clamped to the CPU count, the buffer size rounded). */
static int add_device(struct ublk_ctrl *ctrl, const struct ublk_server_opts *o,
                      const struct image *img, bool read_only, struct ublksrv_ctrl_dev_info *info)
{
    (void)img;
    (void)read_only;
    memset(info, 0, sizeof(*info));
    info->nr_hw_queues = (uint16_t)o->nr_queues;
    info->queue_depth = (uint16_t)o->depth;
    info->max_io_buf_bytes = o->buf_bytes;
    info->dev_id = o->dev_id;
    if (ublk_ctrl_uses_ioctl_encoding(ctrl))
        info->flags |= UBLK_F_CMD_IOCTL_ENCODE;
    /* Not root: an unprivileged device, owned by us, which only we (and
     * root) may control and open; udev gives us its nodes. */
    if (geteuid() != 0) {
        uint64_t features;
        if (!ublk_ctrl_features(ctrl, &features) || !(features & UBLK_F_UNPRIVILEGED_DEV)) {
            uq_error("this kernel cannot give ublk devices to users other than root "
                     "(unprivileged ublk devices need Linux 6.3 or later)");
            return -EPERM;
        }
        info->flags |= UBLK_F_UNPRIVILEGED_DEV;
    }
    /* REISSUE: requests in flight when a daemon dies go to the next one
     * (a repeated block write is harmless) rather than failing.  `restart`
     * needs it too: without it the kernel fails, with EIO, the requests the
     * old daemon held at its closed gate (never executed, so reissuing them
     * is always safe).  QUIESCE (6.16+, only with USER_RECOVERY) lets
     * `restart` ask the kernel to stop handing requests to the old daemon. */
    uint64_t features = 0;
    bool features_known = ublk_ctrl_features(ctrl, &features);
    if (o->recovery) {
        info->flags |= UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
        if (features & UBLK_F_QUIESCE)
            info->flags |= UBLK_F_QUIESCE;
    }
    /* Zero copy where the kernel has it (6.16+): automatic registration of
     * each request's pages, and user copy for the requests that need
     * their bytes.  Neither is open to unprivileged devices, and the
     * ring's buffer table has at most 16384 slots (one per tag). */
    uint64_t zc = UBLK_F_AUTO_BUF_REG | UBLK_F_USER_COPY;
    bool want_zc = !o->no_zero_copy && geteuid() == 0 && features_known && (features & zc) == zc &&
                   o->nr_queues * o->depth <= 16384;
    if (want_zc)
        info->flags |= zc;
    /* Batch I/O (7.0+) where asked for (or by default) and the kernel has
     * it; elsewhere the per-tag commands, silently, as for zero copy. */
    bool want_batch = !o->no_batch_io && (o->batch_io || UBLK_BATCH_IO_DEFAULT) &&
                      (features & UBLK_F_BATCH_IO);
    if (want_batch)
        info->flags |= UBLK_F_BATCH_IO;
    struct ublksrv_ctrl_dev_info asked = *info;
    int r = ublk_ctrl_add_dev(ctrl, info);
    if (r == -EINVAL && want_batch) {
        uq_warn("the kernel refused batch I/O (%s); serving per tag", strerror(-r));
        *info = asked;
        info->flags &= ~UBLK_F_BATCH_IO;
        asked = *info;
        r = ublk_ctrl_add_dev(ctrl, info);
    }
    if (r == -EINVAL && want_zc) {
        /* A kernel that refuses the combination: the copy path for all. */
        uq_warn("the kernel refused zero copy (%s); serving with copies", strerror(-r));
        *info = asked;
        info->flags &= ~zc;
        r = ublk_ctrl_add_dev(ctrl, info);
    }
    if (r < 0) {
        if (r == -EEXIST)
            uq_error("ublk device %u already exists (pick another -n, or 'ublk-qcow2 del -n %u')",
                o->dev_id, o->dev_id);
        else
            uq_error("cannot add a ublk device: %s", strerror(-r));
        return r;
    }
    if (info->nr_hw_queues != o->nr_queues)
        uq_warn("the kernel allows %u queues (asked for %u)", info->nr_hw_queues, o->nr_queues);
    if (!info->max_io_buf_bytes || info->max_io_buf_bytes > o->buf_bytes)
        info->max_io_buf_bytes = o->buf_bytes;
    return 0;
}

/* START_USER_RECOVERY on a device whose daemon died; info gets its
 * geometry.  The image must still match what the device shows. */
static int take_over(struct ublk_ctrl *ctrl, const struct ublk_server_opts *o,
                     const struct image *img, bool read_only, struct ublksrv_ctrl_dev_info *info)
{
    uint32_t id = o->dev_id;
    int r = ublk_ctrl_get_dev_info(ctrl, id, info);
    if (r < 0) {
        if (r == -ENODEV)
            uq_error("there is no ublk device %u", id);
        else
            uq_error("ublk device %u: %s", id, strerror(-r));
        return r;
    }
    if (!(info->flags & UBLK_F_USER_RECOVERY)) {
        uq_error("ublk device %u was not added with --recovery; it cannot be taken over", id);
        return -EINVAL;
    }
    struct ublk_params params;
    memset(&params, 0, sizeof(params));
    params.len = sizeof(params);
    params.types = UBLK_PARAM_TYPE_BASIC;
    r = ublk_ctrl_get_params(ctrl, id, &params);
    if (r < 0) {
        uq_error("cannot read the parameters of ublk device %u: %s", id, strerror(-r));
        return r;
    }
    if (params.basic.dev_sectors != img_size(img) >> 9) {
        uq_error("%s: its size (%llu bytes) is not that of ublk device %u (%llu bytes)", o->image,
            (unsigned long long)img_size(img), id,
            (unsigned long long)params.basic.dev_sectors << 9);
        return -EINVAL;
    }
    if (!read_only && (params.basic.attrs & UBLK_ATTR_READ_ONLY))
        uq_warn("ublk device %u is read-only; the image is opened read-write", id);
    if (read_only && !(params.basic.attrs & UBLK_ATTR_READ_ONLY)) {
        uq_error("%s is read-only, but ublk device %u is writable", o->image, id);
        return -EROFS;
    }
    if (info->max_io_buf_bytes > o->buf_bytes || info->max_io_buf_bytes % 4096 ||
        !info->max_io_buf_bytes) {
        uq_error("ublk device %u has a request size (%u bytes) this daemon cannot serve", id,
            info->max_io_buf_bytes);
        return -EINVAL;
    }
    /* The dead daemon's rings are torn down asynchronously: until then the
     * kernel answers EBUSY.  Wait for it, 30 s at most. */
    for (int i = 0; i < 300; i++) {
        r = ublk_ctrl_start_user_recovery(ctrl, id);
        if (r != -EBUSY)
            break;
        /* A live daemon is not going away: say so now. */
        if (ublk_ctrl_get_dev_info(ctrl, id, info) == 0 && info->state == UBLK_S_DEV_LIVE &&
            info->ublksrv_pid > 0 && kill(info->ublksrv_pid, 0) == 0) {
            uq_error("ublk device %u is LIVE, served by pid %d: nothing to recover", id,
                (int)info->ublksrv_pid);
            return -EBUSY;
        }
        struct timespec ts = { 0, 100 * 1000 * 1000 };
        nanosleep(&ts, NULL);
    }
    if (r < 0) {
        uq_error("cannot start the recovery of ublk device %u: %s", id, strerror(-r));
        return r;
    }
    return 0;
}

/* One daemon's run, from the image lock to the device's removal. */
struct daemon {
    const struct ublk_server_opts *o;
    int lock_fd;
    struct image *img;
    bool read_only;             /* asked for, or all the image allows */
    struct ublk_ctrl *ctrl;
    struct ublksrv_ctrl_dev_info info;
    uint32_t dev_id;
    uint32_t buf_bytes;
    bool added;                 /* ours to delete when we stop */
    struct ublk_queues *qs;
    int sig_fd;
    bool stopping;
    bool stop_pending;          /* asked to stop by a signal while in use */
    /* restart: handing the device over (set by the control socket's
     * thread), and whether the engine could not be joined (parked on tags
     * only the end of the process releases). */
    atomic_bool handing_over;
    bool abandoned;
    int handed_fd;
    uint64_t served;            /* requests, once the queues ended */
    bool served_known;
};

/* Lock and open the image; 0, or -1 after saying why (d->img NULL or not). */
static int open_image(struct daemon *d)
{
    const struct ublk_server_opts *o = d->o;
    char err[512];
    /* Lock before opening: opening may already write (dirty-image repair). */
    d->lock_fd = image_lock(o->image, !o->read_only, err, sizeof(err));
    if (d->lock_fd < 0) {
        uq_error("%s", err);
        return -1;
    }
    struct img_opts iopts = {
        .format = o->format, .read_only = o->read_only,
        .cache_size = o->cache_size, .cache = FILE_CACHE_AUTO,
        .discard = o->discard, .discard_no_unref = o->discard_no_unref, .snapshot = o->snapshot,
        .key = o->key, .key_len = o->key_len,
    };
    d->img = img_open(o->image, &iopts, err, sizeof(err));
    if (!d->img) {
        uq_error("%s", err);
        return -1;
    }
    d->read_only = o->read_only || d->img->read_only;
    if (d->read_only && !o->read_only)
        uq_warn("%s can only be opened read-only; serving it read-only", o->image);
    if (img_size(d->img) < 512) {
        uq_error("%s: image is smaller than one sector; nothing to serve", o->image);
        return -1;
    }
    if (img_size(d->img) % 512)
        uq_warn("%s: the last %u bytes (less than a sector) are not served",
            o->image, (unsigned)(img_size(d->img) % 512));
    return 0;
}

/* A new device with the image's parameters, or (recover) the quiesced one
 * whose daemon died; d->info holds its geometry. */
static int claim_device(struct daemon *d)
{
    const struct ublk_server_opts *o = d->o;
    if (o->recover) {
        d->dev_id = o->dev_id;
        uq_log_context("ublkb%u [%s]", d->dev_id, o->image);
        if (take_over(d->ctrl, o, d->img, d->read_only, &d->info) < 0)
            return -1;
        d->buf_bytes = d->info.max_io_buf_bytes;
        return 0;
    }
    if (add_device(d->ctrl, o, d->img, d->read_only, &d->info) < 0)
        return -1;
    d->added = true;
    d->dev_id = d->info.dev_id;
    notify(o->notify_fd, "id", d->dev_id);
    uq_log_context("ublkb%u [%s]", d->dev_id, o->image);
    if (geteuid() != 0)
        wait_for_own_node("c", d->dev_id);
    d->buf_bytes = d->info.max_io_buf_bytes;
    struct ublk_params params;
    ublk_params_for_image(&params, d->img, d->buf_bytes, d->read_only);
    int r = ublk_ctrl_set_params(d->ctrl, d->dev_id, &params);
    if (r < 0) {
        uq_error("cannot set the parameters of ublk device %u: %s", d->dev_id, strerror(-r));
        return -1;
    }
    return 0;
}

/* Signals are read from a signalfd; the engine thread inherits the mask. */
static int signals_to_fd(void)
{
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    int fd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (fd < 0)
        uq_error("signalfd: %s", strerror(errno));
    return fd;
}

/* What `list` and `recover` read back about the device. */
static void write_state_file(const struct daemon *d)
{
    const struct ublk_server_opts *o = d->o;
    struct ublk_state st = {
        .id = d->dev_id, .pid = getpid(), .read_only = d->read_only,
        .recovery = o->recovery || o->recover,
        .queues = d->info.nr_hw_queues, .depth = d->info.queue_depth,
        .buf_bytes = d->buf_bytes, .cache_size = o->cache_size,
        .discard_unmap = o->discard == IMG_DISCARD_UNMAP, .discard_no_unref = o->discard_no_unref,
    };
    snprintf(st.image, sizeof(st.image), "%s", o->image);
    snprintf(st.key_file, sizeof(st.key_file), "%s", o->key_file ? o->key_file : "");
    snprintf(st.key_env, sizeof(st.key_env), "%s", o->key_env ? o->key_env : "");
    snprintf(st.format, sizeof(st.format), "%s", format_name(d->img));
    snprintf(st.snapshot, sizeof(st.snapshot), "%s", o->snapshot ? o->snapshot : "");
    int r = ublk_state_write(&st);
    if (r < 0)
        uq_warn("cannot write the state file of ublk device %u: %s", d->dev_id, strerror(-r));
}

/* Start the queues, then the device (START_DEV, or END_USER_RECOVERY). */
static int start_device(struct daemon *d)
{
    const struct ublk_server_opts *o = d->o;
    char err[512];
    struct ublk_queues_cfg qcfg = {
        .dev_id = d->dev_id, .nr_queues = d->info.nr_hw_queues, .depth = d->info.queue_depth,
        .buf_bytes = d->buf_bytes, .ioctl_encode = ublk_ctrl_uses_ioctl_encoding(d->ctrl),
        .img = d->img,
        /* From the device's flags: a recovered device keeps its path. */
        .zero_copy = ublk_uses_zero_copy(d->info.flags),
        .batch_io = ublk_uses_batch_io(d->info.flags),
    };
    int r = ublk_queues_start(&qcfg, &d->qs, err, sizeof(err));
    if (r < 0) {
        uq_error("ublk device %u: %s", d->dev_id, err);
        return -1;
    }
    /* The state file first: udev rules run as the block device appears
     * (at START_DEV) and read it to name the device after its image. */
    write_state_file(d);
    if (o->recover) {
        r = ublk_ctrl_end_user_recovery(d->ctrl, d->dev_id, getpid());
        if (r < 0) {
            /* Leave the device quiesced for another attempt: exiting
             * cancels our fetches, which makes it recoverable again. */
            uq_error("cannot end the recovery of ublk device %u: %s", d->dev_id, strerror(-r));
            fflush(stderr);
            _exit(1);
        }
        d->added = true;   /* ours now: removed when we stop */
    } else {
        r = ublk_ctrl_start_dev(d->ctrl, d->dev_id, getpid());
    }
    if (r < 0) {
        uq_error("cannot start ublk device %u: %s", d->dev_id, strerror(-r));
        /* STOP_DEV aborts the fetches the queues have outstanding. */
        ublk_ctrl_stop_dev(d->ctrl, d->dev_id);
        ublk_queues_stop(d->qs);
        d->qs = NULL;
        return -1;
    }
    return 0;
}

/* The device is live: tell the starting command, and move the log. */
static void announce(struct daemon *d)
{
    const struct ublk_server_opts *o = d->o;
    if (!o->recover)
        use_no_scheduler(d->dev_id);
    if (geteuid() != 0)
        wait_for_own_node("b", d->dev_id);

    /* If the parent is gone, nobody was told about the device: undo it. */
    d->stopping = !notify(o->notify_fd, "ok", d->dev_id);
    if (o->notify_fd >= 0)
        close(o->notify_fd);
    if (o->log_to_file) {
        log_to_file(d->dev_id);
        uq_log_to_syslog();
    }
    uq_info("%s %s (%s, %llu bytes%s): %u queue(s) of depth %u", o->recover ? "took over, serving" : "serving",
            o->image, format_name(d->img), (unsigned long long)img_size(d->img),
            d->read_only ? ", read-only" : "", d->info.nr_hw_queues, d->info.queue_depth);
    char files[2048];
    img_describe_files(d->img, files, sizeof(files));
    if (files[0])
        uq_info("%s", files);
    if (d->stopping) {
        uq_error("ublk device %u: the starting command went away; removing the device", d->dev_id);
        ublk_ctrl_stop_dev(d->ctrl, d->dev_id);
    }
}

/* A signal asks for a stop as `del` does: never while the device is in use
 * (mounted, held, open), which would cut a file system off.  In use, it
 * says by what and keeps serving; the stop is tried again every second,
 * so it happens once the users let go (systemd's stop waits for that).
 * `del --force` is the way to stop it regardless. */
static void stop_when_unused(struct daemon *d, int signo)
{
    char why[2048];
    int r = ublk_stop_if_unused(d->ctrl, d->dev_id, d->info.flags, why, sizeof(why));
    d->stop_pending = r == -EBUSY;
    if (r < 0 && r != -EBUSY && r != -ENODEV)
        uq_error("ublk device %u: STOP_DEV failed: %s", d->dev_id, strerror(-r));
    if (r != -EBUSY || !signo)
        return;
    /* One line for the journal. */
    for (char *p = why; *p; p++)
        if (*p == '\n')
            *p = p[1] ? ';' : '\0';
    uq_error("ublk device %u: signal %d: not stopping /dev/ublkb%u while it is in use; it keeps "
             "serving and stops once released (or now, cutting its users off: ublk-qcow2 del -n %u "
             "--force):%s", d->dev_id, signo, d->dev_id, d->dev_id, why);
}

/* Serve until the queues end: STOP_DEV from `del`, or from us on a signal.
 * Meanwhile answer `ublk-qcow2 stats` (and later requests) on the control
 * socket.  Returns the exit code. */
static int serve_until_stopped(struct daemon *d)
{
    char err[512];
    struct served sv = { .id = d->dev_id, .o = d->o, .img = d->img, .qs = d->qs, .ctrl = d->ctrl,
                         .read_only = d->read_only, .dev_flags = d->info.flags,
                         .handing_over = &d->handing_over, .handed_fd = d->handed_fd };
    clock_gettime(CLOCK_MONOTONIC, &sv.started);
    struct ctl_server *ctl = ctl_server_start(d->dev_id, answer, &sv, err, sizeof(err));
    if (!ctl)
        uq_warn("ublk device %u: %s (no statistics)", d->dev_id, err);

    struct pollfd pf[4] = {
        { .fd = d->sig_fd, .events = POLLIN },
        { .fd = ublk_queues_done_fd(d->qs), .events = POLLIN },
        { .fd = ctl_server_fd(ctl), .events = POLLIN },
        { .fd = d->handed_fd, .events = POLLIN },
    };
    for (;;) {
        int pr = poll(pf, 4, d->stop_pending ? 1000 : -1);
        if (pr < 0) {
            if (errno == EINTR)
                continue;
            uq_error("poll: %s", strerror(errno));
            break;
        }
        if (pr == 0 && d->stop_pending)
            stop_when_unused(d, 0);
        if (pf[1].revents)
            break;
        if (pf[3].revents) {
            /* Handed over: the engine holds its tags until we exit. */
            d->abandoned = true;
            break;
        }
        if (pf[2].revents)
            ctl_server_accept(ctl);
        if (pf[0].revents) {
            struct signalfd_siginfo si;
            if (read(d->sig_fd, &si, sizeof(si)) == sizeof(si) && (!d->stopping || d->stop_pending)) {
                if (!d->stopping)
                    uq_error("ublk device %u: signal %u, stopping", d->dev_id, si.ssi_signo);
                d->stopping = true;
                stop_when_unused(d, (int)si.ssi_signo);
            }
        }
    }
    /* Waits for the restart client's thread, which has answered by now. */
    ctl_server_stop(ctl);
    d->served = ublk_queues_served(d->qs);
    d->served_known = true;
    if (d->abandoned) {
        d->qs = NULL;   /* never joined: the process exit ends the thread */
        return 0;
    }
    int r = ublk_queues_stop(d->qs);
    d->qs = NULL;
    if (r < 0)
        uq_error("ublk device %u: a queue failed: %s", d->dev_id, strerror(-r));
    return r < 0 ? 1 : 0;
}

/* Whatever the run got to: stop, flush and close, remove our device.
 * Returns rc, or 1 if the final flush failed. */
static int shut_down(struct daemon *d, int rc)
{
    if (d->sig_fd >= 0)
        close(d->sig_fd);
    if (d->qs)
        ublk_queues_stop(d->qs);
    if (d->img) {
        /* img_close flushes: the data the kernel acknowledged becomes durable. */
        int r = img_close(d->img);
        if (r < 0) {
            uq_error("%s: flush at close failed: %s", d->o->image, strerror(-r));
            rc = 1;
        } else if (d->served_known) {
            uq_info("%s after %llu requests; image flushed and closed",
                    atomic_load(&d->handing_over) ? "handed over" : "stopped", (unsigned long long)d->served);
        }
    }
    if (d->lock_fd >= 0)
        close(d->lock_fd);
    /* Handed over: the device, QUIESCED once we are gone, and its state
     * file are the next daemon's. */
    if (d->added && !atomic_load(&d->handing_over)) {
        /* The char device is closed by now; a file system that `del --force`
         * cut off may still hold the disk: the kernel deletes it then. */
        int r = ublk_ctrl_del_dev_nowait(d->ctrl, d->dev_id);
        if (r < 0 && r != -ENODEV)
            uq_error("cannot delete ublk device %u: %s", d->dev_id, strerror(-r));
        ublk_state_remove(d->dev_id);
    }
    ublk_ctrl_close(d->ctrl);
    if (d->handed_fd >= 0)
        close(d->handed_fd);
    return rc;
}

int ublk_server_run(const struct ublk_server_opts *o)
{
    struct daemon d = { .o = o, .lock_fd = -1, .sig_fd = -1, .handed_fd = -1 };
    if (open_image(&d) < 0)
        return shut_down(&d, 1);
    if (ublk_ctrl_open(&d.ctrl) < 0)
        return shut_down(&d, 1);   /* ctrl printed why */
    if (claim_device(&d) < 0)
        return shut_down(&d, 1);
    protect_from_reclaim();
    d.sig_fd = signals_to_fd();
    if (d.sig_fd < 0 || start_device(&d) < 0)
        return shut_down(&d, 1);
    announce(&d);
    d.handed_fd = eventfd(0, EFD_CLOEXEC);
    if (d.handed_fd < 0)
        uq_warn("eventfd: %s (restart unavailable)", strerror(errno));
    int rc = shut_down(&d, serve_until_stopped(&d));
    if (d.abandoned) {
        /* The image is closed; the engine thread is parked on fetches that
         * only closing its ring releases, and no exit handler may wait for
         * it or free what it uses: leave now.  The kernel then cancels our
         * fetches, requeues the held requests and marks the device
         * QUIESCED for the new daemon. */
        fflush(NULL);
        _exit(rc);
    }
    return rc;
}

/* ---- state files --------------------------------------------------------------- */

void ublk_state_dir_of(uid_t uid, char *buf, size_t len)
{
    if (uid == 0)
        snprintf(buf, len, "%s", UBLK_ROOT_STATE_DIR);
    else
        snprintf(buf, len, "/run/user/%u/ublk-qcow2", (unsigned)uid);
}

const char *ublk_state_dir(void)
{
    static char dir[PATH_MAX];
    if (!dir[0]) {
        const char *xdg = getenv("XDG_RUNTIME_DIR");
        if (geteuid() != 0 && xdg && xdg[0] == '/')
            snprintf(dir, sizeof(dir), "%s/ublk-qcow2", xdg);
        else
            ublk_state_dir_of(geteuid(), dir, sizeof(dir));
    }
    return dir;
}

static void state_path(char *buf, size_t len, const char *dir, uint32_t id, const char *suffix)
{
    snprintf(buf, len, "%s/ublk%u.json%s", dir, id, suffix);
}

int ublk_state_write(const struct ublk_state *s)
{
    if (mkdir(UBLK_STATE_DIR, 0755) < 0 && errno != EEXIST)
        return -errno;
    char tmp[PATH_MAX], path[PATH_MAX];
    state_path(tmp, sizeof(tmp), UBLK_STATE_DIR, s->id, ".tmp");
    state_path(path, sizeof(path), UBLK_STATE_DIR, s->id, "");
    FILE *f = fopen(tmp, "we");
    if (!f)
        return -errno;
    fprintf(f, "{\"id\": %u, \"pid\": %d, \"image\": ", s->id, (int)s->pid);
    json_put_string(f, s->image);
    fprintf(f, ", \"format\": ");
    json_put_string(f, s->format);
    fprintf(f, ", \"read_only\": %s, \"recovery\": %s, \"queues\": %u, \"depth\": %u, \"buf_bytes\": %u, "
               "\"cache_size\": %llu, \"discard\": \"%s\", \"discard_no_unref\": %s",
            s->read_only ? "true" : "false", s->recovery ? "true" : "false", s->queues, s->depth, s->buf_bytes,
            (unsigned long long)s->cache_size, s->discard_unmap ? "unmap" : "ignore",
            s->discard_no_unref ? "true" : "false");
    if (s->snapshot[0]) {
        fprintf(f, ", \"snapshot\": ");
        json_put_string(f, s->snapshot);
    }
    /* The passphrase's source, never the passphrase (recover reads it again). */
    if (s->key_file[0]) {
        fprintf(f, ", \"key_file\": ");
        json_put_string(f, s->key_file);
    }
    if (s->key_env[0]) {
        fprintf(f, ", \"key_env\": ");
        json_put_string(f, s->key_env);
    }
    fprintf(f, "}\n");
    bool ok = !ferror(f);
    if (fclose(f) != 0)
        ok = false;
    /* Written whole, then renamed: readers never see half a file. */
    if (!ok || rename(tmp, path) < 0) {
        int e = errno ? errno : EIO;
        unlink(tmp);
        return -e;
    }
    return 0;
}

int ublk_state_read(uint32_t id, struct ublk_state *s)
{
    return ublk_state_read_in(UBLK_STATE_DIR, id, s);
}

int ublk_state_read_in(const char *dir, uint32_t id, struct ublk_state *s)
{
    char path[PATH_MAX];
    state_path(path, sizeof(path), dir, id, "");
    FILE *f = fopen(path, "re");
    if (!f)
        return -errno;
    char buf[PATH_MAX * 3 + 1024];
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    memset(s, 0, sizeof(*s));
    uint64_t v;
    s->id = id;
    if (!json_get_string(buf, "image", s->image, sizeof(s->image)))
        return -EINVAL;
    json_get_string(buf, "format", s->format, sizeof(s->format));
    if (json_get_u64(buf, "pid", &v))
        s->pid = (pid_t)v;
    if (json_get_u64(buf, "queues", &v))
        s->queues = (unsigned)v;
    if (json_get_u64(buf, "depth", &v))
        s->depth = (unsigned)v;
    if (json_get_u64(buf, "buf_bytes", &v))
        s->buf_bytes = (uint32_t)v;
    if (json_get_u64(buf, "cache_size", &v))
        s->cache_size = v;
    s->read_only = json_get_true(buf, "read_only");
    s->recovery = json_get_true(buf, "recovery");
    char mode[16];
    s->discard_unmap = json_get_string(buf, "discard", mode, sizeof(mode)) && !strcmp(mode, "unmap");
    s->discard_no_unref = json_get_true(buf, "discard_no_unref");
    if (!json_get_string(buf, "snapshot", s->snapshot, sizeof(s->snapshot)))
        s->snapshot[0] = '\0';
    if (!json_get_string(buf, "key_file", s->key_file, sizeof(s->key_file)))
        s->key_file[0] = '\0';
    if (!json_get_string(buf, "key_env", s->key_env, sizeof(s->key_env)))
        s->key_env[0] = '\0';
    return 0;
}

void ublk_state_remove(uint32_t id)
{
    char path[PATH_MAX];
    state_path(path, sizeof(path), UBLK_STATE_DIR, id, "");
    unlink(path);
}
