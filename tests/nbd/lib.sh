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

# start_tcp NAME [OPTIONS...] IMAGE: serve with --fork on 127.0.0.1 at a free
# port (another process may hold the first pick); sets PORT_<NAME>.
start_tcp() {
    local name=$1 try port; shift
    for try in 1 2 3 4 5; do
        port=$((20000 + RANDOM % 40000))
        if timeout 30 "$UQ" nbd --fork --pid-file "$NBD_DIR/$name.pid" --bind "127.0.0.1:$port" "$@" \
            >>"$NBD_DIR/$name.log" 2>&1; then
            NBD_PIDS="$NBD_PIDS $(cat "$NBD_DIR/$name.pid")"
            eval "PORT_$name=$port"
            return 0
        fi
        grep -q "in use" "$NBD_DIR/$name.log" || return 1
    done
    return 1
}

# make_pki DIR: a CA, a server certificate for localhost/127.0.0.1 and a
# client certificate (CN=client1) in the layout QEMU, nbdkit and libnbd use;
# DIR/other: a client certificate from another CA (with the real CA to check
# the server).  Keys 0600 as a careful administrator leaves them.
make_pki() {
    local d=$1 o=$1/other
    mkdir -p "$d" "$o"
    (
        umask 077
        cd "$d" || exit 1
        printf 'cn = Test CA\nca\ncert_signing_key\nexpiration_days = 30\n' >ca.info
        printf 'cn = localhost\ndns_name = localhost\nip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\nexpiration_days = 30\n' >server.info
        printf 'cn = client1\norganization = ublk-qcow2 tests\ntls_www_client\nencryption_key\nsigning_key\nexpiration_days = 30\n' >client.info
        certtool --generate-privkey --outfile ca-key.pem &&
        certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info --outfile ca-cert.pem &&
        certtool --generate-privkey --outfile server-key.pem &&
        certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
            --load-privkey server-key.pem --template server.info --outfile server-cert.pem &&
        certtool --generate-privkey --outfile client-key.pem &&
        certtool --generate-certificate --load-ca-certificate ca-cert.pem --load-ca-privkey ca-key.pem \
            --load-privkey client-key.pem --template client.info --outfile client-cert.pem &&
        cd other && cp ../ca-cert.pem . &&
        certtool --generate-privkey --outfile ca2-key.pem &&
        certtool --generate-self-signed --load-privkey ca2-key.pem --template ../ca.info --outfile ca2-cert.pem &&
        certtool --generate-privkey --outfile client-key.pem &&
        certtool --generate-certificate --load-ca-certificate ca2-cert.pem --load-ca-privkey ca2-key.pem \
            --load-privkey client-key.pem --template ../client.info --outfile client-cert.pem
    ) >"$d.log" 2>&1
}
