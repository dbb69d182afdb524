#!/bin/bash
# The 'nbd' subcommand's command line, startup errors, sockets, export
# names, TCP, and signal handling in the foreground.
. "$(dirname "$0")/lib.sh"

img="$NBD_DIR/c.raw"
make_image raw "$img" 8M
S="$NBD_DIR/c.sock"

# expect_exit NAME CODE PATTERN CMD...: exit code and a message on stdout/stderr.
# Output goes through a file: a server that started by mistake keeps its
# stderr open, which would block a $(...) capture.  Such a server is
# found through X.pid (pass --pid-file "$X") and stopped.
X="$NBD_DIR/unexpected.pid"
expect_exit() {
    local name=$1 code=$2 pat=$3 out rc; shift 3
    rm -f "$X"
    timeout 30 "$@" >"$NBD_DIR/out" 2>&1; rc=$?
    out=$(cat "$NBD_DIR/out")
    [ -s "$X" ] && kill -TERM "$(cat "$X")" && out="$out (server started)"
    if [ $rc -eq "$code" ] && grep -qi -e "$pat" <<<"$out"; then
        ok "$name"
    else
        fail "$name" "exit $rc (want $code), output: $(head -c 300 <<<"$out" | tr '\n' ' ')"
    fi
}

expect_exit nbd_cli_help 0 "usage: ublk-qcow2 nbd" "$UQ" nbd --help
expect_exit nbd_cli_bad_option 2 "unknown option '--bogus'" "$UQ" nbd --bogus --socket "$S" "$img"
expect_exit nbd_cli_missing_image 2 "missing IMAGE" "$UQ" nbd --socket "$S"
expect_exit nbd_cli_no_address 2 "exactly one of" "$UQ" nbd "$img"
expect_exit nbd_cli_two_addresses 2 "exactly one of" "$UQ" nbd --socket "$S" --bind 127.0.0.1:1 "$img"
expect_exit nbd_cli_bad_format 2 "unknown format 'vmdk'" "$UQ" nbd --format vmdk --socket "$S" "$img"
expect_exit nbd_cli_bad_cache_size 2 "invalid --cache-size" "$UQ" nbd --cache-size lots --socket "$S" "$img"
expect_exit nbd_cli_bad_discard 2 "unknown --discard mode 'sometimes'" "$UQ" nbd --discard sometimes --socket "$S" "$img"
expect_exit nbd_cli_help_discard 0 "--discard-no-unref" "$UQ" nbd --help
expect_exit nbd_cli_missing_arg 2 "needs an argument" "$UQ" nbd "$img" --socket
expect_exit nbd_cli_extra_arg 2 "unexpected argument" "$UQ" nbd --socket "$S" "$img" "$img"

# Startup failures: exit 1, "ublk-qcow2: <reason>", nothing left listening.
expect_exit nbd_cli_missing_file 1 "^ublk-qcow2: .*nope.raw" "$UQ" nbd --fork --pid-file "$X" --socket "$S" "$NBD_DIR/nope.raw"
t=nbd_cli_missing_file_no_socket
if [ ! -e "$S" ]; then ok $t; else fail $t "socket created for a missing image"; fi
expect_exit nbd_cli_missing_file_foreground 1 "^ublk-qcow2: .*nope.raw" "$UQ" nbd --socket "$S" "$NBD_DIR/nope.raw"
expect_exit nbd_cli_bad_qcow2 1 "^ublk-qcow2: " "$UQ" nbd --fork --pid-file "$X" --format qcow2 --socket "$S" "$img"
echo keep >"$NBD_DIR/file"
expect_exit nbd_cli_socket_is_file 1 "not a socket" "$UQ" nbd --fork --pid-file "$X" --socket "$NBD_DIR/file" "$img"
t=nbd_cli_socket_file_kept
if [ "$(cat "$NBD_DIR/file")" = keep ]; then ok $t; else fail $t "regular file at the socket path was touched"; fi
long="$NBD_DIR/$(printf 'x%.0s' $(seq 120))"
expect_exit nbd_cli_socket_too_long 1 "too long" "$UQ" nbd --fork --pid-file "$X" --socket "$long" "$img"
expect_exit nbd_cli_bad_bind 1 "HOST:PORT" "$UQ" nbd --fork --pid-file "$X" --bind nocolon "$img"

