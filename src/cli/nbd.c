/* ublk-qcow2 nbd: serve an image over NBD on a unix socket or TCP. */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <liburing.h>

#include "cli/cli.h"
#include "io/coroutine.h"
#include "io/imagelock.h"
#include "io/log.h"
#include "io/loop.h"
#include "nbd/server.h"
#include "img/image.h"

struct nbd_cli {
    const char *socket_path;
    const char *bind_addr;
    const char *export_name;
    const char *pid_file;
    const char *image;
    bool read_only;
    bool fork;
    struct img_opts img_opts;
};

struct nbd_run {
    const struct nbd_cli *cli;
    struct loop *loop;
    struct image *img;
    struct nbd_server *srv;
    int listen_fd;
    int signal_fd;
    int lock_fd;                /* QEMU-style image locks, held while serving */
    bool socket_created;
    dev_t socket_dev;
    ino_t socket_ino;
    bool pid_written;
    int rc;
};

static void usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 nbd [OPTIONS] IMAGE\n"
        "\n"
        "Serve IMAGE (qcow2 or raw) over NBD until SIGINT or SIGTERM.\n"
        "\n"
        "Options:\n"
        "  -k, --socket PATH        listen on a unix socket at PATH\n"
        "      --bind HOST:PORT     listen on TCP (HOST may be empty for any, [v6] for IPv6)\n"
        "  -x, --export-name NAME   export name (default: the default export \"\")\n"
        "  -r, --read-only          refuse writes (export flagged read-only)\n"
        "  -f, --format FMT         auto (default), raw or qcow2\n"
        "      --cache-size SIZE    qcow2 metadata cache size (e.g. 32M)\n"
        "      --compress-threads N threads that decompress compressed clusters (default:\n"
        "                           the CPUs; 0: on the serving thread)\n"
        "      --discard MODE       ignore (default, as qemu-nbd): TRIM does nothing and\n"
        "                           write-zeroes keeps clusters allocated; unmap: TRIM and\n"
        "                           write-zeroes free clusters and punch holes in the file\n"
        "      --discard-no-unref   with --discard=unmap: keep discarded qcow2 clusters\n"
        "                           allocated (reading as zeros), only punch their data out\n"
        "  -l, --snapshot SNAP      serve internal snapshot SNAP (ID or name, or\n"
        "                           snapshot.id=ID[,snapshot.name=NAME]) read-only, as\n"
        "                           qemu-nbd -l does\n"
        "      --key-file FILE      passphrase of a LUKS-encrypted qcow2 image (and of its\n"
        "                           encrypted backing files): FILE's exact bytes, as QEMU\n"
        "                           reads --object secret,file=FILE\n"
        "      --key-env VAR        the passphrase from the environment variable VAR\n"
        "      --fork               detach once listening; exit 1 if startup failed\n"
        "      --pid-file FILE      write the server's pid to FILE (removed at exit)\n"
        "  -v, --verbose            say more on stderr (clients coming and going);\n"
        "                           twice for debugging detail\n"
        "  -h, --help               show this help\n"
        "\n"
        "Exactly one of --socket and --bind is required.\n");
}

/* ---- listening sockets ----------------------------------------------------- */

static int listen_unix(struct nbd_run *run, const char *path, char *err, size_t errlen)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    struct stat st;
    int fd;

    if (strlen(path) >= sizeof(sa.sun_path)) {
        snprintf(err, errlen, "%s: socket path too long (max %zu bytes)", path, sizeof(sa.sun_path) - 1);
        return -1;
    }
    strcpy(sa.sun_path, path);
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode)) {
            snprintf(err, errlen, "%s: exists and is not a socket", path);
            return -1;
        }
        /* A socket file nobody listens on is stale: replace it. */
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
            close(fd);
            snprintf(err, errlen, "%s: another server is listening on this socket", path);
            return -1;
        }
        if (fd >= 0)
            close(fd);
        unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return -1;
    }
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 128) < 0) {
        snprintf(err, errlen, "%s: cannot listen: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (stat(path, &st) == 0) {
        run->socket_created = true;
        run->socket_dev = st.st_dev;
        run->socket_ino = st.st_ino;
    }
    return fd;
}

