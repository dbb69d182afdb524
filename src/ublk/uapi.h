/* The ublk kernel interface: the system's <linux/ublk_cmd.h> plus what an
 * older header (linux-libc-dev 6.1) lacks.  Values are the kernel's ABI. */
#ifndef UQ_UBLK_UAPI_H
#define UQ_UBLK_UAPI_H

#include <linux/ioctl.h>
#include <linux/ublk_cmd.h>

/* Control commands without an ioctl-encoded form in 6.1 headers. */
#ifndef UBLK_CMD_GET_DEV_INFO2
#define UBLK_CMD_GET_DEV_INFO2 0x12
#endif
#define UQ_UBLK_CMD_GET_FEATURES 0x13
#define UQ_UBLK_CMD_DEL_DEV_ASYNC 0x14
#define UQ_UBLK_CMD_UPDATE_SIZE 0x15
#define UQ_UBLK_CMD_QUIESCE_DEV 0x16
#define UQ_UBLK_CMD_TRY_STOP_DEV 0x17

/* Ioctl-encoded control opcodes (kernel >= 6.4): type 'u', nr = legacy op. */
#ifndef UBLK_U_CMD_GET_QUEUE_AFFINITY
#define UBLK_U_CMD_GET_QUEUE_AFFINITY _IOR('u', UBLK_CMD_GET_QUEUE_AFFINITY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO _IOR('u', UBLK_CMD_GET_DEV_INFO, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_ADD_DEV _IOWR('u', UBLK_CMD_ADD_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_DEL_DEV _IOWR('u', UBLK_CMD_DEL_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_DEV _IOWR('u', UBLK_CMD_START_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_STOP_DEV _IOWR('u', UBLK_CMD_STOP_DEV, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_SET_PARAMS _IOWR('u', UBLK_CMD_SET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_PARAMS _IOR('u', UBLK_CMD_GET_PARAMS, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_START_USER_RECOVERY _IOWR('u', UBLK_CMD_START_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_END_USER_RECOVERY _IOWR('u', UBLK_CMD_END_USER_RECOVERY, struct ublksrv_ctrl_cmd)
#define UBLK_U_CMD_GET_DEV_INFO2 _IOR('u', UBLK_CMD_GET_DEV_INFO2, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_GET_FEATURES
#define UBLK_U_CMD_GET_FEATURES _IOR('u', UQ_UBLK_CMD_GET_FEATURES, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_DEL_DEV_ASYNC
#define UBLK_U_CMD_DEL_DEV_ASYNC _IOR('u', UQ_UBLK_CMD_DEL_DEV_ASYNC, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_UPDATE_SIZE
#define UBLK_U_CMD_UPDATE_SIZE _IOWR('u', UQ_UBLK_CMD_UPDATE_SIZE, struct ublksrv_ctrl_cmd)
#endif
#ifndef UBLK_U_CMD_QUIESCE_DEV
#define UBLK_U_CMD_QUIESCE_DEV _IOWR('u', UQ_UBLK_CMD_QUIESCE_DEV, struct ublksrv_ctrl_cmd)
#endif

/* STOP_DEV unless the block device is open (-EBUSY then); Linux 7.0+,
 * every device there has UBLK_F_SAFE_STOP_DEV. */
#ifndef UBLK_U_CMD_TRY_STOP_DEV
#define UBLK_U_CMD_TRY_STOP_DEV _IOWR('u', UQ_UBLK_CMD_TRY_STOP_DEV, struct ublksrv_ctrl_cmd)
#endif

/* GET_FEATURES writes this many bytes. */
#ifndef UBLK_FEATURES_LEN
#define UBLK_FEATURES_LEN 8
#endif

