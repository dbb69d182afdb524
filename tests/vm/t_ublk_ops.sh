#!/usr/bin/env bash
# Operator features of a live ublk device, in the test VM (one boot):
# `stats` (text, JSON, --watch) from the daemon's control socket, counters
# that match the I/O done; logging (-v, the device and image named on every
# line, syslog once daemonised); readiness for systemd (sd_notify) and stop
# by SIGTERM as systemd does it; the udev rule's stable name.
# timeout: 300
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=${UQ_TMP:-}
[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
UQ=${UQ:-$root/build/debug/ublk-qcow2}
[ -x "$UQ" ] || { echo "not ok ublk_ops: no binary $UQ (build first)"; exit 1; }
export UQ

. "$here/vm_lib.sh"
vm_require ublk_ops

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

# --- udev: the rule names the device after its image -----------------------------------
if command -v udevadm >/dev/null; then
	# The guest's /run is its own, so the rule goes there, not into the host's /etc.
	mkdir -p /run/udev/rules.d
	sed "s|@BINDIR@/ublk-qcow2|$UQ|" "$ROOT/dist/99-ublk-qcow2.rules.in" >/run/udev/rules.d/99-ublk-qcow2.rules
	mkdir -p "$W/my images"
	qemu-img create -q -f qcow2 "$W/my images/u-1.qcow2" 16M
	if uq_add "$W/my images/u-1.qcow2"; then
		name=$(systemd-escape --path "$W/my images/u-1.qcow2")
		udevadm test --action=add "/sys/block/ublkb$ID" >"$W/udev.out" 2>&1
		check ublk_udev_symlink grep -qF "disk/by-ublk-qcow2/$name" "$W/udev.out"
		check ublk_udev_del uq_del "$ID"
	else
		nok ublk_udev "add failed: $(tr '\n' ' ' < "$W/add.err")"
	fi
	rm -f /run/udev/rules.d/99-ublk-qcow2.rules
else
	nok ublk_udev "udevadm is not installed (make deps installs udev)"
fi

check_fails ublk_stats_no_id "which device" "$UQ" stats
check_fails ublk_stats_bad_watch "invalid --watch" "$UQ" stats -n 0 --watch=0

check ublk_ops_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_run --timeout 240 -- env LIB="$here/ublk_guest_lib.sh" ROOT="$root" bash "$tmp/guest.sh"
rc=$?
if [ $rc -eq 125 ]; then
	echo "not ok ublk_ops_vm: the VM failed to boot or timed out"; exit 1
fi
exit $rc
