#!/usr/bin/env bash
# The main job on a fresh machine: serve a qcow2 image and use it.
#   scripts/demo.sh [IMAGE]     (default: a new 1 GiB demo image)
# Serves IMAGE over NBD with ublk-qcow2, writes and reads a file system's worth
# of data through the export with QEMU's own client, stops the server, and
# lets qemu-img judge the image.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=build/ublk-qcow2
[ -x "$BIN" ] || make -s
work=$(mktemp -d /tmp/ublk-qcow2-demo.XXXXXX)
sock="$work/nbd.sock"
image=${1:-}
if [ -z "$image" ]; then
    image="$work/demo.qcow2"
    qemu-img create -q -f qcow2 "$image" 1G
    echo "created demo image $image (1 GiB qcow2)"
fi
cleanup() {
    if [ -f "$work/pid" ]; then kill "$(cat "$work/pid")" 2>/dev/null || true; fi
    [ -n "${1:-}" ] || rm -rf "$work"
}
trap cleanup EXIT

"$BIN" nbd --fork --pid-file "$work/pid" --socket "$sock" "$image"
uri="nbd+unix:///?socket=$sock"
echo "serving $image at $uri"
nbdinfo "$uri" | sed -n '1,12p'
echo "writing 64 MiB of random data through the export, then reading it back"
head -c 64M /dev/urandom > "$work/data"
nbdcopy "$work/data" "$uri"
nbdcopy "$uri" "$work/back"
cmp -n 64M "$work/back" "$work/data" && echo "read back: identical"
pid=$(cat "$work/pid")
kill -TERM "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
rm -f "$work/pid"
echo "server stopped; qemu-img check says:"
qemu-img check "$image"
