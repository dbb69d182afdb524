#!/usr/bin/env bash
# Interop: LUKS-encrypted qcow2 (qemu-img create -o encrypt.format=luks with --object secret).
# The same seeded workload through our NBD export (passphrase from --key-file or --key-env) and
# through qemu-io on a reference copy must give images QEMU reads identically (qemu-img compare
# with the secrets) and `qemu-img check` must pass: what we write QEMU decrypts, what QEMU
# wrote we decrypt, COW of partial clusters re-encrypts at the new host offset (also from an
# encrypted backing file, and into an external data file).  An image with qemu-img's default
# LUKS parameters (millions of PBKDF2 iterations) opens and QEMU reads our writes.  A wrong or
# missing passphrase and ciphers we do not implement are refused with a clear message.
# timeout: 600
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

PASS=correct-horse-battery
SECRET=(--object "secret,id=sec0,data=$PASS")
export UQ_LUKS_PASS=$PASS     # for --key-env
printf %s "$PASS" >"$UQ_TMP/key"

# img_opts IMAGE: QEMU's --image-opts string for an encrypted image.
# With LUKS_BACKING set, the image's backing file is encrypted with the same secret.
img_opts() { echo "driver=qcow2,file.filename=$1,encrypt.key-secret=sec0${LUKS_BACKING:+,backing.encrypt.key-secret=sec0}"; }

# luks_create PATH SIZE [OPTS]: a LUKS image (iter-time 10 ms: opening stays cheap), prefilled.
luks_create() {
    local path=$1 size=$2 opts=${3:-}
    "$LIB_DIR/qemu-img-luks" create -q -f qcow2 "${SECRET[@]}" \
        -o "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10${opts:+,$opts}" "$path" "$size" \
        >&2 || return 1
    local args=() c
    for c in "${PREFILL[@]}"; do args+=(-c "$c"); done
    qemu-io "${SECRET[@]}" --image-opts "$(img_opts "$path")" "${args[@]}" >/dev/null
}

# case_luks DIR SEED OPTS KEYSRC [server options...]: workload on ref (qemu-io) and ours (NBD).
case_luks() {
    local dir=$1 seed=$2 opts=$3 keysrc=$4; shift 4
    local ref=$dir/ref.qcow2 ours=$dir/ours.qcow2
    if [[ -n ${LUKS_BACKING:-} ]]; then
        # An encrypted overlay (its own master key) over an encrypted, prefilled base: COW
        # decrypts the base's data and encrypts it again for the overlay.
        LUKS_BACKING= luks_create "$dir/base.qcow2" 16M "$opts" || { fail "could not make the base"; return; }
        "$LIB_DIR/qemu-img-luks" create -q -f qcow2 -u -b base.qcow2 -F qcow2 "${SECRET[@]}" \
            -o "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10${opts:+,$opts}" "$ours" 16M \
            >&2 || { fail "could not make the overlay"; return; }
        cp "$ours" "$ref"
    elif [[ -n ${LUKS_DATAFILE:-} ]]; then
        # Each with its own data file (absolute names: QEMU 7.2 would resolve relative ones
        # against its working directory), and its own master key.
        luks_create "$ours" 16M "data_file=$dir/ours.data${opts:+,$opts}" &&
            luks_create "$ref" 16M "data_file=$dir/ref.data${opts:+,$opts}" || { fail "could not make the images"; return; }
    else
        luks_create "$ours" 16M "$opts" || { fail "could not make the image"; return; }
        cp --sparse=always "$ours" "$ref"
    fi
    "$PYTHON" "$WORKLOAD" "$seed" 16777216 "$(img_csize "$ours")" --zero-unmap --ops 120 >"$dir/workload.txt" ||
        { fail "workload generator failed"; return; }
    local args=() c
    mapfile -t cmds <"$dir/workload.txt"
    for c in "${cmds[@]}"; do args+=(-c "$c"); done
    timeout -k 5 300 qemu-io "${SECRET[@]}" --image-opts "$(img_opts "$ref")" "${args[@]}" >"$dir/ref.out" 2>&1 ||
        { fail "qemu-io on the reference failed (harness)"; return; }
    local key=(--key-file "$UQ_TMP/key")
    [[ $keysrc == env ]] && key=(--key-env UQ_LUKS_PASS)
    start_nbd "$ours" "${key[@]}" "$@" || { fail "server did not start"; return; }
    qio raw "$(nbd_uri)" "$dir/workload.txt" || fail "qemu-io through NBD failed"
    stop_nbd || fail "server exit $? after SIGTERM"
    [[ -n $FAIL ]] && return
    local rc=0
    timeout -k 5 120 qemu-img check "${SECRET[@]}" --image-opts "$(img_opts "$ours")" >"$dir/check.out" 2>&1 || rc=$?
    [[ $rc -eq 0 ]] || { sed 's/^/#   /' "$dir/check.out" >&2; fail "qemu-img check exit $rc"; return; }
    timeout -k 5 300 qemu-img compare "${SECRET[@]}" --image-opts "$(img_opts "$ours")" "$(img_opts "$ref")" \
        >"$dir/compare.out" 2>&1 || { sed 's/^/#   /' "$dir/compare.out" >&2; fail "qemu-img compare: content differs"; }
    # The data is really encrypted: a pattern QEMU wrote in plain text is nowhere in the file.
    if LC_ALL=C grep -q -a "$(printf '\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5\xa5')" \
        "$ours" ${LUKS_DATAFILE:+"$dir/ours.data"}; then
        fail "plain text found in the image"
    fi
}

