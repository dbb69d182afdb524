#!/usr/bin/env bash
# Operator features of a live ublk device, in the test VM (one boot, Debian 12's 6.12):
# `stats` (text, JSON, --watch) from the daemon's control socket, counters
# that match the I/O done; logging (-v, the device and image named on every
# line, syslog once daemonised); readiness for systemd (sd_notify) and stop
# by SIGTERM as systemd does it; the udev rule (stable names, and the nodes
# of unprivileged devices given to their owner) under a real udevd; a user
# adding, using and removing an unprivileged device.
# timeout: 600
set -u
here=$(cd "$(dirname "$0")" && pwd)
. "$here/vm_lib.sh"
vm_ublk_test ublk_ops 6.12

cat >"$tmp/guest.sh" <<'EOF'
. "$LIB"
cd "$W" || exit 1

# --- stats --------------------------------------------------------------------
qemu-img create -q -f qcow2 "$W/st.qcow2" 64M
if uq_add "$W/st.qcow2"; then
	# 4 MiB written (direct, 1 MiB requests or smaller), synced, 2 MiB read back.
	dd if=/dev/urandom of="$DEV" bs=1M count=4 oflag=direct status=none
	sync "$DEV" 2>/dev/null || blockdev --flushbufs "$DEV"
	dd if="$DEV" of=/dev/null bs=1M count=2 iflag=direct status=none
	"$UQ" stats -n "$ID" --json >"$W/st.json" 2>"$W/st.err"
	check ublk_stats_json_parses jq -e . "$W/st.json"
	check ublk_stats_json_counts jq -e '.write_bytes >= 4194304 and .read_bytes >= 2097152 and
		.writes >= 4 and .reads >= 2 and .flushes >= 1 and .errors == 0 and .in_flight == 0 and
		.clusters_allocated >= 64 and .cache_hits + .cache_misses > 0' "$W/st.json"
	check ublk_stats_json_names_image jq -e --arg img "$W/st.qcow2" \
		'.image == $img and .format == "qcow2" and .id == '"$ID" "$W/st.json"
	# The ublk features the device uses (the kernel grants every device some, e.g.
	# uring_cmd_comp_in_task), as names.
	check ublk_stats_json_features jq -e '(.features | type) == "array" and (.features | length) > 0 and
		all(.features[]; test("^[a-z_0-9]+$"))' "$W/st.json"
	"$UQ" stats -n "$ID" >"$W/st.txt" 2>&1
	check ublk_stats_text eval 'grep -q "^writes  *[0-9][0-9]* (4.0 MiB)" "$W/st.txt" &&
		grep -q "^image  *$W/st.qcow2 (qcow2)" "$W/st.txt" && grep -q "^errors  *0$" "$W/st.txt"'
	"$UQ" stats -n "$ID" --watch 1 --count 2 >"$W/watch.txt" 2>&1
	check ublk_stats_watch eval '[ "$(wc -l < "$W/watch.txt")" = 3 ] && head -n1 "$W/watch.txt" | grep -q "reads/s"'
	"$UQ" stats -n "$ID" --watch --json --count 2 >"$W/watch.json" 2>&1
	check ublk_stats_watch_json eval '[ "$(jq -s length "$W/watch.json")" = 2 ]'
	check ublk_stats_del uq_del "$ID"
	check ublk_stats_socket_gone test ! -e "/run/ublk-qcow2/ublk$ID.sock"
	check_fails ublk_stats_after_del "no running daemon" "$UQ" stats -n "$ID"
else
	nok ublk_stats "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi
# --- the control socket: idle clients delay nobody; another user hears "permission" ---
# 20 clients that connect and send nothing: a server taking one client at a
# time would keep stats and del waiting for each of them in turn.
qemu-img create -q -f qcow2 "$W/cs.qcow2" 16M
if uq_add "$W/cs.qcow2"; then
	python3 -c '
import socket, sys, time
socks = []
for i in range(20):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    socks.append(s)
open(sys.argv[2], "w").write("connected\n")
time.sleep(600)
' "/run/ublk-qcow2/ublk$ID.sock" "$W/idle.ready" 2>"$W/idle.err" &
	idle_pid=$!
	if wait_for 20 test -s "$W/idle.ready"; then
		check ublk_stats_with_20_idle_clients eval 'timeout 60 "$UQ" stats -n $ID --json | jq -e ".id == $ID"'
		install -D -m 0755 "$UQ" "$W/nobody-bin/ublk-qcow2"
		check_fails ublk_other_user_told_permission "permission denied on the control socket of ublk device $ID: it belongs to another user" \
			setpriv --reuid=65534 --regid=65534 --clear-groups env XDG_RUNTIME_DIR=/nonexistent "$W/nobody-bin/ublk-qcow2" stats -n "$ID"
		check ublk_del_with_20_idle_clients timeout 60 "$UQ" del -n "$ID"
	else
		nok ublk_idle_clients "the idle clients could not connect: $(tr '\n' ' ' <"$W/idle.err")"
		uq_del "$ID"
	fi
	kill "$idle_pid" 2>/dev/null; wait "$idle_pid" 2>/dev/null
