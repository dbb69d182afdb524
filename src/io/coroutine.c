/* Stackful coroutines with a per-thread scheduler.
 *
 * A switch saves the callee-saved registers on the current stack and swaps
 * stack pointers (x86_64 only): no signal-mask syscall, no FPU state save.
 * Stacks are mmap'd with a PROT_NONE guard page below them and pooled.
 */
#include "io/coroutine.h"
#include "io/log.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

/* ASan must be told about stack switches (GCC and clang announce it differently). */
#if defined(__SANITIZE_ADDRESS__)
#define CO_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CO_ASAN 1
#endif
#endif
#ifdef CO_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#error "coroutine switch is implemented for x86_64 only"
#endif

#define CO_STACK_SIZE (256u * 1024)
#define CO_GUARD_SIZE 4096u
#define CO_POOL_MAX 256u /* idle stacks kept per thread */

enum co_state { CO_READY, CO_RUNNING, CO_PARKED, CO_DEAD };

struct co {
    void *sp;               /* saved stack pointer while switched out */
    co_fn fn;
    void *arg;
    char *map;              /* mmap base (guard page first) */
    struct co *next;        /* ready queue or free pool link */
    enum co_state state;
    bool wake_pending;      /* co_wake() while running: next yield re-queues */
#ifdef CO_ASAN
    void *asan_fake_stack;
#endif
};

struct sched {
    struct co *current;
    void *main_sp;
    struct co *ready_head, *ready_tail;
    struct co *pool;
    unsigned pool_len;
    unsigned live;
#ifdef CO_ASAN
    void *main_fake_stack;
    const void *main_bottom;
    size_t main_size;
#endif
};

static __thread struct sched sched;

/* uq_co_switch(save, to): push callee-saved registers, store rsp in *save,
 * load `to` as rsp, pop the registers saved there and return into it. */
void uq_co_switch(void **save, void *to);
__asm__(
    ".text\n"
    ".globl uq_co_switch\n"
    ".hidden uq_co_switch\n"
    ".type uq_co_switch,@function\n"
    "uq_co_switch:\n"
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n"
    ".size uq_co_switch,.-uq_co_switch\n");

static void co_fatal(const char *msg)
{
    uq_error("coroutine: %s", msg);
    abort();
}

static inline __attribute__((unused)) char *stack_lo(struct co *co) { return co->map + CO_GUARD_SIZE; }

static void ready_push(struct co *co)
{
    co->state = CO_READY;
    co->next = NULL;
    if (sched.ready_tail)
        sched.ready_tail->next = co;
    else
        sched.ready_head = co;
    sched.ready_tail = co;
}

static struct co *ready_pop(void)
{
    struct co *co = sched.ready_head;
    if (co) {
        sched.ready_head = co->next;
        if (!sched.ready_head)
            sched.ready_tail = NULL;
        co->next = NULL;
    }
    return co;
}

/* Switch from the running coroutine back to the scheduler stack. */
static void switch_to_sched(struct co *co, bool finished)
{
#ifdef CO_ASAN
    /* A finished coroutine passes NULL so ASan drops its fake stack. */
    __sanitizer_start_switch_fiber(finished ? NULL : &co->asan_fake_stack,
                                   sched.main_bottom, sched.main_size);
#endif
    uq_co_switch(&co->sp, sched.main_sp);
#ifdef CO_ASAN
    __sanitizer_finish_switch_fiber(co->asan_fake_stack, NULL, NULL);
#endif
    (void)finished;
}

static __attribute__((noreturn)) void co_entry(void)
{
#ifdef CO_ASAN
    __sanitizer_finish_switch_fiber(NULL, &sched.main_bottom, &sched.main_size);
#endif
    struct co *co = sched.current;
    co->fn(co->arg);
    co->state = CO_DEAD;
    sched.live--;
    switch_to_sched(co, true);
    __builtin_unreachable();
}

