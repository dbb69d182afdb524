#!/usr/bin/env bash
# Batch I/O (UBLK_F_BATCH_IO: PREP_IO_CMDS, multishot FETCH_IO_CMDS, COMMIT_IO_CMDS) in the
# test VM, one boot on each kernel (result names end in @7.2 / @6.12):
#  - where the kernel has it (7.x): add --batch-io, list --json and stats say batch_io; fio
#    write+verify, 4k and 512k, 1 and 2 queues, with zero copy and with --no-zero-copy (the
#    per-tag buffers, whose addresses go in the batch elements), then qemu-img check and
#    compare; --no-batch-io gives the per-tag commands;
#  - a --recovery batch device: kill -9 of its daemon under fio, `recover`, fio verifies
#    every block; `restart -n ID` twice under fio, then everything re-verified;
#  - where the kernel lacks it (6.12): --batch-io adds the device per tag (batch_io false),
#    which serves fio verify.
# timeout: 1000
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_batch newest 6.12

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
state() { "$UQ" list -n "$1" --json | jq -r '.[0].state'; }
dpid() { "$UQ" list -n "$1" --json | jq -r '.[0].pid'; }
batch_of() { "$UQ" list -n "$1" --json | jq -r '.[0].batch_io'; }
cd "$W" || exit 1

if ! has_feature batch_io; then
	# ---- no batch I/O in this kernel: asked for, the device is served per tag ----
	rm -f "$W/fb.qcow2"; qemu-img create -q -f qcow2 "$W/fb.qcow2" 16M
	if uq_add --batch-io -q 2 "$W/fb.qcow2"; then
		check batch_fallback_path test "$(batch_of "$ID")" = false
		check batch_fallback_fio_verify fio_verify "$DEV" --size=16M
		check batch_fallback_del uq_del "$ID"
		check batch_fallback_qemu_img_check qemu-img check -q "$W/fb.qcow2"
	else nok batch_fallback_add "$(tr '\n' ' ' < "$W/add.err")"; fi
	rm -f "$W/fb.qcow2"
	check batch_daemon_logs_clean logs_clean
	[ $FAILED -eq 0 ]; exit
fi

# Images on ext4 on a RAM disk, as in t_ublk_zc.sh: zero copy takes its in-place path there.
mkdir -p "$W/brd"
if ! insmod /run/vm-modules/brd.ko rd_nr=1 rd_size=262144 ||
	! mkfs.ext4 -q -F /dev/ram0 || ! mount /dev/ram0 "$W/brd"; then
	echo "not ok batch_brd: no ext4 on a brd RAM disk"; exit 1
fi
W=$W/brd
cd "$W" || exit 1

# ---- fio verify through a batch device: NAME QUEUES BS ZERO-COPY-OPTION CREATE-OPTIONS... ----
batch_fio() {
	local name=$1 q=$2 bs=$3 zc=$4; shift 4
	local img=$W/$name.qcow2
	rm -f "$img" "$W/$name.raw"
	qemu-img create -q -f qcow2 "$@" "$img" 16M
	if ! uq_add -q "$q" --batch-io "$zc" "$img"; then
		nok "batch_${name}_add" "$(tr '\n' ' ' < "$W/add.err")"; return
	fi
	check "batch_${name}_path" test "$(batch_of "$ID")" = true
	check "batch_${name}_stats" eval '"$UQ" stats -n $ID --json | jq -e ".batch_io == true and (.features | index(\"batch_io\")) and (.zero_copy == $([ "$zc" = --zero-copy ] && echo true || echo false))" >/dev/null'
	check "batch_${name}_fio_verify" fio_verify "$DEV" --bs="$bs" --size=16M
	check "batch_${name}_fio_verify_q1" fio_verify "$DEV" --bs="$bs" --size=16M --iodepth=1 --rw=write
	check "batch_${name}_copy" dd if="$DEV" of="$W/$name.raw" bs=1M iflag=direct status=none
	check "batch_${name}_stats_errors" eval '"$UQ" stats -n $ID --json | jq -e ".errors == 0" >/dev/null'
	check "batch_${name}_del" uq_del "$ID"
	check "batch_${name}_qemu_img_check" qemu-img check -q "$img"
	check "batch_${name}_qemu_img_compare" qemu-img compare -q -f raw -F qcow2 "$W/$name.raw" "$img"
	rm -f "$img" "$W/$name.raw"
}
batch_fio zc_4k_q1 1 4k --zero-copy -o preallocation=falloc
batch_fio zc_512k_q2 2 512k --zero-copy -o preallocation=falloc
batch_fio zc_4k_q2_empty 2 4k --zero-copy
batch_fio nozc_4k_q2 2 4k --no-zero-copy
batch_fio nozc_512k_q1_empty 1 512k --no-zero-copy

