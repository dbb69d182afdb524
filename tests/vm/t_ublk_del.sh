#!/usr/bin/env bash
# `del` of a device in use, and partitioned images, in the test VM on 6.12 and on
# the newest kernel.  With UBLK_F_SAFE_STOP_DEV (7.x) del stops through
# TRY_STOP_DEV, on 6.12 it looks for users first; both must refuse a device that
# is mounted (the disk, or only a partition), open in a process, or an LVM PV in
# use, naming the user and the fix, leaving the device LIVE and the file system
# working; --force stops it anyway; SIGTERM (systemd's stop) does not stop a
# mounted device but stops it once it is unmounted.  A GPT image with two ext4
# partitions and an LVM PV is written through ublk, then read through QEMU's own
# qcow2 code (qemu-img convert to raw, a read-only loop device): the same files.
# timeout: 1500
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_del 6.12 newest

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1
if has_feature safe_stop_dev; then
	echo "# UBLK_F_SAFE_STOP_DEV: del stops through TRY_STOP_DEV"
else
	echo "# no UBLK_F_SAFE_STOP_DEV: del looks for users, then stops"
fi
live() { "$UQ" list -n "$1" --json | jq -e '.[0].state == "LIVE"' >/dev/null; }
gone() { ! "$UQ" list -n "$1" >/dev/null 2>&1; }
mkdir -p "$W/m1" "$W/m2" "$W/m3"

# --- a mounted disk ---------------------------------------------------------------
qemu-img create -q -f qcow2 "$W/m.qcow2" 64M
if uq_add "$W/m.qcow2"; then
	if has_feature safe_stop_dev; then
		check del_device_has_safe_stop eval '"$UQ" list -n $ID --json | jq -e ".[0].features | index(\"safe_stop_dev\")"'
	fi
	mkfs.ext4 -q "$DEV" && mount "$DEV" "$W/m1" && echo hello >"$W/m1/f" && sync
	check_fails del_mounted_refused "/dev/ublkb$ID is mounted on $W/m1: unmount it first \(umount $W/m1\)" "$UQ" del -n "$ID"
	check_fails del_mounted_names_force "del -n $ID --force" "$UQ" del -n "$ID"
	check del_mounted_still_live live "$ID"
	check del_mounted_fs_works eval 'echo more >>"$W/m1/f" && sync && [ "$(cat "$W/m1/f")" = "hello
more" ]'
	check_fails del_all_mounted_refused "is mounted on $W/m1" "$UQ" del --all
	check del_all_still_live live "$ID"
	# SIGTERM, as systemd stops the service: refused while mounted, logged, and
	# done once the file system is unmounted.
	pid=$("$UQ" list -n "$ID" --json | jq '.[0].pid')
	kill -TERM "$pid"
	check sigterm_mounted_logged wait_for 20 grep -q "not stopping /dev/ublkb$ID while it is in use.*mounted on $W/m1" "/run/ublk-qcow2/ublk$ID.log"
	check sigterm_mounted_still_serving eval 'live $ID && kill -0 $pid && dd if=/dev/urandom of="$W/m1/g" bs=64k count=4 conv=fsync status=none'
	umount "$W/m1"
	check sigterm_stops_once_unmounted wait_for 60 eval '! kill -0 $pid 2>/dev/null && gone $ID'
	check sigterm_image_clean qemu-img check -q "$W/m.qcow2"
else
	nok del_mounted "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# --- --force on a mounted disk --------------------------------------------------------
if uq_add "$W/m.qcow2"; then
	mount "$DEV" "$W/m1"
	timeout 120 "$UQ" del -n "$ID" --force >"$W/force.out" 2>&1; rc=$?
	check del_force_exit_0 test "$rc" = 0
	check del_force_warns grep -q "warning: del --force: stopping /dev/ublkb$ID while in use.*" "$W/force.out"
	check del_force_names_mount grep -q "mounted on $W/m1" "$W/force.out"
	check del_force_node_gone test ! -b "$DEV"
	umount "$W/m1" 2>/dev/null || umount -l "$W/m1"
	check del_force_device_deleted wait_for 30 gone "$ID"