else
	nok ublk_idle_clients "add failed: $(tr '\n' ' ' < "$W/add.err")"
fi
# --- logging --------------------------------------------------------------------
# A stand-in syslog daemon on the guest's /dev/log (the guest's /dev is its own).
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind("/dev/log")
with open(sys.argv[1], "ab", buffering=0) as f:
    while True:
        f.write(s.recv(65536) + b"\n")
' "$W/syslog.txt" &
syslog_pid=$!
wait_for 10 test -S /dev/log
qemu-img create -q -f qcow2 "$W/log.qcow2" 16M
if uq_add -v "$W/log.qcow2"; then
	pid=$("$UQ" list --json | jq ".[] | select(.id == $ID) | .pid")
	check ublk_log_file_names_device_and_image grep -q "^ublk-qcow2: ublkb$ID \[$W/log.qcow2\]: serving $W/log.qcow2 (qcow2" "/run/ublk-qcow2/ublk$ID.log"
	check ublk_log_del uq_del "$ID"
	check ublk_log_stop_logged grep -q "ublkb$ID \[$W/log.qcow2\]: stopped after [0-9]* requests; image flushed and closed" "/run/ublk-qcow2/ublk$ID.log"
	# <30>: facility daemon, severity info.
	check ublk_syslog_lines wait_for 10 grep -q "^<30>.* ublk-qcow2\[$pid\]: ublkb$ID \[$W/log.qcow2\]: stopped after" "$W/syslog.txt"
else
	nok ublk_log "add -v failed: $(tr '\n' ' ' < "$W/add.err")"
fi
kill $syslog_pid 2>/dev/null; wait $syslog_pid 2>/dev/null; rm -f /dev/log

# --- systemd: Type=notify readiness, SIGTERM stop ------------------------------------
python3 -c '
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
with open(sys.argv[2], "ab", buffering=0) as f:
    while True:
        f.write(s.recv(4096).replace(b"\n", b" ") + b"\n")
' "$W/notify.sock" "$W/notify.txt" &
notify_pid=$!
wait_for 10 test -S "$W/notify.sock"
qemu-img create -q -f qcow2 "$W/sd.qcow2" 16M
NOTIFY_SOCKET=$W/notify.sock "$UQ" add --foreground "$W/sd.qcow2" >"$W/sd.out" 2>"$W/sd.err" &
fg_pid=$!
if wait_for 60 grep -q READY=1 "$W/notify.txt"; then
	dev=$(head -n1 "$W/sd.out")
	# Ready means the device is there and serving.
	check ublk_notify_ready_when_live eval 'test -b "$dev" && dd if=/dev/zero of="$dev" bs=64k count=16 oflag=direct status=none'
	check ublk_notify_status grep -q "STATUS=Serving $W/sd.qcow2 as $dev" "$W/notify.txt"
	kill -TERM $fg_pid
	wait $fg_pid; rc=$?
	check ublk_sigterm_foreground_exits_0 test "$rc" = 0
	check ublk_sigterm_foreground_device_gone test ! -e "$dev"
	check ublk_sigterm_foreground_image_clean qemu-img check -q "$W/sd.qcow2"
else
	nok ublk_notify_ready "no READY=1: $(cat "$W/notify.txt" "$W/sd.err" | tr '\n' ' ')"
	kill -TERM $fg_pid; wait $fg_pid
fi
kill $notify_pid 2>/dev/null; wait $notify_pid 2>/dev/null

