/* ublk-qcow2 snapshot: internal snapshots, on an image nobody uses (offline,
 * under QEMU's writer lock), or on the image of a live ublk device through
 * its daemon's control socket (-n ID). */
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
#include "img/image.h"
#include "ublk/ctl_socket.h"

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
    if (cli_open_offline("snapshot list", path, true, force_share, &img, &lock_fd))
        return 1;
    struct img_snapshot *s;
    uint32_t n;
    int r = img_snapshot_list(img, &s, &n);
    if (r < 0) {
        cli_error("snapshot list: %s: %s", path,
                  r == -ENOTSUP ? "a raw image has no internal snapshots" : strerror(-r));
        return cli_close_offline("snapshot list", img, lock_fd, 1);
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
    return cli_close_offline("snapshot list", img, lock_fd, 0);
}

/* create / delete / apply on an image nobody uses. */
static int snapshot_offline(const char *verb, const char *path, const char *arg)
{
    char cmd[32], err[700], id[64];
    snprintf(cmd, sizeof(cmd), "snapshot %s", verb);
    struct image *img;
    int lock_fd;
    if (cli_open_offline(cmd, path, false, false, &img, &lock_fd))
        return 1;
    int r;
    if (!strcmp(img_format_name(img), "raw")) {
        cli_error("%s: %s is a raw image: internal snapshots need qcow2", cmd, path);
        return cli_close_offline(cmd, img, lock_fd, 1);
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
        return cli_close_offline(cmd, img, lock_fd, 1);
    }
    return cli_close_offline(cmd, img, lock_fd, 0);
}

static int snapshot_online(uint32_t id, const char *name)
{
    if (strpbrk(name, "\r\n")) {
        cli_error("snapshot create: a name for a live device cannot hold line breaks");
        return 2;
    }
    char req[512], reply[CTL_LINE_MAX];
    snprintf(req, sizeof(req), "snapshot-create %s", name);
    return cli_ask_daemon("snapshot create", id, req, reply, sizeof(reply));
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
