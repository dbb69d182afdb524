/* A ublk daemon's control socket, STATE_DIR/ublkN.sock (root only).
 *
 * One request per connection: the client sends one line ("stats"), the
 * daemon answers with one line (a JSON object) and closes.  Each client is
 * served on a thread of its own (at most CTL_MAX_CLIENTS at once, each
 * given a second to ask and a second to read), never on the queue threads:
 * a slow, stuck or broken client delays neither the data path nor other
 * clients. */
#ifndef UQ_UBLK_CTL_SOCKET_H
#define UQ_UBLK_CTL_SOCKET_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CTL_LINE_MAX 4096
#define CTL_REQUEST_MAX 512     /* a request line, with its newline */
#define CTL_MAX_CLIENTS 64      /* served at once; more are closed unanswered */

struct ctl_server;

/* answer() makes the reply line for one request; it runs on a client's
 * thread, so it must be safe to call from several threads at once. */
typedef void (*ctl_answer_fn)(void *arg, const char *request, char *reply, size_t len);

/* Create and listen on the socket of device id (replacing a stale one).
 * NULL with a message in err on failure. */
struct ctl_server *ctl_server_start(uint32_t id, ctl_answer_fn answer, void *arg, char *err,
                                    size_t errlen);
/* The listening socket: readable when a client waits (poll it). */
int ctl_server_fd(const struct ctl_server *s);
/* Accept the waiting clients, each served on its own thread; a client over
 * the limit is closed at once. */
void ctl_server_accept(struct ctl_server *s);
/* Stop listening, remove the socket, wait for the clients being served
 * (each is bounded in time) and free. */
void ctl_server_stop(struct ctl_server *s);

/* Client: send request to device id's daemon, put its one-line reply
 * (without the newline) in reply.  Returns 0, or -errno (-ENOENT: no
 * socket, no such device or daemon; -EACCES: the socket is another
 * user's, e.g. root's device asked about by a user). */
int ctl_request(uint32_t id, const char *request, char *reply, size_t len);
/* The same, waiting up to timeout_ms for the answer (-1: as long as the
 * daemon lives), for requests that take long (a snapshot of a big image). */
int ctl_request_wait(uint32_t id, const char *request, char *reply, size_t len, int timeout_ms);

#endif
