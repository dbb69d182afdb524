/* TLS sessions for the NBD server on GnuTLS (see tls.h).
 *
 * Transport: GnuTLS calls our pull/push functions, which use the loop's
 * socket primitives and so park only the calling coroutine.  Outgoing
 * records are collected in a per-session buffer while a batch of replies
 * is encrypted and leave in one sendmsg, instead of one socket round trip
 * per 16 KiB record.  Every socket write goes through send_lock, so bytes
 * GnuTLS produced on the receiving side (alerts, key updates) never
 * interleave with a batch half sent.
 */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <liburing.h>
#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "io/coroutine.h"
#include "io/log.h"
#include "io/loop.h"
#include "nbd/tls.h"

#define TLS_RECORD   16384u           /* plain text per record (TLS maximum) */
#define TLS_OUT_MAX  (256u << 10)     /* encrypted bytes collected per sendmsg */
#define TLS_RETRIES  64               /* bound on non-fatal GnuTLS retries */
#define TLS_IN_BUF   (64u << 10)      /* encrypted bytes taken per recv */

struct nbd_tls_creds {
    gnutls_certificate_credentials_t x509;
    gnutls_psk_server_credentials_t psk;
    gnutls_priority_t prio;
    bool verify_peer;
};

struct nbd_tls {
    gnutls_session_t s;
    int fd;
    int last_errno;             /* of the last failed pull/push */
    char ident[320];
    uint8_t *stage;             /* plain text waiting to fill a record */
    size_t stage_len;
    uint8_t *in;                /* encrypted bytes received, not yet pulled */
    size_t in_start, in_end;
    uint8_t *out;               /* encrypted records waiting for the socket */
    size_t out_len;
    bool collecting;            /* inside nbd_tls_sendv: push appends to out */
    bool flushing;              /* out is on its way to the socket */
    struct co_mutex send_lock;  /* one socket writer at a time */
    struct co_queue flush_wait;
};

/* ---- credentials ------------------------------------------------------------ */

/* Key material other users can read is worth a warning, not a refusal
 * (the administrator may know better, e.g. a group of servers). */
static void warn_if_readable(const char *path)
{
    struct stat st;

    if (stat(path, &st) == 0 && (st.st_mode & (S_IRGRP | S_IROTH)))
        uq_warn("%s can be read by other users (mode %04o); it holds a secret key: chmod 600 %s",
                path, (unsigned)(st.st_mode & 07777), path);
}

static bool file_exists(const char *path)
{
    return access(path, F_OK) == 0;
}

/* Check the psktool format now, so that a mistake is reported at startup
 * with its line number (GnuTLS itself reads the file at each handshake,
 * so keys may be added without a restart).  Never prints a key. */
static int check_psk_file(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "re");
    char line[1024];
    unsigned lineno = 0, keys = 0;

    if (!f) {
        snprintf(err, errlen, "--tls-psk %s: %s", path, strerror(errno));
        return -1;
    }
    while (fgets(line, sizeof(line), f)) {
        size_t n = strlen(line);
        char *colon, *hex;

        lineno++;
        if (n && line[n - 1] == '\n')
            line[--n] = 0;
        else if (!feof(f))
            goto bad;
        if (n && line[n - 1] == '\r')
            line[--n] = 0;
        if (n == 0)
            continue;
        colon = strchr(line, ':');
        if (!colon || colon == line)
            goto bad;
        hex = colon + 1;
        if (!*hex || strlen(hex) % 2 || strspn(hex, "0123456789abcdefABCDEF") != strlen(hex))
            goto bad;
        keys++;
    }
    fclose(f);
    explicit_bzero(line, sizeof(line));
    if (!keys) {
        snprintf(err, errlen, "--tls-psk %s: no keys in the file (make one with: psktool -u USER -p %s)",
                 path, path);
        return -1;
    }
    return 0;
bad:
    fclose(f);
    explicit_bzero(line, sizeof(line));
    snprintf(err, errlen, "--tls-psk %s: line %u is not USERNAME:HEXKEY (the format psktool writes: "
             "psktool -u USER -p %s)", path, lineno, path);
    return -1;
}