# A stale socket file (nobody listening) is replaced.
t=nbd_cli_stale_socket
python3 -c 'import socket,sys; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])' "$NBD_DIR/stale.sock"
if [ -S "$NBD_DIR/stale.sock" ] && start_server stale "$img" && timeout 30 nbdinfo --size "$URI_stale" >/dev/null; then
    ok $t
else
    fail $t "$(cat "$NBD_DIR/stale.log")"
fi
# A live socket is not stolen (another image: this one is locked by the server).
make_image raw "$NBD_DIR/c2.raw" 1M
expect_exit nbd_cli_socket_in_use 1 "another server" "$UQ" nbd --fork --pid-file "$X" --socket "$NBD_DIR/stale.sock" "$NBD_DIR/c2.raw"
expect_exit nbd_cli_image_locked 1 "in use" "$UQ" nbd --fork --pid-file "$X" --socket "$NBD_DIR/c3.sock" "$img"
t=nbd_cli_pid_file
if [ "$(server_pid stale)" -gt 1 ] && alive stale && stop_server stale; then ok $t; else fail $t "pid file or shutdown wrong"; fi

# The pid file: never written through a symlink; removed at exit only while it still holds
# our pid (another server may have taken the name).
echo keep >"$NBD_DIR/victim"
ln -s "$NBD_DIR/victim" "$NBD_DIR/link.pid"
expect_exit nbd_cli_pid_file_symlink 1 "symbolic link" "$UQ" nbd --fork --pid-file "$NBD_DIR/link.pid" --socket "$NBD_DIR/c4.sock" "$img"
t=nbd_cli_pid_file_symlink_target_kept
if [ "$(cat "$NBD_DIR/victim")" = keep ]; then ok $t; else fail $t "the symlink's target was overwritten"; fi
t=nbd_cli_pid_file_not_ours_kept
if start_server other "$img"; then
    pid=$(server_pid other)
    echo 4194304 >"$NBD_DIR/other.pid"      # another server's pid now
    kill -TERM "$pid" && wait_gone "$pid"
    if [ "$(cat "$NBD_DIR/other.pid" 2>/dev/null)" = 4194304 ] && [ ! -e "$NBD_DIR/other.sock" ]; then ok $t
    else fail $t "the pid file of another server was removed (or the socket left)"; fi
else
    fail $t "server did not start: $(cat "$NBD_DIR/other.log")"
fi

# Locks as QEMU takes them: a served image is refused to QEMU writers, its
# backing file too (read-only users may still open both).
t=nbd_cli_locks
qemu-img create -q -f qcow2 "$NBD_DIR/lbase.qcow2" 8M
(cd "$NBD_DIR" && qemu-img create -q -f qcow2 -b lbase.qcow2 -F qcow2 lover.qcow2 8M)
if start_server locked "$NBD_DIR/lover.qcow2"; then
    w_top=$(timeout 30 qemu-io -c 'write 0 4k' "$NBD_DIR/lover.qcow2" 2>&1); rc_top=$?
    w_base=$(timeout 30 qemu-io -c 'write 0 4k' "$NBD_DIR/lbase.qcow2" 2>&1); rc_base=$?
    r_base=$(timeout 30 qemu-io -r -c 'read 0 4k' "$NBD_DIR/lbase.qcow2" 2>&1); rc_read=$?
    if [ $rc_top != 0 ] && grep -qi lock <<<"$w_top" && [ $rc_base != 0 ] && grep -qi lock <<<"$w_base" &&
       [ $rc_read = 0 ]; then
        ok $t
    else
        fail $t "top: rc $rc_top $w_top; base: rc $rc_base $w_base; base read-only: rc $rc_read $r_base"
    fi
    stop_server locked
    t=nbd_cli_locks_released
    if timeout 30 qemu-io -c 'write 0 4k' "$NBD_DIR/lbase.qcow2" >/dev/null 2>&1; then ok $t; else fail $t "backing file still locked after the server stopped"; fi