run_case "luks aes-256-xts, key from a file" case_luks "" file
run_case "luks aes-128-xts, extended_l2 cluster_size=32k, key from the environment, --discard-no-unref" \
    case_luks "encrypt.cipher-alg=aes-128,extended_l2=on,cluster_size=32768" env --discard-no-unref
# Host offset == guest offset there: the IVs follow the data file offsets.
case_luks_datafile() { LUKS_DATAFILE=1 case_luks "$@"; }
run_case "luks with an external data file, cluster_size=4k" case_luks_datafile "cluster_size=4096" file
case_luks_backing() { LUKS_BACKING=1 case_luks "$@"; }
run_case "luks overlay over a luks backing file (COW re-encrypts)" case_luks_backing "" file

# --- qemu-img's default parameters (aes-256-xts-plain64, sha256, PBKDF2 iterations timed to
# 2 s, millions): every open costs seconds of PBKDF2 here as in QEMU, so three opens only:
# qemu-img creates, we write through NBD and read QEMU's view of a fresh image (zeros), QEMU
# reads our writes back.
luks_defaults() {
    local img=$UQ_TMP/defaults.qcow2 label="interop/luks with qemu-img's default parameters"
    timeout -k 5 300 "$LIB_DIR/qemu-img-luks" create -q -f qcow2 "${SECRET[@]}" \
        -o encrypt.format=luks,encrypt.key-secret=sec0 "$img" 16M >&2 ||
        { notok "$label" "qemu-img create failed"; return; }
    NBD_START_TIMEOUT=180 start_nbd "$img" --key-file "$UQ_TMP/key" || { notok "$label" "server did not start"; return; }
    qio_cmds raw "$(nbd_uri)" -- "read -P 0 0 1M" "write -P 0x5b 0 64k" "write -P 0x6c 1M 8k" "write -P 0x7d 8M 4M" ||
        notok "$label" "qemu-io through NBD failed"
    stop_nbd || notok "$label" "server exit $? after SIGTERM"
    timeout -k 5 180 qemu-io "${SECRET[@]}" --image-opts "$(img_opts "$img")" -c "read -P 0x5b 0 64k" \
        -c "read -P 0 64k 960k" -c "read -P 0x6c 1M 8k" -c "read -P 0x7d 8M 4M" -c "read -P 0 12M 4M" \
        >"$UQ_TMP/defaults.out" 2>&1 && ! grep -q -i -E "mismatch|fail" "$UQ_TMP/defaults.out" ||
        { sed 's/^/#   /' "$UQ_TMP/defaults.out" >&2; notok "$label" "qemu-io does not read our writes back"; return; }
    ok "$label"
}
luks_defaults

# --- refusals -----------------------------------------------------------------------------------
D=$UQ_TMP/lk
mkdir -p "$D"
luks_create "$D/disk.qcow2" 16M || { notok "luks/setup" "qemu-img could not make the image"; exit 1; }

refused() { refused_start luks "$@"; }
printf %s wrong-passphrase >"$UQ_TMP/badkey"
printf '%s\n' "$PASS" >"$UQ_TMP/nlkey"
refused "wrong passphrase" "wrong passphrase" "$D/disk.qcow2" --key-file "$UQ_TMP/badkey"
refused "a key file with a trailing newline is another passphrase" "wrong passphrase" \
    "$D/disk.qcow2" --key-file "$UQ_TMP/nlkey"
