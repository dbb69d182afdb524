/* The option parser every subcommand shares: a command lists its options in
 * a table (names, how the argument is taken, where it goes) and cli_parse
 * runs getopt_long over it, with -h/--help, the usage on a bad option and
 * the exit codes in one place. */
#ifndef UQ_CLI_OPTS_H
#define UQ_CLI_OPTS_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#define CLI_GO_ON (-1)      /* from cli_parse and take: no exit code, carry on */

enum cli_opt_type {
    CLI_FLAG,           /* bool *: set */
    CLI_STRING,         /* const char **: the argument as given */
    CLI_UINT,           /* unsigned *: digits only, within [min, max] */
    CLI_SIZE,           /* uint64_t *: parse_size's SIZE, at least min (0 or 1) */
    CLI_FORMAT,         /* enum img_format *: auto, raw or qcow2 */
    CLI_NEW_FORMAT,     /* enum img_format *: raw or qcow2 (the format of an image to make) */
    CLI_DISCARD,        /* enum img_discard *: ignore or unmap */
    CLI_KEY_FILE,       /* struct cli_key *: --key-file FILE */
    CLI_KEY_ENV,        /* struct cli_key *: --key-env VAR */
    CLI_VERBOSE,        /* no dest: log one level more */
    CLI_CALL,           /* the command's own take() */
};

struct cli_cmd;

struct cli_opt {
    const char *name;           /* long name; NULL: short only */
    int letter;                 /* short option; 0: long only */
    enum cli_opt_type type;
    void *dest;
    bool *seen;                 /* if set: made true when the option is given */
    /* An invalid argument's message after "CMD: ", printf-style with the
     * argument and max; NULL: the type's own (CLI_UINT and CLI_SIZE need one). */
    const char *bad;
    unsigned long min, max;     /* CLI_UINT: the range; CLI_SIZE: min only */
    bool optional_arg;          /* CLI_CALL: the argument may be left out (arg NULL) */
    /* CLI_CALL: CLI_GO_ON, or an exit code after saying why.  argc/argv
     * for an option that takes a detached optional argument itself. */
    int (*take)(const struct cli_cmd *cmd, const struct cli_opt *o, const char *arg, int argc,
                char **argv);
};

/* -n, --id ID: a ublk device (uint32_t *id; *given set when given). */
#define CLI_OPT_ID(id, given) \
    { "id", 'n', CLI_UINT, .dest = (id), .seen = (given), .bad = "invalid device id '%s'", .max = UINT32_MAX - 1 }

struct cli_cmd {
    const char *name;           /* "add": messages start "add: " */
    void (*usage)(FILE *out);
    const struct cli_opt *opts; /* ends with an entry without name and letter; -h/--help is implicit */
    int usage_exit;             /* exit code of a bad option or argument (check: 1, as qemu-img) */
    /* Say what is wrong with an option in our words instead of getopt's,
     * without the usage (nbd, bench); missing_arg ends "option 'X' needs ...". */
    bool own_errors;
    const char *missing_arg;
    bool options_first;         /* stop at the first operand (resize: "-1G" is a size) */
    enum {
        CLI_OPERANDS_ANY = 0,   /* the command checks them */
        CLI_OPERANDS_NONE,      /* options only */
        CLI_OPERAND_IMAGE,      /* exactly one: argv[optind] is the IMAGE */
    } operands;
};

/* Parse argv[1..] against cmd's table and check the operands it expects.
 * Returns CLI_GO_ON with optind at the first operand, or the exit code
 * (0 after --help) once it said what is wrong. */
int cli_parse(const struct cli_cmd *cmd, int argc, char **argv);

#endif
