/* libFuzzer target for the qcow2 header and snapshot table parsers.
 * Built by `make fuzz` (build/fuzz/fuzz_header) and run by tests/fuzz/t_fuzz.sh
 * from the seeds in tests/fuzz/corpus_header (real qemu-img headers):
 *   build/fuzz/fuzz_header -max_total_time=30 /tmp/corpus tests/fuzz/corpus_header
 * (the first directory collects new inputs).
 * Input: 8 bytes of file size, then the header cluster bytes.  When the header
 * parses, the bytes after the header cluster (if any) are fed to the snapshot
 * table parser, and derived geometry is exercised on entry helpers. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2/format.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct qcow2_header h;
    char err[256];

    if (size < 8)
        return 0;
    uint64_t file_size = be64_load(data);
    data += 8;
    size -= 8;

    /* Copy to an exact-size heap buffer so ASan sees any overread. */
    uint8_t *buf = malloc(size ? size : 1);
    if (!buf)
        return 0;
    memcpy(buf, data, size);
    if (qcow2_header_parse(buf, size, file_size, &h, err, sizeof(err)) == 0) {
        /* Invariants the engine relies on. */
        if (h.cluster_bits < QCOW2_MIN_CLUSTER_BITS || h.cluster_bits > QCOW2_MAX_CLUSTER_BITS ||
            h.l1_size < h.l1_size_needed || h.ext_end > size ||
            strlen(h.backing_file) > QCOW2_MAX_BACKING_NAME)
            abort();

        uint8_t copy[QCOW2_V3_MIN_HEADER_LEN + 8];
        size_t n = size < sizeof(copy) ? size : sizeof(copy);
        memcpy(copy, buf, n);
        if (n >= h.header_length && n >= QCOW2_V2_HEADER_LEN)
            qcow2_header_store(&h, copy);

        uint64_t v = file_size ^ (file_size << 17);
        uint64_t off, nb;
        if (qcow2_l2_entry_type(&h, v, false) == QCOW2_CLUSTER_COMPRESSED) {
            qcow2_compressed_desc(&h, v, &off, &nb);
            if (nb == 0 || off > h.cluster_offset_mask)
                abort();
        }

        size_t hdr = h.cluster_size < size ? (size_t)h.cluster_size : size;
        struct qcow2_snapshot *sn = NULL;
        uint32_t nbs = h.nb_snapshots ? h.nb_snapshots : (uint32_t)(file_size & 7);
        if (qcow2_snapshots_parse(&h, buf + hdr, size - hdr, nbs, &sn, err, sizeof(err)) == 0)
            qcow2_snapshots_free(sn, nbs);
        else if (sn)
            abort();
    }
    free(buf);
    return 0;
}
