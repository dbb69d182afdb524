/* ublk-qcow2 add / del / list: ublk block devices backed by images. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "util/json.h"
#include "cli/cli.h"
#include "cli/opts.h"
#include "tools/tools.h"
#include "io/log.h"
#include "ublk/inuse.h"
#include "ublk/ctl_socket.h"
#include "ublk/kernel_ctrl.h"
#include "ublk/server.h"

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif

#define ADD_START_TIMEOUT_S 120     /* image open (a dirty image is repaired) + start */
#define DEL_DEFAULT_TIMEOUT_S 60    /* daemon drain + final flush */

/* ---- add ------------------------------------------------------------------------ */

static void add_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 add [OPTIONS] IMAGE\n\n"
        "Serve IMAGE (qcow2 or raw) as the block device /dev/ublkbN.  Prints the\n"
        "device path once it is live; the daemon keeps serving in the background\n"
        "until 'ublk-qcow2 del'.  Its log: %s/ublkN.log.\n\n"
        "Options:\n"
        "  -n, --id ID            device number N (default: the first free one)\n"
        "  -q, --queues N         hardware queues, one engine thread for all (default %u, max %u)\n"
        "  -d, --depth N          requests in flight per queue (default %u, max %u)\n"
        "  -r, --read-only        refuse writes\n"
        "  -f, --format FMT       auto (default), raw or qcow2\n"
        "  -c, --cache-size SIZE  qcow2 metadata cache, e.g. 32M (default: sized to the image)\n"
        "      --compress-threads N  threads that decompress compressed clusters\n"
        "                         (default: the CPUs; 0: on the engine thread)\n"
        "      --discard MODE     ignore (default, as qemu-nbd): discards do nothing and\n"
        "                         write-zeroes keeps clusters allocated; unmap: discards and\n"
        "                         write-zeroes free clusters and punch holes in the file\n"
        "      --discard-no-unref with --discard=unmap: keep discarded qcow2 clusters\n"
        "                         allocated (reading as zeros), only punch their data out\n"
        "  -l, --snapshot SNAP    serve internal snapshot SNAP of a qcow2 image (ID or\n"
        "                         name, or snapshot.id=ID[,snapshot.name=NAME]),\n"
        "                         read-only\n"
        "      --key-file FILE    passphrase of a LUKS-encrypted qcow2 image: FILE's exact\n"
        "                         bytes, as QEMU reads --object secret,file=FILE\n"
        "      --key-env VAR      the passphrase from the environment variable VAR\n"
        "  -s, --size SIZE        create IMAGE with this virtual size if it does not exist\n"
        "                         (qcow2 with create's defaults, raw with -f raw)\n"
        "      --foreground       serve in the foreground until SIGINT/SIGTERM\n"
        "  -v, --verbose          log more (start, stop); twice for debugging detail\n"
        "      --recovery         if the daemon dies, keep the device (I/O waits) until\n"
        "                         'ublk-qcow2 recover' starts a new one; writes not yet\n"
        "                         flushed when it died may be lost, as with a disk cache\n"
        "      --zero-copy        zero copy where the kernel has it (Linux 6.16+, root\n"
        "                         only; the default)\n"
        "      --no-zero-copy     copy every request through a buffer per tag\n"
        "      --batch-io         fetch and commit requests in batches where the kernel\n"
        "                         has it (Linux 7.0+; elsewhere per tag)\n"
        "      --no-batch-io      fetch and commit each request by itself (the default)\n"
        "  -h, --help             this help\n",
        UBLK_STATE_DIR, UBLK_DEFAULT_QUEUES, UBLK_MAX_QUEUES, UBLK_DEFAULT_DEPTH,
        UBLK_MAX_QUEUE_DEPTH);
}

static bool device_exists(uint32_t id)
{
    struct ublk_ctrl *c;
    int saved = dup(STDERR_FILENO), null = open("/dev/null", O_WRONLY | O_CLOEXEC);
    if (null >= 0)
        dup2(null, STDERR_FILENO);  /* the caller already reported the failure */
    bool exists = false;
    if (ublk_ctrl_open(&c) == 0) {
        struct ublksrv_ctrl_dev_info info;
        exists = ublk_ctrl_get_dev_info(c, id, &info) == 0;
        ublk_ctrl_close(c);
    }
    if (saved >= 0) {
        dup2(saved, STDERR_FILENO);
        close(saved);
    }
    if (null >= 0)
        close(null);
    return exists;
}

/* A daemon that died during start-up leaves its device behind: delete it. */
static void remove_leftover(uint32_t id)
{
    if (!device_exists(id))
        return;
    struct ublk_ctrl *c;
    if (ublk_ctrl_open(&c) < 0)
        return;
    ublk_ctrl_stop_dev(c, id);
    int r = ublk_ctrl_del_dev(c, id);
    if (r < 0 && r != -ENODEV)
        cli_error("cannot delete the half-made ublk device %u: %s", id, strerror(-r));
    ublk_ctrl_close(c);
    ublk_state_remove(id);
}

static pid_t fg_child;
static void forward_signal(int sig)
{
    if (fg_child > 0)
        kill(fg_child, sig);
}

