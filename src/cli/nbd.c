/* ublk-qcow2 nbd: serve an image over NBD on a unix socket or TCP. */
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>
#include <liburing.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "io/coroutine.h"
#include "io/imagelock.h"
#include "io/log.h"
#include "io/loop.h"
#include "nbd/server.h"
#include "img/image.h"

#define NBD_CLI_MAX_ALLOW 256

struct nbd_cli {
    const char *socket_path;
    const char *bind_addr;
    const char *export_name;
    const char *pid_file;
    const char *image;
    bool read_only;
    bool fork;
    struct img_opts img_opts;
    bool tls_given;             /* --tls on the command line */
    struct nbd_tls_opts tls;
    struct nbd_allow allow[NBD_CLI_MAX_ALLOW];
    unsigned nallow;
    unsigned max_connections;
    unsigned handshake_timeout_ms;
    unsigned request_timeout_ms;
};

struct nbd_run {
    const struct nbd_cli *cli;
    struct loop *loop;
    struct image *img;
    struct nbd_server *srv;
    struct nbd_tls_creds *tls;
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
        "Serve IMAGE (qcow2 or raw) over NBD until SIGINT, SIGTERM or SIGHUP (any of them:\n"
        "finish the requests in flight, flush, remove the socket, exit 0).\n"
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
        "\n"
        "Network service (plain NBD has no encryption or authentication: use it only on\n"
        "trusted networks, or with TLS):\n"
        "      --tls MODE           off, on (offer TLS, plain text still served) or require\n"
        "                           (nothing listed or served before STARTTLS); default:\n"
        "                           require when credentials are given, else off\n"
        "      --tls-certificates DIR\n"
        "                           x509 files in DIR: ca-cert.pem, server-cert.pem,\n"
        "                           server-key.pem (and ca-crl.pem if present)\n"
        "      --tls-verify-peer    clients must present a certificate signed by the CA\n"
        "      --tls-psk FILE       pre-shared keys, lines USERNAME:HEXKEY (psktool -u USER -p FILE)\n"
        "      --allow ADDR[/PREFIX]\n"
        "                           accept TCP clients from ADDR/PREFIX only (repeatable);\n"
        "                           others are refused at connect and logged\n"
        "      --max-connections N  at most N connections (default 1024); when full, the\n"
        "                           oldest one still in its handshake makes room\n"
        "      --handshake-timeout SECS\n"
        "                           close connections that have not finished the NBD (and\n"
        "                           TLS) handshake within SECS seconds (default 10)\n"
        "      --request-timeout SECS\n"
        "                           close connections that leave a request (its header or\n"
        "                           WRITE data) unfinished for SECS seconds (default 30)\n"
        "\n"
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
        if (n == (ssize_t)sizeof(si)) {
            uq_info("%s: finishing requests in flight, flushing, exiting",
                    strsignal((int)si.ssi_signo));
            break;
        }
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

/* The pid file: never through a symlink (O_NOFOLLOW: a planted link must
 * not make us overwrite its target), and only a regular file. */
static int write_pid_file(const char *path, char *err, size_t errlen)
{
    char buf[32];
    int n;
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        int e = fd < 0 ? errno : EINVAL;
        snprintf(err, errlen, "%s: cannot write pid file: %s", path,
                 e == ELOOP ? "it is a symbolic link (give the real path)" :
                 e == EINVAL ? "not a regular file" : strerror(e));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    n = snprintf(buf, sizeof(buf), "%d\n", (int)getpid());
    if (ftruncate(fd, 0) < 0 || write(fd, buf, n) != n) {
        snprintf(err, errlen, "%s: cannot write pid file: %s", path, strerror(errno));
        close(fd);
        unlink(path);
        return -1;
    }
    close(fd);
    return 0;
}

/* Remove the pid file only if it still holds our pid (another server may
 * have taken the name since). */
static void remove_pid_file(const char *path)
{
    char buf[32] = "";
    int fd = open(path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n > 0 && atoi(buf) == (int)getpid())
        unlink(path);
}

/* Every signal whose default action ends the process and that can be
 * caught: each one drains, flushes and exits 0 instead, so no write the
 * clients saw acknowledged is lost (the metadata cache may hold it until
 * the flush).  SIGHUP matters most: a closed terminal sends it.  Fault
 * signals (SIGSEGV, SIGBUS, ...) are left alone: blocking them would not
 * stop a real fault. */
static void stop_signals(sigset_t *mask)
{
    static const int sigs[] = { SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGUSR1, SIGUSR2, SIGALRM,
                                SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGXCPU };

    sigemptyset(mask);
    for (size_t i = 0; i < sizeof(sigs) / sizeof(sigs[0]); i++)
        sigaddset(mask, sigs[i]);
    for (int sig = SIGRTMIN; sig <= SIGRTMAX; sig++)
        sigaddset(mask, sig);
}

/* Each connection is a file descriptor: make room for the connection
 * limit (the default soft limit, 1024, would fail accept() first). */
static void raise_fd_limit(unsigned conns)
{
    struct rlimit rl;
    rlim_t want = (rlim_t)conns + 64;

    if (getrlimit(RLIMIT_NOFILE, &rl) < 0 || rl.rlim_cur >= want)
        return;
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max >= want ? want : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
    if (rl.rlim_cur < want)
        uq_warn("nbd: the open file limit (%llu) allows fewer than %u connections; "
                "raise it (ulimit -n) or lower --max-connections",
                (unsigned long long)rl.rlim_cur, conns);
}

/* Everything that can fail before serving.  Runs in the serving process
 * (the child with --fork: the ring and any file locks belong to it). */
static int run_setup(struct nbd_run *run, char *err, size_t errlen)
{
    const struct nbd_cli *cli = run->cli;
    struct nbd_export_opts eo = { 0 };
    char desc[64];
    sigset_t mask;

    stop_signals(&mask);
    if (sigprocmask(SIG_BLOCK, &mask, NULL) < 0 ||
        (run->signal_fd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC)) < 0) {
        snprintf(err, errlen, "signalfd: %s", strerror(errno));
        return -1;
    }
    /* A client that disconnects mid-reply must not kill the server. */
    signal(SIGPIPE, SIG_IGN);
    /* A write past the file size limit fails with EFBIG (reported to the
     * client) instead of killing the server with the image half-flushed. */
    signal(SIGXFSZ, SIG_IGN);

