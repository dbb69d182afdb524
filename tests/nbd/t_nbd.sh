#!/bin/bash
# NBD export end to end with real clients (nbdinfo, qemu-io, nbdcopy, fio),
# on a raw and on a qcow2 image.
. "$(dirname "$0")/lib.sh"

SIZE=$((64 << 20))

FORMATS="raw"
if qcow2_available; then
    FORMATS="raw qcow2"
else
    for t in info qemu_io unaligned nbdcopy fio multi_client sigterm; do
        skip "nbd_${t}_qcow2" "qcow2 engine not landed ($(head -c 200 "$NBD_DIR/probe.log" | tr '\n' ' '))"
    done
fi

for fmt in $FORMATS; do
    img="$NBD_DIR/disk.$fmt"
    make_image "$fmt" "$img" "$SIZE"
    if ! start_server "$fmt" "$img"; then
        fail "nbd_start_$fmt" "server did not start: $(cat "$NBD_DIR/$fmt.log")"
        continue
    fi
    uri=$(eval echo "\$URI_$fmt")

    # --- nbdinfo: size, flags, block sizes.
    t="nbd_info_$fmt"
    if json=$(timeout 30 nbdinfo --json "$uri") &&
       [ "$(jq '.exports[0]["export-size"]' <<<"$json")" = "$SIZE" ] &&
       [ "$(jq -c '.exports[0] | [.is_read_only, .can_flush, .can_fua, .can_trim, .can_zero, .can_multi_conn]' <<<"$json")" = "[false,true,true,true,true,true]" ] &&
       [ "$(jq -c '.exports[0] | [.block_size_minimum, .block_size_preferred, .block_size_maximum]' <<<"$json")" = "[512,4096,33554432]" ]; then
        ok "$t"
    else
        fail "$t" "unexpected nbdinfo output: $(tr -d '\n\t' <<<"$json")"
    fi

    # --- qemu-io: aligned pattern writes read back.
    t="nbd_qemu_io_$fmt"
    if out=$(qio "$uri" -c 'write -P 0xa5 0 1M' -c 'write -P 0x5a 1M 64k' -c flush \
                 -c 'read -P 0xa5 0 1M' -c 'read -P 0x5a 1M 64k' -c 'read -P 0 2M 64k' 2>&1) &&
       ! grep -qi -e fail -e error -e mismatch <<<"$out"; then
        ok "$t"
    else
        fail "$t" "$(tr '\n' ' ' <<<"$out")"
    fi

    # --- unaligned writes (qemu-io merges them into 512-byte blocks itself),
    #     plus write-zeroes and discard on the way.
    t="nbd_unaligned_$fmt"
    # Offsets relative to 4M: [0,4097) 0x11, [4097,5097) 0x22, [5097,8192) 0x11.
    if out=$(qio "$uri" -c 'write -P 0x11 4194304 8192' -c 'write -P 0x22 4198401 1000' \
                 -c 'read -P 0x11 4194304 4097' -c 'read -P 0x22 4198401 1000' \
                 -c 'read -P 0x11 4199401 3095' \
                 -c 'write -z 5242880 1M' -c 'read -P 0 5242880 1M' \
                 -c 'write -P 0x33 6291456 64k' -c 'discard 6291456 64k' 2>&1) &&
       ! grep -qi -e fail -e error -e mismatch <<<"$out"; then
        ok "$t"
    else
        fail "$t" "$(tr '\n' ' ' <<<"$out")"
    fi

    # --- nbdcopy a random 64 MiB file in and back out.
    t="nbd_nbdcopy_$fmt"
    head -c "$SIZE" /dev/urandom >"$NBD_DIR/rand.bin"
    if timeout 120 nbdcopy "$NBD_DIR/rand.bin" "$uri" 2>"$NBD_DIR/copy.err" &&
       timeout 120 nbdcopy "$uri" "$NBD_DIR/back.bin" 2>>"$NBD_DIR/copy.err" &&
       cmp -s "$NBD_DIR/rand.bin" "$NBD_DIR/back.bin"; then
        ok "$t"
    else
        fail "$t" "copy failed or data differs: $(head -c 300 "$NBD_DIR/copy.err")"
    fi
    rm -f "$NBD_DIR/back.bin"

    # --- fio through libnbd, verified.
    t="nbd_fio_$fmt"
    if ! fio --enghelp=nbd >/dev/null 2>&1; then
        skip "$t" "fio has no nbd engine"
    elif timeout 300 fio --name=nbd --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k \
            --iodepth=32 --size=64M --verify=crc32c --do_verify=1 --verify_state_save=0 \
            --output="$NBD_DIR/fio.out" >/dev/null 2>&1 &&
         ! grep -qi "verify: bad" "$NBD_DIR/fio.out"; then
        ok "$t"
    else
        fail "$t" "fio failed: $(grep -i -m3 -e err -e bad "$NBD_DIR/fio.out" | tr '\n' ' ')"
    fi

    # --- four concurrent clients on distinct ranges, then verify all.
    t="nbd_multi_client_$fmt"
    pids=""
    for i in 0 1 2 3; do
        qio "$uri" -c "write -P $((0x40 + i)) $((i * 8))M 8M" >"$NBD_DIR/mc$i.out" 2>&1 &
        pids="$pids $!"
    done
    rc=0
    for p in $pids; do wait "$p" || rc=1; done
    verify=()
    for i in 0 1 2 3; do verify+=(-c "read -P $((0x40 + i)) $((i * 8))M 8M"); done
    if [ $rc = 0 ] && out=$(qio "$uri" "${verify[@]}" 2>&1) &&
       ! grep -qi -e fail -e error -e mismatch <<<"$out"; then
        ok "$t"
    else
        fail "$t" "rc=$rc $(cat "$NBD_DIR"/mc*.out | tr '\n' ' ') $(tr '\n' ' ' <<<"$out")"
    fi

    # --- SIGTERM: clean exit, socket and pid file removed, image consistent
    #     and holding the data written last (never explicitly flushed).
    t="nbd_sigterm_$fmt"
    qio "$uri" -c 'write -P 0x77 32M 1M' >/dev/null 2>&1
    if stop_server "$fmt"; then
        msg=""
        if [ "$fmt" = qcow2 ] && ! chk=$(qemu-img check "$img" 2>&1); then
            msg="qemu-img check: $chk"
        fi
        if ! out=$(timeout 60 qemu-io -f "$fmt" -r "$img" -c 'read -P 0x77 32M 1M' -c 'read -P 0x43 24M 8M' 2>&1) ||
           grep -qi -e fail -e error -e mismatch <<<"$out"; then
            msg="$msg data after shutdown: $out"
        fi
        if [ -z "$msg" ]; then ok "$t"; else fail "$t" "$(tr '\n' ' ' <<<"$msg")"; fi
    else
        fail "$t" "server did not exit cleanly: $(cat "$NBD_DIR/$fmt.log")"
    fi
done