static int load_x509(struct nbd_tls_creds *cr, const char *dir, bool verify_peer,
                     char *err, size_t errlen)
{
    char ca[4096], crl[4096], cert[4096], key[4096];
    int r;

    snprintf(ca, sizeof(ca), "%s/ca-cert.pem", dir);
    snprintf(crl, sizeof(crl), "%s/ca-crl.pem", dir);
    snprintf(cert, sizeof(cert), "%s/server-cert.pem", dir);
    snprintf(key, sizeof(key), "%s/server-key.pem", dir);
    if (!file_exists(cert) || !file_exists(key)) {
        snprintf(err, errlen, "--tls-certificates %s: needs server-cert.pem and server-key.pem "
                 "(and ca-cert.pem); see 'EXPOSING AN EXPORT' in the man page for certtool steps", dir);
        return -1;
    }
    if (verify_peer && !file_exists(ca)) {
        snprintf(err, errlen, "--tls-verify-peer: %s is missing (the CA that signs client certificates)", ca);
        return -1;
    }
    r = gnutls_certificate_allocate_credentials(&cr->x509);
    if (r < 0)
        goto gnutls_fail;
    if (file_exists(ca)) {
        r = gnutls_certificate_set_x509_trust_file(cr->x509, ca, GNUTLS_X509_FMT_PEM);
        if (r < 0) {
            snprintf(err, errlen, "%s: %s", ca, gnutls_strerror(r));
            return -1;
        }
    }
    if (file_exists(crl)) {
        r = gnutls_certificate_set_x509_crl_file(cr->x509, crl, GNUTLS_X509_FMT_PEM);
        if (r < 0) {
            snprintf(err, errlen, "%s: %s", crl, gnutls_strerror(r));
            return -1;
        }
    }
    warn_if_readable(key);
    r = gnutls_certificate_set_x509_key_file(cr->x509, cert, key, GNUTLS_X509_FMT_PEM);
    if (r < 0) {
        snprintf(err, errlen, "%s, %s: %s (the key must be the certificate's, unencrypted PEM)",
                 cert, key, gnutls_strerror(r));
        return -1;
    }
    /* Finite-field DHE with the RFC 7919 groups when a client wants it. */
    gnutls_certificate_set_known_dh_params(cr->x509, GNUTLS_SEC_PARAM_MEDIUM);
    return 0;
gnutls_fail:
    snprintf(err, errlen, "TLS: %s", gnutls_strerror(r));
    return -1;
}

struct nbd_tls_creds *nbd_tls_creds_new(const struct nbd_tls_opts *opts, char *err, size_t errlen)
{
    struct nbd_tls_creds *cr = calloc(1, sizeof(*cr));
    const char *errpos;
    int r;

    if (!cr) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    cr->verify_peer = opts->verify_peer;
    if (opts->cert_dir && load_x509(cr, opts->cert_dir, opts->verify_peer, err, errlen) < 0)
        goto fail;
    if (opts->psk_file) {
        if (check_psk_file(opts->psk_file, err, errlen) < 0)
            goto fail;
        warn_if_readable(opts->psk_file);
        r = gnutls_psk_allocate_server_credentials(&cr->psk);
        if (r >= 0)
            r = gnutls_psk_set_server_credentials_file(cr->psk, opts->psk_file);
        if (r < 0) {
            snprintf(err, errlen, "--tls-psk %s: %s", opts->psk_file, gnutls_strerror(r));
            goto fail;
        }
    }
    /* The system's default priorities, plus the PSK key exchanges, which
     * are off by default. */
    if (cr->psk)
        r = gnutls_priority_init2(&cr->prio, "+ECDHE-PSK:+DHE-PSK:+PSK", &errpos,
                                  GNUTLS_PRIORITY_INIT_DEF_APPEND);
    else
        r = gnutls_priority_init(&cr->prio, NULL, &errpos);
    if (r < 0) {
        snprintf(err, errlen, "TLS priorities: %s", gnutls_strerror(r));
        goto fail;
    }
    return cr;
fail:
    nbd_tls_creds_free(cr);
    return NULL;
}

void nbd_tls_creds_free(struct nbd_tls_creds *cr)
{
    if (!cr)
        return;
    if (cr->prio)
        gnutls_priority_deinit(cr->prio);
    if (cr->x509)
        gnutls_certificate_free_credentials(cr->x509);
    if (cr->psk)
        gnutls_psk_free_server_credentials(cr->psk);
    free(cr);
}

/* ---- transport ---------------------------------------------------------------- */

/* GnuTLS pulls a record header, then its body: serve both from one large
 * recv instead of a socket round trip each (a 4 KiB write arrives as one
 * small record per request). */
