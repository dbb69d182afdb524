/* JSON for flat objects (see json.h). */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util/json.h"

void json_put_string(FILE *out, const char *s)
{
    fputc('"', out);
    for (const unsigned char *p = (const unsigned char *)s; *p; p++) {
        if (*p == '"' || *p == '\\')
            fprintf(out, "\\%c", *p);
        else if (*p < 0x20)
            fprintf(out, "\\u%04x", *p);
        else
            fputc(*p, out);
    }
    fputc('"', out);
}

/* Find "key": in a flat JSON object; returns the value's start. */
static const char *json_find(const char *buf, const char *key)
{
    char pat[64];
    snprintf(pat, sizeof(pat), "\"%s\"", key);
    const char *p = strstr(buf, pat);
    if (!p)
        return NULL;
    p += strlen(pat);
    while (*p == ' ' || *p == '\t' || *p == '\n')
        p++;
    if (*p++ != ':')
        return NULL;
    while (*p == ' ' || *p == '\t' || *p == '\n')
        p++;
    return p;
}

bool json_get_u64(const char *buf, const char *key, uint64_t *v)
{
    const char *p = json_find(buf, key);
    if (!p)
        return false;
    char *end;
    errno = 0;
    long long x = strtoll(p, &end, 10);
    if (end == p || errno)
        return false;
    *v = (uint64_t)x;
    return true;
}

bool json_get_true(const char *buf, const char *key)
{
    const char *p = json_find(buf, key);
    return p && !strncmp(p, "true", 4);
}

/* Four hex digits of a \\u escape; -1 if malformed. */
static long hex4(const char *p)
{
    long v = 0;
    for (int i = 0; i < 4; i++) {
        char c = p[i];
        int d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
              : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
        if (d < 0)
            return -1;
        v = v * 16 + d;
    }
    return v;
}

bool json_get_string(const char *buf, const char *key, char *out, size_t outlen)
{
    const char *p = json_find(buf, key);
    if (!p || *p++ != '"')
        return false;
    size_t n = 0;
    while (*p && *p != '"') {
        char enc[4];
        size_t k = 1;
        enc[0] = *p++;
        if (enc[0] == '\\') {
            char e = *p++;
            long v;
            switch (e) {
            case 'n': enc[0] = '\n'; break;
            case 't': enc[0] = '\t'; break;
            case 'r': enc[0] = '\r'; break;
            case 'b': enc[0] = '\b'; break;
            case 'f': enc[0] = '\f'; break;
            case '"': case '\\': case '/': enc[0] = e; break;
            case 'u':
                /* A code point (a surrogate pair for those above U+FFFF),
                 * written out as UTF-8. */
                if ((v = hex4(p)) < 0)
                    return false;
                p += 4;
                if (v >= 0xd800 && v < 0xdc00) {
                    long lo = p[0] == '\\' && p[1] == 'u' ? hex4(p + 2) : -1;
                    if (lo < 0xdc00 || lo >= 0xe000)
                        return false;
                    v = 0x10000 + ((v - 0xd800) << 10) + (lo - 0xdc00);
                    p += 6;
                }
                if (v == 0)
                    return false;
                if (v < 0x80) {
                    enc[0] = (char)v;
                } else if (v < 0x800) {
                    enc[0] = (char)(0xc0 | (v >> 6));
                    enc[1] = (char)(0x80 | (v & 0x3f));
                    k = 2;
                } else if (v < 0x10000) {
                    enc[0] = (char)(0xe0 | (v >> 12));
                    enc[1] = (char)(0x80 | ((v >> 6) & 0x3f));
                    enc[2] = (char)(0x80 | (v & 0x3f));
                    k = 3;
                } else {
                    enc[0] = (char)(0xf0 | (v >> 18));
                    enc[1] = (char)(0x80 | ((v >> 12) & 0x3f));
                    enc[2] = (char)(0x80 | ((v >> 6) & 0x3f));
                    enc[3] = (char)(0x80 | (v & 0x3f));
                    k = 4;
                }
                break;
            default:
                return false;
            }
        }
        if (n + k >= outlen)
            return false;
        memcpy(out + n, enc, k);
        n += k;
    }
    if (*p != '"')
        return false;
    out[n] = '\0';
    return true;
}
