#!/usr/bin/env bash
# Compressed qcow2 images (made by qemu-img convert -c: zlib and zstd, 4k, 64k and 2M clusters,
# extended L2, an overlay over a compressed backing file) attached through ublk in the test VM
# and read back whole with direct I/O in 4k and 512k requests: the bytes equal what QEMU reads
# (qemu-img convert -O raw of the same image).  Reads in 4k pieces go through the decompressed-
# cluster cache and the worker pool; a 2-queue device reads them in parallel.  Then a write over
# compressed clusters: the device and QEMU agree and qemu-img check is clean.  One boot, the
# newest kernel.
# timeout: 500
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_compressed newest

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1
# Half-compressible source data: random 2k halves, zeros in between.
python3 - "$W/src.raw" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as f:
    for i in range(8 * 1024 * 1024 // 4096):
        f.write(os.urandom(2048) + bytes(2048))
PY

# case NAME CONVERT-OPTS [QUEUES]: compress src.raw with qemu-img, serve it, compare reads.
case_compressed() {
	local name=$1 opts=$2 q=${3:-1}
	qemu-img convert -q -c -f raw -O qcow2 -o "$opts" "$W/src.raw" "$W/$name.qcow2" || {
		nok "ublk_z_$name" "qemu-img convert failed"; return; }
	qemu-img convert -q -O raw "$W/$name.qcow2" "$W/$name.ref"
	if uq_add -q "$q" -r "$W/$name.qcow2"; then
		check "ublk_z_${name}_4k" sh -c "dd if=$DEV bs=4k iflag=direct status=none | cmp -s - $W/$name.ref"
		check "ublk_z_${name}_512k" sh -c "dd if=$DEV bs=512k iflag=direct status=none | cmp -s - $W/$name.ref"
		check "ublk_z_${name}_del" uq_del "$ID"
	else
		nok "ublk_z_$name" "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
}
case_compressed zlib_64k "compression_type=zlib"
case_compressed zstd_64k "compression_type=zstd" 2
case_compressed zlib_4k "cluster_size=4k"
case_compressed zstd_2m "compression_type=zstd,cluster_size=2M"
case_compressed zlib_extl2 "extended_l2=on,cluster_size=128k"

# An overlay over a compressed backing file: reads through the chain, then a write over
# compressed clusters of the backing file lands in the overlay.
qemu-img create -q -f qcow2 -b zlib_64k.qcow2 -F qcow2 "$W/over.qcow2"
if uq_add "$W/over.qcow2"; then
	check ublk_z_overlay_reads sh -c "dd if=$DEV bs=64k iflag=direct status=none | cmp -s - $W/zlib_64k.ref"
	head -c 1M /dev/urandom >"$W/patch"
	dd if="$W/patch" of="$DEV" bs=4k seek=100 oflag=direct status=none
	cp "$W/zlib_64k.ref" "$W/over.ref"
	dd if="$W/patch" of="$W/over.ref" bs=4k seek=100 conv=notrunc status=none
	check ublk_z_overlay_after_write sh -c "dd if=$DEV bs=4k iflag=direct status=none | cmp -s - $W/over.ref"
	check ublk_z_overlay_del uq_del "$ID"
	check ublk_z_overlay_qemu_agrees sh -c "qemu-img convert -O raw $W/over.qcow2 $W/over.q && cmp -s $W/over.q $W/over.ref"
	check ublk_z_overlay_check qemu-img check -q "$W/over.qcow2"
else
	nok ublk_z_overlay "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

check ublk_z_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_test_run ublk_compressed_vm --timeout 400 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"