static int report_child_exit(pid_t pid)
{
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return 1;
    if (WIFSIGNALED(status)) {
        cli_error("the daemon died (signal %d)", WTERMSIG(status));
        return 1;
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}

/* Fork the daemon and wait until its device is live ("ok N" on the pipe)
 * or it gave up; in the foreground, then wait for it to end. */
/* Start the daemon and wait until its device is live (*went_live, if given,
 * says whether it got there). */
static int run_daemon(struct ublk_server_opts *o, bool foreground, bool *went_live)
{
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        cli_error("pipe: %s", strerror(errno));
        return 1;
    }
    fflush(stdout);
    fflush(stderr);
    /* Fork before any ring or thread exists: the daemon starts clean. */
    pid_t pid = fork();
    if (pid < 0) {
        cli_error("fork: %s", strerror(errno));
        return 1;
    }
    if (pid == 0) {
        close(pfd[0]);
        /* Keep only stdio and the pipe: an inherited fd (a caller's pipe,
         * a lock) would otherwise stay open as long as the device lives. */
        int keep = pfd[1] == 3 || dup2(pfd[1], 3) == 3 ? 3 : pfd[1];
        if (keep != 3 || close_range(4, ~0u, 0) < 0)
            for (int fd = 3; fd < 1024; fd++)
                if (fd != keep)
                    close(fd);
        if (!foreground) {
            setsid();
            if (chdir("/") < 0)
                _exit(1);
        }
        o->notify_fd = keep;
        o->log_to_file = !foreground;
        exit(ublk_server_run(o));
    }
    close(pfd[1]);
    if (foreground) {
        fg_child = pid;
        struct sigaction sa = { .sa_handler = forward_signal };
        sigaction(SIGTERM, &sa, NULL);
        sigaction(SIGINT, &sa, NULL);
        sigaction(SIGHUP, &sa, NULL);
    }

    /* Wait for "id N" and "ok N" from the daemon, or for it to give up. */
    char buf[128];
    size_t have = 0;
    bool have_id = false, live = false;
    unsigned long id = 0;
    time_t deadline = time(NULL) + ADD_START_TIMEOUT_S;
    while (!live) {
        int left = (int)(deadline - time(NULL));
        if (left <= 0) {
            cli_error("the device did not start within %d s; giving up", ADD_START_TIMEOUT_S);
            kill(pid, SIGKILL);
            report_child_exit(pid);
            if (have_id && !o->recover)
                remove_leftover((uint32_t)id);
            return 1;
        }
        struct pollfd pf = { .fd = pfd[0], .events = POLLIN };
        int pr = poll(&pf, 1, left * 1000);
        if (pr < 0 && errno != EINTR)
            break;
        if (pr <= 0)
            continue;
        ssize_t n = read(pfd[0], buf + have, sizeof(buf) - 1 - have);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;      /* the daemon exited (it said why) */
        have += (size_t)n;
        buf[have] = '\0';
        char *nl;
        while ((nl = strchr(buf, '\n')) != NULL) {
            *nl = '\0';
            if (!strncmp(buf, "id ", 3)) {
                have_id = cli_parse_uint(buf + 3, 0, UINT32_MAX, &id);
            } else if (!strncmp(buf, "ok ", 3) && cli_parse_uint(buf + 3, 0, UINT32_MAX, &id)) {
                have_id = true;
                live = true;
            }
            size_t used = (size_t)(nl - buf) + 1;
            memmove(buf, nl + 1, have - used + 1);
            have -= used;
        }
    }
    close(pfd[0]);
    if (went_live)
        *went_live = live;
    if (!live) {
        int rc = report_child_exit(pid);
        if (have_id && !o->recover)
            remove_leftover((uint32_t)id);
        return rc ? rc : 1;
    }
    printf("/dev/ublkb%lu\n", id);
    fflush(stdout);
    if (!foreground)
        return 0;
    /* Under systemd (Type=notify): the service is up once the device is.
     * Without NOTIFY_SOCKET this does nothing. */
    sd_notifyf(0, "READY=1\nSTATUS=Serving %s as /dev/ublkb%lu", o->image, id);
    return report_child_exit(pid);

}

/* The passphrase and where it came from (kept in the state file for recover). */
static void set_key_opts(struct ublk_server_opts *o, const struct cli_key *k)
{
    o->key = k->data;
    o->key_len = k->len;
    o->key_file = k->file[0] ? k->file : NULL;
    o->key_env = k->env;
}

/* add -s SIZE: a missing image is made first, with create's code and defaults. */
/* add --size: make IMAGE if it does not exist (*created says so). */
static int create_missing_image(const char *path, enum img_format format, uint64_t size, bool *created)
{
    *created = false;
    if (access(path, F_OK) == 0 || errno != ENOENT)
        return 0;
    struct create_opts co;
    char err[1024];
    create_opts_init(&co);
    co.format = format == IMG_FMT_RAW ? IMG_FMT_RAW : IMG_FMT_QCOW2;
    co.size = size;
    co.size_set = true;
    if (img_create(path, &co, err, sizeof(err)) < 0) {
        cli_error("add: cannot create %s: %s", path, err);
        return 1;
    }
    *created = true;
    return 0;
}