else
    fail $t "$(cat "$NBD_DIR/locked.log")"
fi

# -v: the server says what it serves and when clients come and go.
t=nbd_cli_verbose
if start_server verbose -v "$NBD_DIR/c2.raw" && qio "$URI_verbose" -c 'read 0 4k' >/dev/null &&
   stop_server verbose &&
   grep -q "^ublk-qcow2: serving $NBD_DIR/c2.raw (raw, 1048576 bytes) on $NBD_DIR/verbose.sock" "$NBD_DIR/verbose.log" &&
   grep -q "^ublk-qcow2: nbd: client [0-9]* connected" "$NBD_DIR/verbose.log" &&
   grep -q "^ublk-qcow2: nbd: client [0-9]* disconnected" "$NBD_DIR/verbose.log"; then
    ok $t
else
    fail $t "$(tr '\n' ' ' <"$NBD_DIR/verbose.log")"
fi
t=nbd_cli_quiet_by_default
if ! grep -q "connected" "$NBD_DIR/c3.log" 2>/dev/null && start_server quiet "$NBD_DIR/c2.raw" &&
   qio "$URI_quiet" -c 'read 0 4k' >/dev/null && stop_server quiet && ! grep -q "connected" "$NBD_DIR/quiet.log"; then
    ok $t
else
    fail $t "$(tr '\n' ' ' <"$NBD_DIR/quiet.log")"
fi

# Export names: only the configured name is served.
t=nbd_cli_export_name
if start_server named --export-name disk0 "$img" &&
   timeout 30 nbdinfo --size "nbd+unix:///disk0?socket=$NBD_DIR/named.sock" >/dev/null &&
   ! timeout 30 nbdinfo --size "nbd+unix:///?socket=$NBD_DIR/named.sock" >/dev/null 2>&1 &&
   ! timeout 30 nbdinfo --size "nbd+unix:///other?socket=$NBD_DIR/named.sock" >/dev/null 2>&1 &&
   timeout 30 nbdinfo --list --json "nbd+unix:///?socket=$NBD_DIR/named.sock" | jq -e '.exports[0]["export-name"] == "disk0"' >/dev/null; then
    ok $t
else
    fail $t "$(cat "$NBD_DIR/named.log")"
fi
stop_server named

# TCP: find a free port (another process may hold the first pick).
t=nbd_cli_tcp
started=""
for try in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 40000))
    if timeout 30 "$UQ" nbd --fork --pid-file "$NBD_DIR/tcp.pid" --bind "127.0.0.1:$port" "$img" \
        >"$NBD_DIR/tcp.log" 2>&1; then
        started=1; NBD_PIDS="$NBD_PIDS $(cat "$NBD_DIR/tcp.pid")"; break
    fi
    grep -q "in use" "$NBD_DIR/tcp.log" || break
done
if [ -n "$started" ] &&
   out=$(qio "nbd://127.0.0.1:$port" -c 'write -P 0x21 0 1M' -c 'read -P 0x21 0 1M' 2>&1) &&
   ! grep -qi -e fail -e error <<<"$out"; then
    pid=$(cat "$NBD_DIR/tcp.pid"); kill -TERM "$pid"
    if wait_gone "$pid"; then ok $t; else fail $t "no exit after SIGTERM"; fi
else
    fail $t "$(cat "$NBD_DIR/tcp.log") $(tr '\n' ' ' <<<"$out")"
fi

# Foreground: SIGTERM and SIGINT give exit 0 with the socket and pid file removed.
for sig in TERM INT; do
    t="nbd_cli_foreground_sig$sig"
    rm -f "$NBD_DIR/fg.pid"
    "$UQ" nbd --socket "$NBD_DIR/fg.sock" --pid-file "$NBD_DIR/fg.pid" "$img" 2>"$NBD_DIR/fg.log" &
    spid=$!
    NBD_PIDS="$NBD_PIDS $spid"
    # The pid file appears once the socket listens (bounded wait).
    timeout 30 bash -c "until [ -s '$NBD_DIR/fg.pid' ]; do sleep 0.05; done"
    # Use the export once before the signal.
    qio "nbd+unix:///?socket=$NBD_DIR/fg.sock" -c 'write -P 9 0 64k' >/dev/null 2>&1
    kill -"$sig" "$spid"
    wait_gone "$spid" || kill -KILL "$spid"
    wait "$spid"; rc=$?
    if [ $rc -eq 0 ] && [ ! -e "$NBD_DIR/fg.sock" ] && [ ! -e "$NBD_DIR/fg.pid" ]; then
        ok $t
    else
        fail $t "exit $rc, socket/pid file left: $(ls "$NBD_DIR" | tr '\n' ' ') log: $(cat "$NBD_DIR/fg.log")"
    fi
