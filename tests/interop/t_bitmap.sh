#!/usr/bin/env bash
# Interop: persistent dirty bitmaps.  Enabled bitmaps must come out of our server exactly as
# QEMU keeps them: the same seeded workload through our NBD export and through qemu-io (whose
# block layer tracks the bitmaps) must leave identical dirty maps, read on the QEMU side with
# qemu-nbd -B NAME and nbdinfo --map=qemu:dirty-bitmap:NAME; disabled bitmaps stay unchanged;
# flags are as QEMU leaves them (auto, no in-use).  While served, the bitmaps are flagged
# in-use; after kill -9 they stay so (inconsistent for QEMU, never silently stale), and a later
# open leaves them alone.
# timeout: 600
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

need_cmd qemu-nbd nbdinfo jq || { skip "bitmap" "qemu-nbd, nbdinfo or jq missing"; exit 0; }

# bitmap_maps IMAGE OUTPREFIX NAME...: the dirty maps QEMU sees, one file OUTPREFIX.NAME each
# ("start length dirty|clean" lines), all from one qemu-nbd export.
bitmap_maps() {
    local img=$1 out=$2 sock=$UQ_TMP/bm.sock pidf=$UQ_TMP/bm.pid rc=0 b; shift 2
    local bargs=()
    for b in "$@"; do bargs+=(-B "$b"); done
    rm -f "$sock" "$pidf"
    # -t: keep serving after each nbdinfo disconnects
    qemu-nbd -r -t --fork --pid-file "$pidf" -k "$sock" -f qcow2 "${bargs[@]}" "$img" >&2 || return 1
    for b in "$@"; do
        nbdinfo --map="qemu:dirty-bitmap:$b" "nbd+unix:///?socket=$sock" | awk '{ print $1, $2, $4 }' \
            >"$out.$b" || rc=1
    done
    local pid; pid=$(cat "$pidf")
    kill "$pid" 2>/dev/null
    timeout 30 tail --pid="$pid" -f /dev/null    # not our child: wait (bounded) for it to go
    return $rc
}

# bitmap_flags IMAGE NAME: its flags as qemu-img info lists them, comma-separated.
bitmap_flags() {
    qemu-img info -U --output=json "$1" |
        jq -r --arg n "$2" '."format-specific".data.bitmaps[] | select(.name == $n) | .flags | join(",")'
}

BITMAPS=(b64k b4k b1m disabled)

# case_bitmaps DIR SEED OPTS: an image with enabled bitmaps of three granularities (one with
# bits set by QEMU before we see it) and a disabled one.
case_bitmaps() {
    local dir=$1 seed=$2 opts=$3
    make_image "$dir/ours.qcow2" 16M "$opts" "${PREFILL[@]}" || { fail "could not make the image"; return; }
    qemu-img bitmap --add "$dir/ours.qcow2" b64k &&
        qemu-img bitmap --add -g 4096 "$dir/ours.qcow2" b4k &&
        qemu-img bitmap --add -g 1M "$dir/ours.qcow2" b1m &&
        qemu-img bitmap --add "$dir/ours.qcow2" disabled &&
        qio_cmds qcow2 "$dir/ours.qcow2" -- "write -P 3 6M 100k" "write -z 12M 4k" &&
        qemu-img bitmap --disable "$dir/ours.qcow2" disabled ||
        { fail "qemu-img bitmap failed"; return; }
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"
    bitmap_maps "$dir/ours.qcow2" "$dir/before" disabled || { fail "qemu-nbd/nbdinfo failed"; return; }
    apply_workload "$dir" qcow2 "$seed" --wl-opt --zero-unmap || return
    bitmap_maps "$dir/ref.qcow2" "$dir/map.ref" "${BITMAPS[@]}" &&
        bitmap_maps "$dir/ours.qcow2" "$dir/map.ours" "${BITMAPS[@]}" ||
        { fail "qemu-nbd/nbdinfo could not read the bitmaps"; return; }
    local b
    for b in "${BITMAPS[@]}"; do
        if ! cmp -s "$dir/map.ref.$b" "$dir/map.ours.$b"; then
            diff "$dir/map.ref.$b" "$dir/map.ours.$b" | head -10 >&2
            fail "bitmap $b differs from QEMU's"
        fi
        local want=auto got
        [[ $b == disabled ]] && want=
        got=$(bitmap_flags "$dir/ours.qcow2" "$b")
        [[ $got == "$want" ]] || fail "bitmap $b has flags '$got', QEMU leaves '$want'"
    done
    cmp -s "$dir/map.ours.disabled" "$dir/before.disabled" || fail "the disabled bitmap changed"
    grep -q dirty "$dir/map.ours.b64k" || fail "no dirty ranges at all (workload did nothing?)"
}

run_case "bitmaps: 64k, 4k, 1M granularity and a disabled one" case_bitmaps ""

# 512-byte clusters and granularity on a 256M disk: bitmap data in many clusters and a bitmap
# table of two clusters (stored as one contiguous run).
case_big_table() {
    local dir=$1 seed=$2
    make_image "$dir/ours.qcow2" 256M "cluster_size=512" && qemu-img bitmap --add -g 512 "$dir/ours.qcow2" b ||
        { fail "could not make the image"; return; }
    cp --sparse=always "$dir/ours.qcow2" "$dir/ref.qcow2"
    local cmds=("write -P 1 0 4k" "write -P 2 100M 70000" "write -z 200M 512" "write -P 3 268434944 512")
    qio_cmds qcow2 "$dir/ref.qcow2" -- "${cmds[@]}" || { fail "qemu-io failed"; return; }
    start_nbd "$dir/ours.qcow2" || { fail "server did not start"; return; }
    qio_cmds raw "$(nbd_uri)" -- "${cmds[@]}" || fail "qemu-io through NBD failed"
    stop_nbd || fail "server exit $?"
    [[ -n $FAIL ]] && return
    verdict "$dir" qcow2 || return
    bitmap_maps "$dir/ref.qcow2" "$dir/map.ref" b && bitmap_maps "$dir/ours.qcow2" "$dir/map.ours" b ||
        { fail "qemu-nbd/nbdinfo could not read the bitmap"; return; }
    cmp -s "$dir/map.ref.b" "$dir/map.ours.b" || fail "bitmap b differs from QEMU's"
}
run_case "bitmaps: 512-byte clusters and granularity, two-cluster bitmap table" case_big_table

