/* ublk-qcow2 snapshot / resize: internal snapshots and virtual size, on an
 * image nobody uses (offline, under QEMU's writer lock), or on the image of
 * a live ublk device through its daemon's control socket (-n ID). */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "util/json.h"
#include "cli/cli.h"
#include "cli/opts.h"
#include "io/imagelock.h"
#include "img/image.h"
#include "ublk/ctl_socket.h"
#include "ublk/server.h"

static void snapshot_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 snapshot list [--json] [-U] IMAGE\n"
        "       ublk-qcow2 snapshot create IMAGE NAME\n"
        "       ublk-qcow2 snapshot create -n ID NAME\n"
        "       ublk-qcow2 snapshot delete IMAGE NAME|ID\n"
        "       ublk-qcow2 snapshot apply IMAGE NAME|ID\n\n"
        "Internal snapshots of a qcow2 image, as 'qemu-img snapshot' makes them.\n"
        "  list     show the snapshots (ID, name, VM state size, date, VM clock, icount;\n"
        "           --json: also the disk size each recorded)\n"
        "  create   save the current content as snapshot NAME (it gets the next ID;\n"
        "           as in QEMU, names may repeat)\n"
        "  delete   drop a snapshot and free the clusters only it used\n"
        "  apply    revert the image to a snapshot's content (and its disk size)\n"
        "A snapshot is named by ID or name (ID first), or as\n"
        "'snapshot.id=ID[,snapshot.name=NAME]'.  The image must not be in use: it is\n"
        "locked as QEMU locks it.  With -n ID, 'create' snapshots the image of the\n"
        "live device /dev/ublkbID: its I/O pauses while in-flight requests finish,\n"
        "metadata is flushed and the snapshot is taken, then resumes.\n"
        "Export a snapshot read-only with 'nbd --snapshot' or 'add --snapshot'.\n\n"
        "Options:\n"
        "  -n, --id ID          create: the live ublk device /dev/ublkbID\n"
        "  -j, --json           list: one JSON array\n"
        "  -U, --force-share    list: read the image even if it is in use (unsafe)\n"
        "  -h, --help           this help\n");
}

static void resize_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 resize [--shrink] IMAGE [+|-]SIZE\n"
        "       ublk-qcow2 resize -n ID [+]SIZE\n\n"
        "Set the virtual size of IMAGE (qcow2: the L1 table grows when needed, the\n"
        "header records the size; raw: the file is truncated).  SIZE takes K, M, G,\n"
        "T suffixes; +SIZE / -SIZE are relative to the current size.  A qcow2 size\n"
        "must be a multiple of 512 bytes.  Growing over a backing file that reaches\n"
        "past the old end makes the new range read as zeros, as QEMU does.\n"
        "Shrinking needs --shrink and an unused tail: nothing allocated past the new\n"
        "end (zero clusters are fine) and the rest of the last cluster reading as\n"
        "zeros; otherwise it is refused and nothing changes.  The image must not be\n"
        "in use (it is locked as QEMU locks it).\n"
        "With -n ID the live device /dev/ublkbID grows (I/O paused meanwhile); that\n"
        "needs a kernel with UBLK_F_UPDATE_SIZE (Linux 6.16 or newer).\n\n"
        "Options:\n"
        "  -n, --id ID          the live ublk device /dev/ublkbID (grow only)\n"
        "      --shrink         allow a smaller size (as qemu-img resize --shrink)\n"
        "  -h, --help           this help\n");
}

/* Open IMAGE for an offline command under QEMU's locks (a writer's unless
 * read_only; none with force_share); 0 and *img, or 1 after saying why. */
