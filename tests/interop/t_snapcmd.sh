#!/usr/bin/env bash
# Interop: 'ublk-qcow2 snapshot' and 'resize' against QEMU.  Every step is applied to our
# image with ublk-qcow2 and to a twin with qemu-img (the same qemu-io writes in between);
# after each: `qemu-img check` finds ours clean (no errors, no leaks), both list the same
# snapshots (ID, name, VM state, disk size), `qemu-img compare` finds the active images equal
# and every snapshot reads the same in both (qemu-img convert -l), and our NBD export of a
# snapshot (--snapshot, as qemu-nbd -l) reads exactly as qemu-img convert -l.
# Across cluster sizes, refcount widths, v2/v3, extended L2 and compressed clusters; then the
# refusals (each with a message naming the problem, the image unchanged); the progress bar of
# 'snapshot delete' (only when stderr is a terminal, checked with `script`).
# timeout: 600
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

need_cmd qemu-img qemu-io jq || { skip snapcmd "qemu-img, qemu-io or jq missing"; exit 0; }

# Snapshot table as both tools see it: id, name, vm state size (dates differ).
snaps() { qemu-img info -U --output=json "$1" | jq -c '[(.snapshots // [])[] | [.id, .name, ."vm-state-size"]]'; }

uq() { timeout -k 5 120 "$UQ" "$@" >"$UQ_TMP/uq.out" 2>&1 || { sed 's/^/#   /' "$UQ_TMP/uq.out" >&2; return 1; }; }

# same DIR: ours and twin agree (see the head of this file).
same() {
    local dir=$1 what=$2 rc=0 id
    qimg_check "$dir/ours.qcow2" || rc=$?
    [[ $rc -eq 0 ]] || { fail "$what: qemu-img check exit $rc"; return 1; }
    [[ $(snaps "$dir/ours.qcow2") == "$(snaps "$dir/twin.qcow2")" ]] ||
        { fail "$what: snapshot lists differ: $(snaps "$dir/ours.qcow2") vs $(snaps "$dir/twin.qcow2")"; return 1; }
    qimg_compare "$dir/ours.qcow2" "$dir/twin.qcow2" || { fail "$what: active content differs"; return 1; }
    for id in $(qemu-img info -U --output=json "$dir/ours.qcow2" | jq -r '(.snapshots // [])[].id'); do
        qemu-img convert -U -O raw -l "snapshot.id=$id" "$dir/ours.qcow2" "$dir/a.raw" &&
        qemu-img convert -U -O raw -l "snapshot.id=$id" "$dir/twin.qcow2" "$dir/b.raw" ||
            { fail "$what: qemu-img convert -l $id failed"; return 1; }
        qemu-img compare -q -f raw -F raw "$dir/a.raw" "$dir/b.raw" || { fail "$what: snapshot $id reads differently"; return 1; }
    done
}

# Both images get the same qemu-io commands.
both_io() {
    local dir=$1; shift
    qio_cmds qcow2 "$dir/ours.qcow2" -- "$@" && qio_cmds qcow2 "$dir/twin.qcow2" -- "$@" ||
        { fail "qemu-io failed"; return 1; }
}

# export_matches DIR SNAP: our NBD export of SNAP reads as qemu-img convert -l.
export_matches() {
    local dir=$1 sn=$2
    start_nbd "$dir/ours.qcow2" --snapshot "$sn" || { fail "nbd --snapshot $sn did not start"; return 1; }
    qemu-img convert -f raw -O raw "$(nbd_uri)" "$dir/exp.raw" 2>"$dir/conv.err" || fail "reading the export failed"
    # Read-only, as qemu-nbd -l.
    if qemu-io -f raw -c "write 0 512" "$(nbd_uri)" >"$dir/w.out" 2>&1 && ! grep -qi "denied\|read.only" "$dir/w.out"; then
        fail "the snapshot export accepted a write"
    fi
    stop_nbd || fail "server exit $? after SIGTERM"
    qemu-img convert -U -O raw -l "$sn" "$dir/ours.qcow2" "$dir/want.raw" 2>/dev/null ||
        qemu-img convert -U -O raw -l "snapshot.name=$sn" "$dir/ours.qcow2" "$dir/want.raw" ||
        { fail "qemu-img convert -l $sn failed"; return 1; }
    cmp -s "$dir/exp.raw" "$dir/want.raw" || { fail "export of $sn differs from qemu-img convert -l"; return 1; }
}

