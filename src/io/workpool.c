/* Worker threads for compression and decompression (see workpool.h). */
#include "io/workpool.h"

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stddef.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "io/coroutine.h"
#include "io/log.h"

#define WP_MAX_THREADS 16

static pthread_mutex_t wp_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wp_cond = PTHREAD_COND_INITIALIZER;
static struct wp_job *wp_head, *wp_tail;
static int wp_nthreads = -1;        /* -1: not decided yet */
static bool wp_started;
static bool wp_background = true;   /* see worker() */

static int default_threads(void)
{
    const char *env = getenv("UBLK_QCOW2_COMPRESS_THREADS");
    if (env && *env) {
        char *end;
        long n = strtol(env, &end, 10);
        if (*end == 0 && n >= 0)
            return n > WP_MAX_THREADS ? WP_MAX_THREADS : (int)n;
    }
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    if (n < 1)
        n = 1;
    return n > WP_MAX_THREADS ? WP_MAX_THREADS : (int)n;
}

void wp_set_background(bool background)
{
    pthread_mutex_lock(&wp_lock);
    wp_background = background;
    pthread_mutex_unlock(&wp_lock);
}

int wp_set_threads(int n)
{
    pthread_mutex_lock(&wp_lock);
    int r = 0;
    if (wp_started)
        r = -EBUSY;
    else
        wp_nthreads = n < 0 ? default_threads() : n > WP_MAX_THREADS ? WP_MAX_THREADS : n;
    pthread_mutex_unlock(&wp_lock);
    return r;
}

int wp_threads(void)
{
    pthread_mutex_lock(&wp_lock);
    if (wp_nthreads < 0)
        wp_nthreads = default_threads();
    int n = wp_nthreads;
    pthread_mutex_unlock(&wp_lock);
    return n;
}

static void post(struct wp_job *j)
{
    /* The job's memory is the owner's again once posted: touch it no more. */
    int r = mailbox_post(j->port->mb, &j->msg);
    if (r < 0) {
        uq_error("compression worker: cannot wake the engine: %d", r);
        abort();    /* the owner would wait forever */
    }
}

static void *worker(void *arg)
{
    (void)arg;
    /* Serving (the default): far below the threads serving requests, with
     * SCHED_BATCH (a worker never preempts the engine on wake-up) at nice
     * 19, so uncompressed reads keep their latency while a compressed stream
     * is inflated; with the engine idle the workers still get every free
     * CPU.  A batch job (convert) whose work is the compression keeps the
     * normal priority. */
    if (wp_background) {
        struct sched_param sp = { .sched_priority = 0 };
        if (sched_setscheduler((pid_t)syscall(SYS_gettid), SCHED_BATCH, &sp) < 0)
            uq_debug("compression worker: cannot switch to SCHED_BATCH");
        if (setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19) < 0)
            uq_debug("compression worker: cannot lower its priority");
    }
    struct wp_job *held = NULL;
    for (;;) {
        pthread_mutex_lock(&wp_lock);
        while (!held && !wp_head)
            pthread_cond_wait(&wp_cond, &wp_lock);
        struct wp_job *j = wp_head;
        /* Keep a finished job back while running the next one of the same
         * port, then post both: one wake-up of the engine for two jobs (a
         * wake-up costs it about as much as handling a job).  Only when
         * the next is already queued, so a lone job is never delayed, and
         * one at a time, so none waits longer than one more job. */
        if (held && (!j || j->port != held->port)) {
            pthread_mutex_unlock(&wp_lock);
            post(held);
            held = NULL;
            continue;
        }
        wp_head = j->qnext;
        if (!wp_head)
            wp_tail = NULL;
        bool hold = !held && wp_head && wp_head->port == j->port;
        pthread_mutex_unlock(&wp_lock);
        j->fn(j);
        if (held) {
            post(held);
            held = NULL;
        }
        if (hold)
            held = j;
        else
            post(j);
    }
    return NULL;
}