static void co_prepare_stack(struct co *co)
{
    /* Frame popped by uq_co_switch: six registers, then the return address
     * co_entry, above it a zero fake return address so co_entry starts with
     * the ABI alignment (rsp + 8 a multiple of 16). */
    uint64_t *sp = (uint64_t *)(co->map + CO_GUARD_SIZE + CO_STACK_SIZE);
    *--sp = 0;
    *--sp = (uint64_t)(uintptr_t)co_entry;
    for (int i = 0; i < 6; i++)
        *--sp = 0;
    co->sp = sp;
}

static struct co *co_alloc(void)
{
    struct co *co = sched.pool;
    if (co) {
        sched.pool = co->next;
        sched.pool_len--;
        return co;
    }
    co = calloc(1, sizeof(*co));
    if (!co)
        co_fatal("out of memory");
    co->map = mmap(NULL, CO_GUARD_SIZE + CO_STACK_SIZE, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK | MAP_NORESERVE, -1, 0);
    if (co->map == MAP_FAILED)
        co_fatal("cannot map a coroutine stack");
    if (mprotect(co->map, CO_GUARD_SIZE, PROT_NONE) != 0)
        co_fatal("cannot protect a coroutine guard page");
    return co;
}

static void co_release(struct co *co)
{
#ifdef CO_ASAN
    /* Frames abandoned on the stack may leave poisoned redzones behind. */
    ASAN_UNPOISON_MEMORY_REGION(stack_lo(co), CO_STACK_SIZE);
    co->asan_fake_stack = NULL;
#endif
    if (sched.pool_len >= CO_POOL_MAX) {
        munmap(co->map, CO_GUARD_SIZE + CO_STACK_SIZE);
        free(co);
        return;
    }
    co->next = sched.pool;
    sched.pool = co;
    sched.pool_len++;
}

struct co *co_spawn(co_fn fn, void *arg)
{
    struct co *co = co_alloc();
    co->fn = fn;
    co->arg = arg;
    co->wake_pending = false;
    co_prepare_stack(co);
    sched.live++;
    ready_push(co);
    return co;
}

struct co *co_self(void)
{
    return sched.current;
}

void co_yield(void)
{
    struct co *co = sched.current;
    if (!co)
        co_fatal("co_yield called outside a coroutine");
    if (co->wake_pending) {
        /* Woken while running: stay runnable, but let the others go first. */
        co->wake_pending = false;
        ready_push(co);
    } else {
        co->state = CO_PARKED;
    }
    switch_to_sched(co, false);
}

void co_wake(struct co *co)
{
    switch (co->state) {
    case CO_PARKED:
        ready_push(co);
        break;
    case CO_RUNNING:
        co->wake_pending = true;
        break;
    case CO_READY:
    case CO_DEAD:
        break;
    }
}

unsigned co_run_ready(void)
{
    unsigned ran = 0;
    struct co *co;

    if (sched.current)
        co_fatal("co_run_ready called from a coroutine");
    while ((co = ready_pop()) != NULL) {
        co->state = CO_RUNNING;
        sched.current = co;
#ifdef CO_ASAN
        __sanitizer_start_switch_fiber(&sched.main_fake_stack, stack_lo(co), CO_STACK_SIZE);
#endif
        uq_co_switch(&sched.main_sp, co->sp);
#ifdef CO_ASAN
        __sanitizer_finish_switch_fiber(sched.main_fake_stack, NULL, NULL);
#endif
        sched.current = NULL;
        ran++;
        if (co->state == CO_DEAD)
            co_release(co);
    }
    return ran;
}

unsigned co_live_count(void)
{
    return sched.live;
}

void co_pool_release(void)
{
    struct co *co;
    while ((co = sched.pool) != NULL) {
        sched.pool = co->next;
        munmap(co->map, CO_GUARD_SIZE + CO_STACK_SIZE);
        free(co);
    }
    sched.pool_len = 0;
}

/* ---- waiting lists ------------------------------------------------------
 * A waiter is on the waiting coroutine's stack.  Waking pops it and clears
 * w->co, which is what the waiter checks: a stray co_wake cannot release it. */

