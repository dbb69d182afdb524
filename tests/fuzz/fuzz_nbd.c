/* libFuzzer target: the NBD server's handshake and request parser, driven
 * by a client byte stream over a socketpair.  One server per input on a
 * shared 1 MiB raw export; the real receive loop parses the stream (with
 * the helpers of src/nbd/proto.c) and serves every request it finds.
 *
 * Input: byte 0 flags (bit 0: read-only export, bit 1: export name "exp"
 * instead of the default ""), then the bytes the client sends, after which
 * the client half-closes and reads every reply until the server closes.
 * Every input must end with the connection closed: no crash, leak,
 * sanitizer report, hang or deadlock (loop_run reports one).
 * UQ_FUZZ_VERBOSE=1 keeps the server's messages on stderr. */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "io/coroutine.h"
#include "io/loop.h"
#include "nbd/server.h"
#include "img/image.h"
#include "fuzz_util.h"

#define EXPORT_SIZE (1u << 20)

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct loop *loop;
static struct image *img_rw, *img_ro;
static char path[300], dir[256];

struct peer {
    int fd;
    const uint8_t *data;
    size_t len;
};

static void cleanup(void)
{
    img_close(img_rw);
    img_close(img_ro);
    unlink(path);
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    char err[512];
    fuzz_scratch_dir(dir, sizeof(dir), "uq-fuzz-nbd");
    snprintf(path, sizeof(path), "%s/export.raw", dir);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || ftruncate(fd, EXPORT_SIZE) < 0) {
        perror("fuzz_nbd: export file");
        exit(1);
    }
    close(fd);
    signal(SIGPIPE, SIG_IGN);
    loop = loop_new(64);
    struct img_opts o = { .format = IMG_FMT_RAW, .cache = FILE_CACHE_BUFFERED };
    img_rw = img_open(path, &o, err, sizeof(err));
    o.read_only = true;
    img_ro = img_open(path, &o, err, sizeof(err));
    if (!loop || !img_rw || !img_ro) {
        fprintf(stderr, "fuzz_nbd: setup failed: %s\n", err);
        exit(1);
    }
    atexit(cleanup);
    fuzz_quiet_stderr();
    return 0;
}

/* The client: send everything, half-close. */
static void client_send(void *arg)
{
    struct peer *p = arg;
    size_t off = 0;
    while (off < p->len) {
        ssize_t n = io_send(p->fd, p->data + off, p->len - off, MSG_NOSIGNAL);
        if (n <= 0)
            break;      /* the server closed the connection */
        off += (size_t)n;
    }
    shutdown(p->fd, SHUT_WR);
}

/* ... and read replies until the server closes. */
static void client_recv(void *arg)
{
    struct peer *p = arg;
    uint8_t *buf = malloc(64 << 10);
    while (io_recv(p->fd, buf, 64 << 10, 0) > 0)
        ;
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    struct nbd_export_opts eo = {
        .name = (data[0] & 2) ? "exp" : "",
        .description = "fuzz",
        .read_only = data[0] & 1,
    };
    struct nbd_server *s = nbd_server_new((data[0] & 1) ? img_ro : img_rw, &eo);
    int sv[2];
    if (!s || socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0)
        abort();
    struct peer p = { sv[1], data + 1, size - 1 };
    if (nbd_server_add_client(s, sv[0]) < 0)
        abort();
    co_spawn(client_send, &p);
    co_spawn(client_recv, &p);
    if (loop_run(loop) < 0)
        abort();        /* every coroutine parked with nothing in flight: a deadlock */
    if (nbd_server_connections(s) != 0)
        abort();
    close(sv[1]);
    nbd_server_free(s);
    return 0;
}