refused "no passphrase given" "encrypted.*--key-file" "$D/disk.qcow2"
refused "unset --key-env" "not set" "$D/disk.qcow2" --key-env UQ_NO_SUCH_VARIABLE
if "$LIB_DIR/qemu-img-luks" create -q -f qcow2 "${SECRET[@]}" -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv "$D/cbc.qcow2" 16M >&2; then
    refused "aes-cbc-essiv (not implemented)" "cbc-essiv.*not supported" "$D/cbc.qcow2" --key-file "$UQ_TMP/key"
else
    skip "luks/refused: aes-cbc-essiv (not implemented)" "qemu-img could not make the image"
fi
# The bytes of the LUKS header are checked before use.
cp "$D/disk.qcow2" "$D/badhdr.qcow2"
"$PYTHON" - "$D/badhdr.qcow2" <<'EOF'
# Key slot 0's stripes -> 2^31 (its key material would run far past the header).
import struct, sys
from qhdr import luks_header_offset
with open(sys.argv[1], "r+b") as f:
    luks = luks_header_offset(f.read(4096))
    f.seek(luks + 208 + 44); f.write(struct.pack(">I", 1 << 31))
EOF
refused "hostile LUKS key slot" "key slot 0.*outside" "$D/badhdr.qcow2" --key-file "$UQ_TMP/key"
# An L2 entry naming the LUKS header as guest data: the write is refused (EIO, naming it) and
# the header stays byte for byte intact.
cp "$D/disk.qcow2" "$D/overlap.qcow2"
luks_at=$("$PYTHON" - "$D/overlap.qcow2" <<'EOF'
# Guest cluster 0's L2 entry -> the LUKS header's offset (COPIED); prints that offset.
import struct, sys
from qhdr import luks_header_offset
with open(sys.argv[1], "r+b") as f:
    h = f.read(4096)
    l1_off = struct.unpack(">Q", h[40:48])[0]
    luks = luks_header_offset(h)
    f.seek(l1_off); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2); f.write(struct.pack(">Q", (1 << 63) | luks))
    print(luks)
EOF
)
luks_sum() { dd if="$D/overlap.qcow2" bs=4096 skip=$((luks_at / 4096)) count=64 status=none | sha256sum; }
before=$(luks_sum)
if start_nbd "$D/overlap.qcow2" --key-file "$UQ_TMP/key"; then
    qio_cmds raw "$(nbd_uri)" -- "write -P 0x11 0 4k" >/dev/null 2>&1
    stop_nbd
    if ! grep -q "overlaps the LUKS encryption header" "$NBD_LOG"; then
        notok "luks/overlap: guest write onto the LUKS header" "not refused by name: $(head -c 300 "$NBD_LOG")"
    elif [[ $(luks_sum) != "$before" ]]; then
        notok "luks/overlap: guest write onto the LUKS header" "the LUKS header changed"
    else
        ok "luks/overlap: guest write onto the LUKS header refused, header intact"
    fi
else
    notok "luks/overlap: guest write onto the LUKS header" "server did not start"
fi
san_clean "$NBD_LOG" || notok "luks/sanitizers" "sanitizer report"

# --- command line: every command that opens an image takes the key options -----------------------
cli() {   # cli NAME RC REGEX CMD...
    local name="luks/cli: $1" want=$2 regex=$3; shift 3
    timeout 60 "$@" >"$UQ_TMP/cli.out" 2>&1
    local rc=$?
    if [[ $rc -ne $want ]]; then
        notok "$name" "exit $rc, want $want: $(head -c 200 "$UQ_TMP/cli.out")"
    elif ! grep -q -E -- "$regex" "$UQ_TMP/cli.out"; then
        notok "$name" "output lacks /$regex/: $(head -c 200 "$UQ_TMP/cli.out")"
    else
        ok "$name"
    fi
}
cli "nbd --help" 0 "--key-file FILE" "$UQ" nbd --help
cli "add --help" 0 "--key-env VAR" "$UQ" add --help
cli "recover --help" 0 "--key-file FILE" "$UQ" recover --help
cli "add --key-env unset" 2 "UQ_NO_SUCH_VARIABLE.*not set" "$UQ" add --key-env UQ_NO_SUCH_VARIABLE "$D/disk.qcow2"
cli "nbd --key-file missing" 2 "cannot read --key-file" "$UQ" nbd --socket "$UQ_TMP/x.sock" \
    --key-file "$UQ_TMP/no-such-file" "$D/disk.qcow2"
: >"$UQ_TMP/empty"
cli "recover --key-file empty" 2 "is empty" "$UQ" recover -n 0 --key-file "$UQ_TMP/empty"
