#!/usr/bin/env bash
# Interop matrix: cluster sizes, refcount widths, compat levels, preallocation, dirty
# lazy-refcount images, compressed clusters, refcount-table growth, raw images, extended L2.
# timeout: 900
# soak-timeout: 3600
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

# name | qemu-img create -o options | virtual size
MATRIX=(
    "cluster_size=512|cluster_size=512|16M"
    "cluster_size=4k|cluster_size=4096|16M"
    "cluster_size=64k|cluster_size=65536|16M"
    "cluster_size=2M|cluster_size=2M|64M"
    "refcount_bits=1|refcount_bits=1|16M"
    "refcount_bits=2|refcount_bits=2|16M"
    "refcount_bits=4|refcount_bits=4|16M"
    "refcount_bits=8|refcount_bits=8|16M"
    "refcount_bits=16|refcount_bits=16|16M"
    "refcount_bits=32|refcount_bits=32|16M"
    "refcount_bits=64|refcount_bits=64|16M"
    "compat=0.10|compat=0.10|16M"
    "compat=0.10 cluster_size=4k|compat=0.10,cluster_size=4096|16M"
    "compat=1.1|compat=1.1|16M"
    "preallocation=metadata|preallocation=metadata|16M"
    "preallocation=falloc|preallocation=falloc|16M"
    "preallocation=full|preallocation=full|16M"
    "lazy_refcounts=on|lazy_refcounts=on|16M"
    "cluster_size=512 refcount_bits=2|cluster_size=512,refcount_bits=2|16M"
    # Extended L2 (32 subclusters per cluster, clusters of 16 KiB and more).
    "extended_l2 cluster_size=16k|extended_l2=on,cluster_size=16384|16M"
    "extended_l2 cluster_size=64k|extended_l2=on|16M"
    "extended_l2 cluster_size=2M|extended_l2=on,cluster_size=2M|64M"
)

for row in "${MATRIX[@]}"; do
    IFS='|' read -r name opts size <<<"$row"
    run_case "$name" case_standard "$opts" "$size"
done

# A metadata cache far smaller than the metadata (512 L2 tables of 512 bytes): the workload
# keeps evicting dirty L2 tables and refcount blocks, so write-back order is exercised.
run_case "cluster_size=512 cache-size=64k" case_standard "cluster_size=512" 16M \
    --server-opt --cache-size --server-opt 65536

# --- dirty image with lazy refcounts ---------------------------------------------------------
# QEMU writes with lazy refcounts and is killed: the dirty bit stays set and the refcounts may
# be stale.  The server must repair before writing; QEMU does the same on the reference copy.
case_dirty() {
    local dir=$1 seed=$2
    make_image "$dir/ours.qcow2" 16M "lazy_refcounts=on" "write -P 90 5M 1M" ||
        { fail "could not make the image"; return; }
    # (in a subshell: the abort is expected, its job message is noise)
    (qemu-io -t writethrough -f qcow2 "$dir/ours.qcow2" \
        -c 'write -P 1 0 1M' -c 'write -P 2 3M 192k' -c abort) >/dev/null 2>&1
    local inc
    inc=$(header_field "$dir/ours.qcow2" 72 8)
    if (( (inc & 1) == 0 )); then fail "setup: the dirty bit is not set after abort"; return; fi
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"
    apply_workload "$dir" qcow2 "$seed" --extra "read -P 1 0 1M" --extra "read -P 2 3M 192k" ||
        return
    inc=$(header_field "$dir/ours.qcow2" 72 8)
    (( (inc & 1) == 0 )) || fail "dirty bit still set after a clean shutdown"
}
run_case "lazy_refcounts dirty image" case_dirty

# --- compressed clusters ---------------------------------------------------------------------
# Compressed extents written by QEMU (several per host cluster), read back through the server,
# then partially overwritten by fixed writes and by the workload.
COMPRESSED_PREFILL=("write -c -P 7 0 1M" "write -c -P 8 1M 64k" "write -c 2M 2M"
                    "write -c -P 9 6M 512k" "write -c -P 10 12M 1M")
COMPRESSED_EXTRA=("read -P 7 0 1M" "read -P 8 1M 64k" "read -P 9 6M 512k"
                  "write -P 3 1000 3000" "write -P 4 65000 1000" "write -P 5 1048000 2000"
                  "write -z 6291456 4096" "read -P 9 6295552 4096" "read -P 10 12M 1M")
