/* Minimal unit-test support.  Each test binary prints one line per test:
 *   ok NAME            passed
 *   not ok NAME: why   failed
 * and exits non-zero if any failed.  tests/run.sh counts these lines. */
#ifndef UQ_UNIT_H
#define UQ_UNIT_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <inttypes.h>

static int unit_failed_total;
static int unit_cur_failed;

#define CHECK(cond) do { \
    if (!(cond)) { \
        printf("#   %s:%d: CHECK(%s) failed\n", __FILE__, __LINE__, #cond); \
        unit_cur_failed = 1; \
    } } while (0)

#define CHECK_EQ(a, b) do { \
    unsigned long long _a = (unsigned long long)(a), _b = (unsigned long long)(b); \
    if (_a != _b) { \
        printf("#   %s:%d: %s == %s failed: 0x%llx != 0x%llx\n", __FILE__, __LINE__, #a, #b, _a, _b); \
        unit_cur_failed = 1; \
    } } while (0)

#define RUN_TEST(fn) do { \
    unit_cur_failed = 0; \
    fn(); \
    if (unit_cur_failed) { printf("not ok %s\n", #fn); unit_failed_total++; } \
    else printf("ok %s\n", #fn); \
    fflush(stdout); \
} while (0)

#define UNIT_EXIT() return unit_failed_total ? 1 : 0

#endif