# --no-batch-io: the per-tag commands on a kernel that has batch I/O.
rm -f "$W/nb.qcow2"; qemu-img create -q -f qcow2 "$W/nb.qcow2" 16M
if uq_add --no-batch-io "$W/nb.qcow2"; then
	check batch_off_path test "$(batch_of "$ID")" = false
	check batch_off_fio_verify fio_verify "$DEV" --size=16M
	check batch_off_del uq_del "$ID"
else nok batch_off_add "$(tr '\n' ' ' < "$W/add.err")"; fi
rm -f "$W/nb.qcow2"

# ---- recovery: kill -9 under fio, recover; restart twice under fio ----
fio_args=(--name=verify --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
	--iodepth=32 --verify=crc32c --verify_fatal=1 --size=8M --randseed=4321)
restart_ok() {	# NAME: one restart of $ID; a new daemon serves the device, with batch I/O
	local name=$1 old new
	old=$(dpid "$ID")
	if ! timeout 150 "$UQ" restart -n "$ID" > "$W/restart.out" 2>&1; then
		nok "$name" "restart failed: $(tr '\n' ' ' < "$W/restart.out")"; return 1
	fi
	new=$(dpid "$ID")
	if [ "$(state "$ID")" != LIVE ] || [ "$new" = "$old" ] || [ "$(batch_of "$ID")" != true ]; then
		nok "$name" "after restart: state $(state "$ID"), pid $old -> $new, batch_io $(batch_of "$ID")"
		return 1
	fi
	ok "$name"
}
rm -f "$W/rec.qcow2"; qemu-img create -q -f qcow2 "$W/rec.qcow2" 16M
if uq_add --recovery --batch-io -q 2 "$W/rec.qcow2"; then
	check batch_recovery_path test "$(batch_of "$ID")" = true
	# Written in full and flushed first: a kill -9 loses no acknowledged write then.
	check batch_recovery_fill eval 'timeout 300 fio "${fio_args[@]}" --filename="$DEV" --end_fsync=1 > "$W/fio0.out" 2>&1'
	ios=$(dev_ios "$DEV")
	# Reads of what was written, going on across the kill and the recovery.
	timeout 300 fio "${fio_args[@]}" --filename="$DEV" --verify_only --rate_iops=150 > "$W/fio1.out" 2>&1 &
	fio=$!
	wait_for 60 eval '[ "$(dev_ios "$DEV")" -gt $((ios + 100)) ]'
	kill -9 "$(dpid "$ID")"
	if wait_for 30 eval '[ "$(state "$ID")" = QUIESCED ]'; then
		check batch_recovery_recover timeout 150 "$UQ" recover -n "$ID"
		check batch_recovery_recovered_path test "$(batch_of "$ID")" = true
	else
		nok batch_recovery_recover "device not QUIESCED after kill -9: $(state "$ID")"
	fi
	wait $fio && ok batch_recovery_fio_verify_across_kill ||
		nok batch_recovery_fio_verify_across_kill "$(grep -iE 'error|verify|bad' "$W/fio1.out" | head -n 3 | tr '\n' ' ')"
	# Writes across two restarts, then every block verified again.
	ios=$(dev_ios "$DEV")
	timeout 300 fio "${fio_args[@]}" --filename="$DEV" --randseed=999 --rate_iops=150 > "$W/fio2.out" 2>&1 &
	fio=$!
	wait_for 60 eval '[ "$(dev_ios "$DEV")" -gt $((ios + 100)) ]'
	restart_ok batch_restart_under_fio_1
	restart_ok batch_restart_under_fio_2
	wait $fio && ok batch_restart_fio_verify ||
		nok batch_restart_fio_verify "$(grep -iE 'error|verify|bad' "$W/fio2.out" | head -n 3 | tr '\n' ' ')"
	check batch_restart_verify_only eval 'timeout 300 fio "${fio_args[@]}" --filename="$DEV" --randseed=999 --verify_only > "$W/fio3.out" 2>&1'
	check batch_recovery_stats_errors eval '"$UQ" stats -n $ID --json | jq -e ".errors == 0" >/dev/null'
	check batch_recovery_del uq_del "$ID"
	check batch_recovery_qemu_img_check qemu-img check -q "$W/rec.qcow2"
else nok batch_recovery_add "$(tr '\n' ' ' < "$W/add.err")"; fi
rm -f "$W/rec.qcow2"

check batch_daemon_logs_clean logs_clean
cd / && umount "$W" && rmmod brd
[ $FAILED -eq 0 ]
EOF

vm_test_on newest ublk_batch_vm --timeout 700 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc1=$?
vm_test_on 6.12 ublk_batch_vm --timeout 300 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
