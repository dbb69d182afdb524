/* Who uses a ublk block device (see inuse.h). */
#include "ublk/inuse.h"

#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <time.h>
#include <unistd.h>

#define MAX_NODES 129   /* the disk and up to 128 partitions (GPT's usual limit) */

struct node {
    char name[48];      /* ublkb0, ublkb0p1 */
    dev_t dev;
    unsigned part;      /* 0: the whole disk */
};

struct out {
    char *buf;
    size_t len, used;
    int count;
};

static void say(struct out *o, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void say(struct out *o, const char *fmt, ...)
{
    o->count++;
    if (!o->buf || o->used + 1 >= o->len)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(o->buf + o->used, o->len - o->used, fmt, ap);
    va_end(ap);
    if (n > 0)
        o->used = o->used + (size_t)n < o->len ? o->used + (size_t)n : o->len - 1;
}

static bool read_line(const char *path, char *buf, size_t len)
{
    FILE *f = fopen(path, "re");
    if (!f)
        return false;
    bool ok = fgets(buf, (int)len, f) != NULL;
    fclose(f);
    if (ok)
        buf[strcspn(buf, "\n")] = '\0';
    return ok;
}

static bool read_dev(const char *path, dev_t *dev)
{
    char line[64];
    unsigned ma, mi;
    if (!read_line(path, line, sizeof(line)) || sscanf(line, "%u:%u", &ma, &mi) != 2)
        return false;
    *dev = makedev(ma, mi);
    return true;
}

static int cmp_node(const void *a, const void *b)
{
    const struct node *x = a, *y = b;
    return x->part < y->part ? -1 : x->part > y->part;
}

/* The disk and its partitions, from sysfs; returns how many (0: no disk). */
static int collect_nodes(uint32_t id, struct node *nodes)
{
    char path[128], prefix[48];
    snprintf(path, sizeof(path), "/sys/block/ublkb%u/dev", id);
    int n = 0;
    if (!read_dev(path, &nodes[0].dev))
        return 0;
    snprintf(nodes[0].name, sizeof(nodes[0].name), "ublkb%u", id);
    nodes[0].part = 0;
    n = 1;
    snprintf(prefix, sizeof(prefix), "ublkb%up", id);
    snprintf(path, sizeof(path), "/sys/block/ublkb%u", id);
    DIR *d = opendir(path);
    if (!d)
        return n;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && n < MAX_NODES) {
        size_t pl = strlen(prefix);
        if (strncmp(de->d_name, prefix, pl) || !isdigit((unsigned char)de->d_name[pl]))
            continue;
        char dp[384];
        snprintf(dp, sizeof(dp), "/sys/block/ublkb%u/%s/dev", id, de->d_name);
        if (!read_dev(dp, &nodes[n].dev))
            continue;
        snprintf(nodes[n].name, sizeof(nodes[n].name), "%s", de->d_name);
        nodes[n].part = (unsigned)strtoul(de->d_name + pl, NULL, 10);
        n++;
    }
    closedir(d);
    qsort(nodes + 1, (size_t)n - 1, sizeof(*nodes), cmp_node);
    return n;
}

static const struct node *find_dev(const struct node *nodes, int n, dev_t dev)
{
    for (int i = 0; i < n; i++)
        if (nodes[i].dev == dev)
            return &nodes[i];
    return NULL;
}

static const struct node *find_path(const struct node *nodes, int n, const char *path)
{
    if (strncmp(path, "/dev/", 5))
        return NULL;
    for (int i = 0; i < n; i++)
        if (!strcmp(path + 5, nodes[i].name))
            return &nodes[i];
    return NULL;
}

