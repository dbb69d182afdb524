#!/usr/bin/env bash
# Snapshots and resize of live ublk devices, in the test VM:
#  - fio writes with crc32c verification on a 2-queue device while `snapshot create -n`
#    takes snapshots (I/O quiesced, flushed, snapshot taken, resumed): fio sees no error and
#    every block verifies; each snapshot then passes qemu-img convert -l; one is taken with
#    fio stopped and nothing in flight, and equals the device read right after it;
#  - the snapshot instant: with the writer paused, known data, a snapshot, more writes: the
#    snapshot (qemu-img convert -l, and 'add --snapshot' as a read-only device) holds exactly
#    the known data, the device the later data; qemu-img check clean after del;
#  - a read-only device refuses a snapshot;
#  - live resize ('resize -n'), by the kernel's features: with UBLK_F_UPDATE_SIZE (Linux 6.16+)
#    a device grows while in use (data intact, the new space reads as zeroes, grown twice more
#    under fio verify with 2 queues, qemu-img check clean, the image's new size); without it
#    the command fails naming Linux 6.16 and changes nothing.  Shrinking is refused on both.
# Two boots: everything on the newest kernel (7.x: live resize works), then the resize cases
# alone on 6.12 (the fallback).  Result names end in @7.2 / @6.12.
# timeout: 600
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_snap newest 6.12

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1
part=${1:-all}	# all, or resize: the live resize cases only

# --- live resize: works with UBLK_F_UPDATE_SIZE, refused without it -------------------------
resize_cases() {
	qemu-img create -q -f qcow2 "$W/r.qcow2" 64M
	if ! uq_add -q 2 "$W/r.qcow2"; then
		nok ublk_snap_resize "add failed: $(tr '\n' ' ' < "$W/add.err")"; return
	fi
	head -c 8M /dev/urandom >"$W/R0"
	head -c 8M /dev/urandom >"$W/R1"
	dd if="$W/R0" of="$DEV" bs=1M oflag=direct status=none
	check_fails ublk_snap_shrink_refused "can only grow" "$UQ" resize -n "$ID" 32M
	if has_feature update_size; then
		echo "# UBLK_F_UPDATE_SIZE: live resize must work"
		check ublk_snap_resize_grows "$UQ" resize -n "$ID" +64M
		check ublk_snap_resize_device_size sh -c "[ \$(blockdev --getsize64 $DEV) = $((128 << 20)) ]"
		check ublk_snap_resize_data_intact sh -c "dd if=$DEV bs=1M count=8 iflag=direct status=none | cmp -s - $W/R0"
		check ublk_snap_resize_new_space_zero sh -c "dd if=$DEV bs=1M skip=64 count=64 iflag=direct status=none | cmp -s -n $((64 << 20)) - /dev/zero"
		check ublk_snap_resize_write_new_space dd if="$W/R1" of="$DEV" bs=1M seek=96 oflag=direct status=none
		# Grown twice more while fio writes and verifies [32M, 64M) through both queues.
		rm -f "$W/rfio.rc"
		( fio --name=resizeverify --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite \
			--bs=4k --iodepth=16 --offset=32M --size=32M --verify=crc32c --verify_fatal=1 \
			--do_verify=1 >"$W/rfio.out" 2>&1; echo $? >"$W/rfio.rc" ) &
		fio_pid=$!
		grown=0
		for size in 192M 256M; do
			want=$(( $(dev_ios "$DEV") + 300 ))
			wait_for 120 sh -c "[ \$(awk '{print \$1 + \$5}' /sys/block/${DEV#/dev/}/stat) -ge $want ] || [ -e $W/rfio.rc ]"
			"$UQ" resize -n "$ID" "$size" >"$W/resize.out" 2>&1 && grown=$((grown + 1))
		done
		wait "$fio_pid"
		frc=$(cat "$W/rfio.rc" 2>/dev/null || echo 99)
		if [ $frc -eq 0 ] && ! grep -q -E "verify failed|err= *[1-9]" "$W/rfio.out"; then
			ok ublk_snap_resize_under_fio_verifies
		else
			nok ublk_snap_resize_under_fio_verifies "fio exit $frc: $(grep -m2 -E 'err|verify' "$W/rfio.out" | tr '\n' ' ')"
		fi
		if [ $grown = 2 ]; then ok ublk_snap_resize_under_fio; else
			nok ublk_snap_resize_under_fio "$grown of 2 resizes: $(tr '\n' ' ' < "$W/resize.out")"; fi
		check ublk_snap_resize_final_size sh -c "[ \$(blockdev --getsize64 $DEV) = $((256 << 20)) ]"
		check ublk_snap_resize_del uq_del "$ID"
		check ublk_snap_resize_qemu_img_check qemu-img check "$W/r.qcow2"
		check ublk_snap_resize_image_size sh -c "[ \$(qemu-img info --output=json $W/r.qcow2 | jq '.\"virtual-size\"') = $((256 << 20)) ]"
		qemu-img convert -O raw "$W/r.qcow2" "$W/r.raw"
		check ublk_snap_resize_image_data sh -c "cmp -n 8388608 $W/r.raw $W/R0 && cmp -n 8388608 -i 100663296:0 $W/r.raw $W/R1"
		rm -f "$W/r.raw"
	else
		echo "# no UBLK_F_UPDATE_SIZE: live resize must be refused"
		check_fails ublk_snap_resize_needs_6_16 "Linux 6\.16" "$UQ" resize -n "$ID" +64M
		check ublk_snap_resize_unchanged sh -c "[ \$(blockdev --getsize64 $DEV) = 67108864 ]"
		check ublk_snap_resize_del uq_del "$ID"
		check ublk_snap_resize_qemu_img_check qemu-img check "$W/r.qcow2"
		check ublk_snap_resize_image_unchanged sh -c "[ \$(qemu-img info --output=json $W/r.qcow2 | jq '.\"virtual-size\"') = 67108864 ]"
	fi
}
if [ "$part" = resize ]; then
	resize_cases
	check ublk_snap_daemon_logs_clean logs_clean
	[ $FAILED -eq 0 ]
	exit