# case_cycle DIR SEED OPTS GROW PREFILL...: create, apply, delete, resize to GROW and back,
# each on both.  No compressed writes with 4-bit refcounts: QEMU packs so many compressed
# clusters into one host cluster that 4 bits cannot count one more reference (qemu-img
# snapshot -c fails on that as well).
case_cycle() {
    local dir=$1 seed=$2 opts=$3 grow=$4; shift 4
    local comp="write -c -P 42 12M 128k"
    [[ $opts == *refcount_bits=4* ]] && comp="write -P 42 12M 128k"
    make_image "$dir/ours.qcow2" 16M "$opts" "$@" || { fail "could not make the image"; return; }
    cp --sparse=always "$dir/ours.qcow2" "$dir/twin.qcow2"
    uq snapshot create "$dir/ours.qcow2" s1 || { fail "snapshot create s1 failed"; return; }
    qemu-img snapshot -c s1 "$dir/twin.qcow2"
    both_io "$dir" "write -P 41 1M 2M" "write -z 64k 64k" "discard 10M 1M" "$comp" || return
    uq snapshot create "$dir/ours.qcow2" s2 && qemu-img snapshot -c s2 "$dir/twin.qcow2" ||
        { fail "snapshot create s2 failed"; return; }
    both_io "$dir" "write -P 43 1536k 3M" "write -P 44 7340032 12345" || return
    same "$dir" "create s2" || return
    export_matches "$dir" s1 || return
    [[ -n $opts ]] || export_matches "$dir" "snapshot.id=2" || return
    # Apply the older one, write, delete it (apply by name, delete by ID as the lookup allows).
    uq snapshot apply "$dir/ours.qcow2" s1 && qemu-img snapshot -a s1 "$dir/twin.qcow2" ||
        { fail "snapshot apply s1 failed"; return; }
    same "$dir" "apply s1" || return
    both_io "$dir" "write -P 45 0 256k" "write -P 46 14M 1M" || return
    uq snapshot delete "$dir/ours.qcow2" 1 && qemu-img snapshot -d s1 "$dir/twin.qcow2" ||
        { fail "snapshot delete 1 failed"; return; }
    same "$dir" "delete s1" || return
    # Resize: grow (GROW needs a larger L1 table, except for zstd's case), a snapshot of the
    # new size, shrink back.  QEMU refuses to resize a v2 image with snapshots: so do we.
    if [[ $opts == *compat=0.10* ]]; then
        if "$UQ" resize "$dir/ours.qcow2" "$grow" >"$dir/r.out" 2>&1 ||
            ! grep -q "v2 image with snapshots" "$dir/r.out"; then
            fail "resizing a v2 image with snapshots: $(head -c 200 "$dir/r.out")"; return
        fi
        qemu-img snapshot -d s2 "$dir/twin.qcow2" && uq snapshot delete "$dir/ours.qcow2" s2 ||
            { fail "deleting s2 failed"; return; }
        uq resize "$dir/ours.qcow2" "$grow" && qemu-img resize -q "$dir/twin.qcow2" "$grow" ||
            { fail "resize without snapshots failed"; return; }
        same "$dir" "v2 grow" || return
        return
    fi
    uq resize "$dir/ours.qcow2" "$grow" && qemu-img resize -q "$dir/twin.qcow2" "$grow" ||
        { fail "resize to $grow failed"; return; }
    local end=$(( $(img_vsize "$dir/ours.qcow2") - 1048576 ))
    both_io "$dir" "write -P 47 $end 1M" || return
    uq snapshot create "$dir/ours.qcow2" s3 && qemu-img snapshot -c s3 "$dir/twin.qcow2" ||
        { fail "snapshot create s3 failed"; return; }
    same "$dir" "grow to $grow" || return
    "$UQ" snapshot list --json "$dir/ours.qcow2" >"$dir/list.json" 2>&1
    jq -e --argjson big "$(img_vsize "$dir/ours.qcow2")" '[.[] | ."disk-size"] == [16777216, $big]' \
        "$dir/list.json" >/dev/null || { fail "recorded disk sizes wrong: $(tr -d '\n' <"$dir/list.json")"; return; }
    both_io "$dir" "discard $end 1M" || return
    uq resize --shrink "$dir/ours.qcow2" 16M && qemu-img resize -q --shrink "$dir/twin.qcow2" 16M ||
        { fail "shrink to 16M failed"; return; }
    same "$dir" "shrink to 16M" || return
    # Apply s3 (the larger size): the image takes its size back, as in QEMU.
    uq snapshot apply "$dir/ours.qcow2" s3 && qemu-img snapshot -a s3 "$dir/twin.qcow2" ||
        { fail "snapshot apply s3 failed"; return; }
    same "$dir" "apply s3 (other size)" || return
    uq snapshot delete "$dir/ours.qcow2" s2 && uq snapshot delete "$dir/ours.qcow2" s3 &&
        qemu-img snapshot -d s2 "$dir/twin.qcow2" && qemu-img snapshot -d s3 "$dir/twin.qcow2" ||
        { fail "deleting the rest failed"; return; }
    same "$dir" "delete all" || return
    # Our list looks like qemu-img's (dates aside).
    qemu-img snapshot -c x "$dir/ours.qcow2"
    diff <("$UQ" snapshot list "$dir/ours.qcow2" | cut -c1-35) <(qemu-img snapshot -l "$dir/ours.qcow2" | cut -c1-35) >&2 ||
        fail "snapshot list output differs from qemu-img snapshot -l"
}

