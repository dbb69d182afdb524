/* ublk-qcow2 create / info / check: image tools with qemu-img's options,
 * output and exit codes, so no QEMU is needed to make, inspect or repair an
 * image.  The work is done by the engine (tools/tools.h). */
#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "util/json.h"
#include "cli/cli.h"
#include "cli/opts.h"
#include "io/imagelock.h"
#include "tools/tools.h"


/* qemu-img check's exit codes */
#define CHECK_EXIT_CLEAN 0
#define CHECK_EXIT_FAILED 1
#define CHECK_EXIT_CORRUPT 2
#define CHECK_EXIT_LEAKS 3
#define CHECK_EXIT_UNSUPPORTED 63

/* --output=json|human (qemu-img's spelling of --json). */
static int take_output(const struct cli_cmd *cmd, const struct cli_opt *o, const char *s, int argc,
                       char **argv)
{
    if (strcmp(s, "json") && strcmp(s, "human")) {
        cli_error("%s: --output takes json or human, not '%s'", cmd->name, s);
        return cmd->usage_exit;
    }
    *(bool *)o->dest = !strcmp(s, "json");
    return CLI_GO_ON;
}

/* Take QEMU's lock on the image for the command's duration (the fd is
 * leaked on purpose: the process exits soon).  force: -U, no lock. */
static bool lock_image(const char *cmd, const char *path, bool writable, bool force)
{
    char msg[512];
    if (force)
        return true;
    int fd = image_lock(path, writable, msg, sizeof(msg));
    if (fd == -EBUSY) {
        cli_error("%s: %s (use -U to %s anyway)", cmd, msg, writable ? "refuse" : "read it");
        return false;
    }
    return true;
}

/* ---- create ------------------------------------------------------------------------ */

static void create_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 create [-f qcow2|raw] [-o OPTIONS] [-b BACKING [-F FMT]] [-q] IMAGE [SIZE]\n\n"
        "Create IMAGE (overwriting a file that is there, as qemu-img create does) with\n"
        "qemu-img create's options and defaults.  SIZE takes k, M, G, T, P, E suffixes\n"
        "(powers of 1024); it may be left out when a backing file gives it.\n\n"
        "Options:\n"
        "  -f, --format FMT        qcow2 (default) or raw\n"
        "  -o OPT=VALUE[,...]      format options (may be repeated; -o help lists them):\n"
        "      size=SIZE                   virtual size\n"
        "      compat=1.1|0.10             qcow2 version 3 (default) or 2 (also v3, v2)\n"
        "      cluster_size=SIZE           512 .. 2M, a power of two (default 64k)\n"
        "      backing_file=NAME           backing file (relative: to IMAGE's directory)\n"
        "      backing_fmt=qcow2|raw       its format (required with a backing file)\n"
        "      extended_l2=on|off          subclusters (cluster_size >= 16k; default off)\n"
        "      compression_type=zlib|zstd  (default zlib; zstd needs compat=1.1)\n"
        "      refcount_bits=N             1, 2, 4, 8, 16 (default), 32 or 64\n"
        "      lazy_refcounts=on|off       (default off)\n"
        "      preallocation=off|metadata|falloc|full   (raw: off, falloc, full)\n"
        "  -b, --backing FILE      same as -o backing_file=FILE\n"
        "  -F, --backing-format F  same as -o backing_fmt=F\n"
        "  -q, --quiet             do not print the 'Formatting' line\n"
        "  -h, --help              this help\n");
}

static const char *const qcow2_option_names[] = {
    "size", "compat", "cluster_size", "backing_file", "backing_fmt", "extended_l2",
    "compression_type", "refcount_bits", "lazy_refcounts", "preallocation", NULL,
};

static bool parse_bool(const char *s, bool *out)
{
    if (!strcmp(s, "on") || !strcmp(s, "yes") || !strcmp(s, "true"))
        *out = true;
    else if (!strcmp(s, "off") || !strcmp(s, "no") || !strcmp(s, "false"))
        *out = false;
    else
        return false;
    return true;
}

struct create_cli {
    struct create_opts o;
    char *strings[16];      /* option values we own */
    int nstrings;
};

static const char *keep(struct create_cli *c, const char *s, size_t n)
{
    if (c->nstrings == (int)(sizeof(c->strings) / sizeof(c->strings[0])))
        return NULL;
    return c->strings[c->nstrings++] = strndup(s, n);
}

