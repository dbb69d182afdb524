/* Stackful coroutines, one scheduler per thread.
 *
 * Every request (NBD command, ublk tag, bench job) runs as a coroutine: its
 * state machine is the code path itself, and it parks (yields) whenever it
 * waits for an I/O completion, a metadata slice being loaded, or an
 * allocation in flight on the same cluster.  Only the thread's scheduler
 * (loop_run) resumes coroutines; a coroutine never enters another directly.
 */
#ifndef UQ_IO_COROUTINE_H
#define UQ_IO_COROUTINE_H

#include <stdbool.h>
#include <stddef.h>

struct co;
typedef void (*co_fn)(void *arg);

/* Create a coroutine that will run fn(arg) when the scheduler next runs
 * ready coroutines.  Stacks are pooled; no allocation on the steady path.
 * The coroutine is released when fn returns. */
struct co *co_spawn(co_fn fn, void *arg);

/* The running coroutine, or NULL on the scheduler's own stack. */
struct co *co_self(void);
static inline bool co_in_coroutine(void) { return co_self() != NULL; }

/* Park the running coroutine until someone calls co_wake() on it. */
void co_yield(void);

/* Make co runnable; it resumes from the scheduler, never from the caller. */
void co_wake(struct co *co);

/* Run every ready coroutine until none is left ready.  Returns how many ran. */
unsigned co_run_ready(void);

/* Number of live coroutines on this thread (spawned, not yet finished). */
unsigned co_live_count(void);

/* Free this thread's pooled idle stacks (call before a thread that ran
 * coroutines exits, or their memory is lost with the thread). */
void co_pool_release(void);

/* ---- waiting lists ------------------------------------------------------ */
struct co_waiter {
    struct co *co;
    struct co_waiter *next;
};

struct co_queue {
    struct co_waiter *head, *tail;
};

#define CO_QUEUE_INIT { NULL, NULL }
/* Park until woken by co_queue_wake_*.  Must run in a coroutine. */
void co_queue_wait(struct co_queue *q);
void co_queue_wake_all(struct co_queue *q);
bool co_queue_wake_one(struct co_queue *q);
static inline bool co_queue_empty(const struct co_queue *q) { return q->head == NULL; }

/* A mutex between coroutines of one thread.  Outside a coroutine (offline
 * tools, open/close paths) it must be uncontended. */
struct co_mutex {
    bool locked;
    struct co_queue waiters;
};
#define CO_MUTEX_INIT { false, CO_QUEUE_INIT }
void co_mutex_lock(struct co_mutex *m);
void co_mutex_unlock(struct co_mutex *m);

/* Shared/exclusive lock (readers share, a writer excludes all). */
struct co_rwlock {
    unsigned readers;
    bool writer;
    unsigned writers_waiting;
    struct co_queue waiters;
};
void co_rwlock_rdlock(struct co_rwlock *l);
void co_rwlock_wrlock(struct co_rwlock *l);
void co_rwlock_unlock(struct co_rwlock *l);

#endif