int cmd_add(int argc, char **argv)
{
    static struct cli_key key;
    uint64_t create_size = 0;
    struct ublk_server_opts o = {
        .dev_id = UBLK_DEV_ID_AUTO, .nr_queues = UBLK_DEFAULT_QUEUES,
        .depth = UBLK_DEFAULT_DEPTH, .buf_bytes = UBLK_IO_BUF_BYTES,
        .format = IMG_FMT_AUTO, .notify_fd = -1,
    };
    bool foreground = false, create = false;
    const struct cli_opt opts[] = {
        { "id", 'n', CLI_UINT, .dest = &o.dev_id, .max = 1u << 20,
          .bad = "invalid device id '%s' (a number from 0 to %lu)" },
        { "queues", 'q', CLI_UINT, .dest = &o.nr_queues, .min = 1, .max = UBLK_MAX_QUEUES,
          .bad = "invalid queue count '%s' (1 to %lu)" },
        { "depth", 'd', CLI_UINT, .dest = &o.depth, .min = 1, .max = UBLK_MAX_QUEUE_DEPTH,
          .bad = "invalid depth '%s' (1 to %lu)" },
        { "read-only", 'r', CLI_FLAG, .dest = &o.read_only },
        { "format", 'f', CLI_FORMAT, .dest = &o.format },
        { "cache-size", 'c', CLI_SIZE, .dest = &o.cache_size, .min = 1, .bad = "invalid cache size '%s' (e.g. 32M; at least 1 byte, " SIZE_RANGE ")" },
        CLI_OPT_COMPRESS_THREADS,
        { "foreground", 0, CLI_FLAG, .dest = &foreground },
        { "recovery", 0, CLI_FLAG, .dest = &o.recovery },
        { "zero-copy", 0, CLI_FLAG, .dest = &o.zero_copy },
        { "no-zero-copy", 0, CLI_FLAG, .dest = &o.no_zero_copy },
        { "batch-io", 0, CLI_FLAG, .dest = &o.batch_io },
        { "no-batch-io", 0, CLI_FLAG, .dest = &o.no_batch_io },
        { "discard", 0, CLI_DISCARD, .dest = &o.discard },
        { "discard-no-unref", 0, CLI_FLAG, .dest = &o.discard_no_unref },
        { "snapshot", 'l', CLI_STRING, .dest = &o.snapshot },
        { "key-file", 0, CLI_KEY_FILE, .dest = &key },
        { "key-env", 0, CLI_KEY_ENV, .dest = &key },
        { "size", 's', CLI_SIZE, .dest = &create_size, .seen = &create, .bad = "invalid size '%s' (e.g. 10G: " SIZE_RANGE ")" },
        { .letter = 'v', .type = CLI_VERBOSE },
        { 0 },
    };
    const struct cli_cmd cmd = { "add", add_usage, opts, .usage_exit = 2,
                                 .operands = CLI_OPERAND_IMAGE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    const char *path = argv[optind];
    if (o.snapshot)
        o.read_only = true;     /* a snapshot is served as it was taken */
    bool created = false, live = false;
    if (create && create_missing_image(path, o.format, create_size, &created))
        return 1;
    char image[PATH_MAX];
    if (!realpath(path, image)) {
        cli_error("add: cannot open image %s: %s", path, strerror(errno));
        return 1;
    }
    o.image = image;
    set_key_opts(&o, &key);

    rc = run_daemon(&o, foreground, &live);
    cli_key_clear(&key);
    /* The image this add made never served a device: nothing of the
     * user's is in it, so it goes rather than being left behind. */
    if (created && !live) {
        if (unlink(image) == 0)
            cli_error("add: removed %s, which this add had created", path);
    }
    return rc;
}

/* ---- device enumeration --------------------------------------------------------- */

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/* Ids of ublk devices: /dev/ublkcN nodes plus state files.  Sorted, unique. */
static size_t list_ids(uint32_t *ids, size_t max)
{
    size_t n = 0;
    const char *dirs[2] = { "/dev", UBLK_STATE_DIR };
    const char *fmts[2] = { "ublkc%u%n", "ublk%u.json%n" };
    for (int d = 0; d < 2; d++) {
        DIR *dir = opendir(dirs[d]);
        if (!dir)
            continue;
        struct dirent *de;
        while ((de = readdir(dir)) != NULL && n < max) {
            unsigned id;
            int end = 0;
            if (sscanf(de->d_name, fmts[d], &id, &end) == 1 && de->d_name[end] == '\0')
                ids[n++] = id;
        }
        closedir(dir);
    }
    qsort(ids, n, sizeof(*ids), cmp_u32);
    size_t u = 0;
    for (size_t i = 0; i < n; i++)
        if (u == 0 || ids[u - 1] != ids[i])
            ids[u++] = ids[i];
    return u;
}

/* True if pid runs this same program (a state file's pid may be stale). */
static bool is_our_daemon(pid_t pid)
{
    char a[PATH_MAX], b[PATH_MAX], link[64];
    snprintf(link, sizeof(link), "/proc/%d/exe", (int)pid);
    ssize_t n = readlink(link, a, sizeof(a) - 1);
    ssize_t m = readlink("/proc/self/exe", b, sizeof(b) - 1);
    if (n <= 0 || m <= 0)
        return false;
    a[n] = b[m] = '\0';
    return !strcmp(a, b);
}

/* ---- del ------------------------------------------------------------------------ */

static void del_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 del -n ID | --all [--force] [--timeout SECS]\n\n"
        "Stop ublk device(s): the daemon finishes the requests in flight, flushes\n"
        "and closes the image and exits; then the device is deleted.\n\n"
        "A device in use is left alone (exit 1, still serving): mounted (the disk\n"
        "or a partition), swap, held by dm/LVM/md, or open in a process.  The\n"
        "message names each user and how to release it.  Where the kernel has\n"
        "UBLK_F_SAFE_STOP_DEV (Linux 7.0+) it refuses the stop itself, so a user\n"
        "arriving during del cannot be missed.\n\n"
        "Options:\n"
        "  -n, --id ID        the device /dev/ublkbID\n"
        "  -a, --all          every ublk device\n"
        "  -f, --force        stop it even if in use (its users get I/O errors;\n"
        "                     a mounted file system is cut off)\n"
        "  -t, --timeout SECS how long to wait for a daemon to exit (default %d)\n"
        "  -h, --help         this help\n", DEL_DEFAULT_TIMEOUT_S);
}

