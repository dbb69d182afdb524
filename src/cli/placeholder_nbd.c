/* TEMPORARY until the NBD frontend lands (replaced, never shipped). */
#include "cli/cli.h"
int cmd_nbd(int argc, char **argv) { (void)argc; (void)argv; cli_error("nbd: not built yet"); return 1; }