static int open_offline(const char *cmd, const char *path, bool read_only, bool force_share,
                        struct image **img, int *lock_fd)
{
    char err[600];
    *lock_fd = -1;
    if (!force_share) {
        *lock_fd = image_lock(path, !read_only, err, sizeof(err));
        if (*lock_fd < 0) {
            if (*lock_fd == -EBUSY)
                cli_error("%s: %s (stop what uses it first%s)", cmd, err,
                          read_only ? ", or -U to read it anyway" : "");
            else
                cli_error("%s: %s", cmd, err);
            return 1;
        }
    }
    struct img_opts o = { .format = IMG_FMT_AUTO, .read_only = read_only, .cache = FILE_CACHE_AUTO };
    *img = img_open(path, &o, err, sizeof(err));
    if (!*img) {
        cli_error("%s: %s", cmd, err);
        if (*lock_fd >= 0)
            close(*lock_fd);
        return 1;
    }
    return 0;
}

static int close_offline(const char *cmd, struct image *img, int lock_fd, int rc)
{
    int r = img_close(img);
    if (r < 0 && rc == 0) {
        cli_error("%s: closing the image failed: %s", cmd, strerror(-r));
        rc = 1;
    }
    if (lock_fd >= 0)
        close(lock_fd);
    return rc;
}

/* ---- snapshot ----------------------------------------------------------------- */

/* QEMU's human-readable size (qemu-img snapshot -l "VM SIZE"). */
static void human_size(uint64_t v, char *buf, size_t len)
{
    static const char *const unit[] = { "KiB", "MiB", "GiB", "TiB", "PiB", "EiB" };
    if (v < 1024) {
        snprintf(buf, len, "%" PRIu64 " B", v);
        return;
    }
    double d = (double)v / 1024;
    int u = 0;
    while (d >= 1024 && u < 5) {
        d /= 1024;
        u++;
    }
    snprintf(buf, len, "%0.3g %s", d, unit[u]);
}

static int snapshot_list(const char *path, bool json, bool force_share)
{
    struct image *img;
    int lock_fd;
    if (open_offline("snapshot list", path, true, force_share, &img, &lock_fd))
        return 1;
    struct img_snapshot *s;
    uint32_t n;
    int r = img_snapshot_list(img, &s, &n);
    if (r < 0) {
        cli_error("snapshot list: %s: %s", path,
                  r == -ENOTSUP ? "a raw image has no internal snapshots" : strerror(-r));
        return close_offline("snapshot list", img, lock_fd, 1);
    }
    if (json) {
        printf("[");
        for (uint32_t i = 0; i < n; i++) {
            printf("%s\n  {\"id\": ", i ? "," : "");
            json_put_string(stdout, s[i].id);
            printf(", \"name\": ");
            json_put_string(stdout, s[i].name);
            printf(", \"vm-state-size\": %" PRIu64 ", \"disk-size\": %" PRIu64 ", \"date-sec\": %u, "
                   "\"date-nsec\": %u, \"vm-clock-sec\": %" PRIu64 ", \"vm-clock-nsec\": %" PRIu64,
                   s[i].vm_state_size, s[i].disk_size, s[i].date_sec, s[i].date_nsec,
                   s[i].vm_clock_nsec / 1000000000, s[i].vm_clock_nsec % 1000000000);
            if (s[i].icount != UINT64_MAX)
                printf(", \"icount\": %" PRIu64, s[i].icount);
            printf("}");
        }
        printf("%s]\n", n ? "\n" : "");
    } else if (n) {
        /* The layout of qemu-img snapshot -l. */
        printf("Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE",
               "VM CLOCK", "ICOUNT");
        for (uint32_t i = 0; i < n; i++) {
            char size[32], date[32], clock[32], icount[32] = "";
            human_size(s[i].vm_state_size, size, sizeof(size));
            time_t t = (time_t)s[i].date_sec;
            struct tm tm;
            localtime_r(&t, &tm);
            strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
            uint64_t ms = s[i].vm_clock_nsec / 1000000;
            snprintf(clock, sizeof(clock), "%02" PRIu64 ":%02u:%02u.%03u", ms / 3600000,
                     (unsigned)(ms / 60000 % 60), (unsigned)(ms / 1000 % 60), (unsigned)(ms % 1000));
            if (s[i].icount != UINT64_MAX)
                snprintf(icount, sizeof(icount), "%" PRIu64, s[i].icount);
            printf("%-9s %-16s %8s%20s%13s%11s\n", s[i].id, s[i].name, size, date, clock, icount);
        }
    }
    img_snapshot_list_free(s, n);
    return close_offline("snapshot list", img, lock_fd, 0);
}

