#!/usr/bin/env bash
# Compressed images made by QEMU (qemu-img convert -c) read through our NBD export, QEMU as
# the oracle: zlib and zstd, 512 B to 2 MiB clusters, extended L2, an overlay with a backing
# file; whole-image compare (qemu-img compare over NBD) and reads in 4 KiB and 16 KiB pieces
# (nbdcopy), which go through the cache of decompressed clusters; reads of 512 B to 16 KiB at
# random places in random order (qemu-io, the raw file as the oracle), which inflate only the
# prefix of a cluster they need and then read beyond cached prefixes.  Then a
# write workload over the compressed clusters (rewrites, discards, zeroes) against the same
# workload applied by qemu-io.  Fault injection: a decompression failing on the worker fails
# that read with EIO, the others are served and the server stops cleanly.
# timeout: 300
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"
need_cmd qemu-img qemu-io nbdcopy jq || { skip compressed "qemu-img, qemu-io, nbdcopy or jq is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1

# 6 MiB of mixed data: compressible text, random bytes, zeros.
"$PYTHON" - <<'EOF' || exit 1
import random
r = random.Random(5)
size = 6 << 20
buf = bytearray(size)
off = 0
while off < size:
    n = min(size - off, r.choice([512, 4096, 65536, 300000]))
    k = r.randrange(3)
    if k == 0:
        buf[off:off + n] = r.randbytes(n)
    elif k == 1:
        line = b"line %d of text " % r.randrange(10 ** 6)
        buf[off:off + n] = (line * (n // len(line) + 1))[:n]
    off += n
open("data.raw", "wb").write(buf)
EOF
head -c $((6 << 20)) /dev/urandom >base.raw

# Reads at random places (some in the same clusters, later further in) in one qemu-io run
# over the export and over data.raw: the dumps must match.
"$PYTHON" - <<'EOF' >rand.cmds || exit 1
import random
r = random.Random(11)
for _ in range(300):
    n = r.choice([512, 1536, 4096, 4096, 16384])
    off = r.randrange(0, (6 << 20) - n, r.choice([512, 4096]))
    print(f"-c\nread -v {off} {n}")
EOF
random_reads() {
    local -a args
    mapfile -t args <rand.cmds
    timeout -k 5 120 qemu-io -r -f raw "${args[@]}" "$1" 2>&1 | grep -v ' ops; ' >"$W/rand.out"
    qemu-io -r -f raw "${args[@]}" data.raw 2>&1 | grep -v ' ops; ' >"$W/rand.want"
    cmp -s "$W/rand.out" "$W/rand.want" ||
        fail "random reads differ: $(diff "$W/rand.out" "$W/rand.want" | head -2 | tr '\n' ' ')"
}

# case NAME CONVERT-OPTS...: qemu-img convert -c, then read it through our export.
case_read() {
    local name=$1; shift
    FAIL=
    rm -f "$name.qcow2"
    if ! qemu-img convert -c -O qcow2 "$@" data.raw "$name.qcow2" >&2; then
        notok "compressed_$name" "qemu-img convert failed"
        return
    fi
    if ! start_nbd "$name.qcow2" --read-only; then
        notok "compressed_$name" "server did not start"
        return
    fi
    local uri
    uri=$(nbd_uri)
    if ! timeout -k 5 120 qemu-img compare -f raw -F raw data.raw "$uri" >"$W/cmp.out" 2>&1; then
        fail "qemu-img compare: $(head -1 "$W/cmp.out")"
    fi
    local rs
    for rs in 4096 16384; do
        [[ -n $FAIL ]] && break
        if ! timeout -k 5 120 nbdcopy --request-size=$rs --requests=16 "$uri" - 2>"$W/copy.err" | cmp -s - data.raw; then
            fail "nbdcopy in ${rs}-byte reads differs $(head -1 "$W/copy.err")"
        fi
    done
    stop_nbd || fail "server did not stop cleanly"
    # A fresh server with a small cache (4 clusters kept decompressed): the passes above
    # left every cluster cached whole.
    if [[ -z $FAIL ]] && start_nbd "$name.qcow2" --read-only --cache-size 256k; then
        random_reads "$(nbd_uri)"
        stop_nbd || fail "server did not stop cleanly"
    elif [[ -z $FAIL ]]; then
        fail "server did not start again"
    fi
    if [[ -z $FAIL ]]; then ok "compressed_$name"; else notok "compressed_$name" "$FAIL"; fi
}

case_read zlib_64k
case_read zstd_64k -o compression_type=zstd
case_read zlib_512 -o cluster_size=512
case_read zstd_4k -o cluster_size=4k,compression_type=zstd
case_read zlib_2m -o cluster_size=2M
case_read zstd_2m -o cluster_size=2M,compression_type=zstd
case_read extl2_zlib -o extended_l2=on,cluster_size=64k
case_read extl2_zstd_32k -o extended_l2=on,cluster_size=32k,compression_type=zstd

# An overlay whose clusters are compressed (what differs from the backing file).
FAIL=
qemu-img convert -f raw -O qcow2 base.raw base.qcow2 >&2
qemu-img convert -c -O qcow2 -B base.qcow2 -F qcow2 data.raw overlay.qcow2 >&2
if start_nbd overlay.qcow2 --read-only; then
    timeout -k 5 120 qemu-img compare -f raw -F raw data.raw "$(nbd_uri)" >"$W/cmp.out" 2>&1 ||
        fail "qemu-img compare: $(head -1 "$W/cmp.out")"
    timeout -k 5 120 nbdcopy --request-size=4096 "$(nbd_uri)" - | cmp -s - data.raw || fail "4k reads differ"
    stop_nbd || fail "server did not stop cleanly"
else
    fail "server did not start"
fi
if [[ -z $FAIL ]]; then ok compressed_backing; else notok compressed_backing "$FAIL"; fi

# Writes over compressed clusters (rewrites let them go, discards free them; freed host
# clusters are reused): the same seeded workload applied by qemu-io to a reference copy.
case_workload() {
    local dir=$1 seed=$2 ct=$3
    qemu-img convert -c -O qcow2 -o compression_type="$ct" data.raw "$dir/ref.qcow2" >&2 ||
        { fail "qemu-img convert failed"; return; }
    cp "$dir/ref.qcow2" "$dir/ours.qcow2"
    apply_workload "$dir" qcow2 "$seed"
}
for ct in zlib zstd; do
    run_case "compressed_workload_$ct" case_workload "$ct"
done

# Fault injection: decompressing guest cluster 1 MiB fails on the worker.
FAIL=
rm -f fault.qcow2
head -c $((2 << 20)) data.raw >small.raw
"$PYTHON" -c "
import sys
b = bytearray(open('small.raw','rb').read())
for i in range(0, len(b), 65536):       # every cluster compressible
    b[i:i + 4096] = b'x' * 4096
open('small.raw','wb').write(b)"
qemu-img convert -c -O qcow2 small.raw fault.qcow2 >&2
if UBLK_QCOW2_FAULT_DECOMPRESS=0x100000 start_nbd fault.qcow2 --read-only; then
    uri=$(nbd_uri)
    if timeout -k 5 60 qemu-io -r -f raw -c 'read 1M 4k' "$uri" >"$W/qio.out" 2>&1 &&
        ! grep -q 'error' "$W/qio.out"; then
        fail "the read of the failing cluster succeeded"
    fi
    grep -qi 'Input/output error' "$W/qio.out" || fail "no EIO: $(head -1 "$W/qio.out")"
    # Everything else reads (also the clusters next to it, and the same cluster again fails).
    for r in 'read 0 1M' 'read 1088k 960k' 'read 960k 64k'; do
        timeout -k 5 60 qemu-io -r -f raw -c "$r" "$uri" >"$W/qio2.out" 2>&1 && ! grep -q error "$W/qio2.out" ||
            fail "$r failed: $(head -1 "$W/qio2.out")"
    done
    timeout -k 5 60 qemu-io -r -f raw -c 'read 1M 64k' "$uri" >"$W/qio3.out" 2>&1
    grep -qi 'Input/output error' "$W/qio3.out" || fail "a second read of the failing cluster did not fail"
    stop_nbd || fail "server did not stop cleanly after the fault"
    grep -q 'does not decompress' "$NBD_LOG" || fail "the failure was not logged"
else
    fail "server did not start"
fi
if [[ -z $FAIL ]]; then ok compressed_fault_injection; else notok compressed_fault_injection "$FAIL"; fi

exit $LIB_FAILED
