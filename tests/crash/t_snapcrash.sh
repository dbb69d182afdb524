#!/usr/bin/env bash
# Power loss and faults during the exclusive operations: snapshot create, delete, apply and
# resize (grow with a new L1 table; shrink).  crashsim runs one operation with the engine and
# records its writes and syncs; crash images are the starting image plus every write a
# completed sync made durable plus a random subset (dropped, torn, reordered) of the rest.
# Verdicts for every crash image:
#   (a) qemu-img check: 0 or 3 (leaks); a v3 image left dirty (the operations set the dirty
#       bit while refcounts and COPIED flags may disagree) must repair to clean with
#       'qemu-img check -r all'; v2 has no dirty bit, so there the only other finding allowed
#       is a COPIED flag missing on a cluster whose refcount already dropped to 1 (harmless:
#       the next write copies it; -r all sets it) -- and it must repair to clean too;
#   (b) the snapshot list is the one before or the one after; the active content is the old
#       or the new one (apply: either snapshot's; resize: old or new size, data kept); every
#       snapshot listed reads back exactly as when it was taken (qemu-img convert -l);
#   (c) the engine opens it (repairing a dirty one), writes, flushes, closes: check 0 or 3.
# Then fault injection: EIO on the nth metadata write or sync of create and delete, for each
# n until none is hit: the operation fails cleanly or completes, the image satisfies (a)-(b).
# timeout: 600
# soak-timeout: 3600
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/lib.sh"

need_cmd qemu-img qemu-io cc jq || { skip snapcrash "qemu-img, qemu-io, cc or jq missing"; exit 0; }
find_crashsim snapcrash || exit 1
crash_workdir

STATES=${SNAPCRASH_STATES:-4}
[[ ${SOAK:-0} == 1 ]] && STATES=60
SEED=${POWERLOSS_SEED:-$((RANDOM % 1000 + 1))}
TOTAL=0

# same_view A B: equal once the shorter is padded with zeros (qemu-img convert -l shows a
# snapshot at the image's current size, as QEMU loads one).
same_view() {
    local a=$1 b=$2 sa sb
    sa=$(stat -c %s "$a"); sb=$(stat -c %s "$b")
    if [[ $sa -lt $sb ]]; then cp "$a" "$d/pad.raw"; truncate -s "$sb" "$d/pad.raw"; a=$d/pad.raw
    elif [[ $sb -lt $sa ]]; then cp "$b" "$d/pad.raw"; truncate -s "$sa" "$d/pad.raw"; b=$d/pad.raw; fi
    cmp -s "$a" "$b"
}

snaps_of() { qemu-img info -U --output=json "$1" 2>/dev/null | jq -c '[(.snapshots // [])[] | .id + ":" + .name]'; }

# prep CONFIG DIR: DIR/init.qcow2 with data, compressed clusters and snapshot "s1" (and "s2"
# for apply/delete); prints the raw backing file or -.
prep() {
    local cfg=$1 d=$2 back=-
    case $cfg in
    v3)     # 64 KiB clusters, 16-bit refcounts
        qemu-img create -q -f qcow2 -o cluster_size=64k "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x11 0 1M" "write -c -P 0x22 1536k 256k" ;;
    v2)     # compat 0.10, 4 KiB clusters, over a raw backing file longer than the image
        qemu-img create -q -f raw "$d/backing.raw" 8M &&
        timeout 60 qemu-io -f raw "$d/backing.raw" -c "write -P 0x41 0 8M" >/dev/null &&
        qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b backing.raw -F raw "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x51 8k 64k" "write -c -P 0x52 1M 32k" && back=$d/backing.raw ;;
    ext)    # extended L2, 32 KiB clusters
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x91 4k 8k" "write -P 0x92 100k 70k" "write -c -P 0x93 1M 64k" ;;
    tiny)   # 512-byte clusters, 64-bit refcounts: multi-cluster tables
        qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$d/init.qcow2" 2M &&
        qio_quiet "$d/init.qcow2" "write -P 0x61 0 300k" ;;
    esac || return 1
    qemu-img snapshot -c s1 "$d/init.qcow2" &&
    qio_quiet "$d/init.qcow2" "write -P 0x33 512k 192k" "write -z 64k 64k" &&
    qemu-img snapshot -c s2 "$d/init.qcow2" &&
    qio_quiet "$d/init.qcow2" "write -P 0x34 768k 64k" || return 1
    echo "$back"
}

