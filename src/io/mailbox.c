/* Cross-thread mailbox: lock-free multi-producer list + eventfd (see mailbox.h). */
#include "io/mailbox.h"
#include "io/loop.h"

#include <errno.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct mailbox {
    _Atomic(struct mbox_msg *) head;    /* newest first */
    int efd;
    uint64_t counter;                   /* eventfd read target (owner only) */
};

struct mailbox *mailbox_new(void)
{
    struct mailbox *mb = calloc(1, sizeof(*mb));
    if (!mb)
        return NULL;
    mb->efd = eventfd(0, EFD_CLOEXEC);
    if (mb->efd < 0) {
        int e = errno;
        free(mb);
        errno = e;
        return NULL;
    }
    atomic_init(&mb->head, NULL);
    return mb;
}

void mailbox_free(struct mailbox *mb)
{
    if (!mb)
        return;
    close(mb->efd);
    free(mb);
}

int mailbox_post(struct mailbox *mb, struct mbox_msg *msg)
{
    struct mbox_msg *old = atomic_load_explicit(&mb->head, memory_order_relaxed);
    do
        msg->next = old;
    while (!atomic_compare_exchange_weak_explicit(&mb->head, &old, msg,
                                                  memory_order_release, memory_order_relaxed));
    if (old)
        return 0;   /* not empty: a wake-up is already on its way */
    /* Empty -> non-empty: the owner may be parked on the eventfd. */
    uint64_t one = 1;
    ssize_t n;
    do
        n = write(mb->efd, &one, sizeof(one));
    while (n < 0 && errno == EINTR);
    return n == sizeof(one) ? 0 : -errno;
}

struct mbox_msg *mailbox_take(struct mailbox *mb)
{
    struct mbox_msg *m = atomic_exchange_explicit(&mb->head, NULL, memory_order_acquire);
    /* The list is newest first; reverse it so messages come out in order. */
    struct mbox_msg *fifo = NULL;
    while (m) {
        struct mbox_msg *next = m->next;
        m->next = fifo;
        fifo = m;
        m = next;
    }
    return fifo;
}

struct mbox_msg *mailbox_wait(struct mailbox *mb)
{
    for (;;) {
        struct mbox_msg *m = mailbox_take(mb);
        if (m)
            return m;
        /* A post after the take above saw an empty list and wrote the
         * eventfd, so this read cannot miss it (at worst it is stale). */
        ssize_t n = io_read(mb->efd, &mb->counter, sizeof(mb->counter));
        if (n < 0 && n != -EINTR && n != -EAGAIN)
            return NULL;
    }
}