P_DEF=("write -P 165 0 3M" "write -c -P 7 4M 512k" "write -P 17 7340032 12345" "write -z 9M 1M")
run_case "snapcmd default" case_cycle "" 600M "${P_DEF[@]}"
run_case "snapcmd cluster_size=4k refcount_bits=4" case_cycle "cluster_size=4096,refcount_bits=4" 80M \
    "write -P 165 0 3M" "write -P 17 7340032 12345" "write -z 9M 1M"
run_case "snapcmd cluster_size=512 refcount_bits=64" case_cycle "cluster_size=512,refcount_bits=64" 80M "${P_DEF[@]}"
run_case "snapcmd compat=0.10" case_cycle "compat=0.10" 80M "${P_DEF[@]}"
# CI time budget: the compression type changes nothing here; SOAK=1 runs it too.
[[ ${SOAK:-0} == 1 ]] && run_case "snapcmd zstd" case_cycle "compression_type=zstd" 80M "${P_DEF[@]}"
run_case "snapcmd extended_l2 cluster_size=32k" case_cycle "extended_l2=on,cluster_size=32768" 80M \
    "write -P 165 0 3M" "write -c -P 7 4M 256k" "write -P 17 7340032 12345" "write -z 9M 1M"

# case_refusals DIR SEED: each refusal names the problem and changes nothing.
case_refusals() {
    local dir=$1
    make_image "$dir/ours.qcow2" 16M "" "write -P 1 0 2M" "write -P 2 14M 1M" || { fail "could not make the image"; return; }
    qemu-img snapshot -c s1 "$dir/ours.qcow2"
    cp "$dir/ours.qcow2" "$dir/twin.qcow2"
    refuse() {
        local pat=$1; shift
        if "$UQ" "$@" >"$dir/r.out" 2>&1; then fail "'$*' succeeded"; return 1; fi
        grep -qiE -- "$pat" "$dir/r.out" || { fail "'$*': no /$pat/ in: $(head -c 200 "$dir/r.out")"; return 1; }
        cmp -s "$dir/ours.qcow2" "$dir/twin.qcow2" || { fail "'$*' changed the image"; return 1; }
    }
    refuse "no snapshot 'nope'" snapshot delete "$dir/ours.qcow2" nope || return
    refuse "no snapshot 'nope'" snapshot apply "$dir/ours.qcow2" nope || return
    refuse "shrinking needs --shrink" resize "$dir/ours.qcow2" 8M || return
    refuse "15728640, past the new end, holds data|0xe00000, past the new end, holds data" \
        resize --shrink "$dir/ours.qcow2" 8M || return
    refuse "multiple of 512" resize "$dir/ours.qcow2" 20000001 || return
    refuse "1 to 255 bytes" snapshot create "$dir/ours.qcow2" "$(printf 'x%.0s' {1..300})" || return
    refuse "unknown action" snapshot frobnicate "$dir/ours.qcow2" || return
    # In use: our NBD server holds QEMU's writer lock.
    start_nbd "$dir/ours.qcow2" || { fail "nbd did not start"; return; }
    refuse "in use" snapshot create "$dir/ours.qcow2" s2
    refuse "in use" resize "$dir/ours.qcow2" 32M
    stop_nbd || fail "server exit $?"
    [[ -n $FAIL ]] && return
    # An external data file: no internal snapshots (QEMU's rule), no resize here.
    qemu-img create -q -f qcow2 -o data_file="$dir/ours.data" "$dir/ours.qcow2" 4M || { fail "image"; return; }
    cp "$dir/ours.qcow2" "$dir/twin.qcow2"
    refuse "external data file: internal snapshots are not supported" snapshot create "$dir/ours.qcow2" s1 || return
    refuse "images with an external data file are not resized" resize "$dir/ours.qcow2" 8M || return
    # Persistent bitmaps would have to grow with the disk: refused, not left stale.
    qemu-img create -q -f qcow2 "$dir/ours.qcow2" 4M && qemu-img bitmap --add "$dir/ours.qcow2" b1 ||
        { fail "image"; return; }
    # (A read-write open rewrites the bitmap directory: judged by QEMU, not by bytes.)
    if "$UQ" resize "$dir/ours.qcow2" 8M >"$dir/r.out" 2>&1; then fail "resize with bitmaps succeeded"; return; fi
    grep -q "images with persistent bitmaps are not resized" "$dir/r.out" || { fail "no message: $(head -c 200 "$dir/r.out")"; return; }
    qimg_check "$dir/ours.qcow2" || { fail "check after the refused resize: exit $?"; return; }
    qemu-img info --output=json "$dir/ours.qcow2" | python3 -c '
import json, sys
i = json.load(sys.stdin)
b = i["format-specific"]["data"]["bitmaps"]
sys.exit(not (i["virtual-size"] == 4 << 20 and len(b) == 1 and b[0]["name"] == "b1" and "in-use" not in b[0]["flags"]))' ||
        { fail "the refused resize changed size or bitmap"; return; }
    # refcount_bits=1 cannot count a second reference; 2 bits hold 3 (active + 2 snapshots).
    make_image "$dir/ours.qcow2" 4M "refcount_bits=1" "write -P 1 0 1M" || { fail "image"; return; }
    cp "$dir/ours.qcow2" "$dir/twin.qcow2"
    refuse "1-bit refcounts" snapshot create "$dir/ours.qcow2" s1 || return
    make_image "$dir/ours.qcow2" 4M "refcount_bits=2" "write -P 1 0 1M" || { fail "image"; return; }
    uq snapshot create "$dir/ours.qcow2" a && uq snapshot create "$dir/ours.qcow2" b || { fail "2-bit snapshots"; return; }
    cp "$dir/ours.qcow2" "$dir/twin.qcow2"
    refuse "as many references as 2-bit" snapshot create "$dir/ours.qcow2" c || return
    qimg_check "$dir/ours.qcow2" || fail "check after the refused create: exit $?"
    # Raw: no snapshots; resize truncates, shrink only over zeros.
    qemu-img create -q -f raw "$dir/r.raw" 4M
    qemu-io -f raw -c "write -P 3 0 1M" "$dir/r.raw" >/dev/null
    cp "$dir/r.raw" "$dir/ours.qcow2"; cp "$dir/r.raw" "$dir/twin.qcow2"
    refuse "raw image" snapshot create "$dir/ours.qcow2" s || return
    refuse "holds data" resize --shrink "$dir/ours.qcow2" 512K || return
    uq resize "$dir/ours.qcow2" 8M && uq resize --shrink "$dir/ours.qcow2" 2M ||
        { fail "raw resize failed"; return; }
    [[ $(stat -c %s "$dir/ours.qcow2") == 2097152 ]] || fail "raw size after resize: $(stat -c %s "$dir/ours.qcow2")"
    cmp -n 2097152 "$dir/ours.qcow2" "$dir/r.raw" || fail "raw content changed by resize"
}
run_case "snapcmd refusals" case_refusals