# views DIR IMAGE PREFIX: PREFIX.active.raw and PREFIX.snap.ID.raw for every snapshot.
views() {
    local d=$1 img=$2 p=$3 id
    qemu-img convert -U -O raw "$img" "$p.active.raw" || return 1
    for id in $(qemu-img info -U --output=json "$img" | jq -r '(.snapshots // [])[].id'); do
        qemu-img convert -U -O raw -l "snapshot.id=$id" "$img" "$p.snap.$id.raw" || return 1
    done
}

# v2_copied_only: $d/check.out (v2 image) reports nothing but COPIED flags missing where the
# refcount is 1: the one disagreement v2 (no dirty bit) may be left with.
v2_copied_only() {
    [[ $cfg == v2 ]] && grep -q -E '^ERROR' "$d/check.out" &&
        ! grep -E '^ERROR' "$d/check.out" | grep -v -q -E 'OFLAG_COPIED (data|L2) cluster: .*refcount=1$'
}

# verdict IMG: checks (a) and (b) of one image against $d's expectations; prints why on failure.
verdict() {
    local img=$1 dirty=$2 rc out list id
    if [[ $dirty == 1 ]]; then
        cp "$img" "$d/rep.qcow2"
        qemu-img check -r all "$d/rep.qcow2" >"$d/check.out" 2>&1
        qemu-img check "$d/rep.qcow2" >"$d/check.out" 2>&1 ||
            { echo "(a) dirty image does not repair to clean: $(grep -m1 -E 'ERROR|Leaked' "$d/check.out")"; return 1; }
    else
        qemu-img check "$img" >"$d/check.out" 2>&1; rc=$?
        if [[ $rc -eq 2 ]] && v2_copied_only; then
            cp "$img" "$d/rep.qcow2"
            qemu-img check -r all "$d/rep.qcow2" >/dev/null 2>&1
            qemu-img check "$d/rep.qcow2" >/dev/null 2>&1 || { echo "(a) v2 COPIED findings do not repair"; return 1; }
            rc=0
        fi
        [[ $rc -eq 0 || $rc -eq 3 ]] ||
            { echo "(a) qemu-img check exit $rc: $(grep -m1 -E 'ERROR|corrupt' "$d/check.out")"; return 1; }
        [[ $rc -eq 3 ]] && leaks=$((leaks + 1))
    fi
    list=$(snaps_of "$img")
    [[ $list == "$before" || $list == "$after" ]] || { echo "(b) snapshot list $list is neither $before nor $after"; return 1; }
    qemu-img convert -U -O raw "$img" "$d/got.raw" 2>/dev/null || { echo "(b) qemu-img convert failed"; return 1; }
    local ok=0 cand
    for cand in $active_ok; do
        cmp -s "$d/got.raw" "$cand" && ok=1
    done
    [[ $ok == 1 ]] || { echo "(b) the active content is neither the old nor the new one"; return 1; }
    # CI reads back the snapshot the operation is about and the first; SOAK=1 every one.
    for id in $(jq -r '.[] | sub(":.*"; "")' <<<"$list"); do
        [[ ${SOAK:-0} == 1 || $id == "$focus" || $id == 1 ]] || continue
        qemu-img convert -U -O raw -l "snapshot.id=$id" "$img" "$d/got.raw" 2>/dev/null ||
            { echo "(b) cannot read snapshot $id"; return 1; }
        same_view "$d/got.raw" "$d/want.snap.$id.raw" || { echo "(b) snapshot $id reads differently from when it was taken"; return 1; }
    done
    return 0
}

