#!/bin/bash
# Malformed and hostile NBD clients (tests/nbd/hostile.py): the server must
# answer or drop the offending connection, keep serving everyone else, and
# still shut down cleanly.
. "$(dirname "$0")/lib.sh"

SIZE=$((16 << 20))
FORMATS="raw"
qcow2_available && FORMATS="raw qcow2" || skip nbd_hostile_qcow2 "qcow2 engine not landed"

for fmt in $FORMATS; do
    img="$NBD_DIR/h.$fmt"
    make_image "$fmt" "$img" "$SIZE"
    # The read-only export serves its own copy: the writable server's image
    # lock refuses readers that need it unchanged, as qemu-nbd's does.
    cp "$img" "$img.ro"
    if ! start_server "rw$fmt" "$img" || ! start_server "ro$fmt" --read-only "$img.ro"; then
        fail "nbd_hostile_start_$fmt" "$(cat "$NBD_DIR"/r?$fmt.log)"
        continue
    fi
    timeout 300 python3 "$NBD_TESTS_DIR/hostile.py" "$fmt" \
        "$NBD_DIR/rw$fmt.sock" "$NBD_DIR/ro$fmt.sock" "$SIZE"

    t="nbd_hostile_survivor_$fmt"
    if alive "rw$fmt" && out=$(qio "$(eval echo "\$URI_rw$fmt")" -c 'write -P 0x5c 0 64k' -c 'read -P 0x5c 0 64k' 2>&1) &&
       ! grep -qi -e fail -e error <<<"$out" && grep -q "bad request magic" "$NBD_DIR/rw$fmt.log"; then
        ok "$t"
    else
        fail "$t" "server unusable after hostile clients: $(tr '\n' ' ' <<<"$out") log: $(tail -3 "$NBD_DIR/rw$fmt.log")"
    fi

    # qemu-io opening the read-only export read-write must fail cleanly; reads
    # work.
    t="nbd_read_only_qemu_io_$fmt"
    out=$(qio "$(eval echo "\$URI_ro$fmt")" -c 'write -P 1 0 4k' 2>&1); rc=$?
    if [ $rc -ne 0 ] && grep -qi "read-only\|read only\|permission" <<<"$out" &&
       qio "$(eval echo "\$URI_ro$fmt")" -r -c 'read 0 64k' >/dev/null 2>&1; then
        ok "$t"
    else
        fail "$t" "rc=$rc: $(tr '\n' ' ' <<<"$out")"
    fi

    t="nbd_hostile_shutdown_$fmt"
    if stop_server "rw$fmt" && stop_server "ro$fmt"; then
        if [ "$fmt" = qcow2 ] && ! chk=$(qemu-img check "$img" 2>&1); then
            fail "$t" "qemu-img check: $(tr '\n' ' ' <<<"$chk")"
        else
            ok "$t"
        fi
    else
        fail "$t" "server did not exit cleanly"
    fi
done

# The same scenarios inside TLS (x509, TLS required): every connection does
# STARTTLS right after the greeting.
if ! command -v certtool >/dev/null; then
    skip nbd_hostile_tls "certtool missing (gnutls-bin)"
    exit 0
fi
make_pki "$NBD_DIR/pki" || { fail nbd_hostile_tls_pki "$(tail -3 "$NBD_DIR/pki.log")"; exit 0; }
fmt=${FORMATS##* }
img="$NBD_DIR/tls.$fmt"
make_image "$fmt" "$img" "$SIZE"
cp "$img" "$img.ro"
if start_server tlsrw --tls-certificates "$NBD_DIR/pki" "$img" &&
   start_server tlsro --tls-certificates "$NBD_DIR/pki" --read-only "$img.ro"; then
    HOSTILE_TLS_CA="$NBD_DIR/pki/ca-cert.pem" timeout 300 python3 "$NBD_TESTS_DIR/hostile.py" "tls_$fmt" \
        "$NBD_DIR/tlsrw.sock" "$NBD_DIR/tlsro.sock" "$SIZE"
    t="nbd_hostile_shutdown_tls_$fmt"
    if stop_server tlsrw && stop_server tlsro; then
        if [ "$fmt" = qcow2 ] && ! chk=$(qemu-img check "$img" 2>&1); then
            fail "$t" "qemu-img check: $(tr '\n' ' ' <<<"$chk")"
        else
            ok "$t"
        fi
    else
        fail "$t" "server did not exit cleanly: $(tail -5 "$NBD_DIR/tlsrw.log")"
    fi
else
    fail "nbd_hostile_start_tls_$fmt" "$(cat "$NBD_DIR"/tlsr?.log)"
fi
