#!/usr/bin/env bash
# Interop under parallel load: nbdcopy writes through the export with many requests in flight
# (and several connections when the server advertises multi-conn), never sending FLUSH, then
# the server gets SIGTERM: everything must be on disk (a clean shutdown writes back), qemu-img
# check clean, content equal to the source.  Also overwrites over internal snapshots (COW of
# shared clusters under concurrency), a backing overlay, and parallel reads.
# timeout: 600
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

need_cmd nbdcopy || { skip "interop/nbdcopy" "nbdcopy not installed (libnbd-bin)"; exit 0; }

# make_data PATH SIZE SEED: random data with zero runs (nbdcopy turns those into zero writes)
# and blocks that are zero but for one byte.
make_data() {
    "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import random, sys
path, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
out = bytearray()
while len(out) < size:
    n = r.choice([512, 4096, 65536, 100000, 1 << 20])
    x = r.random()
    if x < 0.25:
        out += bytes(n)
    elif x < 0.3:
        b = bytearray(n); b[r.randrange(n)] = 1; out += b
    else:
        out += r.randbytes(n)
with open(path, "wb") as f:
    f.write(out[:size])
EOF
}

# copy_in DIR SEED [nbdcopy opts]: DIR/ours.qcow2 exists; copy DIR/data.raw (made here, same
# size) into it through the export without FLUSH; stop; judge against data.raw.
copy_in() {
    local dir=$1 seed=$2; shift 2
    local size; size=$(img_vsize "$dir/ours.qcow2")
    make_data "$dir/data.raw" "$size" "$seed" || { fail "could not make the data"; return 1; }
    start_nbd "$dir/ours.qcow2" || { fail "server did not start"; return 1; }
    timeout -k 5 300 nbdcopy "$@" "$dir/data.raw" "$(nbd_uri)" >&2 || fail "nbdcopy into the export failed"
    local rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || fail "server exit $rc after SIGTERM"
    [[ -n $FAIL ]] && return 1
    qimg_check "$dir/ours.qcow2" || rc=$?
    [[ $rc -eq 0 ]] || { fail "qemu-img check exit $rc"; return 1; }
    qimg_compare "$dir/data.raw" "$dir/ours.qcow2" raw qcow2 || { fail "content differs from the source"; return 1; }
}

case_copy() {
    local dir=$1 seed=$2 opts=$3 size=$4; shift 4
    make_image "$dir/ours.qcow2" "$size" "$opts" || { fail "could not make the image"; return; }
    copy_in "$dir" "$seed" "$@"
}
run_case "nbdcopy 32M, no flush, cluster_size=64k" case_copy "" 32M
run_case "nbdcopy 16M, no flush, cluster_size=4k" case_copy "cluster_size=4096" 16M
run_case "nbdcopy 8M, no flush, cluster_size=512" case_copy "cluster_size=512" 8M
run_case "nbdcopy 16M, no flush, refcount_bits=1 cluster_size=4k" case_copy "refcount_bits=1,cluster_size=4096" 16M
run_case "nbdcopy 16M, synchronous, cluster_size=4k" case_copy "cluster_size=4096" 16M --synchronous

# Overwrite a QEMU-filled image that has a snapshot: every write COWs a shared cluster while
# others are in flight.  Then the snapshot must still hold the old content.
case_copy_snapshot() {
    local dir=$1 seed=$2 opts=$3
    make_image "$dir/ours.qcow2" 16M "$opts" "write -P 77 0 16M" || { fail "could not make the image"; return; }
    qemu-img snapshot -c before "$dir/ours.qcow2" >&2 || { fail "could not snapshot"; return; }
    cp --sparse=always "$dir/ours.qcow2" "$dir/saved.qcow2"
    copy_in "$dir" "$seed" || return
    cp --sparse=always "$dir/ours.qcow2" "$dir/applied.qcow2"
    qemu-img snapshot -a before "$dir/applied.qcow2" >&2 || { fail "could not apply the snapshot"; return; }
    qimg_compare "$dir/applied.qcow2" "$dir/saved.qcow2" || fail "snapshot content changed"
}
run_case "nbdcopy over a snapshot, cluster_size=64k" case_copy_snapshot ""
run_case "nbdcopy over a snapshot, cluster_size=4k" case_copy_snapshot "cluster_size=4096"

# Into an overlay: 4k requests, 16 in flight per 64k cluster, each partial-cluster write must
# copy the rest from the backing file without losing its neighbours.
case_copy_overlay() {
    local dir=$1 seed=$2
    make_image "$dir/base.qcow2" 16M "" "write -P 66 0 16M" || { fail "could not make the backing"; return; }
    (cd "$dir" && qemu-img create -q -f qcow2 -o cluster_size=65536 -b base.qcow2 -F qcow2 ours.qcow2 16M) >&2 ||
        { fail "could not make the overlay"; return; }
    local sum; sum=$(md5sum <"$dir/base.qcow2")
    copy_in "$dir" "$seed" --request-size=4096 --flush
    [[ $(md5sum <"$dir/base.qcow2") == "$sum" ]] || fail "backing file modified"
}
run_case "nbdcopy into a backing overlay, 4k requests in 64k clusters" case_copy_overlay

# Parallel reads of a QEMU-written image (compressed and plain clusters).
case_read() {
    local dir=$1 seed=$2
    make_data "$dir/data.raw" $((16 << 20)) "$seed"
    # All compressed (zstd), then some clusters rewritten plain.
    timeout -k 5 300 qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd \
        "$dir/data.raw" "$dir/ours.qcow2" >&2 &&
        qio_cmds qcow2 "$dir/ours.qcow2" -- "write -P 5 1M 1M" "write -P 6 9M 256k" "write -P 7 12345 6789" ||
        { fail "could not fill the image"; return; }
    start_nbd "$dir/ours.qcow2" --read-only || { fail "server did not start"; return; }
    timeout -k 5 300 nbdcopy "$(nbd_uri)" "$dir/out.raw" >&2 || fail "nbdcopy from the export failed"
    local rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || fail "server exit $rc after SIGTERM"
    [[ -n $FAIL ]] && return
    qimg_compare "$dir/out.raw" "$dir/ours.qcow2" raw qcow2 || fail "content read differs"
}
run_case "nbdcopy parallel read, compressed and plain clusters" case_read
