/* Exercise the ublk control path against the real kernel driver (run as
 * root inside the test VM by t_ublk_ctrl.sh).  Prints one `ok NAME` /
 * `not ok NAME: why` line per check.
 *
 *   ublk_ctrl_test            add/info/params/delete devices
 *   ublk_ctrl_test absent     open must fail with ENOENT (kernel without ublk)
 *   ublk_ctrl_test features   print the kernel's GET_FEATURES bits, then their
 *                             names (lower case, without UBLK_F_), on one line;
 *                             the guest tests branch on these (ublk_guest_lib.sh)
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "ublk/kernel_ctrl.h"

static int failures;

static void result(const char *name, const char *why_fmt, ...)
{
    if (!why_fmt) {
        printf("ok %s\n", name);
    } else {
        va_list ap;
        printf("not ok %s: ", name);
        va_start(ap, why_fmt);
        vprintf(why_fmt, ap);
        va_end(ap);
        putchar('\n');
        failures++;
    }
    fflush(stdout);
}

static bool char_dev_exists(const char *fmt, uint32_t id)
{
    char path[64];
    struct stat st;
    snprintf(path, sizeof(path), fmt, id);
    return stat(path, &st) == 0 && S_ISCHR(st.st_mode);
}

static void fill_info(struct ublksrv_ctrl_dev_info *info, uint32_t dev_id)
{
    memset(info, 0, sizeof(*info));
    info->nr_hw_queues = 2;
    info->queue_depth = 64;
    info->max_io_buf_bytes = 512 << 10;
    info->dev_id = dev_id;
    info->ublksrv_pid = getpid();
}

/* Add a device, read its info back, delete it; `name` labels the result. */
static void add_info_del(struct ublk_ctrl *c, const char *name)
{
    struct ublksrv_ctrl_dev_info info, got;
    fill_info(&info, UBLK_DEV_ID_AUTO);
    int ret = ublk_ctrl_add_dev(c, &info);
    if (ret < 0) {
        result(name, "ADD_DEV: %s", strerror(-ret));
        return;
    }
    uint32_t id = info.dev_id;
    const char *why = NULL;
    long cpus = sysconf(_SC_NPROCESSORS_CONF);
    unsigned want_queues = cpus > 0 && cpus < 2 ? (unsigned)cpus : 2;

    if (id == UBLK_DEV_ID_AUTO)
        why = "kernel did not assign a device id";
    else if (!char_dev_exists("/dev/ublkc%u", id))
        why = "no /dev/ublkcN after ADD_DEV";
    else if ((ret = ublk_ctrl_get_dev_info(c, id, &got)) < 0)
        why = strerror(-ret);
    else if (got.dev_id != id || got.queue_depth != 64 || got.nr_hw_queues != want_queues)
        why = "GET_DEV_INFO disagrees with ADD_DEV";
    else if (got.state != UBLK_S_DEV_DEAD)
        why = "a device that was never started is not DEAD";
    printf("# %s: dev %u queues %u depth %u max_io_buf %u state %s flags 0x%llx\n", name, id,
           got.nr_hw_queues, got.queue_depth, got.max_io_buf_bytes, ublk_state_name(got.state),
           (unsigned long long)got.flags);

    ret = ublk_ctrl_del_dev(c, id);
    if (!why && ret < 0)
        why = "DEL_DEV failed";
    else if (!why && char_dev_exists("/dev/ublkc%u", id))
        why = "/dev/ublkcN still there after DEL_DEV";
    else if (!why && ublk_ctrl_get_dev_info(c, id, &got) >= 0)
        why = "GET_DEV_INFO still answers for a deleted device";
    result(name, why ? "%s" : NULL, why);
}

static void test_params(struct ublk_ctrl *c)
{
    struct ublksrv_ctrl_dev_info info;
    fill_info(&info, UBLK_DEV_ID_AUTO);
    int ret = ublk_ctrl_add_dev(c, &info);
    if (ret < 0) {
        result("ublk_ctrl_params", "ADD_DEV: %s", strerror(-ret));
        return;
    }

    struct ublk_params p;
    memset(&p, 0, sizeof(p));
    p.len = sizeof(p);
    p.types = UBLK_PARAM_TYPE_BASIC | UBLK_PARAM_TYPE_DISCARD;
    p.basic.attrs = UBLK_ATTR_VOLATILE_CACHE | UBLK_ATTR_FUA;
    p.basic.logical_bs_shift = 9;
    p.basic.physical_bs_shift = 12;
    p.basic.io_opt_shift = 16;
    p.basic.io_min_shift = 12;
    p.basic.max_sectors = info.max_io_buf_bytes >> 9;
    p.basic.dev_sectors = 1ULL << 21;   /* 1 GiB */
    p.discard.discard_granularity = 65536;
    p.discard.max_discard_sectors = 1U << 20;
    p.discard.max_write_zeroes_sectors = 1U << 20;
    p.discard.max_discard_segments = 1;

    const char *why = NULL;
    struct ublk_params got;
    memset(&got, 0, sizeof(got));
    got.len = sizeof(got);
    if ((ret = ublk_ctrl_set_params(c, info.dev_id, &p)) < 0)
        why = strerror(-ret);
    else if ((ret = ublk_ctrl_get_params(c, info.dev_id, &got)) < 0)
        why = strerror(-ret);
    else if (!(got.types & UBLK_PARAM_TYPE_BASIC) || got.basic.dev_sectors != p.basic.dev_sectors ||
             got.basic.logical_bs_shift != 9 || got.basic.physical_bs_shift != 12 ||
             got.basic.attrs != p.basic.attrs)
        why = "GET_PARAMS does not return what SET_PARAMS set";
    else if (!(got.types & UBLK_PARAM_TYPE_DISCARD) ||
             got.discard.discard_granularity != p.discard.discard_granularity)
        why = "discard parameters lost";

    ret = ublk_ctrl_del_dev(c, info.dev_id);
    if (!why && ret < 0)
        why = "DEL_DEV failed";
    result("ublk_ctrl_params", why ? "%s" : NULL, why);
}

