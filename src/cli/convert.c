/* ublk-qcow2 convert: qemu-img convert's core options (engine side: tools/convert.c). */
#include <stdio.h>
#include <unistd.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "io/workpool.h"
#include "tools/tools.h"

static void convert_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 convert [-f FMT] [-l SNAPSHOT] [-U] [-O qcow2|raw] [-o OPTIONS]\n"
        "                          [-B BACKING [-F FMT]] [-c] [-n] [-S SIZE] [-m N] [-W]\n"
        "                          [--compress-threads N] [-p] [-q] SOURCE TARGET\n\n"
        "Copy SOURCE (raw or qcow2, with its backing chain, or one of its internal\n"
        "snapshots) into TARGET, as qemu-img convert does.  Blocks that would read the\n"
        "same anyway (zeros in a new image, the backing file's data with -B) are not\n"
        "written, so the target stays sparse.\n\n"
        "Options:\n"
        "  -f FMT                  the source's format: qcow2 or raw (default: probed)\n"
        "  -l, --snapshot SNAP     copy internal snapshot SNAP of the source (ID or name,\n"
        "                          or snapshot.id=ID[,snapshot.name=NAME])\n"
        "  -U, --force-share       read a source another process may be writing\n"
        "  -O FMT                  the target's format: raw (default) or qcow2\n"
        "  -o OPT=VALUE[,...]      the target's create options (as create; e.g.\n"
        "                          compression_type=zstd, cluster_size=SIZE)\n"
        "  -B BACKING              the target gets BACKING as its backing file; only what\n"
        "                          differs from it is written\n"
        "  -F FMT                  BACKING's format (default: probed)\n"
        "  -c                      compressed clusters (qcow2; zlib or zstd as the\n"
        "                          target's compression_type says)\n"
        "  -n                      write into TARGET, which exists (do not create it)\n"
        "  -S SIZE                 zero runs of SIZE (default 4k) stay holes; 0: allocate all\n"
        "  -m N                    N copies in flight (default 8)\n"
        "  -W                      allow out-of-order writes\n"
        "  --compress-threads N    threads that compress (default: the CPUs; 0: inline;\n"
        "                          environment UBLK_QCOW2_COMPRESS_THREADS)\n"
        "  -p                      progress bar (on a terminal)\n"
        "  -q                      quiet\n"
        "  -h, --help              this help\n"
        "Refused: writing the source (or a file of its chain), an image in use, or an\n"
        "existing file of another format unless -n and -O say so.\n");
}

bool cli_compress_threads(const char *cmd, const char *arg)
{
    unsigned long n;
    if (!cli_parse_uint(arg, 0, 16, &n)) {
        cli_error("%s: --compress-threads takes 0 to 16, not '%s'", cmd, arg);
        return false;
    }
    wp_set_threads((int)n);
    setenv("UBLK_QCOW2_COMPRESS_THREADS", arg, 1);
    return true;
}

int cli_take_compress_threads(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg,
                              int argc, char **argv)
{
    return cli_compress_threads(cmd->name, arg) ? CLI_GO_ON : 2;
}

/* -f / -O: qcow2 or raw */
static int take_format(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                       char **argv)
{
    enum img_format *f = o->dest;
    if (!strcmp(arg, "qcow2"))
        *f = IMG_FMT_QCOW2;
    else if (!strcmp(arg, "raw"))
        *f = IMG_FMT_RAW;
    else {
        cli_error("convert: unknown format '%s' (qcow2 or raw)", arg);
        return 2;
    }
    return CLI_GO_ON;
}

int cmd_convert(int argc, char **argv)
{
    struct convert_opts o;
    convert_opts_init(&o);
    struct option_lists lists = { .n = 0 };
    const char *backing_fmt = NULL;
    bool progress = false, quiet = false;
    const struct cli_opt opts[] = {
        { NULL, 'f', CLI_CALL, .dest = &o.src_format, .take = take_format },
        { "snapshot", 'l', CLI_STRING, .dest = &o.snapshot },
        { "force-share", 'U', CLI_FLAG, .dest = &o.force_share },
        { NULL, 'O', CLI_CALL, .dest = &o.create.format, .seen = &o.format_given, .take = take_format },
        { NULL, 'o', CLI_CALL, .dest = &lists, .take = cli_take_option_list },
        { NULL, 'B', CLI_STRING, .dest = &o.create.backing_file },
        { NULL, 'F', CLI_STRING, .dest = &backing_fmt },
        { NULL, 'c', CLI_FLAG, .dest = &o.compress },
        { NULL, 'n', CLI_FLAG, .dest = &o.existing },
        { NULL, 'S', CLI_SIZE, .dest = &o.min_sparse, .bad = "invalid -S size '%s' (" SIZE_RANGE ")" },
        { NULL, 'm', CLI_UINT, .dest = &o.parallel, .min = 1, .max = 64, .bad = "invalid -m '%s' (1 to %lu copies in flight)" },
        { NULL, 'W', CLI_FLAG, .dest = &o.unordered },
        CLI_OPT_COMPRESS_THREADS,
        { NULL, 'p', CLI_FLAG, .dest = &progress },
        { NULL, 'q', CLI_FLAG, .dest = &quiet },
        { 0 },
    };
    const struct cli_cmd cmd = { "convert", convert_usage, opts, .usage_exit = 2 };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    if (quiet)
        progress = false;
    wp_set_background(false);   /* compressing is convert's job, not a side task */
    if (argc - optind != 2) {
        cli_error(argc - optind < 2 ? "convert: SOURCE and TARGET needed" : "convert: too many arguments");
        convert_usage(stderr);
        return 2;
    }
    o.src = argv[optind];
    o.dst = argv[optind + 1];
    /* -o after -O (options depend on the format), in the order given. */
    for (int i = 0; i < lists.n; i++)
        if (!cli_create_options(&o.create, lists.list[i]))
            return 2;
    if (backing_fmt)
        o.create.backing_fmt = backing_fmt;
    if (o.create.backing_file && o.create.format != IMG_FMT_QCOW2) {
        cli_error("convert: -B needs -O qcow2");
        return 2;
    }
    if (o.create.backing_file && !o.create.backing_fmt) {
        /* qemu-img probes the backing file's format when -F is missing. */
        struct image_info *info = NULL;
        char err[512];
        char path[4096];
        const char *slash = strrchr(o.dst, '/');
        if (o.create.backing_file[0] != '/' && slash)
            snprintf(path, sizeof(path), "%.*s/%s", (int)(slash - o.dst), o.dst, o.create.backing_file);
        else
            snprintf(path, sizeof(path), "%s", o.create.backing_file);
        if (img_info(path, IMG_FMT_AUTO, false, &info, err, sizeof(err)) < 0) {
            cli_error("convert: backing file: %s", err);
            return 1;
        }
        o.create.backing_fmt = info->format == IMG_FMT_QCOW2 ? "qcow2" : "raw";
        img_info_free(info);
    }
    if (o.existing && lists.n) {
        cli_error("convert: -o cannot be used with -n (the target exists)");
        return 2;
    }
    struct progress p;
    if (progress) {
        progress_start(&p, "Converting");
        o.progress = progress_update;
        o.progress_ctx = &p;
    }
    char err[1024];
    int r = img_convert(&o, err, sizeof(err));
    if (progress)
        progress_end(&p);
    if (r < 0) {
        cli_error("convert: %s", err);
        return 1;
    }
    return 0;
}
