# Shared by the tools suites (sourced after lib.sh).

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CMP="$PYTHON $HERE/cmp.py"
DAMAGE="$PYTHON $HERE/damage.py"

# One result line per case: the first failure's reason, if any.
FAIL=
fail() { [[ -n $FAIL ]] || FAIL=$*; }
result() { if [[ -z $FAIL ]]; then ok "$1"; else notok "$1" "$FAIL"; fi; FAIL=; }

# hold_image IMAGE: a qemu-io process keeps IMAGE open for writing (with QEMU's locks) until
# release_image; returns once the locks are taken (bounded), 1 if they never were.
HOLD_PID=
hold_image() {
    local ino i
    ino=$(stat -c %i "$1")
    qemu-io -c 'sleep 60000' "$1" >/dev/null 2>&1 &
    HOLD_PID=$!
    at_exit "kill $HOLD_PID 2>/dev/null"
    for i in $(seq 200); do
        grep -q "OFDLCK.*:$ino " /proc/locks && return 0
        sleep 0.1
    done
    note "qemu-io never locked $1"
    return 1
}
release_image() {
    kill "$HOLD_PID" 2>/dev/null
    wait "$HOLD_PID" 2>/dev/null
    HOLD_PID=
}
