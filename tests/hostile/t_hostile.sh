#!/usr/bin/env bash
# Hostile images.  Malformed headers/tables must be refused at open: non-zero exit within a
# bounded time, a message on stderr naming the problem, no sanitizer report.  Images that
# open but hold a corrupt mapping must fail just the reads that touch it (an I/O error), keep
# serving everything else, and still exit 0 on SIGTERM.
# timeout: 600
. "$(dirname "$0")/../lib/lib.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
NBD_START_TIMEOUT=20
NBD_STOP_TIMEOUT=30
D=$UQ_TMP/bad
mkdir -p "$D"

# dirty_up IMAGE: a write, then qemu-io aborts: the dirty bit stays set (lazy refcounts).
dirty_up() {
    (ulimit -c 0; qemu-io -f qcow2 "$1" -c 'write -P 5 8M 4k' -c abort >/dev/null 2>&1) 2>/dev/null
    [[ $(( $(header_field "$1" 72 8) & 1 )) -eq 1 ]]
}

# --- valid sources ---------------------------------------------------------------------------
qemu-img create -q -f qcow2 "$D/valid.qcow2" 16M &&
    qemu-io -f qcow2 "$D/valid.qcow2" -c 'write -P 1 0 1M' -c 'write -c -P 2 4M 64k' >/dev/null &&
    qemu-img create -q -f qcow2 "$D/base.qcow2" 16M &&
    (cd "$D" && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 backed.qcow2 16M) &&
    qemu-img create -q -f qcow2 -o cluster_size=4096 "$D/small.qcow2" 16M &&
    qemu-io -f qcow2 "$D/small.qcow2" -c 'write -P 1 0 64k' -c 'write -P 3 4M 64k' \
        -c 'write -c -P 2 8M 4k' -c 'write -c -P 4 8392704 4k' >/dev/null &&
    cp "$D/small.qcow2" "$D/snap.qcow2" && qemu-img snapshot -c s1 "$D/snap.qcow2" &&
    qemu-io -f qcow2 "$D/snap.qcow2" -c 'write -P 1 0 64k' >/dev/null &&
    qemu-img create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on "$D/dirty.qcow2" 16M &&
    qemu-io -f qcow2 "$D/dirty.qcow2" -c 'write -P 1 0 64k' -c 'write -P 3 4M 64k' >/dev/null &&
    cp "$D/dirty.qcow2" "$D/dirtysnap.qcow2" && qemu-img snapshot -c s1 "$D/dirtysnap.qcow2" ||
    { notok "hostile/setup" "could not make the valid images"; exit 1; }

"$PYTHON" "$HERE/mkbad.py" open "$D/valid.qcow2" "$D/backed.qcow2" "$D/small.qcow2" "$D" >/dev/null &&
    "$PYTHON" "$HERE/mkbad.py" runtime "$D/small.qcow2" "$D" >/dev/null &&
    "$PYTHON" "$HERE/mkbad.py" overlap "$D/small.qcow2" "$D/snap.qcow2" "$D" >/dev/null &&
    "$PYTHON" "$HERE/mkbad.py" protected "$D/small.qcow2" >"$D/protected" &&
    "$PYTHON" "$HERE/mkbad.py" protected "$D/snap.qcow2" >"$D/protected.snap" &&
    dirty_up "$D/dirty.qcow2" && dirty_up "$D/dirtysnap.qcow2" &&
    "$PYTHON" "$HERE/mkbad.py" absurd "$D/dirty.qcow2" "$D/dirtysnap.qcow2" "$D" >/dev/null ||
    { notok "hostile/setup" "mkbad.py failed"; exit 1; }

# QEMU-made variants.
"$LIB_DIR/qemu-img-luks" create -q -f qcow2 --object secret,id=sec0,data=123456 \
    -o encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10 "$D/luks_qemu_made.qcow2" 16M ||
    rm -f "$D/luks_qemu_made.qcow2"
cp "$D/backed.qcow2" "$D/missing_backing_file.qcow2"   # backing name "base.qcow2" is not in $D/x
mkdir -p "$D/x" && mv "$D/missing_backing_file.qcow2" "$D/x/"
cp "$D/valid.qcow2" "$D/corrupt_bit.qcow2"
"$PYTHON" - "$D/corrupt_bit.qcow2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(72); v = struct.unpack(">Q", f.read(8))[0]
    f.seek(72); f.write(struct.pack(">Q", v | 2))
