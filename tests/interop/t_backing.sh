#!/usr/bin/env bash
# Interop: backing chains (qcow2 and raw backing, relative names, chains, a backing file
# shorter than the overlay, the server started from another directory).  The backing files
# must come out unchanged.
# timeout: 600
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

# make_base PATH FMT SIZE: a backing file full of recognisable data.
make_base() {
    local path=$1 fmt=$2 size=$3
    if [[ $fmt == raw ]]; then
        truncate -s "$size" "$path"
    else
        qemu-img create -q -f qcow2 "$path" "$size" >&2 || return 1
    fi
    qio_cmds "$fmt" "$path" -- "write -P 200 0 $size" "write -P 201 1M 1M" "write -z 3M 64k" \
        "write -P 202 4194000 70000"
}

# make_overlay DIR BACKING_NAME BACKING_FMT SIZE [OPTS]: DIR/ours.qcow2 over BACKING_NAME
# (kept exactly as given, relative names included), a few QEMU writes, copied to DIR/ref.qcow2.
make_overlay() {
    local dir=$1 bname=$2 bfmt=$3 size=$4 opts=${5:-}
    local o=()
    [[ -n $opts ]] && o=(-o "$opts")
    (cd "$dir" && qemu-img create -q -f qcow2 "${o[@]}" -b "$bname" -F "$bfmt" ours.qcow2 "$size") >&2 ||
        return 1
    qio_cmds qcow2 "$dir/ours.qcow2" -- "write -P 7 100000 5000" "write -P 8 2M 64k" || return 1
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"
}

# Reads that only pass if the backing file is found and read correctly.
BACKING_READS=("read -P 200 0 4096" "read -P 201 1M 1M" "read -P 0 3M 64k" "read -P 202 4194000 70000"
               "read -P 7 100000 5000" "read -P 200 105000 3000")

# check_unchanged FILE SUM: the backing file must be as it was.
check_unchanged() {
    [[ $(md5sum <"$1") == "$2" ]] || fail "backing file $(basename "$1") was modified"
}

# case_backing DIR SEED BFMT [overlay create opts] [apply_workload opts...]
case_backing() {
    local dir=$1 seed=$2 bfmt=$3 opts=$4; shift 4
    make_base "$dir/base.$bfmt" "$bfmt" 16M || { fail "could not make the backing file"; return; }
    local sum; sum=$(md5sum <"$dir/base.$bfmt")
    make_overlay "$dir" "base.$bfmt" "$bfmt" 16M "$opts" || { fail "could not make the overlay"; return; }
    local extra=() c
    for c in "${BACKING_READS[@]}"; do extra+=(--extra "$c"); done
    apply_workload "$dir" qcow2 "$seed" "${extra[@]}" "$@"
    check_unchanged "$dir/base.$bfmt" "$sum"
}
run_case "backing qcow2" case_backing qcow2 ""
run_case "backing raw" case_backing raw ""
run_case "backing qcow2, overlay cluster_size=4k" case_backing qcow2 "cluster_size=4096"
run_case "backing qcow2, overlay cluster_size=2M" case_backing qcow2 "cluster_size=2M"
# v2 has no zero flag: a discard there would uncover the backing data, so it does nothing (as in
# QEMU), and zeroes are written for real.
run_case "backing qcow2, overlay compat=0.10" case_backing qcow2 "compat=0.10" --wl-opt --zero-unmap
# Write-zeroes that may unmap (NBD without NO_HOLE): clusters let go, never uncovering the
# backing file.
run_case "backing qcow2, write-zeroes with unmap" case_backing qcow2 "" --wl-opt --zero-unmap
# Extended L2 overlays: partial writes allocate subclusters, the rest of the cluster keeps
# reading from the backing file; zeroes and discards at subcluster granularity.
run_case "backing qcow2, overlay extended_l2 cluster_size=64k" case_backing qcow2 "extended_l2=on" \
    --wl-opt --zero-unmap
