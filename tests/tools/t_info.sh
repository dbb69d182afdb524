#!/usr/bin/env bash
# ublk-qcow2 info against qemu-img info (the oracle): for images with every kind of option,
# snapshots, persistent bitmaps, a three-image backing chain with relative names (looked at
# from another directory), a dirty and a corrupt-marked image, and raw images, the JSON
# (parsed with python) equals qemu-img info --output=json field by field, with and without
# --backing-chain, and the human output is the same text.  A missing backing file, locks and
# bad arguments behave as with qemu-img.
# timeout: 300
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"
need_cmd qemu-img qemu-io jq || { skip info "qemu-img, qemu-io or jq is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1
export TZ=UTC   # both print snapshot dates in local time

# same_info NAME ARGS... -- IMAGE: our info (JSON and text) equals qemu-img's for IMAGE.
same_info() {
    local name=$1; shift
    local args=() why=
    while [[ $1 != -- ]]; do args+=("$1"); shift; done
    shift
    if ! "$UQ" info --json "${args[@]}" "$@" >ours.json 2>ours.err; then
        why="info --json failed: $(head -1 ours.err)"
    elif ! qemu-img info --output=json "${args[@]}" "$@" >theirs.json 2>&1; then
        why="qemu-img info failed: $(head -1 theirs.json)"
    elif ! $CMP json ours.json theirs.json >diff.txt; then
        why="JSON differs: $(head -3 diff.txt | tr '\n' ' ')"
    elif ! "$UQ" info "${args[@]}" "$@" >ours.txt 2>&1 || ! qemu-img info "${args[@]}" "$@" >theirs.txt 2>&1; then
        why="text output failed"
    elif ! diff ours.txt theirs.txt >diff.txt; then
        why="text differs: $(head -4 diff.txt | tr '\n' ' ')"
    fi
    if [[ -z $why ]]; then ok "info_$name"; else notok "info_$name" "$why"; fi
}

# info_case NAME CREATE-OPTS [QEMU-IO-CMD...]: an image made and written by QEMU.
info_case() {
    local name=$1 opts=$2; shift 2
    local o=() c
    [[ -n $opts ]] && o=(-o "$opts")
    rm -f "$name.qcow2"
    qemu-img create -q -f qcow2 "${o[@]}" "$name.qcow2" 64M
    local cmds=()
    for c in "$@"; do cmds+=(-c "$c"); done
    [[ ${#cmds[@]} -eq 0 ]] || qemu-io "${cmds[@]}" "$name.qcow2" >/dev/null
    same_info "$name" -- "$name.qcow2"
}

info_case empty ""
info_case data "" "write -P 1 0 3M" "write -c 8M 1M"
info_case v2 "compat=0.10" "write 0 1M"
info_case v3_options "lazy_refcounts=on,compression_type=zstd,refcount_bits=64" "write -c 0 1M"
info_case extended_l2 "extended_l2=on,cluster_size=128k" "write 0 4k"
info_case cluster_512_refcount_1 "cluster_size=512,refcount_bits=1" "write 0 64k"
info_case prealloc_metadata "preallocation=metadata"

# Snapshots (with a vm-state size and clock, as a VM's savevm would leave them: written with
# qemu-img, then a second one) and persistent bitmaps.
qemu-img create -q -f qcow2 snaps.qcow2 64M
qemu-io -c 'write -P 1 0 1M' snaps.qcow2 >/dev/null
qemu-img snapshot -c first snaps.qcow2
qemu-io -c 'write -P 2 0 1M' snaps.qcow2 >/dev/null
qemu-img snapshot -c 'second one' snaps.qcow2
same_info snapshots -- snaps.qcow2
qemu-img create -q -f qcow2 bitmaps.qcow2 64M
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-img bitmap --add -g 128k --disable bitmaps.qcow2 "other bitmap"
same_info bitmaps -- bitmaps.qcow2
qemu-img create -q -f qcow2 -o compat=0.10 snaps_v2.qcow2 16M
qemu-img snapshot -c s snaps_v2.qcow2
same_info snapshots_v2 -- snaps_v2.qcow2

# A chain: top (qcow2) -> mid (qcow2 v2, another directory) -> base (raw), relative names.
mkdir -p chain/lower elsewhere
qemu-img create -q -f raw chain/lower/base.raw 32M
qemu-img create -q -f qcow2 -o compat=0.10 -b base.raw -F raw chain/lower/mid.qcow2
qemu-img create -q -f qcow2 -b lower/mid.qcow2 -F qcow2 chain/top.qcow2
qemu-io -c 'write 0 64k' chain/top.qcow2 >/dev/null
same_info chain_top -- chain/top.qcow2
same_info chain_backing_chain --backing-chain -- chain/top.qcow2
(cd elsewhere && same_info chain_from_elsewhere --backing-chain -- ../chain/top.qcow2)
same_info chain_absolute --backing-chain -- "$W/chain/top.qcow2"
# Without a format in the image, the backing file's format is probed.
qemu-img create -q -f qcow2 noformat_base.qcow2 16M
qemu-img create -q -f qcow2 -b noformat_base.qcow2 -F qcow2 noformat.qcow2
$PYTHON - noformat.qcow2 <<'EOF'
import struct, sys
# Drop the backing format extension (QEMU images from before backing formats had none).
d = bytearray(open(sys.argv[1], "rb").read())
pos = struct.unpack_from(">I", d, 100)[0]
assert struct.unpack_from(">I", d, pos)[0] == 0xE2792ACA
ln = struct.unpack_from(">I", d, pos + 4)[0]
skip = 8 + ((ln + 7) & ~7)
d[pos:4096] = d[pos + skip:4096] + bytes(skip)
struct.pack_into(">Q", d, 8, struct.unpack_from(">Q", d, 8)[0] - skip)
open(sys.argv[1], "wb").write(d)
EOF
same_info backing_format_probed --backing-chain -- noformat.qcow2

# Raw, probed and named.
qemu-img create -q -f raw plain.raw 10M
same_info raw -- plain.raw
same_info raw_named -f raw -- plain.raw
same_info qcow2_as_raw -f raw -- data.qcow2

# Dirty (lazy refcounts, a writer killed) and corrupt-marked images show their flags.
qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 16M
qemu-io -c 'write 0 1M' -c abort dirty.qcow2 >/dev/null 2>&1
[[ $(qemu-img info --output=json dirty.qcow2 | jq '."dirty-flag"') == true ]] || note "dirty.qcow2 is not dirty"
same_info dirty -- dirty.qcow2
qemu-img create -q -f qcow2 corrupt.qcow2 16M
$PYTHON -c "
import struct, sys
f = open('corrupt.qcow2', 'r+b'); f.seek(72); v = struct.unpack('>Q', f.read(8))[0]
f.seek(72); f.write(struct.pack('>Q', v | 2))"
same_info corrupt -- corrupt.qcow2

# External data files (raw and not) show their names; LUKS images their encryption header,
# with no key given (as qemu-img info, which needs none).  50 ms of PBKDF2 per key.
qemu-img create -q -f qcow2 -o data_file=ext.data datafile.qcow2 16M
same_info data_file -- datafile.qcow2
qemu-img create -q -f qcow2 -o data_file=ext_raw.data,data_file_raw=on datafile_raw.qcow2 16M
same_info data_file_raw -- datafile_raw.qcow2
luks_image() {  # luks_image PATH [OPTS]
    "$LIB_DIR/qemu-img-luks" create -q -f qcow2 --object secret,id=s0,data=pw \
        -o "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=50${2:+,$2}" "$1" 16M
}
# luks_case NAME OPTS [INFO-ARGS...]: a LUKS image QEMU made, described as qemu-img does.
luks_case() {
    local name=$1 opts=$2; shift 2
    if luks_image "$name.qcow2" "$opts"; then same_info "$name" "$@" -- "$name.qcow2"
    else skip "info_$name" "qemu-img could not time PBKDF2 on this machine (40 tries)"; fi
}
luks_case luks ""
luks_case luks_aes128 "encrypt.cipher-alg=aes-128"
luks_case luks_data_file "data_file=luks.data"
luks_case luks_overlay "backing_file=datafile.qcow2,backing_fmt=qcow2" --backing-chain

# A missing backing file does not hide the image (as qemu-img); the chain cannot be shown.
qemu-img create -q -f qcow2 gone_base.qcow2 16M
qemu-img create -q -f qcow2 -b gone_base.qcow2 -F qcow2 orphan.qcow2
rm gone_base.qcow2
same_info missing_backing -- orphan.qcow2
"$UQ" info --backing-chain orphan.qcow2 >out.txt 2>&1
rc=$?
qemu-img info --backing-chain orphan.qcow2 >/dev/null 2>&1
qrc=$?
[[ $rc -eq 1 && $qrc -ne 0 ]] && grep -q gone_base out.txt && ok info_missing_backing_chain ||
    notok info_missing_backing_chain "exit $rc (qemu-img $qrc): $(head -1 out.txt)"

# The JSON parses with jq too, and a chain is an array.
[[ $("$UQ" info --json --backing-chain chain/top.qcow2 | jq -r '.[2].format') == raw ]] &&
    ok info_json_jq || notok info_json_jq "jq could not read the chain's third format"

# Locks: an image a qemu process writes is refused, as by qemu-img; -U reads it anyway.
hold_image data.qcow2
"$UQ" info data.qcow2 >out.txt 2>&1
rc=$?
[[ $rc -eq 1 ]] && grep -qi "lock\|in use\|busy" out.txt && ok info_locked_refused ||
    notok info_locked_refused "exit $rc: $(head -1 out.txt)"
"$UQ" info -U data.qcow2 >out.txt 2>&1 && grep -q "file format: qcow2" out.txt &&
    ok info_force_share || notok info_force_share "$(head -1 out.txt)"
release_image

expect_fail() {   # NAME RC PATTERN ARGS...
    local name=$1 want=$2 pat=$3; shift 3
    "$UQ" info "$@" >out.txt 2>&1
    local rc=$?
    if [[ $rc -eq $want ]] && grep -qiE -- "$pat" out.txt; then ok "info_$name"
    else notok "info_$name" "exit $rc, want $want: $(head -1 out.txt)"; fi
}
expect_fail missing_image 1 "nothing.qcow2" nothing.qcow2
printf 'QFI\373garbage' >garbage.qcow2
expect_fail malformed_image 1 "garbage.qcow2" garbage.qcow2
expect_fail no_image 2 "no image" 
expect_fail bad_format 2 "unknown format" -f vmdk data.qcow2
expect_fail qcow2_on_raw 1 "plain.raw is not a qcow2 image.*-f raw" -f qcow2 plain.raw
expect_fail bad_output 2 "json or human" --output=xml data.qcow2
"$UQ" info --help | grep -q -- "--backing-chain" && ok info_help || notok info_help "no usage"
san_clean && ok info_sanitizers_clean || notok info_sanitizers_clean "sanitizer report"
