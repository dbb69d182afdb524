#!/bin/bash
# NBD over TLS with real clients: x509 and PSK credentials, qemu-io/qemu-img
# (--object tls-creds-*), nbdinfo and nbdcopy (nbds+unix:// and nbds://),
# over a unix socket and TCP on 127.0.0.1; what TLS-required refuses; client
# certificates; wrong keys; --allow; the QEMU interop workload over TLS.
# timeout: 900
. "$(dirname "$0")/lib.sh"

command -v certtool >/dev/null && command -v psktool >/dev/null ||
    { skip nbd_tls "certtool/psktool missing (gnutls-bin)"; exit 0; }
qcow2_available || { skip nbd_tls "qcow2 engine not landed"; exit 0; }

P="$NBD_DIR/pki"
make_pki "$P" || { fail nbd_tls_pki "certtool failed: $(tail -5 "$P.log")"; exit 0; }
PSKDIR="$NBD_DIR/psk"; mkdir -p "$PSKDIR"
psktool -u alice -p "$PSKDIR/keys.psk" >/dev/null 2>&1
chmod 600 "$PSKDIR/keys.psk"
mkdir -p "$NBD_DIR/wrongpsk"
psktool -u alice -p "$NBD_DIR/wrongpsk/keys.psk" >/dev/null 2>&1
X509="tls-creds-x509,id=t0,endpoint=client,dir=$P"
PSKOBJ="tls-creds-psk,id=t0,endpoint=client,dir=$PSKDIR,username=alice"