    run->loop = loop_new_flags(256, LOOP_COALESCE);
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
    if (cli->tls.mode != NBD_TLS_OFF) {
        run->tls = nbd_tls_creds_new(&cli->tls, err, errlen);
        if (!run->tls)
            return -1;
    }
    raise_fd_limit(cli->max_connections ? cli->max_connections : NBD_MAX_CONNECTIONS);
    if (cli->socket_path)
        run->listen_fd = listen_unix(run, cli->socket_path, err, errlen);
    else
        run->listen_fd = listen_tcp(cli->bind_addr, err, errlen);
    if (run->listen_fd < 0)
        return -1;

    eo.name = cli->export_name;
    eo.read_only = cli->read_only;
    eo.tls_mode = cli->tls.mode;
    eo.tls = run->tls;
    eo.allow = cli->allow;
    eo.nallow = cli->nallow;
    eo.max_connections = cli->max_connections;
    eo.handshake_timeout_ms = cli->handshake_timeout_ms;
    eo.request_timeout_ms = cli->request_timeout_ms;
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
    nbd_tls_creds_free(run->tls);
    if (run->listen_fd >= 0)
        close(run->listen_fd);
    /* Remove the socket only if it is still the one we created. */
    if (run->socket_created && stat(cli->socket_path, &st) == 0 &&
        st.st_dev == run->socket_dev && st.st_ino == run->socket_ino)
        unlink(cli->socket_path);
    if (run->pid_written)
        remove_pid_file(cli->pid_file);
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
    char files[2048];
    img_describe_files(run.img, files, sizeof(files));
    if (files[0])
        uq_info("%s", files);
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

/* TLS and access options that only make sense together. */
static int check_net_options(struct nbd_cli *cli)
{
    bool creds = cli->tls.cert_dir || cli->tls.psk_file;

    if (!cli->tls_given && creds)
        cli->tls.mode = NBD_TLS_REQUIRE;    /* credentials imply TLS, as with qemu-nbd */
    if (cli->tls.mode == NBD_TLS_OFF && creds) {
        cli_error("nbd: --tls off contradicts --tls-certificates/--tls-psk (drop them, or use --tls on|require)");
        return -1;
    }
    if (cli->tls.mode != NBD_TLS_OFF && !creds) {
        cli_error("nbd: --tls %s needs credentials: --tls-certificates DIR or --tls-psk FILE",
                  cli->tls.mode == NBD_TLS_ON ? "on" : "require");
        return -1;
    }
    if (cli->tls.verify_peer && !cli->tls.cert_dir) {
        cli_error("nbd: --tls-verify-peer needs --tls-certificates DIR (its ca-cert.pem checks the clients)");
        return -1;
    }
    if (cli->nallow && cli->socket_path) {
        cli_error("nbd: --allow applies to TCP clients (--bind); a unix socket is guarded by its file permissions");
        return -1;
    }
    return 0;
}

/* --tls off|on|require */
static int take_tls(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc, char **argv)
{
    enum nbd_tls_mode *mode = o->dest;
    if (!strcmp(arg, "off"))
        *mode = NBD_TLS_OFF;
    else if (!strcmp(arg, "on"))
        *mode = NBD_TLS_ON;
    else if (!strcmp(arg, "require"))
        *mode = NBD_TLS_REQUIRE;
    else {
        cli_error("nbd: unknown --tls mode '%s' (off, on or require)", arg);
        return 2;
    }
    return CLI_GO_ON;
}

/* --allow ADDR[/PREFIX], repeatable */
static int take_allow(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc, char **argv)
{
    struct nbd_cli *cli = o->dest;
    char aerr[256];
    if (cli->nallow >= NBD_CLI_MAX_ALLOW) {
        cli_error("nbd: more than %d --allow rules (use wider prefixes)", NBD_CLI_MAX_ALLOW);
        return 2;
    }
    if (nbd_allow_parse(arg, &cli->allow[cli->nallow], aerr, sizeof(aerr)) < 0) {
        cli_error("nbd: %s", aerr);
        return 2;
    }
    cli->nallow++;
    return CLI_GO_ON;
}

int cmd_nbd(int argc, char **argv)
{
    struct nbd_cli cli = { 0 };
    static struct cli_key key;
    unsigned hs_timeout_s = 0;
    bool hs_timeout_given = false;
    unsigned req_timeout_s = 0;
    bool req_timeout_given = false;
    struct img_opts *io = &cli.img_opts;
    const struct cli_opt opts[] = {
        /* where to listen and what to call the export */
        { "socket", 'k', CLI_STRING, .dest = &cli.socket_path },
        { "bind", 0, CLI_STRING, .dest = &cli.bind_addr },
        { "export-name", 'x', CLI_STRING, .dest = &cli.export_name },
        { "read-only", 'r', CLI_FLAG, .dest = &cli.read_only },
        /* how the image is opened */
        { "format", 'f', CLI_FORMAT, .dest = &io->format },
        { "cache-size", 0, CLI_SIZE, .dest = &io->cache_size, .bad = "invalid --cache-size '%s' (" SIZE_RANGE ")" },
        CLI_OPT_COMPRESS_THREADS,
        { "discard", 0, CLI_DISCARD, .dest = &io->discard },
        { "discard-no-unref", 0, CLI_FLAG, .dest = &io->discard_no_unref },
        { "snapshot", 'l', CLI_STRING, .dest = &io->snapshot },
        { "load-snapshot", 'l', CLI_STRING, .dest = &io->snapshot },
        { "key-file", 0, CLI_KEY_FILE, .dest = &key },
        { "key-env", 0, CLI_KEY_ENV, .dest = &key },
        /* who may connect, and how */
        { "tls", 0, CLI_CALL, .dest = &cli.tls.mode, .seen = &cli.tls_given, .take = take_tls },
        { "tls-certificates", 0, CLI_STRING, .dest = &cli.tls.cert_dir },
        { "tls-verify-peer", 0, CLI_FLAG, .dest = &cli.tls.verify_peer },
        { "tls-psk", 0, CLI_STRING, .dest = &cli.tls.psk_file },
        { "allow", 0, CLI_CALL, .dest = &cli, .take = take_allow },
        { "max-connections", 0, CLI_UINT, .dest = &cli.max_connections, .min = 1, .max = 65536,
          .bad = "invalid --max-connections '%s' (a number from 1 to %lu)" },
        { "handshake-timeout", 0, CLI_UINT, .dest = &hs_timeout_s, .seen = &hs_timeout_given, .min = 1,
          .max = 3600, .bad = "invalid --handshake-timeout '%s' (seconds, 1 to %lu)" },
        { "request-timeout", 0, CLI_UINT, .dest = &req_timeout_s, .seen = &req_timeout_given, .min = 1,
          .max = 3600, .bad = "invalid --request-timeout '%s' (seconds, 1 to %lu)" },
        /* the process */
        { "fork", 0, CLI_FLAG, .dest = &cli.fork },
        { "pid-file", 0, CLI_STRING, .dest = &cli.pid_file },
        { "verbose", 'v', .type = CLI_VERBOSE },
        { 0 },
    };
    const struct cli_cmd cmd = { "nbd", usage, opts, .usage_exit = 2, .own_errors = true,
                                 .missing_arg = "an argument", .operands = CLI_OPERAND_IMAGE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    if (hs_timeout_given)
        cli.handshake_timeout_ms = hs_timeout_s * 1000;
    if (req_timeout_given)
        cli.request_timeout_ms = req_timeout_s * 1000;
    cli.image = argv[optind];
    io->key = key.data;
    io->key_len = key.len;
    if (!!cli.socket_path == !!cli.bind_addr) {
        cli_error("nbd: give exactly one of --socket PATH and --bind HOST:PORT");
        return 2;
    }
    if (check_net_options(&cli) < 0)
        return 2;
    if (cli.export_name && strlen(cli.export_name) > 4096) {
        cli_error("nbd: export name longer than 4096 bytes");
        return 2;
    }
    /* A snapshot is exported read-only (qemu-nbd -l implies -r). */
    if (cli.img_opts.snapshot)
        cli.read_only = true;
    cli.img_opts.read_only = cli.read_only;
    rc = cli.fork ? serve_forked(&cli) : serve(&cli, -1);
    cli_key_clear(&key);
    return rc;
}
