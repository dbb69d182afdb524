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
lib=$(dirname "$UQ")/libublkqcow2.a
if [ ! -f "$lib" ]; then
	echo "not ok ublk_ctrl_build: no $lib (build the project first)"; exit 1
fi

# Build the probe against the project's library, sanitized if the library is.
san=
grep -qa __asan_init "$lib" && san="-fsanitize=address,undefined -fno-sanitize-recover=undefined"
libs=$(pkg-config --libs liburing zlib libzstd libcrypto 2>/dev/null || echo -luring -lz -lzstd -lcrypto)
if ! cc -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter -D_GNU_SOURCE -g $san \
	-I"$root/src" -o "$tmp/ublk_ctrl_test" "$here/ublk_ctrl_test.c" "$lib" $libs -lpthread \
	2>"$tmp/cc.log"; then
	echo "not ok ublk_ctrl_build: $(head -n3 "$tmp/cc.log" | tr '\n' ' ')"; exit 1
fi

if [ ! -e /dev/ublk-control ]; then
	"$tmp/ublk_ctrl_test" absent 2>"$tmp/absent.err"
	if grep -q "modprobe ublk_drv" "$tmp/absent.err"; then
		echo "ok ublk_ctrl_absent_message"
	else
		echo "not ok ublk_ctrl_absent_message: stderr was '$(cat "$tmp/absent.err")'"
	fi
fi

. "$here/vm_lib.sh"
vm_require ublk_ctrl_vm
vm_test_run ublk_ctrl_vm --timeout 300 -- "$tmp/ublk_ctrl_test"
