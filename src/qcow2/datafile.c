/* Where guest data lives and how it is read and written.
 *
 * Guest data clusters are normally stored in the image file itself.  With an
 * external data file (incompatible feature bit 2, docs/interop/qcow2.txt) they
 * live in that file instead, each at its guest offset (host offset == guest
 * offset, nothing refcounted there), and the image file holds only metadata.
 * With the autoclear bit data_file_raw the data file is moreover a valid raw
 * image of the guest disk: anything the guest reads as zeros must be zeros
 * there too, so write-zeroes and discards zero the data file first.
 *
 * The read and write paths (cluster.c) do every guest-data I/O through the
 * data_* calls below, so the choice of file and encryption (crypto.c: data
 * leaves encrypted at the host offset it is written to and is decrypted
 * after reading) stay out of the mapping logic.  With encryption, a hole or
 * zeroed range in the file does not read back as zeros, so zeroing writes
 * encrypted zeros. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "io/imagelock.h"
#include "io/log.h"
#include "io/loop.h"
#include "qcow2/internal.h"

int qcow2_datafile_open(struct qcow2 *q, const struct img_opts *o, char *err, size_t errlen)
{
    const struct qcow2_header *h = &q->h;
    char path[PATH_MAX + 1100], msg[512];
    if (!h->data_file[0]) {
        snprintf(err, errlen, "the image keeps its data in an external data file but does not "
                 "name it (no data file name header extension)");
        return -ENOTSUP;
    }
    /* QEMU never creates these: a snapshot would share data clusters that
     * are not refcounted, so writing would change the snapshot too. */
    if (h->nb_snapshots && !q->img.read_only) {
        snprintf(err, errlen, "the image has internal snapshots and an external data file, "
                 "which QEMU does not support either; open it read-only");
        return -ENOTSUP;
    }
    /* The raw view has no place for backing-file data (qcow2.txt: the bit
     * conflicts with backing files; qemu-img create refuses the pair). */
    if (q->data_raw && h->backing_file[0]) {
        snprintf(err, errlen, "data_file_raw is set, which conflicts with a backing file");
        return -ENOTSUP;
    }
    int r = qcow2_resolve_name(q->img.path, h->data_file, "data file", path, sizeof(path), err, errlen);
    if (r < 0)
        return r;
    /* Locked like the image (as QEMU locks its data-file child): nobody
     * else may write the guest data while we serve or read it. */
    int lock_fd = image_lock(path, !q->img.read_only, msg, sizeof(msg));
    if (lock_fd < 0) {
        snprintf(err, errlen, "data file: %s", msg);
        return lock_fd;
    }
    r = file_open(&q->data_file, path, !q->img.read_only, o->cache, msg, sizeof(msg));
    if (r < 0) {
        close(lock_fd);
        snprintf(err, errlen, "data file: %s", msg);
        return r;
    }
    q->data_lock_fd = lock_fd;
    q->data = &q->data_file;
    return 0;
}

void qcow2_datafile_close(struct qcow2 *q)
{
    if (has_data_file(q))
        file_close(&q->data_file);
    if (q->data_lock_fd >= 0)
        close(q->data_lock_fd);
    q->data_lock_fd = -1;
    q->data = &q->file;
}

/* Guest data must be durable before any metadata naming it (rule 2 of the
 * flush order): qcow2_flush calls this before the sync that precedes the
 * L2 writes.  Without a data file the image's own sync covers it. */
int qcow2_datafile_sync(struct qcow2 *q)
{
    if (!has_data_file(q))
        return 0;
    if (q->flush_failed)
        return -EIO;
    int r = file_sync(q->data);
    if (r < 0) {
        q->flush_failed = true;     /* fsyncgate, as in qcow2_sync */
        uq_error("%s: flush of the data file %s failed (%s); the image is suspect from now on",
                 q->img.path, q->data->path, strerror(-r));
    }
    return r;
}

int qcow2_data_read(struct qcow2 *q, uint8_t *buf, uint64_t len, uint64_t host)
{
    ssize_t n = file_pread(q->data, buf, len, host);
    if (n < 0)
        return (int)n;
    if ((uint64_t)n < len)      /* past the end of the file: zeros (as stored) */
        memset(buf + n, 0, len - n);
    return q->crypto ? qcow2_crypto_decrypt(q, host, buf, len) : 0;
}