/* One NAME=VALUE of -o (QEMU's spelling; a ",," in a value is a comma). */
static bool create_option(struct create_cli *c, const char *name, const char *v)
{
    struct create_opts *o = &c->o;
    bool raw = o->format == IMG_FMT_RAW;
    if (raw && strcmp(name, "size") && strcmp(name, "preallocation")) {
        cli_error("create: Invalid parameter '%s' (raw images take size and preallocation)", name);
        return false;
    }
    if (!strcmp(name, "size")) {
        int64_t sz = parse_size(v);
        if (sz < 0) {
            cli_error("create: invalid size '%s' (" SIZE_RANGE ")", v);
            return false;
        }
        o->size = (uint64_t)sz;
        o->size_set = true;
    } else if (!strcmp(name, "compat")) {
        if (!strcmp(v, "0.10") || !strcmp(v, "v2"))
            o->version = 2;
        else if (!strcmp(v, "1.1") || !strcmp(v, "v3"))
            o->version = 3;
        else {
            cli_error("create: compat '%s' is not 0.10 or 1.1", v);
            return false;
        }
    } else if (!strcmp(name, "cluster_size")) {
        int64_t sz = parse_size(v);
        if (sz < 0 || sz > UINT32_MAX) {
            cli_error("create: invalid cluster_size '%s'", v);
            return false;
        }
        o->cluster_size = (uint32_t)sz;
    } else if (!strcmp(name, "backing_file")) {
        o->backing_file = v;
    } else if (!strcmp(name, "backing_fmt")) {
        o->backing_fmt = v;
    } else if (!strcmp(name, "extended_l2") || !strcmp(name, "lazy_refcounts")) {
        if (!parse_bool(v, name[0] == 'e' ? &o->extended_l2 : &o->lazy_refcounts)) {
            cli_error("create: %s takes on or off, not '%s'", name, v);
            return false;
        }
    } else if (!strcmp(name, "compression_type")) {
        if (!strcmp(v, "zlib"))
            o->compression = QCOW2_COMP_ZLIB;
        else if (!strcmp(v, "zstd"))
            o->compression = QCOW2_COMP_ZSTD;
        else {
            cli_error("create: compression_type '%s' is not zlib or zstd", v);
            return false;
        }
    } else if (!strcmp(name, "refcount_bits")) {
        char *end;
        unsigned long n = strtoul(v, &end, 10);
        if (!*v || *end || n > 64) {
            cli_error("create: invalid refcount_bits '%s'", v);
            return false;
        }
        o->refcount_bits = (uint32_t)n;
    } else if (!strcmp(name, "preallocation")) {
        enum prealloc_mode m;
        for (m = PREALLOC_OFF; m <= PREALLOC_FULL; m++)
            if (!strcmp(v, prealloc_name(m)))
                break;
        if (m > PREALLOC_FULL) {
            cli_error("create: preallocation '%s' is not off, metadata, falloc or full", v);
            return false;
        }
        o->prealloc = m;
    } else {
        cli_error("create: Invalid parameter '%s' (-o help lists them)", name);
        return false;
    }
    return true;
}

static bool create_options(struct create_cli *c, const char *list)
{
    const char *p = list;
    while (*p) {
        const char *eq = strchr(p, '=');
        const char *comma = strchr(p, ',');
        if (!eq || (comma && comma < eq)) {
            cli_error("create: option '%.*s' needs a value (NAME=VALUE)",
                      (int)(comma ? comma - p : (long)strlen(p)), p);
            return false;
        }
        char value[4096];
        size_t n = 0;
        const char *v = eq + 1;
        for (; *v && n + 1 < sizeof(value); v++) {
            if (*v == ',') {
                if (v[1] != ',')
                    break;
                v++;    /* ",," is a literal comma */
            }
            value[n++] = *v;
        }
        value[n] = '\0';
        const char *name = keep(c, p, (size_t)(eq - p)), *val = keep(c, value, n);
        if (!name || !val || !create_option(c, name, val))
            return false;
        p = *v == ',' ? v + 1 : v;
    }
    return true;
}

/* convert's -o: the same options as create's, into o (the values stay
 * allocated until exit). */
bool cli_create_options(struct create_opts *o, const char *list)
{
    static struct create_cli c;
    c.o = *o;
    bool ok = create_options(&c, list);
    *o = c.o;
    return ok;
}

