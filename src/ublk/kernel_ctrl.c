/* ublk control commands over a private SQE128 io_uring (see ctrl.h). */
#include "ublk/kernel_ctrl.h"
#include "io/log.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <liburing.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct ublk_ctrl {
    /* One command at a time: the daemon's main thread (STOP_DEV on a signal)
     * and a control client's thread (resize's UPDATE_SIZE) share the ring. */
    pthread_mutex_t lock;
    int fd;
    struct io_uring ring;
    uint64_t features;
    bool features_known;
    bool legacy;        /* send plain opcodes (kernel refused the ioctl form) */
    bool ioctl_ok;      /* the kernel accepted an ioctl-encoded command */
    /* The last device asked about, and whether it is unprivileged (its
     * commands then carry its char device's path). */
    uint32_t known_id;
    int known_unprivileged;     /* -1: not asked yet */
};

/* What every kernel with ublk (6.0/6.1) has; assumed when GET_FEATURES is missing. */
#define UBLK_F_BASELINE (UBLK_F_URING_CMD_COMP_IN_TASK | UBLK_F_NEED_GET_DATA | \
                         UBLK_F_USER_RECOVERY | UBLK_F_USER_RECOVERY_REISSUE)

struct ctrl_req {
    unsigned nr;            /* legacy opcode; 0 = has no legacy form */
    unsigned ioctl_op;      /* ioctl-encoded opcode */
    uint32_t dev_id;
    void *buf;              /* in/out buffer, or NULL */
    uint16_t len;
    uint64_t data0;         /* inline argument */
};

static bool is_unprivileged(struct ublk_ctrl *c, uint32_t dev_id);

/* Commands on an unprivileged device (and GET_DEV_INFO2 on any) start their
 * buffer with the path of the device's char node: the kernel checks that
 * the caller may open it, then skips it.  ADD_DEV and GET_FEATURES name no
 * device yet. */
static bool takes_dev_path(struct ublk_ctrl *c, unsigned op, uint32_t dev_id)
{
    unsigned nr = _IOC_NR(op);
    if (nr == UBLK_CMD_ADD_DEV || nr == UQ_UBLK_CMD_GET_FEATURES)
        return false;
    return nr == UBLK_CMD_GET_DEV_INFO2 || is_unprivileged(c, dev_id);
}

/* Send one command and wait for its completion; returns the CQE res. */
static int ctrl_submit(struct ublk_ctrl *c, unsigned op, const struct ctrl_req *r)
{
    char with_path[512];
    uint16_t path_len = 0;
    if (takes_dev_path(c, op, r->dev_id)) {
        path_len = (uint16_t)snprintf(with_path, sizeof(with_path), "/dev/ublkc%u", r->dev_id);
        if (path_len + r->len > sizeof(with_path))
            return -EINVAL;
        if (r->len)
            memcpy(with_path + path_len, r->buf, r->len);
    }
    struct io_uring_sqe *sqe = io_uring_get_sqe(&c->ring);
    if (!sqe)
        return -EBUSY;
    /* An SQE128 slot is two io_uring_sqe; the command lives in the tail. */
    memset(sqe, 0, 2 * sizeof(*sqe));
    sqe->opcode = IORING_OP_URING_CMD;
    sqe->fd = c->fd;
    sqe->cmd_op = op;
    struct ublksrv_ctrl_cmd *cmd = (struct ublksrv_ctrl_cmd *)sqe->cmd;
    cmd->dev_id = r->dev_id;
    cmd->queue_id = (uint16_t)-1;   /* not a per-queue command */
    cmd->addr = (uint64_t)(uintptr_t)r->buf;
    cmd->len = r->len;
    cmd->data[0] = r->data0;
    if (path_len) {
        cmd->addr = (uint64_t)(uintptr_t)with_path;
        cmd->len = (uint16_t)(path_len + r->len);
        ublk_cmd_set_dev_path_len(cmd, path_len);
    }

    int ret = io_uring_submit(&c->ring);
    if (ret < 0)
        return ret;
    struct io_uring_cqe *cqe;
    do {
        ret = io_uring_wait_cqe(&c->ring, &cqe);
    } while (ret == -EINTR);
    if (ret < 0)
        return ret;
    ret = cqe->res;
    io_uring_cqe_seen(&c->ring, cqe);
    if (path_len && r->len && ret >= 0)
        memcpy(r->buf, with_path + path_len, r->len);   /* what the kernel wrote */
    return ret;
}

