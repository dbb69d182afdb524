/* The ublk control path: commands to /dev/ublk-control sent as
 * IORING_OP_URING_CMD on a private IORING_SETUP_SQE128 ring, one at a time
 * and synchronously (device setup and teardown only; never on the data path).
 *
 * Opcodes: the ioctl-encoded form (UBLK_U_CMD_*, kernel >= 6.4) is tried
 * first; kernels that refuse it get the legacy plain opcode.
 *
 * Return values: >= 0 success, -errno error.
 */
#ifndef UQ_UBLK_KERNEL_CTRL_H
#define UQ_UBLK_KERNEL_CTRL_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "ublk/uapi.h"

#define UBLK_CTRL_DEV "/dev/ublk-control"

struct ublk_ctrl;

/* Open /dev/ublk-control and ask the kernel for its features.  On failure
 * prints why to stderr (no ublk in this kernel, not root, ...) and returns
 * -errno. */
int ublk_ctrl_open(struct ublk_ctrl **out);
void ublk_ctrl_close(struct ublk_ctrl *c);

/* UBLK_F_* the kernel supports (GET_FEATURES, kernel >= 6.5).  Before 6.5
 * the answer is unknown: returns false and *features is the 6.1 baseline. */
bool ublk_ctrl_features(const struct ublk_ctrl *c, uint64_t *features);

/* Tests: send legacy plain opcodes only (the fallback path). */
void ublk_ctrl_force_legacy(struct ublk_ctrl *c);
/* True once the kernel has accepted an ioctl-encoded command. */
bool ublk_ctrl_uses_ioctl_encoding(const struct ublk_ctrl *c);

/* ADD_DEV: info->dev_id = UBLK_DEV_ID_AUTO lets the kernel pick one.  The
 * kernel's view (dev_id, clamped queue count, granted flags) is copied back
 * into *info.  /dev/ublkcN appears. */
#define UBLK_DEV_ID_AUTO UINT32_MAX
int ublk_ctrl_add_dev(struct ublk_ctrl *c, struct ublksrv_ctrl_dev_info *info);
int ublk_ctrl_del_dev(struct ublk_ctrl *c, uint32_t dev_id);
int ublk_ctrl_get_dev_info(struct ublk_ctrl *c, uint32_t dev_id, struct ublksrv_ctrl_dev_info *info);

/* params->len and params->types must be set. */
int ublk_ctrl_set_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params);
int ublk_ctrl_get_params(struct ublk_ctrl *c, uint32_t dev_id, struct ublk_params *params);

/* START_DEV blocks until every queue has fetched all its tags; daemon_pid
 * is the process serving the queues.  /dev/ublkbN appears. */
int ublk_ctrl_start_dev(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid);
/* Removes /dev/ublkbN and aborts the queues' pending fetches. */
int ublk_ctrl_stop_dev(struct ublk_ctrl *c, uint32_t dev_id);
/* TRY_STOP_DEV (UBLK_F_SAFE_STOP_DEV): STOP_DEV, or -EBUSY if the block
 * device or a partition is open (mounted, a dm/md holder, a process);
 * the check and the stop are one step in the kernel. */
int ublk_ctrl_try_stop_dev(struct ublk_ctrl *c, uint32_t dev_id);
/* DEL_DEV_ASYNC (6.9+) where the kernel has it, else DEL_DEV: the device
 * goes once its last user (a forced-away mount) lets go, without waiting. */
int ublk_ctrl_del_dev_nowait(struct ublk_ctrl *c, uint32_t dev_id);

/* Crash recovery (UBLK_F_USER_RECOVERY*): a new daemon takes over a
 * quiesced device. */
int ublk_ctrl_start_user_recovery(struct ublk_ctrl *c, uint32_t dev_id);
int ublk_ctrl_end_user_recovery(struct ublk_ctrl *c, uint32_t dev_id, pid_t daemon_pid);

/* UPDATE_SIZE (UBLK_F_UPDATE_SIZE, Linux 6.16+): the live device's new
 * size in 512-byte sectors. */
int ublk_ctrl_update_size(struct ublk_ctrl *c, uint32_t dev_id, uint64_t sectors);

/* QUIESCE_DEV (UBLK_F_QUIESCE, Linux 6.16+; the device must have been
 * added with it, which needs USER_RECOVERY): the kernel stops handing
 * requests to the daemon (new ones wait, requeued), waits up to timeout_ms
 * (0: forever) until every queue has an idle tag, then completes the idle
 * tags' fetches with UBLK_IO_RES_ABORT.  Requests the daemon holds stay its
 * own to finish; the device turns QUIESCED once the daemon has exited. */
int ublk_ctrl_quiesce_dev(struct ublk_ctrl *c, uint32_t dev_id, uint32_t timeout_ms);

/* "DEAD", "LIVE", "QUIESCED", "FAIL_IO" or "?". */
const char *ublk_state_name(unsigned state);
/* UBLK_F_* names (lower case, without the prefix) as a JSON array: the
 * features a device was granted (its flags), or the kernel's (GET_FEATURES). */
void ublk_put_feature_names(FILE *out, uint64_t flags);
/* The name of UBLK_F_* bit `bit` (lower case, no prefix), or NULL if unknown. */
const char *ublk_feature_name(unsigned bit);

/* The device serves requests with zero copy (see ublk/queue.h). */
static inline bool ublk_uses_zero_copy(uint64_t flags)
{
    return (flags & UBLK_F_AUTO_BUF_REG) && (flags & UBLK_F_USER_COPY);
}

/* The device fetches and commits requests in batches (see ublk/queue.h). */
static inline bool ublk_uses_batch_io(uint64_t flags)
{
    return flags & UBLK_F_BATCH_IO;
}

#endif
