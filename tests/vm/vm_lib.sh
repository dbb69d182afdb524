# Helpers for tests that need the test VM (source it; bash).
#   vm_require NAME   prints `skip NAME: ...` and exits 0 if no VM can run here.
#   vm_run ARGS...    tests/vm/vm.sh ARGS...
#   vm_ublk_test NAME the start of a ublk VM test: $root, a scratch $tmp (removed at exit
#                     unless UQ_TMP names one), $UQ exported (the sanitized build unless
#                     given; `not ok NAME` without it), then vm_require NAME.
#   vm_test_run NAME ARGS...  the test's last step: vm_run ARGS..., then exit with the
#                     guest's status, or `not ok NAME` and 1 if the VM failed to boot or
#                     timed out.
VM_SH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/vm.sh

vm_require() {
	local name=$1 log
	if ! command -v qemu-system-x86_64 >/dev/null; then
		echo "skip $name: qemu-system-x86_64 is not installed (VM tests)"; exit 0
	fi
	log=$("$VM_SH" --prepare 2>&1) || {
		printf '%s\n' "$log" >&2
		echo "skip $name: cannot prepare the VM kernel/initramfs: $(printf '%s\n' "$log" | tail -n1)"; exit 0
	}
}

vm_run() { "$VM_SH" "$@"; }

vm_ublk_test() {
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
	tmp=${UQ_TMP:-}
	[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
	UQ=${UQ:-$root/build/debug/ublk-qcow2}
	[ -x "$UQ" ] || { echo "not ok $1: no binary $UQ (build first)"; exit 1; }
	export UQ
	vm_require "$1"
}

vm_test_run() {
	local name=$1 rc
	shift
	vm_run "$@"
	rc=$?
	if [ $rc -eq 125 ]; then
		echo "not ok $name: the VM failed to boot or timed out"; exit 1
	fi
	exit $rc
}
