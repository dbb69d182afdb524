/* Coroutine scheduler, waiting lists, mutex and rwlock. */
#include "io/coroutine.h"
#include "unit.h"

static char trace[128];
static size_t trace_len;
static void mark(char c) { if (trace_len < sizeof(trace) - 1) trace[trace_len++] = c; trace[trace_len] = 0; }
static void trace_reset(void) { trace_len = 0; trace[0] = 0; }

static struct co *co_a;

static void fn_a(void *arg)
{
    co_a = co_self();
    mark('a');
    co_yield();
    mark('A');
}

static void fn_b(void *arg)
{
    mark('b');
    co_wake(co_a);
    co_wake(co_a);      /* idempotent */
    mark('B');          /* waking never enters a directly */
}

static void fn_c(void *arg)
{
    mark('c');
}

static void test_spawn_yield_wake_order(void)
{
    trace_reset();
    CHECK(co_self() == NULL);
    co_spawn(fn_a, NULL);
    co_spawn(fn_b, NULL);
    co_spawn(fn_c, NULL);
    CHECK_EQ(co_live_count(), 3);
    CHECK_EQ(trace_len, 0);             /* spawn does not run anything */
    unsigned ran = co_run_ready();
    CHECK(strcmp(trace, "abBcA") == 0);
    CHECK_EQ(ran, 4);                   /* a twice, b, c */
    CHECK_EQ(co_live_count(), 0);
    CHECK_EQ(co_run_ready(), 0);
}

static void fn_self_wake(void *arg)
{
    mark('x');
    co_wake(co_self());   /* woken while running: yield returns after others */
    co_yield();
    mark('X');
}

static void test_wake_while_running(void)
{
    trace_reset();
    co_spawn(fn_self_wake, NULL);
    co_spawn(fn_c, NULL);
    co_run_ready();
    CHECK(strcmp(trace, "xcX") == 0);
    CHECK_EQ(co_live_count(), 0);
}

static struct co_queue q = CO_QUEUE_INIT;

static void fn_queue_wait(void *arg)
{
    co_queue_wait(&q);
    mark(*(char *)arg);
}

static void test_queue(void)
{
    static char ids[] = "123";
    trace_reset();
    for (int i = 0; i < 3; i++)
        co_spawn(fn_queue_wait, &ids[i]);
    co_run_ready();
    CHECK_EQ(trace_len, 0);
    CHECK(!co_queue_empty(&q));
    CHECK(co_queue_wake_one(&q));
    co_run_ready();
    CHECK(strcmp(trace, "1") == 0);
    co_queue_wake_all(&q);
    CHECK(co_queue_empty(&q));
    co_run_ready();
    CHECK(strcmp(trace, "123") == 0);
    CHECK(!co_queue_wake_one(&q));
    CHECK_EQ(co_live_count(), 0);
}

static struct co_mutex mtx = CO_MUTEX_INIT;
static int counter, in_section, section_violations;
static int order[64], order_len;

static void let_others_run(void)
{
    co_wake(co_self());
    co_yield();
}

static void fn_mutex(void *arg)
{
    for (int i = 0; i < 10; i++) {
        co_mutex_lock(&mtx);
        if (i == 0 && order_len < 64)
            order[order_len++] = (int)(intptr_t)arg;
        if (in_section++)
            section_violations++;
        int v = counter;
        let_others_run();
        counter = v + 1;
        in_section--;
        co_mutex_unlock(&mtx);
        let_others_run();
    }
}

static void test_mutex_exclusion(void)
{
    counter = in_section = section_violations = order_len = 0;
    for (int i = 0; i < 50; i++)
        co_spawn(fn_mutex, (void *)(intptr_t)i);
    co_run_ready();
    CHECK_EQ(co_live_count(), 0);
    CHECK_EQ(counter, 500);
    CHECK_EQ(section_violations, 0);
    CHECK(!mtx.locked);
    /* FIFO: first acquisitions happen in spawn order. */
    for (int i = 0; i < order_len; i++)
        CHECK_EQ(order[i], i);
    /* Outside a coroutine an uncontended mutex just locks. */
    co_mutex_lock(&mtx);
    CHECK(mtx.locked);
    co_mutex_unlock(&mtx);
    CHECK(!mtx.locked);
}