/* I/O commands, ioctl-encoded (kernel >= 6.4). */
#ifndef UBLK_U_IO_FETCH_REQ
#define UBLK_U_IO_FETCH_REQ _IOWR('u', UBLK_IO_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_COMMIT_AND_FETCH_REQ _IOWR('u', UBLK_IO_COMMIT_AND_FETCH_REQ, struct ublksrv_io_cmd)
#define UBLK_U_IO_NEED_GET_DATA _IOWR('u', UBLK_IO_NEED_GET_DATA, struct ublksrv_io_cmd)
#endif
#ifndef UBLK_U_IO_REGISTER_IO_BUF
#define UBLK_U_IO_REGISTER_IO_BUF _IOWR('u', 0x23, struct ublksrv_io_cmd)
#define UBLK_U_IO_UNREGISTER_IO_BUF _IOWR('u', 0x24, struct ublksrv_io_cmd)
#endif

/* Feature flags newer than 6.1 (version that added each in the comment). */
#ifndef UBLK_F_UNPRIVILEGED_DEV
#define UBLK_F_UNPRIVILEGED_DEV (1ULL << 5)         /* 6.3 */
#endif
#ifndef UBLK_F_CMD_IOCTL_ENCODE
#define UBLK_F_CMD_IOCTL_ENCODE (1ULL << 6)         /* 6.4 */
#endif
#ifndef UBLK_F_USER_COPY
#define UBLK_F_USER_COPY (1ULL << 7)                /* 6.5 */
#endif
#ifndef UBLK_F_ZONED
#define UBLK_F_ZONED (1ULL << 8)                    /* 6.6 */
#endif
#ifndef UBLK_F_USER_RECOVERY_FAIL_IO
#define UBLK_F_USER_RECOVERY_FAIL_IO (1ULL << 9)    /* 6.13 */
#endif
#ifndef UBLK_F_UPDATE_SIZE
#define UBLK_F_UPDATE_SIZE (1ULL << 10)
#endif
#ifndef UBLK_F_AUTO_BUF_REG
#define UBLK_F_AUTO_BUF_REG (1ULL << 11)
#endif
#ifndef UBLK_F_QUIESCE
#define UBLK_F_QUIESCE (1ULL << 12)
#endif
#ifndef UBLK_F_PER_IO_DAEMON
#define UBLK_F_PER_IO_DAEMON (1ULL << 13)           /* 6.16 */
#endif

#ifndef UBLK_F_BUF_REG_OFF_DAEMON
#define UBLK_F_BUF_REG_OFF_DAEMON (1ULL << 14)
#endif
#ifndef UBLK_F_BATCH_IO
#define UBLK_F_BATCH_IO (1ULL << 15)                /* 7.0 */
#endif

/* UBLK_F_BATCH_IO (Linux 7.0): requests are prepared, fetched and committed
 * per queue in batches instead of per tag (FETCH_REQ and COMMIT_AND_FETCH_REQ
 * are refused on such a device).  PREP_IO_CMDS and COMMIT_IO_CMDS take an
 * array of elements at the SQE's addr (nr_elem of elem_bytes each: the
 * header, then the buffer address with HAS_BUF_ADDR); PREP answers 0, COMMIT
 * the bytes of the elements it handled (it stops at the first it refuses).
 * FETCH_IO_CMDS is multishot (IORING_URING_CMD_MULTISHOT, a provided buffer
 * group in the SQE's buf_group): each CQE brings 16-bit tags. */
