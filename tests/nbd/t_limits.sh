#!/bin/bash
# Resource limits against hostile local clients: 1100 idle connections do not
# lock a normal client out (handshake timeout, --max-connections makes room),
# and the server's fds and memory return to their idle level; clients that
# never read their replies stay under the memory bound and do not stall a
# normal client's 32 MiB read.
# timeout: 600
. "$(dirname "$0")/lib.sh"

# Memory is measured without ASan's quarantine (it holds freed memory back on
# purpose) and with its allocator returning free pages promptly.
export ASAN_OPTIONS="${ASAN_OPTIONS:-}:quarantine_size_mb=0:allocator_release_to_os_interval_ms=0"
# Resident kB, not counting ASan's shadow memory (addresses below
# 0x10007fff8000): in the sanitized build the shadow of memory already given
# back stays resident, and it does not exist in the real program.
rss_kb() {
    awk '/^[0-9a-f]+-[0-9a-f]+ / { split($1, a, "-"); shadow = length(a[2]) < 12 || (length(a[2]) == 12 && a[2] <= "10007fff8000") }
         /^Rss:/ { if (!shadow) kb += $2 } END { print kb + 0 }' "/proc/$1/smaps"
}
hwm_kb() { awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"; }
nfds() { ls "/proc/$1/fd" | wc -l; }
# settle PID FDS RSS_KB SLACK_KB: bounded wait until the server is back to
# FDS open files and at most RSS_KB + SLACK_KB resident.
settle() {
    local i
    for i in $(seq 300); do
        [ "$(nfds "$1")" -le "$2" ] && [ "$(rss_kb "$1")" -le $(($3 + $4)) ] && return 0
        sleep 0.1
    done
    return 1
}

# --- 1100 idle TCP connections (loopback only, all closed at the end). ---
t=nbd_limits_idle_connections
make_image raw "$NBD_DIR/i.raw" 16M
if start_tcp idle "$NBD_DIR/i.raw"; then
    pid=$(server_pid idle)
    timeout 30 nbdinfo --size "nbd://127.0.0.1:$PORT_idle" >/dev/null    # warm up
    fds0=$(nfds "$pid"); rss0=$(rss_kb "$pid")
    cat >"$NBD_DIR/idle.py" <<'PY'
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
socks = []
for _ in range(1100):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(("127.0.0.1", int(sys.argv[1])))      # then silent
    socks.append(s)
print("open", len(socks), flush=True)
sys.stdin.readline()        # until the test says so
for s in socks:
    s.close()
print("closed", flush=True)
PY
    coproc IDLE { timeout 300 python3 "$NBD_DIR/idle.py" "$PORT_idle" 2>&1; }
    word= n=
    read -r -t 120 -u "${IDLE[0]}" word n
    size=$(timeout 60 nbdinfo --size "nbd://127.0.0.1:$PORT_idle" 2>&1)
    peak=$(nfds "$pid")
    echo done >&"${IDLE[1]}"
    read -r -t 120 -u "${IDLE[0]}" closed
    wait "$IDLE_PID"
    if [ "$word $n" = "open 1100" ] && [ "$size" = 16777216 ] && [ "$peak" -le 1100 ] &&
       settle "$pid" "$fds0" "$rss0" 8192 && alive idle; then
        ok $t
    else
        fail $t "clients '$word $n', normal client got '$size', fds $fds0 -> peak $peak -> $(nfds "$pid"), rss $rss0 -> $(rss_kb "$pid") kB"
    fi
    stop_server idle
else
    fail $t "$(cat "$NBD_DIR/idle.log")"
fi

# --- A silent connection is closed after --handshake-timeout. ---
t=nbd_limits_handshake_timeout
make_image raw "$NBD_DIR/h.raw" 1M
if start_server hs -v --handshake-timeout 1 "$NBD_DIR/h.raw" &&
   out=$(timeout 60 python3 - "$NBD_DIR/hs.sock" 2>&1 <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(50); s.connect(sys.argv[1])
data = b""
while True:                 # the greeting, then EOF when the server gives up
    chunk = s.recv(4096)
    if not chunk:
        break
    data += chunk
print("closed after", len(data))
PY
   ) && [ "$out" = "closed after 18" ] && stop_server hs &&
   grep -q "handshake not finished within 1000 ms" "$NBD_DIR/hs.log"; then
    ok $t
else
    fail $t "$out $(cat "$NBD_DIR/hs.log")"
fi

# --- --max-connections: full of established sessions, a new client waits in
#     the backlog and is served once a session ends. ---
t=nbd_limits_max_connections
if start_server mc --max-connections 2 "$NBD_DIR/h.raw" &&
   out=$(timeout 120 python3 - "$NBD_DIR/mc.sock" "$NBD_TESTS_DIR" 2>&1 <<'PY'
import subprocess, sys
sys.path.insert(0, sys.argv[2])
import hostile as h
a, _, _ = h.open_export(sys.argv[1])
b, _, _ = h.open_export(sys.argv[1])
p = subprocess.Popen(["nbdinfo", "--size", "nbd+unix:///?socket=" + sys.argv[1]],
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
# Both sessions still work while the third client waits.
err, _ = h.cmd(a, h.CMD_READ, 0, 512, readlen=512)
h.check(err == 0, "read failed")
h.check(p.poll() is None, "third client answered while the server was full")
h.request(a, h.CMD_DISC, 0, 0)
a.close()
out = p.communicate(timeout=60)[0].decode().strip()
print(out)
PY
   ) && [ "$out" = 1048576 ] && stop_server mc; then
    ok $t
else
    fail $t "$out $(cat "$NBD_DIR/mc.log")"
fi

# --- Clients that never read their replies. ---
t=nbd_limits_non_reading_clients
make_image raw "$NBD_DIR/n.raw" 64M
qemu-io -f raw -c 'write -P 0x6b 0 64M' "$NBD_DIR/n.raw" >/dev/null
if start_server nr "$NBD_DIR/n.raw"; then
    pid=$(server_pid nr)
    qio "$URI_nr" -c 'read -P 0x6b 0 32M' >/dev/null 2>&1    # warm up
    fds0=$(nfds "$pid"); rss0=$(rss_kb "$pid")
    # 9 clients pipelining 16 MiB reads, 4 pipelining 1 MiB reads (those
    # fill the shared budget), all never reading a byte of the replies.
    cat >"$NBD_DIR/nr.py" <<'PY'
import struct, sys
sys.path.insert(0, sys.argv[2])
import hostile as h
socks = []
for i in range(13):
    s, _, _ = h.open_export(sys.argv[1])
    ln, n = (16 << 20, 64) if i < 9 else (1 << 20, 120)
    s.sendall(b"".join(struct.pack(">IHHQQI", h.REQMAGIC, 0, h.CMD_READ, k, (k * ln) % (48 << 20), ln)
                       for k in range(n)))
    socks.append(s)
print("stuck", flush=True)
sys.stdin.readline()
for s in socks:
    s.close()
print("closed", flush=True)
PY
    coproc NR { timeout 300 python3 "$NBD_DIR/nr.py" "$NBD_DIR/nr.sock" "$NBD_TESTS_DIR" 2>&1; }
    word=
    read -r -t 120 -u "${NR[0]}" word
    out=$(qio "$URI_nr" -c 'read -P 0x6b 0 32M' -c 'write -P 0x33 40M 4k' -c 'read -P 0x33 40M 4k' 2>&1); qrc=$?
    hwm=$(hwm_kb "$pid")
    echo done >&"${NR[1]}"
    read -r -t 120 -u "${NR[0]}" closed
    wait "$NR_PID"
    # Bound: the 256 MiB budget, 256 KiB per streaming connection, buffers
    # and stacks: 320 MiB above idle.
    if [ "$word" = stuck ] && [ $qrc = 0 ] && ! grep -qi -e fail -e error <<<"$out" &&
       [ $((hwm - rss0)) -le $((320 << 10)) ] && settle "$pid" "$fds0" "$rss0" 16384 && alive nr; then
        ok $t
    else
        fail $t "clients '$word', qemu-io rc $qrc $(tr '\n' ' ' <<<"$out"), rss $rss0 kB -> peak $hwm kB -> $(rss_kb "$pid") kB, fds $fds0 -> $(nfds "$pid")"
    fi
    echo "# non-reading clients: rss idle $rss0 kB, peak $hwm kB, after $(rss_kb "$pid") kB" >&2
    stop_server nr
else
    fail $t "$(cat "$NBD_DIR/nr.log")"
fi
exit 0