static int del_one(struct ublk_ctrl *c, uint32_t id, unsigned timeout_s, bool quiet_missing,
                   bool force)
{
    struct ublksrv_ctrl_dev_info info;
    int r = ublk_ctrl_get_dev_info(c, id, &info);
    if (r < 0) {
        if (r == -ENODEV)
            ublk_state_remove(id);     /* stale, if any */
        /* --all: devices that are gone, or another user's, are not ours to stop. */
        if ((r == -ENODEV || r == -EPERM || r == -EACCES) && quiet_missing)
            return 0;
        if (r == -ENODEV)
            cli_error("del: there is no ublk device %u", id);
        else
            cli_error("del: ublk device %u: %s", id, strerror(-r));
        return 1;
    }
    pid_t pid = info.ublksrv_pid > 0 ? info.ublksrv_pid : 0;
    /* A dead daemon's pid (quiesced device) may belong to someone else now. */
    if (pid && info.state != UBLK_S_DEV_LIVE && !is_our_daemon(pid))
        pid = 0;
    struct ublk_state st;
    if (!pid && ublk_state_read(id, &st) == 0 && st.pid > 0 && is_our_daemon(st.pid))
        pid = st.pid;
    /* Taken before STOP_DEV, so the pid cannot be reused under us. */
    int pidfd = pid > 0 ? (int)syscall(SYS_pidfd_open, pid, 0) : -1;

    static char why[8192];
    if (!force) {
        r = ublk_stop_if_unused(c, id, info.flags, why, sizeof(why));
        if (r == -EBUSY) {
            cli_error("del: /dev/ublkb%u is in use; not stopping it (it keeps serving):\n%s"
                      "Release it as said, or stop it anyway with 'ublk-qcow2 del -n %u --force' "
                      "(its users then get I/O errors)", id, why, id);
            if (pidfd >= 0)
                close(pidfd);
            return 1;
        }
    } else {
        if (ublk_dev_users(id, why, sizeof(why)) > 0)
            uq_warn("del --force: stopping /dev/ublkb%u while in use; these users now get "
                    "I/O errors (the device goes once they let go):\n%s", id, why);
        r = ublk_ctrl_stop_dev(c, id);
    }
    if (r < 0 && r != -ENODEV) {
        cli_error("del: cannot stop ublk device %u: %s", id, strerror(-r));
        if (pidfd >= 0)
            close(pidfd);
        return 1;
    }
    if (pidfd >= 0) {
        struct pollfd pf = { .fd = pidfd, .events = POLLIN };
        int pr;
        do
            pr = poll(&pf, 1, (int)timeout_s * 1000);
        while (pr < 0 && errno == EINTR);
        close(pidfd);
        if (pr == 0) {
            cli_error("del: the daemon of ublk device %u (pid %d) did not exit within %u s "
                      "(still flushing the image? its log: %s/ublk%u.log); the device is stopped "
                      "but not deleted", id, (int)pid, timeout_s, UBLK_STATE_DIR, id);
            return 1;
        }
    }
    /* The daemon deletes its own device on the way out; this covers a dead
     * one.  Not waiting: a file system forced away keeps the disk until
     * it is unmounted. */
    r = ublk_ctrl_del_dev_nowait(c, id);
    if (r < 0 && r != -ENODEV) {
        cli_error("del: cannot delete ublk device %u: %s", id, strerror(-r));
        return 1;
    }
    ublk_state_remove(id);
    return 0;
}

int cmd_del(int argc, char **argv)
{
    bool all = false, have_id = false, force = false;
    uint32_t id = 0;
    unsigned timeout_s = DEL_DEFAULT_TIMEOUT_S;
    const struct cli_opt opts[] = {
        CLI_OPT_ID(&id, &have_id),
        { "all", 'a', CLI_FLAG, .dest = &all },
        { "force", 'f', CLI_FLAG, .dest = &force },
        { "timeout", 't', CLI_UINT, .dest = &timeout_s, .min = 1, .max = 86400,
          .bad = "invalid timeout '%s' (seconds, 1 to 86400)" },
        { 0 },
    };
    const struct cli_cmd cmd = { "del", del_usage, opts, .usage_exit = 2,
                                 .operands = CLI_OPERANDS_NONE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    if (have_id == all) {
        cli_error("del: give exactly one of -n ID or --all");
        del_usage(stderr);
        return 2;
    }
    struct ublk_ctrl *ctrl;
    if (ublk_ctrl_open(&ctrl) < 0)
        return 1;
    if (have_id) {
        rc = del_one(ctrl, id, timeout_s, false, force);
    } else {
        rc = 0;
        uint32_t ids[1024];
        size_t n = list_ids(ids, 1024);
        for (size_t i = 0; i < n; i++)
            if (del_one(ctrl, ids[i], timeout_s, true, force))
                rc = 1;
    }
    ublk_ctrl_close(ctrl);
    return rc;
}

/* ---- list ----------------------------------------------------------------------- */

static void list_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 list [-n ID] [--json]\n"
        "       ublk-qcow2 list -n ID --udev-name | --owner\n"
        "       ublk-qcow2 list --udev-name-of ublkbN[pM]\n\n"
        "Show ublk devices: id, state (LIVE, QUIESCED, DEAD), queues, depth,\n"
        "daemon pid and image.\n\n"
        "Options:\n"
        "  -n, --id ID     only this device (an error if it does not exist)\n"
        "  -j, --json      a JSON array of objects; \"partitions\" lists the\n"
        "                  partition devices (/dev/ublkbNpM); \"features\" names the ublk\n"
        "                  features (UBLK_F_*) the device was granted,\n"
        "                  \"kernel_features\" those this kernel offers\n"
        "      --udev-name the stable name of device ID: its image path escaped as\n"
        "                  'systemd-escape --path' does (for the udev rule that makes\n"
        "                  /dev/disk/by-ublk-qcow2/NAME, and NAME-partM for its\n"
        "                  partitions)\n"
        "      --udev-name-of ublkbN[pM]  the same for the device or partition udev\n"
        "                  knows by that kernel name (NAME, or NAME-partM)\n"
        "      --owner     \"UID GID\" of the user who added unprivileged device ID\n"
        "                  (for the udev rule that gives its nodes to that user)\n"
        "  -h, --help      this help\n");
}