/* A forked child (a daemon) has none of the parent's threads: it starts
 * its own pool on first use.  Jobs queued in the parent stay the parent's. */
static void after_fork_child(void)
{
    pthread_mutex_init(&wp_lock, NULL);
    pthread_cond_init(&wp_cond, NULL);
    wp_head = wp_tail = NULL;
    wp_started = false;
}

/* Called with wp_lock held. */
static void start_locked(void)
{
    static bool atfork;
    if (wp_started)
        return;
    if (!atfork) {
        atfork = true;
        pthread_atfork(NULL, NULL, after_fork_child);
    }
    wp_started = true;
    if (wp_nthreads < 0)
        wp_nthreads = default_threads();
    for (int i = 0; i < wp_nthreads; i++) {
        pthread_t t;
        pthread_attr_t a;
        pthread_attr_init(&a);
        pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
        /* zlib and zstd need little stack; keep the footprint small. */
        pthread_attr_setstacksize(&a, 256 << 10);
        if (pthread_create(&t, &a, worker, NULL) != 0) {
            pthread_attr_destroy(&a);
            if (i == 0)
                wp_nthreads = 0;    /* no thread at all: run jobs inline */
            else
                wp_nthreads = i;
            break;
        }
        pthread_attr_destroy(&a);
    }
}

int wp_port_init(struct wp_port *p)
{
    p->outstanding = 0;
    p->polling = false;
    p->mb = mailbox_new();
    return p->mb ? 0 : -errno;
}

void wp_port_destroy(struct wp_port *p)
{
    if (p->mb && p->outstanding)
        uq_error("workpool: port destroyed with %u jobs outstanding", p->outstanding);
    mailbox_free(p->mb);
    p->mb = NULL;
}

static void deliver(struct wp_port *p, struct mbox_msg *m)
{
    while (m) {
        struct mbox_msg *next = m->next;
        struct wp_job *j = (struct wp_job *)((char *)m - offsetof(struct wp_job, msg));
        j->done = true;
        p->outstanding--;
        if (j->waiter)
            co_wake(j->waiter);
        m = next;
    }
}

/* Runs on the port owner's thread while jobs are outstanding: it parks on
 * the mailbox's eventfd (an I/O in flight for the loop) and wakes owners. */
static void poller(void *arg)
{
    struct wp_port *p = arg;
    while (p->outstanding) {
        struct mbox_msg *m = mailbox_wait(p->mb);
        if (!m) {
            uq_error("workpool: completion eventfd failed");
            abort();
        }
        deliver(p, m);
    }
    p->polling = false;
}

void wp_submit(struct wp_port *p, struct wp_job *j)
{
    j->done = false;
    j->port = p;
    j->waiter = NULL;
    j->qnext = NULL;
    pthread_mutex_lock(&wp_lock);
    start_locked();
    bool inline_run = wp_nthreads == 0;
    if (!inline_run) {
        if (wp_tail)
            wp_tail->qnext = j;
        else
            wp_head = j;
        wp_tail = j;
        pthread_cond_signal(&wp_cond);
    }
    pthread_mutex_unlock(&wp_lock);
    if (inline_run) {
        j->fn(j);
        j->done = true;
        return;
    }
    p->outstanding++;
    if (co_in_coroutine() && !p->polling) {
        p->polling = true;
        co_spawn(poller, p);
    }
}

void wp_wait(struct wp_port *p, struct wp_job *j)
{
    if (co_in_coroutine() && p->polling) {
        while (!j->done) {
            j->waiter = co_self();
            co_yield();
            j->waiter = NULL;
        }
        return;
    }
    /* Outside a coroutine (offline tools): block on the eventfd. */
    while (!j->done) {
        struct mbox_msg *m = mailbox_wait(p->mb);
        if (!m) {
            uq_error("workpool: completion eventfd failed");
            abort();
        }
        deliver(p, m);
    }
}

void wp_run(struct wp_port *p, struct wp_job *j)
{
    wp_submit(p, j);
    wp_wait(p, j);
}
