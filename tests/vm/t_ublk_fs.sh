#!/usr/bin/env bash
# ublk devices used like disks, in the test VM: ext4 on a qcow2
# image survives del + add (checksums, e2fsck, qemu-img check), and with
# --discard unmap fstrim gives the deleted file's blocks back (the image file
# shrinks); a backing-file overlay with extended L2 (subclusters) takes the
# writes and leaves its backing file unchanged; --read-only;
# discard and write-zeroes read back as zeroes; foreground mode stops on SIGINT;
# --recovery: several rounds of kill -9 during writes, `recover`; waiting reads, in-flight
# writes and flushed data survive.  A LUKS-encrypted image (passphrase from a file) is served,
# recovered after kill -9 with the passphrase read again from the same file (only its path in
# the state file, the passphrase in no state or log file), and QEMU reads what was written.
# Two boots: everything on the newest kernel (7.x), then the recovery rounds again on 6.12
# (the driver's recovery code changed between them).  Result names end in @7.2 / @6.12.
# timeout: 1000
# soak-timeout: 1300
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_fs newest 6.12

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1
mnt=$W/mnt
mkdir -p "$mnt"
part=${1:-all}	# all, or recovery: the recovery rounds only

if [ "$part" = all ]; then
	# ---- ext4: write, unmount, del, add again, read back ----
	qemu-img create -q -f qcow2 "$W/fs.qcow2" 256M
	if uq_add -q 2 "$W/fs.qcow2"; then
		check ublk_fs_mkfs mkfs.ext4 -q -F "$DEV"
		check ublk_fs_mount mount "$DEV" "$mnt"
		head -c 24M /dev/urandom > "$mnt/big"
		for i in $(seq 1 40); do head -c $((i * 997)) /dev/urandom > "$mnt/small$i"; done
		mkdir -p "$mnt/dir/sub" && echo hello > "$mnt/dir/sub/file"
		(cd "$mnt" && find . -type f | sort | xargs sha256sum) > "$W/sums"
		check ublk_fs_umount umount "$mnt"
		check ublk_fs_e2fsck e2fsck -fn "$DEV"
		check ublk_fs_del uq_del "$ID"
		check ublk_fs_qemu_img_check qemu-img check -q "$W/fs.qcow2"
		kib_before=$(( $(stat -c '%b * %B' "$W/fs.qcow2") / 1024 ))
		if uq_add --discard unmap "$W/fs.qcow2"; then
			check ublk_fs_remount mount "$DEV" "$mnt"
			check ublk_fs_checksums eval '(cd "$mnt" && sha256sum --quiet -c "$W/sums")'
			# Delete a file and trim: discards reach the image, which stays
			# consistent, and the file gives the 24 MiB back.
			rm -f "$mnt/big"
			sync    # the deleted file's blocks are free for fstrim once the journal commits
			check ublk_fs_fstrim fstrim "$mnt"
			check ublk_fs_umount_again umount "$mnt"
			check ublk_fs_del_again uq_del "$ID"
			check ublk_fs_qemu_img_check_after_trim qemu-img check -q "$W/fs.qcow2"
			kib_after=$(( $(stat -c '%b * %B' "$W/fs.qcow2") / 1024 ))
			check ublk_fs_trim_shrinks_image test "$kib_after" -le $((kib_before - 20 * 1024))
		else
			nok ublk_fs_remount "second add failed: $(tr '\n' ' ' < "$W/add.err")"
		fi
	else
		nok ublk_fs_mkfs "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	umount "$mnt" 2>/dev/null
	rm -f "$W/fs.qcow2"

	# ---- backing file: writes land in the overlay only ----
	qemu-img create -q -f qcow2 "$W/base.qcow2" 16M
	qemu-io -c 'write -P 0xab 0 4M' "$W/base.qcow2" >/dev/null
	base_sum=$(sha256sum < "$W/base.qcow2")
	qemu-img create -q -f qcow2 -o extended_l2=on -b base.qcow2 -F qcow2 "$W/overlay.qcow2"
	if uq_add "$W/overlay.qcow2"; then
		check ublk_backing_reads_base reads_as "$DEV" 4 253
		head -c 2M /dev/urandom > "$W/new"
		check ublk_backing_write dd if="$W/new" of="$DEV" bs=1M seek=1 oflag=direct status=none
		# 4 KiB writes allocate subclusters; the rest of their clusters keeps the base's data.
		check ublk_backing_subcluster_write dd if="$W/new" of="$DEV" bs=4k count=1 seek=771 oflag=direct status=none
		check ublk_backing_copy dd if="$DEV" of="$W/overlay.raw" bs=1M iflag=direct status=none
		check ublk_backing_del uq_del "$ID"
		check ublk_backing_base_unchanged test "$(sha256sum < "$W/base.qcow2")" = "$base_sum"
		check ublk_backing_overlay_check qemu-img check -q "$W/overlay.qcow2"
		check ublk_backing_overlay_compare qemu-img compare -q -f raw -F qcow2 "$W/overlay.raw" "$W/overlay.qcow2"
		check ublk_backing_overlay_has_write eval 'cmp -s -i 0:$((1 << 20)) -n $((2 << 20)) "$W/new" "$W/overlay.raw"'
		check ublk_backing_subcluster_has_write eval 'cmp -s -i 0:$((771 * 4096)) -n 4096 "$W/new" "$W/overlay.raw"'
		check ublk_backing_subcluster_neighbours eval 'head -c 4096 /dev/zero | tr "\0" "\253" > "$W/ab4k" &&
			cmp -s -i $((770 * 4096)):0 -n 4096 "$W/overlay.raw" "$W/ab4k" &&
			cmp -s -i $((772 * 4096)):0 -n 4096 "$W/overlay.raw" "$W/ab4k"'
	else
		nok ublk_backing_reads_base "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	rm -f "$W/base.qcow2" "$W/overlay.qcow2" "$W/overlay.raw" "$W/new"

	# ---- read-only ----
	qemu-img create -q -f qcow2 "$W/ro.qcow2" 32M
	qemu-io -c 'write -P 0x5a 0 1M' "$W/ro.qcow2" >/dev/null
	ro_sum=$(sha256sum < "$W/ro.qcow2")
	if uq_add --read-only "$W/ro.qcow2"; then
		check ublk_ro_blockdev_getro test "$(blockdev --getro "$DEV")" = 1
		check_fails ublk_ro_write_refused "read-only|permission|not permitted|error" \
			dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct status=none
		check ublk_ro_reads reads_as "$DEV" 1 132
		check ublk_ro_qemu_img_info_shares qemu-img info "$W/ro.qcow2"
		check ublk_ro_json eval '"$UQ" list --json | jq -e ".[] | select(.id == $ID) | .read_only == true"'
		check ublk_ro_del uq_del "$ID"
		check ublk_ro_image_unchanged test "$(sha256sum < "$W/ro.qcow2")" = "$ro_sum"
	else
		nok ublk_ro_blockdev_getro "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	rm -f "$W/ro.qcow2"

	# ---- discard and write-zeroes on a raw image ----
	head -c 32M /dev/urandom > "$W/disk.raw"
	if uq_add -f raw --discard unmap "$W/disk.raw"; then
		check ublk_raw_discard blkdiscard -o 0 -l 8M "$DEV"
		check ublk_raw_write_zeroes blkdiscard -z -o 8M -l 8M "$DEV"
		check ublk_raw_zeroes_read_back reads_as "$DEV" 16 000
		check ublk_raw_del uq_del "$ID"
		check ublk_raw_image_zeroed eval 'cmp -s -n $((16 << 20)) "$W/disk.raw" /dev/zero'
	else
		nok ublk_raw_discard "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	rm -f "$W/disk.raw"

	# ---- foreground mode: SIGINT stops and removes the device ----
	qemu-img create -q -f qcow2 "$W/fg.qcow2" 16M
	"$UQ" add --foreground "$W/fg.qcow2" > "$W/fg.out" 2>&1 &
	fg=$!
	if wait_for 60 grep -q '^/dev/ublkb' "$W/fg.out"; then
		dev=$(head -n1 "$W/fg.out")
		check ublk_fg_device test -b "$dev"
		kill -INT $fg
		check ublk_fg_exits wait_for 60 eval '! kill -0 $fg 2>/dev/null'
		wait $fg; rc=$?
		check ublk_fg_exit_status test $rc = 0
		check ublk_fg_device_gone test ! -e "$dev"
	else
		nok ublk_fg_device "no device printed: $(tr '\n' ' ' < "$W/fg.out")"
		kill -9 $fg 2>/dev/null
	fi
