#!/usr/bin/env bash
# The ublk control path (src/ublk/kernel_ctrl.c) against the real driver in the test
# VM: ADD_DEV / GET_DEV_INFO / SET+GET_PARAMS / DEL_DEV with ioctl-encoded and
# legacy opcodes.  On a host without ublk: the "no ublk" error.
# timeout: 400
set -u
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
tmp=${UQ_TMP:-}
[ -n "$tmp" ] || { tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT; }
UQ=${UQ:-$root/build/ublk-qcow2}
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

. "$here/vm_lib.sh"
vm_require ublk_ctrl_vm
vm_test_run ublk_ctrl_vm --timeout 300 -- "$probe"
