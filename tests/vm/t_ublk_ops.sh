#!/usr/bin/env bash
# Operator features of a live ublk device, in the test VM (one boot):
# `stats` (text, JSON, --watch) from the daemon's control socket, counters
# that match the I/O done.
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
check_fails ublk_stats_no_id "which device" "$UQ" stats
check_fails ublk_stats_bad_watch "invalid --watch" "$UQ" stats -n 0 --watch=0

check ublk_ops_daemon_logs_clean logs_clean
[ $FAILED -eq 0 ]
EOF

vm_run --timeout 240 -- env LIB="$here/ublk_guest_lib.sh" bash "$tmp/guest.sh"
rc=$?
if [ $rc -eq 125 ]; then
	echo "not ok ublk_ops_vm: the VM failed to boot or timed out"; exit 1
fi
exit $rc