static struct co_rwlock rw;
static struct co_queue gate = CO_QUEUE_INIT;

static void fn_reader(void *arg)
{
    co_rwlock_rdlock(&rw);
    mark(*(char *)arg);
    co_queue_wait(&gate);           /* hold the read lock until released */
    mark((char)(*(char *)arg - 32)); /* upper case on unlock */
    co_rwlock_unlock(&rw);
}

static void fn_writer(void *arg)
{
    co_rwlock_wrlock(&rw);
    mark(*(char *)arg);
    if (rw.readers != 0)
        mark('!');
    co_queue_wait(&gate);
    mark((char)(*(char *)arg - 32));
    co_rwlock_unlock(&rw);
}

static void test_rwlock_writer_preference(void)
{
    static char r1 = 'r', r2 = 's', w1 = 'w', r3 = 't';
    memset(&rw, 0, sizeof(rw));
    trace_reset();
    co_spawn(fn_reader, &r1);
    co_spawn(fn_reader, &r2);
    co_run_ready();
    CHECK(strcmp(trace, "rs") == 0);    /* readers share */
    CHECK_EQ(rw.readers, 2);
    co_spawn(fn_writer, &w1);
    co_spawn(fn_reader, &r3);
    co_run_ready();
    CHECK(strcmp(trace, "rs") == 0);    /* writer waits, late reader too */
    CHECK_EQ(rw.writers_waiting, 1);
    co_queue_wake_all(&gate);           /* r and s unlock */
    co_run_ready();
    CHECK(strcmp(trace, "rsRSw") == 0); /* writer before the late reader */
    CHECK(rw.writer);
    co_queue_wake_all(&gate);
    co_run_ready();
    CHECK(strcmp(trace, "rsRSwWt") == 0);
    co_queue_wake_all(&gate);
    co_run_ready();
    CHECK(strcmp(trace, "rsRSwWtT") == 0);
    CHECK_EQ(co_live_count(), 0);
    CHECK(!rw.writer);
    CHECK_EQ(rw.readers, 0);
    CHECK_EQ(rw.writers_waiting, 0);
    /* Outside a coroutine, uncontended. */
    co_rwlock_wrlock(&rw);
    co_rwlock_unlock(&rw);
    co_rwlock_rdlock(&rw);
    co_rwlock_rdlock(&rw);
    co_rwlock_unlock(&rw);
    co_rwlock_unlock(&rw);
    CHECK_EQ(rw.readers, 0);
}

static unsigned short_runs;
static void fn_short(void *arg)
{
    volatile char buf[1024];    /* touch some stack */
    buf[0] = 1;
    buf[1023] = buf[0];
    short_runs++;
}

static void test_pool_reuse(void)
{
    struct co *seen[8];
    unsigned nseen = 0;
    bool bounded = true;
    short_runs = 0;
    for (int i = 0; i < 10000; i++) {
        struct co *co = co_spawn(fn_short, NULL);
        co_run_ready();
        unsigned j;
        for (j = 0; j < nseen; j++)
            if (seen[j] == co)
                break;
        if (j == nseen) {
            if (nseen == 8) {
                bounded = false;
                break;
            }
            seen[nseen++] = co;
        }
    }
    CHECK(bounded);
    CHECK_EQ(nseen, 1);
    CHECK_EQ(short_runs, 10000);
    CHECK_EQ(co_live_count(), 0);
}

static int depth_reached;
static int recurse(int n)
{
    volatile char pad[256];
    pad[0] = (char)n;
    if (n == 0)
        return pad[0];
    return recurse(n - 1) + pad[0];
}

static void fn_deep(void *arg)
{
    depth_reached = recurse(200);   /* ~60 KiB of stack under ASan */
}

static void test_deep_stack(void)
{
    depth_reached = -1;
    co_spawn(fn_deep, NULL);
    co_run_ready();
    CHECK(depth_reached >= 0);
}

int main(void)
{
    RUN_TEST(test_spawn_yield_wake_order);
    RUN_TEST(test_wake_while_running);
    RUN_TEST(test_queue);
    RUN_TEST(test_mutex_exclusion);
    RUN_TEST(test_rwlock_writer_preference);
    RUN_TEST(test_pool_reuse);
    RUN_TEST(test_deep_stack);
    UNIT_EXIT();
}