EOF

# --- refused at open -------------------------------------------------------------------------
# case | image (relative to $D) | keyword regex (case-insensitive) the error must contain
OPEN=(
    "truncated to the header|open_truncated_header_only.qcow2|L1|refcount|truncat|short|end of file|EOF|beyond|past"
    "truncated to 60 bytes|open_truncated_60_bytes.qcow2|header|truncat|short|small"
    "bad magic|open_bad_magic.qcow2|magic"
    "version 4|open_version_4.qcow2|version"
    "version 1|open_version_1.qcow2|version"
    "cluster_bits 8|open_cluster_bits_8.qcow2|cluster"
    "cluster_bits 22|open_cluster_bits_22.qcow2|cluster"
    "L1 table beyond EOF|open_l1_beyond_eof.qcow2|L1"
    "L1 table overlapping the header|open_l1_overlaps_header.qcow2|L1"
    "L1 table offset unaligned|open_l1_unaligned.qcow2|L1"
    "l1_size 2^31|open_l1_size_absurd.qcow2|L1"
    "l1_size too small for the disk size|open_l1_too_small.qcow2|L1"
    "refcount table beyond EOF|open_refcount_table_beyond_eof.qcow2|refcount|reference count"
    "refcount table overlapping the header|open_refcount_table_overlaps_header.qcow2|refcount|reference count"
    "refcount_table_clusters 2^30|open_refcount_table_clusters_absurd.qcow2|refcount|reference count"
    "refcount_order 7|open_refcount_order_7.qcow2|refcount|reference count"
    "unknown incompatible feature bit 20|open_unknown_incompatible_bit.qcow2|incompatible|feature"
    "crypt_method 1 (AES)|open_crypt_method_aes.qcow2|encrypt"
    "crypt_method 2 (LUKS), patched|open_crypt_method_luks_patched.qcow2|crypt"
    "LUKS image made by qemu-img|luks_qemu_made.qcow2|encrypt"
    "external data file bit|open_external_data_file.qcow2|data.file|external"
    "unknown compression type|open_unknown_compression_type.qcow2|compression"
    "extended L2 with 4k clusters|open_extended_l2_small_clusters.qcow2|extended|subcluster"
    "header_length 96|open_header_length_short.qcow2|header"
    "header_length not a multiple of 8|open_header_length_unaligned.qcow2|header"
    "header extension overrunning the header cluster|open_header_extension_overrun.qcow2|extension"
    "snapshot table beyond EOF|open_snapshot_table_beyond_eof.qcow2|snapshot"
    "backing file name past the header cluster|open_backing_name_past_cluster.qcow2|backing"
    "backing file name offset beyond EOF|open_backing_name_offset_beyond_eof.qcow2|backing"
    "missing backing file|x/missing_backing_file.qcow2|backing|base.qcow2"
)

