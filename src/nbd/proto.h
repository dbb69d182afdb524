/* NBD wire protocol: magic numbers, flags, option/command codes and the
 * byte-order helpers the server uses to build and parse messages.
 * Every field on the wire is big-endian. */
#ifndef UQ_NBD_PROTO_H
#define UQ_NBD_PROTO_H

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <endian.h>

/* ---- handshake ----------------------------------------------------------- */
#define NBD_MAGIC               0x4e42444d41474943ull   /* "NBDMAGIC" */
#define NBD_OPTS_MAGIC          0x49484156454f5054ull   /* "IHAVEOPT" */
#define NBD_REP_MAGIC           0x0003e889045565a9ull   /* option replies */

/* Handshake flags (server -> client, 16 bits). */
#define NBD_FLAG_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_NO_ZEROES      (1u << 1)
/* Client flags (client -> server, 32 bits). */
#define NBD_FLAG_C_FIXED_NEWSTYLE (1u << 0)
#define NBD_FLAG_C_NO_ZEROES      (1u << 1)

/* Transmission flags (16 bits). */
#define NBD_FLAG_HAS_FLAGS          (1u << 0)
#define NBD_FLAG_READ_ONLY          (1u << 1)
#define NBD_FLAG_SEND_FLUSH         (1u << 2)
#define NBD_FLAG_SEND_FUA           (1u << 3)
#define NBD_FLAG_ROTATIONAL         (1u << 4)
#define NBD_FLAG_SEND_TRIM          (1u << 5)
#define NBD_FLAG_SEND_WRITE_ZEROES  (1u << 6)
#define NBD_FLAG_SEND_DF            (1u << 7)
#define NBD_FLAG_CAN_MULTI_CONN     (1u << 8)
#define NBD_FLAG_SEND_RESIZE        (1u << 9)
#define NBD_FLAG_SEND_CACHE         (1u << 10)
#define NBD_FLAG_SEND_FAST_ZERO     (1u << 11)

/* Options. */
#define NBD_OPT_EXPORT_NAME         1
#define NBD_OPT_ABORT               2
#define NBD_OPT_LIST                3
#define NBD_OPT_PEEK_EXPORT         4
#define NBD_OPT_STARTTLS            5
#define NBD_OPT_INFO                6
#define NBD_OPT_GO                  7
#define NBD_OPT_STRUCTURED_REPLY    8
#define NBD_OPT_LIST_META_CONTEXT   9
#define NBD_OPT_SET_META_CONTEXT    10
#define NBD_OPT_EXTENDED_HEADERS    11

/* Option reply types; errors have bit 31 set. */
#define NBD_REP_ACK                 1
#define NBD_REP_SERVER              2
#define NBD_REP_INFO                3
#define NBD_REP_META_CONTEXT        4
#define NBD_REP_ERR(n)              ((1u << 31) | (n))
#define NBD_REP_ERR_UNSUP           NBD_REP_ERR(1)
#define NBD_REP_ERR_POLICY          NBD_REP_ERR(2)
#define NBD_REP_ERR_INVALID         NBD_REP_ERR(3)
#define NBD_REP_ERR_PLATFORM        NBD_REP_ERR(4)
#define NBD_REP_ERR_TLS_REQD        NBD_REP_ERR(5)
#define NBD_REP_ERR_UNKNOWN         NBD_REP_ERR(6)
#define NBD_REP_ERR_SHUTDOWN        NBD_REP_ERR(7)
#define NBD_REP_ERR_BLOCK_SIZE_REQD NBD_REP_ERR(8)
#define NBD_REP_ERR_TOO_BIG         NBD_REP_ERR(9)

/* Information items of NBD_OPT_INFO / NBD_OPT_GO (NBD_REP_INFO payloads). */
#define NBD_INFO_EXPORT             0   /* u64 size, u16 transmission flags */
#define NBD_INFO_NAME               1   /* string */
#define NBD_INFO_DESCRIPTION        2   /* string */
#define NBD_INFO_BLOCK_SIZE         3   /* u32 minimum, preferred, maximum */

