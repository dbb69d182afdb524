/* A minimal JSON writer and reader for flat objects: state files, control
 * replies and the --json output of the commands. */
#ifndef UQ_UTIL_JSON_H
#define UQ_UTIL_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

/* Append s to out as a JSON string literal (quotes and escapes). */
void json_put_string(FILE *out, const char *s);
/* Read a member of a flat JSON object (state files, control replies):
 * false if missing or not of that type. */
bool json_get_u64(const char *buf, const char *key, uint64_t *v);
bool json_get_string(const char *buf, const char *key, char *out, size_t outlen);
/* Is the member present and true? */
bool json_get_true(const char *buf, const char *key);

#endif