# qtls OBJECT SOCKET-OR-PORT CMD...: qemu-io through TLS; prints its output.
qtls() {
    local obj=$1 where=$2 srv; shift 2
    if [[ $where == /* ]]; then srv="path=$where,tls-hostname=localhost"
    else srv="server.type=inet,server.host=127.0.0.1,server.port=$where"; fi
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    timeout 60 qemu-io --object "$obj" --image-opts "driver=nbd,$srv,tls-creds=t0" "${args[@]}" 2>&1
}
clean() { ! grep -qi -e fail -e error -e mismatch <<<"$1"; }
U_X509="tls-certificates=$P&tls-verify-peer=false"

dd if=/dev/urandom of="$NBD_DIR/data" bs=1M count=8 status=none

# --- x509 over a unix socket: nbdinfo, qemu-io, nbdcopy (4 connections). ---
make_image qcow2 "$NBD_DIR/x.qcow2" 64M
if start_server x509 -v --tls-certificates "$P" "$NBD_DIR/x.qcow2"; then
    S="$NBD_DIR/x509.sock"
    t=nbd_tls_x509_nbdinfo_unix
    out=$(timeout 30 nbdinfo "nbds+unix:///?socket=$S&$U_X509" 2>&1)
    if grep -q "with TLS" <<<"$out" && grep -q "export-size: 67108864" <<<"$out"; then ok $t; else fail $t "$out"; fi

    t=nbd_tls_x509_qemu_io_unix
    out=$(qtls "$X509" "$S" 'write -P 0x5a 1M 1M' 'flush' 'read -P 0x5a 1M 1M' 'read -P 0 0 1M')
    if [ $? = 0 ] && clean "$out"; then ok $t; else fail $t "$(tr '\n' ' ' <<<"$out")"; fi

    t=nbd_tls_x509_nbdcopy_unix
    rm -f "$NBD_DIR/back"
    if timeout 120 nbdcopy --connections=4 "$NBD_DIR/data" "nbds+unix:///?socket=$S&$U_X509" 2>"$NBD_DIR/cp.err" &&
       timeout 120 nbdcopy "nbds+unix:///?socket=$S&$U_X509" "$NBD_DIR/back" 2>>"$NBD_DIR/cp.err" &&
       cmp -s -n $((8 << 20)) "$NBD_DIR/data" "$NBD_DIR/back"; then
        ok $t
    else
        fail $t "$(cat "$NBD_DIR/cp.err")"
    fi

    # Plain text under require: refused, and nothing about the export is
    # said before STARTTLS.
    t=nbd_tls_require_refuses_plaintext
    out=$(timeout 30 nbdinfo "nbd+unix:///?socket=$S" 2>&1); rc=$?
    out2=$(timeout 30 qemu-io -f raw -c 'read 0 4k' "nbd+unix:///?socket=$S" 2>&1); rc2=$?
    if [ $rc != 0 ] && [ $rc2 != 0 ] && ! grep -q "export-size" <<<"$out"; then ok $t; else fail $t "nbdinfo rc $rc: $out; qemu-io rc $rc2: $out2"; fi

    t=nbd_tls_require_nothing_in_plaintext
    if out=$(timeout 60 python3 - "$S" "$NBD_TESTS_DIR" 2>&1 <<'PY'
import socket, struct, sys
sys.path.insert(0, sys.argv[2])
import hostile as h
TLS_REQD = (1 << 31) + 5
for opt, data in ((h.OPT_LIST, b""), (h.OPT_INFO, h.info_data()), (h.OPT_GO, h.info_data()),
                  (h.OPT_STRUCTURED, b""), (10, b"")):
    s = h.connect(sys.argv[1]); h.greet(s)
    h.send_opt(s, opt, data)
    ropt, typ, payload = h.recv_rep(s)
    h.check(ropt == opt and typ == TLS_REQD, "option %d answered %#x, not TLS_REQD" % (opt, typ))
    h.check(b"ublk-qcow2" not in payload and struct.pack(">Q", 64 << 20) not in payload,
            "export details in a plain-text reply")
    h.send_opt(s, h.OPT_ABORT)
    s.close()
# NBD_OPT_EXPORT_NAME has no error reply: the connection is closed, nothing sent.
s = h.connect(sys.argv[1]); h.greet(s)
h.send_opt(s, h.OPT_EXPORT_NAME, b"")
h.expect_closed(s, "EXPORT_NAME in plain text")
# STARTTLS with data is invalid; a second connection's garbage after
# STARTTLS (before our ACK) is refused rather than read as TLS.
s = h.connect(sys.argv[1]); h.greet(s)
h.send_opt(s, 5, b"x")
ropt, typ, _ = h.recv_rep(s)
h.check(typ == h.ERR_INVALID, "STARTTLS with data answered %#x" % typ)
s.close()
s = h.connect(sys.argv[1]); h.greet(s)
s.sendall(struct.pack(">QII", h.IHAVEOPT, 5, 0) + struct.pack(">QII", h.IHAVEOPT, h.OPT_LIST, 0))
h.expect_closed(s, "plain text pipelined after STARTTLS")
print("done")
PY
    ) && [ "$out" = done ]; then ok $t; else fail $t "$(tr '\n' ' ' <<<"$out")"; fi

    t=nbd_tls_log_identity
    if stop_server x509 && grep -q "^ublk-qcow2: nbd: client [0-9]* connected (unix, TLS1\.[23], no client certificate)" "$NBD_DIR/x509.log" &&
       grep -q "^ublk-qcow2: nbd: client [0-9]* disconnected (unix)" "$NBD_DIR/x509.log" &&
       ! grep -q -e "PRIVATE KEY" -e "can be read by other" "$NBD_DIR/x509.log"; then
        ok $t
    else
        fail $t "$(tr '\n' ' ' <"$NBD_DIR/x509.log")"
    fi
    t=nbd_tls_x509_image_clean
    if qemu-img check -q "$NBD_DIR/x.qcow2" && qemu-img compare -q -f raw -F qcow2 "$NBD_DIR/back" "$NBD_DIR/x.qcow2" 2>/dev/null; [ $? -le 1 ]; then
        # The copy rewrote the whole export: equal content.
        if qemu-img compare -q -f raw -F qcow2 "$NBD_DIR/data" "$NBD_DIR/x.qcow2"; then ok $t; else fail $t "content differs from the data copied in"; fi
    else
        fail $t "qemu-img check: $(qemu-img check "$NBD_DIR/x.qcow2" 2>&1 | tr '\n' ' ')"
    fi
else
    fail nbd_tls_x509_start "$(cat "$NBD_DIR/x509.log")"
fi

# --- x509 over TCP on 127.0.0.1 (the certificate names 127.0.0.1: verified). ---
make_image qcow2 "$NBD_DIR/t.qcow2" 64M
if start_tcp tcp -v --tls-certificates "$P" "$NBD_DIR/t.qcow2"; then
    t=nbd_tls_x509_tcp
    rm -f "$NBD_DIR/back"
    out=$(qtls "$X509" "$PORT_tcp" 'write -P 0x11 0 64k' 'read -P 0x11 0 64k')
    if [ $? = 0 ] && clean "$out" &&
       timeout 120 nbdcopy "$NBD_DIR/data" "nbds://127.0.0.1:$PORT_tcp/?tls-certificates=$P" 2>"$NBD_DIR/cp.err" &&
       timeout 120 nbdcopy "nbds://127.0.0.1:$PORT_tcp/?tls-certificates=$P" "$NBD_DIR/back" 2>>"$NBD_DIR/cp.err" &&
       cmp -s -n $((8 << 20)) "$NBD_DIR/data" "$NBD_DIR/back" &&
       timeout 30 nbdinfo "nbds://127.0.0.1:$PORT_tcp/?tls-certificates=$P" | grep -q "with TLS"; then
        ok $t
    else
        fail $t "$(tr '\n' ' ' <<<"$out") $(cat "$NBD_DIR/cp.err")"
    fi
    t=nbd_tls_log_tcp_peer
    if stop_server tcp && grep -q "^ublk-qcow2: nbd: client [0-9]* connected (127\.0\.0\.1:[0-9]*, TLS" "$NBD_DIR/tcp.log"; then
        ok $t
    else
        fail $t "$(tr '\n' ' ' <"$NBD_DIR/tcp.log")"
    fi
else
    fail nbd_tls_x509_tcp "$(cat "$NBD_DIR/tcp.log")"
fi

# --- --tls on: offered, plain text still served. ---
t=nbd_tls_on_mode
make_image raw "$NBD_DIR/on.raw" 4M
if start_server on --tls on --tls-certificates "$P" "$NBD_DIR/on.raw" &&
   timeout 30 nbdinfo "nbd+unix:///?socket=$NBD_DIR/on.sock" | grep -q "without TLS" &&
   timeout 30 nbdinfo "nbds+unix:///?socket=$NBD_DIR/on.sock&$U_X509" | grep -q "with TLS" &&
   stop_server on; then
    ok $t
else
    fail $t "$(cat "$NBD_DIR/on.log")"
fi

# --- client certificates: --tls-verify-peer. ---
make_image raw "$NBD_DIR/v.raw" 4M
if start_server vp -v --tls-certificates "$P" --tls-verify-peer "$NBD_DIR/v.raw"; then
    S="$NBD_DIR/vp.sock"
    t=nbd_tls_verify_peer_accepts_ca_client
    out=$(qtls "$X509" "$S" 'write -P 7 0 4k' 'read -P 7 0 4k')
    if [ $? = 0 ] && clean "$out" && timeout 30 nbdinfo --size "nbds+unix:///?socket=$S&$U_X509" >/dev/null; then
        ok $t
    else
        fail $t "$(tr '\n' ' ' <<<"$out")"
    fi
    t=nbd_tls_verify_peer_refuses_other_ca
    out=$(qtls "tls-creds-x509,id=t0,endpoint=client,dir=$P/other" "$S" 'read 0 4k'); rc=$?
    out2=$(timeout 30 nbdinfo --size "nbds+unix:///?socket=$S&tls-certificates=$P/other&tls-verify-peer=false" 2>&1); rc2=$?
    if [ $rc != 0 ] && [ $rc2 != 0 ]; then ok $t; else fail $t "qemu-io rc $rc: $out; nbdinfo rc $rc2: $out2"; fi
    t=nbd_tls_verify_peer_refuses_no_certificate
    mkdir -p "$NBD_DIR/caonly"; cp "$P/ca-cert.pem" "$NBD_DIR/caonly/"
    out=$(timeout 30 nbdinfo --size "nbds+unix:///?socket=$S&tls-certificates=$NBD_DIR/caonly&tls-verify-peer=false" 2>&1); rc=$?
    if [ $rc != 0 ]; then ok $t; else fail $t "served a client without a certificate: $out"; fi
    t=nbd_tls_log_certificate_dn
    if stop_server vp && grep -q "connected (unix, TLS1\.[23], certificate CN=client1" "$NBD_DIR/vp.log" &&
       grep -q "TLS handshake failed" "$NBD_DIR/vp.log"; then
        ok $t
    else
        fail $t "$(tr '\n' ' ' <"$NBD_DIR/vp.log")"
    fi
else
    fail nbd_tls_verify_peer_start "$(cat "$NBD_DIR/vp.log")"
fi

# --- PSK: qemu-io (tls-creds-psk), nbdinfo/nbdcopy over unix and TCP. ---
make_image qcow2 "$NBD_DIR/p.qcow2" 64M
if start_server psk -v --tls-psk "$PSKDIR/keys.psk" "$NBD_DIR/p.qcow2" &&
   start_tcp psktcp --tls-psk "$PSKDIR/keys.psk" --read-only "$NBD_DIR/v.raw"; then
    S="$NBD_DIR/psk.sock"
    t=nbd_tls_psk_qemu_io
    out=$(qtls "$PSKOBJ" "$S" 'write -P 0x77 2M 1M' 'read -P 0x77 2M 1M')
    if [ $? = 0 ] && clean "$out"; then ok $t; else fail $t "$(tr '\n' ' ' <<<"$out")"; fi
    t=nbd_tls_psk_nbdcopy
    rm -f "$NBD_DIR/back"
    if timeout 120 nbdcopy "$NBD_DIR/data" "nbds+unix://alice@/?socket=$S&tls-psk-file=$PSKDIR/keys.psk" 2>"$NBD_DIR/cp.err" &&
       timeout 120 nbdcopy "nbds+unix://alice@/?socket=$S&tls-psk-file=$PSKDIR/keys.psk" "$NBD_DIR/back" 2>>"$NBD_DIR/cp.err" &&
       cmp -s -n $((8 << 20)) "$NBD_DIR/data" "$NBD_DIR/back"; then
        ok $t
    else
        fail $t "$(cat "$NBD_DIR/cp.err")"
    fi
    t=nbd_tls_psk_tcp
    out=$(timeout 30 nbdinfo "nbds://alice@127.0.0.1:$PORT_psktcp/?tls-psk-file=$PSKDIR/keys.psk" 2>&1)
    out2=$(qtls "$PSKOBJ" "$PORT_psktcp" 'read -P 7 0 4k')
    if grep -q "with TLS" <<<"$out" && clean "$out2"; then ok $t; else fail $t "$out $(tr '\n' ' ' <<<"$out2")"; fi
    t=nbd_tls_psk_wrong_key
    out=$(timeout 30 nbdinfo --size "nbds+unix://alice@/?socket=$S&tls-psk-file=$NBD_DIR/wrongpsk/keys.psk" 2>&1); rc=$?
    out2=$(qtls "tls-creds-psk,id=t0,endpoint=client,dir=$NBD_DIR/wrongpsk,username=alice" "$S" 'read 0 4k'); rc2=$?
    if [ $rc != 0 ] && [ $rc2 != 0 ]; then ok $t; else fail $t "wrong key served: $out / $out2"; fi
    t=nbd_tls_psk_unknown_user
    sed 's/^alice:/mallory:/' "$PSKDIR/keys.psk" >"$NBD_DIR/mallory.psk"
    out=$(timeout 30 nbdinfo --size "nbds+unix://mallory@/?socket=$S&tls-psk-file=$NBD_DIR/mallory.psk" 2>&1); rc=$?
    if [ $rc != 0 ]; then ok $t; else fail $t "unknown user served: $out"; fi
    t=nbd_tls_psk_log
    key=$(cut -d: -f2 "$PSKDIR/keys.psk")
    if stop_server psk && stop_server psktcp && grep -q "connected (unix, TLS1\.[23], PSK user alice)" "$NBD_DIR/psk.log" &&
       ! grep -q "$key" "$NBD_DIR/psk.log" "$NBD_DIR/psktcp.log" && qemu-img check -q "$NBD_DIR/p.qcow2"; then
        ok $t
    else
        fail $t "$(tr '\n' ' ' <"$NBD_DIR/psk.log")"
    fi
else
    fail nbd_tls_psk_start "$(cat "$NBD_DIR/psk.log" "$NBD_DIR/psktcp.log" 2>/dev/null)"
fi

# --- The interop workload (tests/interop/workload.py) through TLS gives the
#     image QEMU's own driver makes from the same commands. ---
t=nbd_tls_interop_workload
make_image qcow2 "$NBD_DIR/ref.qcow2" 16M
cp "$NBD_DIR/ref.qcow2" "$NBD_DIR/ours.qcow2"
python3 "$NBD_TESTS_DIR/../interop/workload.py" 14 $((16 << 20)) 65536 >"$NBD_DIR/wl.txt"
mapfile -t WL <"$NBD_DIR/wl.txt"
wl_args=(); for c in "${WL[@]}"; do [[ -n $c && $c != \#* ]] && wl_args+=(-c "$c"); done
if [ ${#wl_args[@]} -gt 10 ] && timeout 120 qemu-io -f qcow2 "$NBD_DIR/ref.qcow2" "${wl_args[@]}" >/dev/null 2>&1 &&
   start_server wl --tls-certificates "$P" --discard unmap "$NBD_DIR/ours.qcow2" &&
   timeout 120 qemu-io --object "$X509" --image-opts "driver=nbd,path=$NBD_DIR/wl.sock,tls-hostname=localhost,tls-creds=t0" \
       "${wl_args[@]}" >"$NBD_DIR/wl.out" 2>&1 && stop_server wl &&
   qemu-img check -q "$NBD_DIR/ours.qcow2" &&
   qemu-img compare -q "$NBD_DIR/ref.qcow2" "$NBD_DIR/ours.qcow2"; then
    ok $t
else
    fail $t "${#wl_args[@]} commands; $(grep -i -m3 -e fail -e error "$NBD_DIR/wl.out") $(tail -3 "$NBD_DIR/wl.log" 2>/dev/null)"
fi

# --- --allow: TCP peers outside the list are refused at accept, and logged. ---
make_image raw "$NBD_DIR/a.raw" 4M
t=nbd_allow_refuses_others
if start_tcp deny --allow 10.0.0.0/8 --allow fd00::/8 "$NBD_DIR/a.raw"; then
    out=$(timeout 30 nbdinfo --size "nbd://127.0.0.1:$PORT_deny" 2>&1); rc=$?
    if [ $rc != 0 ] && stop_server deny && grep -q "refused a connection from 127\.0\.0\.1:[0-9]*: not in --allow" "$NBD_DIR/deny.log"; then
        ok $t
    else
        fail $t "rc $rc $out $(cat "$NBD_DIR/deny.log")"
    fi
else
    fail $t "$(cat "$NBD_DIR/deny.log")"
fi
t=nbd_allow_admits_listed
if start_tcp allow --allow 10.0.0.0/8 --allow 127.0.0.0/8 "$NBD_DIR/a.raw" &&
   [ "$(timeout 30 nbdinfo --size "nbd://127.0.0.1:$PORT_allow")" = 4194304 ] && stop_server allow; then
    ok $t
else
    fail $t "$(cat "$NBD_DIR/allow.log")"
fi

# --- Command line and credential errors: exit code, a message naming the fix. ---
X="$NBD_DIR/unexpected.pid"
expect() {
    local name=$1 code=$2 pat=$3 rc; shift 3
    rm -f "$X"
    timeout 30 "$@" >"$NBD_DIR/out" 2>&1; rc=$?
    [ -s "$X" ] && kill -TERM "$(cat "$X")"
    if [ $rc -eq "$code" ] && grep -qi -e "$pat" "$NBD_DIR/out"; then ok "$name"
    else fail "$name" "exit $rc (want $code): $(head -c 300 "$NBD_DIR/out" | tr '\n' ' ')"; fi
}
S="$NBD_DIR/e.sock"
expect nbd_tls_cli_on_without_creds 2 "needs credentials" "$UQ" nbd --tls on --socket "$S" "$NBD_DIR/a.raw"
expect nbd_tls_cli_bad_mode 2 "unknown --tls mode 'maybe'" "$UQ" nbd --tls maybe --socket "$S" "$NBD_DIR/a.raw"
expect nbd_tls_cli_off_with_creds 2 "contradicts" "$UQ" nbd --tls off --tls-psk "$PSKDIR/keys.psk" --socket "$S" "$NBD_DIR/a.raw"
expect nbd_tls_cli_verify_without_certs 2 "needs --tls-certificates" "$UQ" nbd --tls-psk "$PSKDIR/keys.psk" --tls-verify-peer --socket "$S" "$NBD_DIR/a.raw"
expect nbd_tls_cli_missing_cert_files 1 "server-cert.pem" "$UQ" nbd --fork --pid-file "$X" --tls-certificates "$NBD_DIR" --socket "$S" "$NBD_DIR/a.raw"
echo "alice:nothex" >"$NBD_DIR/bad.psk"
expect nbd_tls_cli_bad_psk_file 1 "line 1 is not USERNAME:HEXKEY" "$UQ" nbd --fork --pid-file "$X" --tls-psk "$NBD_DIR/bad.psk" --socket "$S" "$NBD_DIR/a.raw"
expect nbd_tls_cli_missing_psk_file 1 "nope.psk" "$UQ" nbd --fork --pid-file "$X" --tls-psk "$NBD_DIR/nope.psk" --socket "$S" "$NBD_DIR/a.raw"
expect nbd_cli_bad_allow 2 "expected an IPv4 or IPv6 address" "$UQ" nbd --allow 300.1.1.1/8 --bind 127.0.0.1:1 "$NBD_DIR/a.raw"
expect nbd_cli_bad_allow_prefix 2 "expected an IPv4" "$UQ" nbd --allow 10.0.0.0/33 --bind 127.0.0.1:1 "$NBD_DIR/a.raw"
expect nbd_cli_allow_on_unix 2 "applies to TCP" "$UQ" nbd --allow 10.0.0.0/8 --socket "$S" "$NBD_DIR/a.raw"
expect nbd_cli_bad_max_connections 2 "invalid --max-connections" "$UQ" nbd --max-connections 0 --socket "$S" "$NBD_DIR/a.raw"
expect nbd_cli_bad_handshake_timeout 2 "invalid --handshake-timeout" "$UQ" nbd --handshake-timeout 1s --socket "$S" "$NBD_DIR/a.raw"
# A key others may read: a warning naming the fix (the server still starts).
cp "$PSKDIR/keys.psk" "$NBD_DIR/open.psk"; chmod 644 "$NBD_DIR/open.psk"
t=nbd_tls_key_mode_warning
if start_server warn --tls-psk "$NBD_DIR/open.psk" "$NBD_DIR/a.raw" && stop_server warn &&
   grep -q "open.psk can be read by other users (mode 0644).*chmod 600" "$NBD_DIR/warn.log" &&
   ! grep -q "$(cut -d: -f2 "$NBD_DIR/open.psk")" "$NBD_DIR/warn.log"; then
    ok $t
else
    fail $t "$(cat "$NBD_DIR/warn.log")"
fi
exit 0
