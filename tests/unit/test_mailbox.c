/* Cross-thread mailbox: order, no lost wake-ups, ping-pong between loops. */
#include "io/coroutine.h"
#include "io/loop.h"
#include "io/mailbox.h"
#include "unit.h"

#include <pthread.h>
#include <stdatomic.h>

struct msg {
    struct mbox_msg m;
    unsigned producer;
    unsigned seq;
};

static void test_mailbox_sync(void)
{
    struct mailbox *mb = mailbox_new();
    CHECK(mb != NULL);
    CHECK(mailbox_take(mb) == NULL);
    struct msg a = { .seq = 1 }, b = { .seq = 2 }, c = { .seq = 3 };
    CHECK_EQ(mailbox_post(mb, &a.m), 0);
    CHECK_EQ(mailbox_post(mb, &b.m), 0);
    CHECK_EQ(mailbox_post(mb, &c.m), 0);
    /* Outside a coroutine, wait is a plain read of the eventfd. */
    struct mbox_msg *m = mailbox_wait(mb);
    CHECK(m == &a.m);
    CHECK(m && m->next == &b.m);
    CHECK(m && m->next && m->next->next == &c.m);
    CHECK(m && m->next && m->next->next && m->next->next->next == NULL);
    CHECK(mailbox_take(mb) == NULL);
    mailbox_free(mb);
}

/* ---- many producers, one consumer coroutine ---------------------------- */
#define PRODUCERS 4
#define PER_PRODUCER 20000

static struct mailbox *many_mb;
static struct msg *many_msgs;
static unsigned many_next[PRODUCERS];
static unsigned many_received, many_errors;

static void *producer(void *arg)
{
    unsigned p = (unsigned)(uintptr_t)arg;
    for (unsigned i = 0; i < PER_PRODUCER; i++) {
        struct msg *m = &many_msgs[p * PER_PRODUCER + i];
        m->producer = p;
        m->seq = i;
        if (mailbox_post(many_mb, &m->m) != 0)
            atomic_fetch_add((_Atomic unsigned *)&many_errors, 1);
    }
    return NULL;
}

static void consumer(void *arg)
{
    (void)arg;
    while (many_received < PRODUCERS * PER_PRODUCER) {
        struct mbox_msg *m = mailbox_wait(many_mb);
        if (!m) {
            many_errors++;
            return;
        }
        while (m) {
            struct msg *x = (struct msg *)m;
            m = m->next;    /* read before the message could be reused */
            if (x->producer >= PRODUCERS || x->seq != many_next[x->producer])
                many_errors++;
            else
                many_next[x->producer]++;
            many_received++;
        }
    }
}

static void test_mailbox_many_producers(void)
{
    many_mb = mailbox_new();
    many_msgs = calloc(PRODUCERS * PER_PRODUCER, sizeof(*many_msgs));
    struct loop *l = loop_new(16);
    CHECK(many_mb && many_msgs && l);
    co_spawn(consumer, NULL);
    pthread_t th[PRODUCERS];
    for (unsigned p = 0; p < PRODUCERS; p++)
        CHECK_EQ(pthread_create(&th[p], NULL, producer, (void *)(uintptr_t)p), 0);
    CHECK_EQ(loop_run(l), 0);
    for (unsigned p = 0; p < PRODUCERS; p++)
        pthread_join(th[p], NULL);
    CHECK_EQ(many_errors, 0);
    CHECK_EQ(many_received, PRODUCERS * PER_PRODUCER);
    for (unsigned p = 0; p < PRODUCERS; p++)
        CHECK_EQ(many_next[p], PER_PRODUCER);
    CHECK(mailbox_take(many_mb) == NULL);
    loop_free(l);
    mailbox_free(many_mb);
    free(many_msgs);
}

/* ---- ping-pong between two threads' loops ------------------------------- */
#define ROUNDS 5000

static struct mailbox *pp_box[2];
static unsigned pp_errors;

/* Side s receives the ball, checks its count and passes it on. */
static void pp_side(void *arg)
{
    unsigned s = (unsigned)(uintptr_t)arg;
    for (;;) {
        struct mbox_msg *m = mailbox_wait(pp_box[s]);
        if (!m || m->next) {
            pp_errors++;
            return;
        }
        struct msg *ball = (struct msg *)m;
        if (ball->seq % 2 != s)
            pp_errors++;
        if (ball->seq == ROUNDS - 1) {
            ball->seq++;    /* last round: keep the ball */
            return;
        }
        unsigned seq = ++ball->seq;     /* ours until posted */
        if (mailbox_post(pp_box[1 - s], m) != 0)
            pp_errors++;
        if (seq == ROUNDS - 1)
            return;     /* the other side takes the last round */
    }
}

static void *pp_thread(void *arg)
{
    struct loop *l = loop_new(8);
    co_spawn(pp_side, arg);
    if (loop_run(l) != 0)
        pp_errors++;
    co_pool_release();
    loop_free(l);
    return NULL;
}

static void test_mailbox_ping_pong(void)
{
    pp_box[0] = mailbox_new();
    pp_box[1] = mailbox_new();
    CHECK(pp_box[0] && pp_box[1]);
    pthread_t th[2];
    for (unsigned s = 0; s < 2; s++)
        CHECK_EQ(pthread_create(&th[s], NULL, pp_thread, (void *)(uintptr_t)s), 0);
    struct msg ball = { .seq = 0 };
    CHECK_EQ(mailbox_post(pp_box[0], &ball.m), 0);
    for (unsigned s = 0; s < 2; s++)
        pthread_join(th[s], NULL);
    CHECK_EQ(pp_errors, 0);
    CHECK_EQ(ball.seq, ROUNDS);
    CHECK(mailbox_take(pp_box[0]) == NULL);
    CHECK(mailbox_take(pp_box[1]) == NULL);
    mailbox_free(pp_box[0]);
    mailbox_free(pp_box[1]);
}

int main(void)
{
    RUN_TEST(test_mailbox_sync);
    RUN_TEST(test_mailbox_many_producers);
    RUN_TEST(test_mailbox_ping_pong);
    UNIT_EXIT();
}
