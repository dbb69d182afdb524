#!/bin/bash
# Signals: SIGHUP (and a terminal that closes) stops the server the way
# SIGTERM does: requests in flight finish, the image is flushed, the socket
# removed, exit 0; writes the client saw acknowledged but never flushed are
# in the image.  SIGPIPE never kills it.
. "$(dirname "$0")/lib.sh"

qcow2_available || { skip nbd_signal "qcow2 engine not landed"; exit 0; }

# writer.py SOCKET: write a pattern over 16 clusters without FLUSH, wait for
# every acknowledgement, print "acked", then wait for the server to close.
cat >"$NBD_DIR/writer.py" <<'PY'
import sys
sys.path.insert(0, sys.argv[2])
import hostile as h
s, size, flags = h.open_export(sys.argv[1])
for i in range(16):
    h.request(s, h.CMD_WRITE, i * 65536 + 4096, 4096, cookie=i, payload=bytes([0x40 + i]) * 4096)
for i in range(16):
    err, cookie, _ = h.reply(s)
    h.check(err == 0, "write %d failed: %d" % (cookie, err))
print("acked", flush=True)
s.settimeout(60)
while s.recv(4096):         # EOF once the server shuts down
    pass
PY

# verify IMAGE: the 16 patterns are there and qemu-img check is clean.
verify() {
    local img=$1 i args=()
    for i in $(seq 0 15); do
        args+=(-c "read -P $((0x40 + i)) $((i * 65536 + 4096)) 4096")
    done
    out=$(timeout 60 qemu-io -f qcow2 -r "${args[@]}" "$img" 2>&1) &&
        ! grep -qi -e fail -e error -e mismatch <<<"$out" &&
        out=$(qemu-img check "$img" 2>&1)
}

# SIGHUP to a foreground server with a connected client whose writes were
# acknowledged but not flushed.
for sig in HUP QUIT USR1; do
    t="nbd_signal_sig$sig"
    img="$NBD_DIR/s$sig.qcow2"; sock="$NBD_DIR/s$sig.sock"
    make_image qcow2 "$img" 16M
    "$UQ" nbd -v --socket "$sock" --pid-file "$NBD_DIR/s$sig.pid" "$img" 2>"$NBD_DIR/s$sig.log" &
    spid=$!
    NBD_PIDS="$NBD_PIDS $spid"
    timeout 30 bash -c "until [ -s '$NBD_DIR/s$sig.pid' ]; do sleep 0.05; done"
    mkfifo "$NBD_DIR/s$sig.fifo"
    timeout 90 python3 "$NBD_DIR/writer.py" "$sock" "$NBD_TESTS_DIR" >"$NBD_DIR/s$sig.fifo" 2>"$NBD_DIR/s$sig.client" &
    cpid=$!
    line=""; read -r -t 60 line <"$NBD_DIR/s$sig.fifo"
    kill -"$sig" "$spid"
    wait_gone "$spid" || kill -KILL "$spid"
    wait "$spid"; rc=$?
    wait "$cpid"
    if [ "$line" = acked ] && [ $rc -eq 0 ] && [ ! -e "$sock" ] && [ ! -e "$NBD_DIR/s$sig.pid" ] && verify "$img"; then
        ok "$t"
    else
        fail "$t" "client '$line', exit $rc, socket left: $([ -e "$sock" ] && echo yes || echo no); $(tr '\n' ' ' <<<"$out") log: $(tr '\n' ' ' <"$NBD_DIR/s$sig.log") $(cat "$NBD_DIR/s$sig.client")"
    fi
done

# The terminal closes: the server runs in the foreground on a pty (it is the
# session's controlling process), a client's writes are acknowledged, then
# the pty's master side is closed; the kernel sends SIGHUP.
t=nbd_signal_terminal_closed
img="$NBD_DIR/pty.qcow2"; sock="$NBD_DIR/pty.sock"
make_image qcow2 "$img" 16M
timeout 120 python3 - "$UQ" "$img" "$sock" "$NBD_DIR/writer.py" "$NBD_TESTS_DIR" >"$NBD_DIR/pty.out" 2>&1 <<'PY'
import os, pty, select, signal, subprocess, sys, time
uq, img, sock, writer, tdir = sys.argv[1:]
pid, master = pty.fork()
if pid == 0:
    os.execv(uq, [uq, "nbd", "-v", "--socket", sock, img])
# Wait (bounded) for the "serving" line on the terminal.
out = b""
deadline = time.monotonic() + 60
while b"serving" not in out and time.monotonic() < deadline:
    r, _, _ = select.select([master], [], [], 1)
    if r:
        try:
            out += os.read(master, 4096)
        except OSError:
            break
if b"serving" not in out:
    print("server did not start:", out.decode(errors="replace"))
    sys.exit(1)
client = subprocess.Popen([sys.executable, writer, sock, tdir], stdout=subprocess.PIPE)
line = client.stdout.readline().strip()
if line != b"acked":
    print("client did not get its acknowledgements")
    sys.exit(1)
os.close(master)            # the terminal goes away
signal.alarm(60)
_, status = os.waitpid(pid, 0)
client.wait(timeout=60)
print("status", os.waitstatus_to_exitcode(status))
PY
if grep -qx "status 0" "$NBD_DIR/pty.out" && [ ! -e "$sock" ] && verify "$img"; then
    ok $t
else
    fail $t "$(tr '\n' ' ' <"$NBD_DIR/pty.out") socket left: $([ -e "$sock" ] && echo yes || echo no) $(tr '\n' ' ' <<<"$out")"
fi

# SIGPIPE (sent, or raised by a send to a client that left) never kills.
t=nbd_signal_sigpipe
make_image raw "$NBD_DIR/p.raw" 1M
if start_server pipe "$NBD_DIR/p.raw" && kill -PIPE "$(server_pid pipe)" &&
   qio "$URI_pipe" -c 'write -P 7 0 4k' -c 'read -P 7 0 4k' >/dev/null 2>&1 && alive pipe && stop_server pipe; then
    ok $t
else
    fail $t "$(cat "$NBD_DIR/pipe.log")"
fi
exit 0
