/* The NBD frontend: speaks the NBD protocol on sockets and turns every
 * request into img_* calls on one shared image.
 *
 * Everything runs on the calling thread's loop: one listener coroutine,
 * one coroutine per connection (handshake, then the receive loop), and one
 * coroutine per request.  All connections share the image, so a FLUSH on
 * any connection flushes everything (hence NBD_FLAG_CAN_MULTI_CONN).
 */
#ifndef UQ_NBD_SERVER_H
#define UQ_NBD_SERVER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "nbd/tls.h"

struct image;
struct nbd_server;

/* An --allow rule: peers whose address starts with the first prefix bits
 * of addr (IPv4-mapped IPv6 peers are matched as IPv4). */
struct nbd_allow {
    int family;                 /* AF_INET or AF_INET6 */
    uint8_t addr[16];
    unsigned prefix;
};

struct nbd_export_opts {
    const char *name;           /* export name; NULL or "" = the default export "" */
    const char *description;    /* sent when a client asks; NULL = none */
    bool read_only;             /* forced on when the image itself is read-only */
    /* Network service: all optional (zero = defaults below, no TLS, anyone). */
    enum nbd_tls_mode tls_mode;
    struct nbd_tls_creds *tls;  /* borrowed; needed unless tls_mode is OFF */
    const struct nbd_allow *allow;  /* TCP peers allowed (NULL: all) */
    unsigned nallow;
    unsigned max_connections;   /* 0 = NBD_MAX_CONNECTIONS */
    unsigned handshake_timeout_ms;  /* 0 = NBD_HANDSHAKE_TIMEOUT_MS */
    unsigned request_timeout_ms;    /* 0 = NBD_REQUEST_TIMEOUT_MS */
};

/* Parse ADDR[/PREFIX] (IPv4 or IPv6).  0, or -1 with err set. */
int nbd_allow_parse(const char *spec, struct nbd_allow *out, char *err, size_t errlen);

/* Limits of the frontend (also advertised through NBD_INFO_BLOCK_SIZE). */
#define NBD_BLOCK_MIN        512u
#define NBD_BLOCK_PREFERRED  4096u
#define NBD_BLOCK_MAX        (32u << 20)
#define NBD_MAX_INFLIGHT     128u            /* requests in flight per connection */
#define NBD_MEM_LIMIT        (256ull << 20)  /* payload buffers of all connections */
#define NBD_CONN_MEM_LIMIT   (64ull << 20)   /* ... and of one connection */
#define NBD_SHUTDOWN_GRACE_MS 10000u         /* replies still unsent then are dropped */
#define NBD_MAX_CONNECTIONS  1024u
#define NBD_HANDSHAKE_TIMEOUT_MS 10000u      /* from accept to NBD_OPT_GO, as qemu-nbd */
/* A request (header or WRITE payload) begun must arrive in full within this
 * long of the server starting to wait for its rest: a client stalled in the
 * middle of a payload would otherwise hold its buffer until it disconnects. */
#define NBD_REQUEST_TIMEOUT_MS 30000u

/* The server does not own img; the caller closes it after nbd_server_wait(). */
struct nbd_server *nbd_server_new(struct image *img, const struct nbd_export_opts *opts);
void nbd_server_free(struct nbd_server *s);

/* Accept clients on a bound, listening socket (the caller keeps ownership
 * of listen_fd and closes it after nbd_server_wait()).  Spawns the listener
 * coroutine; may be called outside a coroutine before loop_run(). */
void nbd_server_listen(struct nbd_server *s, int listen_fd);

/* Serve one already-connected socket (takes ownership of fd).  Returns 0,
 * or -EBUSY (fd closed) when the server is stopping or full. */
int nbd_server_add_client(struct nbd_server *s, int fd);

/* Begin an orderly shutdown: stop accepting and stop reading on every
 * connection; requests already received complete and get their replies
 * (connections still blocked after NBD_SHUTDOWN_GRACE_MS are cut).
 * Safe to call more than once. */
void nbd_server_shutdown(struct nbd_server *s);

/* From a coroutine: wait until the listener and every connection ended. */
void nbd_server_wait(struct nbd_server *s);

/* Connections currently open. */
unsigned nbd_server_connections(const struct nbd_server *s);

#endif
