#!/usr/bin/env bash
# ublk-qcow2 convert against qemu-img (the oracle): every source kind (raw; qcow2; a backing
# chain; an internal snapshot with -l) to both targets (raw, qcow2), compressed (-c: zlib and
# zstd, 512 B and 2 MiB clusters, extended L2), with a backing file (-B: only what differs is
# written), into an existing image (-n), in parallel out of order (-m/-W), without sparse
# detection (-S 0).  Each result: `qemu-img compare` identical to the source, `qemu-img check`
# clean; compressed output within 5% of `qemu-img convert -c`'s size.  Refusals: the source
# itself, a file of its chain, a served image, an existing file of another format, -c to raw.
# timeout: 300
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"
need_cmd qemu-img qemu-io || { skip convert "qemu-img or qemu-io is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1

# The source data: incompressible, compressible and zero stretches, 8 MiB + 512 bytes (a
# partial last cluster).
"$PYTHON" - <<'EOF' || exit 1
import random
r = random.Random(17)
size = (8 << 20) + 512
buf = bytearray(size)
off = 0
while off < size:
    n = min(size - off, r.choice([4096, 65536, 200000, 1 << 20]))
    kind = r.randrange(3)
    if kind == 0:
        buf[off:off + n] = r.randbytes(n)
    elif kind == 1:
        line = b"compressible %d " % r.randrange(1000)
        buf[off:off + n] = (line * (n // len(line) + 1))[:n]
    off += n
open("src.raw", "wb").write(buf)
EOF
qemu-img convert -f raw -O qcow2 src.raw src.qcow2 || exit 1
# A chain: base (half of the data) + top (the rest written over it by qemu-io).
qemu-img convert -f raw -O qcow2 -o cluster_size=4k src.raw base.qcow2 || exit 1
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2 || exit 1
qemu-io -c 'write -P 7 1M 300k' -c 'write -z 3M 64k' -c 'write -P 9 7M 4k' top.qcow2 >/dev/null || exit 1
qemu-img convert -O raw top.qcow2 top.raw || exit 1
# A snapshot, then changes after it.
cp src.qcow2 snap.qcow2
qemu-img snapshot -c s1 snap.qcow2 || exit 1
qemu-io -c 'write -P 3 0 2M' -c 'discard 4M 1M' snap.qcow2 >/dev/null || exit 1
qemu-img convert -O raw -l snapshot.name=s1 snap.qcow2 snap-s1.raw || exit 1

# judge NAME OUT OUTFMT REF REFFMT: compare with the reference and (qcow2) check it.
judge() {
    local name=$1 out=$2 ofmt=$3 ref=$4 rfmt=$5
    if ! qimg_compare "$ref" "$out" "$rfmt" "$ofmt"; then
        fail "qemu-img compare: $(head -1 "$UQ_TMP/compare.out")"
    elif [[ $ofmt == qcow2 ]] && ! qimg_check "$out"; then
        fail "qemu-img check: $(grep -m1 -iE 'error|leak' "$UQ_TMP/check.out")"
    fi
    result "convert_$name"
}

# conv NAME OUTFMT REF REFFMT ARGS...: our convert ARGS then judge.
conv() {
    local name=$1 ofmt=$2 ref=$3 rfmt=$4; shift 4
    local out=${@: -1}
    if ! bounded 120 "$UQ" convert "$@"; then
        fail "convert $* failed"
        result "convert_$name"
        return
    fi
    judge "$name" "$out" "$ofmt" "$ref" "$rfmt"
}

conv raw_to_raw raw src.raw raw -f raw -O raw src.raw o1.raw
conv raw_to_qcow2 qcow2 src.raw raw -O qcow2 src.raw o2.qcow2
conv qcow2_to_raw raw src.raw raw -O raw src.qcow2 o3.raw
conv chain_to_qcow2 qcow2 top.raw raw -O qcow2 top.qcow2 o4.qcow2
conv chain_to_raw raw top.raw raw top.qcow2 o5.raw
conv snapshot_to_qcow2 qcow2 snap-s1.raw raw -l s1 -O qcow2 snap.qcow2 o6.qcow2
conv snapshot_id_to_raw raw snap-s1.raw raw -l snapshot.id=1 -O raw snap.qcow2 o7.raw
conv unordered_m2 qcow2 src.raw raw -m 2 -W -O qcow2 -o cluster_size=16k src.raw o8.qcow2
conv no_sparse raw src.raw raw -S 0 -O raw src.qcow2 o9.raw
# -S 0 really allocates: the raw output is not sparse.
if [[ $(du -k o9.raw | cut -f1) -lt $(( (8 << 10) - 64 )) ]]; then
    notok convert_no_sparse_allocated "$(du -k o9.raw | cut -f1) KiB allocated"
else
    ok convert_no_sparse_allocated
fi

# Compressed: the same data as qemu-img convert -c, about the same size.
compressed() {
    local name=$1 src=$2 ref=$3 rfmt=$4 opts=$5
    local o=()
    [[ -n $opts ]] && o=(-o "$opts")
    rm -f "c-$name.qcow2" "q-$name.qcow2"
    if ! bounded 120 "$UQ" convert -c -O qcow2 "${o[@]}" "$src" "c-$name.qcow2"; then
        fail "convert -c failed"
    elif ! bounded 120 qemu-img convert -c -O qcow2 "${o[@]}" "$src" "q-$name.qcow2"; then
        fail "qemu-img convert -c failed"
    else
        local ours theirs
        ours=$(stat -c %s "c-$name.qcow2")
        theirs=$(stat -c %s "q-$name.qcow2")
        if (( ours * 100 > theirs * 105 )); then
            fail "$ours bytes, qemu-img's $theirs (> 5% more)"
        fi
        # Compressed clusters there (qemu-img check counts them).
        qemu-img check "c-$name.qcow2" >"$UQ_TMP/cc.out" 2>&1
        grep -q ' compressed clusters' "$UQ_TMP/cc.out" && ! grep -qE '(^| )0\.00% compressed' "$UQ_TMP/cc.out" ||
            fail "no compressed clusters: $(tail -2 "$UQ_TMP/cc.out" | head -1)"
    fi
    if [[ -n $FAIL ]]; then result "convert_c_$name"; return; fi
    judge "c_$name" "c-$name.qcow2" qcow2 "$ref" "$rfmt"
}
compressed zlib src.raw src.raw raw ""
compressed zstd src.qcow2 src.raw raw "compression_type=zstd"
compressed zlib_512 src.raw src.raw raw "cluster_size=512"
compressed zstd_2m src.raw src.raw raw "cluster_size=2M,compression_type=zstd"
compressed extl2 top.qcow2 top.raw raw "extended_l2=on,cluster_size=64k"
compressed v2 src.raw src.raw raw "compat=0.10"

# -B: the target names the backing file and holds only what differs from it.
rm -f b1.qcow2 qb1.qcow2
if ! bounded 120 "$UQ" convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 b1.qcow2; then
    fail "convert -B failed"
elif [[ $(qemu-img info --output=json b1.qcow2 | jq -r '."backing-filename"') != base.qcow2 ]]; then
    fail "no backing file recorded"
else
    qemu-img convert -O qcow2 -B base.qcow2 -F qcow2 top.qcow2 qb1.qcow2
    ours=$(qemu-img map --output=json b1.qcow2 | jq '[.[] | select(.depth == 0 and .data) | .length] | add // 0')
    theirs=$(qemu-img map --output=json qb1.qcow2 | jq '[.[] | select(.depth == 0 and .data) | .length] | add // 0')
    (( ours <= theirs * 105 / 100 + 65536 )) || fail "$ours bytes of data in the overlay, qemu-img's $theirs"
fi
if [[ -n $FAIL ]]; then result convert_backing; else judge backing b1.qcow2 qcow2 top.raw raw; fi
rm -f b2.qcow2
conv backing_compressed qcow2 top.raw raw -c -O qcow2 -B base.qcow2 top.qcow2 b2.qcow2

# -n: into an existing image with other content (qcow2 and raw).
qemu-img create -q -f qcow2 n1.qcow2 8389120 && qemu-io -c 'write -P 5 0 8389120' n1.qcow2 >/dev/null
conv existing_qcow2 qcow2 src.raw raw -n -O qcow2 src.qcow2 n1.qcow2
qemu-img create -q -f qcow2 n2.qcow2 8389120 && qemu-io -c 'write -P 5 0 8389120' n2.qcow2 >/dev/null
conv existing_qcow2_compressed qcow2 src.raw raw -n -c -O qcow2 src.raw n2.qcow2
head -c $(( (8 << 20) + 512 )) /dev/urandom >n3.raw
conv existing_raw raw src.raw raw -n -O raw src.qcow2 n3.raw

# Refusals: nothing is written.
refused() {
    local name=$1 victim=$2; shift 2
    local before
    before=$(md5sum <"$victim")
    if bounded 60 "$UQ" convert "$@"; then
        fail "convert $* succeeded"
    elif [[ $(md5sum <"$victim") != "$before" ]]; then
        fail "$victim changed"
    fi
    result "convert_refuses_$name"
}
refused own_source src.qcow2 -O qcow2 src.qcow2 src.qcow2
refused own_source_other_name src.qcow2 -O qcow2 src.qcow2 ./../"$(basename "$W")"/src.qcow2
refused chain_member base.qcow2 -O qcow2 top.qcow2 base.qcow2
refused other_format_qcow2 src.qcow2 -O raw src.raw src.qcow2
refused other_format_raw n3.raw -O qcow2 src.raw n3.raw
refused n_without_format src.qcow2 -n src.raw src.qcow2
refused compress_raw n3.raw -c -O raw src.raw n3.raw
cp src.qcow2 served.qcow2
if start_nbd served.qcow2; then
    refused served served.qcow2 -O qcow2 src.raw served.qcow2
    refused served_n served.qcow2 -n -O qcow2 src.raw served.qcow2
    stop_nbd || notok convert_served_stop "the server did not stop cleanly"
else
    notok convert_refuses_served "could not start the NBD server"
fi

exit $LIB_FAILED
