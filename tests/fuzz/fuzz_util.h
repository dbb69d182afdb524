/* Helpers shared by the libFuzzer targets (header only: each target is one file). */
#ifndef UQ_FUZZ_UTIL_H
#define UQ_FUZZ_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A fresh scratch directory DIR/NAME.XXXXXX under $TMPDIR (or /tmp); exits on failure. */
static inline void fuzz_scratch_dir(char *dir, size_t len, const char *name)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, len, "%s/%s.XXXXXX", tmp && *tmp ? tmp : "/tmp", name);
    if (!mkdtemp(dir)) {
        perror(name);
        exit(1);
    }
}

/* The code under test names every broken input on stderr: unless
 * UQ_FUZZ_VERBOSE=1, send that to /dev/null to keep the fuzzer's output
 * readable (libFuzzer and the sanitizers do not write through this stream). */
static inline void fuzz_quiet_stderr(void)
{
    const char *v = getenv("UQ_FUZZ_VERBOSE");
    if (!v || strcmp(v, "1")) {
        FILE *null = fopen("/dev/null", "w");
        if (null)
            stderr = null;
    }
}

#endif