# --- udev: a real udevd with our rule (the guest's /run is its own) ------------------
mkdir -p /run/udev/rules.d
sed "s|@BINDIR@/ublk-qcow2|$UQ|" "$ROOT/dist/99-ublk-qcow2.rules.in" >/run/udev/rules.d/99-ublk-qcow2.rules
if SYSTEMD_IGNORE_CHROOT=1 /lib/systemd/systemd-udevd --daemon >"$W/udevd.log" 2>&1; then
	export SYSTEMD_IGNORE_CHROOT=1   # udevadm refuses to work "in a chroot" otherwise
	mkdir -p "$W/my images"
	qemu-img create -q -f qcow2 "$W/my images/u-1.qcow2" 16M
	if uq_add "$W/my images/u-1.qcow2"; then
		name=$(systemd-escape --path "$W/my images/u-1.qcow2")
		udevadm settle -t 30
		check ublk_udev_symlink test "$(readlink -f "/dev/disk/by-ublk-qcow2/$name")" = "$DEV"
		check ublk_udev_del uq_del "$ID"
		udevadm settle -t 30
		check ublk_udev_symlink_gone test ! -e "/dev/disk/by-ublk-qcow2/$name"
	else
		nok ublk_udev "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi

	# --- unprivileged devices: a user (nobody) adds, uses and removes its own ---------
	# What the opt-in line of the rule does: anyone may ask for devices.
	chmod 0666 /dev/ublk-control
	U="setpriv --reuid=65534 --regid=65534 --clear-groups env XDG_RUNTIME_DIR=/run/user/65534 HOME=/"
	mkdir -p /run/user/65534 "$W/nobody" && chown 65534:65534 /run/user/65534 "$W/nobody"
	# The build may lie under a directory only root may enter (a CI clone in
	# a mktemp -d): the user runs a copy of the binary.
	UQN=$W/nobody-bin/ublk-qcow2
	install -D -m 0755 "$UQ" "$UQN"
	$U qemu-img create -q -f qcow2 "$W/nobody/u.qcow2" 32M
	udev=$(timeout 150 $U "$UQN" add "$W/nobody/u.qcow2" 2>"$W/uadd.err")
	if [ -b "$udev" ]; then
		uid=${udev#/dev/ublkb}
		# After every event udev had for the nodes (a change event must not
		# give them back to root).
		udevadm settle -t 30
		check ublk_unpriv_nodes_owned test "$(stat -c %u "$udev")" = 65534 -a "$(stat -c %u /dev/ublkc$uid)" = 65534
		head -c 4M /dev/urandom > "$W/nobody/data" && chown 65534 "$W/nobody/data"
		check ublk_unpriv_write $U dd if="$W/nobody/data" of="$udev" bs=1M oflag=direct conv=fsync status=none
		check ublk_unpriv_read_back eval "$U dd if=$udev bs=1M count=4 iflag=direct status=none | cmp -s - $W/nobody/data"
		check ublk_unpriv_list_json eval "$U $UQN list -n $uid --json | jq -e '.[0].unprivileged and .[0].owner_uid == 65534 and .[0].image == \"$W/nobody/u.qcow2\"'"
		check ublk_unpriv_list_by_root eval '"$UQ" list -n $uid --json | jq -e ".[0].image == \"$W/nobody/u.qcow2\""'
		check ublk_unpriv_stats eval "$U $UQN stats -n $uid --json | jq -e '.writes >= 4'"
		check ublk_unpriv_state_in_user_dir test -f /run/user/65534/ublk-qcow2/ublk$uid.json
		check_fails ublk_unpriv_other_user_refused "not permitted|permission|denied" \
			setpriv --reuid=65533 --regid=65533 --clear-groups env XDG_RUNTIME_DIR=/nonexistent "$UQ" del -n "$uid"
		check ublk_unpriv_del $U "$UQN" del -n "$uid"
		check ublk_unpriv_gone test ! -e "$udev"
		check ublk_unpriv_image_clean qemu-img check -q "$W/nobody/u.qcow2"
	else
		nok ublk_unpriv_add "add as nobody failed: $(tr '\n' ' ' < "$W/uadd.err")"
	fi
	check_fails ublk_unpriv_image_not_readable "permission denied|cannot open" \
		$U "$UQN" add "$W/st.qcow2"
	chmod 0600 /dev/ublk-control
	udevadm control --exit
else
	nok ublk_udev "systemd-udevd did not start: $(tr '\n' ' ' <"$W/udevd.log")"
fi
rm -f /run/udev/rules.d/99-ublk-qcow2.rules

check_fails ublk_stats_no_id "which device" "$UQ" stats
check_fails ublk_stats_bad_watch "invalid --watch" "$UQ" stats -n 0 --watch=0

check ublk_ops_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_test_run ublk_ops_vm --timeout 540 -- env LIB="$here/ublk_guest_lib.sh" ROOT="$root" bash "$tmp/guest.sh"