static int listen_tcp(const char *spec, char *err, size_t errlen)
{
    struct addrinfo hints = { .ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                              .ai_flags = AI_PASSIVE };
    struct addrinfo *res, *ai;
    char host[256];
    const char *port, *colon;
    int fd = -1, r, saved = 0, one = 1;

    if (spec[0] == '[') {
        const char *close_br = strchr(spec, ']');
        if (!close_br || close_br[1] != ':' || (size_t)(close_br - spec - 1) >= sizeof(host))
            goto bad;
        memcpy(host, spec + 1, close_br - spec - 1);
        host[close_br - spec - 1] = 0;
        port = close_br + 2;
    } else {
        colon = strrchr(spec, ':');
        if (!colon || (size_t)(colon - spec) >= sizeof(host))
            goto bad;
        memcpy(host, spec, colon - spec);
        host[colon - spec] = 0;
        port = colon + 1;
    }
    if (!*port)
        goto bad;
    r = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (r) {
        snprintf(err, errlen, "--bind %s: %s", spec, gai_strerror(r));
        return -1;
    }
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
        if (fd < 0) {
            saved = errno;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, ai->ai_addr, ai->ai_addrlen) == 0 && listen(fd, 128) == 0)
            break;
        saved = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        snprintf(err, errlen, "--bind %s: cannot listen: %s", spec, strerror(saved));
    return fd;
bad:
    snprintf(err, errlen, "--bind %s: expected HOST:PORT (or [IPV6]:PORT)", spec);
    return -1;
}

/* ---- the serving loop ------------------------------------------------------ */

static void prep_poll_in(struct io_uring_sqe *sqe, void *arg)
{
    io_uring_prep_poll_add(sqe, *(int *)arg, POLLIN);
}

/* Serve until SIGINT/SIGTERM, then shut down in order: stop accepting,
 * let in-flight requests finish, close (flush) the image. */
static void control_run(void *arg)
{
    struct nbd_run *run = arg;
    int r;

    nbd_server_listen(run->srv, run->listen_fd);
    for (;;) {
        struct signalfd_siginfo si;
        ssize_t n;

        /* Poll on the ring, then read on this thread, which has the
         * signals blocked and so leaves them pending for the signalfd. */
        r = io_submit_wait(prep_poll_in, &run->signal_fd);
        if (r < 0 && r != -EINTR && r != -EAGAIN) {
            fprintf(stderr, "ublk-qcow2: nbd: waiting for signals failed: %s\n", strerror(-r));
            run->rc = 1;
            break;
        }
        n = read(run->signal_fd, &si, sizeof(si));
        if (n == (ssize_t)sizeof(si))
            break;
    }
    nbd_server_shutdown(run->srv);
    nbd_server_wait(run->srv);
    r = img_close(run->img);
    run->img = NULL;
    if (r < 0) {
        fprintf(stderr, "ublk-qcow2: nbd: closing the image failed: %s\n", strerror(-r));
        run->rc = 1;
    }
    loop_stop(run->loop);
}

static int write_pid_file(const char *path, char *err, size_t errlen)
{
    char buf[32];
    int fd, n;

    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        snprintf(err, errlen, "%s: cannot write pid file: %s", path, strerror(errno));
        return -1;
    }
    n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    if (write(fd, buf, n) != n) {
        snprintf(err, errlen, "%s: cannot write pid file: %s", path, strerror(errno));
        close(fd);
        unlink(path);
        return -1;
    }
    close(fd);
    return 0;
}

/* Everything that can fail before serving.  Runs in the serving process
 * (the child with --fork: the ring and any file locks belong to it). */
static int run_setup(struct nbd_run *run, char *err, size_t errlen)
{
    const struct nbd_cli *cli = run->cli;
    struct nbd_export_opts eo = { 0 };
    char desc[64];
    sigset_t mask;

    sigemptyset(&mask);
    sigaddset(&mask, SIGINT);
    sigaddset(&mask, SIGTERM);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0 ||
        (run->signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
        snprintf(err, errlen, "signalfd: %s", strerror(errno));
        return -1;
    }
    /* A client that disconnects mid-reply must not kill the server. */
    signal(SIGPIPE, SIG_IGN);

    run->loop = loop_new(256);
    if (!run->loop) {
        snprintf(err, errlen, "cannot create the io_uring event loop");
        return -1;
    }
    /* Lock before opening, as qemu-nbd does: opening may already write
     * (refcount repair of a dirty image). */
    run->lock_fd = image_lock(cli->image, !cli->img_opts.read_only, err, errlen);
    if (run->lock_fd < 0)
        return -1;
    run->img = img_open(cli->image, &cli->img_opts, err, errlen);
    if (!run->img)
        return -1;
    if (cli->socket_path)
        run->listen_fd = listen_unix(run, cli->socket_path, err, errlen);
    else
        run->listen_fd = listen_tcp(cli->bind_addr, err, errlen);
    if (run->listen_fd < 0)
        return -1;

    eo.name = cli->export_name;
    eo.read_only = cli->read_only;
    snprintf(desc, sizeof(desc), "ublk-qcow2 %s image", img_format_name(run->img));
    eo.description = desc;
    run->srv = nbd_server_new(run->img, &eo);
    if (!run->srv) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    if (cli->pid_file) {
        if (write_pid_file(cli->pid_file, err, errlen) < 0)
            return -1;
        run->pid_written = true;
    }
    return 0;
}

