#!/bin/bash
# The `bench` load generator: JSON report, I/O counts, data really written,
# option errors.  Needs env UQ (binary) and UQ_TMP (scratch directory).
# timeout: 300
set -u
: "${UQ:?UQ must name the ublk-qcow2 binary}" "${UQ_TMP:?UQ_TMP must name a scratch directory}"
D=$UQ_TMP/bench_cmd
rm -rf "$D" && mkdir -p "$D" || { echo "not ok bench_cmd_setup: cannot create $D"; exit 1; }
trap 'rm -rf "$D"' EXIT
failed=0
ok()     { echo "ok $1"; }
not_ok() { echo "not ok $1: $2"; failed=1; }

if ! command -v jq >/dev/null; then
    echo "skip bench_cmd: jq is not installed"
    exit 0
fi

# Mixed random I/O on a small raw image: exact count, no errors, valid JSON.
truncate -s 16M "$D/a.raw"
if out=$(timeout 120 "$UQ" bench --rw randrw --bs 4k --depth 16 --ios 2000 --json "$D/a.raw" 2>"$D/err"); then
    if ! jq -e . >/dev/null 2>&1 <<<"$out"; then
        not_ok bench_cmd_json "output is not JSON: $out"
    elif ! jq -e '.ios == 2000 and .errors == 0 and .read_ios + .write_ios == 2000
                  and .read_ios > 0 and .write_ios > 0 and .rw == "randrw"
                  and .bs == 4096 and .depth == 16 and .iops > 0
                  and .lat_p50_us > 0 and .lat_p50_us <= .lat_p99_us
                  and .lat_p99_us <= .lat_max_us * 1.05
                  and .cpu_user_s >= 0 and .cpu_sys_s >= 0' >/dev/null <<<"$out"; then
        not_ok bench_cmd_json "unexpected report: $out"
    else
        ok bench_cmd_json
    fi
else
    not_ok bench_cmd_json "exit $?: $(head -c 300 "$D/err")"
fi

