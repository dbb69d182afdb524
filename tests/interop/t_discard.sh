#!/usr/bin/env bash
# Discard and write-zeroes through the NBD export, with QEMU as the oracle: the file gives its
# blocks back after a trim (st_blocks), --discard=ignore changes nothing, --discard-no-unref keeps
# the clusters allocated, write-zeroes sets the zero flag without allocating and honours NO_HOLE,
# extended L2 zeroes and discards subclusters, partial clusters read as zeros where our own data
# was.  Every image ends `qemu-img check` clean (no leaks) and reads back in qemu-io as expected.
# timeout: 600
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

# KiB the file really occupies.
kib_used() { echo $(( $(stat -c '%b * %B' "$1") / 1024 )); }

# map_of IMAGE: qemu-img map without host offsets, one extent per line, merged by kind.
map_of() {
    qemu-img map -U --output=json "$1" |
        jq -c '.[] | {start, length, depth, zero, data, alloc: has("offset")}'
}

# on_server IMAGE [server options] -- COMMAND...: serve IMAGE, run qemu-io commands through
# NBD, stop; sets FAIL on any failure.
on_server() {
    local img=$1; shift
    local opts=()
    while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    start_nbd "$img" "${opts[@]}" || { fail "server did not start (exit $?)"; return 1; }
    qio_cmds raw "$(nbd_uri)" -- "$@" || fail "qemu-io through NBD failed: $*"
    local rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || fail "server exit $rc after SIGTERM"
    [[ -z $FAIL ]]
}

# expect IMAGE COMMAND...: qemu-io (QEMU's own reader) on the image after the server stopped.
expect() {
    local img=$1; shift
    qio_cmds qcow2 "$img" -r -- "$@" || fail "qemu-io reads of the result differ: $*"
}

check_clean() {
    local rc=0
    qimg_check "$1" || rc=$?
    [[ $rc -eq 0 ]] || fail "qemu-img check exit $rc (3 = leaked clusters)"
}

# --- TRIM gives the blocks back to the file system ------------------------------------------------
case_trim_shrinks() {
    local dir=$1 img=$1/img.qcow2 before after
    make_image "$img" 64M "" "write -P 7 0 40M" || { fail "could not make the image"; return; }
    before=$(kib_used "$img")
    # ignore (the default, as qemu-nbd): nothing changes.
    on_server "$img" --discard ignore -- "discard 0 40M" "flush" || return
    after=$(kib_used "$img")
    note "discard=ignore: $before KiB -> $after KiB"
    (( after >= before - 64 )) || fail "--discard=ignore released blocks ($before -> $after KiB)"
    expect "$img" "read -P 7 0 40M"
    # unmap: the clusters are freed and punched once the change is durable.
    on_server "$img" -- "discard 0 8M" "discard 8M 24M" "flush" "read -P 0 0 32M" || return
    after=$(kib_used "$img")
    note "discard=unmap: $before KiB -> $after KiB"
    (( after <= before - 30 * 1024 )) || fail "trimming 32 MiB freed only $((before - after)) KiB"
    check_clean "$img"
    expect "$img" "read -P 0 0 32M" "read -P 7 32M 8M"
}
run_case "discard: trim shrinks the file (st_blocks), ignore keeps it" case_trim_shrinks