/* The image path escaped as systemd-escape --path does it: no leading or
 * trailing '/', '/' becomes '-', bytes other than [A-Za-z0-9:_.] (and a
 * leading '.') become \xNN.  Returns false if it does not fit. */
static bool escape_path(const char *path, char *out, size_t len)
{
    size_t n = 0;
    while (*path == '/')
        path++;
    bool first = true;
    for (const char *p = path; *p; p++) {
        unsigned char ch = (unsigned char)*p;
        if (ch == '/') {
            while (p[1] == '/')
                p++;
            if (!p[1])
                break;      /* trailing slash */
            if (n + 1 >= len)
                return false;
            out[n++] = '-';
        } else if ((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
                   ch == ':' || ch == '_' || (ch == '.' && !first)) {
            if (n + 1 >= len)
                return false;
            out[n++] = (char)ch;
        } else {
            if (n + 4 >= len)
                return false;
            n += (size_t)snprintf(out + n, len - n, "\\x%02x", ch);
        }
        first = false;
    }
    if (n == 0) {   /* the root directory itself */
        if (len < 2)
            return false;
        out[n++] = '-';
    }
    out[n] = '\0';
    return true;
}

/* A device's state file: ours, or for root looking at another user's
 * unprivileged device, that user's (info may be NULL: ours only). */
static bool device_state(uint32_t id, const struct ublksrv_ctrl_dev_info *info, struct ublk_state *st)
{
    if (ublk_state_read(id, st) == 0)
        return true;
    if (!info || !(info->flags & UBLK_F_UNPRIVILEGED_DEV) || ublk_info_owner_uid(info) == geteuid())
        return false;
    char dir[PATH_MAX];
    ublk_state_dir_of(ublk_info_owner_uid(info), dir, sizeof(dir));
    return ublk_state_read_in(dir, id, st) == 0;
}

/* list -n ID --udev-name: one line, or exit 1 if the device is unknown;
 * part > 0: the name of its partition part (NAME-partM, as by-id names). */
static int print_udev_name(uint32_t id, unsigned long part)
{
    static struct ublk_state st;
    char name[PATH_MAX * 4];
    bool found = device_state(id, NULL, &st);
    struct ublk_ctrl *ctrl;
    if (!found && ublk_ctrl_open(&ctrl) == 0) {
        struct ublksrv_ctrl_dev_info info;
        found = ublk_ctrl_get_dev_info(ctrl, id, &info) == 0 && device_state(id, &info, &st);
        ublk_ctrl_close(ctrl);
    }
    if (!found) {
        cli_error("list: ublk device %u has no state file in %s", id, UBLK_STATE_DIR);
        return 1;
    }
    if (!escape_path(st.image, name, sizeof(name))) {
        cli_error("list: the image path of ublk device %u is too long for a name", id);
        return 1;
    }
    if (part)
        printf("%s-part%lu\n", name, part);
    else
        printf("%s\n", name);
    return 0;
}

/* list --udev-name-of KERNEL: the name of the device or partition udev
 * knows as KERNEL (ublkbN or ublkbNpM). */
static int print_udev_name_of(const char *kernel)
{
    unsigned long id, part = 0;
    char num[32];
    const char *p = !strncmp(kernel, "ublkb", 5) ? kernel + 5 : NULL;
    size_t n = p ? strspn(p, "0123456789") : 0;
    bool ok = n > 0 && n < sizeof(num);
    if (ok) {
        memcpy(num, p, n);
        num[n] = '\0';
        ok = cli_parse_uint(num, 0, UINT32_MAX - 1, &id) &&
             (!p[n] || (p[n] == 'p' && cli_parse_uint(p + n + 1, 1, 1u << 20, &part)));
    }
    if (!ok) {
        cli_error("list: '%s' is not a ublk block device name (ublkbN or ublkbNpM)", kernel);
        return 2;
    }
    return print_udev_name((uint32_t)id, part);
}

/* list -n ID --owner: "UID GID" of an unprivileged device (for the udev
 * rule that gives its nodes to its owner); exit 1 for root's devices. */
static int print_owner(struct ublk_ctrl *ctrl, uint32_t id)
{
    struct ublksrv_ctrl_dev_info info;
    int r = ublk_ctrl_get_dev_info(ctrl, id, &info);
    if (r < 0) {
        cli_error("list: %s ublk device %u%s%s", r == -ENODEV ? "there is no" : "cannot query", id,
                  r == -ENODEV ? "" : ": ", r == -ENODEV ? "" : strerror(-r));
        return 1;
    }
    if (!(info.flags & UBLK_F_UNPRIVILEGED_DEV)) {
        cli_error("list: ublk device %u is not an unprivileged device (root's)", id);
        return 1;
    }
    printf("%u %u\n", ublk_info_owner_uid(&info), ublk_info_owner_gid(&info));
    return 0;
}

int cmd_list(int argc, char **argv)
{
    bool json = false, have_id = false, udev_name = false, owner = false;
    const char *udev_name_of = NULL;
    uint32_t id = 0;
    const struct cli_opt opts[] = {
        CLI_OPT_ID(&id, &have_id),
        { "json", 'j', CLI_FLAG, .dest = &json },
        { "udev-name", 0, CLI_FLAG, .dest = &udev_name },
        { "udev-name-of", 0, CLI_STRING, .dest = &udev_name_of },
        { "owner", 0, CLI_FLAG, .dest = &owner },
        { 0 },
    };
    const struct cli_cmd cmd = { "list", list_usage, opts, .usage_exit = 2,
                                 .operands = CLI_OPERANDS_NONE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    if (udev_name_of)
        return print_udev_name_of(udev_name_of);
    if (udev_name || owner) {
        if (!have_id || json || (udev_name && owner)) {
            cli_error("list: --udev-name and --owner need -n ID (and nothing else)");
            return 2;
        }
        if (udev_name)
            return print_udev_name(id, 0);
    }
    struct ublk_ctrl *ctrl;
    if (ublk_ctrl_open(&ctrl) < 0)
        return 1;
    if (owner) {
        rc = print_owner(ctrl, id);
        ublk_ctrl_close(ctrl);
        return rc;
    }
    uint64_t kernel_features = 0;
    bool features_known = ublk_ctrl_features(ctrl, &kernel_features);
    uint32_t ids[1024];
    size_t n;
    if (have_id) {
        ids[0] = id;
        n = 1;
    } else {
        n = list_ids(ids, 1024);
    }
    rc = 0;
    unsigned shown = 0;
    if (json)
        printf("[");
    else
        printf("%-4s %-9s %-6s %-5s %-8s %s\n", "ID", "STATE", "QUEUES", "DEPTH", "PID", "IMAGE");
    for (size_t i = 0; i < n; i++) {
        struct ublksrv_ctrl_dev_info info;
        int r = ublk_ctrl_get_dev_info(ctrl, ids[i], &info);
        if (r < 0) {
            if (have_id) {
                cli_error("list: %s ublk device %u%s%s", r == -ENODEV ? "there is no" : "cannot query",
                          ids[i], r == -ENODEV ? "" : ": ", r == -ENODEV ? "" : strerror(-r));
                rc = 1;
            }
            continue;
        }
        struct ublk_state st;
        bool have_st = device_state(ids[i], &info, &st);
        const char *state = ublk_state_name(info.state);
        bool unpriv = info.flags & UBLK_F_UNPRIVILEGED_DEV;
        if (json) {
            printf("%s\n  {\"id\": %u, \"device\": \"/dev/ublkb%u\", \"state\": \"%s\", "
                   "\"queues\": %u, \"depth\": %u, \"pid\": %d, \"max_io_buf_bytes\": %u, "
                   "\"owner_uid\": %u, \"unprivileged\": %s, \"image\": ",
                   shown ? "," : "", ids[i], ids[i], state, info.nr_hw_queues, info.queue_depth,
                   (int)info.ublksrv_pid, info.max_io_buf_bytes,
                   unpriv ? ublk_info_owner_uid(&info) : 0, unpriv ? "true" : "false");
            if (have_st) {
                json_put_string(stdout, st.image);
                printf(", \"format\": ");
                json_put_string(stdout, st.format);
                printf(", \"read_only\": %s, \"zero_copy\": %s", st.read_only ? "true" : "false",
                       ublk_uses_zero_copy(info.flags) ? "true" : "false");
            } else {
                printf("null, \"format\": null, \"read_only\": null, \"zero_copy\": null");
            }
            /* From the device's flags, like zero_copy: a recovered device keeps it. */
            printf(", \"batch_io\": %s", ublk_uses_batch_io(info.flags) ? "true" : "false");
            /* The kernel's partitions of the disk (partition table in the image). */
            static char parts[128 * 24];
            int np = ublk_dev_partitions(ids[i], parts, sizeof(parts));
            printf(", \"partitions\": [");
            const char *pp = parts;
            for (int k = 0; k < np; k++, pp += strlen(pp) + 1)
                printf("%s\"%s\"", k ? ", " : "", pp);
            printf("]");
            printf(", \"features\": ");
            ublk_put_feature_names(stdout, info.flags);
            printf(", \"kernel_features\": ");
            if (features_known)
                ublk_put_feature_names(stdout, kernel_features);
            else
                printf("null");
            printf("}");
        } else {
            printf("%-4u %-9s %-6u %-5u %-8d %s\n", ids[i], state, info.nr_hw_queues,
                   info.queue_depth, (int)info.ublksrv_pid, have_st ? st.image : "-");
        }
        shown++;
    }
    if (json)
        printf("%s]\n", shown ? "\n" : "");
    ublk_ctrl_close(ctrl);
    return rc;
}

/* ---- recover -------------------------------------------------------------------- */

static void recover_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 recover -n ID [--foreground] [--key-file FILE | --key-env VAR]\n\n"
        "Start a new daemon for ublk device ID, added with --recovery, whose daemon\n"
        "died: the device (QUIESCED, its I/O waiting) becomes LIVE again.  The image\n"
        "and its options come from %s/ublkID.json.  An encrypted image's passphrase\n"
        "is read again from where `add` took it (the same --key-file, or --key-env\n"
        "variable in this environment) unless given here; it is never stored.\n\n"
        "Options:\n"
        "  -n, --id ID        the device /dev/ublkbID\n"
        "      --foreground   serve in the foreground until SIGINT/SIGTERM\n"
        "      --key-file FILE, --key-env VAR   passphrase of a LUKS-encrypted image\n"
        "  -v, --verbose      log more (start, stop); twice for debugging detail\n"
        "  -h, --help         this help\n", UBLK_STATE_DIR);
}