int qcow2_data_writev(struct qcow2 *q, const struct iovec *iov, int niov, uint64_t host, bool fua)
{
    if (q->crypto) {
        /* Encrypted into a bounce buffer: the caller's data stays plain. */
        size_t len = 0;
        for (int i = 0; i < niov; i++)
            len += iov[i].iov_len;
        uint8_t *b = io_alloc(len);
        for (size_t i = 0, pos = 0; i < (size_t)niov; pos += iov[i].iov_len, i++)
            memcpy(b + pos, iov[i].iov_base, iov[i].iov_len);
        int r = qcow2_crypto_encrypt(q, host, b, len);
        if (r == 0) {
            ssize_t w = file_pwrite(q->data, b, len, host, fua);
            r = w < 0 ? (int)w : 0;
        }
        io_free(b);
        return r;
    }
    ssize_t w = file_pwritev(q->data, iov, niov, host, fua);
    return w < 0 ? (int)w : 0;
}

static int write_zero_bytes(struct qcow2 *q, uint64_t host, uint64_t len)
{
    uint64_t chunk = len < (1u << 20) ? len : (1u << 20);
    uint8_t *zero = io_zalloc(chunk);
    int r = 0;
    for (uint64_t done = 0; done < len && r == 0; done += chunk) {
        uint64_t n = len - done < chunk ? len - done : chunk;
        struct iovec iov = { zero, n };
        r = qcow2_data_writev(q, &iov, 1, host + done, false);
    }
    io_free(zero);
    return r;
}

/* Zero [host, host+len) of guest data: a hole (unmap) or FALLOC_FL_ZERO_RANGE
 * (stays allocated); zero bytes where the file system can do neither.  Like
 * any data write it is durable at the next flush. */
int qcow2_data_zero(struct qcow2 *q, uint64_t host, uint64_t len, bool unmap)
{
    if (q->crypto)
        return write_zero_bytes(q, host, len);      /* zeros must be encrypted */
    int r = -EOPNOTSUPP;
    if (unmap && !q->no_punch) {
        r = file_punch(q->data, host, len);
        if (r == -EOPNOTSUPP || r == -ENOSYS)
            q->no_punch = true;
    }
    if (r == -EOPNOTSUPP || r == -ENOSYS)
        r = file_zero_range(q->data, host, len);
    if (r != -EOPNOTSUPP && r != -ENOSYS)
        return r;
    return write_zero_bytes(q, host, len);
}

/* Punch guest data out (a discard) where the entries say it reads as zeros
 * now.  Advisory in the image file; in a raw data file the range must read
 * as zeros afterwards, so it is zeroed where no hole can be made. */
int qcow2_data_punch(struct qcow2 *q, uint64_t host, uint64_t len)
{
    if (!has_data_file(q))
        return qcow2_punch_host(q, host, len);
    if (q->data_raw)
        return qcow2_data_zero(q, host, len, true);
    if (q->no_punch || !len)
        return 0;
    int r = file_punch(q->data, host, len);
    if (r == -EOPNOTSUPP || r == -ENOSYS) {
        q->no_punch = true;
        r = 0;
    }
    return r;
}

/* With data_file_raw, write-zeroes and discards zero the data file first (as
 * QEMU does for write-zeroes), and only then change the L2 entries: whatever
 * reaches the disk before a crash, both views read the same there. */
int qcow2_datafile_zero_raw(struct qcow2 *q, uint64_t off, uint64_t len, bool unmap)
{
    if (!q->data_raw)
        return 0;
    if (off + len > q->img.size)
        len = q->img.size - off;
    return qcow2_data_zero(q, off, len, unmap);
}

/* With a data file, an allocated entry must map its guest cluster to the same
 * offset, and there are no compressed clusters (QEMU reports both as
 * corruption). */
bool qcow2_datafile_entry_ok(struct qcow2 *q, uint64_t e, uint64_t guest_off)
{
    if (!has_data_file(q))
        return true;
    switch (qcow2_l2_entry_type(&q->h, e, q->extl2)) {
    case QCOW2_CLUSTER_COMPRESSED:
        return false;
    case QCOW2_CLUSTER_NORMAL:
    case QCOW2_CLUSTER_ZERO_ALLOC:
        return (e & L2E_OFFSET_MASK) == start_of_cluster(q, guest_off);
    default:
        return true;
    }
}
