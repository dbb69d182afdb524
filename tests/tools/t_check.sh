#!/usr/bin/env bash
# ublk-qcow2 check against qemu-img check (the oracle).
#  - Clean images of every kind QEMU writes: no problem found, the same statistics and summary.
#  - Deliberately damaged images (damage.py: leaked clusters, refcounts too high / too low /
#    zero, L2 entries naming free, past-the-end or metadata clusters, wrong COPIED flags,
#    reserved bits in L1/L2 entries, misaligned entries, refcount table damage, snapshot
#    table damage): the same exit code and the same numbers of corruptions and leaks as
#    qemu-img check; with -r leaks and -r all the same repairs (counts and exit codes), after
#    which `qemu-img check` passes wherever it passes after QEMU's own repair, the data reads
#    as after QEMU's repair, and everything the damage did not touch reads as before.
#    Where QEMU 7.2 cannot repair (a reference past the end of the file, a misaligned
#    refcount block) ours must leave an image qemu-img check passes.
#  - A dirty image (lazy refcounts, writer killed) is repaired and marked clean.
#  - Exit codes 63 (raw), 1 (cannot check), locks, bad arguments.
# timeout: 400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"
need_cmd qemu-img qemu-io jq || { skip check "qemu-img, qemu-io or jq is missing"; exit 0; }
W=$UQ_TMP
cd "$W" || exit 1


# ours_vs_qemu IMAGE [ARGS...]: both checks on copies of IMAGE (so repairs do not meet);
# leaves o.img/q.img (after), o.json/q.json, o.rc/q.rc, o.txt/q.txt (summaries).
ours_vs_qemu() {
    local img=$1; shift
    cp "$img" o.img
    cp "$img" q.img
    "$UQ" check "$@" --json o.img >o.json 2>o.err
    echo $? >o.rc
    qemu-img check "$@" --output=json q.img >q.json 2>q.err
    echo $? >q.rc
}
same_verdict() {   # [--ignore KEYS]: same exit code and counters as qemu-img check
    [[ $(<o.rc) == $(<q.rc) ]] || fail "exit $(<o.rc), qemu-img check $(<q.rc)"
    if [[ -s q.json ]]; then
        $CMP check o.json q.json "$@" >diff.txt || fail "$(tr '\n' ' ' <diff.txt)"
    fi
}

