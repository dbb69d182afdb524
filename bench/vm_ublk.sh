#!/bin/bash
# The ublk part of `make bench`, run as root inside the test VM (tests/vm/vm.sh)
# by bench/run.sh; needs a kernel with ublk_drv, nbd and loop.
#
#   bench/vm_ublk.sh BINARY SECONDS DEPTH SIZE
#
# On images in the guest tmpfs ($VM_TMP): a qcow2 and a raw file of SIZE, both
# preallocation=full (every byte written, no holes), it measures fio io_uring
# O_DIRECT 4k randread and randwrite, 1 job, iodepth DEPTH, SECONDS each, on
#   ublk_qcow2  /dev/ublkbN from `BINARY add` on the qcow2
#   ublk_raw    /dev/ublkbN from `BINARY add -f raw` on the raw file
#   loop_raw    the kernel loop driver, --direct-io=on, on the raw file (the limit)
#   qemu_nbd    qemu-nbd --cache=none --aio=io_uring on the qcow2, via the kernel nbd driver
# Prints one machine-readable line per measurement:
#   UQBENCH PATH WORKLOAD READ_IOPS WRITE_IOPS     (n/a n/a when it failed)
# plus "UQBENCH-INFO key value" lines; everything else is commentary.
set -u -o pipefail

[ $# -eq 4 ] || { echo "usage: bench/vm_ublk.sh BINARY SECONDS DEPTH SIZE" >&2; exit 2; }
BIN=$1 SECS=$2 DEPTH=$3 SIZE=$4
W=${VM_TMP:?run me inside tests/vm/vm.sh}/bench
log() { echo "vm-bench: $*" >&2; }
info() { echo "UQBENCH-INFO $1 $2"; }

[ -c /dev/ublk-control ] || { log "no /dev/ublk-control in this kernel"; exit 1; }
for tool in fio jq qemu-img qemu-nbd losetup blockdev; do
    command -v "$tool" >/dev/null || { log "'$tool' is not installed"; exit 1; }
done

# Room for both images: the guest tmpfs defaults to half the RAM.
mount -o remount,size=90% "$VM_TMP" 2>/dev/null
mkdir -p "$W"
QCOW2=$W/prealloc.qcow2
RAW=$W/prealloc.raw
log "creating $SIZE qcow2 and raw images, preallocation=full, in $W"
qemu-img create -q -f qcow2 -o preallocation=full "$QCOW2" "$SIZE" || exit 1
qemu-img create -q -f raw -o preallocation=full "$RAW" "$SIZE" || exit 1
info kernel "$(uname -r)"
info cpus "$(nproc)"

DEV=
STOP=
cleanup() { [ -z "$STOP" ] || eval "$STOP" >/dev/null 2>&1; rm -rf "$W"; }
trap cleanup EXIT

# ---- attach/detach for each path: set DEV and STOP ----------------------------
attach_ublk() {  # IMAGE FORMAT
    DEV=$(timeout 120 "$BIN" add -q 1 -f "$2" "$1" 2>"$W/add.err") && [ -b "$DEV" ] ||
        { log "ublk-qcow2 add failed: $(cat "$W/add.err")"; return 1; }
    STOP="timeout 120 '$BIN' del -n ${DEV#/dev/ublkb}"
    info "queues_$2" "$("$BIN" list --json | jq -r ".[] | select(.device == \"$DEV\") | \"\(.queues)x\(.depth)\"")"
}

attach_loop() {
    DEV=$(losetup --direct-io=on -f --show "$RAW") || return 1
    STOP="losetup -d $DEV"
    # Direct I/O is silently dropped if the backing file cannot do it: check.
    [ "$(cat "/sys/block/${DEV#/dev/}/loop/dio" 2>/dev/null)" = 1 ] ||
        { log "$DEV is not using direct I/O"; return 1; }
}

attach_qemu_nbd() {
    DEV=/dev/nbd0
    timeout 60 qemu-nbd -c "$DEV" --cache=none --aio=io_uring -f qcow2 \
        --pid-file "$W/qemu-nbd.pid" "$QCOW2" 2>"$W/nbd.err" ||
        { log "qemu-nbd -c failed: $(cat "$W/nbd.err")"; return 1; }
    STOP="qemu-nbd -d $DEV; timeout 30 bash -c 'while kill -0 \$(cat $W/qemu-nbd.pid) 2>/dev/null; do sleep 0.1; done'"
    # The size shows up once the kernel side of the connection is set up.
    timeout 30 bash -c "until [ \"\$(blockdev --getsize64 $DEV 2>/dev/null)\" -gt 0 ] 2>/dev/null; do sleep 0.1; done" ||
        { log "$DEV never got a size"; return 1; }
}

detach() {
    local rc=0
    [ -z "$STOP" ] || eval "$STOP" >/dev/null || rc=1
    STOP= DEV=
    return $rc
}

# ---- measurement -------------------------------------------------------------
fio_iops() {  # NAME RW -> "READ WRITE"
    local json=$W/fio-$1-$2.json
    timeout $((SECS + 120)) fio --name=bench --filename="$DEV" --ioengine=io_uring --direct=1 \
        --rw="$2" --bs=4k --iodepth="$DEPTH" --numjobs=1 --runtime="$SECS" --time_based \
        --norandommap --gtod_reduce=1 --output-format=json --output="$json" \
        >"$W/fio.log" 2>&1 || { log "fio $1 $2 failed: $(tail -n 3 "$W/fio.log")"; return 1; }
    jq -er '.jobs[0] | select(.error == 0) | "\(.read.iops) \(.write.iops)"' "$json"
}

FAILED=0
run_path() {  # NAME ATTACH ARGS...
    local name=$1 rw res; shift
    log "$name ..."
    if ! "$@"; then
        for rw in randread randwrite; do echo "UQBENCH $name ${rw}_4k n/a n/a"; done
        detach; FAILED=1; return
    fi
    for rw in randread randwrite; do
        if res=$(fio_iops "$name" "$rw"); then
            echo "UQBENCH $name ${rw}_4k $res"
        else
            echo "UQBENCH $name ${rw}_4k n/a n/a"; FAILED=1
        fi
    done
    detach || { log "$name: detaching failed"; FAILED=1; }
}

run_path ublk_qcow2 attach_ublk "$QCOW2" qcow2
run_path ublk_raw attach_ublk "$RAW" raw
run_path loop_raw attach_loop
run_path qemu_nbd attach_qemu_nbd

# After all that writing, the qcow2 must still be consistent.
if qemu-img check -q "$QCOW2" >"$W/check.log" 2>&1; then
    info qcow2_check ok
else
    info qcow2_check failed; log "qemu-img check: $(head -n 5 "$W/check.log")"; FAILED=1
fi
exit $FAILED