static void run_cleanup(struct nbd_run *run)
{
    const struct nbd_cli *cli = run->cli;
    struct stat st;

    if (run->img)
        img_close(run->img);
    if (run->lock_fd >= 0)
        close(run->lock_fd);
    if (run->srv)
        nbd_server_free(run->srv);
    if (run->listen_fd >= 0)
        close(run->listen_fd);
    /* Remove the socket only if it is still the one we created. */
    if (run->socket_created && stat(cli->socket_path, &st) == 0 &&
        st.st_dev == run->socket_dev && st.st_ino == run->socket_ino)
        unlink(cli->socket_path);
    if (run->pid_written)
        unlink(cli->pid_file);
    if (run->loop)
        loop_free(run->loop);
    if (run->signal_fd >= 0)
        close(run->signal_fd);
}

static int run_serve(struct nbd_run *run)
{
    int r;

    co_spawn(control_run, run);
    r = loop_run(run->loop);
    if (r < 0) {
        fprintf(stderr, "ublk-qcow2: nbd: event loop failed: %s\n", strerror(-r));
        run->rc = 1;
    }
    return run->rc;
}

static int serve(const struct nbd_cli *cli, int ready_fd)
{
    struct nbd_run run = { .cli = cli, .listen_fd = -1, .signal_fd = -1, .lock_fd = -1 };
    char err[512] = "";
    int rc;

    if (run_setup(&run, err, sizeof(err)) < 0) {
        cli_error("%s", err);
        run_cleanup(&run);
        return 1;
    }
    if (ready_fd >= 0) {
        /* Detached: keep stderr for diagnostics, drop the terminal. */
        int null = open("/dev/null", O_RDWR | O_CLOEXEC);
        char ok = 0;
        if (null >= 0) {
            dup2(null, STDIN_FILENO);
            dup2(null, STDOUT_FILENO);
            close(null);
        }
        if (write(ready_fd, &ok, 1) != 1) {
            /* The parent is gone; serve anyway. */
        }
        close(ready_fd);
    }
    uq_info("serving %s (%s, %llu bytes%s) on %s", cli->image, img_format_name(run.img),
             (unsigned long long)img_size(run.img), run.img->read_only ? ", read-only" : "",
             cli->socket_path ? cli->socket_path : cli->bind_addr);
    rc = run_serve(&run);
    run_cleanup(&run);
    uq_info("stopped; image closed");
    return rc;
}

/* --fork: the parent returns 0 once the child listens, else the child's
 * exit status (the child printed the reason on the shared stderr). */
static int serve_forked(const struct nbd_cli *cli)
{
    int pfd[2], status;
    pid_t pid;
    char byte;
    ssize_t n;

    if (pipe2(pfd, O_CLOEXEC) < 0) {
        cli_error("pipe: %s", strerror(errno));
        return 1;
    }
    fflush(NULL);
    pid = fork();
    if (pid < 0) {
        cli_error("fork: %s", strerror(errno));
        return 1;
    }
    if (pid == 0) {
        close(pfd[0]);
        setsid();
        exit(serve(cli, pfd[1]));
    }
    close(pfd[1]);
    do {
        n = read(pfd[0], &byte, 1);
    } while (n < 0 && errno == EINTR);
    close(pfd[0]);
    if (n == 1)
        return 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (WIFEXITED(status) && WEXITSTATUS(status) != 0)
        return WEXITSTATUS(status);
    cli_error("nbd: the server process died during startup");
    return 1;
}