/* create / delete / apply on an image nobody uses. */
static int snapshot_offline(const char *verb, const char *path, const char *arg)
{
    char cmd[32], err[700], id[64];
    snprintf(cmd, sizeof(cmd), "snapshot %s", verb);
    struct image *img;
    int lock_fd;
    if (open_offline(cmd, path, false, false, &img, &lock_fd))
        return 1;
    int r;
    if (!strcmp(img_format_name(img), "raw")) {
        cli_error("%s: %s is a raw image: internal snapshots need qcow2", cmd, path);
        return close_offline(cmd, img, lock_fd, 1);
    }
    if (!strcmp(verb, "create"))
        r = img_snapshot_create(img, arg, id, sizeof(id), err, sizeof(err));
    else if (!strcmp(verb, "delete")) {
        /* Deleting walks and releases every cluster the snapshot used. */
        struct progress p;
        progress_start(&p, "Deleting");
        r = img_snapshot_delete(img, arg, progress_update, &p, err, sizeof(err));
        progress_end(&p);
    }
    else
        r = img_snapshot_apply(img, arg, err, sizeof(err));
    if (r < 0) {
        cli_error("%s: %s", cmd, err);
        return close_offline(cmd, img, lock_fd, 1);
    }
    return close_offline(cmd, img, lock_fd, 0);
}

/* The control-socket request of a live device; prints the answer's error. */
static int ask_daemon(const char *cmd, uint32_t id, const char *request, char *reply, size_t len)
{
    /* A snapshot walks every L2 table: no time limit while the daemon lives. */
    int r = ctl_request_wait(id, request, reply, len, -1);
    if (r < 0) {
        if (r == -ENOENT)
            cli_error("%s: ublk device %u has no running daemon (see 'ublk-qcow2 list')", cmd, id);
        else
            cli_error("%s: cannot ask the daemon of ublk device %u: %s", cmd, id, strerror(-r));
        return 1;
    }
    char msg[CTL_LINE_MAX];
    if (json_get_string(reply, "error", msg, sizeof(msg))) {
        cli_error("%s: ublk device %u: %s", cmd, id, msg);
        return 1;
    }
    return 0;
}

static int snapshot_online(uint32_t id, const char *name)
{
    if (strpbrk(name, "\r\n")) {
        cli_error("snapshot create: a name for a live device cannot hold line breaks");
        return 2;
    }
    char req[512], reply[CTL_LINE_MAX];
    snprintf(req, sizeof(req), "snapshot-create %s", name);
    return ask_daemon("snapshot create", id, req, reply, sizeof(reply));
}

int cmd_snapshot(int argc, char **argv)
{
    bool json = false, force = false, have_id = false;
    uint32_t id = 0;
    const struct cli_opt opts[] = {
        CLI_OPT_ID(&id, &have_id),
        { "json", 'j', CLI_FLAG, .dest = &json },
        { "force-share", 'U', CLI_FLAG, .dest = &force },
        { 0 },
    };
    const struct cli_cmd cmd = { "snapshot", snapshot_usage, opts, .usage_exit = 2 };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    int nargs = argc - optind;
    char **a = argv + optind;
    if (nargs < 1) {
        cli_error("snapshot: what? (list, create, delete or apply; try 'ublk-qcow2 snapshot --help')");
        return 2;
    }
    const char *verb = a[0];
    bool list = !strcmp(verb, "list"), create = !strcmp(verb, "create");
    if (!list && !create && strcmp(verb, "delete") && strcmp(verb, "apply")) {
        cli_error("snapshot: unknown action '%s' (list, create, delete or apply)", verb);
        return 2;
    }
    if ((json || force) && !list) {
        cli_error("snapshot %s: --json and --force-share go with list only", verb);
        return 2;
    }
    if (have_id) {
        if (!create) {
            cli_error("snapshot %s: a live device (-n) can only take a new snapshot (create); "
                      "%s works on an image nobody uses", verb, verb);
            return 2;
        }
        if (nargs != 2) {
            cli_error("snapshot create -n ID: give exactly one NAME");
            return 2;
        }
        return snapshot_online(id, a[1]);
    }
    if (list) {
        if (nargs != 2) {
            cli_error("snapshot list: give exactly one IMAGE");
            return 2;
        }
        return snapshot_list(a[1], json, force);
    }
    if (nargs != 3) {
        cli_error("snapshot %s: give IMAGE and %s", verb, create ? "NAME" : "a snapshot NAME or ID");
        return 2;
    }
    return snapshot_offline(verb, a[1], a[2]);
}

