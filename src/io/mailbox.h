/* A cross-thread mailbox: any thread posts messages, one thread (the owner,
 * which runs a loop) receives them in a coroutine.
 *
 * Posting is lock-free (a CAS push onto a list) and writes the mailbox's
 * eventfd only when the list was empty, so a burst costs one wake-up.  The
 * owner parks in io_read() on the eventfd while the list is empty.  Messages
 * are embedded in the sender's own structures: the mailbox never allocates
 * per message, and a message must not be posted again before it was taken.
 */
#ifndef UQ_IO_MAILBOX_H
#define UQ_IO_MAILBOX_H

#include <stdbool.h>

struct mbox_msg {
    struct mbox_msg *next;
};

struct mailbox;

/* Returns NULL with errno set when no eventfd could be made. */
struct mailbox *mailbox_new(void);
/* Messages still inside are dropped (they belong to their senders). */
void mailbox_free(struct mailbox *mb);

/* From any thread.  Returns 0, or -errno if waking the owner failed. */
int mailbox_post(struct mailbox *mb, struct mbox_msg *msg);

/* Owner only.  Take every message posted so far, oldest first (chained by
 * next, NULL-terminated); NULL if none. */
struct mbox_msg *mailbox_take(struct mailbox *mb);

/* Owner only.  Like mailbox_take, but parks the calling coroutine (or
 * blocks the thread, outside a coroutine) until at least one message is
 * there.  Returns NULL only if the eventfd failed. */
struct mbox_msg *mailbox_wait(struct mailbox *mb);

#endif
