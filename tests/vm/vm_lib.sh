# Helpers for tests that need the test VM (source it; bash).
#   vm_require NAME [KERNEL...]  prepares each KERNEL (vm.sh --kernel: 6.12, newest or a
#                     version; 6.12 if none is given) and prints `skip NAME: ...` and exits 0
#                     if no VM can run here.  UQ_VM_KERNEL=K boots every test on K instead.
#   vm_kver KERNEL    the version KERNEL was resolved to by vm_require (7.2.13+deb14-amd64).
#   vm_run ARGS...    tests/vm/vm.sh --kernel (the first kernel given) ARGS...
#   vm_build_ctrl_test OUT  copies the probe the Makefile built next to $UQ
#                     ($(dirname $UQ)/tests/ublk_ctrl_test) to OUT; on failure OUT.log says why.
#   vm_ublk_test NAME [KERNEL...]  the start of a ublk VM test: $root, a scratch $tmp (removed
#                     at exit unless UQ_TMP names one), $UQ exported (the sanitized build unless
#                     given; `not ok NAME` without it), $UQ_CTRL_TEST exported (ublk_ctrl_test,
#                     which ublk_guest_lib.sh asks for the kernel's ublk features), then
#                     vm_require NAME KERNEL...
#   vm_test_on KERNEL NAME ARGS...  one boot of KERNEL running vm.sh ARGS...: prints
#                     `# NAME: Linux VERSION (KERNEL)` before and the seconds it took after;
#                     returns the guest's status, or prints `not ok NAME` and returns 1 if
#                     the VM failed to boot or timed out.  In a test that boots more than one
#                     kernel every result line names its kernel: `ok ublk_ctrl_open@7.2`.
#   vm_test_run NAME ARGS...  the test's last step: vm_test_on (the first kernel) NAME ARGS...,
#                     then exit with its status.
VM_SH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/vm.sh
declare -A VM_KVER=()
VM_KERNELS=()

vm_require() {
	local name=$1 k kver log
	shift
	[ $# -gt 0 ] || set -- 6.12
	VM_KERNELS=("$@")
	if ! command -v qemu-system-x86_64 >/dev/null; then
		echo "skip $name: qemu-system-x86_64 is not installed (VM tests)"; exit 0
	fi
	log=$(mktemp) || exit 1
	for k in "$@"; do
		[ -z "${VM_KVER[$k]:-}" ] || continue
		if ! kver=$("$VM_SH" --kernel "${UQ_VM_KERNEL:-$k}" --prepare 2>"$log"); then
			cat "$log" >&2
			echo "skip $name: cannot prepare the VM kernel/initramfs (--kernel ${UQ_VM_KERNEL:-$k}): $(tail -n1 "$log")"
			rm -f "$log"; exit 0
		fi
		VM_KVER[$k]=$kver
	done
	rm -f "$log"
}

vm_kver() { printf '%s\n' "${VM_KVER[$1]:-$1}"; }

vm_run() { "$VM_SH" --kernel "$(vm_kver "${VM_KERNELS[0]:-6.12}")" "$@"; }

vm_build_ctrl_test() {
	local out=$1 built
	built=$(dirname "$UQ")/tests/ublk_ctrl_test
	[ -x "$built" ] || { echo "no $built (build it first: make MODE=debug unit)" >"$out.log"; return 1; }
	cp "$built" "$out"
}

vm_ublk_test() {
	local name=$1
	root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
	tmp=${UQ_TMP:-}
	[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
	UQ=${UQ:-$root/build/debug/ublk-qcow2}
	[ -x "$UQ" ] || { echo "not ok $name: no binary $UQ (build first)"; exit 1; }
	export UQ
	UQ_CTRL_TEST=$tmp/ublk_ctrl_test
	vm_build_ctrl_test "$UQ_CTRL_TEST" ||
		{ echo "not ok ${name}_ctrl_test_build: $(head -n3 "$UQ_CTRL_TEST.log" | tr '\n' ' ')"; exit 1; }
	export UQ_CTRL_TEST
	shift
	vm_require "$name" "$@"
}

vm_test_on() {
	local k=$1 name=$2 kver tag rc t0
	shift 2
	kver=$(vm_kver "$k")
	t0=$SECONDS
	echo "# $name: Linux $kver (--kernel ${UQ_VM_KERNEL:-$k})"
	if [ ${#VM_KERNELS[@]} -gt 1 ]; then
		tag=$(printf '%s' "$kver" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
		"$VM_SH" --kernel "$kver" "$@" | sed -u -E "s/^(ok|not ok|skip) ([^ :]+)/\1 \2@$tag/"
		rc=${PIPESTATUS[0]}
		name=$name@$tag
	else
		"$VM_SH" --kernel "$kver" "$@"
		rc=$?
	fi
	echo "# $name: $((SECONDS - t0)) s on Linux $kver"
	if [ $rc -eq 125 ]; then
		echo "not ok $name: the VM failed to boot or timed out"; return 1
	fi
	return $rc
}

vm_test_run() {
	vm_test_on "${VM_KERNELS[0]:-6.12}" "$@"
	exit
}
