#!/usr/bin/env bash
# Error messages keep their root cause and name the file and the fix: a backing chain deeper
# than QEMU's limit, a missing base file far down a long chain (neither cut off by one prefix
# per image), -f qcow2 on a file that is not qcow2, sizes out of range (the range named), and -v
# naming the backing chain and data file served.  Each asserted on the message and the exit.
# timeout: 300
. "$(dirname "$0")/../lib/lib.sh"
need_cmd qemu-img || { skip messages "qemu-img is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1

# expect_msg NAME REGEX... -- ARGS...: `ublk-qcow2 ARGS` fails (exit 1) and its message matches
# every REGEX (extended, case-sensitive).
expect_msg() {
    local name=$1 pats=() p; shift
    while [[ $1 != -- ]]; do pats+=("$1"); shift; done
    shift
    bounded 60 "$UQ" "$@" >out.txt 2>&1
    local rc=$? why=
    [[ $rc -eq 1 ]] || why="exit $rc, want 1"
    for p in "${pats[@]}"; do
        [[ -n $why ]] || grep -qE -- "$p" out.txt || why="no '$p' in: $(head -c 300 out.txt)"
    done
    if [[ -z $why ]]; then ok "messages_$name"; else notok "messages_$name" "$why"; fi
}

# A chain of 35 qcow2 images with long names over a raw base (QEMU's limit is 32 below the top).
long=image-with-a-rather-long-name-so-that-prefixes-would-add-up
qemu-img create -q -f raw base.raw 1M
prev=base.raw pf=raw
for i in $(seq 1 35); do
    qemu-img create -q -f qcow2 -b "$prev" -F "$pf" "$long-$i.qcow2" 1M
    prev=$long-$i.qcow2 pf=qcow2
done
expect_msg chain_too_deep "deeper than 32 images" "in the backing chain of '$long-35.qcow2'" \
    -- nbd --socket "$W/s.sock" "$long-35.qcow2"
expect_msg info_chain_too_deep "deeper than 32 images" -- info --backing-chain "$long-35.qcow2"

# The base file gone, 25 images down: the message names it.
mv base.raw moved.raw
expect_msg chain_missing_base "backing file of '$long-1.qcow2'" "base.raw: No such file" \
    "in the backing chain of '$long-25.qcow2'" -- nbd --socket "$W/s.sock" "$long-25.qcow2"
mv moved.raw base.raw

# -f qcow2 on a raw file: not "bad magic", but what it is and what to do.
qemu-img create -q -f raw plain.raw 1M
expect_msg qcow2_on_raw_nbd "plain.raw is not a qcow2 image" "-f raw" -- nbd --format qcow2 --socket "$W/s.sock" plain.raw
expect_msg qcow2_on_raw_check "plain.raw is not a qcow2 image" -- check -f qcow2 plain.raw

# Sizes: negative, too large, and a bad --cache-size give the allowed range.
expect_msg2() {  # expect_msg with exit code 2 (bad arguments)
    local name=$1 pat=$2; shift 2
    bounded 60 "$UQ" "$@" >out.txt 2>&1
    local rc=$?
    if [[ $rc -eq 2 ]] && grep -qE -- "$pat" out.txt; then ok "messages_$name"
    else notok "messages_$name" "exit $rc, want 2: $(head -c 300 out.txt)"; fi
}
expect_msg2 create_negative_size "invalid size '-5G': a size cannot be negative \(0 to 8 EiB" create x.qcow2 -5G
expect_msg2 create_size_too_large "invalid size '99999999999T' \(0 to 8 EiB" create x.qcow2 99999999999T
expect_msg2 nbd_cache_size "invalid --cache-size 'lots' \(0 to 8 EiB" nbd --cache-size lots --socket s.sock plain.raw
[[ ! -e x.qcow2 ]] && ok messages_create_nothing_made || notok messages_create_nothing_made "x.qcow2 was made"

# -v names what else is served: the backing chain and the data file.
qemu-img create -q -f qcow2 -o data_file=top.data -b "$long-2.qcow2" -F qcow2 top.qcow2 1M
if bounded 60 "$UQ" nbd -v --fork --pid-file "$W/v.pid" --socket "$W/v.sock" top.qcow2 2>v.log; then
    kill -TERM "$(cat "$W/v.pid")"
    grep -q "backing chain: .*$long-2.qcow2 (qcow2), .*$long-1.qcow2 (qcow2), .*base.raw (raw); data file: .*top.data" v.log &&
        ok messages_verbose_names_files || notok messages_verbose_names_files "$(tr '\n' ' ' <v.log)"
else
    notok messages_verbose_names_files "the server did not start: $(tr '\n' ' ' <v.log)"
fi
bounded 30 bash -c 'while [[ -e $1 ]]; do sleep 0.05; done' _ "$W/v.sock"

san_clean && ok messages_sanitizers_clean || notok messages_sanitizers_clean "sanitizer report"
exit $LIB_FAILED
