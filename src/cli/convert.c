/* ublk-qcow2 convert: qemu-img convert's core options (engine side: tools/convert.c). */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
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

static bool fmt_arg(const char *s, enum img_format *f)
{
    if (!strcmp(s, "qcow2"))
        *f = IMG_FMT_QCOW2;
    else if (!strcmp(s, "raw"))
        *f = IMG_FMT_RAW;
    else {
        cli_error("convert: unknown format '%s' (qcow2 or raw)", s);
        return false;
    }
    return true;
}

int cmd_convert(int argc, char **argv)
{
    static const struct option longopts[] = {
        { "snapshot", required_argument, NULL, 'l' },
        { "force-share", no_argument, NULL, 'U' },
        { "compress-threads", required_argument, NULL, 'T' },
        { "help", no_argument, NULL, 'h' },
        { NULL, 0, NULL, 0 },
    };
    struct convert_opts o;
    convert_opts_init(&o);
    const char *optlists[32], *backing_fmt = NULL;
    int nopt = 0;
    bool progress = false;
    int ch;
    optind = 1;
    while ((ch = getopt_long(argc, argv, "f:l:UO:o:B:F:cnS:m:Wpqh", longopts, NULL)) != -1) {
        switch (ch) {
        case 'f':
            if (!fmt_arg(optarg, &o.src_format))
                return 2;
            break;
        case 'l':
            o.snapshot = optarg;
            break;
        case 'U':
            o.force_share = true;
            break;
        case 'O':
            if (!fmt_arg(optarg, &o.create.format))
                return 2;
            o.format_given = true;
            break;
        case 'o':
            if (nopt == (int)(sizeof(optlists) / sizeof(optlists[0]))) {
                cli_error("convert: too many -o options");
                return 2;
            }
            optlists[nopt++] = optarg;
            break;
        case 'B':
            o.create.backing_file = optarg;
            break;
        case 'F':
            backing_fmt = optarg;
            break;
        case 'c':
            o.compress = true;
            break;
        case 'n':
            o.existing = true;
            break;
        case 'S': {
            int64_t s = parse_size(optarg);
            if (s < 0) {
                cli_error("convert: invalid -S size '%s'", optarg);
                return 2;
            }
            o.min_sparse = (uint64_t)s;
            break;
        }
        case 'm': {
            unsigned long n;
            if (!cli_parse_uint(optarg, 1, 64, &n)) {
                cli_error("convert: -m takes 1 to 64");
                return 2;
            }
            o.parallel = (unsigned)n;
            break;
        }
        case 'W':
            o.unordered = true;
            break;
        case 'T':
            if (!cli_compress_threads("convert", optarg))
                return 2;
            break;
        case 'p':
            progress = true;
            break;
        case 'q':
            progress = false;
            break;
        case 'h':
            convert_usage(stdout);
            return 0;
        default:
            convert_usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 2) {
        cli_error(argc - optind < 2 ? "convert: SOURCE and TARGET needed" : "convert: too many arguments");
        convert_usage(stderr);
        return 2;
    }
    o.src = argv[optind];
    o.dst = argv[optind + 1];
    /* -o after -O (options depend on the format), in the order given. */
    for (int i = 0; i < nopt; i++)
        if (!cli_create_options(&o.create, optlists[i]))
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
    if (o.existing && nopt) {
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