/* GET_DEV_INFO2 carries the path whatever the device is, so it tells. */
static bool is_unprivileged(struct ublk_ctrl *c, uint32_t dev_id)
{
    if (dev_id == (uint32_t)-1)
        return false;
    if (c->known_unprivileged >= 0 && c->known_id == dev_id)
        return c->known_unprivileged;
    struct ublksrv_ctrl_dev_info info;
    memset(&info, 0, sizeof(info));
    struct ctrl_req r = {
        .nr = UBLK_CMD_GET_DEV_INFO2, .ioctl_op = UBLK_U_CMD_GET_DEV_INFO2,
        .dev_id = dev_id, .buf = &info, .len = sizeof(info),
    };
    /* Kernels before unprivileged devices (6.3) have none to worry about.
     * EACCES: an unprivileged device whose node we may not open (another
     * user's); a root device answers EPERM to users. */
    int ret = ctrl_submit(c, c->legacy ? r.nr : r.ioctl_op, &r);
    bool unpriv = ret == -EACCES || (ret >= 0 && (info.flags & UBLK_F_UNPRIVILEGED_DEV));
    c->known_id = dev_id;
    c->known_unprivileged = unpriv;
    return unpriv;
}

/* Ioctl form first; on -EOPNOTSUPP (kernel without it, or without the
 * legacy opcodes) try the other form once and remember which one works. */
static int ctrl_cmd_locked(struct ublk_ctrl *c, const struct ctrl_req *r)
{
    bool legacy = c->legacy && r->nr;
    int ret = ctrl_submit(c, legacy ? r->nr : r->ioctl_op, r);
    if (ret == -EOPNOTSUPP && r->nr) {
        int again = ctrl_submit(c, legacy ? r->ioctl_op : r->nr, r);
        if (again != -EOPNOTSUPP) {
            c->legacy = !legacy;
            ret = again;
            legacy = !legacy;
        }
    }
    if (ret >= 0 && !legacy)
        c->ioctl_ok = true;
    return ret;
}

static int ctrl_cmd(struct ublk_ctrl *c, const struct ctrl_req *r)
{
    pthread_mutex_lock(&c->lock);
    int ret = ctrl_cmd_locked(c, r);
    pthread_mutex_unlock(&c->lock);
    return ret;
}

int ublk_ctrl_open(struct ublk_ctrl **out)
{
    *out = NULL;
    int fd = open(UBLK_CTRL_DEV, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        if (err == ENOENT || err == ENODEV || err == ENXIO)
            uq_error("no ublk in this kernel (%s is missing): load it with 'modprobe ublk_drv'",
                     UBLK_CTRL_DEV);
        else if (err == EACCES || err == EPERM)
            uq_error("cannot open %s: %s (ublk needs root, or a udev rule that opens it to "
                     "users for unprivileged devices: see the ublk-qcow2 udev rule)",
                     UBLK_CTRL_DEV, strerror(err));
        else
            uq_error("cannot open %s: %s", UBLK_CTRL_DEV, strerror(err));
        return -err;
    }
    struct ublk_ctrl *c = calloc(1, sizeof(*c));
    if (!c) {
        close(fd);
        return -ENOMEM;
    }
    c->fd = fd;
    c->known_unprivileged = -1;
    pthread_mutexattr_t ma;
    pthread_mutexattr_init(&ma);
    /* Recursive: asking whether a device is unprivileged sends a command
     * from inside another. */
    pthread_mutexattr_settype(&ma, PTHREAD_MUTEX_RECURSIVE);
    pthread_mutex_init(&c->lock, &ma);
    pthread_mutexattr_destroy(&ma);
    /* Control commands carry an 80-byte payload: they need 128-byte SQEs. */
    int ret = io_uring_queue_init(4, &c->ring, IORING_SETUP_SQE128);
    if (ret < 0) {
        uq_error("cannot create an io_uring with 128-byte SQEs: %s (kernel too old for ublk?)",
                 strerror(-ret));
        close(fd);
        free(c);
        return ret;
    }

    /* GET_FEATURES exists only in ioctl form (6.5+); any error means an
     * older kernel, whose control commands then go out as legacy opcodes. */
    uint64_t features = 0;
    struct ctrl_req r = {
        .ioctl_op = UBLK_U_CMD_GET_FEATURES, .dev_id = (uint32_t)-1,
        .buf = &features, .len = sizeof(features),
    };
    ret = ctrl_submit(c, r.ioctl_op, &r);
    if (ret >= 0) {
        c->features = features;
        c->features_known = true;
        c->ioctl_ok = true;
        c->legacy = !(features & UBLK_F_CMD_IOCTL_ENCODE);
    } else {
        c->features = UBLK_F_BASELINE;
        c->legacy = true;
    }
    *out = c;
    return 0;
}