# --- --discard-no-unref ------------------------------------------------------------------------------
# The clusters stay allocated (zero clusters with their offset kept: the next write reuses them
# in place), the data goes (blocks punched); a later write fills them again.
case_no_unref() {
    local dir=$1 img=$1/img.qcow2 before after
    make_image "$img" 16M "" "write -P 7 0 8M" || { fail "could not make the image"; return; }
    before=$(kib_used "$img")
    on_server "$img" --discard-no-unref -- "discard 1M 6M" "write -z -u 7M 1M" "flush" || return
    after=$(kib_used "$img")
    note "discard-no-unref: $before KiB -> $after KiB"
    (( after <= before - 6 * 1024 )) || fail "data not punched ($before -> $after KiB)"
    local zero_alloc
    zero_alloc=$(qemu-img map -U --output=json "$img" |
        jq '[.[] | select(.zero and .start >= 1048576 and .start < 8388608 and has("offset"))] | map(.length) | add')
    [[ $zero_alloc == 7340032 ]] || fail "discarded clusters not kept allocated (zero+offset: $zero_alloc bytes)"
    check_clean "$img"
    expect "$img" "read -P 7 0 1M" "read -P 0 1M 7M"
    # The workload, with QEMU (which lets the clusters go) as the content oracle.
    cp "$img" "$dir/ours.qcow2" && cp "$img" "$dir/ref.qcow2"
    apply_workload "$dir" qcow2 "$2" --server-opt --discard-no-unref --wl-opt --zero-unmap
}
if [[ $NBD_SERVER == qemu-nbd ]]; then
    skip "interop/discard: --discard-no-unref" "qemu-nbd 7.2 has no discard-no-unref"
else
    run_case "discard: --discard-no-unref" case_no_unref
fi

# --- write-zeroes: zero flag without allocating; NO_HOLE keeps clusters ---------------------------
case_write_zeroes() {
    local dir=$1 base=$1/base.qcow2 img=$1/img.qcow2 m
    make_image "$base" 16M "" "write -P 9 0 16M" || { fail "could not make the backing file"; return; }
    (cd "$dir" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 img.qcow2 16M) >&2 ||
        { fail "could not make the overlay"; return; }
    qio_cmds qcow2 "$img" -- "write -P 1 4M 2M" "write -P 2 8M 2M" || { fail "could not write"; return; }
    # Over the backing file: zero clusters, nothing allocated; on our clusters: NO_HOLE (qemu-io's
    # default over NBD) keeps them (zero flag with the offset), -u (may unmap) lets them go.
    on_server "$img" -- "write -z 0 2M" "write -z 4M 2M" "write -z -u 8M 2M" "flush" || return
    m=$(qemu-img map -U --output=json "$img")
    [[ $(jq -c '[.[] | select(.start < 2097152) | {zero, depth, o: has("offset")}] | unique' <<<"$m") == \
       '[{"zero":true,"depth":0,"o":false}]' ]] || fail "write-zeroes over the backing file allocated: $(head -c 300 <<<"$m")"
    [[ $(jq -c '[.[] | select(.start >= 4194304 and .start < 6291456) | {zero, o: has("offset")}] | unique' <<<"$m") == \
       '[{"zero":true,"o":true}]' ]] || fail "NO_HOLE write-zeroes did not keep the clusters"
    [[ $(jq -c '[.[] | select(.start >= 8388608 and .start < 10485760) | {zero, o: has("offset")}] | unique' <<<"$m") == \
       '[{"zero":true,"o":false}]' ]] || fail "write-zeroes with unmap kept the clusters"
    check_clean "$img"
    expect "$img" "read -P 0 0 2M" "read -P 9 2M 2M" "read -P 0 4M 2M" "read -P 0 8M 2M" \
        "read -P 9 10M 6M"
}
run_case "write-zeroes: zero flag without allocating, NO_HOLE, may-unmap" case_write_zeroes

