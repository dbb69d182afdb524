# Helpers for guest-side ublk test scripts (bash, run as root inside the VM;
# sourced).  Needs UQ (the binary), UQ_CTRL_TEST (tests/vm/ublk_ctrl_test, built by
# vm_ublk_test) and VM_TMP (guest tmpfs).
W=$VM_TMP/uq
mkdir -p "$W"
FAILED=0

# The kernel's ublk features, as GET_FEATURES reports them to the daemon's control
# path: the bits in hex, then the UBLK_F_* names in lower case (update_size, ...).
# Tests branch on these, never on the kernel's version.
if ! UBLK_FEATURES=$("${UQ_CTRL_TEST:-/nonexistent}" features 2>&1); then
	echo "not ok ublk_guest_features: cannot read the kernel's ublk features: $UBLK_FEATURES"
	exit 1
fi
echo "# guest: Linux $(uname -r), ublk features $UBLK_FEATURES"
# has_feature NAME: the kernel has UBLK_F_NAME (lower case, e.g. update_size).
has_feature() { case " $UBLK_FEATURES " in *" $1 "*) return 0 ;; esac; return 1; }

ok() { echo "ok $1"; }
nok() { echo "not ok $1: $2"; FAILED=1; }
skip() { echo "skip $1: $2"; }
# check NAME CMD...: one result line; the last output lines as the reason.
check() {
	local name=$1; shift
	if "$@" >"$W/check.out" 2>&1; then ok "$name"
	else nok "$name" "'$*' failed: $(tail -n 3 "$W/check.out" | tr '\n' ' ')"; fi
}
# check_fails NAME PATTERN CMD...: CMD must fail and print PATTERN (grep -E).
check_fails() {
	local name=$1 pat=$2; shift 2
	if "$@" >"$W/check.out" 2>&1; then
		nok "$name" "'$*' succeeded, should have failed"
	elif ! grep -qiE -- "$pat" "$W/check.out"; then
		nok "$name" "'$*' failed without /$pat/: $(head -n 3 "$W/check.out" | tr '\n' ' ')"
	else ok "$name"; fi
}

# uq_add ARGS...: sets DEV and ID; returns add's exit status.
uq_add() {
	DEV=$(timeout 150 "$UQ" add "$@" 2>"$W/add.err")
	local rc=$?
	ID=${DEV#/dev/ublkb}
	[ $rc -eq 0 ] && [ -b "$DEV" ] || { cat "$W/add.err" >&2; return 1; }
}
uq_del() { timeout 120 "$UQ" del -n "$1"; }

# Bounded wait for a condition (a command); 0.1 s steps, $1 seconds at most.
wait_for() {
	local secs=$1 i; shift
	for i in $(seq $((secs * 10))); do
		"$@" && return 0
		sleep 0.1
	done
	"$@"
}

# fio verify: random 4k writes with crc32c, then read back and verified.
fio_verify() {
	local dev=$1; shift
	timeout 300 fio --name=verify --filename="$dev" --ioengine=io_uring --direct=1 \
		--rw=randwrite --bs=4k --iodepth=32 --verify=crc32c --verify_fatal=1 \
		--size=64M "$@" >"$W/fio.out" 2>&1 || { tail -n 5 "$W/fio.out" >&2; return 1; }
}

# reads_as DEV MiB OCTAL: the first MiB MiB of DEV all hold byte \OCTAL.
reads_as() {
	head -c "$2M" /dev/zero | tr '\0' "\\$3" > "$W/pattern"
	dd if="$1" bs=1M count="$2" iflag=direct status=none | cmp -s - "$W/pattern"
}

# Requests completed by a block device so far (reads + writes).
dev_ios() { awk '{ print $1 + $5 }' "/sys/block/${1#/dev/}/stat" 2>/dev/null || echo 0; }

# Every daemon log is free of sanitizer reports.
logs_clean() {
	! grep -lE 'AddressSanitizer|LeakSanitizer|runtime error:' /run/ublk-qcow2/*.log 2>/dev/null
}