run_case "backing raw, overlay extended_l2 cluster_size=16k" case_backing raw "extended_l2=on,cluster_size=16384"

# Relative backing name into a sibling directory, server started from an unrelated directory
# with a relative image path: the name must be resolved against the overlay's directory.
case_relative() {
    local dir=$1 seed=$2
    mkdir -p "$dir/images/base" "$dir/images/vm" "$dir/elsewhere"
    make_base "$dir/images/base/base.qcow2" qcow2 16M || { fail "could not make the backing file"; return; }
    local sum; sum=$(md5sum <"$dir/images/base/base.qcow2")
    make_overlay "$dir/images/vm" ../base/base.qcow2 qcow2 16M || { fail "could not make the overlay"; return; }
    local extra=() c
    for c in "${BACKING_READS[@]}"; do extra+=(--extra "$c"); done
    apply_workload "$dir/images/vm" qcow2 "$seed" "${extra[@]}" --cwd "$dir/elsewhere"
    check_unchanged "$dir/images/base/base.qcow2" "$sum"
}
run_case "backing relative name, server started elsewhere" case_relative

# Absolute backing path, server started from /.
case_absolute() {
    local dir=$1 seed=$2
    make_base "$dir/base.raw" raw 16M || { fail "could not make the backing file"; return; }
    local sum; sum=$(md5sum <"$dir/base.raw")
    make_overlay "$dir" "$dir/base.raw" raw 16M || { fail "could not make the overlay"; return; }
    apply_workload "$dir" qcow2 "$seed" --extra "read -P 201 1M 1M" --cwd /
    check_unchanged "$dir/base.raw" "$sum"
}
run_case "backing absolute name, server started from /" case_absolute

# A backing file shorter than the overlay: past its end the overlay reads zeros, also when a
# write straddling the end copies the rest of its cluster.
case_short() {
    local dir=$1 seed=$2 bfmt=$3
    make_base "$dir/base.$bfmt" "$bfmt" 8M || { fail "could not make the backing file"; return; }
    local sum; sum=$(md5sum <"$dir/base.$bfmt")
    make_overlay "$dir" "base.$bfmt" "$bfmt" 16M || { fail "could not make the overlay"; return; }
    apply_workload "$dir" qcow2 "$seed" --extra "read -P 200 8388096 512" --extra "read -P 0 8M 1M" \
        --extra "read -P 0 16773120 4096" --extra "write -P 9 8384000 10000" \
        --extra "read -P 200 8323072 60928" --extra "read -P 0 8394000 4096"
    check_unchanged "$dir/base.$bfmt" "$sum"
}
run_case "backing qcow2 shorter than the overlay" case_short qcow2
run_case "backing raw shorter than the overlay" case_short raw

# base.raw <- mid.qcow2 <- ours.qcow2: reads fall through two levels.
case_chain() {
    local dir=$1 seed=$2
    make_base "$dir/base.raw" raw 16M || { fail "could not make the backing file"; return; }
    (cd "$dir" && qemu-img create -q -f qcow2 -b base.raw -F raw mid.qcow2 16M) >&2 ||
        { fail "could not make mid"; return; }
    qio_cmds qcow2 "$dir/mid.qcow2" -- "write -P 50 6M 1M" "write -z 1M 64k" || { fail "could not write mid"; return; }
    local sum1 sum2; sum1=$(md5sum <"$dir/base.raw"); sum2=$(md5sum <"$dir/mid.qcow2")
    make_overlay "$dir" mid.qcow2 qcow2 16M "cluster_size=16384" || { fail "could not make the overlay"; return; }
    apply_workload "$dir" qcow2 "$seed" --extra "read -P 50 6M 1M" --extra "read -P 0 1M 64k" \
        --extra "read -P 201 1114112 4096" --extra "read -P 200 0 4096"
    check_unchanged "$dir/base.raw" "$sum1"
    check_unchanged "$dir/mid.qcow2" "$sum2"
}
run_case "backing chain raw <- qcow2 <- qcow2" case_chain
