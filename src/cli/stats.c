/* ublk-qcow2 stats: a live device's counters, from its daemon's control socket. */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/json.h"
#include "cli/cli.h"
#include "cli/opts.h"
#include "ublk/ctl_socket.h"
#include "ublk/server.h"

static void stats_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 stats -n ID [--json] [--watch [SECS]] [--count N]\n\n"
        "Show the counters of ublk device ID, read from its daemon: requests by\n"
        "kind, bytes, errors, requests in flight, metadata cache hits, clusters\n"
        "allocated since the device was added; on a zero copy device, how many\n"
        "reads and writes went zero copy and how many were copied.\n\n"
        "Options:\n"
        "  -n, --id ID          the device /dev/ublkbID\n"
        "  -j, --json           print the counters as one JSON object\n"
        "  -w, --watch [SECS]   print rates every SECS seconds (default 1) until\n"
        "                       interrupted; with --json, one JSON object per line\n"
        "  -c, --count N        with --watch: stop after N reports\n"
        "  -h, --help           this help\n");
}

struct sample {
    uint64_t reads, writes, read_bytes, write_bytes, flushes, discards, write_zeroes;
    uint64_t errors, in_flight, cache_hits, cache_misses, clusters_allocated;
    uint64_t zcache_hits, zcache_misses, clusters_decompressed;     /* 0 from older daemons */
    uint64_t zero_copy_reads, zero_copy_writes, copied_reads, copied_writes;    /* likewise */
    bool zero_copy;
    char image[4096], format[16];
    char features[512];         /* the ublk features, "a b c" ("" from older daemons) */
};

/* The names of the reply's "features" array, space-separated. */
static void feature_list(const char *reply, char *out, size_t len)
{
    const char *p = strstr(reply, "\"features\": [");
    size_t n = 0;
    out[0] = '\0';
    if (!p)
        return;
    for (p += 13; *p && *p != ']' && n + 2 < len; p++) {
        if (*p == '"' || *p == ' ')
            continue;
        out[n++] = *p == ',' ? ' ' : *p;
    }
    out[n] = '\0';
}

/* Ask the daemon; 0, or 1 after saying why. */
static int fetch(uint32_t id, char *reply, size_t len, struct sample *s)
{
    int r = ctl_request(id, "stats", reply, len);
    if (r < 0) {
        cli_daemon_error("stats", id, r);
        return 1;
    }
    struct { const char *key; uint64_t *v; } f[] = {
        { "reads", &s->reads }, { "writes", &s->writes }, { "read_bytes", &s->read_bytes },
        { "write_bytes", &s->write_bytes }, { "flushes", &s->flushes },
        { "discards", &s->discards }, { "write_zeroes", &s->write_zeroes },
        { "errors", &s->errors }, { "in_flight", &s->in_flight },
        { "cache_hits", &s->cache_hits }, { "cache_misses", &s->cache_misses },
        { "clusters_allocated", &s->clusters_allocated },
    };
    for (size_t i = 0; i < sizeof(f) / sizeof(f[0]); i++) {
        if (!json_get_u64(reply, f[i].key, f[i].v)) {
            cli_error("stats: the daemon of ublk device %u gave an unexpected answer: %.200s", id, reply);
            return 1;
        }
    }
    json_get_u64(reply, "zcache_hits", &s->zcache_hits);
    json_get_u64(reply, "zcache_misses", &s->zcache_misses);
    json_get_u64(reply, "clusters_decompressed", &s->clusters_decompressed);
    json_get_u64(reply, "zero_copy_reads", &s->zero_copy_reads);
    json_get_u64(reply, "zero_copy_writes", &s->zero_copy_writes);
    json_get_u64(reply, "copied_reads", &s->copied_reads);
    json_get_u64(reply, "copied_writes", &s->copied_writes);
    s->zero_copy = json_get_true(reply, "zero_copy");
    if (!json_get_string(reply, "image", s->image, sizeof(s->image)))
        s->image[0] = '\0';
    if (!json_get_string(reply, "format", s->format, sizeof(s->format)))
        s->format[0] = '\0';
    feature_list(reply, s->features, sizeof(s->features));
    return 0;
}