done

# Shutdown with a connected, idle client and one mid-handshake.
t=nbd_cli_shutdown_with_clients
if start_server busy "$img"; then
    mkfifo "$NBD_DIR/busy.fifo"
    python3 - "$NBD_DIR/busy.sock" >"$NBD_DIR/busy.fifo" <<'PY' &
import socket, struct, sys
a = socket.socket(socket.AF_UNIX); a.connect(sys.argv[1]); a.settimeout(60)
a.recv(18)                  # stays in the handshake
b = socket.socket(socket.AF_UNIX); b.connect(sys.argv[1]); b.settimeout(60)
b.recv(18)
b.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
buf = b""
while not buf.endswith(struct.pack(">QII", 0x3E889045565A9, 7, 1) + struct.pack(">I", 0)):
    buf += b.recv(1)        # option replies up to the final ACK: in transmission
print("ready", flush=True)
while b.recv(4096):         # EOF when the server shuts down
    pass
PY
    cpid=$!
    read -r -t 30 line <"$NBD_DIR/busy.fifo"
    if [ "$line" = ready ] && stop_server busy && wait_gone $cpid &&
       ! grep -q "still busy" "$NBD_DIR/busy.log"; then
        ok $t
    else
        fail $t "line='$line' shutdown blocked by clients: $(cat "$NBD_DIR/busy.log")"
    fi
    kill $cpid 2>/dev/null; wait $cpid 2>/dev/null
else
    fail $t "$(cat "$NBD_DIR/busy.log")"
fi

# A client that stops reading its replies must neither starve other clients
# nor keep the server from exiting (it is cut after the grace period).
t=nbd_cli_shutdown_stuck_client
if start_server stuck "$img"; then
    mkfifo "$NBD_DIR/stuck.fifo"
    python3 - "$NBD_DIR/stuck.sock" >"$NBD_DIR/stuck.fifo" <<'PY' &
import socket, struct, sys, threading
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.settimeout(60)
s.recv(18)
s.sendall(struct.pack(">I", 3) + struct.pack(">QII", 0x49484156454F5054, 7, 6) + struct.pack(">IH", 0, 0))
buf = b""
while not buf.endswith(struct.pack(">QII", 0x3E889045565A9, 7, 1) + struct.pack(">I", 0)):
    buf += s.recv(1)        # option replies up to the final ACK
reqs = b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, 0, 8 << 20) for i in range(64))
threading.Thread(target=s.sendall, args=(reqs,), daemon=True).start()
s.recv(16)                  # the first reply header: the server is now mid-reply
print("stuck", flush=True)
threading.Event().wait(60)  # never read again
PY
    cpid=$!
    read -r -t 30 line <"$NBD_DIR/stuck.fifo"
    out=$(qio "$URI_stuck" -c 'write -P 0x3c 0 1M' -c 'read -P 0x3c 0 1M' 2>&1); qrc=$?
    if [ "$line" = stuck ] && [ $qrc = 0 ] && ! grep -qi -e fail -e error <<<"$out" &&
       stop_server stuck && grep -q "still busy" "$NBD_DIR/stuck.log"; then
        ok $t
    else
        fail $t "line='$line' qemu-io rc=$qrc $(tr '\n' ' ' <<<"$out") log: $(cat "$NBD_DIR/stuck.log")"
    fi
    kill $cpid 2>/dev/null; wait $cpid 2>/dev/null
else
    fail $t "$(cat "$NBD_DIR/stuck.log")"
fi
exit 0
