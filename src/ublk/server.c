/* One ublk device's life: set-up, serving, teardown (see server.h). */
#include "util/json.h"
#include "io/log.h"
#include "ublk/server.h"
#include "io/imagelock.h"
#include "ublk/ctl_socket.h"
#include "ublk/kernel_ctrl.h"
#include "ublk/queue.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
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
    struct timespec started;
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
    fprintf(f, ", \"uptime_s\": %.3f, \"reads\": %llu, \"writes\": %llu, \"read_bytes\": %llu, "
               "\"write_bytes\": %llu, \"flushes\": %llu, \"discards\": %llu, \"write_zeroes\": %llu, "
               "\"errors\": %llu, \"in_flight\": %llu, \"cache_hits\": %llu, \"cache_misses\": %llu, "
               "\"clusters_allocated\": %llu, \"zcache_hits\": %llu, \"zcache_misses\": %llu, "
               "\"clusters_decompressed\": %llu}",
            up, (unsigned long long)io.reads, (unsigned long long)io.writes,
            (unsigned long long)io.read_bytes, (unsigned long long)io.write_bytes,
            (unsigned long long)io.flushes, (unsigned long long)io.discards,
            (unsigned long long)io.write_zeroes, (unsigned long long)io.errors,
            (unsigned long long)io.in_flight, (unsigned long long)is.cache_hits,
            (unsigned long long)is.cache_misses, (unsigned long long)is.clusters_allocated,
            (unsigned long long)is.zcache_hits, (unsigned long long)is.zcache_misses,
            (unsigned long long)is.clusters_decompressed);
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
    static struct excl_op x;
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
        reply_error(reply, len, "invalid size");
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

