/* Subcommands of the ublk-qcow2 command. Each returns the process exit code. */
#ifndef UQ_CLI_H
#define UQ_CLI_H

int cmd_nbd(int argc, char **argv);
int cmd_bench(int argc, char **argv);
int cmd_add(int argc, char **argv);
int cmd_del(int argc, char **argv);
int cmd_list(int argc, char **argv);
int cmd_recover(int argc, char **argv);
int cmd_stats(int argc, char **argv);

/* Print "ublk-qcow2: <msg>\n" to stderr (printf-style). */
void cli_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

#endif
