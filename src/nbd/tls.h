/* TLS for the NBD server (GnuTLS): credentials loaded once at startup, and
 * one session per connection that upgrades after NBD_OPT_STARTTLS.
 *
 * Sessions do their socket I/O through the loop's primitives, so the TLS
 * handshake and every record read or written park only the calling
 * coroutine.  One coroutine may receive while another sends on the same
 * session (GnuTLS allows one reader and one writer at a time).
 */
#ifndef UQ_NBD_TLS_H
#define UQ_NBD_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>
#include <sys/uio.h>

enum nbd_tls_mode {
    NBD_TLS_OFF,        /* STARTTLS is refused as unsupported */
    NBD_TLS_ON,         /* offered; plain text still served */
    NBD_TLS_REQUIRE,    /* nothing but STARTTLS and ABORT before TLS */
};

struct nbd_tls_opts {
    enum nbd_tls_mode mode;
    const char *cert_dir;   /* ca-cert.pem, server-cert.pem, server-key.pem[, ca-crl.pem] */
    const char *psk_file;   /* psktool format: username:hexkey lines */
    bool verify_peer;       /* clients must present a certificate signed by the CA */
};

struct nbd_tls_creds;
struct nbd_tls;

/* Load and check the files of opts (mode must not be OFF).  On failure
 * returns NULL with err naming the file and the fix.  Warns (once, on
 * stderr) about key files other users may read.  Never logs key material. */
struct nbd_tls_creds *nbd_tls_creds_new(const struct nbd_tls_opts *opts, char *err, size_t errlen);
void nbd_tls_creds_free(struct nbd_tls_creds *cr);

/* Run the server side of the TLS handshake on fd (from a coroutine).
 * Returns the session, or NULL with why set (handshake failed, peer
 * certificate refused, unknown PSK user...). */
struct nbd_tls *nbd_tls_start(struct nbd_tls_creds *cr, int fd, char *why, size_t whylen);

/* Plain text in: > 0 bytes, 0 on a clean end of stream, -errno. */
ssize_t nbd_tls_recv(struct nbd_tls *t, void *buf, size_t len);
/* Send every byte of iov, packed into full records.  0 or -errno. */
int nbd_tls_sendv(struct nbd_tls *t, const struct iovec *iov, int cnt);
/* Who the peer is: "certificate DN", "PSK user NAME" or "anonymous". */
const char *nbd_tls_identity(const struct nbd_tls *t);
/* Send close_notify (best effort) and free the session. */
void nbd_tls_close(struct nbd_tls *t, bool bye);

#endif