/* mountinfo escapes space, tab, newline and backslash as \ooo. */
static void unescape(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (r[0] == '\\' && r[1] >= '0' && r[1] <= '3' && r[2] >= '0' && r[2] <= '7' &&
            r[3] >= '0' && r[3] <= '7') {
            *w++ = (char)((r[1] - '0') * 64 + (r[2] - '0') * 8 + (r[3] - '0'));
            r += 3;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
}

/* Mounts: by major:minor (most file systems), or by source (btrfs and
 * others report an anonymous device number). */
static void find_mounts(const struct node *nodes, int n, struct out *o)
{
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f)
        return;
    char line[8192], mnt[4096], src[4096];
    while (fgets(line, sizeof(line), f)) {
        unsigned ma, mi;
        if (sscanf(line, "%*u %*u %u:%u %*s %4095s", &ma, &mi, mnt) != 3)
            continue;
        const char *sep = strstr(line, " - ");
        src[0] = '\0';
        if (sep)
            sscanf(sep + 3, "%*s %4095s", src);
        unescape(src);
        const struct node *nd = find_dev(nodes, n, makedev(ma, mi));
        if (!nd)
            nd = find_path(nodes, n, src);
        if (!nd)
            continue;
        unescape(mnt);
        say(o, "  /dev/%s is mounted on %s: unmount it first (umount %s)\n", nd->name, mnt, mnt);
    }
    fclose(f);
}

static void find_swaps(const struct node *nodes, int n, struct out *o)
{
    FILE *f = fopen("/proc/swaps", "re");
    if (!f)
        return;
    char line[4096], path[4096];
    while (fgets(line, sizeof(line), f)) {
        if (sscanf(line, "%4095s", path) != 1)
            continue;
        unescape(path);
        const struct node *nd = find_path(nodes, n, path);
        if (nd)
            say(o, "  /dev/%s is in use as swap: swapoff /dev/%s first\n", nd->name, nd->name);
    }
    fclose(f);
}

/* The volume group of an LVM dm name "VG-LV" (a '-' in either is "--"). */
static void lvm_vg(const char *dm_name, char *vg, size_t len)
{
    size_t w = 0;
    for (const char *p = dm_name; *p && w + 1 < len; p++) {
        if (*p == '-') {
            if (p[1] != '-')
                break;
            p++;
        }
        vg[w++] = *p;
    }
    vg[w] = '\0';
}

/* Block devices stacked on the disk or a partition (its sysfs holders). */
static void find_holders(uint32_t id, const struct node *nodes, int n, struct out *o)
{
    for (int i = 0; i < n; i++) {
        char path[256];
        if (i == 0)
            snprintf(path, sizeof(path), "/sys/block/ublkb%u/holders", id);
        else
            snprintf(path, sizeof(path), "/sys/block/ublkb%u/%s/holders", id, nodes[i].name);
        DIR *d = opendir(path);
        if (!d)
            continue;
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (de->d_name[0] == '.')
                continue;
            char p[512], name[256] = "", uuid[256] = "";
            snprintf(p, sizeof(p), "/sys/block/%s/dm/name", de->d_name);
            if (read_line(p, name, sizeof(name))) {
                snprintf(p, sizeof(p), "/sys/block/%s/dm/uuid", de->d_name);
                read_line(p, uuid, sizeof(uuid));
                if (!strncmp(uuid, "LVM-", 4)) {
                    char vg[256];
                    lvm_vg(name, vg, sizeof(vg));
                    say(o, "  /dev/%s is held by %s (/dev/mapper/%s, LVM volume group %s): "
                        "deactivate it first (vgchange -an %s)\n", nodes[i].name, de->d_name, name, vg, vg);
                } else {
                    say(o, "  /dev/%s is held by %s (/dev/mapper/%s): remove it first "
                        "(dmsetup remove %s)\n", nodes[i].name, de->d_name, name, name);
                }
            } else if (!strncmp(de->d_name, "md", 2)) {
                say(o, "  /dev/%s is held by %s (md RAID): stop it first (mdadm --stop /dev/%s)\n",
                    nodes[i].name, de->d_name, de->d_name);
            } else {
                say(o, "  /dev/%s is held by %s: release /dev/%s first\n", nodes[i].name,
                    de->d_name, de->d_name);
            }
        }
        closedir(d);
    }
}

