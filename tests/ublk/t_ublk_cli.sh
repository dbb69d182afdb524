#!/usr/bin/env bash
# ublk commands on the host, no VM: --help, bad arguments, bad or missing
# images and an image a qemu process holds are refused before any device is
# made; without ublk in the kernel, the "modprobe ublk_drv" message.
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=${UQ_TMP:-}
[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
UQ=${UQ:-$root/build/debug/ublk-qcow2}
[ -x "$UQ" ] || { echo "not ok ublk_cli: no binary $UQ (build first)"; exit 1; }

failed=0
ok() { echo "ok $1"; }
nok() { echo "not ok $1: $2"; failed=1; }
# expect NAME RC PATTERN CMD...: exit status RC and output matching PATTERN.
expect() {
	local name=$1 want=$2 pat=$3; shift 3
	timeout 60 "$@" >"$tmp/out" 2>&1
	local rc=$?
	if [ "$rc" != "$want" ]; then
		nok "$name" "'$*' exited $rc, want $want: $(head -n 2 "$tmp/out" | tr '\n' ' ')"
	elif ! grep -qiE -- "$pat" "$tmp/out"; then
		nok "$name" "'$*' output lacks /$pat/: $(head -n 2 "$tmp/out" | tr '\n' ' ')"
	else
		ok "$name"
	fi
}

expect ublk_cli_add_help 0 "Usage: ublk-qcow2 add" "$UQ" add --help
expect ublk_cli_del_help 0 "Usage: ublk-qcow2 del" "$UQ" del --help
expect ublk_cli_del_help_force 0 "-f, --force  *stop it even if in use" "$UQ" del --help
expect ublk_cli_list_help 0 "Usage: ublk-qcow2 list" "$UQ" list --help
expect ublk_cli_recover_help 0 "Usage: ublk-qcow2 recover" "$UQ" recover --help
expect ublk_cli_recover_needs_id 2 "-n ID is required" "$UQ" recover
expect ublk_cli_main_help_lists_add 0 "add .*ublk" "$UQ" --help
expect ublk_cli_add_no_image 2 "no image given" "$UQ" add
expect ublk_cli_add_two_images 2 "more than one image" "$UQ" add a b
expect ublk_cli_add_bad_queues 2 "invalid queue count '0'" "$UQ" add -q 0 x
expect ublk_cli_add_bad_depth 2 "invalid depth '5000'" "$UQ" add -d 5000 x
expect ublk_cli_add_bad_id 2 "invalid device id 'x1'" "$UQ" add -n x1 img
expect ublk_cli_add_bad_format 2 "unknown format 'vmdk'" "$UQ" add -f vmdk x
expect ublk_cli_add_bad_cache 2 "invalid cache size" "$UQ" add --cache-size 12Q x
expect ublk_cli_add_bad_size 2 "invalid size '12Q'" "$UQ" add --size 12Q x
expect ublk_cli_add_help_size 0 "--size SIZE" "$UQ" add --help
expect ublk_cli_add_unknown_option 2 "usage" "$UQ" add --bogus x
expect ublk_cli_add_bad_discard 2 "unknown --discard mode 'sometimes'" "$UQ" add --discard sometimes x
expect ublk_cli_add_help_discard 0 "--discard ignore|unmap|--discard MODE" "$UQ" add --help
expect ublk_cli_del_needs_target 2 "exactly one of -n ID or --all" "$UQ" del
expect ublk_cli_del_both_targets 2 "exactly one of" "$UQ" del -n 1 --all
expect ublk_cli_del_bad_timeout 2 "invalid timeout" "$UQ" del -n 1 -t 0
expect ublk_cli_list_extra_arg 2 "unexpected argument" "$UQ" list foo
expect ublk_cli_add_missing_image 1 "missing.qcow2: No such file" "$UQ" add "$tmp/missing.qcow2"

# A corrupt image is refused by the engine, naming the file.
printf 'QFI\373garbage' > "$tmp/bad.qcow2"
truncate -s 1M "$tmp/bad.qcow2"
expect ublk_cli_add_bad_image 1 "bad.qcow2" "$UQ" add "$tmp/bad.qcow2"

# An image a qemu process is writing is refused ("in use"), before ublk.
if command -v qemu-io >/dev/null && command -v qemu-img >/dev/null; then
	qemu-img create -q -f qcow2 "$tmp/held.qcow2" 16M
	qemu-io -c 'sleep 60000' "$tmp/held.qcow2" >/dev/null 2>&1 &
	qio=$!
	ino=$(stat -c %i "$tmp/held.qcow2")
	for i in $(seq 100); do grep -q "OFDLCK.*:$ino " /proc/locks && break; sleep 0.1; done
	if grep -q "OFDLCK.*:$ino " /proc/locks; then
		expect ublk_cli_add_image_in_use 1 "is in use" "$UQ" add "$tmp/held.qcow2"
		expect ublk_cli_add_read_only_image_in_use 1 "is in use" "$UQ" add --read-only "$tmp/held.qcow2"
	else
		nok ublk_cli_add_image_in_use "qemu-io never locked the image (no OFD locks on $tmp?)"
	fi
	kill $qio 2>/dev/null
	wait $qio 2>/dev/null
else
	echo "skip ublk_cli_add_image_in_use: qemu-io/qemu-img not installed"
fi

# Without ublk in this kernel: the message says how to get it.
if [ ! -e /dev/ublk-control ]; then
	qemu-img create -q -f raw "$tmp/plain.raw" 1M 2>/dev/null || truncate -s 1M "$tmp/plain.raw"
	expect ublk_cli_add_no_ublk 1 "modprobe ublk_drv" "$UQ" add "$tmp/plain.raw"
	expect ublk_cli_list_no_ublk 1 "modprobe ublk_drv" "$UQ" list
	expect ublk_cli_del_no_ublk 1 "modprobe ublk_drv" "$UQ" del --all
	expect ublk_cli_recover_no_ublk 1 "modprobe ublk_drv" "$UQ" recover -n 0
	# add --size makes the missing image first (with create's code); when the device then
	# cannot start, the image it made is removed again (an existing one is never touched).
	expect ublk_cli_add_size_no_ublk 1 "removed .*made.qcow2, which this add had created" \
		"$UQ" add --size 32M "$tmp/made.qcow2"
	[ ! -e "$tmp/made.qcow2" ] && ok ublk_cli_add_size_made_image_removed ||
		nok ublk_cli_add_size_made_image_removed "the image add made was left behind"
	expect ublk_cli_add_size_raw_no_ublk 1 "modprobe ublk_drv" "$UQ" add -f raw --size 16M "$tmp/made.raw"
	[ ! -e "$tmp/made.raw" ] && ok ublk_cli_add_size_made_raw_removed ||
		nok ublk_cli_add_size_made_raw_removed "the raw file add made was left behind"
	"$UQ" create -q "$tmp/made.qcow2" 32M
	sum=$(md5sum < "$tmp/made.qcow2")
	expect ublk_cli_add_size_existing_kept 1 "modprobe ublk_drv" "$UQ" add --size 64M "$tmp/made.qcow2"
	[ "$(md5sum < "$tmp/made.qcow2")" = "$sum" ] && ok ublk_cli_add_size_existing_unchanged ||
		nok ublk_cli_add_size_existing_unchanged "an existing image was changed"
else
	echo "skip ublk_cli_no_ublk: this kernel has ublk"
fi
exit $failed