case_compressed() {
    local dir=$1 seed=$2 opts=$3
    make_image "$dir/ours.qcow2" 16M "$opts" "${COMPRESSED_PREFILL[@]}" ||
        { fail "could not make the image"; return; }
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"
    local extra=() c
    for c in "${COMPRESSED_EXTRA[@]}"; do extra+=(--extra "$c"); done
    apply_workload "$dir" qcow2 "$seed" "${extra[@]}"
}
run_case "compressed zlib" case_compressed "compression_type=zlib"
run_case "compressed zstd" case_compressed "compression_type=zstd"
run_case "compressed zlib compat=0.10" case_compressed "compat=0.10"
run_case "compressed zstd cluster_size=4k" case_compressed "compression_type=zstd,cluster_size=4096"
run_case "compressed zstd extended_l2 cluster_size=32k" case_compressed \
    "compression_type=zstd,extended_l2=on,cluster_size=32768"

# --- refcount table growth -------------------------------------------------------------------
# 512-byte clusters with 64-bit refcounts: one refcount block covers 64 clusters, one table
# cluster 64 blocks (2 MiB of clusters), so filling 16 MiB must grow the refcount table.
case_growth() {
    local dir=$1 seed=$2
    make_image "$dir/ours.qcow2" 16M "cluster_size=512,refcount_bits=64" ||
        { fail "could not make the image"; return; }
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"
    local before after
    before=$(header_field "$dir/ours.qcow2" 56 4)
    apply_workload "$dir" qcow2 "$seed" --extra "write -P 33 0 16M" --extra "read -P 33 15M 1M" \
        --wl-opt --ops --wl-opt 100 || return
    after=$(header_field "$dir/ours.qcow2" 56 4)
    note "refcount_table_clusters $before -> $after"
    (( after > before )) || fail "refcount_table_clusters did not grow ($before -> $after)"
}
run_case "refcount table growth cluster_size=512 refcount_bits=64" case_growth

# --- raw images ------------------------------------------------------------------------------
case_raw() {
    local dir=$1 seed=$2
    truncate -s 16M "$dir/ours.raw"
    qio_cmds raw "$dir/ours.raw" -- "write -P 165 0 3M" || { fail "could not make the image"; return; }
    cp --sparse=always "$dir/ours.raw" "$dir/ref.raw"
    apply_workload "$dir" raw "$seed" --server-opt --format --server-opt raw
}
run_case "format=raw" case_raw

# --- extended L2, read-only ------------------------------------------------------------------
# Subcluster allocation (and zero) bits written by QEMU; the server only has to read them.
case_extl2() {
    local dir=$1 seed=$2
    make_image "$dir/back.qcow2" 16M "" "write -P 200 0 16M" || { fail "could not make the backing"; return; }
    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=65536 -b back.qcow2 -F qcow2 \
        "$dir/img.qcow2" >&2 || { fail "could not make the image"; return; }
    qio_cmds qcow2 "$dir/img.qcow2" -- "write -P 1 0 4k" "write -P 2 69632 8192" "write -P 3 200000 300000" \
        "write -z 1M 4k" "write -z 2M 64k" "write -P 4 3M 64k" "write -z 3215360 8192" \
        "discard 4M 64k" "write -c -P 5 5M 64k" "write -P 6 5246976 512" ||
        { fail "could not write the image"; return; }
    local sum_before sum_after
    sum_before=$(md5sum <"$dir/img.qcow2")
    start_nbd "$dir/img.qcow2" --read-only || { fail "server did not start (exit $?)"; return; }
    local rc=0
    timeout -k 5 300 qemu-img compare -f qcow2 -F raw "$dir/img.qcow2" "$(nbd_uri)" >&2 || rc=$?
    [[ $rc -eq 0 ]] || fail "qemu-img compare image vs export exit $rc"
    qio_cmds raw "$(nbd_uri)" -r -- "read -P 2 69632 8192" "read -P 200 77824 4096" "read -P 0 1M 4k" \
        "read -P 200 1052672 4096" "read -P 5 5M 4096" || fail "pattern reads through NBD failed"
    rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || fail "server exit $rc after SIGTERM"
    sum_after=$(md5sum <"$dir/img.qcow2")
    [[ $sum_before == "$sum_after" ]] || fail "read-only export modified the image"
}
run_case "extended_l2=on read-only" case_extl2
