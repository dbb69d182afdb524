/* Subcommands of the ublk-qcow2 command. Each returns the process exit code. */
#ifndef UQ_CLI_H
#define UQ_CLI_H

#include <stdbool.h>
#include <stdint.h>

int cmd_nbd(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_add(int argc, char **argv);
int cmd_del(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_recover(int argc, char **argv);
int cmd_restart(int argc, char **argv);
int cmd_stats(int argc, char **argv);
int cmd_snapshot(int argc, char **argv);
int cmd_resize(int argc, char **argv);
int cmd_create(int argc, char **argv);
int cmd_info(int argc, char **argv);
int cmd_check(int argc, char **argv);
int cmd_convert(int argc, char **argv);

/* create's -o OPT=VALUE,... parser (img.c), also for convert's -o. */
struct create_opts;
bool cli_create_options(struct create_opts *o, const char *list);
/* -o OPT=VALUE,... given several times: the lists in order (applied after
 * the format is known), -o help lists the names. */
struct option_lists {
    const char *list[32];
    int n;
};
struct cli_cmd;
struct cli_opt;
int cli_take_option_list(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg,
                         int argc, char **argv);

/* Progress bar on stderr (progress.c): drawn only when stderr is a terminal.
 * progress_update has the engine's tool_progress_fn signature (ctx = the
 * struct progress). */
struct progress {
    const char *label;
    bool on;
    int shown;          /* per mille last drawn, -1 before the first */
};
void progress_start(struct progress *p, const char *label);
void progress_update(void *ctx, uint64_t done, uint64_t total);
void progress_end(struct progress *p);

/* The passphrase of an encrypted image (key.c): --key-file FILE (its exact
 * bytes) or --key-env VAR.  Each returns 0, or prints why and returns 2.
 * Besides the bytes, k keeps where they came from (the file's absolute path
 * or the variable's name), which `add` stores for `recover`. */
#include <limits.h>
#include <stddef.h>
struct cli_key { void *data; size_t len; char file[PATH_MAX]; const char *env; };
int cli_key_from_file(const char *cmd, const char *path, struct cli_key *k);
int cli_key_from_env(const char *cmd, const char *var, struct cli_key *k);
void cli_key_clear(struct cli_key *k);      /* wipe and free */

/* Strict unsigned parse: digits only, within [min, max]; false otherwise. */
bool cli_parse_uint(const char *s, unsigned long min, unsigned long max, unsigned long *out);

/* snapshot and resize (access.c): open IMAGE for an offline command under
 * QEMU's locks (a writer's unless read_only; none with force_share), 0 and
 * *img, or 1 after saying why; close it, returning rc or 1 if closing failed. */
struct image;
int cli_open_offline(const char *cmd, const char *path, bool read_only, bool force_share,
                     struct image **img, int *lock_fd);
int cli_close_offline(const char *cmd, struct image *img, int lock_fd, int rc);
/* Say why a control-socket request failed (-errno from ctl_request). */
void cli_daemon_error(const char *cmd, uint32_t id, int r);
/* A live device's control-socket request: 0 and the reply, or 1 after
 * printing why (no daemon, or the daemon's error). */
int cli_ask_daemon(const char *cmd, uint32_t id, const char *request, char *reply, size_t len);

/* What a size may be, for every "invalid size" message. */
#define SIZE_RANGE "0 to 8 EiB - 1 bytes, a number with an optional k, M, G, T, P or E suffix"

/* --compress-threads N (convert.c): the worker pool's size, 0 to 16; also
 * exported as UBLK_QCOW2_COMPRESS_THREADS for a daemon started from here.
 * Says why and returns false on a bad value. */
bool cli_compress_threads(const char *cmd, const char *arg);
/* --compress-threads N as a row of a command's option table. */
int cli_take_compress_threads(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg,
                              int argc, char **argv);
#define CLI_OPT_COMPRESS_THREADS \
    { "compress-threads", 0, CLI_CALL, .take = cli_take_compress_threads }

/* Print "ublk-qcow2: <msg>\n" to stderr (printf-style). */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
