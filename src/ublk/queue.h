/* The ublk I/O path: one engine thread, one coroutine per tag.
 *
 * The engine thread owns one loop (io_uring) on which the FETCH_REQ and
 * COMMIT_AND_FETCH_REQ commands of every queue's tags go out, and it runs
 * the image engine (single-threaded) in the same coroutines: a request is
 * fetched, served and committed by the thread that owns the image, with no
 * hop between threads.  `-q N` sets the device's hardware queues (blk-mq
 * contexts), not threads.  Before kernel 6.16 the task that fetched a
 * queue's tags must issue every later command for them; one task may be
 * that task for every queue.
 */
#ifndef UQ_UBLK_QUEUE_H
#define UQ_UBLK_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "img/image.h"
#include "ublk/uapi.h"

struct ublk_queues_cfg {
    uint32_t dev_id;
    unsigned nr_queues;
    unsigned depth;             /* tags per queue */
    uint32_t buf_bytes;         /* per tag: the device's max_io_buf_bytes */
    bool ioctl_encode;          /* send UBLK_U_IO_* opcodes, else legacy ones */
    /* Zero copy: the device has UBLK_F_AUTO_BUF_REG and UBLK_F_USER_COPY.
     * Each request's pages are registered in the engine's ring (slot
     * qid * depth + tag); reads and writes the image can take in place
     * (img_map) go between those pages and the file with fixed-buffer
     * I/O, the rest through a pooled bounce buffer filled and emptied by
     * pread/pwrite on /dev/ublkcN.  No per-tag buffers then. */
    bool zero_copy;
    /* Batch I/O: the device has UBLK_F_BATCH_IO.  Each queue's tags are
     * prepared at once (PREP_IO_CMDS), fetched by one multishot command
     * (FETCH_IO_CMDS) and committed in batches (COMMIT_IO_CMDS) instead of
     * FETCH_REQ and COMMIT_AND_FETCH_REQ per tag; with or without zero copy. */
    bool batch_io;
    struct image *img;
};

struct ublk_queues;

/* Open /dev/ublkcN, map each queue's descriptor array, allocate the tag
 * buffers and start the engine thread, which fetches every queue's tags.
 * Returns 0 once every thread is running (START_DEV may be sent now), or
 * -errno with a message in err; nothing is left running on failure.
 * The calling thread should block the signals it handles first: the queue
 * threads inherit its mask. */
int ublk_queues_start(const struct ublk_queues_cfg *cfg, struct ublk_queues **out,
                      char *err, size_t errlen);

/* An eventfd that becomes readable once the engine thread has finished
 * (after STOP_DEV aborted their fetches). */
int ublk_queues_done_fd(const struct ublk_queues *qs);

/* Wait for the engine thread (STOP_DEV must have been sent, or the device
 * must be going away), then unmap, close /dev/ublkcN and free.  Returns 0,
 * or the first -errno a queue hit. */
int ublk_queues_stop(struct ublk_queues *qs);

/* Requests served since start (all queues; for tests and statistics). */
uint64_t ublk_queues_served(const struct ublk_queues *qs);

/* Requests the engine executed, by kind, since start.  May be read from any
 * thread while the queues run (values read one by one, not a snapshot). */
struct ublk_io_stats {
    uint64_t reads, writes, flushes, discards, write_zeroes;
    uint64_t read_bytes, write_bytes;
    uint64_t errors;            /* requests that completed with an error */
    uint64_t in_flight;         /* requests executing in the engine now */
    /* Reads and writes whose data moved between the request's pages and
     * the image file (zero copy), and those whose data passed through a
     * buffer of the daemon (the copy path of a zero copy device, or every
     * request of a device without zero copy). */
    uint64_t zero_copy_reads, zero_copy_writes, copied_reads, copied_writes;
};
void ublk_queues_stats(const struct ublk_queues *qs, struct ublk_io_stats *st);

/* Run fn(arg) on the engine thread with the device quiesced, and wait for
 * it (any other thread; blocks the caller): new requests are held before
 * they enter the engine (they wait, none fails), the requests inside it
 * finish, fn runs (it may do the image's I/O: it is a coroutine of the
 * engine's loop, and may call the exclusive img_* operations), then the
 * held requests go on.  Returns fn's result, or -ESHUTDOWN once the queues
 * are stopping. */
int ublk_queues_exclusive(struct ublk_queues *qs, int (*fn)(void *arg), void *arg);

/* Restart: prepare to hand the device over to a new daemon (any other
 * thread; blocks the caller).  On the engine thread, the gate closes for
 * good (requests fetched from now on are held, never executed, so the
 * kernel may reissue them to the next daemon), the requests inside the
 * engine finish, the image is flushed (every acknowledged write durable)
 * and their commits reach the kernel.  Afterwards the engine serves
 * nothing; only the end of the process (closing the rings) releases the
 * tags it still has in the kernel, so ublk_queues_stop must not be called.
 * Returns 0; or the flush's -errno, with the gate open again and serving
 * as before; or -ESHUTDOWN once the queues are stopping. */
int ublk_queues_hand_over(struct ublk_queues *qs);

/* Device parameters for an image: 512-byte logical and 4 KiB physical
 * blocks, volatile cache + FUA, discard and write-zeroes unless read-only. */
void ublk_params_for_image(struct ublk_params *p, const struct image *img,
                           uint32_t buf_bytes, bool read_only);

#endif
