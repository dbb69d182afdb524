/* --key-file FILE / --key-env VAR: the passphrase of a LUKS-encrypted qcow2
 * image.  A file is taken byte for byte (nothing stripped, as QEMU takes
 * `--object secret,file=FILE` and cryptsetup a --key-file), so
 * `printf %s PASS > FILE` matches `--object secret,data=PASS`. */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "cli/cli.h"

#define KEY_MAX (64u << 10)     /* far more than any passphrase */

static int set_key(struct cli_key *k, const void *data, size_t len)
{
    cli_key_clear(k);
    k->data = malloc(len ? len : 1);
    if (!k->data)
        return -1;
    memcpy(k->data, data, len);
    k->len = len;
    return 0;
}

int cli_key_from_file(const char *cmd, const char *path, struct cli_key *k)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        cli_error("%s: cannot read --key-file %s: %s", cmd, path, strerror(errno));
        return 2;
    }
    char *buf = malloc(KEY_MAX + 1);
    size_t len = 0;
    ssize_t n = 1;
    while (buf && len <= KEY_MAX && (n = read(fd, buf + len, KEY_MAX + 1 - len)) > 0)
        len += (size_t)n;
    int e = errno;
    close(fd);
    int rc = 0;
    if (!buf || n < 0) {
        cli_error("%s: cannot read --key-file %s: %s", cmd, path, strerror(buf ? e : ENOMEM));
        rc = 2;
    } else if (len > KEY_MAX) {
        cli_error("%s: --key-file %s is larger than %u bytes: not a passphrase", cmd, path, KEY_MAX);
        rc = 2;
    } else if (len == 0) {
        cli_error("%s: --key-file %s is empty", cmd, path);
        rc = 2;
    } else if (set_key(k, buf, len) < 0) {
        cli_error("%s: out of memory", cmd);
        rc = 2;
    } else if (!realpath(path, k->file)) {
        cli_error("%s: --key-file %s: %s", cmd, path, strerror(errno));
        cli_key_clear(k);
        rc = 2;
    }
    if (buf) {
        memset(buf, 0, KEY_MAX + 1);
        free(buf);
    }
    return rc;
}

int cli_key_from_env(const char *cmd, const char *var, struct cli_key *k)
{
    const char *v = getenv(var);
    if (!v || !*v) {
        cli_error("%s: --key-env %s: the environment variable is %s", cmd, var, v ? "empty" : "not set");
        return 2;
    }
    if (set_key(k, v, strlen(v)) < 0) {
        cli_error("%s: out of memory", cmd);
        return 2;
    }
    k->env = var;
    return 0;
}

void cli_key_clear(struct cli_key *k)
{
    if (k->data) {
        volatile unsigned char *p = k->data;
        for (size_t i = 0; i < k->len; i++)
            p[i] = 0;
        free(k->data);
    }
    k->data = NULL;
    k->len = 0;
    k->file[0] = '\0';
    k->env = NULL;
}