/* The options of device id's next daemon, from its state file (and its
 * passphrase, from where `add` took it unless key already holds one);
 * 1 after saying why not. */
static int opts_from_state(const char *cmd, uint32_t id, struct ublk_state *st, struct cli_key *key,
                           struct ublk_server_opts *out)
{
    int r = ublk_state_read(id, st);
    if (r < 0) {
        cli_error("%s: %s %s/ublk%u.json: the image of ublk device %u is not known", cmd,
                  r == -ENOENT ? "no state file" : "unreadable state file", UBLK_STATE_DIR, id, id);
        return 1;
    }
    struct ublk_server_opts o = {
        .image = st->image, .dev_id = id, .nr_queues = st->queues, .depth = st->depth,
        .buf_bytes = UBLK_IO_BUF_BYTES, .read_only = st->read_only, .cache_size = st->cache_size,
        .discard = st->discard_unmap ? IMG_DISCARD_UNMAP : IMG_DISCARD_IGNORE,
        .discard_no_unref = st->discard_no_unref,
        .format = !strcmp(st->format, "raw") ? IMG_FMT_RAW
                : !strcmp(st->format, "qcow2") ? IMG_FMT_QCOW2 : IMG_FMT_AUTO,
        .recovery = true, .recover = true, .notify_fd = -1,
        .snapshot = st->snapshot[0] ? st->snapshot : NULL,
    };
    /* The passphrase from where `add` took it, unless given now. */
    if (!key->data && st->key_file[0] && cli_key_from_file(cmd, st->key_file, key))
        return 1;
    if (!key->data && st->key_env[0]) {
        static char var[sizeof(st->key_env)];
        snprintf(var, sizeof(var), "%s", st->key_env);
        if (cli_key_from_env(cmd, var, key))
            return 1;
    }
    set_key_opts(&o, key);
    *out = o;
    return 0;
}

