#!/usr/bin/env bash
# Zero copy (UBLK_F_AUTO_BUF_REG + UBLK_F_USER_COPY) and its fallbacks, one boot on each
# kernel (result names end in @6.12 / @7.2): fio write+verify, 4k and 512k, 1 and 2 queues,
# with zero copy (where the kernel has it: list --json and stats say which path serves) and
# with --no-zero-copy (the per-tag buffers; on 6.12 the only path), the stats of which path
# served each request (allocating writes on empty images zero copy), then qemu-img check and
# compare; and, where zero copy exists, every kind of image of the interop matrix (cluster
# sizes, refcount widths, v2/v3, backing chain with a short backing file, compressed,
# extended L2, zero clusters, LUKS, raw) attached read-only and compared with QEMU's reading
# (4k requests over the first 2M, 512k requests over the whole image).
# timeout: 1600
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_zc 6.12 newest

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
ZC=0
has_feature auto_buf_reg && has_feature user_copy && ZC=1
# Images on ext4 on a RAM disk (brd), as on a real disk: files in memory (tmpfs, where
# every other VM test works) are served by the copy path.
mkdir -p "$W/brd"
if ! insmod /run/vm-modules/brd.ko rd_nr=1 rd_size=262144 ||
	! mkfs.ext4 -q -F /dev/ram0 || ! mount /dev/ram0 "$W/brd"; then
	echo "not ok zc_brd: no ext4 on a brd RAM disk"; exit 1
fi
TMPW=$W W=$W/brd
cd "$W" || exit 1

# Which path served the reads and writes so far (stats): every one counted once, zero copy
# or copied.  On an empty image every first write to a cluster allocates; with zero copy
# none of these needs copy-on-write (whole clusters at 512k; at 4k new clusters at the end
# of the file, where the rest of the cluster reads as zeros unwritten), so none is copied.
# Without zero copy everything is.  NAME ZC(0|1)
zc_paths() {
	local name=$1 zc=$2 s=$W/zc_stats.json
	"$UQ" stats -n "$ID" --json >"$s" 2>&1
	echo "# $name: $(jq -c '{reads, writes, zero_copy_reads, zero_copy_writes, copied_reads, copied_writes}' "$s")"
	check "zc_${name}_stats_paths" jq -e '.zero_copy_reads + .copied_reads == .reads and
		.zero_copy_writes + .copied_writes == .writes and .errors == 0' "$s"
	if [ "$zc" = 0 ]; then
		check "zc_${name}_stats_all_copied" jq -e '.zero_copy_reads == 0 and .zero_copy_writes == 0 and
			.copied_writes == .writes and .writes > 0' "$s"
		return
	fi
	case $name in *empty*)
		check "zc_${name}_stats_alloc_zero_copy" jq -e '.zero_copy_writes > 0 and .copied_writes == 0' "$s"
	esac
}

# fio verify through a device: NAME QUEUES BS ZC(0|1) CREATE-OPTIONS...
zc_fio() {
	local name=$1 q=$2 bs=$3 zc=$4; shift 4
	local img=$W/$name.qcow2 opt=--no-zero-copy
	[ "$zc" = 1 ] && opt=--zero-copy
	rm -f "$img" "$W/$name.raw"
	qemu-img create -q -f qcow2 "$@" "$img" 16M
	if ! uq_add -q "$q" $opt "$img"; then
		nok "zc_${name}_add" "$(tr '\n' ' ' < "$W/add.err")"; return
	fi
	check "zc_${name}_path" test "$("$UQ" list --json | jq ".[] | select(.id == $ID) | .zero_copy")" = \
		"$([ "$zc" = 1 ] && echo true || echo false)"
	if [ "$zc" = 1 ]; then
		check "zc_${name}_stats_features" eval '"$UQ" stats -n $ID --json | jq -e ".zero_copy == true and (.features | index(\"auto_buf_reg\")) and (.features | index(\"user_copy\"))" >/dev/null'
	fi
	check "zc_${name}_fio_verify" fio_verify "$DEV" --bs="$bs" --size=16M
	zc_paths "$name" "$zc"
	# An empty image: overwrite in place (the clusters exist now), then verify again.
	case $name in *empty*)
		check "zc_${name}_fio_verify_overwrite" fio_verify "$DEV" --bs="$bs" --size=16M --rw=write ;;
	esac
	check "zc_${name}_copy" dd if="$DEV" of="$W/$name.raw" bs=1M iflag=direct status=none
	check "zc_${name}_del" uq_del "$ID"
	check "zc_${name}_qemu_img_check" qemu-img check -q "$img"
	check "zc_${name}_qemu_img_compare" qemu-img compare -q -f raw -F qcow2 "$W/$name.raw" "$img"
	rm -f "$img" "$W/$name.raw"
}
modes=0
[ $ZC = 1 ] && modes="1 0"
# Without the features, --zero-copy still adds the device, on the per-tag buffers.
if [ $ZC = 0 ]; then
	rm -f "$W/nozc.qcow2"; qemu-img create -q -f qcow2 "$W/nozc.qcow2" 16M
	if uq_add --zero-copy "$W/nozc.qcow2"; then
		check zc_fallback_path test "$("$UQ" list --json | jq ".[] | select(.id == $ID) | .zero_copy")" = false
		check zc_fallback_del uq_del "$ID"
	else nok zc_fallback_add "$(tr '\n' ' ' < "$W/add.err")"; fi
	rm -f "$W/nozc.qcow2"
