#!/usr/bin/env bash
# The main job on a fresh machine: serve a qcow2 image as a block device and use it.
#   scripts/demo.sh [--ublk | --nbd] [IMAGE]    (default: a new 1 GiB demo image)
#
# Part 1 (ublk): attaches IMAGE with `ublk-qcow2 add`, makes an ext4 file
# system on the /dev/ublkbN it prints, mounts it, writes and checksums a few
# files, unmounts, detaches, attaches again and verifies the checksums, then
# `ublk-qcow2 del` and `qemu-img check`.  If this kernel has no ublk, the same
# demo runs inside a throw-away VM with the newest Linux (7.x) of Debian unstable
# (tests/vm/vm.sh --kernel newest; UQ_VM_KERNEL=6.12 picks Debian 12's instead).
# Part 2 (NBD): serves IMAGE over NBD, writes and reads 64 MiB through the
# export with QEMU's own client, stops the server, and lets qemu-img judge it.
#
#   --ublk   part 1 only          --nbd   part 2 only
#   --in-vm  (internal) part 1 on a kernel known to have ublk, no VM fallback
# A given IMAGE is overwritten (file system, data): use a scratch image.
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
parts="ublk nbd"
in_vm=
image=
while [ $# -gt 0 ]; do
    case "$1" in
        --ublk) parts=ublk ;;
        --nbd) parts=nbd ;;
        --in-vm) parts=ublk; in_vm=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "demo: unknown option '$1'" >&2; usage >&2; exit 2 ;;
        *) [ -z "$image" ] || { echo "demo: only one IMAGE, got '$image' and '$1'" >&2; exit 2; }
           image=$1 ;;
    esac
    shift
done
if [ -n "$image" ]; then
    [ -f "$image" ] || { echo "demo: image '$image' does not exist" >&2; exit 2; }
    image=$(realpath "$image")
fi
cd "$(dirname "$0")/.."
BIN=$PWD/build/ublk-qcow2
[ -x "$BIN" ] || make -s
work=$(mktemp -d "${VM_TMP:-/tmp}/ublk-qcow2-demo.XXXXXX")

trap 'rm -rf "$work"' EXIT

# Each part runs in a subshell with set -e; on the way out it releases what is
# still in use: a mount point, a ublk device, an NBD server.
mnt=
ublk_id=
release() {
    set +e
    [ -n "$mnt" ] && umount "$mnt" 2>/dev/null
    [ -n "$ublk_id" ] && timeout 60 "$BIN" del -n "$ublk_id" >/dev/null 2>&1
    if [ -f "$work/pid" ]; then kill "$(cat "$work/pid")" 2>/dev/null; rm -f "$work/pid"; fi
}

# demo_image NAME: the given IMAGE, or a fresh 1 GiB qcow2 in the work dir.
demo_image() {
    if [ -n "$image" ]; then
        echo "using $image (its contents will be overwritten)" >&2
        echo "$image"
    else
        qemu-img create -q -f qcow2 "$work/$1.qcow2" 1G
        echo "created demo image $work/$1.qcow2 (1 GiB qcow2)" >&2
        echo "$work/$1.qcow2"
    fi
}

have_ublk() {
    [ -c /dev/ublk-control ] && return 0
    command -v modprobe >/dev/null && modprobe ublk_drv 2>/dev/null || return 1
    # udev creates the node shortly after the module loads.
    timeout 5 bash -c 'until [ -c /dev/ublk-control ]; do sleep 0.1; done' 2>/dev/null
}