fi

snaps() { qemu-img info -U --output=json "$1" | jq -r '[(.snapshots // [])[].name] | join(" ")'; }

# --- snapshots while fio writes and verifies ------------------------------------------
qemu-img create -q -f qcow2 "$W/f.qcow2" 128M
if uq_add -q 2 "$W/f.qcow2"; then
	rm -f "$W/fio.rc"
	( fio --name=snapverify --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randwrite \
		--bs=4k --iodepth=16 --numjobs=1 --size=24M --verify=crc32c --verify_fatal=1 \
		--do_verify=1 >"$W/fio.out" 2>&1; echo $? >"$W/fio.rc" ) &
	fio_pid=$!
	stat=/sys/block/${DEV#/dev/}/stat inflight=/sys/block/${DEV#/dev/}/inflight
	w0= w1=
	taken=0
	for n in 1 2 3; do
		# Each snapshot once fio has written more (progress, not time).
		want=$(( $(dev_ios "$DEV") + 500 ))
		wait_for 120 sh -c "[ \$(awk '{print \$1 + \$5}' /sys/block/${DEV#/dev/}/stat) -ge $want ] || [ -e $W/fio.rc ]" ||
			break
		[ -e "$W/fio.rc" ] && break
		if [ $n = 2 ]; then
			# The instant under fio: writer stopped, nothing in flight in the block layer;
			# the device read right after the snapshot must be what the snapshot holds.
			kill -STOP $(pgrep -x fio)
			wait_for 60 sh -c "[ \$(awk '{print \$1 + \$2}' $inflight) = 0 ]"
			w0=$(awk '{print $5}' "$stat")
			"$UQ" snapshot create -n "$ID" "run$n" >"$W/snap$n.out" 2>&1 && taken=$((taken + 1))
			dd if="$DEV" of="$W/at_run2.raw" bs=1M count=24 iflag=direct status=none
			w1=$(awk '{print $5}' "$stat")
			kill -CONT $(pgrep -x fio)
			continue
		fi
		"$UQ" snapshot create -n "$ID" "run$n" >"$W/snap$n.out" 2>&1 && taken=$((taken + 1))
	done
	wait "$fio_pid"
	frc=$(cat "$W/fio.rc" 2>/dev/null || echo 99)
	if [ $frc -eq 0 ] && ! grep -q -E "verify failed|err= *[1-9]" "$W/fio.out"; then
		ok ublk_snap_fio_verifies
	else
		nok ublk_snap_fio_verifies "fio exit $frc: $(grep -m2 -E 'err|verify' "$W/fio.out" | tr '\n' ' ')"
	fi
	if [ $taken -ge 2 ]; then ok ublk_snap_taken_under_io; else
		nok ublk_snap_taken_under_io "only $taken snapshots: $(cat "$W"/snap*.out | tr '\n' ' ')"; fi
	check ublk_snap_fio_del uq_del "$ID"
	check ublk_snap_fio_check qemu-img check "$W/f.qcow2"
	ok_all=1
	for s in $(snaps "$W/f.qcow2"); do
		qemu-img convert -O raw -l "snapshot.name=$s" "$W/f.qcow2" "$W/s.raw" || ok_all=0
	done
	[ "$(snaps "$W/f.qcow2")" = "$(seq -f 'run%g' -s ' ' 1 $taken)" ] || ok_all=0
	if [ $ok_all = 1 ]; then ok ublk_snap_fio_snapshots_readable; else
		nok ublk_snap_fio_snapshots_readable "snapshots: $(snaps "$W/f.qcow2")"; fi
	if [ "$w0" != "$w1" ]; then
		nok ublk_snap_fio_instant "writes completed while fio was stopped ($w0 -> $w1)"
	elif [ -s "$W/at_run2.raw" ] && qemu-img convert -O raw -l snapshot.name=run2 "$W/f.qcow2" "$W/s.raw" &&
		cmp -n 25165824 "$W/s.raw" "$W/at_run2.raw" >"$W/cmp.out" 2>&1; then
		ok ublk_snap_fio_instant
	else
		nok ublk_snap_fio_instant "snapshot run2 differs from the device read at the instant: $(cat "$W/cmp.out" 2>/dev/null)"
	fi
else
	nok ublk_snap_fio "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# --- the snapshot instant ---------------------------------------------------------------
qemu-img create -q -f qcow2 "$W/k.qcow2" 64M
if uq_add "$W/k.qcow2"; then
	head -c 8M /dev/urandom >"$W/A"
	head -c 8M /dev/urandom >"$W/B"
	dd if="$W/A" of="$DEV" bs=1M oflag=direct status=none
	# Not flushed by us: the snapshot itself flushes what was acknowledged.
	check ublk_snap_create "$UQ" snapshot create -n "$ID" known
	dd if="$W/B" of="$DEV" bs=1M oflag=direct status=none
	check ublk_snap_device_has_later_data sh -c "dd if=$DEV bs=1M count=8 iflag=direct status=none | cmp -s - $W/B"
	check ublk_snap_k_del uq_del "$ID"
	check ublk_snap_k_check qemu-img check "$W/k.qcow2"
	check ublk_snap_k_size sh -c "[ \$(qemu-img info --output=json $W/k.qcow2 | jq '.\"virtual-size\"') = 67108864 ]"
	qemu-img convert -O raw -l snapshot.name=known "$W/k.qcow2" "$W/known.raw"
	check ublk_snap_holds_instant cmp -n 8388608 "$W/known.raw" "$W/A"
	# The snapshot as a read-only device.
	if uq_add --snapshot known "$W/k.qcow2"; then
		check ublk_snap_add_snapshot_reads sh -c "dd if=$DEV bs=1M count=8 iflag=direct status=none | cmp -s - $W/A"
		check_fails ublk_snap_add_snapshot_read_only "read-only|Operation not permitted|Permission denied" \
			dd if="$W/B" of="$DEV" bs=1M count=1 oflag=direct status=none
		check_fails ublk_snap_ro_refuses_snapshot "read-only" "$UQ" snapshot create -n "$ID" nope
		check ublk_snap_ro_del uq_del "$ID"
	else
		nok ublk_snap_add_snapshot "add --snapshot failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	check ublk_snap_final_check qemu-img check "$W/k.qcow2"
else
	nok ublk_snap_instant "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi
check_fails ublk_snap_no_daemon "no running daemon" "$UQ" snapshot create -n 77 x
resize_cases

check ublk_snap_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_test_on newest ublk_snap_vm --timeout 420 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh" all; rc1=$?
vm_test_on 6.12 ublk_snap_vm --timeout 150 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh" resize; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
