/* L2 entry classification, compressed cluster descriptors, refcount entries. */
#include "qcow2/format.h"

#define COMPRESSED_SECTOR 512ull

enum qcow2_cluster_type qcow2_l2_entry_type(const struct qcow2_header *h, uint64_t l2e, bool extl2)
{
    if (l2e & QCOW_OFLAG_COMPRESSED) {
        /* A compressed cluster may be shared by design, so it is never COPIED. */
        if (l2e & QCOW_OFLAG_COPIED)
            return QCOW2_CLUSTER_INVALID;
        return QCOW2_CLUSTER_COMPRESSED;
    }

    uint64_t reserved = L2E_STD_RESERVED_MASK;
    /* The zero flag exists only in v3 standard entries; elsewhere bit 0 is reserved. */
    if (extl2 || h->version < 3)
        reserved |= QCOW_OFLAG_ZERO;
    if (l2e & reserved)
        return QCOW2_CLUSTER_INVALID;

    uint64_t off = l2e & L2E_OFFSET_MASK;
    if (off & (h->cluster_size - 1))
        return QCOW2_CLUSTER_INVALID;
    if (l2e & QCOW_OFLAG_ZERO)
        return off ? QCOW2_CLUSTER_ZERO_ALLOC : QCOW2_CLUSTER_ZERO_PLAIN;
    if (off == 0) {
        /* Host offset 0 with COPIED is only legal with an external data file,
         * where it is guest cluster 0's data (all data clusters there have
         * refcount 1, so COPIED tells it from an unallocated entry). */
        if (l2e & QCOW_OFLAG_COPIED)
            return h->incompatible_features & QCOW2_INCOMPAT_DATA_FILE ? QCOW2_CLUSTER_NORMAL
                                                                      : QCOW2_CLUSTER_INVALID;
        return QCOW2_CLUSTER_UNALLOCATED;
    }
    return QCOW2_CLUSTER_NORMAL;
}

void qcow2_compressed_desc(const struct qcow2_header *h, uint64_t l2e,
                           uint64_t *host_off, uint64_t *nbytes)
{
    uint64_t off = l2e & h->cluster_offset_mask;
    uint64_t sectors = ((l2e >> h->csize_shift) & h->csize_mask) + 1;

    /* The sector count includes the sector holding `off`, so subtract the
     * part of that sector before the data starts. */
    *host_off = off;
    *nbytes = sectors * COMPRESSED_SECTOR - (off & (COMPRESSED_SECTOR - 1));
}

uint64_t qcow2_compressed_entry(const struct qcow2_header *h, uint64_t host_off, uint64_t nbytes)
{
    /* Returns 0 (not a compressed entry) if the data cannot be described. */
    if (nbytes == 0 || host_off > h->cluster_offset_mask || host_off >> 56)
        return 0;
    uint64_t first = host_off & (COMPRESSED_SECTOR - 1);
    uint64_t sectors = (first + nbytes + COMPRESSED_SECTOR - 1) / COMPRESSED_SECTOR;
    if (sectors - 1 > h->csize_mask)
        return 0;
    return QCOW_OFLAG_COMPRESSED | ((sectors - 1) << h->csize_shift) | host_off;
}

uint64_t qcow2_refcount_get(const uint8_t *block, uint32_t refcount_order, uint64_t index)
{
    switch (refcount_order) {
    case 0: case 1: case 2: {
        /* Sub-byte widths pack from the least significant bit of each byte. */
        uint32_t bits = 1u << refcount_order;
        uint32_t shift = (uint32_t)(index & ((8u >> refcount_order) - 1)) * bits;
        uint8_t byte = block[index >> (3 - refcount_order)];
        return (byte >> shift) & ((1u << bits) - 1);
    }
    case 3:
        return block[index];
    case 4:
        return be16_load(block + index * 2);
    case 5:
        return be32_load(block + index * 4);
    default:
        return be64_load(block + index * 8);
    }
}

void qcow2_refcount_set(uint8_t *block, uint32_t refcount_order, uint64_t index, uint64_t value)
{
    switch (refcount_order) {
    case 0: case 1: case 2: {
        uint32_t bits = 1u << refcount_order;
        uint32_t shift = (uint32_t)(index & ((8u >> refcount_order) - 1)) * bits;
        uint8_t mask = (uint8_t)(((1u << bits) - 1) << shift);
        uint8_t *p = &block[index >> (3 - refcount_order)];
        *p = (uint8_t)((*p & ~mask) | ((value << shift) & mask));
        break;
    }
    case 3:
        block[index] = (uint8_t)value;
        break;
    case 4:
        be16_store(block + index * 2, (uint16_t)value);
        break;
    case 5:
        be32_store(block + index * 4, (uint32_t)value);
        break;
    default:
        be64_store(block + index * 8, value);
        break;
    }
}