for row in "${OPEN[@]}"; do
    IFS='|' read -r name file regex <<<"$row"
    label="hostile/open: $name"
    if [[ -n ${CASES:-} ]] && ! [[ $name =~ $CASES ]]; then continue; fi
    if [[ ! -f $D/$file ]]; then
        skip "$label" "qemu-img could not make the image"
        continue
    fi
    note "=== $label"
    rc=0
    start_nbd "$D/$file" --format qcow2 || rc=$?
    if [[ $rc -eq 0 ]]; then
        stop_nbd >/dev/null 2>&1
        notok "$label" "accepted the image"
        continue
    fi
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then
        notok "$label" "did not exit within ${NBD_START_TIMEOUT}s"
        continue
    fi
    if ! san_clean "$NBD_LOG"; then
        notok "$label" "sanitizer report"
        continue
    fi
    # The file names give the problem away: hide them from the keyword match.
    base=${file##*/}
    msgs=$(grep -v '^#' "$NBD_LOG" | sed -e "s|$D/$file|IMAGE|g" -e "s|$file|IMAGE|g" -e "s|$base|IMAGE|g")
    msg=$(head -3 <<<"$msgs" | tr '\n' ' ')
    if [[ -z $msg ]]; then
        notok "$label" "exit $rc without a message"
    elif ! grep -q -i -E "$regex" <<<"$msgs"; then
        notok "$label" "message does not name the problem (want /$regex/): $msg"
    else
        ok "$label"
    fi
done

# --- corrupt mappings at run time ------------------------------------------------------------
# case | image | bad range (offset length) | good reads (qemu-io commands, ';'-separated) |
# keyword regex if refusing the image at open is also acceptable (the L1 table is read whole
# at open, so a server may validate it there)
GOOD_A="read -P 1 0 64k"
GOOD_B="read -P 3 4M 64k"
RUNTIME=(
    "L2 entry with reserved bits set|rt_l2_reserved_bits.qcow2|0 4096|$GOOD_B|"
    "L2 entry with an unaligned offset|rt_l2_unaligned_offset.qcow2|0 4096|$GOOD_B|"
    "L1 entry pointing beyond EOF|rt_l1_beyond_eof.qcow2|0 4096|$GOOD_B|"
    "L1 entry with reserved bits set|rt_l1_reserved_bits.qcow2|0 4096|$GOOD_B|L1"
    "compressed descriptor past EOF|rt_compressed_past_eof.qcow2|8M 4096|$GOOD_A;$GOOD_B;read -P 4 8392704 4k|"
)
for row in "${RUNTIME[@]}"; do
    IFS='|' read -r name file bad good refuse_ok <<<"$row"
    label="hostile/runtime: $name"
    if [[ -n ${CASES:-} ]] && ! [[ $name =~ $CASES ]]; then continue; fi
    note "=== $label"
    rc=0
    start_nbd "$D/$file" --read-only --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        if ! san_clean "$NBD_LOG"; then
            notok "$label" "sanitizer report"
        elif [[ -n $refuse_ok && $rc -ne 124 ]] &&
            grep -v '^#' "$NBD_LOG" | sed "s|$D/$file|IMAGE|g" | grep -q -i -E "$refuse_ok"; then
            ok "$label (refused at open)"
        else
            notok "$label" "server did not start (exit $rc)"
        fi
        continue
    fi
    why=
    if timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read $bad" >"$UQ_TMP/bad.out" 2>&1; then
        why="reading the corrupt range succeeded"
    elif ! grep -q -i 'error' "$UQ_TMP/bad.out"; then
        why="reading the corrupt range failed without an I/O error: $(head -1 "$UQ_TMP/bad.out")"
    fi
    sed 's/^/#   /' "$UQ_TMP/bad.out" >&2
    IFS=';' read -r -a goods <<<"$good"
    args=()
    for g in "${goods[@]}"; do args+=(-c "$g"); done
    if ! timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" "${args[@]}" >"$UQ_TMP/good.out" 2>&1; then
        why=${why:-"a valid range could not be read afterwards: $(grep -v '^read\|^[0-9]' "$UQ_TMP/good.out" | head -1)"}
    fi
    rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
    san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
    if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label"; fi
done

# A data cluster far beyond EOF: QEMU reads zeros there (a file may legitimately end inside its
# last cluster), so zeros or an I/O error are both acceptable; anything else is not.
label="hostile/runtime: L2 entry pointing beyond EOF reads as zeros or fails"
if [[ -z ${CASES:-} || "L2 entry pointing beyond EOF" =~ $CASES ]]; then
    note "=== $label"
    rc=0
    start_nbd "$D/rt_l2_offset_beyond_eof.qcow2" --read-only --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        notok "$label" "server did not start (exit $rc)"
    else
        why=
        if ! timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read 0 4096" >"$UQ_TMP/bad.out" 2>&1; then
            grep -q -i 'error' "$UQ_TMP/bad.out" || why="read failed without an I/O error"
        elif ! timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read -P 0 0 4096" >&2 2>&1; then
            why="read returned data that is neither zeros nor an error"
        fi
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "$GOOD_B" >&2 2>&1 ||
            why=${why:-"a valid range could not be read afterwards"}
        rc=0
        stop_nbd || rc=$?
        [[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
        san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
        if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label"; fi
    fi
fi

# The same mapping served read-write: a write there must fail, and the file must not grow
# to reach the bogus offset (1 TiB away).
label="hostile/runtime: write to an L2 entry pointing beyond EOF fails, file does not grow"
if [[ -z ${CASES:-} || "L2 entry pointing beyond EOF" =~ $CASES ]]; then
    note "=== $label"
    cp "$D/rt_l2_offset_beyond_eof.qcow2" "$D/rw_beyond_eof.qcow2"
    rc=0
    start_nbd "$D/rw_beyond_eof.qcow2" --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        notok "$label" "server did not start (exit $rc)"
    else
        why=
        timeout -k 5 60 qemu-io -f raw "$(nbd_uri)" -c "write -P 9 0 4096" >"$UQ_TMP/bad.out" 2>&1 &&
            why="the write succeeded"
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "$GOOD_B" >&2 2>&1 ||
            why=${why:-"a valid range could not be read afterwards"}
        rc=0
        stop_nbd || rc=$?
        [[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
        size=$(stat -c %s "$D/rw_beyond_eof.qcow2")
        (( size < 1 << 30 )) || why=${why:-"the image file grew to $size bytes"}
        grep -q "past the end of the file" "$NBD_LOG" || why=${why:-"no message naming the problem"}
        san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
        if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label"; fi
    fi
fi

# stop_checked [EXIT...]: stop the server; unless its exit status is one of EXIT (default 0),
# $why gets the reason (if it has none yet).
stop_checked() {
    local rc=0 e
    stop_nbd || rc=$?
    for e in "${@:-0}"; do [[ $rc -eq $e ]] && return 0; done
    why=${why:-"server exit $rc after SIGTERM"}
}
# verdict LABEL [DETAIL]: no sanitizer report either, then ok or not ok with $why.
verdict() {
    san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
    if [[ -n $why ]]; then notok "$1" "$why"; else ok "$1${2:+ ($2)}"; fi
}

# --- metadata overlaps: no write may land on metadata ----------------------------------------
# Refcounts that call a table's cluster free (the allocator would hand it out for a new L2 table
# or a data cluster), L2 entries naming tables as data clusters, L1 and refcount table entries
# naming other tables.  The write must fail with an I/O error, the server must name both
# structures, keep serving reads, and the header, L1, refcount table and L2 tables of the file
# must be byte for byte what they were.
# case | image | write (offset) | structure the message must name
NEW_L2=12M      # no L2 table maps it yet: a new table and a data cluster are allocated
NEW_DATA=128k   # mapped by an existing L2 table, unallocated: a data cluster is allocated
OVERLAP=(
    "refcount frees the header, new L2 table|refcount_frees_header|$NEW_L2|the image header"
    "refcount frees the L1 table, new L2 table|refcount_frees_l1|$NEW_L2|the active L1 table"
    "refcount frees the L1 table, new data cluster|refcount_frees_l1|$NEW_DATA|the active L1 table"
    "refcount frees the refcount table, new L2 table|refcount_frees_reftable|$NEW_L2|the refcount table"
    "refcount frees the refcount table, new data cluster|refcount_frees_reftable|$NEW_DATA|the refcount table"
    "refcount frees a refcount block, new L2 table|refcount_frees_refblock|$NEW_L2|a refcount block"
    "refcount frees a refcount block, new data cluster|refcount_frees_refblock|$NEW_DATA|a refcount block"
    "refcount frees an L2 table, new L2 table|refcount_frees_l2|$NEW_L2|an active L2 table"
    "refcount frees an L2 table, new data cluster|refcount_frees_l2|$NEW_DATA|an active L2 table"
    "L2 entry names the L1 table|l2_points_at_l1|0|the active L1 table"
    "L2 entry names the refcount table|l2_points_at_reftable|0|the refcount table"
    "L2 entry names a refcount block|l2_points_at_refblock|0|a refcount block"
    "L2 entry names another L2 table|l2_points_at_other_l2|0|an active L2 table"
    "L2 entry names its own L2 table|l2_points_at_own_l2|0|an active L2 table"
    "L1 entry names the L1 table|l1_points_at_l1|0|the active L1 table"
    "L1 entry names the refcount table|l1_points_at_reftable|0|the refcount table"
    "refcount table loop: a block is the table itself|reftable_points_at_itself|$NEW_L2|the refcount table"
    "refcount table entry names the L1 table|reftable_points_at_l1|$NEW_L2|the active L1 table"
    "refcount table entry names an L2 table|reftable_points_at_l2|$NEW_L2|an active L2 table"
    "L2 entry names a snapshot's L1 table|snap_l2_points_at_snapshot_l1|0|a snapshot's L1 table"
    "L2 entry names the snapshot table|snap_l2_points_at_snapshot_table|0|the snapshot table"
    "refcount frees a snapshot's L2 table, new L2 table|snap_refcount_frees_snapshot_l2|$NEW_L2|a snapshot's L2 table"
)
# protected_sum IMAGE RANGES: checksum of the bytes no write may touch (ranges from the valid
# source).
protected_sum() {
    "$PYTHON" -c '
import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f, open(sys.argv[2]) as r:
    for line in r:
        off, n = map(int, line.split())
        f.seek(off); h.update(f.read(n))
print(h.hexdigest())' "$1" "$2"
}
for row in "${OVERLAP[@]}"; do
    IFS='|' read -r name file woff want <<<"$row"
    label="hostile/overlap: $name"
    if [[ -n ${CASES:-} ]] && ! [[ $name =~ $CASES ]]; then continue; fi
    note "=== $label"
    img=$D/ol_run.qcow2
    cp "$D/ol_$file.qcow2" "$img"
    ranges=$D/protected
    [[ $file == snap_* ]] && ranges=$D/protected.snap
    before=$(protected_sum "$img" "$ranges")
    rc=0
    start_nbd "$img" --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        notok "$label" "server did not start (exit $rc)"
        continue
    fi
    why=
    if timeout -k 5 60 qemu-io -f raw "$(nbd_uri)" -c "write -P 9 $woff 4k" -c flush >"$UQ_TMP/bad.out" 2>&1 &&
        ! grep -q -i error "$UQ_TMP/bad.out"; then
        why="the write and flush succeeded"
    elif ! grep -q 'Input/output error' "$UQ_TMP/bad.out"; then
        why="failed without an I/O error: $(head -1 "$UQ_TMP/bad.out")"
    fi
    timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "$GOOD_B" >&2 2>&1 ||
        why=${why:-"a valid range could not be read afterwards"}
    # The close may report refused metadata as a failed flush (exit 1); never a crash.
    stop_checked 0 1
    msg=$(grep -m1 'refusing to write' "$NBD_LOG")
    if [[ -z $msg ]]; then
        why=${why:-"no message naming the overlap"}
    elif ! grep -q "overlaps $want" <<<"$msg"; then
        why=${why:-"message does not name $want: $msg"}
    fi
    [[ $(protected_sum "$img" "$ranges") == "$before" ]] || why=${why:-"metadata was overwritten"}
    verdict "$label"
done

# A COW from a compressed cluster whose descriptor lies past EOF: the write fails, the file
# does not grow.
label="hostile/runtime: write over a compressed descriptor past EOF fails, file does not grow"
if [[ -z ${CASES:-} || "compressed descriptor past EOF" =~ $CASES ]]; then
    note "=== $label"
    cp "$D/rt_compressed_past_eof.qcow2" "$D/rw_compressed.qcow2"
    size0=$(stat -c %s "$D/rw_compressed.qcow2")
    rc=0
    start_nbd "$D/rw_compressed.qcow2" --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        notok "$label" "server did not start (exit $rc)"
    else
        why=
        timeout -k 5 60 qemu-io -f raw "$(nbd_uri)" -c "write -P 9 8M 512" >"$UQ_TMP/bad.out" 2>&1 &&
            ! grep -q -i error "$UQ_TMP/bad.out" && why="the write succeeded"
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "$GOOD_B" >&2 2>&1 ||
            why=${why:-"a valid range could not be read afterwards"}
        stop_checked
        size=$(stat -c %s "$D/rw_compressed.qcow2")
        (( size <= size0 + (1 << 20) )) || why=${why:-"the image file grew from $size0 to $size bytes"}
        verdict "$label"
    fi
fi

# --- absurd sizes: bounded memory, disk and time -------------------------------------------
# A dirty image (lazy refcounts, 512-byte clusters) with a few KiB of metadata in a 64 GiB
# sparse file: the repair on open must take memory and disk for what is in use (it took
# 1.25 GiB and wrote 13 GiB for 100 GiB once).  And 65536 snapshots whose L1 tables all lie on
# the same bytes: refused with a message, quickly (read-only it is served as it is).
label="hostile/absurd: dirty image in a 64 GiB sparse file: repaired in bounded memory and disk"
if [[ -z ${CASES:-} || "sparse" =~ $CASES ]]; then
    note "=== $label"
    rc=0
    start_nbd "$D/ab_sparse_dirty.qcow2" --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        notok "$label" "server did not start (exit $rc)"
    else
        why=
        hwm=$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$NBD_PID/status")
        (( hwm < 256 * 1024 )) || why="peak RSS $hwm KiB"
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read -P 1 0 64k" -c "read -P 3 4M 64k" >&2 2>&1 ||
            why=${why:-"the data does not read back"}
        stop_checked
        used=$(du -k "$D/ab_sparse_dirty.qcow2" | cut -f1)
        (( used < 64 * 1024 )) || why=${why:-"the file takes $used KiB on disk"}
        qimg_check "$D/ab_sparse_dirty.qcow2" || why=${why:-"qemu-img check after the repair failed"}
        verdict "$label" "peak RSS $((hwm / 1024)) MiB, $((used / 1024)) MiB on disk"
    fi
    rm -f "$D/ab_sparse_dirty.qcow2"
fi
label="hostile/absurd: 65536 snapshots on one L1 table, dirty: refused quickly, served read-only"
if [[ -z ${CASES:-} || "snapshots" =~ $CASES ]]; then
    note "=== $label"
    rc=0
    t0=$SECONDS
    start_nbd "$D/ab_snapshot_l1_bomb.qcow2" --format qcow2 || rc=$?
    why=
    if [[ $rc -eq 0 ]]; then
        stop_nbd >/dev/null 2>&1
        why="the repair accepted 65537 references in 16-bit refcounts"
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        why="did not answer within ${NBD_START_TIMEOUT}s"
    elif ! grep -v '^#' "$NBD_LOG" | grep -q -i -E 'refcount|snapshot'; then
        why="no message naming the problem: $(grep -v '^#' "$NBD_LOG" | head -1)"
    fi
    secs=$((SECONDS - t0))
    san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
    rc=0
    start_nbd "$D/ab_snapshot_l1_bomb.qcow2" --format qcow2 --read-only || rc=$?
    if [[ $rc -ne 0 ]]; then
        why=${why:-"not served read-only (exit $rc)"}
    else
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read -P 3 4M 64k" >&2 2>&1 ||
            why=${why:-"read-only: the data does not read back"}
        stop_nbd >/dev/null 2>&1 || why=${why:-"read-only: unclean exit"}
    fi
    if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label (refused in ${secs}s)"; fi
fi

# An image marked corrupt: opened without --read-only, the server must either refuse it or
# serve it read-only, naming the problem; never write to it.
label="hostile/corrupt bit set, no --read-only: refused or served read-only"
if [[ -z ${CASES:-} || "corrupt bit" =~ $CASES ]]; then
    note "=== $label"
    sum=$(md5sum <"$D/corrupt_bit.qcow2")
    rc=0
    start_nbd "$D/corrupt_bit.qcow2" --format qcow2 || rc=$?
    why=
    if [[ $rc -ne 0 ]]; then
        [[ $rc -ne 124 ]] || why="did not exit within ${NBD_START_TIMEOUT}s"
    else
        timeout -k 5 60 qemu-io -f raw "$(nbd_uri)" -c "write -P 9 0 4k" >&2 2>&1 &&
            why="a write to an image marked corrupt succeeded"
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read -P 1 0 1M" -c "read -P 2 4M 64k" >&2 ||
            why=${why:-"reads failed"}
        rc=0
        stop_nbd || rc=$?
        [[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
    fi
    grep -v '^#' "$NBD_LOG" | sed "s|$D/corrupt_bit.qcow2|IMAGE|g" | grep -q -i corrupt ||
        why=${why:-"no message naming the corrupt bit"}
    [[ $(md5sum <"$D/corrupt_bit.qcow2") == "$sum" ]] || why=${why:-"the image was modified"}
    san_clean "$NBD_LOG" || why=${why:-"sanitizer report"}
    if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label"; fi
fi

# With --read-only it is served normally.
label="hostile/corrupt bit set, --read-only: served"
if [[ -z ${CASES:-} || "corrupt bit" =~ $CASES ]]; then
    note "=== $label"
    rc=0
    start_nbd "$D/corrupt_bit.qcow2" --read-only --format qcow2 || rc=$?
    if [[ $rc -ne 0 ]]; then
        notok "$label" "server did not start (exit $rc)"
    else
        why=
        timeout -k 5 60 qemu-io -r -f raw "$(nbd_uri)" -c "read -P 1 0 1M" -c "read -P 2 4M 64k" >&2 ||
            why="reads failed"
        rc=0
        stop_nbd || rc=$?
        [[ $rc -eq 0 ]] || why=${why:-"server exit $rc after SIGTERM"}
        if [[ -n $why ]]; then notok "$label" "$why"; else ok "$label"; fi
    fi
fi