fi

# ---- recovery: the daemon dies, I/O waits, `recover` brings the device back ----
# Several rounds on one device: each writes a region with fsync (flushed: must survive), starts
# a writer that is still running when the daemon gets SIGKILL, checks that a read issued while
# no daemon runs waits for the next one, recovers, and verifies every flushed region so far.
rounds=4
[ "${SOAK:-0}" = 1 ] && rounds=12
qemu-img create -q -f qcow2 "$W/rec.qcow2" 64M
if uq_add --recovery -q 2 --discard unmap --discard-no-unref "$W/rec.qcow2"; then
	check ublk_recovery_list_json_features eval '"$UQ" list -n "$ID" --json |
		jq -e ".[0].features | index(\"user_recovery\") != null and index(\"user_recovery_reissue\") != null"'
	check_fails ublk_recover_live_refused "LIVE, served by pid" "$UQ" recover -n "$ID"
	rec_ok=0 rec_t0=$SECONDS
	for r in $(seq 1 $rounds); do
		head -c 2M /dev/urandom > "$W/d$r"
		# Flushed (fsync) before the crash: must survive it.
		dd if="$W/d$r" of="$DEV" bs=1M seek=$((2 * r)) oflag=direct conv=fsync status=none ||
			{ nok ublk_recovery_round_$r "flushed write failed"; break; }
		pid=$("$UQ" list --json | jq ".[] | select(.id == $ID) | .pid")
		# A writer in flight at the kill (its requests are reissued after recovery).
		ios=$(dev_ios "$DEV")
		dd if=/dev/urandom of="$DEV" bs=64k count=160 seek=$((48 * 16)) oflag=direct status=none &
		writer=$!
		wait_for 30 eval '[ "$(dev_ios "$DEV")" -gt $((ios + 8)) ]'
		kill -9 "$pid"
		if ! wait_for 30 eval '[ "$("$UQ" list --json | jq -r ".[] | select(.id == $ID) | .state")" = QUIESCED ]'; then
			nok ublk_recovery_round_$r "device not QUIESCED after kill -9"; break
		fi
		# A read issued while no daemon runs waits for the next one.
		(dd if="$DEV" bs=1M skip=$((2 * r)) count=2 iflag=direct status=none | cmp -s - "$W/d$r") &
		reader=$!
		if ! "$UQ" recover -n "$ID" > "$W/recover.out" 2>&1; then
			nok ublk_recovery_round_$r "recover failed: $(tr '\n' ' ' < "$W/recover.out")"; break
		fi
		[ "$("$UQ" list --json | jq -r ".[] | select(.id == $ID) | .state")" = LIVE ] ||
			{ nok ublk_recovery_round_$r "not LIVE after recover"; break; }
		wait_for 60 eval '! kill -0 $reader 2>/dev/null && ! kill -0 $writer 2>/dev/null' ||
			{ nok ublk_recovery_round_$r "I/O still waiting 60 s after recover"; break; }
		wait $reader || { nok ublk_recovery_round_$r "the read waiting across the crash got wrong data"; break; }
		wait $writer || { nok ublk_recovery_round_$r "the writer in flight at the kill failed"; break; }
		bad=
		for k in $(seq 1 $r); do
			dd if="$DEV" bs=1M skip=$((2 * k)) count=2 iflag=direct status=none | cmp -s - "$W/d$k" || bad="$bad $k"
		done
		[ -z "$bad" ] || { nok ublk_recovery_round_$r "flushed regions of rounds$bad lost"; break; }
		rec_ok=$r
	done
	echo "# recovery: $rec_ok rounds in $((SECONDS - rec_t0)) s"
	[ "$rec_ok" = "$rounds" ] && ok "ublk_recovery_rounds: $rounds kill -9 + recover rounds, flushed data intact, waiting I/O completed"
	# The new daemons took the discard options over from the state file.
	check ublk_recovery_discard_options jq -e '.discard == "unmap" and .discard_no_unref' "/run/ublk-qcow2/ublk$ID.json"
	check ublk_recovery_fio_verify fio_verify "$DEV" --size=16M
	check ublk_recovery_del uq_del "$ID"
	# Killed in the middle of writes: leaked clusters are allowed, nothing else.
	qemu-img check -q "$W/rec.qcow2" > "$W/rec.check" 2>&1; rc=$?
	check ublk_recovery_qemu_img_check eval '[ $rc = 0 ] || [ $rc = 3 ]'