fi
for zc in $modes; do
	zc_fio "zc${zc}_4k_q1" 1 4k $zc -o preallocation=falloc
	zc_fio "zc${zc}_512k_q2" 2 512k $zc -o preallocation=falloc
	zc_fio "zc${zc}_4k_q2_empty" 2 4k $zc
	zc_fio "zc${zc}_512k_q1_empty" 1 512k $zc
done

# Raw image, zero copy where the kernel has it.
rm -f "$W/r.raw"; truncate -s 16M "$W/r.raw"
if uq_add -f raw -q 2 --zero-copy "$W/r.raw"; then
	check zc_raw_fio_verify fio_verify "$DEV" --bs=64k --size=16M
	check zc_raw_copy dd if="$DEV" of="$W/r.copy" bs=1M iflag=direct status=none
	check zc_raw_del uq_del "$ID"
	check zc_raw_same cmp "$W/r.raw" "$W/r.copy"
else nok zc_raw_add "$(tr '\n' ' ' < "$W/add.err")"; fi
rm -f "$W/r.raw" "$W/r.copy"

# The interop matrix's kinds of image, zero copy on: attached read-only, read whole
# through the device (4k and 512k requests), compared with QEMU's reading of the image.
zc_kind() {	# NAME IMAGE [ADD-OPTIONS...]
	local name=$1 img=$2; shift 2
	if ! uq_add -r --zero-copy "$@" "$img"; then
		nok "zc_kind_${name}_add" "$(tr '\n' ' ' < "$W/add.err")"; return
	fi
	check "zc_kind_${name}_path" test "$("$UQ" list --json | jq ".[] | select(.id == $ID) | .zero_copy")" = true
	# 4k requests over the first 2M (data, a hole, the partial extent at 1536k), 512k over all.
	check "zc_kind_${name}_read_4k" dd if="$DEV" of="$W/k4.raw" bs=4k count=512 iflag=direct status=none
	check "zc_kind_${name}_read_512k" dd if="$DEV" of="$W/k512.raw" bs=512k iflag=direct status=none
	check "zc_kind_${name}_del" uq_del "$ID"
	check "zc_kind_${name}_compare_4k" cmp -n 2M "$W/k4.raw" "$W/ref.raw"
	check "zc_kind_${name}_compare_512k" cmp "$W/k512.raw" "$W/ref.raw"
	rm -f "$W/k4.raw" "$W/k512.raw"
}
# Data, zeros, holes and odd extents, as QEMU writes them.
fill() {	# IMAGE [qemu-io options...]
	local img=$1; shift
	qemu-io "$@" -c 'write -P 11 0 1M' -c 'write -P 12 1536k 300k' -c 'write -z 3M 256k' \
		-c 'write -P 13 4M 64k' -c 'write -P 14 5123072 7168' -c 'write -P 15 7M 1M' \
		"$img" >/dev/null
}
if [ $ZC = 1 ]; then
	while IFS='|' read -r name opts; do
		rm -f "$W/k.qcow2" "$W/ref.raw"
		qemu-img create -q -f qcow2 -o "$opts" "$W/k.qcow2" 8M && fill "$W/k.qcow2" -f qcow2 &&
			qemu-img convert -O raw "$W/k.qcow2" "$W/ref.raw" ||
			{ nok "zc_kind_${name}_make" "qemu-img failed"; continue; }
		zc_kind "$name" "$W/k.qcow2"
	done <<'M'
