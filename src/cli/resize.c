/* ublk-qcow2 resize: the virtual size of an image nobody uses (offline, under
 * QEMU's writer lock), or growing the image of a live ublk device through
 * its daemon's control socket (-n ID). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "util/json.h"
#include "cli/cli.h"
#include "cli/opts.h"
#include "img/image.h"
#include "ublk/ctl_socket.h"

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
            cli_error("resize: invalid size '%s' (e.g. 20G, +512M: " SIZE_RANGE ")", a[0]);
            return 2;
        }
        char req[128], reply[CTL_LINE_MAX], size[32] = "";
        snprintf(req, sizeof(req), "resize %s", a[0]);
        if (cli_ask_daemon("resize", id, req, reply, sizeof(reply)))
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
    if (cli_open_offline("resize", a[0], false, false, &img, &lock_fd))
        return 1;
    uint64_t size;
    if (!parse_new_size(a[1], img_size(img), &size)) {
        cli_error("resize: invalid size '%s' (e.g. 20G, +512M, -1G: " SIZE_RANGE ")", a[1]);
        return cli_close_offline("resize", img, lock_fd, 2);
    }
    char err[700];
    int r = img_resize(img, size, shrink, err, sizeof(err));
    if (r < 0) {
        cli_error("resize: %s", err);
        return cli_close_offline("resize", img, lock_fd, r == -EINVAL ? 2 : 1);
    }
    return cli_close_offline("resize", img, lock_fd, 0);
}
