#!/usr/bin/env bash
# The ublk control path (src/ublk/kernel_ctrl.c) against the real driver in the test
# VM, on both kernels (6.12 and the newest): ADD_DEV / GET_DEV_INFO / SET+GET_PARAMS /
# DEL_DEV with ioctl-encoded and legacy opcodes.  On a host without ublk: the
# "no ublk" error.
# timeout: 700
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=${UQ_TMP:-}
[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
UQ=${UQ:-$root/build/ublk-qcow2}
. "$here/vm_lib.sh"
# The probe is built by the Makefile (make MODE=debug unit) next to $UQ.
probe=$(dirname "$UQ")/tests/ublk_ctrl_test
if [ ! -x "$probe" ]; then
	echo "not ok ublk_ctrl_build: no $probe (build it first: make MODE=debug unit)"; exit 1
fi

if [ ! -e /dev/ublk-control ]; then
	"$probe" absent 2>"$tmp/absent.err"
	if grep -q "modprobe ublk_drv" "$tmp/absent.err"; then
		echo "ok ublk_ctrl_absent_message"
	else
		echo "not ok ublk_ctrl_absent_message: stderr was '$(cat "$tmp/absent.err")'"
	fi
fi

# The control path on both kernels: 6.12 (GET_FEATURES 0x1fe) and the newest (7.x).
vm_require ublk_ctrl_vm 6.12 newest
vm_test_on 6.12 ublk_ctrl_vm --timeout 300 -- "$probe"; rc1=$?
vm_test_on newest ublk_ctrl_vm --timeout 300 -- "$probe"; rc2=$?
[ $rc1 -eq 0 ] && [ $rc2 -eq 0 ]
