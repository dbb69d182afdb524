# Shared helpers for the NBD shell tests (sourced, not run).
# Needs: UQ (ublk-qcow2 binary), UQ_TMP (scratch directory).

: "${UQ:?UQ must name the ublk-qcow2 binary}"
: "${UQ_TMP:?UQ_TMP must name a scratch directory}"
mkdir -p "$UQ_TMP"
NBD_DIR=$(mktemp -d "$UQ_TMP/nbd.XXXXXX")
NBD_TESTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NBD_PIDS=""

ok()   { echo "ok $1"; }
fail() { echo "not ok $1: $2"; }
skip() { echo "skip $1: $2"; }

# start_server NAME [OPTIONS...] IMAGE: serve with --fork on $NBD_DIR/NAME.sock.
# Sets URI_<NAME>; returns the command's exit code.
start_server() {
    local name=$1; shift
    local sock="$NBD_DIR/$name.sock" pidf="$NBD_DIR/$name.pid"
    timeout 30 "$UQ" nbd --fork --pid-file "$pidf" --socket "$sock" "$@" \
        >>"$NBD_DIR/$name.log" 2>&1 || return $?
    NBD_PIDS="$NBD_PIDS $(cat "$pidf")"
    eval "URI_$name='nbd+unix:///?socket=$sock'"
}

server_pid() { cat "$NBD_DIR/$1.pid" 2>/dev/null; }

# wait_gone PID: bounded wait until PID has exited.  A detached server is
# reaped by init, possibly late, so a zombie counts as gone.
wait_gone() {
    timeout 30 bash -c 'while [ -e /proc/$1 ] && [ "$(cut -d" " -f3 /proc/$1/stat 2>/dev/null)" != Z ]; do
        sleep 0.02; done' _ "$1"
}

# stop_server NAME: SIGTERM and wait (bounded) until the process is gone.
# Returns 0 when it exited, removed its socket and pid file, and its log
# holds no sanitizer report (the exit code of a detached server is not
# observable, so the report is the evidence).
stop_server() {
    local name=$1 pid
    pid=$(server_pid "$name") || return 1
    kill -TERM "$pid" 2>/dev/null || return 1
    wait_gone "$pid" || return 1
    [ ! -e "$NBD_DIR/$name.sock" ] && [ ! -e "$NBD_DIR/$name.pid" ] &&
        ! grep -q -e "Sanitizer" -e "runtime error" "$NBD_DIR/$name.log"
}

alive() { kill -0 "$(server_pid "$1")" 2>/dev/null; }

# Kill whatever is still running (used by the EXIT trap).
nbd_cleanup() {
    local p
    for p in $NBD_PIDS; do
        kill -TERM "$p" 2>/dev/null && wait_gone "$p"
        kill -KILL "$p" 2>/dev/null
    done
    [ -n "$NBD_KEEP" ] || rm -rf "$NBD_DIR"
}
trap nbd_cleanup EXIT

# The qcow2 engine may not have landed yet: probe once by serving a qcow2
# image.  Prints nothing; returns 0 when qcow2 images can be served.
qcow2_available() {
    local img="$NBD_DIR/probe.qcow2" sock="$NBD_DIR/probe.sock"
    qemu-img create -q -f qcow2 "$img" 1M || return 1
    if timeout 30 "$UQ" nbd --fork --pid-file "$NBD_DIR/probe.pid" --socket "$sock" "$img" \
        >"$NBD_DIR/probe.log" 2>&1; then
        local pid size
        pid=$(cat "$NBD_DIR/probe.pid")
        size=$(timeout 30 nbdinfo --size "nbd+unix:///?socket=$sock" 2>>"$NBD_DIR/probe.log")
        kill -TERM "$pid"; wait_gone "$pid"
        # Served as qcow2 (virtual size), not as the raw file.
        [ "$size" = 1048576 ] && return 0
        echo "qcow2 image served with size '$size', not 1048576" >>"$NBD_DIR/probe.log"
    fi
    return 1
}

# make_image FMT PATH SIZE
make_image() {
    qemu-img create -q -f "$1" "$2" "$3"
}

# qio URI ARGS...: qemu-io on an NBD URI, bounded.
qio() {
    local uri=$1; shift
    timeout 60 qemu-io -f raw "$uri" "$@"
}
