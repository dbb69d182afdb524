/* NBD message parsing and checks: pure functions on buffers, no I/O, so the
 * server and the fuzz target (tests/fuzz/fuzz_nbd.c) share them. */
#include <errno.h>

#include "nbd/proto.h"

void nbd_parse_opt_hdr(const uint8_t *p, struct nbd_opt_hdr *o)
{
    o->magic = nbd_get64(p);
    o->opt = nbd_get32(p + 8);
    o->len = nbd_get32(p + 12);
}

uint32_t nbd_parse_info_req(const uint8_t *data, uint32_t len, struct nbd_info_req *out,
                            const char **why)
{
    uint32_t namelen;
    uint16_t nreq;

    *out = (struct nbd_info_req){ 0 };
    /* u32 name length, name, u16 number of requests, u16 each */
    if (len < 6) {
        *why = "option data too short";
        return NBD_REP_ERR_INVALID;
    }
    namelen = nbd_get32(data);
    if (namelen > len - 6) {
        *why = "export name length exceeds the option";
        return NBD_REP_ERR_INVALID;
    }
    nreq = nbd_get16(data + 4 + namelen);
    if (4ull + namelen + 2 + 2ull * nreq != len) {
        *why = "option length does not match its contents";
        return NBD_REP_ERR_INVALID;
    }
    out->name = data + 4;
    out->namelen = namelen;
    for (uint16_t i = 0; i < nreq; i++) {
        switch (nbd_get16(data + 4 + namelen + 2 + 2 * i)) {
        case NBD_INFO_NAME:        out->want_name = true; break;
        case NBD_INFO_DESCRIPTION: out->want_desc = true; break;
        case NBD_INFO_BLOCK_SIZE:  out->want_block = true; break;
        default: break;            /* unknown or always sent: ignore */
        }
    }
    return 0;
}

void nbd_parse_request(const uint8_t *p, struct nbd_request *r)
{
    r->magic = nbd_get32(p);
    r->flags = nbd_get16(p + 4);
    r->type = nbd_get16(p + 6);
    r->cookie = nbd_get64(p + 8);
    r->off = nbd_get64(p + 16);
    r->len = nbd_get32(p + 24);
}

int nbd_check_request(uint16_t flags, uint64_t off, uint32_t len, uint16_t allowed_flags,
                      bool writes, bool read_only, uint64_t size)
{
    if (flags & ~allowed_flags)
        return -EINVAL;
    if (writes && read_only)
        return -EPERM;
    if (off > size || len > size - off)
        return writes ? -ENOSPC : -EINVAL;     /* writes past the end: ENOSPC per the protocol */
    return 0;
}