# run CONFIG OP ARG: record OP on a fresh copy, then check STATES crash images.
run() {
    local cfg=$1 op=$2 arg=$3 name="snapcrash_${1}_${2}" d="$W/$1.$2"
    mkdir -p "$d"
    prep "$cfg" "$d" >/dev/null || { notok "$name" "cannot prepare the starting image"; return; }
    cp "$d/init.qcow2" "$d/work.qcow2"
    views "$d" "$d/init.qcow2" "$d/want" || { notok "$name" "cannot read the starting image"; return; }
    before=$(snaps_of "$d/init.qcow2")
    if ! timeout -k 5 120 "$CRASHSIM" op "$d/work.qcow2" "$d/log" "$op" "$arg" >"$d/op.out" 2>&1 ||
        ! grep -q '^op=ok' "$d/op.out"; then
        notok "$name" "the operation failed: $(head -c 300 "$d/op.out")"; return
    fi
    qimg_check "$d/work.qcow2" || { notok "$name" "qemu-img check after the operation: exit $?"; return; }
    after=$(snaps_of "$d/work.qcow2")
    views "$d" "$d/work.qcow2" "$d/new" || { notok "$name" "cannot read the result"; return; }
    # A new snapshot must read as the active image did; the others as they did.
    local id
    for id in $(jq -r '.[] | sub(":.*"; "")' <<<"$after"); do
        [[ -e $d/want.snap.$id.raw ]] || cp "$d/want.active.raw" "$d/want.snap.$id.raw"
        same_view "$d/new.snap.$id.raw" "$d/want.snap.$id.raw" ||
            { notok "$name" "snapshot $id differs after the operation"; return; }
    done
    active_ok="$d/want.active.raw $d/new.active.raw"
    focus=$(jq -r '.[-1] | sub(":.*"; "")' <<<"$after")
    case $op in
    snapshot-create|snapshot-delete)
        cmp -s "$d/new.active.raw" "$d/want.active.raw" || { notok "$name" "the active content changed"; return; } ;;
    resize|shrink)
        # The old content, cut or padded with zeros to the new size.
        cp "$d/want.active.raw" "$d/exp.raw"; truncate -s "$arg" "$d/exp.raw"
        cmp -s "$d/new.active.raw" "$d/exp.raw" || { notok "$name" "content after the resize is wrong"; return; } ;;
    esac
    local states leaks=0 dirty_n=0 fails=0 first= i t dirty rest why
    timeout -k 5 120 "$CRASHSIM" crash "$d/log" "$d/init.qcow2" "$d/st" --seed "$SEED" \
        --count-states "$STATES" >"$d/states" 2>"$d/crash.err" ||
        { notok "$name" "crashsim crash failed: $(head -c 200 "$d/crash.err")"; return; }
    while read -r i t dirty rest; do
        dirty=${dirty#dirty=}
        [[ $dirty == 1 ]] && dirty_n=$((dirty_n + 1))
        if ! why=$(verdict "$d/st.$i.qcow2" "$dirty"); then
            [[ -n $first ]] || first="state $i ($t): $why"; fails=$((fails + 1)); continue
        fi
        if ! timeout -k 5 120 "$CRASHSIM" reopen "$d/st.$i.qcow2" >"$d/reopen.out" 2>&1; then
            [[ -n $first ]] || first="state $i ($t): (c) $(head -c 200 "$d/reopen.out")"; fails=$((fails + 1)); continue
        fi
        qemu-img check "$d/st.$i.qcow2" >"$d/check.out" 2>&1; rc=$?
        [[ $rc -eq 2 ]] && v2_copied_only && rc=0
        if [[ $rc -ne 0 && $rc -ne 3 ]]; then
            [[ -n $first ]] || first="state $i ($t): (c) check after the engine's writes: exit $rc"; fails=$((fails + 1))
        fi
    done <"$d/states"
    TOTAL=$((TOTAL + STATES))
    if [[ $fails -gt 0 ]]; then
        mkdir -p "$UQ_TMP/failures/$name"; cp "$d"/init.qcow2 "$d"/log.* "$d/states" "$UQ_TMP/failures/$name/"
        notok "$name" "$fails of $STATES crash states: $first (seed $SEED)"
    else
        ok "$name: $STATES crash states ($leaks with leaks, $dirty_n dirty) pass (a) check, (b) content, (c) reopen+write"
    fi
    rm -rf "$d"
}