static ssize_t tls_pull(gnutls_transport_ptr_t p, void *buf, size_t len)
{
    struct nbd_tls *t = p;
    ssize_t n;

    if (t->in_start == t->in_end) {
        if (!t->in && !(t->in = malloc(TLS_IN_BUF))) {
            gnutls_transport_set_errno(t->s, ENOMEM);
            return -1;
        }
        do
            n = io_recv(t->fd, t->in, TLS_IN_BUF, 0);
        while (n == -EINTR || n == -EAGAIN);
        if (n < 0) {
            t->last_errno = (int)-n;
            gnutls_transport_set_errno(t->s, (int)-n);
            return -1;
        }
        if (n == 0)
            return 0;
        t->in_start = 0;
        t->in_end = (size_t)n;
    }
    n = (ssize_t)(t->in_end - t->in_start < len ? t->in_end - t->in_start : len);
    memcpy(buf, t->in + t->in_start, (size_t)n);
    t->in_start += (size_t)n;
    return n;
}

static void prep_poll_in(struct io_uring_sqe *sqe, void *arg)
{
    io_uring_prep_poll_add(sqe, *(int *)arg, POLLIN);
}

/* GnuTLS asks whether data is waiting (ms == 0) or to wait for it.  Our
 * own handshake timeout cuts the socket, which ends any wait here. */
static int tls_pull_timeout(gnutls_transport_ptr_t p, unsigned ms)
{
    struct nbd_tls *t = p;
    char c;
    ssize_t n;

    if (t->in_start < t->in_end)
        return 1;
    n = recv(t->fd, &c, 1, MSG_PEEK | MSG_DONTWAIT);
    if (n >= 0)
        return 1;               /* data, or EOF for the pull to report */
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
        gnutls_transport_set_errno(t->s, errno);
        return -1;
    }
    if (ms == 0)
        return 0;
    if (co_in_coroutine())
        io_submit_wait(prep_poll_in, &t->fd);
    else
        poll(&(struct pollfd){ .fd = t->fd, .events = POLLIN }, 1, -1);
    return 1;
}

/* Every byte of iov to the socket, the caller holding send_lock. */
static int sock_send_all(struct nbd_tls *t, struct iovec *iov, int cnt)
{
    return io_sendv_all(t->fd, iov, cnt);
}

/* Send what was collected in out; records appended meanwhile (by the
 * receiving coroutine) go out in the same call, in order. */
static int out_flush(struct nbd_tls *t)
{
    int r = 0;

    co_mutex_lock(&t->send_lock);
    t->flushing = true;
    while (t->out_len && r == 0) {
        size_t n = t->out_len;
        struct iovec iov = { t->out, n };
        r = sock_send_all(t, &iov, 1);
        memmove(t->out, t->out + n, t->out_len - n);
        t->out_len -= n;
    }
    if (r < 0)
        t->out_len = 0;
    t->flushing = false;
    co_mutex_unlock(&t->send_lock);
    co_queue_wake_all(&t->flush_wait);
    return r;
}

static ssize_t tls_push(gnutls_transport_ptr_t p, const giovec_t *giov, int cnt)
{
    struct nbd_tls *t = p;
    struct iovec iov[16];
    size_t total = 0;
    int r;

    if (cnt > 16)
        cnt = 16;   /* a short write: GnuTLS sends the rest later */
    for (int i = 0; i < cnt; i++) {
        iov[i] = (struct iovec){ giov[i].iov_base, giov[i].iov_len };
        total += giov[i].iov_len;
    }
    while ((t->collecting || t->flushing || t->out_len) && total <= TLS_OUT_MAX) {
        /* A batch is being collected or sent: queue behind it. */
        if (t->out_len + total <= TLS_OUT_MAX) {
            for (int i = 0; i < cnt; i++) {
                memcpy(t->out + t->out_len, iov[i].iov_base, iov[i].iov_len);
                t->out_len += iov[i].iov_len;
            }
            return (ssize_t)total;
        }
        if (t->flushing)
            co_queue_wait(&t->flush_wait);
        else if ((r = out_flush(t)) < 0)
            goto fail;
    }
    if (t->out_len && (r = out_flush(t)) < 0)
        goto fail;
    co_mutex_lock(&t->send_lock);
    r = sock_send_all(t, iov, cnt);
    co_mutex_unlock(&t->send_lock);
    if (r < 0)
        goto fail;
    return (ssize_t)total;
fail:
    t->last_errno = -r;
    gnutls_transport_set_errno(t->s, -r);
    return -1;
}

