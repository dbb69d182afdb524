/* ublk-qcow2: entry point and subcommand dispatch. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "io/log.h"

#define UQ_VERSION "0.1.0"

struct subcommand {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
};

static const struct subcommand subcommands[] = {
    { "nbd",   cmd_nbd,   "serve an image over NBD (unix socket or TCP)" },
    { "bench", cmd_bench, "drive the engine directly and report IOPS and MiB/s" },
    { "add",   cmd_add,   "serve an image as a ublk block device /dev/ublkbN" },
    { "del",   cmd_del,   "stop and remove ublk devices" },
    { "list",  cmd_list,  "show ublk devices, their state and images" },
    { "recover", cmd_recover, "start a new daemon for a --recovery ublk device whose daemon died" },
    { "restart", cmd_restart, "replace a live ublk device's daemon (upgrade) without failing I/O" },
    { "stats", cmd_stats, "show a ublk device's counters (requests, bytes, errors, cache)" },
    { "create", cmd_create, "create a qcow2 or raw image (qemu-img create's options)" },
    { "info",  cmd_info,  "describe an image and its backing chain (as qemu-img info)" },
    { "check", cmd_check, "check an image's metadata and repair it (as qemu-img check)" },
    { "convert", cmd_convert, "copy an image to qcow2 (compressed or not) or raw (as qemu-img convert)" },
    { "snapshot", cmd_snapshot, "list, create, delete or apply internal qcow2 snapshots" },
    { "resize", cmd_resize, "change the virtual size of an image (or grow a live device)" },
};

bool cli_parse_uint(const char *s, unsigned long min, unsigned long max, unsigned long *out)
{
    if (!s || !*s)
        return false;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9')
            return false;
    errno = 0;
    unsigned long v = strtoul(s, NULL, 10);
    if (errno || v < min || v > max)
        return false;
    *out = v;
    return true;
}

void cli_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    uq_verror(fmt, ap);
    va_end(ap);
}

static void usage(FILE *out)
{
    fprintf(out, "Usage: ublk-qcow2 COMMAND [OPTIONS] ...\n\n"
                 "Serve qcow2 (and raw) disk images as block devices.\n\nCommands:\n");
    for (size_t i = 0; i < sizeof(subcommands) / sizeof(subcommands[0]); i++)
        fprintf(out, "  %-9s %s\n", subcommands[i].name, subcommands[i].summary);
    fprintf(out, "\nRun 'ublk-qcow2 COMMAND --help' for a command's options.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version") || !strcmp(argv[1], "-V")) {
        printf("ublk-qcow2 %s\n", UQ_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof(subcommands) / sizeof(subcommands[0]); i++)
        if (!strcmp(argv[1], subcommands[i].name))
            return subcommands[i].run(argc - 1, argv + 1);
    cli_error("unknown command '%s' (try 'ublk-qcow2 --help')", argv[1]);
    return 2;
}
