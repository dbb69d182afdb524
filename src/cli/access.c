/* The two ways snapshot and resize reach an image: offline, under QEMU's
 * locks, or through the control socket of the live ublk device serving it. */
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "util/json.h"
#include "cli/cli.h"
#include "io/imagelock.h"
#include "img/image.h"
#include "ublk/ctl_socket.h"

/* Open IMAGE for an offline command under QEMU's locks (a writer's unless
 * read_only; none with force_share); 0 and *img, or 1 after saying why. */
int cli_open_offline(const char *cmd, const char *path, bool read_only, bool force_share,
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

int cli_close_offline(const char *cmd, struct image *img, int lock_fd, int rc)
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

void cli_daemon_error(const char *cmd, uint32_t id, int r)
{
    if (r == -ENOENT)
        cli_error("%s: ublk device %u has no running daemon (see 'ublk-qcow2 list')", cmd, id);
    else if (r == -EACCES || r == -EPERM)
        cli_error("%s: permission denied on the control socket of ublk device %u: it belongs to "
                  "another user (root's devices answer root only); run this as root or as the "
                  "device's owner", cmd, id);
    else
        cli_error("%s: cannot ask the daemon of ublk device %u: %s", cmd, id, strerror(-r));
}

/* The control-socket request of a live device; prints the answer's error. */
int cli_ask_daemon(const char *cmd, uint32_t id, const char *request, char *reply, size_t len)
{
    /* A snapshot walks every L2 table: no time limit while the daemon lives. */
    int r = ctl_request_wait(id, request, reply, len, -1);
    if (r < 0) {
        cli_daemon_error(cmd, id, r);
        return 1;
    }
    char msg[CTL_LINE_MAX];
    if (json_get_string(reply, "error", msg, sizeof(msg))) {
        cli_error("%s: ublk device %u: %s", cmd, id, msg);
        return 1;
    }
    return 0;
}