# ---- clean images: no problem, the same statistics and text --------------------------------
clean_case() {   # NAME CREATE-OPTS QEMU-IO-CMD...
    local name=$1 opts=$2; shift 2
    local o=() c cmds=()
    [[ -n $opts ]] && o=(-o "$opts")
    rm -f img.qcow2
    qemu-img create -q -f qcow2 "${o[@]}" img.qcow2 64M
    for c in "$@"; do cmds+=(-c "$c"); done
    [[ ${#cmds[@]} -eq 0 ]] || qemu-io "${cmds[@]}" img.qcow2 >/dev/null
    [[ $name == snapshots* ]] && qemu-img snapshot -c s1 img.qcow2 && qemu-io -c 'write -P 9 0 2M' img.qcow2 >/dev/null
    ours_vs_qemu img.qcow2
    same_verdict
    [[ $(<o.rc) == 0 ]] || fail "exit $(<o.rc) on a clean image: $(head -2 o.err | tr '\n' ' ')"
    if [[ $name == data || $name == compressed || $name == snapshots ]]; then
        "$UQ" check img.qcow2 >o.txt 2>&1
        qemu-img check img.qcow2 >q.txt 2>&1
        diff o.txt q.txt >diff.txt || fail "summary differs: $(head -4 diff.txt | tr '\n' ' ')"
    fi
    result "check_clean_$name"
}
W_DATA=("write -P 1 0 3M" "write -P 2 5M 128k" "discard 1M 512k" "write -z 2M 64k" "write -P 3 9M 1M")
clean_case empty ""
clean_case data "" "${W_DATA[@]}"
clean_case compressed "" "${W_DATA[@]}" "write -c -P 4 16M 1M" "write -c 20M 64k"
clean_case zstd "compression_type=zstd" "write -c -P 4 0 2M"
clean_case snapshots "" "${W_DATA[@]}"
clean_case snapshots_v2 "compat=0.10" "write -P 1 0 1M"
clean_case v2 "compat=0.10" "${W_DATA[@]}"
clean_case cluster_512_refcount_1 "cluster_size=512,refcount_bits=1" "${W_DATA[@]}"
clean_case cluster_2M_refcount_64 "cluster_size=2M,refcount_bits=64" "${W_DATA[@]}"
clean_case extended_l2 "extended_l2=on,cluster_size=128k" "write -P 1 0 4k" "write -P 2 300k 8k" "write -z 1M 256k"
rm -f img.qcow2
"$UQ" create -q -o cluster_size=4k made_by_us.qcow2 64M
qemu-io -c 'write -P 5 0 1M' made_by_us.qcow2 >/dev/null
ours_vs_qemu made_by_us.qcow2
same_verdict
result check_clean_made_by_create
qemu-img create -q -f qcow2 bitmaps.qcow2 64M
qemu-img bitmap --add bitmaps.qcow2 b0
qemu-io -c 'write 0 1M' bitmaps.qcow2 >/dev/null
ours_vs_qemu bitmaps.qcow2
same_verdict
[[ $(<o.rc) == 0 ]] || fail "bitmap clusters taken for leaks"
result check_clean_bitmaps

# ---- damaged images --------------------------------------------------------------------------
# The images damage.py expects (see its head).
make_base() {   # PATH CREATE-OPTS
    rm -f "$1"
    qemu-img create -q -f qcow2 ${2:+-o "$2"} "$1" 16M
    qemu-io -c 'write -P 1 0 1M' -c 'write -P 2 1M 64k' -c 'write -P 3 2M 64k' -c 'write -P 4 3M 64k' \
        -c 'write -c -P 5 4M 64k' -c 'write -P 6 5M 64k' -c 'write -z 5M 64k' -c 'discard 2M 64k' "$1" >/dev/null
}
make_base base.qcow2 ""
cp base.qcow2 snap.qcow2
qemu-img snapshot -c s1 snap.qcow2
qemu-io -c 'write -P 7 8M 64k' snap.qcow2 >/dev/null
qemu-img convert -O raw base.qcow2 base.raw
qemu-img convert -O raw snap.qcow2 snap.raw

# Where ours is meant to do better than QEMU 7.2 (MODE:CASE): QEMU cannot repair these.
BETTER=" all:l2_past_eof all:reftable_unaligned all:l1_reserved_bits all:l2_reserved_bits all:copied_compressed "
# Where QEMU 7.2 cannot complete the check (a misaligned refcount block makes every refcount
# it covers unreadable); ours reports the damage as corruption.
QEMU_FAILS=" reftable_unaligned "

LEAKS_CASES=" leaked_cluster refcount_too_high refcount_too_low refcount_zero l2_past_eof l2_to_l1_table 
    copied_clear_l2 copied_compressed reftable_unaligned snapshot_l1_unaligned "
PREFIX=
damage_case() {   # CASE BASE (results are named check_$PREFIX$CASE...)
    local c=$1 base=$2 ranges mode
    ranges=$($DAMAGE "$c" "$base.qcow2" d.qcow2 | awk '{ print $2, $3 }') || { notok "check_$c" "damage.py failed"; return; }

    ours_vs_qemu d.qcow2
    if [[ $QEMU_FAILS == *" $c "* ]]; then
        [[ $(<q.rc) == 1 && $(<o.rc) == 2 ]] || fail "exit $(<o.rc) (qemu-img $(<q.rc)), want 2"
    else
        same_verdict
        [[ $(<o.rc) != 0 || $c == corrupt_bit ]] || fail "no problem found"
    fi
    result "check_$PREFIX$c"

    for mode in leaks all; do
        # -r leaks on the cases where it does something of its own (every case with SOAK=1).
        [[ $mode == leaks && $LEAKS_CASES != *" $c "* && ${SOAK:-0} != 1 ]] && continue
        ours_vs_qemu d.qcow2 -r "$mode"
        # After a repair qemu-img check's exit code is that of its own second check,
        # unless the repair itself failed.
        local orc qrc=$(<q.rc)
        if [[ $qrc == 1 ]]; then
            qemu-img check q.img >/dev/null 2>&1
            qrc=$?
        fi
        qimg_check o.img
        orc=$?
        if [[ $BETTER == *" $mode:$c "* ]]; then
            [[ $(<o.rc) == 0 && $orc == 0 ]] || fail "exit $(<o.rc), then qemu-img check $orc (want 0 and 0)"
        elif [[ $QEMU_FAILS == *" $c "* ]]; then
            # -r leaks cannot rebuild refcount structures: both give up.
            [[ $(<o.rc) == 1 && $(<q.rc) == 1 ]] || fail "exit $(<o.rc) (qemu-img $(<q.rc)), want 1"
        else
            # Where a rebuild puts the new refcount structures is a layout choice.
            same_verdict --ignore image-end-offset
            [[ $orc == "$qrc" ]] || fail "after the repair qemu-img check exits $orc, after QEMU's $qrc"
        fi
        if [[ $mode == all ]]; then
            # The data reads as after QEMU's repair, and as before outside the damage.
            if qemu-img convert -O raw q.img q.raw 2>/dev/null; then
                qemu-img convert -O raw o.img o.raw 2>conv.err || fail "cannot read the repaired image: $(head -1 conv.err)"
                # shellcheck disable=SC2086
                [[ -z $FAIL ]] && { $CMP raw o.raw q.raw + o.raw "$base.raw" $ranges >diff.txt ||
                    fail "reads unlike QEMU's repair, or undamaged data changed: $(<diff.txt)"; }
            else
                note "$c: QEMU's repaired image cannot be read as a whole either"
            fi
            if [[ $base == snap && -z $FAIL ]] && qemu-img snapshot -a s1 q.img 2>/dev/null; then
                qemu-img snapshot -a s1 o.img 2>snap.err || fail "cannot apply the snapshot: $(head -1 snap.err)"
                [[ -z $FAIL ]] && { qimg_compare o.img q.img || fail "the snapshot reads unlike after QEMU's repair"; }
            fi
        fi
        result "check_$PREFIX${c}_repair_$mode"
    done
}
for c in $($DAMAGE list); do
    case $c in
        snapshot*|copied_set_shared) damage_case "$c" snap ;;
        *) damage_case "$c" base ;;
    esac
done

# The same repairs on other refcount widths and versions.
make_base base.qcow2 "cluster_size=4k,refcount_bits=4"
qemu-img convert -O raw base.qcow2 base.raw
PREFIX=4k_refcount_bits=4_
for c in leaked_cluster refcount_too_low refcount_zero; do
    damage_case "$c" base
done
make_base base.qcow2 "compat=0.10"
qemu-img convert -O raw base.qcow2 base.raw
PREFIX=v2_
for c in refcount_zero l2_past_eof; do
    damage_case "$c" base
done
PREFIX=

# ---- a dirty image: lazy refcounts, the writer killed -------------------------------------
qemu-img create -q -f qcow2 -o lazy_refcounts=on dirty.qcow2 64M
qemu-io -c 'write -P 1 0 4M' -c 'write -P 2 10M 1M' -c abort dirty.qcow2 >/dev/null 2>&1
ours_vs_qemu dirty.qcow2
same_verdict
[[ $(<o.rc) != 0 ]] || fail "the stale refcounts were not found"
result check_dirty
ours_vs_qemu dirty.qcow2 -r all
same_verdict
qimg_check o.img || fail "qemu-img check after the repair: exit $?"
[[ $(qemu-img info --output=json o.img | jq '."dirty-flag"') == false ]] || fail "still marked dirty"
qimg_compare o.img q.img || fail "reads unlike QEMU's repair"
result check_dirty_repair

# ---- a huge sparse file: memory follows the clusters in use, not the file's size ------------
# A dirty image with 512-byte clusters in a 64 GiB sparse file: 128M clusters, whose counts
# alone took 512 MiB when they were one flat array.
peak_rss() {   # CMD...: runs it; prints "EXIT PEAK_RSS_KIB"
    "$PYTHON" -c 'import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(r, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)' "$@"
}
qemu-img create -q -f qcow2 -o cluster_size=512,lazy_refcounts=on sparse.qcow2 16M
qemu-io -c 'write -P 1 0 64k' -c 'write -P 2 8M 64k' -c abort sparse.qcow2 >/dev/null 2>&1
truncate -s 64G sparse.qcow2
read -r rc kib < <(peak_rss "$UQ" check sparse.qcow2)
[[ $rc == 2 ]] || fail "check exits $rc, want 2 (stale refcounts)"
(( kib < 128 * 1024 )) || fail "check: peak RSS $kib KiB"
read -r rc kib2 < <(peak_rss "$UQ" check -r all sparse.qcow2)
[[ $rc == 0 ]] || fail "check -r all exits $rc"
(( kib2 < 128 * 1024 )) || fail "check -r all: peak RSS $kib2 KiB"
(( $(du -k sparse.qcow2 | cut -f1) < 16 * 1024 )) || fail "the repair wrote $(du -k sparse.qcow2 | cut -f1) KiB"
qimg_check sparse.qcow2 || fail "qemu-img check after the repair: exit $?"
qemu-io -r -c 'read -P 1 0 64k' -c 'read -P 2 8M 64k' sparse.qcow2 >/dev/null 2>&1 || fail "the data does not read back"
note "64 GiB sparse: peak RSS of check $((kib / 1024)) MiB, of check -r all $((kib2 / 1024)) MiB"
result check_sparse_64g_bounded
rm -f sparse.qcow2

# ---- exit codes, output, locks, arguments ---------------------------------------------------
qemu-img create -q -f raw plain.raw 1M
"$UQ" check plain.raw >out.txt 2>&1
rc=$?
qemu-img check plain.raw >/dev/null 2>&1
[[ $rc -eq 63 && $? -eq 63 ]] && grep -q "does not support checks" out.txt && ok check_raw_63 ||
    notok check_raw_63 "exit $rc: $(head -1 out.txt)"
"$UQ" check nothing.qcow2 >out.txt 2>&1
[[ $? -eq 1 ]] && grep -q nothing.qcow2 out.txt && ok check_missing_image_1 || notok check_missing_image_1 "$(head -1 out.txt)"
$DAMAGE snapshot_extra_too_large snap.qcow2 d.qcow2 >/dev/null
"$UQ" check d.qcow2 >out.txt 2>&1
[[ $? -eq 1 ]] && grep -q "Check failed" out.txt && grep -q "offline repair" out.txt &&
    ok check_cannot_complete_1 || notok check_cannot_complete_1 "$(head -2 out.txt | tr '\n' ' ')"
# The details go to stderr, the summary to stdout; JSON for jq.
$DAMAGE leaked_cluster base.qcow2 d.qcow2 >/dev/null
"$UQ" check d.qcow2 >out.txt 2>err.txt
[[ $? -eq 3 ]] && grep -q "^Leaked cluster" err.txt && grep -q "1 leaked clusters were found" out.txt &&
    ! grep -q Leaked out.txt && ok check_output_streams || notok check_output_streams "$(head -2 out.txt err.txt | tr '\n' ' ')"
[[ $("$UQ" check --json d.qcow2 2>/dev/null | jq .leaks) == 1 ]] && ok check_json_jq || notok check_json_jq "no leaks field"
"$UQ" check -q d.qcow2 >out.txt 2>/dev/null
[[ $? -eq 3 && ! -s out.txt ]] && ok check_quiet || notok check_quiet "-q printed a summary"
cp d.qcow2 d2.qcow2
"$UQ" check -r leaks d2.qcow2 >out.txt 2>&1
[[ $? -eq 0 ]] && grep -q "Double checking the fixed image now" out.txt && grep -q "1 leaked clusters" out.txt &&
    ok check_repair_summary || notok check_repair_summary "$(head -3 out.txt | tr '\n' ' ')"

hold_image d.qcow2
"$UQ" check d.qcow2 >out.txt 2>&1
rc=$?
[[ $rc -eq 1 ]] && grep -qi "lock\|in use\|busy" out.txt && ok check_locked_refused ||
    notok check_locked_refused "exit $rc: $(head -1 out.txt)"
sum=$(md5sum <d.qcow2)
"$UQ" check -r all d.qcow2 >/dev/null 2>&1
[[ $? -eq 1 && $(md5sum <d.qcow2) == "$sum" ]] && ok check_repair_locked_refused ||
    notok check_repair_locked_refused "a repair touched an image in use"
release_image
"$UQ" check -U -r all d.qcow2 >out.txt 2>&1
[[ $? -eq 1 ]] && grep -q "cannot be used with -r" out.txt && ok check_force_share_no_repair ||
    notok check_force_share_no_repair "$(head -1 out.txt)"
"$UQ" check -r some d.qcow2 >out.txt 2>&1
[[ $? -eq 1 ]] && grep -q "leaks or all" out.txt && ok check_bad_repair_mode || notok check_bad_repair_mode "$(head -1 out.txt)"
"$UQ" check --help | grep -q "Exit status" && ok check_help || notok check_help "no usage"
"$UQ" --help | grep -qE "^  check " && ok check_in_command_list || notok check_in_command_list "missing"
san_clean && ok check_sanitizers_clean || notok check_sanitizers_clean "sanitizer report"