# Sequential writes with as many I/Os as blocks must touch every block once,
# each job on its own stride: afterwards no 4k block of the image is zero.
truncate -s 1M "$D/s.raw"
if out=$(timeout 120 "$UQ" bench --rw write --bs 4k --depth 4 --ios 256 --json "$D/s.raw" 2>"$D/err"); then
    zero_blocks=$(python3 -c '
import sys
d = open(sys.argv[1], "rb").read()
print(sum(1 for i in range(0, len(d), 4096) if d[i:i + 4096].count(0) == 4096))' "$D/s.raw")
    if ! jq -e '.ios == 256 and .write_ios == 256 and .errors == 0' >/dev/null <<<"$out"; then
        not_ok bench_cmd_seq_write "unexpected report: $out"
    elif [ "$zero_blocks" != 0 ]; then
        not_ok bench_cmd_seq_write "$zero_blocks of 256 blocks still zero after writing each once"
    else
        ok bench_cmd_seq_write
    fi
else
    not_ok bench_cmd_seq_write "exit $?: $(head -c 300 "$D/err")"
fi

# On qcow2: mixed random I/O leaves a clean image, and the same sequential
# pass (each block written once, contents fixed by --seed) gives the same
# guest data as on raw.
qemu-img create -q -f qcow2 "$D/q.qcow2" 16M
if out=$(timeout 120 "$UQ" bench --rw randrw --ios 2000 --depth 16 --json "$D/q.qcow2" 2>"$D/err") &&
        jq -e '.ios == 2000 and .errors == 0 and .format == "qcow2"' >/dev/null <<<"$out"; then
    if qemu-img check -q "$D/q.qcow2" >"$D/check" 2>&1; then
        ok bench_cmd_qcow2
    else
        not_ok bench_cmd_qcow2 "qemu-img check: $(head -c 300 "$D/check")"
    fi
else
    not_ok bench_cmd_qcow2 "report: $out $(head -c 300 "$D/err")"
fi
qemu-img create -q -f qcow2 "$D/s.qcow2" 1M
if timeout 120 "$UQ" bench --rw write --bs 4k --depth 4 --ios 256 --seed 7 --json "$D/s.qcow2" \
        >/dev/null 2>"$D/err" &&
        truncate -s 0 "$D/s.raw" && truncate -s 1M "$D/s.raw" &&
        timeout 120 "$UQ" bench --rw write --bs 4k --depth 4 --ios 256 --seed 7 --json "$D/s.raw" \
        >/dev/null 2>>"$D/err"; then
    if qemu-img compare -q -f qcow2 -F raw "$D/s.qcow2" "$D/s.raw" >"$D/cmp" 2>&1; then
        ok bench_cmd_qcow2_same_data
    else
        not_ok bench_cmd_qcow2_same_data "qcow2 and raw differ: $(head -c 300 "$D/cmp")"
    fi
else
    not_ok bench_cmd_qcow2_same_data "bench failed: $(head -c 300 "$D/err")"
fi

# --size-limit keeps every request inside the limit.
truncate -s 4M "$D/l.raw"
if timeout 120 "$UQ" bench --rw randwrite --bs 4k --depth 8 --ios 500 --size-limit 64k \
        --json "$D/l.raw" >/dev/null 2>"$D/err"; then
    if cmp -s -n $((4 * 1024 * 1024 - 65536)) -i 65536:0 "$D/l.raw" /dev/zero; then
        ok bench_cmd_size_limit
    else
        not_ok bench_cmd_size_limit "data written beyond --size-limit 64k"
    fi
else
    not_ok bench_cmd_size_limit "exit $?: $(head -c 300 "$D/err")"
fi

# The human-readable line.
if out=$(timeout 120 "$UQ" bench --rw randread --ios 100 "$D/a.raw" 2>"$D/err") &&
        grep -Eq '^randread bs=4096 depth=32: [0-9]+ IOPS, [0-9.]+ MiB/s, [0-9.]+ s, lat avg [0-9.]+ us, p50 [0-9.]+ us, p99 [0-9.]+ us' <<<"$out"; then
    ok bench_cmd_text
else
    not_ok bench_cmd_text "unexpected output: $out $(head -c 300 "$D/err")"
fi

# Bad options exit 2 with a message; --help exits 0; a missing image exits 1.
bad=""
for args in "--rw bogus" "--bs 1000" "--bs 0" "--depth 0" "--depth x" "--seconds -1" \
            "--ios 0" "--format vmdk" "--frobnicate" "--size-limit 1k"; do
    # shellcheck disable=SC2086  # word splitting of $args is intended
    timeout 30 "$UQ" bench --ios 10 $args "$D/a.raw" >/dev/null 2>"$D/err"
    rc=$?
    if [ $rc != 2 ]; then bad="$bad '$args' exited $rc;"
    elif ! [ -s "$D/err" ]; then bad="$bad '$args' printed no message;"
    fi
done
timeout 30 "$UQ" bench --ios 10 >/dev/null 2>"$D/err"
rc=$?
[ $rc = 2 ] || bad="$bad no IMAGE exited $rc;"
timeout 30 "$UQ" bench --ios 10 "$D/a.raw" "$D/a.raw" >/dev/null 2>"$D/err"
rc=$?
[ $rc = 2 ] || bad="$bad two IMAGEs exited $rc;"
if [ -z "$bad" ]; then ok bench_cmd_bad_options; else not_ok bench_cmd_bad_options "$bad"; fi

if timeout 30 "$UQ" bench --help 2>&1 | grep -q -- '--depth'; then
    ok bench_cmd_help
else
    not_ok bench_cmd_help "--help did not exit 0 with usage"
fi

timeout 30 "$UQ" bench --ios 10 "$D/missing.raw" >/dev/null 2>"$D/err"
rc=$?
if [ $rc = 1 ] && grep -q missing.raw "$D/err"; then
    ok bench_cmd_missing_image
else
    not_ok bench_cmd_missing_image "exit $rc, stderr: $(head -c 300 "$D/err")"
fi

exit $failed