int cmd_nbd(int argc, char **argv)
{
    enum { OPT_BIND = 256, OPT_CACHE_SIZE, OPT_FORK, OPT_PID_FILE, OPT_DISCARD, OPT_NO_UNREF,
           OPT_KEY_FILE, OPT_KEY_ENV, OPT_COMPRESS_THREADS };
    static const struct option longopts[] = {
        { "socket",      required_argument, NULL, 'k' },
        { "bind",        required_argument, NULL, OPT_BIND },
        { "export-name", required_argument, NULL, 'x' },
        { "read-only",   no_argument,       NULL, 'r' },
        { "format",      required_argument, NULL, 'f' },
        { "cache-size",  required_argument, NULL, OPT_CACHE_SIZE },
        { "compress-threads", required_argument, NULL, OPT_COMPRESS_THREADS },
        { "fork",        no_argument,       NULL, OPT_FORK },
        { "pid-file",    required_argument, NULL, OPT_PID_FILE },
        { "discard",     required_argument, NULL, OPT_DISCARD },
        { "discard-no-unref", no_argument,  NULL, OPT_NO_UNREF },
        { "snapshot",    required_argument, NULL, 'l' },
        { "load-snapshot", required_argument, NULL, 'l' },
        { "key-file",    required_argument, NULL, OPT_KEY_FILE },
        { "key-env",     required_argument, NULL, OPT_KEY_ENV },
        { "verbose",     no_argument,       NULL, 'v' },
        { "help",        no_argument,       NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct nbd_cli cli = { 0 };
    static struct cli_key key;
    int64_t size;
    int c;

    opterr = 0;
    optind = 1;
    while ((c = getopt_long(argc, argv, ":k:x:rf:l:vh", longopts, NULL)) != -1) {
        switch (c) {
        case 'k':
            cli.socket_path = optarg;
            break;
        case OPT_BIND:
            cli.bind_addr = optarg;
            break;
        case 'x':
            cli.export_name = optarg;
            break;
        case 'r':
            cli.read_only = true;
            break;
        case 'v':
            uq_set_verbosity(uq_verbosity() + 1);
            break;
        case 'f':
            if (!strcmp(optarg, "auto"))
                cli.img_opts.format = IMG_FMT_AUTO;
            else if (!strcmp(optarg, "raw"))
                cli.img_opts.format = IMG_FMT_RAW;
            else if (!strcmp(optarg, "qcow2"))
                cli.img_opts.format = IMG_FMT_QCOW2;
            else {
                cli_error("nbd: unknown format '%s' (auto, raw or qcow2)", optarg);
                return 2;
            }
            break;
        case OPT_CACHE_SIZE:
            size = parse_size(optarg);
            if (size < 0) {
                cli_error("nbd: invalid --cache-size '%s'", optarg);
                return 2;
            }
            cli.img_opts.cache_size = (uint64_t)size;
            break;
        case OPT_COMPRESS_THREADS:
            if (!cli_compress_threads("nbd", optarg))
                return 2;
            break;
        case OPT_FORK:
            cli.fork = true;
            break;
        case OPT_DISCARD:
            if (img_parse_discard(optarg, &cli.img_opts.discard) < 0) {
                cli_error("nbd: unknown --discard mode '%s' (ignore or unmap)", optarg);
                return 2;
            }
            break;
        case OPT_NO_UNREF:
            cli.img_opts.discard_no_unref = true;
            break;
        case OPT_KEY_FILE:
        case OPT_KEY_ENV:
            if ((c == OPT_KEY_FILE ? cli_key_from_file : cli_key_from_env)("nbd", optarg, &key))
                return 2;
            cli.img_opts.key = key.data;
            cli.img_opts.key_len = key.len;
            break;
        case OPT_PID_FILE:
            cli.pid_file = optarg;
            break;
        case 'l':
            cli.img_opts.snapshot = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case ':':
            cli_error("nbd: option '%s' needs an argument", argv[optind - 1]);
            return 2;
        default:
            cli_error("nbd: unknown option '%s' (try 'ublk-qcow2 nbd --help')", argv[optind - 1]);
            return 2;
        }
    }
    if (optind >= argc) {
        cli_error("nbd: missing IMAGE (try 'ublk-qcow2 nbd --help')");
        return 2;
    }
    if (optind + 1 < argc) {
        cli_error("nbd: unexpected argument '%s'", argv[optind + 1]);
        return 2;
    }
    cli.image = argv[optind];
    if (!!cli.socket_path == !!cli.bind_addr) {
        cli_error("nbd: give exactly one of --socket PATH and --bind HOST:PORT");
        return 2;
    }
    if (cli.export_name && strlen(cli.export_name) > 4096) {
        cli_error("nbd: export name longer than 4096 bytes");
        return 2;
    }
    /* A snapshot is exported read-only (qemu-nbd -l implies -r). */
    if (cli.img_opts.snapshot)
        cli.read_only = true;
    cli.img_opts.read_only = cli.read_only;
    int rc = cli.fork ? serve_forked(&cli) : serve(&cli, -1);
    cli_key_clear(&key);
    return rc;
}