# Progress of 'snapshot delete': nothing on stderr when it is a file; on a terminal a bar that
# reaches 100% and is cleared.  Both deletes leave a clean image without the snapshot.
case_progress() {
    local dir=$1 bar=$'Deleting \\[#*[ ]*\\] *[0-9]+\\.[0-9]%'
    make_image "$dir/ours.qcow2" 64M "cluster_size=4096" "write -P 1 0 16M" || { fail "image"; return; }
    uq snapshot create "$dir/ours.qcow2" s1 || { fail "snapshot create"; return; }
    qio_cmds qcow2 "$dir/ours.qcow2" -- "write -P 2 0 8M" || { fail "qemu-io"; return; }
    cp "$dir/ours.qcow2" "$dir/tty.qcow2"
    "$UQ" snapshot delete "$dir/ours.qcow2" s1 2>"$dir/err.txt" || { fail "delete: $(cat "$dir/err.txt")"; return; }
    [[ ! -s $dir/err.txt ]] || { fail "delete wrote to a non-terminal stderr: $(head -c 200 "$dir/err.txt" | od -c | head -2)"; return; }
    if need_cmd script; then
        local cmd
        printf -v cmd '%q ' "$UQ" snapshot delete "$dir/tty.qcow2" s1
        timeout -k 5 120 script -q -e -c "$cmd" /dev/null </dev/null >"$dir/tty.txt" 2>&1 ||
            { fail "delete on a terminal failed: $(head -c 300 "$dir/tty.txt")"; return; }
        grep -qE "$bar" "$dir/tty.txt" && grep -q "100.0%" "$dir/tty.txt" && grep -q $'\r\e\\[K' "$dir/tty.txt" ||
            { fail "no progress bar on a terminal: $(head -c 300 "$dir/tty.txt" | od -c | head -3 | tr '\n' ' ')"; return; }
    else
        note "script (util-linux) is missing: terminal case not run"
        "$UQ" snapshot delete "$dir/tty.qcow2" s1 || { fail "delete"; return; }
    fi
    for f in ours tty; do
        qimg_check "$dir/$f.qcow2" || { fail "$f: qemu-img check exit $?"; return; }
        [[ $(snaps "$dir/$f.qcow2") == "[]" ]] || { fail "$f: snapshots left: $(snaps "$dir/$f.qcow2")"; return; }
    done
}
run_case "snapcmd delete progress" case_progress
