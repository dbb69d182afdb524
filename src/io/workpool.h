/* A small pool of worker threads for CPU-heavy work (cluster compression and
 * decompression), so an engine thread keeps serving other requests meanwhile.
 *
 * The engine stays lock-free: a coroutine hands a job to the pool and parks;
 * the worker runs it and posts it back through the submitter's port (a
 * mailbox, src/io/mailbox.h: a lock-free list plus an eventfd the loop reads),
 * and a poller coroutine on the submitter's thread wakes the job's owner.
 * Only the pool's own queue has a mutex, held for a list push or pop; no
 * worker ever touches engine state (jobs carry their own buffers).
 *
 * Pool size: wp_set_threads() before first use, else the environment
 * UBLK_QCOW2_COMPRESS_THREADS, else the number of online CPUs (at most 16).
 * 0 threads: jobs run inline on the submitting thread.
 */
#ifndef UQ_IO_WORKPOOL_H
#define UQ_IO_WORKPOOL_H

#include <stdbool.h>

#include "io/mailbox.h"

struct co;
struct wp_job {
    struct mbox_msg msg;        /* first: the worker posts it back */
    void (*fn)(struct wp_job *j);   /* runs on a worker thread */
    struct wp_job *qnext;       /* pool queue */
    struct wp_port *port;       /* where it comes back to */
    struct co *waiter;          /* the owner, parked in wp_wait (else NULL) */
    bool done;
};

/* Where completions come back to: one per engine (its thread's loop polls it). */
struct wp_port {
    struct mailbox *mb;
    unsigned outstanding;       /* jobs submitted, not yet taken back */
    bool polling;               /* a poller coroutine is running */
};

int wp_port_init(struct wp_port *p);      /* -errno */
void wp_port_destroy(struct wp_port *p);  /* no job may be outstanding */

/* Set the number of worker threads (0: run jobs inline).  Takes effect if
 * the pool has not started yet; returns -EBUSY otherwise. */
int wp_set_threads(int n);
/* Workers below the serving threads (true, the default: latency of other
 * requests first) or at normal priority (false: a batch job such as
 * convert, whose work the compression is).  Before the pool starts. */
void wp_set_background(bool background);
/* The number of worker threads the pool has (or will have). */
int wp_threads(void);

/* Run j->fn on a worker and return when it is done: the calling coroutine
 * parks meanwhile (outside a coroutine the thread blocks on the port). */
void wp_run(struct wp_port *p, struct wp_job *j);

/* Submit without waiting / wait for one submitted job (the same split for
 * callers that keep several jobs in flight from one coroutine). */
void wp_submit(struct wp_port *p, struct wp_job *j);
void wp_wait(struct wp_port *p, struct wp_job *j);

#endif