/* Strings (export names, messages) must not exceed this. */
#define NBD_MAX_STRING              4096u

/* ---- transmission -------------------------------------------------------- */
#define NBD_REQUEST_MAGIC           0x25609513u
#define NBD_SIMPLE_REPLY_MAGIC      0x67446698u

#define NBD_REQUEST_SIZE            28u   /* magic, flags, type, cookie, offset, length */
#define NBD_SIMPLE_REPLY_SIZE       16u   /* magic, error, cookie */

/* Commands. */
#define NBD_CMD_READ                0
#define NBD_CMD_WRITE               1
#define NBD_CMD_DISC                2
#define NBD_CMD_FLUSH               3
#define NBD_CMD_TRIM                4
#define NBD_CMD_CACHE               5
#define NBD_CMD_WRITE_ZEROES        6
#define NBD_CMD_BLOCK_STATUS        7

/* Command flags. */
#define NBD_CMD_FLAG_FUA            (1u << 0)
#define NBD_CMD_FLAG_NO_HOLE        (1u << 1)
#define NBD_CMD_FLAG_DF             (1u << 2)
#define NBD_CMD_FLAG_REQ_ONE        (1u << 3)
#define NBD_CMD_FLAG_FAST_ZERO      (1u << 4)

/* Error values of replies (fixed by the protocol, not the host's errno). */
#define NBD_EPERM                   1
#define NBD_EIO                     5
#define NBD_ENOMEM                  12
#define NBD_EINVAL                  22
#define NBD_ENOSPC                  28
#define NBD_EOVERFLOW               75
#define NBD_ENOTSUP                 95
#define NBD_ESHUTDOWN               108

/* ---- parsing (proto.c: pure, no I/O) -------------------------------------- */

/* Option header of the handshake: magic, option, data length (16 bytes). */
#define NBD_OPT_HDR_SIZE            16u
struct nbd_opt_hdr {
    uint64_t magic;
    uint32_t opt, len;
};
void nbd_parse_opt_hdr(const uint8_t *p, struct nbd_opt_hdr *o);

/* The data of NBD_OPT_INFO / NBD_OPT_GO: export name and requested items. */
struct nbd_info_req {
    const uint8_t *name;        /* inside the option data, not NUL-terminated */
    uint32_t namelen;
    bool want_name, want_desc, want_block;
};
/* Returns 0, or NBD_REP_ERR_INVALID with *why naming the problem. */
uint32_t nbd_parse_info_req(const uint8_t *data, uint32_t len, struct nbd_info_req *out,
                            const char **why);

/* A transmission request header (NBD_REQUEST_SIZE bytes). */
struct nbd_request {
    uint32_t magic;
    uint16_t flags, type;
    uint64_t cookie, off;
    uint32_t len;
};
void nbd_parse_request(const uint8_t *p, struct nbd_request *r);

/* Checks common to every command: flags, permission, range against an
 * export of `size` bytes.  0 or -errno (EINVAL, EPERM, ENOSPC). */
int nbd_check_request(uint16_t flags, uint64_t off, uint32_t len, uint16_t allowed_flags,
                      bool writes, bool read_only, uint64_t size);

/* ---- byte order helpers -------------------------------------------------- */
static inline void nbd_put16(uint8_t *p, uint16_t v) { v = htobe16(v); memcpy(p, &v, 2); }
static inline void nbd_put32(uint8_t *p, uint32_t v) { v = htobe32(v); memcpy(p, &v, 4); }
static inline void nbd_put64(uint8_t *p, uint64_t v) { v = htobe64(v); memcpy(p, &v, 8); }
static inline uint16_t nbd_get16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return be16toh(v); }
static inline uint32_t nbd_get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return be32toh(v); }
static inline uint64_t nbd_get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return be64toh(v); }

#endif
