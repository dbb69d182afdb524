#!/usr/bin/env bash
# `ublk-qcow2 restart -n ID` in the test VM: the daemon of a live --recovery device is replaced
# while the device is in use, with no failed request and nothing acknowledged lost:
#  - fio verify (crc32c, 2 queues) keeps writing across two restarts and verifies every block;
#    after a third restart with nothing in flight, fio --verify_only re-reads all of it (writes
#    fio never flushed survive: the old daemon flushes before it exits);
#  - ext4 mounted, files written before, during (fsync'd writes in flight) and after a restart
#    are intact after unmount, e2fsck clean; qemu-img check clean after del;
#  - a device added without --recovery: refused naming `add --recovery`, the device untouched
#    (same daemon, LIVE, still serving);
#  - a device whose daemon was killed: refused naming `recover`, which then works.
# Two boots, one per mechanism, by the kernel's features: the newest kernel (7.x, UBLK_F_QUIESCE:
# QUIESCE_DEV) and 6.12 (the fallback: gate, drain, flush, exit).  Result names end in @7.2 / @6.12.
# timeout: 800
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_restart newest 6.12

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1
mnt=$W/mnt
mkdir -p "$mnt" "$W/src"
state() { "$UQ" list -n "$1" --json | jq -r '.[0].state'; }
dpid() { "$UQ" list -n "$1" --json | jq -r '.[0].pid'; }
# restart_ok NAME: one restart of $ID; it prints the device and the new daemon serves it.
restart_ok() {
	local name=$1 old new t0=$SECONDS
	old=$(dpid "$ID")
	if ! timeout 150 "$UQ" restart -n "$ID" > "$W/restart.out" 2>&1; then
		nok "$name" "restart failed: $(tr '\n' ' ' < "$W/restart.out")"; return 1
	fi
	new=$(dpid "$ID")
	echo "# $name: restart took $((SECONDS - t0)) s"
	if [ "$(head -n1 "$W/restart.out")" != "$DEV" ] || [ "$(state "$ID")" != LIVE ] ||
		[ "$new" = "$old" ] || ! kill -0 "$new" 2>/dev/null || kill -0 "$old" 2>/dev/null; then
		nok "$name" "after restart: output '$(tr '\n' ' ' < "$W/restart.out")', state $(state "$ID"), pid $old -> $new"
		return 1
	fi
	ok "$name"
}
if has_feature quiesce; then
	echo "# restart mechanism here: UBLK_U_CMD_QUIESCE_DEV"
else
	echo "# restart mechanism here: the fallback (no UBLK_F_QUIESCE): gate, drain, flush, exit"
fi

parts=${1:-refuse,fio,ext4}
# ---- refused without --recovery; the device is untouched ----
echo "# [$SECONDS s] refusal"
if [[ $parts == *refuse* ]]; then
qemu-img create -q -f qcow2 "$W/plain.qcow2" 16M
if uq_add "$W/plain.qcow2"; then
	pid0=$(dpid "$ID")
	check_fails ublk_restart_refused_without_recovery "add --recovery" "$UQ" restart -n "$ID"
	check ublk_restart_refused_device_untouched eval '[ "$(state "$ID")" = LIVE ] && [ "$(dpid "$ID")" = "$pid0" ]'
	head -c 1M /dev/urandom > "$W/p1"
	check ublk_restart_refused_still_serving eval 'dd if="$W/p1" of="$DEV" bs=1M oflag=direct conv=fsync status=none &&
		dd if="$DEV" bs=1M count=1 iflag=direct status=none | cmp -s - "$W/p1"'
	check ublk_restart_refused_del uq_del "$ID"
else
	nok ublk_restart_refused_without_recovery "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi
rm -f "$W/plain.qcow2" "$W/p1"
fi

# ---- fio verify across restarts ----
echo "# [$SECONDS s] fio"
if [[ $parts == *fio* ]]; then
fio_args=(--name=verify --filename=DEV --ioengine=io_uring --direct=1 --rw=randwrite --bs=4k
	--iodepth=32 --verify=crc32c --verify_fatal=1 --size=8M --randseed=1234)