static void test_fixed_id(struct ublk_ctrl *c)
{
    const uint32_t id = 7;
    struct ublksrv_ctrl_dev_info info, again;
    fill_info(&info, id);
    int ret = ublk_ctrl_add_dev(c, &info);
    if (ret < 0) {
        result("ublk_ctrl_fixed_id", "ADD_DEV with id %u: %s", id, strerror(-ret));
        return;
    }
    const char *why = NULL;
    fill_info(&again, id);
    if (info.dev_id != id)
        why = "kernel changed the requested id";
    else if (!char_dev_exists("/dev/ublkc%u", id))
        why = "no /dev/ublkc7";
    else if (ublk_ctrl_add_dev(c, &again) >= 0)
        why = "a second ADD_DEV with the same id succeeded";
    ret = ublk_ctrl_del_dev(c, id);
    if (!why && ret < 0)
        why = "DEL_DEV failed";
    result("ublk_ctrl_fixed_id", why ? "%s" : NULL, why);
}

static void test_bad_id(struct ublk_ctrl *c)
{
    struct ublksrv_ctrl_dev_info info;
    int a = ublk_ctrl_get_dev_info(c, 4000, &info);
    int b = ublk_ctrl_del_dev(c, 4000);
    int d = ublk_ctrl_stop_dev(c, 4000);
    if (a >= 0 || b >= 0 || d >= 0)
        result("ublk_ctrl_bad_id", "commands for a missing device succeeded (%d %d %d)", a, b, d);
    else
        result("ublk_ctrl_bad_id", NULL);
}

static int print_features(void)
{
    struct ublk_ctrl *c;
    uint64_t features;
    if (ublk_ctrl_open(&c) < 0)
        return 1;
    bool known = ublk_ctrl_features(c, &features);
    ublk_ctrl_close(c);
    if (!known) {
        fprintf(stderr, "ublk_ctrl_test: GET_FEATURES failed (kernel older than 6.5)\n");
        return 1;
    }
    printf("0x%llx", (unsigned long long)features);
    for (unsigned i = 0; i < 64; i++) {
        if (!(features & (1ULL << i)))
            continue;
        const char *name = ublk_feature_name(i);
        if (name)
            printf(" %s", name);
        else
            printf(" bit%u", i);
    }
    putchar('\n');
    return 0;
}

int main(int argc, char **argv)
{
    struct ublk_ctrl *c;
    int ret;

    if (argc > 1 && !strcmp(argv[1], "features"))
        return print_features();

    if (argc > 1 && !strcmp(argv[1], "absent")) {
        ret = ublk_ctrl_open(&c);
        if (ret == -ENOENT)
            result("ublk_ctrl_absent", NULL);
        else
            result("ublk_ctrl_absent", "open returned %d, want -ENOENT", ret);
        if (ret >= 0)
            ublk_ctrl_close(c);
        return failures ? 1 : 0;
    }

    ret = ublk_ctrl_open(&c);
    if (ret < 0) {
        result("ublk_ctrl_open", "%s", strerror(-ret));
        return 1;
    }
    result("ublk_ctrl_open", NULL);

    uint64_t features;
    bool known = ublk_ctrl_features(c, &features);
    printf("# features 0x%llx (%s)\n", (unsigned long long)features, known ? "GET_FEATURES" : "assumed");
    if (!known)
        result("ublk_ctrl_features", "GET_FEATURES failed on a kernel that has it");
    else if (!(features & UBLK_F_CMD_IOCTL_ENCODE))
        result("ublk_ctrl_features", "CMD_IOCTL_ENCODE missing from 0x%llx", (unsigned long long)features);
    else
        result("ublk_ctrl_features", NULL);

    add_info_del(c, "ublk_ctrl_add_info_del");
    if (!ublk_ctrl_uses_ioctl_encoding(c))
        result("ublk_ctrl_ioctl_encoding", "kernel did not accept ioctl-encoded opcodes");
    else
        result("ublk_ctrl_ioctl_encoding", NULL);
    test_params(c);
    test_fixed_id(c);
    test_bad_id(c);

    /* The fallback: plain opcodes (needs CONFIG_BLKDEV_UBLK_LEGACY_OPCODES,
     * which Debian enables); if the kernel refuses them, the retry in the
     * ioctl form must still make the commands work. */
    ublk_ctrl_force_legacy(c);
    add_info_del(c, "ublk_ctrl_legacy_opcodes");
    if (ublk_ctrl_uses_ioctl_encoding(c))
        result("ublk_ctrl_legacy_used", "commands went out ioctl-encoded after force_legacy");
    else
        result("ublk_ctrl_legacy_used", NULL);
    ublk_ctrl_close(c);
    return failures ? 1 : 0;
}