static void print_formatting(const char *path, const struct create_opts *o, uint64_t size)
{
    printf("Formatting '%s', fmt=%s", path, o->format == IMG_FMT_RAW ? "raw" : "qcow2");
    if (o->format == IMG_FMT_QCOW2)
        printf(" cluster_size=%u extended_l2=%s", o->cluster_size, o->extended_l2 ? "on" : "off");
    if (o->prealloc != PREALLOC_OFF || o->format == IMG_FMT_RAW)
        printf(" preallocation=%s", prealloc_name(o->prealloc));
    if (o->format == IMG_FMT_QCOW2)
        printf(" compression_type=%s", o->compression == QCOW2_COMP_ZSTD ? "zstd" : "zlib");
    printf(" size=%llu", (unsigned long long)size);
    if (o->format == IMG_FMT_QCOW2) {
        if (o->backing_file)
            printf(" backing_file=%s", o->backing_file);
        if (o->backing_fmt)
            printf(" backing_fmt=%s", o->backing_fmt);
        printf(" compat=%s lazy_refcounts=%s refcount_bits=%u", o->version == 2 ? "0.10" : "1.1",
               o->lazy_refcounts ? "on" : "off", o->refcount_bits);
    }
    printf("\n");
    fflush(stdout);
}

/* -o LIST, kept in the order given: the lists are read once -f is known. */
int cli_take_option_list(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg,
                         int argc, char **argv)
{
    struct option_lists *ol = o->dest;
    if (!strcmp(arg, "help") || !strcmp(arg, "?")) {
        printf("Supported options (qcow2; raw takes size and preallocation):\n");
        for (int i = 0; qcow2_option_names[i]; i++)
            printf("  %s\n", qcow2_option_names[i]);
        return 0;
    }
    if (ol->n == (int)(sizeof(ol->list) / sizeof(ol->list[0]))) {
        cli_error("%s: too many -o options", cmd->name);
        return 2;
    }
    ol->list[ol->n++] = arg;
    return CLI_GO_ON;
}

int cmd_create(int argc, char **argv)
{
    struct create_cli c = { .nstrings = 0 };
    create_opts_init(&c.o);
    struct option_lists lists = { .n = 0 };
    bool quiet = false;
    int ret = 1;
    const struct cli_opt opts[] = {
        { "format", 'f', CLI_NEW_FORMAT, .dest = &c.o.format },
        { "options", 'o', CLI_CALL, .dest = &lists, .take = cli_take_option_list },
        { "backing", 'b', CLI_STRING, .dest = &c.o.backing_file },
        { "backing-format", 'F', CLI_STRING, .dest = &c.o.backing_fmt },
        { "quiet", 'q', CLI_FLAG, .dest = &quiet },
        { 0 },
    };
    const struct cli_cmd cmd = { "create", create_usage, opts, .usage_exit = 2 };
    /* "create IMAGE -5G": getopt would take -5 for an option; it is a size. */
    for (int i = 1; i < argc && strcmp(argv[i], "--"); i++)
        if (argv[i][0] == '-' && isdigit((unsigned char)argv[i][1])) {
            cli_error("create: invalid size '%s': a size cannot be negative (" SIZE_RANGE ")", argv[i]);
            return 2;
        }
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    int nargs = argc - optind;
    if (nargs < 1 || nargs > 2) {
        cli_error(nargs < 1 ? "create: no image given" : "create: too many arguments");
        create_usage(stderr);
        return 2;
    }
    const char *path = argv[optind];
    /* -o after -f (options depend on the format), in the order given. */
    for (int i = 0; i < lists.n; i++)
        if (!create_options(&c, lists.list[i]))
            goto out_usage;
    if (nargs == 2) {
        int64_t sz = parse_size(argv[optind + 1]);
        if (sz < 0) {
            cli_error("create: invalid size '%s' (" SIZE_RANGE ")",
                      argv[optind + 1]);
            goto out_usage;
        }
        c.o.size = (uint64_t)sz;
        c.o.size_set = true;
    }
    if (c.o.format == IMG_FMT_RAW && (c.o.backing_file || c.o.backing_fmt)) {
        cli_error("create: raw images cannot have a backing file");
        goto out_usage;
    }
    if (!quiet)
        print_formatting(path, &c.o, c.o.size_set ? (c.o.size + 511) & ~511ull : 0);

    struct progress p;
    progress_start(&p, "Preallocating");
    c.o.progress = progress_update;
    c.o.progress_ctx = &p;
    char err[1024];
    int r = img_create(path, &c.o, err, sizeof(err));
    progress_end(&p);
    if (r < 0)
        cli_error("create: %s: %s", path, err);
    ret = r < 0 ? 1 : 0;
    goto out;
out_usage:
    ret = 2;
out:
    for (int i = 0; i < c.nstrings; i++)
        free(c.strings[i]);
    return ret;
}

/* ---- info ----------------------------------------------------------------------------- */