/* recover and restart: -n ID, the daemon's options, and the device's info
 * (it must exist).  CLI_GO_ON, or the exit code after saying why. */
static int takeover_args(const char *name, void (*usage)(FILE *), int argc, char **argv, struct cli_key *key,
                         bool *foreground, uint32_t *id, struct ublksrv_ctrl_dev_info *info)
{
    bool have_id = false;
    const struct cli_opt opts[] = {
        CLI_OPT_ID(id, &have_id),
        { "foreground", 0, CLI_FLAG, .dest = foreground },
        { "verbose", 'v', .type = CLI_VERBOSE },
        { "key-file", 0, CLI_KEY_FILE, .dest = key },
        { "key-env", 0, CLI_KEY_ENV, .dest = key },
        { 0 },
    };
    const struct cli_cmd cmd = { name, usage, opts, .usage_exit = 2, .operands = CLI_OPERANDS_NONE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    if (!have_id) {
        cli_error("%s: -n ID is required", name);
        usage(stderr);
        return 2;
    }
    /* Check the device first: clearer than the image lock a live daemon holds. */
    struct ublk_ctrl *ctrl;
    if (ublk_ctrl_open(&ctrl) < 0)
        return 1;
    int r = ublk_ctrl_get_dev_info(ctrl, *id, info);
    ublk_ctrl_close(ctrl);
    if (r < 0) {
        if (r == -ENODEV)
            cli_error("%s: there is no ublk device %u", name, *id);
        else
            cli_error("%s: ublk device %u: %s", name, *id, strerror(-r));
        return 1;
    }
    return CLI_GO_ON;
}

int cmd_recover(int argc, char **argv)
{
    static struct cli_key key;
    bool foreground = false;
    uint32_t id = 0;
    struct ublksrv_ctrl_dev_info info;
    int rc = takeover_args("recover", recover_usage, argc, argv, &key, &foreground, &id, &info);
    if (rc != CLI_GO_ON)
        return rc;
    if (!(info.flags & UBLK_F_USER_RECOVERY)) {
        cli_error("recover: ublk device %u was not added with --recovery", id);
        return 1;
    }
    if (info.state == UBLK_S_DEV_LIVE && info.ublksrv_pid > 0 && kill(info.ublksrv_pid, 0) == 0) {
        cli_error("recover: ublk device %u is LIVE, served by pid %d: nothing to recover", id,
                  (int)info.ublksrv_pid);
        return 1;
    }
    static struct ublk_state st;
    struct ublk_server_opts o;
    if (opts_from_state("recover", id, &st, &key, &o))
        return 1;
    rc = run_daemon(&o, foreground, NULL);
    cli_key_clear(&key);
    return rc;
}

/* ---- restart -------------------------------------------------------------------- */

#define RESTART_EXIT_TIMEOUT_S 60   /* the old daemon's drain, flush and exit */

static void restart_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 restart -n ID [--foreground] [--key-file FILE | --key-env VAR]\n\n"
        "Replace the running daemon of ublk device ID, added with --recovery, by a\n"
        "new one (e.g. after an upgrade of ublk-qcow2) while the device stays in\n"
        "use: the old daemon stops taking requests, finishes those in flight,\n"
        "flushes the image and exits; the new one takes the device over as\n"
        "'recover' does.  Requests issued meanwhile wait; none fails and no\n"
        "acknowledged write is lost.  Prints /dev/ublkbID once the new daemon serves.\n"
        "The image and its options come from %s/ublkID.json; an encrypted\n"
        "image's passphrase is read again from where `add` took it unless given here.\n\n"
        "Options:\n"
        "  -n, --id ID        the device /dev/ublkbID\n"
        "      --foreground   serve in the foreground until SIGINT/SIGTERM\n"
        "      --key-file FILE, --key-env VAR   passphrase of a LUKS-encrypted image\n"
        "  -v, --verbose      log more (start, stop); twice for debugging detail\n"
        "  -h, --help         this help\n", UBLK_STATE_DIR);
}

