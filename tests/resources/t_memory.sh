#!/usr/bin/env bash
# Resource bounds.
# 1. Peak memory does not depend on the image: the optimised server (build/ublk-qcow2, built if
#    needed) serves a 1 GiB and a 1 TiB sparse qcow2 (64 KiB clusters) with --cache-size 4M;
#    qemu-io writes 4 KiB into each of 512 evenly spread places (on 1 TiB: 512 L2 tables, 32
#    MiB of them, eight times the cache), reads them all back, flushes.  The server's VmHWM
#    must stay within the cache size plus MEM_OVERHEAD_MIB (16 MiB: code, libraries, ring,
#    coroutine stacks, NBD buffers, the L1 table and the metadata index; measured 2 MiB for
#    1 GiB and 6 MiB for 1 TiB).
# 2. SOAK=1 only: a mixed workload (fio's nbd engine: random reads and writes of 4-64 KiB with
#    flushes, trims) for SOAK_MEM_SECONDS (600) against the sanitized server; VmRSS sampled
#    every 30 s must not grow once warm (last third vs the middle third, within 16 MiB), and
#    the server must exit 0 with no leak report.
# timeout: 600
# soak-timeout: 1500
. "$(dirname "$0")/../lib/lib.sh"

need_cmd qemu-img qemu-io || { skip memory "qemu-img or qemu-io missing"; exit 0; }
CACHE_MIB=4
MEM_OVERHEAD_MIB=${MEM_OVERHEAD_MIB:-16}

# vm_kib PID FIELD: a /proc/PID/status field in KiB.
vm_kib() { awk -v f="$2:" '$1 == f { print $2 }' "/proc/$1/status" 2>/dev/null; }

# --- 1. peak memory, 1 GiB vs 1 TiB ----------------------------------------------------------
REL=$REPO_ROOT/build/ublk-qcow2
if ! env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$REPO_ROOT" -s -j2 MODE=release all >"$UQ_TMP/make.log" 2>&1; then
    sed 's/^/#   /' "$UQ_TMP/make.log" | tail -20 >&2
    notok memory_build "make all failed"
    exit 1
fi
declare -A HWM
for size in 1G 1T; do
    label="memory_peak_$size: --cache-size ${CACHE_MIB}M"
    img=$UQ_TMP/mem_$size.qcow2
    qemu-img create -q -f qcow2 "$img" "$size" || { notok "$label" "qemu-img create failed"; continue; }
    bytes=$(qemu-img info --output=json "$img" | sed -n 's/.*"virtual-size": \([0-9]*\).*/\1/p')
    "$PYTHON" - "$bytes" >"$UQ_TMP/cmds" <<'EOF'
