#!/usr/bin/env bash
# ublk data path in the test VM, one boot on each kernel (6.12 and the newest, 7.x; result
# names end in @6.12 / @7.2): fio write+verify through
# /dev/ublkbN on preallocated and empty qcow2 images with 1 and 2 queues,
# then the device's contents against the image (qemu-img check + compare);
# `del` under load; image locks against qemu and a second `add`; ID in use;
# add --size creating the image it serves;
# kill -9 without --recovery;
# SIGTERM; list --json; daemon logs free of sanitizer reports.
# timeout: 900
# soak-timeout: 1300
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_io 6.12 newest

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1

# Write+verify with fio, copy the device, delete it, let qemu-img judge.
fio_case() {	# NAME QUEUES CREATE-OPTIONS...
	local name=$1 q=$2; shift 2
	rm -f "$W/$name.qcow2" "$W/$name.raw"
	# 64M: fio's --size=64M covers the whole device.
	qemu-img create -q -f qcow2 "$@" "$W/$name.qcow2" 64M
	if ! uq_add -q "$q" "$W/$name.qcow2"; then
		nok "ublk_${name}_add" "$(tr '\n' ' ' < "$W/add.err")"; return
	fi
	check "ublk_${name}_no_io_scheduler" grep -q '\[none\]' "/sys/block/${DEV#/dev/}/queue/scheduler"
	check "ublk_${name}_fio_verify" fio_verify "$DEV"
	if [ "$q" -gt 1 ]; then
		check "ublk_${name}_list_json_queues" \
			test "$("$UQ" list --json | jq ".[] | select(.id == $ID) | .queues")" = "$q"
	fi
	check "ublk_${name}_copy" dd if="$DEV" of="$W/$name.raw" bs=1M iflag=direct status=none
	check "ublk_${name}_del" uq_del "$ID"
	check "ublk_${name}_device_gone" test ! -e "$DEV" -a ! -e "/dev/ublkc$ID" -a ! -e "/run/ublk-qcow2/ublk$ID.json"
	check "ublk_${name}_qemu_img_check" qemu-img check -q "$W/$name.qcow2"
	check "ublk_${name}_qemu_img_compare" qemu-img compare -q -f raw -F qcow2 "$W/$name.raw" "$W/$name.qcow2"
	rm -f "$W/$name.qcow2" "$W/$name.raw"
}
fio_case prealloc_q1 1 -o preallocation=falloc
fio_case empty_q2 2
if [ "${SOAK:-0}" = 1 ]; then
	fio_case prealloc_q2 2 -o preallocation=falloc
	fio_case empty_q1 1
fi

# del while fio runs: refused (fio has it open), then del --force: no hang, fio
# ends, the image is consistent.
qemu-img create -q -f qcow2 "$W/load.qcow2" 128M
if uq_add -q 2 "$W/load.qcow2"; then
	pid=$("$UQ" list --json | jq ".[] | select(.id == $ID) | .pid")
	fio --name=load --filename="$DEV" --ioengine=io_uring --direct=1 --rw=randrw --bs=4k \
		--iodepth=32 --size=64M --time_based --runtime=120 >"$W/load.out" 2>&1 &
	fio_pid=$!
	check ublk_del_under_load_started wait_for 60 eval '[ "$(dev_ios "$DEV")" -gt 2000 ]'
	check_fails ublk_del_under_load_refused "/dev/ublkb$ID is open in process [0-9]+ \(fio\)" "$UQ" del -n "$ID"
	check ublk_del_under_load timeout 120 "$UQ" del -n "$ID" --force
	check ublk_del_under_load_fio_ends wait_for 60 eval '! kill -0 $fio_pid 2>/dev/null'
	kill -9 $fio_pid 2>/dev/null; wait $fio_pid 2>/dev/null
	check ublk_del_under_load_daemon_gone test ! -d "/proc/$pid"
	check ublk_del_under_load_qemu_img_check qemu-img check -q "$W/load.qcow2"
else
	nok ublk_del_under_load "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# Locks: a served image is refused to a second add and to qemu writers.