static void info_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 info [-f auto|qcow2|raw] [--json] [--backing-chain] [-U] IMAGE\n\n"
        "Describe IMAGE as qemu-img info does: format, virtual and disk size, cluster\n"
        "size, backing file and format, snapshots, and the qcow2 details (compat,\n"
        "compression type, lazy refcounts, refcount bits, corrupt, extended L2, bitmaps,\n"
        "dirty flag).\n\n"
        "Options:\n"
        "  -f, --format FMT    auto (default: probed), qcow2 or raw\n"
        "      --json          JSON, with qemu-img info --output=json's field names\n"
        "      --output=json   the same\n"
        "      --backing-chain every image of the backing chain (JSON: an array)\n"
        "  -U, --force-share   read an image another process is writing\n"
        "  -h, --help          this help\n");
}

/* A size as qemu-img prints it: three significant digits, binary units. */
static void human_size(char *buf, size_t len, uint64_t v)
{
    static const char *const units[] = { "", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei" };
    int i = 0;
    /* The unit that keeps the number below 1000. */
    while (i < 6 && (double)v >= 1000.0 * (double)(1ull << (10 * i)))
        i++;
    snprintf(buf, len, "%0.3g %sB", (double)v / (double)(1ull << (10 * i)), units[i]);
}

static void print_snapshots_human(const struct image_info *in)
{
    printf("Snapshot list:\n%-10s%-17s%8s%20s%13s%11s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT");
    for (uint32_t i = 0; i < in->nb_snapshots; i++) {
        const struct snapshot_info *s = &in->snapshots[i];
        char date[64], clock[64], vm[32], icount[32] = "";
        time_t t = s->date_sec;
        struct tm tm;
        localtime_r(&t, &tm);
        strftime(date, sizeof(date), "%Y-%m-%d %H:%M:%S", &tm);
        uint64_t secs = s->vm_clock_nsec / 1000000000ull;
        snprintf(clock, sizeof(clock), "%02llu:%02llu:%02llu.%03llu", (unsigned long long)(secs / 3600),
                 (unsigned long long)((secs / 60) % 60), (unsigned long long)(secs % 60),
                 (unsigned long long)((s->vm_clock_nsec / 1000000) % 1000));
        human_size(vm, sizeof(vm), s->vm_state_size);
        if (s->has_icount)
            snprintf(icount, sizeof(icount), "%llu", (unsigned long long)s->icount);
        printf("%-9s %-16s %8s%20s%13s%11s\n", s->id, s->name, vm, date, clock, icount);
    }
}

static void json_key_str(const char *indent, const char *key, const char *v, bool comma)
{
    printf("%s\"%s\": ", indent, key);
    json_put_string(stdout, v);
    printf("%s\n", comma ? "," : "");
}

/* QEMU's names for a LUKS header's cipher: "aes-256", mode "xts", IV
 * generator "plain64" (and its hash for "essiv:sha256"). */
struct luks_names { char cipher_alg[48], mode[33], ivgen[33], ivgen_hash[33]; };

static void luks_names(const struct qcow2_luks_header *l, struct luks_names *n)
{
    snprintf(n->mode, sizeof(n->mode), "%s", l->mode);
    n->ivgen[0] = n->ivgen_hash[0] = '\0';
    char *dash = strchr(n->mode, '-');
    if (dash) {
        *dash = '\0';
        snprintf(n->ivgen, sizeof(n->ivgen), "%s", dash + 1);
        char *colon = strchr(n->ivgen, ':');
        if (colon) {
            *colon = '\0';
            snprintf(n->ivgen_hash, sizeof(n->ivgen_hash), "%s", colon + 1);
        }
    }
    /* XTS keys hold two cipher keys. */
    unsigned bits = l->key_bytes * 8 / (strcmp(n->mode, "xts") ? 1 : 2);
    snprintf(n->cipher_alg, sizeof(n->cipher_alg), "%s-%u", l->cipher, bits);
}

static void print_luks_human(const struct qcow2_luks_header *l)
{
    struct luks_names n;
    luks_names(l, &n);
    printf("    encrypt:\n        ivgen alg: %s\n", n.ivgen);
    if (n.ivgen_hash[0])
        printf("        ivgen hash alg: %s\n", n.ivgen_hash);
    printf("        hash alg: %s\n        cipher alg: %s\n        uuid: %s\n        format: luks\n"
           "        cipher mode: %s\n        slots:\n", l->hash, n.cipher_alg, l->uuid, n.mode);
    for (int i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        bool on = l->slot[i].active == QCOW2_LUKS_SLOT_ACTIVE;
        printf("            [%d]:\n                active: %s\n", i, on ? "true" : "false");
        if (on)
            printf("                iters: %u\n", l->slot[i].iter);
        printf("                key offset: %llu\n", (unsigned long long)l->slot[i].km_offset * 512);
        if (on)
            printf("                stripes: %u\n", l->slot[i].stripes);
    }
    printf("        payload offset: %llu\n        master key iters: %u\n",
           (unsigned long long)l->payload_offset * 512, l->mk_iter);
}

static void print_luks_json(const struct qcow2_luks_header *l, const char *i3)
{
    struct luks_names n;
    luks_names(l, &n);
    char i4[80], i5[96], i6[112];
    snprintf(i4, sizeof(i4), "%s    ", i3);
    snprintf(i5, sizeof(i5), "%s    ", i4);
    snprintf(i6, sizeof(i6), "%s    ", i5);
    printf("%s\"encrypt\": {\n", i3);
    json_key_str(i4, "ivgen-alg", n.ivgen, true);
    if (n.ivgen_hash[0])
        json_key_str(i4, "ivgen-hash-alg", n.ivgen_hash, true);
    json_key_str(i4, "hash-alg", l->hash, true);
    json_key_str(i4, "cipher-alg", n.cipher_alg, true);
    json_key_str(i4, "uuid", l->uuid, true);
    printf("%s\"format\": \"luks\",\n", i4);
    json_key_str(i4, "cipher-mode", n.mode, true);
    printf("%s\"slots\": [\n", i4);
    for (int i = 0; i < QCOW2_LUKS_SLOTS; i++) {
        bool on = l->slot[i].active == QCOW2_LUKS_SLOT_ACTIVE;
        printf("%s{\n%s\"active\": %s,\n", i5, i6, on ? "true" : "false");
        if (on)
            printf("%s\"iters\": %u,\n", i6, l->slot[i].iter);
        printf("%s\"key-offset\": %llu%s\n", i6, (unsigned long long)l->slot[i].km_offset * 512, on ? "," : "");
        if (on)
            printf("%s\"stripes\": %u\n", i6, l->slot[i].stripes);
        printf("%s}%s\n", i5, i + 1 < QCOW2_LUKS_SLOTS ? "," : "");
    }
    printf("%s],\n%s\"payload-offset\": %llu,\n%s\"master-key-iters\": %u\n%s},\n", i4, i4,
           (unsigned long long)l->payload_offset * 512, i4, l->mk_iter, i3);
}

static void print_info_human(const struct image_info *in)
{
    char a[32], b[32];
    human_size(a, sizeof(a), in->virtual_size);
    human_size(b, sizeof(b), in->actual_size);
    printf("image: %s\nfile format: %s\nvirtual size: %s (%llu bytes)\ndisk size: %s\n", in->filename,
           in->format == IMG_FMT_QCOW2 ? "qcow2" : "raw", a, (unsigned long long)in->virtual_size, b);
    if (in->format != IMG_FMT_QCOW2)
        return;
    if (in->encrypted)
        printf("encrypted: yes\n");
    printf("cluster_size: %u\n", in->cluster_size);
    if (in->dirty)
        printf("cleanly shut down: no\n");
    if (in->backing_file) {
        printf("backing file: %s", in->backing_file);
        if (strcmp(in->backing_file, in->full_backing_file))
            printf(" (actual path: %s)", in->full_backing_file);
        printf("\n");
        if (in->backing_format)
            printf("backing file format: %s\n", in->backing_format);
    }
    if (in->nb_snapshots)
        print_snapshots_human(in);
    printf("Format specific information:\n    compat: %s\n    compression type: %s\n",
           in->version >= 3 ? "1.1" : "0.10", in->compression == QCOW2_COMP_ZSTD ? "zstd" : "zlib");
    if (in->version >= 3)
        printf("    lazy refcounts: %s\n", in->lazy_refcounts ? "true" : "false");
    if (in->has_bitmaps) {
        printf("    bitmaps:\n");
        for (uint32_t i = 0; i < in->nb_bitmaps; i++) {
            const struct bitmap_info *bm = &in->bitmaps[i];
            int k = 0;
            printf("        [%u]:\n            flags:\n", i);
            if (bm->in_use)
                printf("                [%d]: in-use\n", k++);
            if (bm->autoload)
                printf("                [%d]: auto\n", k++);
            printf("            name: %s\n            granularity: %u\n", bm->name, bm->granularity);
        }
    }
    printf("    refcount bits: %u\n", in->refcount_bits);
    /* qemu-img's order: data file, encryption, then whether the data file is raw. */
    if (in->data_file)
        printf("    data file: %s\n", in->data_file);
    if (in->luks)
        print_luks_human(in->luks);
    if (in->data_file)
        printf("    data file raw: %s\n", in->data_file_raw ? "true" : "false");
    if (in->version >= 3)
        printf("    corrupt: %s\n    extended l2: %s\n", in->corrupt ? "true" : "false",
               in->extended_l2 ? "true" : "false");
}

static void print_info_json(const struct image_info *in, const char *indent)
{
    char i1[64], i2[64], i3[64], i4[64];
    snprintf(i1, sizeof(i1), "%s    ", indent);
    snprintf(i2, sizeof(i2), "%s        ", indent);
    snprintf(i3, sizeof(i3), "%s            ", indent);
    snprintf(i4, sizeof(i4), "%s                ", indent);
    printf("%s{\n", indent);
    if (in->backing_format)
        json_key_str(i1, "backing-filename-format", in->backing_format, true);
    if (in->nb_snapshots) {
        printf("%s\"snapshots\": [\n", i1);
        for (uint32_t k = 0; k < in->nb_snapshots; k++) {
            const struct snapshot_info *s = &in->snapshots[k];
            printf("%s{\n", i2);
            if (s->has_icount)
                printf("%s\"icount\": %llu,\n", i3, (unsigned long long)s->icount);
            printf("%s\"vm-clock-nsec\": %llu,\n", i3, (unsigned long long)(s->vm_clock_nsec % 1000000000ull));
            json_key_str(i3, "name", s->name, true);
            printf("%s\"date-sec\": %u,\n%s\"date-nsec\": %u,\n", i3, s->date_sec, i3, s->date_nsec);
            printf("%s\"vm-clock-sec\": %llu,\n", i3, (unsigned long long)(s->vm_clock_nsec / 1000000000ull));
            json_key_str(i3, "id", s->id, true);
            printf("%s\"vm-state-size\": %llu\n", i3, (unsigned long long)s->vm_state_size);
            printf("%s}%s\n", i2, k + 1 < in->nb_snapshots ? "," : "");
        }
        printf("%s],\n", i1);
    }
    printf("%s\"virtual-size\": %llu,\n", i1, (unsigned long long)in->virtual_size);
    json_key_str(i1, "filename", in->filename, true);
    if (in->format == IMG_FMT_QCOW2)
        printf("%s\"cluster-size\": %u,\n", i1, in->cluster_size);
    printf("%s\"format\": \"%s\",\n", i1, in->format == IMG_FMT_QCOW2 ? "qcow2" : "raw");
    printf("%s\"actual-size\": %llu,\n", i1, (unsigned long long)in->actual_size);
    if (in->format == IMG_FMT_QCOW2) {
        bool v3 = in->version >= 3;
        printf("%s\"format-specific\": {\n%s\"type\": \"qcow2\",\n%s\"data\": {\n", i1, i2, i2);
        printf("%s\"compat\": \"%s\",\n", i3, v3 ? "1.1" : "0.10");
        printf("%s\"compression-type\": \"%s\",\n", i3, in->compression == QCOW2_COMP_ZSTD ? "zstd" : "zlib");
        if (v3)
            printf("%s\"lazy-refcounts\": %s,\n", i3, in->lazy_refcounts ? "true" : "false");
        if (in->has_bitmaps) {
            printf("%s\"bitmaps\": [\n", i3);
            for (uint32_t k = 0; k < in->nb_bitmaps; k++) {
                const struct bitmap_info *bm = &in->bitmaps[k];
                printf("%s{\n%s    \"flags\": [\n", i4, i4);
                if (bm->in_use)
                    printf("%s        \"in-use\"%s\n", i4, bm->autoload ? "," : "");
                if (bm->autoload)
                    printf("%s        \"auto\"\n", i4);
                printf("%s    ],\n%s    \"name\": ", i4, i4);
                json_put_string(stdout, bm->name);
                printf(",\n%s    \"granularity\": %u\n%s}%s\n", i4, bm->granularity, i4,
                       k + 1 < in->nb_bitmaps ? "," : "");
            }
            printf("%s],\n", i3);
        }
        printf("%s\"refcount-bits\": %u%s\n", i3, in->refcount_bits, v3 ? "," : "");
        if (in->data_file)
            json_key_str(i3, "data-file", in->data_file, true);
        if (in->luks)
            print_luks_json(in->luks, i3);
        if (in->data_file)
            printf("%s\"data-file-raw\": %s,\n", i3, in->data_file_raw ? "true" : "false");
        if (v3)
            printf("%s\"corrupt\": %s,\n%s\"extended-l2\": %s\n", i3, in->corrupt ? "true" : "false", i3,
                   in->extended_l2 ? "true" : "false");
        printf("%s}\n%s},\n", i2, i1);
    }
    /* qemu-img's order: "encrypted" between the two backing names. */
    if (in->backing_file)
        json_key_str(i1, "full-backing-filename", in->full_backing_file, true);
    if (in->encrypted)
        printf("%s\"encrypted\": true,\n", i1);
    if (in->backing_file)
        json_key_str(i1, "backing-filename", in->backing_file, true);
    printf("%s\"dirty-flag\": %s\n%s}", i1, in->dirty ? "true" : "false", indent);
}

int cmd_info(int argc, char **argv)
{
    enum img_format fmt = IMG_FMT_AUTO;
    bool json = false, chain = false, force = false;
    const struct cli_opt opts[] = {
        { "format", 'f', CLI_FORMAT, .dest = &fmt, .bad = "unknown format '%s' (auto, qcow2 or raw)" },
        { "json", 0, CLI_FLAG, .dest = &json },
        { "output", 0, CLI_CALL, .dest = &json, .take = take_output },
        { "backing-chain", 0, CLI_FLAG, .dest = &chain },
        { "force-share", 'U', CLI_FLAG, .dest = &force },
        { 0 },
    };
    const struct cli_cmd cmd = { "info", info_usage, opts, .usage_exit = 2,
                                 .operands = CLI_OPERAND_IMAGE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    const char *path = argv[optind];
    if (!lock_image("info", path, false, force))
        return 1;
    struct image_info *info;
    char err[1024];
    if (img_info(path, fmt, chain, &info, err, sizeof(err)) < 0) {
        cli_error("info: %s", err);
        return 1;
    }
    if (json && chain)
        printf("[\n");
    for (struct image_info *in = info; in; in = in->backing) {
        if (json) {
            print_info_json(in, chain ? "    " : "");
            printf("%s\n", chain && in->backing ? "," : "");
        } else {
            if (in != info)
                printf("\n");
            print_info_human(in);
        }
    }
    if (json && chain)
        printf("]\n");
    img_info_free(info);
    return 0;
}

/* ---- check ----------------------------------------------------------------------------- */

static void check_usage(FILE *out)
{
    fprintf(out,
        "Usage: ublk-qcow2 check [-r leaks|all] [--json] [-f auto|qcow2|raw] [-q] [-U] IMAGE\n\n"
        "Check a qcow2 image's metadata as qemu-img check does, and repair it with -r.\n"
        "Details of each problem go to stderr, the summary to stdout.\n\n"
        "Options:\n"
        "  -r, --repair leaks|all  repair leaked clusters only, or all that can be repaired\n"
        "                          (rebuilding the refcount structures if needed)\n"
        "      --json              the summary as JSON (qemu-img check --output=json's fields)\n"
        "      --output=json       the same\n"
        "  -f, --format FMT        auto (default: probed), qcow2 or raw\n"
        "  -q, --quiet             no summary\n"
        "  -U, --force-share       check an image another process is writing (not with -r)\n"
        "  -h, --help              this help\n\n"
        "Exit status (as qemu-img check): 0 no problems, 2 corruptions, 3 leaked clusters\n"
        "only, 1 the check could not complete, 63 the format has no checks (raw).\n");
}

static void print_line(void *ctx, const char *line)
{
    struct progress *p = ctx;
    if (p && p->on && p->shown >= 0)
        fputs("\r\033[K", stderr);  /* the bar is redrawn on the next update */
    if (p)
        p->shown = -1;
    fprintf(stderr, "%s\n", line);
}

static void print_check_human(const struct check_result *r)
{
    if (!r->corruptions && !r->leaks && !r->check_errors) {
        printf("No errors were found on the image.\n");
    } else {
        if (r->corruptions)
            printf("\n%llu errors were found on the image.\n"
                   "Data may be corrupted, or further writes to the image may corrupt it.\n",
                   (unsigned long long)r->corruptions);
        if (r->leaks)
            printf("\n%llu leaked clusters were found on the image.\n"
                   "This means waste of disk space, but no harm to data.\n", (unsigned long long)r->leaks);
        if (r->check_errors)
            printf("\n%llu internal errors have occurred during the check.\n",
                   (unsigned long long)r->check_errors);
    }
    if (r->total_clusters && r->allocated_clusters)
        printf("%llu/%llu = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
               (unsigned long long)r->allocated_clusters, (unsigned long long)r->total_clusters,
               r->allocated_clusters * 100.0 / r->total_clusters,
               r->fragmented_clusters * 100.0 / r->allocated_clusters,
               r->compressed_clusters * 100.0 / r->allocated_clusters);
    if (r->image_end_offset)
        printf("Image end offset: %llu\n", (unsigned long long)r->image_end_offset);
}

static void print_check_json(const struct check_result *r, const char *path)
{
    printf("{\n");
#define FIELD(name, v) if (v) printf("    \"%s\": %llu,\n", name, (unsigned long long)(v))
    FIELD("image-end-offset", r->image_end_offset);
    FIELD("total-clusters", r->total_clusters);
    FIELD("corruptions", r->corruptions);
    FIELD("corruptions-fixed", r->corruptions_fixed);
    printf("    \"check-errors\": %llu,\n", (unsigned long long)r->check_errors);
    FIELD("leaks", r->leaks);
    FIELD("leaks-fixed", r->leaks_fixed);
    FIELD("allocated-clusters", r->allocated_clusters);
    FIELD("fragmented-clusters", r->fragmented_clusters);
    FIELD("compressed-clusters", r->compressed_clusters);
#undef FIELD
    printf("    \"filename\": ");
    json_put_string(stdout, path);
    printf(",\n    \"format\": \"qcow2\"\n}\n");
}

/* -r leaks|all */
static int take_repair(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                       char **argv)
{
    if (!strcmp(arg, "leaks")) {
        *(unsigned *)o->dest = CHECK_FIX_LEAKS;
    } else if (!strcmp(arg, "all")) {
        *(unsigned *)o->dest = CHECK_FIX_LEAKS | CHECK_FIX_ERRORS;
    } else {
        cli_error("check: -r takes leaks or all, not '%s'", arg);
        return cmd->usage_exit;
    }
    return CLI_GO_ON;
}

int cmd_check(int argc, char **argv)
{
    enum img_format fmt = IMG_FMT_AUTO;
    bool json = false, quiet = false, force = false;
    unsigned fix = 0;
    const struct cli_opt opts[] = {
        { "repair", 'r', CLI_CALL, .dest = &fix, .take = take_repair },
        { "json", 0, CLI_FLAG, .dest = &json },
        { "output", 0, CLI_CALL, .dest = &json, .take = take_output },
        { "format", 'f', CLI_FORMAT, .dest = &fmt, .bad = "unknown format '%s' (auto, qcow2 or raw)" },
        { "quiet", 'q', CLI_FLAG, .dest = &quiet },
        { "force-share", 'U', CLI_FLAG, .dest = &force },
        { 0 },
    };
    /* qemu-img check exits 1 on a usage error too. */
    const struct cli_cmd cmd = { "check", check_usage, opts, .usage_exit = CHECK_EXIT_FAILED,
                                 .operands = CLI_OPERAND_IMAGE };
    int rc = cli_parse(&cmd, argc, argv);
    if (rc != CLI_GO_ON)
        return rc;
    const char *path = argv[optind];
    if (force && fix) {
        cli_error("check: -U cannot be used with -r (a repair needs the image to itself)");
        return 1;
    }
    if (!lock_image("check", path, fix != 0, force))
        return CHECK_EXIT_FAILED;

    struct progress p;
    progress_start(&p, fix ? "Repairing" : "Checking");
    struct check_opts o = { .fix = fix, .progress = progress_update, .progress_ctx = &p,
                            .message = print_line, .message_ctx = &p };
    struct check_result res;
    char err[1024];
    int r = img_check(path, fmt, &o, &res, err, sizeof(err));
    progress_end(&p);
    if (r == -ENOTSUP) {
        cli_error("check: %s: %s", path, err);
        return CHECK_EXIT_UNSUPPORTED;
    }
    if (r == 0 && (res.corruptions_fixed || res.leaks_fixed)) {
        uint64_t cf = res.corruptions_fixed, lf = res.leaks_fixed;
        if (!json && !quiet)
            printf("The following inconsistencies were found and repaired:\n\n"
                   "    %llu leaked clusters\n    %llu corruptions\n\n"
                   "Double checking the fixed image now...\n", (unsigned long long)lf, (unsigned long long)cf);
        fflush(stdout);
        o.fix = 0;
        progress_start(&p, "Checking");
        r = img_check(path, fmt, &o, &res, err, sizeof(err));
        progress_end(&p);
        res.corruptions_fixed = cf;
        res.leaks_fixed = lf;
    }
    if (r == 0 && !quiet) {
        if (json)
            print_check_json(&res, path);
        else
            print_check_human(&res);
    }
    if (r < 0 || res.check_errors) {
        if (r < 0)
            cli_error("check: %s: Check failed: %s", path, err);
        else
            cli_error("check: %s: Check failed", path);
        return CHECK_EXIT_FAILED;
    }
    return res.corruptions ? CHECK_EXIT_CORRUPT : res.leaks ? CHECK_EXIT_LEAKS : CHECK_EXIT_CLEAN;
}
