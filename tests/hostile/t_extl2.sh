#!/usr/bin/env bash
# Corrupt extended-L2 subcluster bitmaps (docs/interop/qcow2.txt, "Extended L2 Entries"): a
# subcluster both allocated and zero, allocated subclusters in an unallocated cluster, a
# compressed cluster with a non-zero bitmap.  A read or write touching the entry fails with an
# I/O error and a message naming the bitmap (QEMU fails the first two the same way and
# `qemu-img check` reports all three); other clusters still read; the server exits 0 on
# SIGTERM and the image is left as it was.
# timeout: 300
. "$(dirname "$0")/../lib/lib.sh"

NBD_START_TIMEOUT=20
D=$UQ_TMP/x
mkdir -p "$D"

qemu-img create -q -f qcow2 -o extended_l2=on "$D/valid.qcow2" 16M &&
    qemu-io -f qcow2 "$D/valid.qcow2" -c 'write -P 1 0 8k' -c 'write -P 2 1M 64k' \
        -c 'write -c -P 3 2M 64k' >/dev/null ||
    { notok "hostile/extl2 setup" "could not make the image"; exit 1; }

# patch IMAGE CLUSTER BITMAP: set the subcluster bitmap of guest cluster CLUSTER (first L2 table).
patch() {
    "$PYTHON" - "$@" <<'EOF'
import struct, sys
path, cluster, bm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3], 0)
with open(path, "r+b") as f:
    h = f.read(104)
    l1 = struct.unpack(">Q", h[40:48])[0]
    f.seek(l1)
    l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 16 * cluster + 8)
    f.write(struct.pack(">Q", bm))
EOF
}

# case | cluster | bitmap | guest offset of the bad cluster
CASES_X=(
    "subcluster both allocated and zero|0|0x10000000f|0"
    "allocated subclusters in an unallocated cluster|48|0x1|3M"
    "compressed cluster with a non-zero bitmap|32|0x1|2M"
)
for row in "${CASES_X[@]}"; do
    IFS='|' read -r name cluster bm bad <<<"$row"
    label="hostile/extl2: $name"
    img=$D/bad.qcow2
    cp "$D/valid.qcow2" "$img" && patch "$img" "$cluster" "$bm" || { notok "$label" "could not patch"; continue; }
    sum=$(md5sum <"$img")
    note "=== $label"
    start_nbd "$img" --format qcow2 || { notok "$label" "server did not start (exit $?)"; continue; }
    why=
    out=$(qemu-io -f raw "$(nbd_uri)" -c "write -P 9 $bad 4k" 2>&1)
    grep -q "Input/output error" <<<"$out" || why=${why:-"write to the bad cluster did not fail with EIO: $out"}
    out=$(qemu-io -f raw "$(nbd_uri)" -c "read $bad 4k" 2>&1)
    grep -q "Input/output error" <<<"$out" || why=${why:-"read of the bad cluster did not fail with EIO: $out"}
    qemu-io -f raw "$(nbd_uri)" -c "read -P 2 1M 64k" >/dev/null 2>&1 || why=${why:-"good cluster unreadable"}
    rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
    grep -q "extended L2 bitmap" "$NBD_LOG" || why=${why:-"no message naming the bitmap"}
    san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
    [[ $(md5sum <"$img") == "$sum" ]] || why=${why:-"the image was modified"}
    if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label"; fi
done
