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
/* A ublk device id for `-n`: on a bad one, says so naming cmd and returns false. */
bool cli_parse_dev_id(const char *cmd, const char *s, uint32_t *out);

/* --compress-threads N (convert.c): the worker pool's size, 0 to 16; also
 * exported as UBLK_QCOW2_COMPRESS_THREADS for a daemon started from here.
 * Says why and returns false on a bad value. */
bool cli_compress_threads(const char *cmd, const char *arg);

/* Print "ublk-qcow2: <msg>\n" to stderr (printf-style). */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
