/* Statistics counters: written by one thread, read by any.
 *
 * The writer's update is a plain load and store (no locked instruction on
 * the data path); readers see each value whole, though a set of counters
 * read one after another is not a consistent snapshot. */
#ifndef UQ_IO_STAT_H
#define UQ_IO_STAT_H

#include <stdatomic.h>
#include <stdint.h>

typedef _Atomic uint64_t stat_counter;

/* Only the counter's one writer thread may call this. */
static inline void stat_add(stat_counter *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}

static inline void stat_sub(stat_counter *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) - n,
                          memory_order_relaxed);
}

static inline uint64_t stat_get(const stat_counter *c)
{
    return atomic_load_explicit((stat_counter *)c, memory_order_relaxed);
}

#endif