# --- in-use while served, kill -9, reopen -------------------------------------------------------
D=$UQ_TMP/bm
mkdir -p "$D"
qemu-img create -q -f qcow2 "$D/disk.qcow2" 16M && qemu-img bitmap --add "$D/disk.qcow2" b0 &&
    qemu-img bitmap --add "$D/disk.qcow2" off && qemu-img bitmap --disable "$D/disk.qcow2" off ||
    { notok "bitmap/setup" "qemu-img failed"; exit 1; }

if start_nbd "$D/disk.qcow2"; then
    f=$(bitmap_flags "$D/disk.qcow2" b0)
    [[ $f == in-use,auto ]] && ok "bitmap/in-use while served" ||
        notok "bitmap/in-use while served" "flags '$f' (want in-use,auto)"
    [[ $(bitmap_flags "$D/disk.qcow2" off) == "" ]] && ok "bitmap/disabled bitmap untouched while served" ||
        notok "bitmap/disabled bitmap untouched while served" "flags '$(bitmap_flags "$D/disk.qcow2" off)'"
    qemu-io -f raw "$(nbd_uri)" -c "write -P 7 1M 64k" >/dev/null 2>&1 || notok "bitmap/kill -9" "write failed"
    kill -KILL "$NBD_PID"
    stop_nbd >/dev/null 2>&1
    f=$(bitmap_flags "$D/disk.qcow2" b0)
    if [[ $f != in-use,auto ]]; then
        notok "bitmap/kill -9 leaves it in-use" "flags '$f'"
    elif qemu-nbd -r --fork --pid-file "$UQ_TMP/x.pid" -k "$UQ_TMP/x.sock" -f qcow2 -B b0 "$D/disk.qcow2" \
        >"$UQ_TMP/x.out" 2>&1; then
        kill "$(cat "$UQ_TMP/x.pid")"
        timeout 30 tail --pid="$(cat "$UQ_TMP/x.pid")" -f /dev/null
        notok "bitmap/kill -9 leaves it in-use" "qemu-nbd exported the stale bitmap"
    elif grep -q -i "inconsistent" "$UQ_TMP/x.out"; then
        ok "bitmap/kill -9 leaves it in-use"
    else
        notok "bitmap/kill -9 leaves it in-use" "qemu-nbd: $(head -c 200 "$UQ_TMP/x.out")"
    fi
    rc=0; qimg_check "$D/disk.qcow2" || rc=$?
    [[ $rc -eq 0 || $rc -eq 3 ]] || notok "bitmap/kill -9: qemu-img check" "exit $rc"
else
    notok "bitmap/in-use while served" "server did not start"
fi

# An in-use bitmap is inconsistent for good: a later open neither tracks nor clears it, and QEMU
# can still remove it.
if start_nbd "$D/disk.qcow2"; then
    qemu-io -f raw "$(nbd_uri)" -c "write -P 8 2M 64k" >/dev/null 2>&1
    stop_nbd || notok "bitmap/reopen after a crash" "server exit $?"
    f=$(bitmap_flags "$D/disk.qcow2" b0)
    rc=0; qimg_check "$D/disk.qcow2" || rc=$?
    if [[ $f != in-use,auto ]]; then
        notok "bitmap/reopen after a crash" "flags '$f' (an inconsistent bitmap became trusted)"
    elif [[ $rc -ne 0 && $rc -ne 3 ]]; then
        notok "bitmap/reopen after a crash" "qemu-img check exit $rc"
    elif ! qemu-img bitmap --remove "$D/disk.qcow2" b0 >&2; then
        notok "bitmap/reopen after a crash" "qemu-img bitmap --remove failed"
    else
        ok "bitmap/reopen after a crash"
    fi
else
    notok "bitmap/reopen after a crash" "server did not start: $(head -c 200 "$NBD_LOG")"
fi

# A broken bitmap directory is refused (QEMU refuses it too), naming the bitmaps.
qemu-img create -q -f qcow2 "$D/bad.qcow2" 4M && qemu-img bitmap --add "$D/bad.qcow2" b0 &&
    "$PYTHON" - "$D/bad.qcow2" <<'EOF'
# The extension says 2 bitmaps; the directory has 1.
import struct, sys
from qhdr import find_extension
with open(sys.argv[1], "r+b") as f:
    h = bytearray(f.read(4096))
    off = find_extension(h, 0x23852875)
    h[off + 8:off + 12] = struct.pack(">I", 2)
    f.seek(0); f.write(h)
EOF
if start_nbd "$D/bad.qcow2"; then
    stop_nbd
    notok "bitmap/broken directory refused" "accepted the image"
elif grep -q -i "bitmap" "$NBD_LOG"; then
    ok "bitmap/broken directory refused"
else
    notok "bitmap/broken directory refused" "message does not name the bitmaps: $(head -c 200 "$NBD_LOG")"
fi
san_clean "$NBD_LOG" || notok "bitmap/sanitizers" "sanitizer report"