# ---- part 1: a ublk block device with a file system on it ----------------------
ublk_attach() {  # IMAGE -> sets dev, ublk_id
    dev=$(timeout 120 "$BIN" add "$1") || { echo "demo: ublk-qcow2 add failed" >&2; return 1; }
    ublk_id=${dev#/dev/ublkb}
    [ -b "$dev" ] || { echo "demo: '$dev' is not a block device" >&2; return 1; }
}

ublk_detach() {
    timeout 120 "$BIN" del -n "$ublk_id" || { echo "demo: ublk-qcow2 del -n $ublk_id failed" >&2; return 1; }
    ublk_id=
}

ublk_demo() {
    local img dev
    echo "== ublk: $(uname -r), /dev/ublk-control present"
    img=$(demo_image ublk)
    ublk_attach "$img"
    echo "attached $img as $dev:"
    "$BIN" list --json | jq -c ".[] | select(.id == $ublk_id) | {device, state, queues, depth, format}"
    mkfs.ext4 -q -F -L uq-demo "$dev"
    mnt=$work/mnt
    mkdir -p "$mnt"
    mount "$dev" "$mnt"
    echo "made an ext4 file system on $dev and mounted it:"
    df -h "$mnt" | sed 's/^/  /'
    head -c 32M /dev/urandom >"$mnt/random-32M"
    for i in 1 2 3 4 5 6 7 8; do head -c $((i * 12345)) /dev/urandom >"$mnt/small-$i"; done
    mkdir -p "$mnt/dir/sub" && echo "hello from ublk-qcow2" >"$mnt/dir/sub/hello.txt"
    (cd "$mnt" && find . -type f | sort | xargs sha256sum) >"$work/sums"
    echo "wrote $(wc -l <"$work/sums") files ($(du -sh "$mnt" | cut -f1)), sha256 of each recorded"
    umount "$mnt"; mnt=
    ublk_detach
    echo "unmounted and detached (ublk-qcow2 del); attaching again to read the files back"
    ublk_attach "$img"
    mnt=$work/mnt
    mount -o ro "$dev" "$mnt"
    if (cd "$mnt" && sha256sum --quiet -c "$work/sums"); then
        echo "read back through $dev: all $(wc -l <"$work/sums") checksums match"
    else
        echo "demo: checksums differ after re-attaching" >&2; return 1
    fi
    umount "$mnt"; mnt=
    e2fsck -fn "$dev" >/dev/null 2>&1 && echo "e2fsck: file system clean" ||
        { echo "demo: e2fsck found problems on $dev" >&2; return 1; }
    ublk_detach
    echo "detached; qemu-img check says:"
    qemu-img check "$img"
}

ublk_part() {
    if [ -n "$in_vm" ] || have_ublk; then
        [ "$(id -u)" = 0 ] || { echo "demo: the ublk demo needs root" >&2; return 1; }
        ublk_demo
        return
    fi
    local t0=$SECONDS rc=0 kernel=${UQ_VM_KERNEL:-newest} kver
    echo "this kernel has no ublk (CONFIG_BLK_DEV_UBLK); running the demo inside a VM (tests/vm/vm.sh --kernel $kernel)"
    kver=$(tests/vm/vm.sh --kernel "$kernel" --prepare) ||
        { echo "demo: could not fetch or prepare the VM's kernel (tests/vm/vm.sh --kernel $kernel --prepare)" >&2; return 1; }
    echo "the VM boots Debian's Linux $kver"
    tests/vm/vm.sh --kernel "$kver" --timeout 600 -- scripts/demo.sh --in-vm ${image:+"$image"} || rc=$?
    if [ $rc -eq 125 ]; then
        echo "demo: the VM failed to boot or timed out (tests/vm/vm.sh; VM_VERBOSE=1 shows its console)" >&2
    fi
    [ $rc -eq 0 ] && echo "(VM boot, demo and power-off took $((SECONDS - t0)) s)"
    return $rc
}

# ---- part 2: an NBD export -------------------------------------------------------
nbd_part() {
    local img sock=$work/nbd.sock uri pid
    echo "== NBD"
    img=$(demo_image nbd)
    "$BIN" nbd --fork --pid-file "$work/pid" --socket "$sock" "$img"
    uri="nbd+unix:///?socket=$sock"
    echo "serving $img at $uri"
    nbdinfo "$uri" | sed -n '1,12p'
    echo "writing 64 MiB of random data through the export, then reading it back"
    head -c 64M /dev/urandom >"$work/data"
    nbdcopy "$work/data" "$uri"
    nbdcopy "$uri" "$work/back"
    cmp -n 64M "$work/back" "$work/data" && echo "read back: identical"
    pid=$(cat "$work/pid")
    kill -TERM "$pid"
    timeout 30 bash -c "while kill -0 $pid 2>/dev/null; do sleep 0.1; done"
    rm -f "$work/pid"
    echo "server stopped; qemu-img check says:"
    qemu-img check "$img"
}

failed=
for part in $parts; do
    set +e
    (trap release EXIT; set -e; "${part}_part")
    rc=$?
    set -e
    if [ $rc -ne 0 ]; then
        echo "demo: the $part part FAILED" >&2
        failed=1
    fi
    echo
done
[ -z "$failed" ] || exit 1
[ -n "$in_vm" ] || echo "demo: done ($parts)"