static double mib(uint64_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

static void print_sample(uint32_t id, const struct sample *s)
{
    uint64_t lookups = s->cache_hits + s->cache_misses;
    printf("device        /dev/ublkb%u\n", id);
    printf("image         %s (%s)\n", s->image, s->format);
    if (s->features[0])
        printf("ublk features %s\n", s->features);
    printf("reads         %llu (%.1f MiB)\n", (unsigned long long)s->reads, mib(s->read_bytes));
    printf("writes        %llu (%.1f MiB)\n", (unsigned long long)s->writes, mib(s->write_bytes));
    /* Only a zero copy device serves some requests one way, some the other. */
    if (s->zero_copy)
        printf("zero copy     %llu reads, %llu writes; copied: %llu reads, %llu writes\n",
               (unsigned long long)s->zero_copy_reads, (unsigned long long)s->zero_copy_writes,
               (unsigned long long)s->copied_reads, (unsigned long long)s->copied_writes);
    printf("flushes       %llu\n", (unsigned long long)s->flushes);
    printf("discards      %llu\n", (unsigned long long)s->discards);
    printf("write-zeroes  %llu\n", (unsigned long long)s->write_zeroes);
    printf("errors        %llu\n", (unsigned long long)s->errors);
    printf("in flight     %llu\n", (unsigned long long)s->in_flight);
    if (lookups)
        printf("cache hits    %.1f%% (%llu of %llu metadata lookups)\n",
               100.0 * (double)s->cache_hits / (double)lookups,
               (unsigned long long)s->cache_hits, (unsigned long long)lookups);
    else
        printf("cache hits    - (no metadata lookups)\n");
    printf("allocated     %llu clusters since the device was added\n",
           (unsigned long long)s->clusters_allocated);
    if (s->zcache_hits + s->zcache_misses)
        printf("compressed    %llu reads: %llu from the decompressed-cluster cache, %llu clusters decompressed\n",
               (unsigned long long)(s->zcache_hits + s->zcache_misses),
               (unsigned long long)s->zcache_hits, (unsigned long long)s->clusters_decompressed);
}

static volatile sig_atomic_t interrupted;
static void on_signal(int sig) { (void)sig; interrupted = 1; }

static double now_s(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + t.tv_nsec / 1e9;
}

static int watch(uint32_t id, bool json, unsigned long secs, unsigned long count)
{
    struct sigaction sa = { .sa_handler = on_signal };
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    static char reply[CTL_LINE_MAX];
    static struct sample prev, cur;
    if (fetch(id, reply, sizeof(reply), &prev))
        return 1;
    double t_prev = now_s();
    if (!json)
        printf("%-8s %9s %9s %8s %8s %8s %8s %6s %7s\n", "time", "reads/s", "writes/s", "rMiB/s",
               "wMiB/s", "flush/s", "inflight", "errors", "cache%");
    for (unsigned long n = 0; !interrupted && (!count || n < count); n++) {
        struct timespec ts = { (time_t)secs, 0 };
        while (nanosleep(&ts, &ts) < 0 && errno == EINTR && !interrupted)
            ;
        if (interrupted)
            break;
        if (fetch(id, reply, sizeof(reply), &cur))
            return 1;
        double t = now_s(), dt = t - t_prev;
        if (json) {
            printf("%s\n", reply);
        } else {
            uint64_t lookups = (cur.cache_hits - prev.cache_hits) + (cur.cache_misses - prev.cache_misses);
            char when[16], hit[16] = "-";
            time_t wall = time(NULL);
            strftime(when, sizeof(when), "%H:%M:%S", localtime(&wall));
            if (lookups)
                snprintf(hit, sizeof(hit), "%.1f", 100.0 * (double)(cur.cache_hits - prev.cache_hits) / (double)lookups);
            printf("%-8s %9.0f %9.0f %8.1f %8.1f %8.0f %8llu %6llu %7s\n", when,
                   (double)(cur.reads - prev.reads) / dt, (double)(cur.writes - prev.writes) / dt,
                   mib(cur.read_bytes - prev.read_bytes) / dt, mib(cur.write_bytes - prev.write_bytes) / dt,
                   (double)(cur.flushes - prev.flushes) / dt, (unsigned long long)cur.in_flight,
                   (unsigned long long)cur.errors, hit);
        }
        fflush(stdout);
        prev = cur;
        t_prev = t;
    }
    return 0;
}

/* -w, --watch[=SECS]: "--watch 2" as well as "--watch=2". */
static int take_watch(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                      char **argv)
{
    unsigned long secs;
    if (!arg && optind < argc && argv[optind][0] >= '0' && argv[optind][0] <= '9')
        arg = argv[optind++];
    if (!arg)
        return CLI_GO_ON;
    if (!cli_parse_uint(arg, 1, 3600, &secs)) {
        cli_error("stats: invalid --watch interval '%s' (1 to 3600 seconds)", arg);
        return 2;
    }
    *(unsigned long *)o->dest = secs;
    return CLI_GO_ON;
}

int cmd_stats(int argc, char **argv)
{
    bool json = false, have_id = false, watching = false;
    uint32_t id = 0;
    unsigned long secs = 1;
    unsigned count = 0;
    const struct cli_opt opts[] = {
        CLI_OPT_ID(&id, &have_id),
        { "json", 'j', CLI_FLAG, .dest = &json },
        { "watch", 'w', CLI_CALL, .dest = &secs, .seen = &watching, .optional_arg = true,
          .take = take_watch },
        { "count", 'c', CLI_UINT, .dest = &count, .min = 1, .max = 1000000, .bad = "invalid --count '%s'" },
        { 0 },
    };
    const struct cli_cmd cmd = { "stats", stats_usage, opts, .usage_exit = 2,
                                 .operands = CLI_OPERANDS_NONE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    if (!have_id) {
        cli_error("stats: which device? (-n ID)");
        stats_usage(stderr);
        return 2;
    }
    if (count && !watching) {
        cli_error("stats: --count only goes with --watch");
        return 2;
    }
    if (watching)
        return watch(id, json, secs, count);
    static char reply[CTL_LINE_MAX];
    static struct sample s;
    if (fetch(id, reply, sizeof(reply), &s))
        return 1;
    if (json)
        printf("%s\n", reply);
    else
        print_sample(id, &s);
    return 0;
}
