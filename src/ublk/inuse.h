/* Is a ublk block device in use, and by what: so that `del` and the
 * daemon's SIGTERM do not pull a disk from under its users.
 *
 * Users found: file systems mounted from /dev/ublkbN or a partition
 * (/proc/self/mountinfo, by major:minor or source), swap on them
 * (/proc/swaps), block devices stacked on them (dm, LVM, md: the sysfs
 * holders), and processes with them open (/proc/PID/fd).  Each is named
 * with the step that releases it.
 */
#ifndef UQ_UBLK_INUSE_H
#define UQ_UBLK_INUSE_H

#include <stddef.h>
#include <stdint.h>

#include "ublk/kernel_ctrl.h"

/* Lines "  WHAT: FIX\n" describing each user of /dev/ublkbID and its
 * partitions into why (truncated to len); returns how many were found. */
int ublk_dev_users(uint32_t id, char *why, size_t len);

/* The partitions of /dev/ublkbID ("/dev/ublkb0p1", ...), sorted by number,
 * as a NUL-separated list in buf; returns how many (0: none or no sysfs). */
int ublk_dev_partitions(uint32_t id, char *buf, size_t len);

/* Stop ublk device ID unless it is in use.  With UBLK_F_SAFE_STOP_DEV in
 * dev_flags the kernel's TRY_STOP_DEV decides (no window between check and
 * stop); otherwise the users are looked for first.  Returns 0 once
 * stopped, -EBUSY with the users in why, or another -errno. */
int ublk_stop_if_unused(struct ublk_ctrl *c, uint32_t id, uint64_t dev_flags, char *why, size_t len);

#endif
