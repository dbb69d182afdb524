/* Image locks compatible with QEMU's (block/file-posix.c "perm" locks).
 *
 * QEMU holds open-file-description (OFD) read locks on single bytes of the
 * image file: byte 100+N while it uses permission N, byte 200+N while it
 * refuses to share permission N with others (N: 0 consistent read,
 * 1 write, 2 write-unchanged, 3 resize).  A user checks that nobody holds
 * the bytes that conflict with its own.  Taking the same locks makes
 * qemu-img/qemu-io/qemu-nbd refuse an image we serve read-write, and makes
 * us refuse an image they are writing.
 */
#ifndef UQ_IO_IMAGELOCK_H
#define UQ_IO_IMAGELOCK_H

#include <stdbool.h>
#include <stddef.h>

/* Lock path for a reader (consistent read; no other writer or resizer) or
 * a writer (read, write, resize; no other writer or resizer).  Returns an
 * fd holding the locks (close it to release them), or -EBUSY with a message
 * naming the image when another process conflicts, or another -errno.
 * File systems without OFD locks get a warning on stderr and no lock. */
int image_lock(const char *path, bool writable, char *err, size_t errlen);

#endif
