#!/usr/bin/env bash
# ublk-qcow2 create against qemu-img create (the oracle): for a matrix of options (every
# cluster size, every refcount width, v2/v3, each preallocation mode, backing files with
# absolute and relative names, extended L2, zstd, lazy refcounts) our image passes
# `qemu-img check`, `qemu-img info` shows the same fields as for the image qemu-img makes
# with the same options, both read the same (`qemu-img compare`) and map the same way
# (`qemu-img map`: allocated/zero/data per byte); where QEMU's layout is ours too, the files
# are byte-identical.  Bad options fail as they do with qemu-img, leaving no file behind.
# timeout: 400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"
need_cmd qemu-img qemu-io jq || { skip create "qemu-img, qemu-io or jq is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1


# same_as_qemu NAME OURS THEIRS [FMT] [identical]: every comparison with the twin.
same_as_qemu() {
    local name=$1 ours=$2 theirs=$3 fmt=${4:-qcow2} identical=${5:-}
    if [[ $fmt == qcow2 ]]; then
        qimg_check "$ours" || fail "qemu-img check: exit $?"
    fi
    if [[ -n $identical ]]; then
        # A file byte-identical to qemu-img's has the same info, content and map.
        cmp -s "$ours" "$theirs" ||
            fail "not byte-identical to qemu-img's image ($(cmp "$ours" "$theirs" 2>&1 | head -1))"
        return
    fi
    qemu-img info --output=json "$ours" >"$W/i1.json" 2>&1 || fail "qemu-img info failed on ours"
    qemu-img info --output=json "$theirs" >"$W/i2.json" 2>&1 || fail "qemu-img info failed on qemu's"
    # Names differ by construction, the space used with the layout.
    local ign=filename,full-backing-filename,actual-size
    $CMP json "$W/i1.json" "$W/i2.json" --ignore "$ign" >"$W/diff" || fail "info differs: $(head -3 "$W/diff" | tr '\n' ' ')"
    qimg_compare "$ours" "$theirs" "$fmt" "$fmt" || fail "qemu-img compare: images differ"
    qemu-img map --output=json -f "$fmt" "$ours" >"$W/m1.json" 2>&1 &&
        qemu-img map --output=json -f "$fmt" "$theirs" >"$W/m2.json" 2>&1 &&
        $CMP map "$W/m1.json" "$W/m2.json" --no-zero >"$W/diff" || fail "qemu-img map differs: $(head -3 "$W/diff" | tr '\n' ' ')"
}

# case_qcow2 NAME SIZE OPTS [identical]
case_qcow2() {
    local name=$1 size=$2 opts=$3 identical=${4:-}
    local o=()
    [[ -n $opts ]] && o=(-o "$opts")
    rm -f ours.qcow2 theirs.qcow2
    if ! "$UQ" create -q -f qcow2 "${o[@]}" ours.qcow2 $size >"$W/out" 2>&1; then
        fail "create failed: $(head -2 "$W/out" | tr '\n' ' ')"
    elif ! qemu-img create -q -f qcow2 "${o[@]}" theirs.qcow2 $size >"$W/out" 2>&1; then
        fail "qemu-img create failed: $(head -2 "$W/out" | tr '\n' ' ')"
    else
        same_as_qemu "$name" ours.qcow2 theirs.qcow2 qcow2 "$identical"
    fi
    result "create_$name"
}

# ---- the option matrix -----------------------------------------------------------------
case_qcow2 default 1G "" identical
case_qcow2 size_0 0 "" identical
case_qcow2 size_unaligned 1000 "" identical
case_qcow2 size_fraction 1.5M "" identical
case_qcow2 size_1T 1T "" identical
for cs in 512 1k 2k 4k 8k 16k 32k 64k 128k 256k 512k 1M 2M; do
    case_qcow2 "cluster_size=$cs" 256M "cluster_size=$cs" identical
done
for rb in 1 2 4 8 16 32 64; do
    case_qcow2 "refcount_bits=$rb" 1G "refcount_bits=$rb" identical
done
case_qcow2 compat=0.10 1G "compat=0.10" identical
case_qcow2 compat=v2_4k 1G "compat=v2,cluster_size=4k" identical
case_qcow2 compat=1.1 1G "compat=1.1" identical
case_qcow2 lazy_refcounts 1G "lazy_refcounts=on" identical
case_qcow2 zstd 1G "compression_type=zstd" identical
case_qcow2 extended_l2 1G "extended_l2=on" identical
case_qcow2 extended_l2_16k 1G "extended_l2=on,cluster_size=16k" identical
case_qcow2 extended_l2_2M 10G "extended_l2=on,cluster_size=2M" identical
case_qcow2 all_v3_options 3G "compat=1.1,lazy_refcounts=on,compression_type=zstd,refcount_bits=64,extended_l2=on,cluster_size=128k" identical
for p in off metadata falloc full; do
    case_qcow2 "preallocation=$p" 40M "preallocation=$p" "$([[ $p == off || $p == metadata ]] && echo identical)"
done
case_qcow2 prealloc_metadata_v2 40M "preallocation=metadata,compat=0.10" identical
case_qcow2 prealloc_metadata_extl2 40M "preallocation=metadata,extended_l2=on" identical
case_qcow2 prealloc_metadata_512 4M "preallocation=metadata,cluster_size=512"
case_qcow2 prealloc_full_refcount_bits=1 8M "preallocation=full,refcount_bits=1"
case_qcow2 prealloc_falloc_2M 40M "preallocation=falloc,cluster_size=2M"
# Many refcount blocks and a refcount table of several clusters.
case_qcow2 prealloc_metadata_512_rb64 64M "preallocation=metadata,cluster_size=512,refcount_bits=64"
case_qcow2 big_l1_512 10G "cluster_size=512"

# qemu-img info of our image shows the options given (not only through byte identity).
"$UQ" create -q -o compat=1.1,lazy_refcounts=on,compression_type=zstd,refcount_bits=8,extended_l2=on,cluster_size=32k \
    shown.qcow2 5G
if [[ $(qemu-img info --output=json shown.qcow2 | jq -c '[."virtual-size", ."cluster-size", ."format-specific".data]') == \
    '[5368709120,32768,{"compat":"1.1","compression-type":"zstd","lazy-refcounts":true,"refcount-bits":8,"corrupt":false,"extended-l2":true}]' ]]; then
    ok create_info_shows_options
else
    notok create_info_shows_options "$(qemu-img info --output=json shown.qcow2 | jq -c '."format-specific".data')"
fi

# ---- backing files ------------------------------------------------------------------------
mkdir -p sub other
qemu-img create -q -f qcow2 sub/base.qcow2 64M
qemu-io -c 'write -P 7 0 1M' -c 'write -P 9 40M 64k' sub/base.qcow2 >/dev/null
qemu-img create -q -f raw base.raw 8M
qemu-io -f raw -c 'write -P 3 1M 1M' base.raw >/dev/null

# case_backing NAME IMAGE ARGS...: the same create arguments for both; IMAGE's name is
# used for ours and IMAGE.twin for qemu's (so relative backing names mean the same).
case_backing() {
    local name=$1 img=$2; shift 2
    rm -f "$img" "$img.twin"
    if ! "$UQ" create -q "$@" "$img" >"$W/out" 2>&1; then
        fail "create failed: $(head -2 "$W/out" | tr '\n' ' ')"
    elif ! qemu-img create -q "$@" "$img.twin" >"$W/out" 2>&1; then
        fail "qemu-img create failed: $(head -2 "$W/out" | tr '\n' ' ')"
    else
        same_as_qemu "$name" "$img" "$img.twin"
    fi
    result "create_$name"
}
# The size comes from the backing file when it is not given.
case_backing backing_absolute top.qcow2 -f qcow2 -b "$W/sub/base.qcow2" -F qcow2
# A relative name is relative to the new image's directory, not the working directory.
case_backing backing_relative sub/top.qcow2 -f qcow2 -b base.qcow2 -F qcow2
case_backing backing_relative_up other/top.qcow2 -f qcow2 -o backing_file=../sub/base.qcow2,backing_fmt=qcow2
case_backing backing_raw_larger top.qcow2 -f qcow2 -b "$W/base.raw" -F raw -o size=32M
case_backing backing_v2 sub/top.qcow2 -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2
case_backing backing_extl2_prealloc sub/top.qcow2 -f qcow2 -o extended_l2=on,preallocation=metadata -b base.qcow2 -F qcow2
case_backing backing_4k_cluster sub/top.qcow2 -f qcow2 -o cluster_size=4k -b base.qcow2 -F qcow2
rm -f sub/top.qcow2
if "$UQ" create -q -f qcow2 -b base.qcow2 -F qcow2 sub/top.qcow2 &&
    [[ $("$UQ" info --json sub/top.qcow2 | jq -r '."backing-filename"') == base.qcow2 ]] &&
    (cd "$W/other" && qemu-img compare -q ../sub/top.qcow2 ../sub/base.qcow2); then
    ok create_backing_name_kept_relative
else
    notok create_backing_name_kept_relative "the stored name or what it reads differs"
fi

# ---- raw -----------------------------------------------------------------------------------
case_raw() {
    local name=$1 size=$2; shift 2
    rm -f ours.raw theirs.raw
    "$UQ" create -q -f raw "$@" ours.raw "$size" >"$W/out" 2>&1 || fail "create failed: $(head -2 "$W/out")"
    qemu-img create -q -f raw "$@" theirs.raw "$size" >/dev/null 2>&1 || fail "qemu-img create failed"
    [[ -z $FAIL ]] && same_as_qemu "$name" ours.raw theirs.raw raw
    [[ $(stat -c %s ours.raw) == $(stat -c %s theirs.raw) ]] || fail "file sizes differ"
    result "create_raw_$name"
}
case_raw off 1000
case_raw falloc 16M -o preallocation=falloc
case_raw full 16M -o preallocation=full
# falloc and full allocate every block; off leaves a hole.
blocks() { echo $(($(stat -c %b "$1") * 512)); }
"$UQ" create -q -f raw -o preallocation=full full.raw 16M && "$UQ" create -q -f raw sparse.raw 16M
if [[ $(blocks full.raw) -ge $((16 << 20)) && $(blocks sparse.raw) -lt $((1 << 20)) ]]; then
    ok create_raw_allocation
else
    notok create_raw_allocation "full: $(blocks full.raw) bytes allocated, off: $(blocks sparse.raw)"
fi
"$UQ" create -q -o preallocation=full full.qcow2 16M
[[ $(blocks full.qcow2) -ge $((16 << 20)) ]] && ok create_qcow2_full_allocates ||
    notok create_qcow2_full_allocates "only $(blocks full.qcow2) bytes allocated"

# ---- bad options: refused as qemu-img refuses them, no file left behind ----------------
# bad NAME PATTERN ARGS...: our create and qemu-img create both fail; ours names the problem.
bad() {
    local name=$1 pat=$2; shift 2
    rm -f bad.img
    "$UQ" create -q "$@" >"$W/out" 2>&1
    local rc=$? left=
    [[ -e bad.img ]] && left=1
    rm -f bad.img
    qemu-img create -q "$@" >/dev/null 2>&1
    local qrc=$?
    rm -f bad.img
    if [[ $qrc -eq 0 ]]; then
        notok "create_refuses_$name" "qemu-img accepts it (the case is wrong)"
    elif [[ $rc -ne 1 && $rc -ne 2 ]]; then
        notok "create_refuses_$name" "exit $rc, want 1 or 2"
    elif ! grep -qiE -- "$pat" "$W/out"; then
        notok "create_refuses_$name" "message lacks /$pat/: $(head -2 "$W/out" | tr '\n' ' ')"
    elif [[ -n $left ]]; then
        notok "create_refuses_$name" "a file was left behind"
    else
        ok "create_refuses_$name"
    fi
}
bad cluster_size_3000 "power of two" -f qcow2 -o cluster_size=3000 bad.img 1M
bad cluster_size_256 "power of two" -f qcow2 -o cluster_size=256 bad.img 1M
bad cluster_size_4M "power of two" -f qcow2 -o cluster_size=4M bad.img 1M
bad refcount_bits_3 "refcount width" -f qcow2 -o refcount_bits=3 bad.img 1M
bad refcount_bits_128 "refcount" -f qcow2 -o refcount_bits=128 bad.img 1M
bad v2_lazy "compat=1.1" -f qcow2 -o compat=0.10,lazy_refcounts=on bad.img 1M
bad v2_refcount_bits "compat=1.1" -f qcow2 -o compat=0.10,refcount_bits=8 bad.img 1M
bad v2_zstd "compat=1.1" -f qcow2 -o compat=0.10,compression_type=zstd bad.img 1M
bad v2_extl2 "compat=1.1" -f qcow2 -o compat=0.10,extended_l2=on bad.img 1M
bad extl2_8k "16384" -f qcow2 -o extended_l2=on,cluster_size=8k bad.img 1M
bad backing_prealloc "extended_l2" -f qcow2 -o preallocation=metadata -b sub/base.qcow2 -F qcow2 bad.img
bad backing_no_format "backing format.*detected format: qcow2" -f qcow2 -b "$W/sub/base.qcow2" bad.img
bad backing_missing "could not open backing" -f qcow2 -b nowhere.qcow2 -F qcow2 bad.img 1M
bad no_size "needs a size" -f qcow2 bad.img
bad size_suffix "invalid size" -f qcow2 bad.img 1x
bad unknown_option "invalid parameter 'foo'" -f qcow2 -o foo=bar bad.img 1M
bad compression_lz4 "zlib or zstd" -f qcow2 -o compression_type=lz4 bad.img 1M
bad prealloc_bogus "preallocation 'bogus'" -f qcow2 -o preallocation=bogus bad.img 1M
bad compat_0.9 "compat '0.9'" -f qcow2 -o compat=0.9 bad.img 1M
bad l1_too_large "too large" -f qcow2 -o cluster_size=512 bad.img 1T
bad raw_cluster_size "invalid parameter 'cluster_size'" -f raw -o cluster_size=4k bad.img 1M
bad raw_metadata "preallocation.*metadata" -f raw -o preallocation=metadata bad.img 1M

# ---- overwriting, locking, output ------------------------------------------------------------
qemu-img create -q -f qcow2 -o cluster_size=4k old.qcow2 1G
qemu-io -c 'write -P 1 0 1M' old.qcow2 >/dev/null
qemu-img create -q -f qcow2 fresh.qcow2 64M
if "$UQ" create -q old.qcow2 64M && cmp -s old.qcow2 fresh.qcow2; then
    ok create_overwrites_like_qemu_img
else
    notok create_overwrites_like_qemu_img "the overwritten image is not a fresh one"
fi
# An image a qemu process has open for writing is left alone.
hold_image old.qcow2
sum=$(md5sum <old.qcow2)
"$UQ" create -q old.qcow2 1G >"$W/out" 2>&1
rc=$?
if [[ $rc -eq 1 && $(md5sum <old.qcow2) == "$sum" ]] && grep -qi "lock\|in use\|busy" "$W/out"; then
    ok create_refuses_image_in_use
else
    notok create_refuses_image_in_use "exit $rc: $(head -1 "$W/out")"
fi
release_image

out=$("$UQ" create -o lazy_refcounts=on fmt.qcow2 16M)
[[ $out == "Formatting 'fmt.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib size=16777216 compat=1.1 lazy_refcounts=on refcount_bits=16" ]] &&
    ok create_formatting_line || notok create_formatting_line "got: $out"
[[ -z $("$UQ" create -q q.qcow2 16M 2>&1) ]] && ok create_quiet || notok create_quiet "-q printed something"
"$UQ" create --help | grep -q "preallocation=off|metadata|falloc|full" && ok create_help || notok create_help "no option list"
"$UQ" create -o help | grep -qx "  extended_l2" && ok create_o_help || notok create_o_help "no option list"
"$UQ" --help | grep -qE "^  create " && ok create_in_command_list || notok create_in_command_list "missing"
san_clean && ok create_sanitizers_clean || notok create_sanitizers_clean "sanitizer report"