# --- partial clusters ------------------------------------------------------------------------------
# Parts of clusters: where the data is ours it is punched (reads as zeros, blocks freed); over
# the backing file, snapshot-shared or compressed clusters a partial discard does nothing (as
# QEMU).  A partial write-zeroes writes zeros.  Nothing leaks.
case_partial() {
    local dir=$1 img=$1/img.qcow2
    make_image "$img" 16M "" "write -P 7 0 4M" "write -c -P 8 4M 256k" || { fail "could not make the image"; return; }
    qemu-img snapshot -c s1 "$img" >&2 || { fail "snapshot"; return; }
    qio_cmds qcow2 "$img" -- "write -P 6 1M 1M" || { fail "write"; return; }
    # 1M..2M is ours (written after the snapshot); 0..1M and 2M..4M are shared with s1.
    on_server "$img" -- "discard 1052672 8192" "discard 1110016 119808" "discard 4096 8192" \
        "discard 4198400 4096" "write -z 2101248 1024" "write -z -u 2998272 70144" "flush" || return
    check_clean "$img"
    expect "$img" "read -P 6 1M 4096" "read -P 0 1052672 8192" "read -P 6 1060864 49152" \
        "read -P 0 1110016 119808" "read -P 6 1229824 4096" \
        "read -P 7 4096 8192" "read -P 8 4198400 4096" "read -P 0 2101248 1024" "read -P 0 2998272 70144" \
        "read -P 7 2102272 896000"
    qemu-img snapshot -a s1 "$img" >&2 || fail "qemu-img snapshot -a s1 failed"
    expect "$img" "read -P 7 0 4M" "read -P 8 4M 256k"
}
if [[ $NBD_SERVER == qemu-nbd ]]; then
    skip "interop/discard: partial clusters" "QEMU ignores partial-cluster discards"
else
    run_case "discard: partial clusters zeroed where ours, snapshot and compressed kept" case_partial
fi

# --- extended L2: subcluster granularity ------------------------------------------------------------
# A 4 KiB write into an overlay allocates two 2 KiB subclusters, not the cluster (QEMU's map
# and ours match); subcluster-aligned discards and zeroes set zero bits, and a cluster left
# without data is let go and punched.
case_extl2() {
    local dir=$1 base=$1/base.qcow2 img=$1/img.qcow2 ref=$1/ref.qcow2 before after
    make_image "$base" 32M "" "write -P 9 0 32M" || { fail "could not make the backing file"; return; }
    (cd "$dir" && qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 img.qcow2 32M) >&2 ||
        { fail "could not make the overlay"; return; }
    cp "$img" "$ref"
    local cmds=("write -P 1 4096 4096" "write -P 2 100000 5000" "write -P 3 1M 16M" "flush")
    qio_cmds qcow2 "$ref" -- "${cmds[@]}" || { fail "qemu-io on the reference failed"; return; }
    on_server "$img" -- "${cmds[@]}" || return
    [[ $(map_of "$img") == "$(map_of "$ref")" ]] ||
        { fail "allocation map differs from QEMU's"; map_of "$img" | head -8 >&2; }
    qimg_compare "$img" "$ref" || fail "content differs from QEMU's"
    before=$(kib_used "$img")
    # Half of every cluster of 1M..17M discarded (16 of its 32 subclusters), then the other
    # half of the first 4 MiB: those clusters are then unused and let go.
    local c=() o
    for ((o = 1048576; o < 17825792; o += 65536)); do c+=("discard $o 32768"); done
    for ((o = 1048576 + 32768; o < 5242880; o += 65536)); do c+=("discard $o 32768"); done
    on_server "$img" -- "${c[@]}" "write -z 17825792 2048" "write -z -u 17829888 6144" "flush" || return
    after=$(kib_used "$img")
    note "subcluster discards: $before KiB -> $after KiB"
    (( after <= before - 9 * 1024 )) || fail "subcluster discards freed only $((before - after)) KiB"
    check_clean "$img"
    expect "$img" "read -P 9 0 4096" "read -P 1 4096 4096" "read -P 9 8192 8192" "read -P 2 100000 5000" \
        "read -P 0 1M 4M" "read -P 0 5M 32k" "read -P 3 5275648 32k" "read -P 0 17825792 2048" \
        "read -P 9 17827840 2048" "read -P 0 17829888 6144" "read -P 9 17836032 4096"
    [[ $(qemu-img map -U --output=json "$img" |
         jq '[.[] | select(.start >= 1048576 and .start < 5242880 and has("offset"))] | length') == 0 ]] ||
        fail "clusters left without data were not let go"
}
if [[ $NBD_SERVER == qemu-nbd ]]; then
    skip "interop/extended_l2: subcluster discards" "QEMU 7.2 ignores discards of parts of clusters"
else
    run_case "extended_l2: 4k write allocates subclusters; subcluster zeroes and discards" case_extl2
fi