/* Processes with the disk or a partition open (other users' processes
 * are visible to root only). */
static void find_processes(const struct node *nodes, int n, struct out *o)
{
    DIR *proc = opendir("/proc");
    if (!proc)
        return;
    pid_t self = getpid();
    struct dirent *pe;
    while ((pe = readdir(proc)) != NULL) {
        char *end;
        long pid = strtol(pe->d_name, &end, 10);
        if (*end || pid <= 0 || pid == self)
            continue;
        char path[64];
        snprintf(path, sizeof(path), "/proc/%ld/fd", pid);
        DIR *fds = opendir(path);
        if (!fds)
            continue;
        const struct node *hit = NULL;
        struct dirent *fe;
        while (!hit && (fe = readdir(fds)) != NULL) {
            if (fe->d_name[0] == '.')
                continue;
            char fp[384];
            struct stat st;
            snprintf(fp, sizeof(fp), "/proc/%ld/fd/%s", pid, fe->d_name);
            if (stat(fp, &st) == 0 && S_ISBLK(st.st_mode))
                hit = find_dev(nodes, n, st.st_rdev);
        }
        closedir(fds);
        if (!hit)
            continue;
        char comm[64] = "?";
        snprintf(path, sizeof(path), "/proc/%ld/comm", pid);
        read_line(path, comm, sizeof(comm));
        say(o, "  /dev/%s is open in process %ld (%s): stop it first (kill %ld)\n", hit->name, pid,
            comm, pid);
    }
    closedir(proc);
}

int ublk_dev_users(uint32_t id, char *why, size_t len)
{
    struct node nodes[MAX_NODES];
    struct out o = { .buf = why, .len = len };
    if (why && len)
        why[0] = '\0';
    int n = collect_nodes(id, nodes);
    if (n == 0)
        return 0;
    find_mounts(nodes, n, &o);
    find_swaps(nodes, n, &o);
    find_holders(id, nodes, n, &o);
    find_processes(nodes, n, &o);
    return o.count;
}

int ublk_dev_partitions(uint32_t id, char *buf, size_t len)
{
    struct node nodes[MAX_NODES];
    int n = collect_nodes(id, nodes), count = 0;
    size_t used = 0;
    for (int i = 1; i < n; i++) {
        size_t need = strlen(nodes[i].name) + 6;
        if (used + need > len)
            break;
        used += (size_t)sprintf(buf + used, "/dev/%s", nodes[i].name) + 1;
        count++;
    }
    return count;
}

int ublk_stop_if_unused(struct ublk_ctrl *c, uint32_t id, uint64_t dev_flags, char *why, size_t len)
{
    if (why && len)
        why[0] = '\0';
    if (dev_flags & UBLK_F_SAFE_STOP_DEV) {
        /* Someone with the device open for a moment (udev's blkid after
         * an event) makes it busy without being a user: ask again for up
         * to 2 s while no user can be named. */
        for (int tries = 0;; tries++) {
            int r = ublk_ctrl_try_stop_dev(c, id);
            if (r == -ENODEV)   /* no block device (never started): nothing to look after */
                return ublk_ctrl_stop_dev(c, id);
            if (r != -EBUSY)
                return r;
            if (ublk_dev_users(id, why, len) > 0)
                return -EBUSY;
            if (tries == 20)
                break;
            nanosleep(&(struct timespec){ .tv_nsec = 100 * 1000 * 1000 }, NULL);
        }
        if (why && len)
            snprintf(why, len, "  /dev/ublkb%u is open (the kernel says so; no mount, holder or "
                     "process could be named: look with 'fuser -v /dev/ublkb%u*')\n", id, id);
        return -EBUSY;
    }
    /* Without TRY_STOP_DEV: look, then stop (a user arriving in between
     * is not seen). */
    if (ublk_dev_users(id, why, len) > 0)
        return -EBUSY;
    return ublk_ctrl_stop_dev(c, id);
}