/* ---- resize ------------------------------------------------------------------------ */

/* "[+|-]SIZE" against cur; false if malformed or out of range. */
static bool parse_new_size(const char *s, uint64_t cur, uint64_t *out)
{
    int sign = *s == '+' ? 1 : *s == '-' ? -1 : 0;
    int64_t v = parse_size(s + (sign != 0));
    if (v < 0)
        return false;
    if (sign > 0)
        return (uint64_t)v <= INT64_MAX - cur ? (*out = cur + (uint64_t)v, true) : false;
    if (sign < 0)
        return (uint64_t)v <= cur ? (*out = cur - (uint64_t)v, true) : false;
    *out = (uint64_t)v;
    return true;
}

int cmd_resize(int argc, char **argv)
{
    bool shrink = false, have_id = false;
    uint32_t id = 0;
    const struct cli_opt opts[] = {
        CLI_OPT_ID(&id, &have_id),
        { "shrink", 0, CLI_FLAG, .dest = &shrink },
        { 0 },
    };
    /* options_first: stop at the first non-option, so "-1G" is a size, not options. */
    const struct cli_cmd cmd = { "resize", resize_usage, opts, .usage_exit = 2, .options_first = true };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    int nargs = argc - optind;
    char **a = argv + optind;
    if (have_id) {
        if (nargs != 1) {
            cli_error("resize -n ID: give exactly one SIZE");
            return 2;
        }
        if (shrink || a[0][0] == '-') {
            cli_error("resize -n ID: a live device can only grow (shrink the image offline, with --shrink)");
            return 2;
        }
        uint64_t dummy;
        if (!parse_new_size(a[0], 0, &dummy)) {
            cli_error("resize: invalid size '%s' (e.g. 20G, +512M)", a[0]);
            return 2;
        }
        char req[128], reply[CTL_LINE_MAX], size[32] = "";
        snprintf(req, sizeof(req), "resize %s", a[0]);
        if (ask_daemon("resize", id, req, reply, sizeof(reply)))
            return 1;
        uint64_t bytes;
        if (json_get_u64(reply, "size", &bytes))
            snprintf(size, sizeof(size), "%" PRIu64, bytes);
        printf("/dev/ublkb%u: %s bytes\n", id, size[0] ? size : "resized");
        return 0;
    }
    if (nargs != 2) {
        cli_error("resize: give IMAGE and SIZE (try 'ublk-qcow2 resize --help')");
        return 2;
    }
    struct image *img;
    int lock_fd;
    if (open_offline("resize", a[0], false, false, &img, &lock_fd))
        return 1;
    uint64_t size;
    if (!parse_new_size(a[1], img_size(img), &size)) {
        cli_error("resize: invalid size '%s' (e.g. 20G, +512M, -1G)", a[1]);
        return close_offline("resize", img, lock_fd, 2);
    }
    char err[700];
    int r = img_resize(img, size, shrink, err, sizeof(err));
    if (r < 0) {
        cli_error("resize: %s", err);
        return close_offline("resize", img, lock_fd, r == -EINVAL ? 2 : 1);
    }
    return close_offline("resize", img, lock_fd, 0);
}
