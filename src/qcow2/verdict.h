/* What the reference walk (repair.c) finds and repairs: the counts behind
 * qemu-img check's verdict.  The engine fills them; the checker
 * (tools/check.c) reports them. */
#ifndef UQ_QCOW2_VERDICT_H
#define UQ_QCOW2_VERDICT_H

#include <stdint.h>

/* What a check may repair. */
#define CHECK_FIX_LEAKS  (1u << 0)
#define CHECK_FIX_ERRORS (1u << 1)

struct check_result {
    uint64_t corruptions, leaks, check_errors;
    uint64_t corruptions_fixed, leaks_fixed;
    uint64_t image_end_offset;
    uint64_t total_clusters, allocated_clusters, fragmented_clusters, compressed_clusters;
};

#endif
