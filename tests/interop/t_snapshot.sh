#!/usr/bin/env bash
# Interop: images with internal snapshots.  Writes through the server must copy clusters that
# snapshots share (refcount > 1) and leave every snapshot intact: after the workload, applying
# a snapshot (on a copy) must give back exactly the content saved when it was taken, and the
# snapshot table must be unchanged.
# timeout: 600
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

SNAP_WL=()  # extra apply_workload options for the next cases

snap_list() { qemu-img info -U --output=json "$1" | jq -c '.snapshots // []'; }

# case_snapshot DIR SEED OPTS NSNAP [prefill...]
case_snapshot() {
    local dir=$1 seed=$2 opts=$3 nsnap=$4; shift 4
    local prefill=("$@")
    [[ ${#prefill[@]} -gt 0 ]] || prefill=("${PREFILL[@]}")
    make_image "$dir/ours.qcow2" 16M "$opts" "${prefill[@]}" || { fail "could not make the image"; return; }
    local i
    for ((i = 1; i <= nsnap; i++)); do
        qemu-img snapshot -c "snap$i" "$dir/ours.qcow2" >&2 || { fail "could not create snap$i"; return; }
        cp --sparse=always "$dir/ours.qcow2" "$dir/saved$i.qcow2"
        # Diverge the active layer before the next snapshot / the workload.
        qio_cmds qcow2 "$dir/ours.qcow2" -- "write -P $((40 + i)) $((i * 2))M 1M" "write -z $((i * 64))k 64k" \
            "discard $((i + 9))M 128k" "write -P $((50 + i)) $((i * 3 + 100000)) 70000" ||
            { fail "could not write after snap$i"; return; }
    done
    local before after
    before=$(snap_list "$dir/ours.qcow2")
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"

    apply_workload "$dir" qcow2 "$seed" "${SNAP_WL[@]}" || return

    after=$(snap_list "$dir/ours.qcow2")
    [[ $before == "$after" ]] || { fail "snapshot table changed"; note "before: $before"; note "after: $after"; }
    for ((i = 1; i <= nsnap; i++)); do
        cp --sparse=always "$dir/ours.qcow2" "$dir/applied.qcow2"
        qemu-img snapshot -a "snap$i" "$dir/applied.qcow2" >&2 || { fail "qemu-img snapshot -a snap$i failed"; continue; }
        qimg_compare "$dir/applied.qcow2" "$dir/saved$i.qcow2" ||
            fail "snap$i content differs from when it was taken"
    done
    # Deleting the snapshots must leave exact refcounts (QEMU frees what they alone used).
    cp --sparse=always "$dir/ours.qcow2" "$dir/deleted.qcow2"
    for ((i = 1; i <= nsnap; i++)); do
        qemu-img snapshot -d "snap$i" "$dir/deleted.qcow2" >&2 || fail "qemu-img snapshot -d snap$i failed"
    done
    local rc=0
    qimg_check "$dir/deleted.qcow2" || rc=$?
    [[ $rc -eq 0 ]] || fail "qemu-img check after deleting the snapshots: exit $rc"
    qimg_compare "$dir/deleted.qcow2" "$dir/ref.qcow2" || fail "content changed by deleting the snapshots"
}

run_case "snapshot one" case_snapshot "" 1
run_case "snapshots two" case_snapshot "" 2
run_case "snapshots three, cluster_size=4k refcount_bits=4" case_snapshot "cluster_size=4096,refcount_bits=4" 3
# refcount_bits=2 holds at most 3: QEMU needs the headroom of one to apply a snapshot.
run_case "snapshot one, refcount_bits=2 cluster_size=512" case_snapshot "cluster_size=512,refcount_bits=2" 1
run_case "snapshots two, compat=0.10" case_snapshot "compat=0.10" 2
run_case "snapshots two, compressed zstd" case_snapshot "compression_type=zstd" 2 \
    "write -c -P 7 0 1M" "write -c 2M 2M" "write -c -P 9 6M 512k" "write -P 165 9M 1M"
# Discards and write-zeroes that may unmap on clusters the snapshots share: our references go,
# the snapshots' data stays (nothing shared is ever punched).
SNAP_WL=(--wl-opt --zero-unmap)
run_case "snapshots two, write-zeroes with unmap" case_snapshot "" 2
run_case "snapshots two, extended_l2 cluster_size=32k" case_snapshot "extended_l2=on,cluster_size=32768" 2 \
    "write -P 165 0 3M" "write -c -P 7 4M 256k" "write -P 17 7340032 12345" "write -z 9M 1M"
SNAP_WL=()