static void answer(void *arg, const char *request, char *reply, size_t len)
{
    if (!strcmp(request, "stats"))
        answer_stats(arg, reply, len);
    else if (!strncmp(request, "snapshot-create ", 16))
        answer_snapshot(arg, request + 16, reply, len);
    else if (!strncmp(request, "resize ", 7))
        answer_resize(arg, request + 7, reply, len);
    else
        snprintf(reply, len, "{\"error\": \"unknown request\"}");
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
     * (a repeated block write is harmless) rather than failing. */
    if (o->recovery)
        info->flags |= UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE;
    int r = ublk_ctrl_add_dev(ctrl, info);
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

int ublk_server_run(const struct ublk_server_opts *o)
{
    char err[512];
    int rc = 1;
    struct ublk_ctrl *ctrl = NULL;
    struct ublk_queues *qs = NULL;
    uint32_t dev_id = 0;
    bool added = false;
    uint64_t served = 0;        /* requests, once the queues ended */
    bool served_known = false;

    /* Lock before opening: opening may already write (dirty-image repair). */
    int lock_fd = image_lock(o->image, !o->read_only, err, sizeof(err));
    if (lock_fd < 0) {
        uq_error("%s", err);
        return 1;
    }
    struct img_opts iopts = {
        .format = o->format, .read_only = o->read_only,
        .cache_size = o->cache_size, .cache = FILE_CACHE_AUTO,
        .discard = o->discard, .discard_no_unref = o->discard_no_unref, .snapshot = o->snapshot,
        .key = o->key, .key_len = o->key_len,
    };
    struct image *img = img_open(o->image, &iopts, err, sizeof(err));
    if (!img) {
        uq_error("%s", err);
        close(lock_fd);
        return 1;
    }
    bool read_only = o->read_only || img->read_only;
    if (read_only && !o->read_only)
        uq_warn("%s can only be opened read-only; serving it read-only", o->image);
    if (img_size(img) < 512) {
        uq_error("%s: image is smaller than one sector; nothing to serve", o->image);
        goto out;
    }
    if (img_size(img) % 512)
        uq_warn("%s: the last %u bytes (less than a sector) are not served",
            o->image, (unsigned)(img_size(img) % 512));

    if (ublk_ctrl_open(&ctrl) < 0)
        goto out;   /* ctrl printed why */

    struct ublksrv_ctrl_dev_info info;
    uint32_t buf_bytes;
    int r;
    if (o->recover) {
        dev_id = o->dev_id;
        uq_log_context("ublkb%u [%s]", dev_id, o->image);
        if (take_over(ctrl, o, img, read_only, &info) < 0)
            goto out;
        buf_bytes = info.max_io_buf_bytes;
    } else {
        if (add_device(ctrl, o, img, read_only, &info) < 0)
            goto out;
        added = true;
        dev_id = info.dev_id;
        notify(o->notify_fd, "id", dev_id);
        uq_log_context("ublkb%u [%s]", dev_id, o->image);
        if (geteuid() != 0)
            wait_for_own_node("c", dev_id);
        buf_bytes = info.max_io_buf_bytes;
        struct ublk_params params;
        ublk_params_for_image(&params, img, buf_bytes, read_only);
        r = ublk_ctrl_set_params(ctrl, dev_id, &params);
        if (r < 0) {
            uq_error("cannot set the parameters of ublk device %u: %s", dev_id, strerror(-r));
            goto out;
        }
    }

    protect_from_reclaim();

    /* Signals are read from a signalfd; the queue threads inherit the mask. */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGHUP);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);
    int sig_fd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (sig_fd < 0) {
        uq_error("signalfd: %s", strerror(errno));
        goto out;
    }

    struct ublk_queues_cfg qcfg = {
        .dev_id = dev_id, .nr_queues = info.nr_hw_queues, .depth = info.queue_depth,
        .buf_bytes = buf_bytes, .ioctl_encode = ublk_ctrl_uses_ioctl_encoding(ctrl), .img = img,
    };
    r = ublk_queues_start(&qcfg, &qs, err, sizeof(err));
    if (r < 0) {
        uq_error("ublk device %u: %s", dev_id, err);
        close(sig_fd);
        goto out;
    }
    /* The state file first: udev rules run as the block device appears
     * (at START_DEV) and read it to name the device after its image. */
    struct ublk_state st = {
        .id = dev_id, .pid = getpid(), .read_only = read_only, .recovery = o->recovery || o->recover,
        .queues = info.nr_hw_queues, .depth = info.queue_depth,
        .buf_bytes = buf_bytes, .cache_size = o->cache_size,
        .discard_unmap = o->discard == IMG_DISCARD_UNMAP, .discard_no_unref = o->discard_no_unref,
    };
    snprintf(st.image, sizeof(st.image), "%s", o->image);
    snprintf(st.key_file, sizeof(st.key_file), "%s", o->key_file ? o->key_file : "");
    snprintf(st.key_env, sizeof(st.key_env), "%s", o->key_env ? o->key_env : "");
    snprintf(st.format, sizeof(st.format), "%s", format_name(img));
    snprintf(st.snapshot, sizeof(st.snapshot), "%s", o->snapshot ? o->snapshot : "");
    r = ublk_state_write(&st);
    if (r < 0)
        uq_warn("cannot write the state file of ublk device %u: %s", dev_id, strerror(-r));
    if (o->recover) {
        r = ublk_ctrl_end_user_recovery(ctrl, dev_id, getpid());
        if (r < 0) {
            /* Leave the device quiesced for another attempt: exiting
             * cancels our fetches, which makes it recoverable again. */
            uq_error("cannot end the recovery of ublk device %u: %s", dev_id, strerror(-r));
            fflush(stderr);
            _exit(1);
        }
        added = true;   /* ours now: removed when we stop */
    } else {
        r = ublk_ctrl_start_dev(ctrl, dev_id, getpid());
    }
    if (r < 0) {
        uq_error("cannot start ublk device %u: %s", dev_id, strerror(-r));
        /* STOP_DEV aborts the fetches the queues have outstanding. */
        ublk_ctrl_stop_dev(ctrl, dev_id);
        ublk_queues_stop(qs);
        qs = NULL;
        close(sig_fd);
        goto out;
    }

    if (!o->recover)
        use_no_scheduler(dev_id);
    if (geteuid() != 0)
        wait_for_own_node("b", dev_id);

    /* If the parent is gone, nobody was told about the device: undo it. */
    bool stopping = !notify(o->notify_fd, "ok", dev_id);
    if (o->notify_fd >= 0)
        close(o->notify_fd);
    if (o->log_to_file) {
        log_to_file(dev_id);
        uq_log_to_syslog();
    }
    uq_info("%s %s (%s, %llu bytes%s): %u queue(s) of depth %u", o->recover ? "took over, serving" : "serving",
            o->image, format_name(img), (unsigned long long)img_size(img), read_only ? ", read-only" : "",
            info.nr_hw_queues, info.queue_depth);
    if (stopping) {
        uq_error("ublk device %u: the starting command went away; removing the device", dev_id);
        ublk_ctrl_stop_dev(ctrl, dev_id);
    }

    /* Statistics (and later requests) from `ublk-qcow2 stats`. */
    struct served sv = { .id = dev_id, .o = o, .img = img, .qs = qs, .ctrl = ctrl, .read_only = read_only };
    clock_gettime(CLOCK_MONOTONIC, &sv.started);
    int ctl_fd = ctl_listen(dev_id, err, sizeof(err));
    if (ctl_fd < 0)
        uq_warn("ublk device %u: %s (no statistics)", dev_id, err);

    /* Serve until the queues end: STOP_DEV from `del`, or from us on a signal. */
    struct pollfd pf[3] = {
        { .fd = sig_fd, .events = POLLIN },
        { .fd = ublk_queues_done_fd(qs), .events = POLLIN },
        { .fd = ctl_fd, .events = POLLIN },
    };
    for (;;) {
        if (poll(pf, 3, -1) < 0) {
            if (errno == EINTR)
                continue;
            uq_error("poll: %s", strerror(errno));
            break;
        }
        if (pf[1].revents)
            break;
        if (pf[2].revents)
            ctl_serve_one(ctl_fd, answer, &sv);
        if (pf[0].revents) {
            struct signalfd_siginfo si;
            if (read(sig_fd, &si, sizeof(si)) == sizeof(si) && !stopping) {
                uq_error("ublk device %u: signal %u, stopping", dev_id, si.ssi_signo);
                stopping = true;
                r = ublk_ctrl_stop_dev(ctrl, dev_id);
                if (r < 0)
                    uq_error("ublk device %u: STOP_DEV failed: %s", dev_id, strerror(-r));
            }
        }
    }
    close(sig_fd);
    ctl_close(ctl_fd, dev_id);
    served = ublk_queues_served(qs);
    served_known = true;
    r = ublk_queues_stop(qs);
    qs = NULL;
    rc = r < 0 ? 1 : 0;
    if (r < 0)
        uq_error("ublk device %u: a queue failed: %s", dev_id, strerror(-r));

out:
    if (qs)
        ublk_queues_stop(qs);
    /* img_close flushes: the data the kernel acknowledged becomes durable. */
    r = img_close(img);
    if (r < 0) {
        uq_error("%s: flush at close failed: %s", o->image, strerror(-r));
        rc = 1;
    } else if (served_known) {
        uq_info("stopped after %llu requests; image flushed and closed", (unsigned long long)served);
    }
    close(lock_fd);
    if (added) {
        /* The char device is closed by now, so DEL_DEV does not wait. */
        r = ublk_ctrl_del_dev(ctrl, dev_id);
        if (r < 0 && r != -ENODEV)
            uq_error("cannot delete ublk device %u: %s", dev_id, strerror(-r));
        ublk_state_remove(dev_id);
    }
    ublk_ctrl_close(ctrl);
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