#ifndef UBLK_U_IO_PREP_IO_CMDS
struct ublk_elem_header {
    __u16 tag;
    __u16 buf_index;        /* UBLK_F_AUTO_BUF_REG: slot for the tag's next request */
    __s32 result;           /* COMMIT only */
};
struct ublk_batch_io {
    __u16 q_id;
    __u16 flags;
    __u16 nr_elem;
    __u8 elem_bytes;
    __u8 reserved;
    __u64 reserved2;
};
#define UBLK_BATCH_F_HAS_ZONE_LBA (1 << 0)
#define UBLK_BATCH_F_HAS_BUF_ADDR (1 << 1)
#define UBLK_BATCH_F_AUTO_BUF_REG_FALLBACK (1 << 2)
#define UBLK_U_IO_PREP_IO_CMDS _IOWR('u', 0x25, struct ublk_batch_io)
#define UBLK_U_IO_COMMIT_IO_CMDS _IOWR('u', 0x26, struct ublk_batch_io)
#define UBLK_U_IO_FETCH_IO_CMDS _IOWR('u', 0x27, struct ublk_batch_io)
#endif
/* io_uring: a URING_CMD that completes many times (FETCH_IO_CMDS needs it). */
#ifndef IORING_URING_CMD_MULTISHOT
#define IORING_URING_CMD_MULTISHOT (1U << 1)
#endif

/* UBLK_F_USER_COPY: a request's data is read or written with pread/pwrite
 * on /dev/ublkcN at UBLKSRV_IO_BUF_OFFSET + (qid << QID_OFF) +
 * (tag << TAG_OFF) + the offset within the request. */
#ifndef UBLK_TAG_OFF
#define UBLK_IO_BUF_BITS 25
#define UBLK_TAG_OFF UBLK_IO_BUF_BITS
#define UBLK_TAG_BITS 16
#define UBLK_QID_OFF (UBLK_TAG_OFF + UBLK_TAG_BITS)
#endif

/* UBLK_F_AUTO_BUF_REG: FETCH_REQ / COMMIT_AND_FETCH_REQ carry in the SQE's addr the
 * slot (bits 0-15) of the issuing ring's buffer table where the kernel
 * installs the next request's pages, and flags (bits 16-23). */
#ifndef UBLK_AUTO_BUF_REG_FALLBACK
#define UBLK_AUTO_BUF_REG_FALLBACK (1 << 0)
#endif
/* In a descriptor's flags: automatic registration failed (with FALLBACK
 * asked for); the request's data is reachable by user copy only. */
#ifndef UBLK_IO_F_NEED_REG_BUF
#define UBLK_IO_F_NEED_REG_BUF (1U << 17)
#endif
static inline unsigned long long ublk_auto_buf_reg_addr(unsigned index, unsigned flags)
{
    return (unsigned long long)(index & 0xffff) | (unsigned long long)(flags & 0xff) << 16;
}
static inline unsigned long long ublk_user_copy_pos(unsigned qid, unsigned tag, unsigned long long off)
{
    return UBLKSRV_IO_BUF_OFFSET + ((unsigned long long)qid << UBLK_QID_OFF) +
           ((unsigned long long)tag << UBLK_TAG_OFF) + off;
}

#ifndef UBLK_F_SAFE_STOP_DEV
#define UBLK_F_SAFE_STOP_DEV (1ULL << 17)           /* 7.0 */
#endif

#ifndef UBLK_S_DEV_FAIL_IO
#define UBLK_S_DEV_FAIL_IO 3
#endif

/* Fields newer than the 6.1 header, at their ABI places (little endian):
 * ublksrv_ctrl_cmd.dev_path_len is the low 16 bits of data[1] there (6.3),
 * ublksrv_ctrl_dev_info.owner_uid/owner_gid are reserved0 (6.3). */
#include <stdint.h>
#include <string.h>
static inline void ublk_cmd_set_dev_path_len(struct ublksrv_ctrl_cmd *c, uint16_t len)
{
    c->data[1] = len;       /* with pad and reserved zero */
}
static inline uint32_t ublk_info_owner_uid(const struct ublksrv_ctrl_dev_info *i)
{
    uint32_t v[2];
    memcpy(v, &i->reserved0, sizeof(v));
    return v[0];
}
static inline uint32_t ublk_info_owner_gid(const struct ublksrv_ctrl_dev_info *i)
{
    uint32_t v[2];
    memcpy(v, &i->reserved0, sizeof(v));
    return v[1];
}

#endif