/* ---- sessions ------------------------------------------------------------------ */

static void set_identity(struct nbd_tls *t)
{
    const char *ver = gnutls_protocol_get_name(gnutls_protocol_get_version(t->s));
    unsigned n = 0;

    if (!ver)
        ver = "TLS";
    if (gnutls_auth_get_type(t->s) == GNUTLS_CRD_PSK) {
        const char *user = gnutls_psk_server_get_username(t->s);
        snprintf(t->ident, sizeof(t->ident), "%s, PSK user %s", ver, user ? user : "?");
        return;
    }
    const gnutls_datum_t *certs = gnutls_certificate_get_peers(t->s, &n);
    if (certs && n) {
        gnutls_x509_crt_t crt;
        gnutls_datum_t dn = { NULL, 0 };
        if (gnutls_x509_crt_init(&crt) == 0) {
            if (gnutls_x509_crt_import(crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
                gnutls_x509_crt_get_dn3(crt, &dn, 0) == 0) {
                snprintf(t->ident, sizeof(t->ident), "%s, certificate %s", ver, (char *)dn.data);
                gnutls_free(dn.data);
                gnutls_x509_crt_deinit(crt);
                return;
            }
            gnutls_x509_crt_deinit(crt);
        }
    }
    snprintf(t->ident, sizeof(t->ident), "%s, no client certificate", ver);
}

struct nbd_tls *nbd_tls_start(struct nbd_tls_creds *cr, int fd, char *why, size_t whylen)
{
    struct nbd_tls *t = calloc(1, sizeof(*t));
    int r, tries = 0;

    if (!t) {
        snprintf(why, whylen, "out of memory");
        return NULL;
    }
    t->fd = fd;
    t->send_lock = (struct co_mutex)CO_MUTEX_INIT;
    r = gnutls_init(&t->s, GNUTLS_SERVER | GNUTLS_NO_SIGNAL);
    if (r < 0)
        goto fail;
    r = gnutls_priority_set(t->s, cr->prio);
    if (r >= 0 && cr->x509)
        r = gnutls_credentials_set(t->s, GNUTLS_CRD_CERTIFICATE, cr->x509);
    if (r >= 0 && cr->psk)
        r = gnutls_credentials_set(t->s, GNUTLS_CRD_PSK, cr->psk);
    if (r < 0)
        goto fail;
    if (cr->verify_peer) {
        /* Ask for a client certificate and fail the handshake (with an
         * alert the client sees) unless the CA signed it. */
        gnutls_certificate_server_set_request(t->s, GNUTLS_CERT_REQUIRE);
        gnutls_session_set_verify_cert(t->s, NULL, 0);
    }
    /* The NBD handshake timeout covers the TLS handshake too. */
    gnutls_handshake_set_timeout(t->s, 0);
    gnutls_transport_set_ptr(t->s, t);
    gnutls_transport_set_pull_function(t->s, tls_pull);
    gnutls_transport_set_pull_timeout_function(t->s, tls_pull_timeout);
    gnutls_transport_set_vec_push_function(t->s, tls_push);

    do
        r = gnutls_handshake(t->s);
    while (r < 0 && !gnutls_error_is_fatal(r) && ++tries < TLS_RETRIES);
    if (r < 0)
        goto fail;
    if (cr->verify_peer) {
        unsigned status = 0;
        r = gnutls_certificate_verify_peers2(t->s, &status);
        if (r < 0)
            goto fail;
        if (status) {
            snprintf(why, whylen, "client certificate refused (not signed by the CA, expired or revoked)");
            nbd_tls_close(t, false);
            return NULL;
        }
    }
    set_identity(t);
    return t;
fail:
    if (r == GNUTLS_E_PUSH_ERROR || r == GNUTLS_E_PULL_ERROR)
        snprintf(why, whylen, "TLS handshake failed: %s", strerror(t->last_errno ? t->last_errno : EIO));
    else if (r == GNUTLS_E_PREMATURE_TERMINATION || r == GNUTLS_E_UNEXPECTED_PACKET_LENGTH)
        snprintf(why, whylen, "TLS handshake failed: the client closed the connection");
    else
        snprintf(why, whylen, "TLS handshake failed: %s", gnutls_strerror(r));
    nbd_tls_close(t, false);
    return NULL;
}

ssize_t nbd_tls_recv(struct nbd_tls *t, void *buf, size_t len)
{
    for (int tries = 0; tries < TLS_RETRIES; tries++) {
        ssize_t r = gnutls_record_recv(t->s, buf, len);
        if (r >= 0)
            return r;
        switch (r) {
        case GNUTLS_E_AGAIN:
        case GNUTLS_E_INTERRUPTED:
        case GNUTLS_E_WARNING_ALERT_RECEIVED:
            continue;
        case GNUTLS_E_REHANDSHAKE:
            /* Renegotiation is refused (and never needed here). */
            gnutls_alert_send(t->s, GNUTLS_AL_WARNING, GNUTLS_A_NO_RENEGOTIATION);
            continue;
        case GNUTLS_E_PREMATURE_TERMINATION:
            return 0;   /* closed without close_notify: an end of stream */
        case GNUTLS_E_PULL_ERROR:
            return -(t->last_errno ? t->last_errno : EIO);
        default:
            uq_debug("nbd: TLS receive failed: %s", gnutls_strerror((int)r));
            return -EPROTO;
        }
    }
    return -EPROTO;
}

/* One record (or part of one) from p; returns bytes taken or -errno. */
static ssize_t record_send(struct nbd_tls *t, const void *p, size_t n)
{
    for (int tries = 0; tries < TLS_RETRIES; tries++) {
        ssize_t r = gnutls_record_send(t->s, p, n);
        if (r >= 0)
            return r;
        if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED)
            continue;
        if (r == GNUTLS_E_PUSH_ERROR)
            return -(t->last_errno ? t->last_errno : EIO);
        return -EPROTO;
    }
    return -EPROTO;
}