else
	nok del_force "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# --- held open by a process --------------------------------------------------------------
qemu-img create -q -f qcow2 "$W/o.qcow2" 16M
if uq_add "$W/o.qcow2"; then
	sleep 600 <"$DEV" &
	holder=$!
	check_fails del_open_refused "/dev/ublkb$ID is open in process $holder \(sleep\): stop it first \(kill $holder\)" "$UQ" del -n "$ID"
	check del_open_still_serving eval 'live $ID && dd if=/dev/zero of="$DEV" bs=64k count=4 oflag=direct status=none'
	kill "$holder"; wait "$holder" 2>/dev/null
	check del_after_close uq_del "$ID"
else
	nok del_open "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# --- a GPT image: two ext4 partitions and an LVM PV ----------------------------------------
# LVM with its configuration in the guest's tmpfs: no udev, no devices file,
# nothing written under the (shared) /etc.
export LVM_SYSTEM_DIR=$W/lvm
mkdir -p "$LVM_SYSTEM_DIR" /run/lock/lvm
cat >"$LVM_SYSTEM_DIR/lvm.conf" <<'LVM'
devices { use_devicesfile = 0 obtain_device_list_from_udev = 0 external_device_info_source = "none"
          filter = [ "a|^/dev/ublkb|", "a|^/dev/loop|", "r|.*|" ] }
activation { udev_sync = 0 udev_rules = 0 monitoring = 0 }
backup { backup = 0 archive = 0 }
global { use_lvmpolld = 0 }
LVM
head -c 3M /dev/urandom >"$W/lvdata"
qemu-img create -q -f qcow2 "$W/gpt.qcow2" 128M
if uq_add "$W/gpt.qcow2"; then
	P=${DEV}p
	printf 'label: gpt\nsize=32M, name=one\nsize=32M, name=two\ntype=E6D6D379-F507-44C2-A23C-238F2A3DF928, name=pv\n' |
		sfdisk -q "$DEV" >"$W/sfdisk.out" 2>&1
	check gpt_partitions_appear wait_for 20 eval 'test -b ${P}1 && test -b ${P}2 && test -b ${P}3'
	check gpt_list_json_partitions eval '"$UQ" list -n $ID --json | jq -e --arg d "$DEV" ".[0].partitions == [\$d+\"p1\", \$d+\"p2\", \$d+\"p3\"]"'
	mkfs.ext4 -q "${P}1" && mkfs.ext4 -q "${P}2"
	mount "${P}1" "$W/m1"
	head -c 2M /dev/urandom >"$W/one.ref"; cp "$W/one.ref" "$W/m1/one.bin"; sync
	check_fails del_partition_mounted_refused "/dev/ublkb${ID}p1 is mounted on $W/m1" "$UQ" del -n "$ID"
	check del_partition_still_live live "$ID"
	mount "${P}2" "$W/m2"
	head -c 2M /dev/urandom >"$W/two.ref"; cp "$W/two.ref" "$W/m2/two.bin"; sync
	check lvm_pv_vg_lv eval 'lvm pvcreate -qq "${P}3" && lvm vgcreate -qq uqvg "${P}3" && lvm lvcreate -qq -L 8M -n lv uqvg' 
	check lvm_lv_written eval 'dd if="$W/lvdata" of=/dev/mapper/uqvg-lv bs=1M oflag=direct status=none'
	umount "$W/m1" "$W/m2"
	check_fails del_lvm_refused "/dev/ublkb${ID}p3 is held by dm-[0-9]+ \(/dev/mapper/uqvg-lv, LVM volume group uqvg\): deactivate it first \(vgchange -an uqvg\)" "$UQ" del -n "$ID"
	check del_lvm_still_serving eval 'live $ID && dd if=/dev/mapper/uqvg-lv bs=1M count=3 iflag=direct status=none | cmp -s - "$W/lvdata"'
	check del_lvm_fs_intact eval 'mount "${P}1" "$W/m1" && cmp -s "$W/m1/one.bin" "$W/one.ref" && umount "$W/m1"'
	lvm vgchange -qq -an uqvg
	check del_gpt_after_release uq_del "$ID"
	# The same data through QEMU's qcow2 code rather than ours: qemu-img converts the image
	# to raw, a read-only loop device with a partition scan serves its partitions.
	if qemu-img convert -f qcow2 -O raw "$W/gpt.qcow2" "$W/gpt.raw" 2>"$W/conv.err" &&
		L=$(losetup -r -P -f --show "$W/gpt.raw" 2>>"$W/conv.err") && wait_for 20 test -b "${L}p3"; then
		check gpt_qemu_part1_same eval 'debugfs -R "cat /one.bin" ${L}p1 2>/dev/null | cmp -s - "$W/one.ref" && e2fsck -fn ${L}p1 >/dev/null 2>&1'
		check gpt_qemu_part2_same eval 'debugfs -R "cat /two.bin" ${L}p2 2>/dev/null | cmp -s - "$W/two.ref" && e2fsck -fn ${L}p2 >/dev/null 2>&1'
		check gpt_qemu_lv_same eval 'lvm vgchange -qq -ay uqvg && dd if=/dev/mapper/uqvg-lv bs=1M count=3 iflag=direct status=none | cmp -s - "$W/lvdata"'
		lvm vgchange -qq -an uqvg
		losetup -d "$L"
	else
		nok gpt_qemu_readback "qemu-img convert or losetup failed: $(tr '\n' ' ' <"$W/conv.err")"
	fi
	check gpt_image_clean qemu-img check -q "$W/gpt.qcow2"
