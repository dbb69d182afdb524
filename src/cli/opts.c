/* cli_parse: one getopt_long loop for every subcommand (see opts.h). */
#include <getopt.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cli/cli.h"
#include "cli/opts.h"
#include "img/image.h"
#include "io/log.h"

#define MAX_OPTS 32

static int arg_kind(const struct cli_opt *o)
{
    if (o->optional_arg)
        return optional_argument;
    return o->type == CLI_FLAG || o->type == CLI_VERBOSE ? no_argument : required_argument;
}

/* getopt's value for entry i: its letter, else one above any char. */
static int opt_val(const struct cli_opt *o, size_t i)
{
    return o->letter ? o->letter : 256 + (int)i;
}

/* The short option string and the long option table of cmd's entries. */
static void build_getopt(const struct cli_cmd *cmd, char *shorts, struct option *longs)
{
    size_t s = 0, l = 0;
    if (cmd->options_first)
        shorts[s++] = '+';
    if (cmd->own_errors)
        shorts[s++] = ':';
    for (size_t i = 0; cmd->opts[i].name || cmd->opts[i].letter; i++) {
        const struct cli_opt *o = &cmd->opts[i];
        int has = arg_kind(o);
        if (o->letter && !memchr(shorts, o->letter, s)) {  /* an alias shares its letter */
            shorts[s++] = (char)o->letter;
            if (has != no_argument)
                shorts[s++] = ':';
            if (has == optional_argument)
                shorts[s++] = ':';
        }
        if (o->name)
            longs[l++] = (struct option){ o->name, has, NULL, opt_val(o, i) };
    }
    shorts[s++] = 'h';
    shorts[s] = '\0';
    longs[l++] = (struct option){ "help", no_argument, NULL, 'h' };
    longs[l] = (struct option){ NULL, 0, NULL, 0 };
}

static const struct cli_opt *find_opt(const struct cli_cmd *cmd, int val)
{
    for (size_t i = 0; cmd->opts[i].name || cmd->opts[i].letter; i++)
        if (opt_val(&cmd->opts[i], i) == val)
            return &cmd->opts[i];
    return NULL;
}

static int bad_arg(const struct cli_cmd *cmd, const struct cli_opt *o, const char *dflt, const char *arg)
{
    char msg[512];
    snprintf(msg, sizeof(msg), o->bad ? o->bad : dflt, arg, o->max);
    cli_error("%s: %s", cmd->name, msg);
    return cmd->usage_exit;
}

static bool parse_format(const char *s, bool allow_auto, enum img_format *out)
{
    if (allow_auto && !strcmp(s, "auto"))
        *out = IMG_FMT_AUTO;
    else if (!strcmp(s, "raw"))
        *out = IMG_FMT_RAW;
    else if (!strcmp(s, "qcow2"))
        *out = IMG_FMT_QCOW2;
    else
        return false;
    return true;
}