/* The waiter is dequeued before its frame goes away (see waiter_park). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#pragma GCC diagnostic ignored "-Wdangling-pointer"
#endif
static void queue_push(struct co_queue *q, struct co_waiter *w)
{
    w->next = NULL;
    if (q->tail)
        q->tail->next = w;
    else
        q->head = w;
    q->tail = w;
}

static struct co_waiter *queue_pop(struct co_queue *q)
{
    struct co_waiter *w = q->head;
    if (w) {
        q->head = w->next;
        if (!q->head)
            q->tail = NULL;
    }
    return w;
}

static void waiter_release(struct co_waiter *w)
{
    struct co *co = w->co;
    w->co = NULL;
    co_wake(co);
}

static void waiter_park(struct co_queue *q, struct co_waiter *w)
{
    w->co = co_self();
    queue_push(q, w);
    while (w->co)
        co_yield();
}

void co_queue_wait(struct co_queue *q)
{
    struct co_waiter w;
    if (!co_self())
        co_fatal("co_queue_wait called outside a coroutine");
    waiter_park(q, &w);
}

void co_queue_wake_all(struct co_queue *q)
{
    struct co_waiter *w;
    while ((w = queue_pop(q)) != NULL)
        waiter_release(w);
}

bool co_queue_wake_one(struct co_queue *q)
{
    struct co_waiter *w = queue_pop(q);
    if (!w)
        return false;
    waiter_release(w);
    return true;
}

/* ---- mutex: FIFO hand-off (unlock passes ownership to the first waiter) --- */

void co_mutex_lock(struct co_mutex *m)
{
    struct co_waiter w;
    if (!m->locked) {
        m->locked = true;
        return;
    }
    if (!co_self())
        co_fatal("co_mutex_lock: contended mutex outside a coroutine");
    waiter_park(&m->waiters, &w);   /* woken as the owner; locked stays true */
}

void co_mutex_unlock(struct co_mutex *m)
{
    struct co_waiter *w = queue_pop(&m->waiters);
    if (w)
        waiter_release(w);
    else
        m->locked = false;
}

/* ---- rwlock: FIFO hand-off; a waiting writer blocks new readers ---------- */

struct rw_waiter {
    struct co_waiter w;
    bool writer;
};

#define RW_WAITER(wp) ((struct rw_waiter *)((char *)(wp) - offsetof(struct rw_waiter, w)))

void co_rwlock_rdlock(struct co_rwlock *l)
{
    struct rw_waiter rw = { .writer = false };
    if (!l->writer && l->writers_waiting == 0) {
        l->readers++;
        return;
    }
    if (!co_self())
        co_fatal("co_rwlock_rdlock: contended lock outside a coroutine");
    waiter_park(&l->waiters, &rw.w);  /* granted: readers already counted */
}

void co_rwlock_wrlock(struct co_rwlock *l)
{
    struct rw_waiter rw = { .writer = true };
    if (!l->writer && l->readers == 0) {
        l->writer = true;
        return;
    }
    if (!co_self())
        co_fatal("co_rwlock_wrlock: contended lock outside a coroutine");
    l->writers_waiting++;
    waiter_park(&l->waiters, &rw.w);  /* granted: writer already set */
}

void co_rwlock_unlock(struct co_rwlock *l)
{
    if (l->writer)
        l->writer = false;
    else if (l->readers > 0)
        l->readers--;
    else
        co_fatal("co_rwlock_unlock: lock not held");
    if (l->readers > 0)
        return;

    /* Free: grant the head writer alone, or every reader at the head. */
    struct co_waiter *head = l->waiters.head;
    if (!head)
        return;
    if (RW_WAITER(head)->writer) {
        queue_pop(&l->waiters);
        l->writers_waiting--;
        l->writer = true;
        waiter_release(head);
        return;
    }
    while ((head = l->waiters.head) != NULL && !RW_WAITER(head)->writer) {
        queue_pop(&l->waiters);
        l->readers++;
        waiter_release(head);
    }
}