else
	nok gpt "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi

# --- an MBR image: partitions appear, list --json and the udev rule name them ----------------
# A real udevd with our rule (the guest's /run is its own), last: its probes
# open devices, which the cases above must not see.
mkdir -p /run/udev/rules.d
sed "s|@BINDIR@/ublk-qcow2|$UQ|" "$ROOT/dist/99-ublk-qcow2.rules.in" >/run/udev/rules.d/99-ublk-qcow2.rules
export SYSTEMD_IGNORE_CHROOT=1
SYSTEMD_IGNORE_CHROOT=1 /lib/systemd/systemd-udevd --daemon >"$W/udevd.log" 2>&1 || nok udevd "$(tr '\n' ' ' <"$W/udevd.log")"
qemu-img create -q -f raw "$W/mbr.raw" 32M
printf 'label: dos\nsize=8M\nsize=8M\n' | sfdisk -q "$W/mbr.raw" >/dev/null 2>&1
if uq_add "$W/mbr.raw"; then
	check mbr_partitions eval 'wait_for 20 test -b ${DEV}p2 && "$UQ" list -n $ID --json | jq -e ".[0].partitions | length == 2"'
	udevadm settle -t 30
	# (not "name": check's own local of that name would shadow it inside wait_for's eval)
	link=$(systemd-escape --path "$W/mbr.raw")
	# udevd may still be taking the partitions' events when settle returns: wait (bounded)
	# for the links to appear.
	check udev_names_disk wait_for 30 eval 'test "$(readlink -f "/dev/disk/by-ublk-qcow2/$link")" = "$DEV"'
	check udev_names_partitions wait_for 30 eval 'test "$(readlink -f "/dev/disk/by-ublk-qcow2/$link-part1")" = "${DEV}p1" &&
		test "$(readlink -f "/dev/disk/by-ublk-qcow2/$link-part2")" = "${DEV}p2"'
	check mbr_del timeout 120 "$UQ" del -n "$ID"
	udevadm settle -t 30
	check udev_partition_links_gone wait_for 30 test ! -e "/dev/disk/by-ublk-qcow2/$link-part1"
else
	nok mbr "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi
udevadm control --exit
rm -f /run/udev/rules.d/99-ublk-qcow2.rules

check del_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

rc=0
for k in 6.12 newest; do
	vm_test_on "$k" ublk_del_vm --timeout 660 -- env LIB="$here/ublk_guest_lib.sh" ROOT="$root" bash "$tmp/guest.sh" || rc=1
done
exit $rc
