# Helpers for tests that need the test VM (source it; bash).
#   vm_require NAME   prints `skip NAME: ...` and exits 0 if no VM can run here.
#   vm_run ARGS...    tests/vm/vm.sh ARGS...
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