qemu-img create -q -f qcow2 "$W/lock.qcow2" 64M
qemu-img create -q -f qcow2 "$W/other.qcow2" 64M
if uq_add "$W/lock.qcow2"; then
	lock_id=$ID
	check_fails ublk_lock_second_add "in use" "$UQ" add "$W/lock.qcow2"
	check_fails ublk_lock_qemu_io_refused "lock" qemu-io -c 'write 0 4k' "$W/lock.qcow2"
	check_fails ublk_lock_qemu_img_refused "lock" qemu-img info "$W/lock.qcow2"
	before=$(ls /dev | grep -c '^ublkc')
	check_fails ublk_add_id_in_use "already exists" "$UQ" add -n "$lock_id" "$W/other.qcow2"
	check ublk_add_failure_leaves_nothing test "$(ls /dev | grep -c '^ublkc')" = "$before"
	check ublk_add_failure_unlocks qemu-io -c 'write 0 4k' "$W/other.qcow2"
	check ublk_list_json_parses eval '"$UQ" list --json | jq -e "length >= 1 and (.[0] | has(\"state\") and has(\"image\") and has(\"pid\"))"'
	# The kernel's features as GET_FEATURES gives them to ublk_ctrl_test, and the device's.
	check ublk_list_json_features eval '"$UQ" list -n "$lock_id" --json | jq -e --arg k "${UBLK_FEATURES#* }" \
		"(.[0].kernel_features | join(\" \")) == \$k and (.[0].features | index(\"cmd_ioctl_encode\")) != null"'
	check ublk_list_text eval '"$UQ" list -n "$lock_id" | grep -q "^$lock_id  *LIVE .*lock.qcow2"'
	# SIGTERM to the daemon: it stops and removes its device by itself.
	pid=$("$UQ" list --json | jq ".[] | select(.id == $lock_id) | .pid")
	kill -TERM "$pid"
	check ublk_sigterm_removes_device wait_for 60 eval '[ ! -e /dev/ublkc$lock_id ] && [ ! -d /proc/$pid ]'
	check ublk_sigterm_state_file_gone test ! -e "/run/ublk-qcow2/ublk$lock_id.json"
	check ublk_sigterm_qemu_img_check qemu-img check -q "$W/lock.qcow2"
else
	nok ublk_lock_second_add "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi
# A daemon killed without --recovery: the device dies, del still removes it,
# and the image has at worst leaked clusters (qemu-img check exit 0 or 3).
qemu-img create -q -f qcow2 "$W/kill.qcow2" 64M
if uq_add "$W/kill.qcow2"; then
	check ublk_kill9_write dd if=/dev/urandom of="$DEV" bs=1M count=4 oflag=direct status=none
	pid=$("$UQ" list --json | jq ".[] | select(.id == $ID) | .pid")
	kill -9 "$pid"
	check ublk_kill9_dead wait_for 30 eval '[ "$("$UQ" list --json | jq -r ".[] | select(.id == $ID) | .state")" = DEAD ]'
	check ublk_kill9_del uq_del "$ID"
	check ublk_kill9_gone test ! -e "/dev/ublkc$ID"
	qemu-img check -q "$W/kill.qcow2" >"$W/kill.check" 2>&1; rc=$?
	check ublk_kill9_qemu_img_check eval '[ $rc = 0 ] || [ $rc = 3 ]'
else
	nok ublk_kill9_write "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# add --size makes a missing image (create's code) and serves it.
rm -f "$W/made.qcow2"
if uq_add --size 48M "$W/made.qcow2"; then
	check ublk_add_size_device_size test "$(blockdev --getsize64 "$DEV")" = $((48 << 20))
	check ublk_add_size_write dd if=/dev/urandom of="$W/made.data" bs=1M count=4 status=none
	check ublk_add_size_write_dev dd if="$W/made.data" of="$DEV" bs=1M oflag=direct status=none
	check ublk_add_size_del uq_del "$ID"
	check ublk_add_size_qemu_img_check qemu-img check -q "$W/made.qcow2"
	check ublk_add_size_convert qemu-img convert -O raw "$W/made.qcow2" "$W/made.raw"
	check ublk_add_size_data cmp -n $((4 << 20)) "$W/made.raw" "$W/made.data"
	rm -f "$W/made.qcow2" "$W/made.raw" "$W/made.data"
else
	nok ublk_add_size "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# Bad input that needs the kernel (the rest is in tests/ublk/t_ublk_cli.sh).
check_fails ublk_del_missing "no ublk device" "$UQ" del -n 99

check ublk_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_timeout=420
[ "${SOAK:-0}" = 1 ] && vm_timeout=600     # two more fio cases
vm_test_on 6.12 ublk_io_vm --timeout $vm_timeout -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc1=$?
vm_test_on newest ublk_io_vm --timeout $vm_timeout -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