qemu-img create -q -f qcow2 "$W/fio.qcow2" 16M
if uq_add --recovery -q 2 "$W/fio.qcow2"; then
	if has_feature quiesce; then
		check ublk_restart_device_has_quiesce eval '"$UQ" list -n "$ID" --json |
			jq -e ".[0].features | index(\"quiesce\") != null and index(\"user_recovery_reissue\") != null"'
	fi
	ios=$(dev_ios "$DEV")
	# Rate-limited so that the writes last across the restarts (about 14 s).
	timeout 300 fio "${fio_args[@]/#--filename=DEV/--filename=$DEV}" --rate_iops=150 > "$W/fio.out" 2>&1 &
	fio=$!
	wait_for 60 eval '[ "$(dev_ios "$DEV")" -gt $((ios + 100)) ]'
	restart_ok ublk_restart_under_fio_1
	restart_ok ublk_restart_under_fio_2
	kill -0 $fio 2>/dev/null && running=yes || running=no
	echo "# fio still running after the second restart: $running"
	wait $fio; rc=$?
	if [ $rc = 0 ]; then ok ublk_restart_fio_verify
	else nok ublk_restart_fio_verify "fio exit $rc: $(grep -iE 'error|verify|bad' "$W/fio.out" | head -n 3 | tr '\n' ' ')"; fi
	# Nothing in flight, nothing flushed since fio's writes: the hand-over's flush keeps them.
	restart_ok ublk_restart_idle
	check ublk_restart_fio_verify_only_after eval 'timeout 300 fio "${fio_args[@]/#--filename=DEV/--filename=$DEV}" --verify_only > "$W/fio2.out" 2>&1'
	check ublk_restart_stats_after eval '"$UQ" stats -n "$ID" --json | jq -e ".errors == 0"'

	# ---- a dead daemon: restart says to use recover ----
	echo "# [$SECONDS s] kill -9"
	kill -9 "$(dpid "$ID")"
	if wait_for 30 eval '[ "$(state "$ID")" = QUIESCED ]'; then
		check_fails ublk_restart_dead_daemon_says_recover "recover -n $ID" "$UQ" restart -n "$ID"
		check ublk_restart_dead_daemon_recover "$UQ" recover -n "$ID"
	else
		nok ublk_restart_dead_daemon_says_recover "device not QUIESCED after kill -9"
	fi
	check ublk_restart_fio_del uq_del "$ID"
	# The last writes were flushed by a hand-over, and only reads followed: clean.
	check ublk_restart_fio_qemu_img_check qemu-img check -q "$W/fio.qcow2"
else
	nok ublk_restart_under_fio_1 "add --recovery failed: $(tr '\n' ' ' < "$W/add.err")"
fi
rm -f "$W/fio.qcow2"
fi

# ---- ext4 mounted, writes in flight ----
echo "# [$SECONDS s] ext4"
if [[ $parts == *ext4* ]]; then
qemu-img create -q -f qcow2 "$W/fs.qcow2" 64M
if uq_add --recovery "$W/fs.qcow2" && mkfs.ext4 -q -F "$DEV" && mount "$DEV" "$mnt"; then
	for i in $(seq 1 5); do head -c $((i * 40000)) /dev/urandom > "$W/src/before$i"; cp "$W/src/before$i" "$mnt/"; done
	sync
	for i in $(seq 1 12); do head -c 256k /dev/urandom > "$W/src/during$i"; done
	# fsync'd writes, one after another, still going during the restart
	(for i in $(seq 1 12); do dd if="$W/src/during$i" of="$mnt/during$i" bs=64k conv=fsync status=none || exit 1; done) &
	writer=$!
	wait_for 60 test -e "$mnt/during2"
	echo "# [$SECONDS s] ext4 restart"
	restart_ok ublk_restart_ext4_writes_in_flight
	echo "# [$SECONDS s] ext4 restarted"
	wait $writer && ok ublk_restart_ext4_writer || nok ublk_restart_ext4_writer "a write failed across the restart"
	for i in $(seq 1 5); do head -c $((i * 30011)) /dev/urandom > "$W/src/after$i"; cp "$W/src/after$i" "$mnt/"; done
	check ublk_restart_ext4_umount umount "$mnt"
	check ublk_restart_ext4_e2fsck e2fsck -fn "$DEV"
	if mount -o ro "$DEV" "$mnt"; then
		bad=
		for f in "$W"/src/*; do cmp -s "$f" "$mnt/$(basename "$f")" || bad="$bad $(basename "$f")"; done
		[ -z "$bad" ] && ok ublk_restart_ext4_files_intact || nok ublk_restart_ext4_files_intact "differ:$bad"
		umount "$mnt"
	else
		nok ublk_restart_ext4_files_intact "remount failed"
	fi
	check ublk_restart_ext4_del uq_del "$ID"
	check ublk_restart_ext4_qemu_img_check qemu-img check -q "$W/fs.qcow2"
else
	nok ublk_restart_ext4_writes_in_flight "add --recovery, mkfs or mount failed: $(tr '\n' ' ' < "$W/add.err")"
fi
umount "$mnt" 2>/dev/null
rm -rf "$W/fs.qcow2" "$W/src"
fi
echo "# [$SECONDS s] done"

check ublk_restart_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_test_on newest ublk_restart_vm --timeout 360 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc1=$?
vm_test_on 6.12 ublk_restart_vm --timeout 360 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