else
	nok ublk_recovery_rounds "add --recovery failed: $(tr '\n' ' ' < "$W/add.err")"
fi
rm -f "$W/rec.qcow2" "$W"/d[0-9]*

if [ "$part" = all ]; then
	# ---- LUKS: --key-file, recover reads the same key file again ----
	PASS=ublk-luks-passphrase
	SEC="secret,id=s0,data=$PASS"
	printf %s "$PASS" > "$W/key"
	"$(dirname "$LIB")/../lib/qemu-img-luks" create -q -f qcow2 --object "$SEC" \
		-o encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10 "$W/luks.qcow2" 32M
	qemu-io --object "$SEC" --image-opts -c 'write -P 0x3c 0 1M' \
		"driver=qcow2,file.filename=$W/luks.qcow2,encrypt.key-secret=s0" >/dev/null
	check_fails ublk_luks_no_key "encrypted.*--key-file" "$UQ" add "$W/luks.qcow2"
	if uq_add --recovery --key-file "$W/key" "$W/luks.qcow2"; then
		check ublk_luks_reads_qemu_data reads_as "$DEV" 1 074
		head -c 2M /dev/urandom > "$W/ld"
		check ublk_luks_write dd if="$W/ld" of="$DEV" bs=1M seek=2 oflag=direct conv=fsync status=none
		check ublk_luks_state_has_key_path jq -e ".key_file == \"$(realpath "$W/key")\"" "/run/ublk-qcow2/ublk$ID.json"
		check ublk_luks_no_passphrase_in_state eval '! grep -rq "$PASS" /run/ublk-qcow2/'
		pid=$("$UQ" list --json | jq ".[] | select(.id == $ID) | .pid")
		kill -9 "$pid"
		if wait_for 30 eval '[ "$("$UQ" list --json | jq -r ".[] | select(.id == $ID) | .state")" = QUIESCED ]'; then
			check ublk_luks_recover_same_key_file "$UQ" recover -n "$ID"
			check ublk_luks_recovered_data eval 'dd if="$DEV" bs=1M skip=2 count=2 iflag=direct status=none | cmp -s - "$W/ld"'
		else
			nok ublk_luks_recover_same_key_file "device not QUIESCED after kill -9"
		fi
		check ublk_luks_del uq_del "$ID"
		qemu-img check -q --object "$SEC" --image-opts "driver=qcow2,file.filename=$W/luks.qcow2,encrypt.key-secret=s0" \
			> "$W/luks.check" 2>&1; rc=$?
		check ublk_luks_qemu_img_check eval '[ $rc = 0 ] || [ $rc = 3 ]'
		check ublk_luks_qemu_reads_our_write eval 'qemu-img convert --object "$SEC" --image-opts \
			"driver=qcow2,file.filename=$W/luks.qcow2,encrypt.key-secret=s0" -O raw "$W/luks.raw" &&
			cmp -s -i $((2 << 20)):0 -n $((2 << 20)) "$W/luks.raw" "$W/ld"'
	else
		nok ublk_luks_reads_qemu_data "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	rm -f "$W/luks.qcow2" "$W/luks.raw" "$W/ld" "$W/key"
fi

check ublk_fs_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_timeout=660
[ "${SOAK:-0}" = 1 ] && vm_timeout=960     # 12 recovery rounds instead of 4
vm_test_on newest ublk_fs_vm --timeout $vm_timeout -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh" all; rc1=$?
vm_test_on 6.12 ublk_fs_vm --timeout 300 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh" recovery; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
