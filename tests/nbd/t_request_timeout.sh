#!/bin/bash
# --request-timeout: a client that stops in the middle of a request (a WRITE
# header and half its payload; half a request header) is closed within the
# timeout, after the replies to its complete requests; a normal client is
# served meanwhile and afterwards.
# timeout: 300
. "$(dirname "$0")/lib.sh"

t=nbd_request_timeout
make_image raw "$NBD_DIR/r.raw" 16M
if start_server rt -v --request-timeout 2 "$NBD_DIR/r.raw"; then
    out=$(timeout 120 python3 - "$NBD_DIR/rt.sock" "$NBD_TESTS_DIR" 2>&1 <<'PY'
import socket, struct, subprocess, sys, time
sys.path.insert(0, sys.argv[2])
import hostile as h
sock = sys.argv[1]
uri = "nbd+unix:///?socket=" + sock

def normal(what, pattern):
    r = subprocess.run(["qemu-io", "-f", "raw", uri, "-c", "write -P %d 1M 64k" % pattern,
                        "-c", "read -P %d 1M 64k" % pattern],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
    out = r.stdout.decode()
    h.check(r.returncode == 0 and "fail" not in out.lower(), "%s: normal client: %s" % (what, out))

def closed_after(s, t0):
    """Seconds from t0 until the server closed s (bounded by the socket timeout)."""
    s.settimeout(30)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        raise h.Fail("the stalled connection was not closed within 30 s")
    return time.monotonic() - t0

# A complete 4k write, then a 64k write with half its payload.
a, _, _ = h.open_export(sock)
h.request(a, h.CMD_WRITE, 0, 4096, cookie=1, payload=b"\x11" * 4096)
h.request(a, h.CMD_WRITE, 8192, 65536, cookie=2, payload=b"\x22" * 32768)
err, cookie, _ = h.reply(a)
h.check(err == 0 and cookie == 1, "complete write: error %d, cookie %d" % (err, cookie))
# Half a request header.
b, _, _ = h.open_export(sock)
b.sendall(struct.pack(">IHHQ", h.REQMAGIC, 0, h.CMD_READ, 3)[:14])
t0 = time.monotonic()
normal("meanwhile", 0x5a)
ta, tb = closed_after(a, t0), closed_after(b, t0)
h.check(ta < 15 and tb < 15, "closed after %.1f s and %.1f s (timeout 2 s)" % (ta, tb))
normal("after", 0x6b)
# The complete write landed, the partial one did not.
c, _, _ = h.open_export(sock)
err, data = h.cmd(c, h.CMD_READ, 0, 4096 + 65536 + 4096, readlen=4096 + 65536 + 4096)
h.check(err == 0 and data[:4096] == b"\x11" * 4096, "the complete write is missing")
h.check(b"\x22" not in data, "the partial write reached the image")
h.request(c, h.CMD_DISC, 0, 0)
print("ok")
PY
    )
    if [ "$out" = ok ] && alive rt && stop_server rt &&
       [ "$(grep -c "request not received in full within 2000 ms" "$NBD_DIR/rt.log")" = 2 ]; then
        ok $t
    else
        fail $t "$out $(cat "$NBD_DIR/rt.log")"
    fi
else
    fail $t "$(cat "$NBD_DIR/rt.log")"
fi

# --- The option is validated. ---
t=nbd_request_timeout_option
if out=$(timeout 30 "$UQ" nbd --socket "$NBD_DIR/x.sock" --request-timeout 0 "$NBD_DIR/r.raw" 2>&1); then
    fail $t "--request-timeout 0 was accepted"
elif grep -q "invalid --request-timeout '0'" <<<"$out"; then
    ok $t
else
    fail $t "$out"
fi
exit 0
