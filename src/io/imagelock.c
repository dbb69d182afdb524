/* QEMU-compatible image locks (see imagelock.h). */
#include "io/imagelock.h"
#include "io/log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define PERM_BASE 100       /* byte 100+N: "I use permission N" */
#define SHARED_BASE 200     /* byte 200+N: "I do not share permission N" */

enum { PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE, PERM_COUNT };

static const char *const perm_names[PERM_COUNT] = {
    "consistent read", "write", "write unchanged", "resize",
};

static int ofd_lock(int fd, short type, off_t byte)
{
    struct flock fl = { .l_type = type, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
    return fcntl(fd, F_OFD_SETLK, &fl) < 0 ? -errno : 0;
}

/* True if another open file description holds any lock on byte. */
static int ofd_taken(int fd, off_t byte)
{
    struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET, .l_start = byte, .l_len = 1 };
    if (fcntl(fd, F_OFD_GETLK, &fl) < 0)
        return -errno;
    return fl.l_type != F_UNLCK;
}

int image_lock(const char *path, bool writable, char *err, size_t errlen)
{
    /* Both modes refuse to share write and resize: the engine caches
     * metadata, so nobody else may change the file under it. */
    unsigned use = 1u << PERM_CONSISTENT_READ;
    if (writable)
        use |= 1u << PERM_WRITE | 1u << PERM_RESIZE;
    unsigned unshared = 1u << PERM_WRITE | 1u << PERM_RESIZE;

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        snprintf(err, errlen, "cannot open %s: %s", path, strerror(e));
        return -e;
    }
    /* Lock first, then check, as QEMU does: of two racing openers at least
     * one sees the other. */
    for (int n = 0; n < PERM_COUNT; n++) {
        int r = 0;
        if (use & (1u << n))
            r = ofd_lock(fd, F_RDLCK, PERM_BASE + n);
        if (!r && (unshared & (1u << n)))
            r = ofd_lock(fd, F_RDLCK, SHARED_BASE + n);
        if (r == -EINVAL || r == -ENOLCK || r == -EOPNOTSUPP) {
            uq_warn("%s: file system has no OFD locks (%s); image not locked",
                    path, strerror(-r));
            return fd;
        }
        if (r < 0) {
            snprintf(err, errlen, "cannot lock %s: %s", path, strerror(-r));
            close(fd);
            return r;
        }
    }
    for (int n = 0; n < PERM_COUNT; n++) {
        const char *why = NULL;
        int r = 0;
        if ((use & (1u << n)) && (r = ofd_taken(fd, SHARED_BASE + n)) > 0)
            why = "refuses to share";
        else if (r >= 0 && (unshared & (1u << n)) && (r = ofd_taken(fd, PERM_BASE + n)) > 0)
            why = "holds";
        if (r < 0) {
            snprintf(err, errlen, "cannot test the locks of %s: %s", path, strerror(-r));
            close(fd);
            return r;
        }
        if (why) {
            snprintf(err, errlen, "image %s is in use: another process (qemu, qemu-nbd, "
                     "ublk-qcow2 ...) %s its \"%s\" permission", path, why, perm_names[n]);
            close(fd);
            return -EBUSY;
        }
    }
    return fd;
}
