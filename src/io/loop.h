/* The per-thread event loop over io_uring, and the I/O primitives the rest
 * of the program uses.
 *
 * Called from a coroutine with a loop on this thread, each primitive queues
 * an SQE, parks the coroutine, and returns the CQE result when the scheduler
 * resumes it: no blocking call on the data path.  Called outside a coroutine
 * (opening an image, offline tools, unit tests) the same primitive performs
 * the plain system call.  Callers never need to know which mode they are in.
 *
 * Return values follow the kernel's convention: >= 0 success, -errno error.
 */
#ifndef UQ_IO_LOOP_H
#define UQ_IO_LOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>

struct loop;

/* Create this thread's loop (ring with `entries` SQEs) and make it current. */
struct loop *loop_new(unsigned entries);
/* LOOP_COALESCE: while many file reads and writes are in flight, wake for
 * their completions in batches (fewer wakeups and submits per I/O, for
 * servers at high queue depth); ignored where the kernel cannot. */
#define LOOP_COALESCE 1u
struct loop *loop_new_flags(unsigned entries, unsigned flags);
void loop_free(struct loop *l);
/* Register [base, base+len) with the ring (one region per loop): reads and
 * writes whose buffer lies inside it skip the kernel's per-I/O page pinning.
 * The memory stays pinned until loop_unregister_buffer; 0 or -errno (e.g.
 * over RLIMIT_MEMLOCK: then nothing changes). */
int loop_register_buffer(struct loop *l, void *base, size_t len);
void loop_unregister_buffer(struct loop *l);
struct loop *loop_current(void);

/* Run until loop_stop() was called and no coroutine is left alive, or until
 * there is nothing left that could ever wake a coroutine.  Returns 0, or
 * -errno if the ring failed. */
int loop_run(struct loop *l);
void loop_stop(struct loop *l);
/* In a coroutine, with LOOP_COALESCE and at least min file reads and writes
 * in flight: park until the loop next wakes up (their completions bound the
 * wait) and return true; else return false at once. */
bool loop_wait_file_turn(unsigned min);
bool loop_stopping(struct loop *l);

/* Full-length positional I/O.  Reads return the bytes read (less than len
 * only at end of file); writes return len or -errno (a short write is
 * retried, and reported as -EIO if no progress is possible).
 * rw_flags: RWF_DSYNC etc. for writes (FUA). */
ssize_t io_pread(int fd, void *buf, size_t len, uint64_t off);
ssize_t io_pwrite(int fd, const void *buf, size_t len, uint64_t off, int rw_flags);
ssize_t io_preadv(int fd, const struct iovec *iov, int iovcnt, uint64_t off);
ssize_t io_pwritev(int fd, const struct iovec *iov, int iovcnt, uint64_t off, int rw_flags);
/* io_preadv/io_pwritev as plain system calls, also inside a coroutine: for
 * files in memory (tmpfs), where the call is a memory copy that never waits
 * for a device, and io_uring would hand it to a worker thread (tmpfs has no
 * non-blocking path), which for writes runs those to one file one after
 * another (hashed by inode).  Inline, 4 KiB costs about a microsecond. */
ssize_t io_preadv_now(int fd, const struct iovec *iov, int iovcnt, uint64_t off);
ssize_t io_pwritev_now(int fd, const struct iovec *iov, int iovcnt, uint64_t off, int rw_flags);
int io_fdatasync(int fd);
int io_fallocate(int fd, int mode, uint64_t off, uint64_t len);

/* Sockets and other fds (single operation, may be partial). */
ssize_t io_recv(int fd, void *buf, size_t len, int flags);
ssize_t io_send(int fd, const void *buf, size_t len, int flags);
struct msghdr;
ssize_t io_sendmsg(int fd, const struct msghdr *msg, int flags);
/* Every byte of iov (cnt entries, advanced as sent) to the socket fd
 * (MSG_NOSIGNAL); 0, or -errno (-EPIPE when the peer is gone). */
int io_sendv_all(int fd, struct iovec *iov, int cnt);
ssize_t io_read(int fd, void *buf, size_t len);
int io_accept(int fd);
/* Loop until all len bytes moved; returns len, 0 on EOF before any byte
 * (recv only), or -errno (-EPIPE/-ECONNRESET on a peer that went away
 * mid-message). */
ssize_t io_recv_all(int fd, void *buf, size_t len);
ssize_t io_send_all(int fd, const void *buf, size_t len);

/* Submit an arbitrary, already-prepared SQE from a coroutine and wait for
 * its result (used by the ublk frontend for URING_CMD).  prep fills the SQE;
 * returns the CQE res. */
struct io_uring_sqe;
typedef void (*io_prep_fn)(struct io_uring_sqe *sqe, void *arg);
int io_submit_wait(io_prep_fn prep, void *arg);

/* An SQE whose completions go to a function instead of a waiting
 * coroutine: one CQE, or many for a multishot operation (each but the last
 * flagged IORING_CQE_F_MORE).  fn(sink, res, cqe flags) runs on the loop's
 * thread as the loop reaps each CQE, outside any coroutine (it may wake
 * coroutines, not wait); the sink must live until the last CQE.  The loop
 * counts the SQE in flight until then.  Returns 0, or -EINVAL without a
 * loop on this thread. */
struct io_cqe_sink {
    void (*fn)(struct io_cqe_sink *sink, int res, unsigned flags);
};
int io_submit_sink(io_prep_fn prep, void *arg, struct io_cqe_sink *sink);

/* Submit one SQE and wait for its CQE outside the coroutines (a set-up
 * step before the loop runs: nothing else may be in flight, else -EBUSY).
 * Returns the CQE res, or -errno. */
int loop_submit_sync(struct loop *l, io_prep_fn prep, void *arg);

/* A ring of provided buffers (group bgid, entries a power of two) for
 * operations that pick their buffer (IOSQE_BUFFER_SELECT); fill it with
 * liburing's io_uring_buf_ring_add/advance.  It goes with the loop
 * (loop_free); free the memory (free()) after that.  NULL and errno on
 * failure. */
struct io_uring_buf_ring;
struct io_uring_buf_ring *loop_buf_ring_new(struct loop *l, unsigned entries, unsigned bgid);

/* Fixed buffers (io_uring registered buffers) of the current thread's
 * loop.  loop_register_sparse: a table of n empty slots, for buffers the
 * kernel installs itself (ublk's automatic buffer registration); -errno
 * if the kernel cannot.  io_rw_fixed: full-length I/O between fd at off
 * and bytes [buf_off, buf_off+len) of the buffer in slot idx, from a
 * coroutine only (no system call can reach a registered buffer).  Returns
 * the bytes moved (less than len only for a read at end of file) or
 * -errno; rw_flags as for io_pwrite. */
int loop_register_sparse(struct loop *l, unsigned n);
ssize_t io_rw_fixed(bool write, int fd, unsigned idx, uint64_t buf_off, size_t len, uint64_t off,
                    int rw_flags);

/* Aligned allocation for O_DIRECT buffers (4096 bytes). Aborts on OOM. */
void *io_alloc(size_t len);
void *io_zalloc(size_t len);
void io_free(void *p);
#define IO_ALIGN 4096u

#endif