import sys
size, n = int(sys.argv[1]), 512
offs = [i * (size // n) // 4096 * 4096 + (i * 69632) % (size // n // 2) // 4096 * 4096 for i in range(n)]
for i, o in enumerate(offs):
    print("aio_write -P %d %d 4k" % (i % 250 + 1, o))
print("aio_flush")
for i, o in enumerate(offs):
    print("aio_read -P %d %d 4k" % (i % 250 + 1, o))
print("aio_flush")
print("flush")
EOF
    UQ=$REL start_nbd "$img" --format qcow2 --cache-size ${CACHE_MIB}M ||
        { notok "$label" "server did not start"; continue; }
    why=
    if ! qio raw "$(nbd_uri)" "$UQ_TMP/cmds"; then
        why="the workload failed"
    elif grep -q -i -E 'pattern verification failed|error' "$UQ_TMP/qio.out"; then
        why="data read back wrong: $(grep -m1 -i -E 'pattern|error' "$UQ_TMP/qio.out")"
    fi
    hwm=$(vm_kib "$NBD_PID" VmHWM)
    rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || why=${why:-"server exit $rc"}
    HWM[$size]=$hwm
    limit=$(((CACHE_MIB + MEM_OVERHEAD_MIB) * 1024))
    if [[ -z $hwm ]]; then
        why=${why:-"could not read VmHWM"}
    elif (( hwm > limit )); then
        why=${why:-"peak RSS $hwm KiB exceeds cache + overhead ($limit KiB)"}
    fi
    qimg_check "$img" || why=${why:-"qemu-img check failed"}
    if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label: peak RSS $((hwm / 1024)) MiB (limit $((limit / 1024)) MiB)"; fi
    rm -f "$img"
done
echo "# memory: peak RSS ${HWM[1G]:-?} KiB (1 GiB image), ${HWM[1T]:-?} KiB (1 TiB image), cache ${CACHE_MIB} MiB"

# --- 2. soak: no leak, no growth ----------------------------------------------------------------
if [[ ${SOAK:-0} != 1 ]]; then
    skip memory_soak "SOAK=1 only (10-minute mixed workload under ASan)"
    exit 0
fi
label="memory_soak: mixed workload under ASan"
need_cmd fio || { skip memory_soak "fio missing"; exit 0; }
SECS=${SOAK_MEM_SECONDS:-600}
img=$UQ_TMP/soak.qcow2
qemu-img create -q -f qcow2 -o cluster_size=65536 "$img" 4G
# A small quarantine so freed memory is reused: RSS then shows growth, not ASan's bookkeeping.
ASAN_OPTIONS="${ASAN_OPTIONS:-}:quarantine_size_mb=16:malloc_context_size=8" \
    start_nbd "$img" --format qcow2 --cache-size 8M || { notok "$label" "server did not start"; exit 1; }
fio --name=rw --ioengine=nbd --uri="$(nbd_uri)" --rw=randrw --bsrange=4k-64k --iodepth=16 \
    --size=4G --fsync=64 --time_based --runtime="$SECS" --randrepeat=0 \
    --name=trim --ioengine=nbd --uri="$(nbd_uri)" --rw=randtrim --bs=1M --iodepth=2 \
    --size=4G --rate_iops=20 --time_based --runtime="$SECS" >"$UQ_TMP/fio.out" 2>&1 &
fio_pid=$!
samples=()
for ((t = 0; t < SECS; t += 30)); do
    # Bounded wait for the next sample; fio ending early stops the sampling.
    timeout 30 tail --pid="$fio_pid" -f /dev/null >/dev/null 2>&1
    kill -0 "$fio_pid" 2>/dev/null || break
    samples+=("$(vm_kib "$NBD_PID" VmRSS)")
done
wait "$fio_pid"; frc=$?
note "VmRSS samples (KiB, every 30 s): ${samples[*]}"
grep -E '^ *(READ|WRITE|TRIM):' "$UQ_TMP/fio.out" | sed 's/^ */# fio /' >&2
why=
[[ $frc -eq 0 ]] || why="fio failed (exit $frc): $(grep -m1 -i error "$UQ_TMP/fio.out")"
n=${#samples[@]}
if [[ -z $why && $n -ge 6 ]]; then
    mid=0 last=0
    for ((i = n / 3; i < 2 * n / 3; i++)); do (( samples[i] > mid )) && mid=${samples[i]}; done
    for ((i = 2 * n / 3; i < n; i++)); do (( samples[i] > last )) && last=${samples[i]}; done
    (( last <= mid + 16384 )) || why="RSS grew from $mid KiB to $last KiB"
elif [[ -z $why ]]; then
    why="only $n samples"
fi
rc=0
stop_nbd || rc=$?
[[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
san_clean "$NBD_LOG" || why=${why:-"sanitizer or leak report"}
qimg_check "$img" || why=${why:-"qemu-img check failed"}
if [[ -n $why ]]; then
    notok "$label" "$why"
else
    ok "$label: $SECS s, RSS ${samples[0]}..${samples[n - 1]} KiB, no growth, no leak"
fi