cs512|cluster_size=512
cs4k|cluster_size=4096
cs64k|cluster_size=65536
cs2M|cluster_size=2M
rc1|refcount_bits=1
rc16|refcount_bits=16
rc64|refcount_bits=64
v2|compat=0.10
v2_cs4k|compat=0.10,cluster_size=4096
prealloc_falloc|preallocation=falloc
prealloc_metadata|preallocation=metadata
extl2_16k|extended_l2=on,cluster_size=16384
extl2_64k|extended_l2=on
M
	# Backing chain: a backing file shorter than the overlay (the tail reads as zeros),
	# overlay with extended L2 writing single subclusters.
	rm -f "$W/base.qcow2" "$W/mid.qcow2" "$W/k.qcow2" "$W/ref.raw"
	qemu-img create -q -f qcow2 "$W/base.qcow2" 5M &&
		qemu-io -c 'write -P 21 0 5M' "$W/base.qcow2" >/dev/null &&
		qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$W/mid.qcow2" 6M &&
		qemu-io -c 'write -P 22 2M 64k' "$W/mid.qcow2" >/dev/null &&
		qemu-img create -q -f qcow2 -o extended_l2=on -b mid.qcow2 -F qcow2 "$W/k.qcow2" 8M &&
		qemu-io -c 'write -P 23 8k 4k' -c 'write -z 1M 64k' -c 'write -P 24 7M 64k' "$W/k.qcow2" >/dev/null &&
		qemu-img convert -O raw "$W/k.qcow2" "$W/ref.raw" &&
		zc_kind backing_chain "$W/k.qcow2" || nok zc_kind_backing_chain_make "qemu-img failed"
	# Compressed clusters (and plain ones next to them).
	rm -f "$W/src.raw" "$W/k.qcow2" "$W/ref.raw"
	head -c 8M /dev/urandom | tr -d '\200-\377' | head -c 4M >"$W/src.raw"; truncate -s 8M "$W/src.raw"
	qemu-img convert -q -c -O qcow2 -f raw "$W/src.raw" "$W/k.qcow2" &&
		qemu-io -c 'write -P 31 2M 64k' "$W/k.qcow2" >/dev/null &&
		qemu-img convert -O raw "$W/k.qcow2" "$W/ref.raw" &&
		zc_kind compressed "$W/k.qcow2" || nok zc_kind_compressed_make "qemu-img failed"
	# LUKS.
	rm -f "$W/k.qcow2" "$W/ref.raw"
	printf 'zc-luks' >"$W/key"
	"$(dirname "$LIB")/../lib/qemu-img-luks" create -q -f qcow2 --object secret,id=s0,file="$W/key" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$W/k.qcow2" 8M &&
		qemu-io --object secret,id=s0,file="$W/key" -c 'write -P 41 0 1M' -c 'write -P 42 6M 100k' \
			--image-opts "driver=qcow2,file.filename=$W/k.qcow2,encrypt.key-secret=s0" >/dev/null &&
		qemu-img convert --object secret,id=s0,file="$W/key" -O raw \
			--image-opts "driver=qcow2,file.filename=$W/k.qcow2,encrypt.key-secret=s0" "$W/ref.raw" &&
		zc_kind luks "$W/k.qcow2" --key-file "$W/key" || nok zc_kind_luks_make "qemu-img failed"
	# Raw.
	rm -f "$W/k.raw" "$W/ref.raw"
	truncate -s 8M "$W/k.raw" && fill "$W/k.raw" -f raw && cp "$W/k.raw" "$W/ref.raw" &&
		zc_kind raw "$W/k.raw" -f raw || nok zc_kind_raw_make "qemu-io failed"
	rm -f "$W"/k.* "$W"/ref.raw "$W"/base.qcow2 "$W"/mid.qcow2 "$W"/src.raw
fi

# A file in memory: the copy path, same data.
if [ $ZC = 1 ]; then
	rm -f "$TMPW/m.raw"; truncate -s 8M "$TMPW/m.raw"
	if uq_add -f raw "$TMPW/m.raw"; then
		check zc_tmpfs_fio_verify fio_verify "$DEV" --bs=64k --size=8M
		check zc_tmpfs_del uq_del "$ID"
	else nok zc_tmpfs_add "$(tr '\n' ' ' < "$W/add.err")"; fi
	rm -f "$TMPW/m.raw"
fi

check zc_daemon_logs_clean logs_clean
cd / && umount "$W" && rmmod brd
[ $FAILED -eq 0 ]
EOF

vm_test_on 6.12 ublk_zc_vm --timeout 600 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc1=$?
vm_test_on newest ublk_zc_vm --timeout 900 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