int cmd_restart(int argc, char **argv)
{
    static struct cli_key key;
    bool foreground = false;
    uint32_t id = 0;
    struct ublksrv_ctrl_dev_info info;
    int rc = takeover_args("restart", restart_usage, argc, argv, &key, &foreground, &id, &info);
    if (rc != CLI_GO_ON)
        return rc;
    int r;
    if (!(info.flags & UBLK_F_USER_RECOVERY)) {
        cli_error("restart: ublk device %u was not added with --recovery, so it cannot outlive its "
                  "daemon; to make it restartable: 'ublk-qcow2 del -n %u', then 'ublk-qcow2 add "
                  "--recovery ...'; the device is unchanged", id, id);
        return 1;
    }
    pid_t pid = info.ublksrv_pid;
    if (info.state != UBLK_S_DEV_LIVE || pid <= 0 || kill(pid, 0) < 0) {
        cli_error("restart: the daemon of ublk device %u is not running (the device is %s): start a "
                  "new one with 'ublk-qcow2 recover -n %u'", id, ublk_state_name(info.state), id);
        return 1;
    }
    /* Everything the new daemon needs (state file, passphrase) is read
     * before the old one is asked to go: a failure here changes nothing. */
    static struct ublk_state st;
    struct ublk_server_opts o;
    if (opts_from_state("restart", id, &st, &key, &o))
        return 1;
    /* Taken before the request, so the pid cannot be reused under us. */
    int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
    if (pidfd < 0) {
        cli_error("restart: cannot watch the daemon of ublk device %u (pid %d): %s", id, (int)pid,
                  strerror(errno));
        cli_key_clear(&key);
        return 1;
    }
    char reply[CTL_LINE_MAX], err[CTL_LINE_MAX];
    r = ctl_request_wait(id, "restart", reply, sizeof(reply), RESTART_EXIT_TIMEOUT_S * 1000);
    if (r < 0 || json_get_string(reply, "error", err, sizeof(err))) {
        if (r == -ENOENT)
            cli_error("restart: the daemon of ublk device %u (pid %d) has no control socket in %s; "
                      "the device is unchanged", id, (int)pid, UBLK_STATE_DIR);
        else if (r < 0)
            cli_error("restart: cannot ask the daemon of ublk device %u (pid %d): %s; if it is "
                      "exiting, 'ublk-qcow2 recover -n %u' starts a new one once the device is "
                      "QUIESCED", id, (int)pid, strerror(-r), id);
        else if (!strcmp(err, "unknown request"))
            cli_error("restart: the daemon of ublk device %u (pid %d) is older than 'restart' and "
                      "cannot hand the device over; the device is unchanged", id, (int)pid);
        else
            cli_error("restart: %s", err);
        close(pidfd);
        cli_key_clear(&key);
        return 1;
    }
    /* It has drained and flushed; wait for it to be gone (its rings closed:
     * only then is the device QUIESCED and its image lock free). */
    struct pollfd pf = { .fd = pidfd, .events = POLLIN };
    int pr;
    do
        pr = poll(&pf, 1, RESTART_EXIT_TIMEOUT_S * 1000);
    while (pr < 0 && errno == EINTR);
    close(pidfd);
    if (pr <= 0) {
        cli_error("restart: the old daemon of ublk device %u (pid %d) did not exit within %d s; its "
                  "I/O waits; once it has exited, 'ublk-qcow2 recover -n %u' starts the new one",
                  id, (int)pid, RESTART_EXIT_TIMEOUT_S, id);
        cli_key_clear(&key);
        return 1;
    }
    bool live = false;
    rc = run_daemon(&o, foreground, &live);
    cli_key_clear(&key);
    if (rc && !live)
        cli_error("restart: the new daemon of ublk device %u did not start; the device keeps its "
                  "I/O waiting (nothing is lost): fix the problem above, then 'ublk-qcow2 recover -n %u'",
                  id, id);
    return rc;
}
