#!/usr/bin/env bash
# The test VM boots, has ublk/nbd/loop and a tmpfs with O_DIRECT, passes the
# environment and cwd, relays stdout/stderr, and propagates the exit status.
# One boot for the checks on each kernel (6.12 and the newest, 7.x: results end in
# @6.12 / @7.2); two more on 6.12 for the boot retry (a panic before the command
# starts boots again, a panic after it does not).
# timeout: 600
set -u
here=$(cd "$(dirname "$0")" && pwd)
tmp=${UQ_TMP:-}
[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }

. "$here/vm_lib.sh"
vm_require vm_boot 6.12 newest

cat >"$tmp/guest.sh" <<'EOF'
check() { name=$1; shift; if "$@"; then echo "ok $name"; else echo "not ok $name: '$*' failed in the guest"; fi; }
echo "uptime $(cut -d' ' -f1 /proc/uptime)" >"$PROBE_DIR/uptime"
check vm_ublk_control test -c /dev/ublk-control
check vm_nbd_device test -b /dev/nbd0
check vm_loop_control test -c /dev/loop-control
check vm_root test "$(id -u)" = 0
check vm_env test "$HOME|$VM_GUEST|$UQ_VM_PROBE|$(pwd)" = "/root|1|a b'c|$PROBE_DIR"
check vm_no_host_env test -z "${NOT_PASSED:-}"
check vm_tmpfs test "$(stat -f -c %T "$VM_TMP")" = tmpfs
check vm_tmpfs_odirect dd if=/dev/zero of="$VM_TMP/direct" bs=4096 count=16 oflag=direct status=none
check vm_run_lock test -d /run/lock
echo probe-stderr >&2
exit 3
EOF

mkdir -p "$tmp/cwd"
cd "$tmp/cwd" || exit 1
for k in 6.12 newest; do
	kver=$(vm_kver "$k")
	tag=$(printf '%s' "$kver" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
	echo "# vm_boot: Linux $kver (--kernel ${UQ_VM_KERNEL:-$k})"
	start=$(date +%s.%N)
	UQ_VM_PROBE="a b'c" NOT_PASSED=1 \
		"$here/vm.sh" --kernel "$kver" --timeout 300 -- "PROBE_DIR=$tmp/cwd sh $tmp/guest.sh" >"$tmp/out" 2>"$tmp/err"
	rc=$?
	end=$(date +%s.%N)
	sed -E "s/^(ok|not ok) ([^ :]+)/\1 \2@$tag/" "$tmp/out"

	if [ $rc -eq 125 ]; then
		echo "not ok vm_boot@$tag: the VM failed to boot or timed out"
		sed 's/^/# /' "$tmp/err"
		continue
	fi
	echo "ok vm_boot@$tag"
	wall=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
	echo "# VM boot + command + power-off: ${wall}s wall; guest $(cat uptime 2>/dev/null) s at command start"

	if [ $rc -eq 3 ]; then echo "ok vm_exit_status@$tag"; else echo "not ok vm_exit_status@$tag: got $rc, want 3"; fi
	if grep -qx probe-stderr "$tmp/err"; then echo "ok vm_stderr@$tag"; else echo "not ok vm_stderr@$tag: guest stderr not relayed"; fi
	n=$(grep -c -E '^ok vm_' "$tmp/out")
	if [ "$n" -eq 9 ]; then echo "ok vm_guest_checks@$tag"; else echo "not ok vm_guest_checks@$tag: $n of 9 guest checks passed"; fi
done

# --kernel newest is Linux 7 or later (Debian unstable); a bad --kernel is refused.
if [ -z "${UQ_VM_KERNEL:-}" ]; then
	major=$(vm_kver newest | cut -d. -f1)
	if [ "$major" -ge 7 ] 2>/dev/null; then echo "ok vm_newest_kernel_7x"; else
		echo "not ok vm_newest_kernel_7x: --kernel newest gave $(vm_kver newest)"; fi
fi
"$here/vm.sh" --kernel bogus -- true >"$tmp/out4" 2>"$tmp/err4"
rc=$?
if [ $rc -eq 125 ] && grep -q -- "--kernel must be 6.12, newest or a version" "$tmp/err4"; then
	echo "ok vm_kernel_option_checked"
else
	echo "not ok vm_kernel_option_checked: exit $rc, stderr '$(head -c 200 "$tmp/err4")'"
fi

# A guest that panics before the command starts is booted again and the command runs once.
VM_TEST_BOOT_PANIC=1 "$here/vm.sh" --kernel "$(vm_kver 6.12)" --timeout 300 -- "echo second-boot" >"$tmp/out2" 2>"$tmp/err2"
rc=$?
if [ $rc -eq 0 ] && grep -qx second-boot "$tmp/out2" && grep -q 'booting again' "$tmp/err2"; then
	echo "ok vm_boot_retry"
else
	echo "not ok vm_boot_retry: exit $rc, stdout '$(head -c 200 "$tmp/out2")'"
	sed 's/^/# /' "$tmp/err2" | tail -n 20
fi

# A guest that panics once the command has started is not booted again: exit 125.
"$here/vm.sh" --kernel "$(vm_kver 6.12)" --timeout 300 -- "echo started; echo c > /proc/sysrq-trigger; sleep 30" >"$tmp/out3" 2>"$tmp/err3"
rc=$?
if [ $rc -eq 125 ] && [ "$(grep -c started "$tmp/out3")" = 1 ] && ! grep -q 'booting again' "$tmp/err3"; then
	echo "ok vm_no_retry_after_start"
else
	echo "not ok vm_no_retry_after_start: exit $rc (want 125), stdout '$(head -c 200 "$tmp/out3")'"
	sed 's/^/# /' "$tmp/err3" | tail -n 20
fi