void ublk_ctrl_close(struct ublk_ctrl *c)
{
    if (!c)
        return;
    io_uring_queue_exit(&c->ring);
    close(c->fd);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

bool ublk_ctrl_features(const struct ublk_ctrl *c, uint64_t *features)
{
    *features = c->features;
    return c->features_known;
}

void ublk_ctrl_force_legacy(struct ublk_ctrl *c)
{
    c->legacy = true;
    c->ioctl_ok = false;
}

bool ublk_ctrl_uses_ioctl_encoding(const struct ublk_ctrl *c)
{
    return c->ioctl_ok && !c->legacy;
}

int ublk_ctrl_add_dev(struct ublk_ctrl *c, struct ublksrv_ctrl_dev_info *info)
{
    struct ctrl_req r = {
        .nr = UBLK_CMD_ADD_DEV, .ioctl_op = UBLK_U_CMD_ADD_DEV,
        .dev_id = info->dev_id,     /* the kernel checks it matches info */
        .buf = info, .len = sizeof(*info),
    };
    int ret = ctrl_cmd(c, &r);
    if (ret >= 0) {
        c->known_id = info->dev_id;
        c->known_unprivileged = !!(info->flags & UBLK_F_UNPRIVILEGED_DEV);
    }
    return ret;
}

int ublk_ctrl_del_dev(struct ublk_ctrl *c, uint32_t dev_id)
{
    struct ctrl_req r = { .nr = UBLK_CMD_DEL_DEV, .ioctl_op = UBLK_U_CMD_DEL_DEV, .dev_id = dev_id };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_get_dev_info(struct ublk_ctrl *c, uint32_t dev_id, struct ublksrv_ctrl_dev_info *info)
{
    memset(info, 0, sizeof(*info));
    struct ctrl_req r = {
        .nr = UBLK_CMD_GET_DEV_INFO, .ioctl_op = UBLK_U_CMD_GET_DEV_INFO,
        .dev_id = dev_id, .buf = info, .len = sizeof(*info),
    };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_set_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params)
{
    struct ctrl_req r = {
        .nr = UBLK_CMD_SET_PARAMS, .ioctl_op = UBLK_U_CMD_SET_PARAMS,
        .dev_id = dev_id, .buf = params, .len = params->len,
    };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_get_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params)
{
    struct ctrl_req r = {
        .nr = UBLK_CMD_GET_PARAMS, .ioctl_op = UBLK_U_CMD_GET_PARAMS,
        .dev_id = dev_id, .buf = params, .len = params->len,
    };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_start_dev(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid)
{
    struct ctrl_req r = {
        .nr = UBLK_CMD_START_DEV, .ioctl_op = UBLK_U_CMD_START_DEV,
        .dev_id = dev_id, .data0 = (uint64_t)daemon_pid,
    };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_stop_dev(struct ublk_ctrl *c, uint32_t dev_id)
{
    struct ctrl_req r = { .nr = UBLK_CMD_STOP_DEV, .ioctl_op = UBLK_U_CMD_STOP_DEV, .dev_id = dev_id };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_try_stop_dev(struct ublk_ctrl *c, uint32_t dev_id)
{
    struct ctrl_req r = { .ioctl_op = UBLK_U_CMD_TRY_STOP_DEV, .dev_id = dev_id };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_del_dev_nowait(struct ublk_ctrl *c, uint32_t dev_id)
{
    struct ctrl_req r = { .ioctl_op = UBLK_U_CMD_DEL_DEV_ASYNC, .dev_id = dev_id };
    int ret = c->legacy ? -EOPNOTSUPP : ctrl_cmd(c, &r);
    return ret == -EOPNOTSUPP || ret == -EINVAL ? ublk_ctrl_del_dev(c, dev_id) : ret;
}

int ublk_ctrl_start_user_recovery(struct ublk_ctrl *c, uint32_t dev_id)
{
    struct ctrl_req r = {
        .nr = UBLK_CMD_START_USER_RECOVERY, .ioctl_op = UBLK_U_CMD_START_USER_RECOVERY,
        .dev_id = dev_id,
    };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_end_user_recovery(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid)
{
    struct ctrl_req r = {
        .nr = UBLK_CMD_END_USER_RECOVERY, .ioctl_op = UBLK_U_CMD_END_USER_RECOVERY,
        .dev_id = dev_id, .data0 = (uint64_t)daemon_pid,
    };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_update_size(struct ublk_ctrl *c, uint32_t dev_id, uint64_t sectors)
{
    /* Only in ioctl form (the command is newer than the legacy opcodes). */
    struct ctrl_req r = { .ioctl_op = UBLK_U_CMD_UPDATE_SIZE, .dev_id = dev_id, .data0 = sectors };
    return ctrl_cmd(c, &r);
}

int ublk_ctrl_quiesce_dev(struct ublk_ctrl *c, uint32_t dev_id, uint32_t timeout_ms)
{
    /* Only in ioctl form, like UPDATE_SIZE. */
    struct ctrl_req r = { .ioctl_op = UBLK_U_CMD_QUIESCE_DEV, .dev_id = dev_id, .data0 = timeout_ms };
    return ctrl_cmd(c, &r);
}

const char *ublk_feature_name(unsigned bit)
{
    /* UBLK_F_* bit names, from include/uapi/linux/ublk_cmd.h (bits 14-19: Linux 7.x). */
    static const char *const names[] = {
        "support_zero_copy", "uring_cmd_comp_in_task", "need_get_data", "user_recovery",
        "user_recovery_reissue", "unprivileged_dev", "cmd_ioctl_encode", "user_copy", "zoned",
        "user_recovery_fail_io", "update_size", "auto_buf_reg", "quiesce", "per_io_daemon",
        "buf_reg_off_daemon", "batch_io", "integrity", "safe_stop_dev", "no_auto_part_scan",
        "shmem_zc",
    };
    return bit < sizeof(names) / sizeof(names[0]) ? names[bit] : NULL;
}

void ublk_put_feature_names(FILE *out, uint64_t flags)
{
    const char *sep = "";
    fprintf(out, "[");
    for (unsigned i = 0; i < 64; i++) {
        if (!(flags & (1ULL << i)))
            continue;
        const char *name = ublk_feature_name(i);
        if (name)
            fprintf(out, "%s\"%s\"", sep, name);
        else
            fprintf(out, "%s\"bit%u\"", sep, i);
        sep = ", ";
    }
    fprintf(out, "]");
}

const char *ublk_state_name(unsigned state)
{
    switch (state) {
    case UBLK_S_DEV_DEAD: return "DEAD";
    case UBLK_S_DEV_LIVE: return "LIVE";
    case UBLK_S_DEV_QUIESCED: return "QUIESCED";
    case UBLK_S_DEV_FAIL_IO: return "FAIL_IO";
    default: return "?";
    }
}
