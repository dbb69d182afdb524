/* A ublk daemon's control socket, STATE_DIR/ublkN.sock (root only).
 *
 * One request per connection: the client sends one line ("stats"), the
 * daemon answers with one line (a JSON object) and closes.  The daemon's
 * main thread serves it, never the queue threads, so a slow or broken
 * client cannot stall the data path. */
#ifndef UQ_UBLK_CTL_SOCKET_H
#define UQ_UBLK_CTL_SOCKET_H

#include <stddef.h>
#include <stdint.h>

#define CTL_LINE_MAX 4096
#define CTL_REQUEST_MAX 512     /* a request line, with its newline */

/* Create and listen on the socket of device id (replacing a stale one).
 * Returns the listening fd, or -errno with a message in err. */
int ctl_listen(uint32_t id, char *err, size_t errlen);
void ctl_close(int listen_fd, uint32_t id);

/* Accept one pending connection, read its request line (waiting at most a
 * second for it), call answer() for the reply line, send it, close.  A
 * client that sends nothing usable is dropped. */
typedef void (*ctl_answer_fn)(void *arg, const char *request, char *reply, size_t len);
void ctl_serve_one(int listen_fd, ctl_answer_fn answer, void *arg);

/* Client: send request to device id's daemon, put its one-line reply
 * (without the newline) in reply.  Returns 0, or -errno (-ENOENT: no
 * socket, no such device or daemon). */
int ctl_request(uint32_t id, const char *request, char *reply, size_t len);
/* The same, waiting up to timeout_ms for the answer (-1: as long as the
 * daemon lives), for requests that take long (a snapshot of a big image). */
int ctl_request_wait(uint32_t id, const char *request, char *reply, size_t len, int timeout_ms);

#endif
