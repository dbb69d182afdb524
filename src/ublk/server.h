/* A ublk device served from one image, from creation to removal, and the
 * state file that describes it to `list`, `del` and `recover`.
 *
 * ublk_server_run: lock and open the image, ADD_DEV, SET_PARAMS, start the
 * queues, START_DEV, write the state file, then serve until STOP_DEV
 * (from `del`) or SIGINT/SIGTERM/SIGHUP (then it sends STOP_DEV itself);
 * drain, flush and close the image, DEL_DEV, remove the state file.
 * On a start-up failure it prints why on stderr and removes what it made.
 * With opts.recover it instead takes over a device whose daemon died
 * (START_USER_RECOVERY ... END_USER_RECOVERY); a failure leaves that
 * device as it was.
 */
#ifndef UQ_UBLK_SERVER_H
#define UQ_UBLK_SERVER_H

#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "img/image.h"

/* State files, logs and control sockets: /run/ublk-qcow2 for root; for
 * other users (unprivileged devices) $XDG_RUNTIME_DIR/ublk-qcow2, else
 * /run/user/UID/ublk-qcow2. */
#define UBLK_ROOT_STATE_DIR "/run/ublk-qcow2"
const char *ublk_state_dir(void);
/* The state directory a daemon run by uid uses (root looking at the
 * unprivileged devices of others). */
void ublk_state_dir_of(uid_t uid, char *buf, size_t len);
#define UBLK_STATE_DIR (ublk_state_dir())
#define UBLK_DEFAULT_QUEUES 1
#define UBLK_DEFAULT_DEPTH 128
#define UBLK_MAX_QUEUES 64
#define UBLK_IO_BUF_BYTES (512u << 10)      /* per tag; max request size */
/* Batch I/O unless --no-batch-io (or only with --batch-io): see
 * docs/design.md for the measurements behind the choice. */
#define UBLK_BATCH_IO_DEFAULT false

struct ublk_server_opts {
    const char *image;          /* absolute path */
    uint32_t dev_id;            /* UBLK_DEV_ID_AUTO: the kernel picks */
    unsigned nr_queues;
    unsigned depth;
    uint32_t buf_bytes;
    bool read_only;
    enum img_format format;
    uint64_t cache_size;
    enum img_discard discard;
    bool discard_no_unref;
    /* Serve this internal snapshot (read-only) instead of the active image. */
    const char *snapshot;
    /* Passphrase of a LUKS-encrypted image (NULL: none).  It is never
     * stored: the state file keeps only where it came from (key_file, an
     * absolute path, or key_env, a variable name; NULL if neither), so that
     * `recover` can read it again from there. */
    const void *key;
    size_t key_len;
    const char *key_file, *key_env;
    /* ADD_DEV with UBLK_F_USER_RECOVERY(_REISSUE): if the daemon dies, the
     * device stays, quiesced, until `recover` starts a new daemon. */
    bool recovery;
    /* Zero copy (UBLK_F_AUTO_BUF_REG + UBLK_F_USER_COPY) is asked for
     * wherever the kernel has it; no_zero_copy serves every request through
     * a per-tag buffer, as on older kernels.  zero_copy: asked explicitly
     * (the default; kept so scripts may say it). */
    bool zero_copy, no_zero_copy;
    /* Batch I/O (UBLK_F_BATCH_IO, Linux 7.0+): batch_io asks for it,
     * no_batch_io keeps the per-tag commands; neither: the default,
     * UBLK_BATCH_IO_DEFAULT.  Where the kernel lacks it, per tag. */
    bool batch_io, no_batch_io;
    /* Take over the existing quiesced device dev_id instead of adding one. */
    bool recover;
    /* Start-up progress for a waiting parent: "id N\n" after ADD_DEV and
     * "ok N\n" once the device is live; -1 for none. */
    int notify_fd;
    /* After start-up, send stdout/stderr to STATE_DIR/ublkN.log. */
    bool log_to_file;
};

/* Serve one device; returns the process exit code (0: stopped cleanly and
 * the image was flushed). */
int ublk_server_run(const struct ublk_server_opts *o);

/* ---- state files: STATE_DIR/ublkN.json ------------------------------------ */
struct ublk_state {
    uint32_t id;
    pid_t pid;
    char image[PATH_MAX];
    char format[16];
    bool read_only;
    bool recovery;
    unsigned queues;
    unsigned depth;
    uint32_t buf_bytes;
    uint64_t cache_size;
    bool discard_unmap;
    bool discard_no_unref;
    char snapshot[512];         /* "" unless serving an internal snapshot */
    char key_file[PATH_MAX];    /* where the passphrase came from ("" if not a file) */
    char key_env[256];          /* ... or the environment variable's name */
};

int ublk_state_write(const struct ublk_state *s);
/* 0, -ENOENT if there is none, -EINVAL if it cannot be parsed. */
int ublk_state_read(uint32_t id, struct ublk_state *s);
/* The same, from another state directory. */
int ublk_state_read_in(const char *dir, uint32_t id, struct ublk_state *s);
void ublk_state_remove(uint32_t id);

#endif