/* Store one option's argument where its entry says. */
static int take_opt(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg,
                    int argc, char **argv)
{
    if (o->seen)
        *o->seen = true;
    switch (o->type) {
    case CLI_FLAG:
        *(bool *)o->dest = true;
        return CLI_GO_ON;
    case CLI_STRING:
        *(const char **)o->dest = arg;
        return CLI_GO_ON;
    case CLI_UINT: {
        unsigned long v;
        if (!cli_parse_uint(arg, o->min, o->max, &v))
            return bad_arg(cmd, o, "invalid value '%s'", arg);
        *(unsigned *)o->dest = (unsigned)v;
        return CLI_GO_ON;
    }
    case CLI_SIZE: {
        int64_t v = parse_size(arg);
        if (v < (int64_t)o->min)
            return bad_arg(cmd, o, "invalid size '%s' (" SIZE_RANGE ")", arg);
        *(uint64_t *)o->dest = (uint64_t)v;
        return CLI_GO_ON;
    }
    case CLI_FORMAT:
    case CLI_NEW_FORMAT:
        if (!parse_format(arg, o->type == CLI_FORMAT, o->dest))
            return bad_arg(cmd, o, o->type == CLI_FORMAT ? "unknown format '%s' (auto, raw or qcow2)"
                                                         : "unknown format '%s' (qcow2 or raw)", arg);
        return CLI_GO_ON;
    case CLI_DISCARD:
        if (img_parse_discard(arg, o->dest) < 0)
            return bad_arg(cmd, o, "unknown --discard mode '%s' (ignore or unmap)", arg);
        return CLI_GO_ON;
    case CLI_KEY_FILE:
        return cli_key_from_file(cmd->name, arg, o->dest) ? cmd->usage_exit : CLI_GO_ON;
    case CLI_KEY_ENV:
        return cli_key_from_env(cmd->name, arg, o->dest) ? cmd->usage_exit : CLI_GO_ON;
    case CLI_VERBOSE:
        uq_set_verbosity(uq_verbosity() + 1);
        return CLI_GO_ON;
    case CLI_CALL:
        return o->take(cmd, o, arg, argc, argv);
    }
    return CLI_GO_ON;
}

/* An unknown option or a missing argument: getopt said so already,
 * unless the command words it itself. */
static int bad_option(const struct cli_cmd *cmd, int c, char **argv)
{
    if (!cmd->own_errors) {
        cmd->usage(stderr);
    } else if (c == ':') {
        cli_error("%s: option '%s' needs %s", cmd->name, argv[optind - 1], cmd->missing_arg);
    } else {
        cli_error("%s: unknown option '%s' (try 'ublk-qcow2 %s --help')", cmd->name, argv[optind - 1],
                  cmd->name);
    }
    return cmd->usage_exit;
}

/* The single IMAGE operand, or false after saying what is wrong. */
static bool one_image(const struct cli_cmd *cmd, int argc, char **argv)
{
    if (optind == argc - 1)
        return true;
    if (cmd->own_errors) {
        if (optind >= argc)
            cli_error("%s: missing IMAGE (try 'ublk-qcow2 %s --help')", cmd->name, cmd->name);
        else
            cli_error("%s: unexpected argument '%s'", cmd->name, argv[optind + 1]);
        return false;
    }
    cli_error(optind >= argc ? "%s: no image given" : "%s: more than one image given", cmd->name);
    cmd->usage(stderr);
    return false;
}

/* False after saying so (and the usage) if an operand follows the options. */
static bool no_operands(const struct cli_cmd *cmd, int argc, char **argv)
{
    if (optind == argc)
        return true;
    cli_error("%s: unexpected argument '%s'", cmd->name, argv[optind]);
    cmd->usage(stderr);
    return false;
}

int cli_parse(const struct cli_cmd *cmd, int argc, char **argv)
{
    char shorts[3 * MAX_OPTS + 4];
    struct option longs[MAX_OPTS + 2];
    size_t n = 0;
    while (cmd->opts[n].name || cmd->opts[n].letter)
        n++;
    if (n > MAX_OPTS)
        abort();    /* a table too long for the buffers: a programming error */
    build_getopt(cmd, shorts, longs);

    opterr = !cmd->own_errors;
    optind = 1;
    int c;
    while ((c = getopt_long(argc, argv, shorts, longs, NULL)) != -1) {
        if (c == 'h') {
            cmd->usage(stdout);
            return 0;
        }
        const struct cli_opt *o = c == '?' || c == ':' ? NULL : find_opt(cmd, c);
        if (!o)
            return bad_option(cmd, c, argv);
        int rc = take_opt(cmd, o, optarg, argc, argv);
        if (rc != CLI_GO_ON)
            return rc;
    }
    if (cmd->operands == CLI_OPERANDS_NONE && !no_operands(cmd, argc, argv))
        return 2;
    if (cmd->operands == CLI_OPERAND_IMAGE && !one_image(cmd, argc, argv))
        return cmd->usage_exit;
    return CLI_GO_ON;
}