int nbd_tls_sendv(struct nbd_tls *t, const struct iovec *iov, int cnt)
{
    int ret = 0;

    if (!t->stage)
        t->stage = malloc(TLS_RECORD);
    if (!t->out)
        t->out = malloc(TLS_OUT_MAX);
    if (!t->stage || !t->out)
        return -ENOMEM;
    /* Small pieces (reply headers, 4 KiB reads) are packed into full
     * records; long runs go to GnuTLS straight from the caller's buffer. */
    t->collecting = true;
    for (int i = 0; i < cnt && ret == 0; i++) {
        const uint8_t *p = iov[i].iov_base;
        size_t n = iov[i].iov_len;
        while (n && ret == 0) {
            ssize_t r;
            if (t->stage_len == 0 && n >= TLS_RECORD) {
                r = record_send(t, p, n < TLS_RECORD ? n : TLS_RECORD);
                if (r < 0) {
                    ret = (int)r;
                    break;
                }
                p += r;
                n -= (size_t)r;
                continue;
            }
            size_t k = TLS_RECORD - t->stage_len;
            if (k > n)
                k = n;
            memcpy(t->stage + t->stage_len, p, k);
            t->stage_len += k;
            p += k;
            n -= k;
            if (t->stage_len == TLS_RECORD) {
                r = record_send(t, t->stage, t->stage_len);
                if (r < 0)
                    ret = (int)r;
                else if ((size_t)r < t->stage_len)
                    memmove(t->stage, t->stage + r, t->stage_len - (size_t)r);
                if (r >= 0)
                    t->stage_len -= (size_t)r;
            }
        }
    }
    while (ret == 0 && t->stage_len) {
        ssize_t r = record_send(t, t->stage, t->stage_len);
        if (r < 0) {
            ret = (int)r;
            break;
        }
        memmove(t->stage, t->stage + r, t->stage_len - (size_t)r);
        t->stage_len -= (size_t)r;
    }
    t->collecting = false;
    if (ret == 0)
        ret = out_flush(t);
    else
        t->stage_len = 0;
    return ret;
}

const char *nbd_tls_identity(const struct nbd_tls *t)
{
    return t->ident;
}

void nbd_tls_close(struct nbd_tls *t, bool bye)
{
    if (!t)
        return;
    if (t->s) {
        /* close_notify only: the client's answer is not awaited. */
        if (bye)
            gnutls_bye(t->s, GNUTLS_SHUT_WR);
        gnutls_deinit(t->s);
    }
    if (t->stage)
        explicit_bzero(t->stage, TLS_RECORD);
    free(t->stage);
    free(t->in);
    free(t->out);
    free(t);
}