# faults CONFIG OP ARG CLASS: EIO on the nth operation of CLASS, n = 1, 2, ... until none hits.
faults() {
    local cfg=$1 op=$2 arg=$3 class=$4 name="snapcrash_faults_${1}_${2}_$4" d="$W/f.$1.$2"
    mkdir -p "$d"
    prep "$cfg" "$d" >/dev/null || { notok "$name" "cannot prepare the starting image"; return; }
    views "$d" "$d/init.qcow2" "$d/want" || { notok "$name" "cannot read the starting image"; return; }
    before=$(snaps_of "$d/init.qcow2")
    cp "$d/init.qcow2" "$d/ref.qcow2"
    timeout -k 5 120 "$CRASHSIM" op "$d/ref.qcow2" "$d/log" "$op" "$arg" >/dev/null 2>&1
    after=$(snaps_of "$d/ref.qcow2")
    views "$d" "$d/ref.qcow2" "$d/new" || { notok "$name" "cannot read the result"; return; }
    local id
    for id in $(jq -r '.[] | sub(":.*"; "")' <<<"$after"); do
        [[ -e $d/want.snap.$id.raw ]] || cp "$d/want.active.raw" "$d/want.snap.$id.raw"
    done
    active_ok="$d/want.active.raw $d/new.active.raw"
    focus=$(jq -r '.[-1] | sub(":.*"; "")' <<<"$after")
    local n=1 fails=0 failed_ops=0 first= why leaks=0
    while [[ $n -le 200 ]]; do
        cp "$d/init.qcow2" "$d/work.qcow2"
        timeout -k 5 120 "$CRASHSIM" op "$d/work.qcow2" "$d/log" "$op" "$arg" --class "$class" --errno EIO \
            --nth "$n" >"$d/op.out" 2>&1
        grep -q '^injected=0' "$d/op.out" && break
        grep -q '^op=failed' "$d/op.out" && failed_ops=$((failed_ops + 1))
        if ! why=$(verdict "$d/work.qcow2" "$(( $(header_field "$d/work.qcow2" 4 4) >= 3 &&
                                              ($(header_field "$d/work.qcow2" 72 8) & 1) ))"); then
            [[ -n $first ]] || first="fault at $class op $n: $why"; fails=$((fails + 1))
        fi
        n=$((n + 1))
    done
    if [[ $fails -gt 0 ]]; then
        notok "$name" "$fails of $((n - 1)) faults: $first"
    else
        ok "$name: $((n - 1)) faults ($failed_ops reported as failures), every image consistent and atomic"
    fi
    rm -rf "$d"
}

# CI time budget: the main configuration gets every operation, the others the riskiest.
OPS_v3="snapshot-create:s3 snapshot-delete:s1 snapshot-apply:s1 resize:2147483648 shrink:2097152"
OPS_v2="snapshot-create:s3 snapshot-delete:s2"
OPS_ext=
OPS_tiny="snapshot-create:s3"
if [[ ${SOAK:-0} == 1 ]]; then
    OPS_v2="$OPS_v2 snapshot-apply:s1 resize:8388608"
    OPS_ext="snapshot-create:s3 snapshot-delete:s1 snapshot-apply:s2"
    OPS_tiny="$OPS_tiny snapshot-delete:s1 resize:67108864"
fi
for cfg in ${SNAPCRASH_CONFIGS:-v3 v2 ext tiny}; do
    var=OPS_$cfg
    for spec in ${!var}; do
        run "$cfg" "${spec%%:*}" "${spec#*:}"
    done
done
faults v3 snapshot-create s3 meta
faults v3 snapshot-delete s1 sync
echo "# snapcrash: $TOTAL crash states checked"
