#!/usr/bin/env bash
# Power-loss simulation.  For each image configuration (see prep_image in lib.sh), crashsim
# records a seeded random workload run by the engine at depth 6 (allocating and partial-cluster
# writes, COW from zeros / the backing file / snapshot-shared and compressed clusters, discard,
# write-zeroes, refcount-table growth, FUA writes, flushes), then builds crash images: the
# starting image plus every write a completed sync made durable plus a random subset (whole,
# dropped, sector-torn, prefix) of the writes in flight.  Verdicts for every crash image:
#   (a) qemu-img check: exit 0 or 3 (leaks allowed), never corruption (for a crash image
#       still dirty, after the engine's repair on open, i.e. in (c));
#   (b) the guest view (qemu-img convert) holds every sector acknowledged before a completed
#       flush (or FUA), every other sector one of its possible values, and the engine reads
#       exactly what qemu reads;
#   (c) the engine opens it, writes, flushes, reads back, closes; qemu-img check: 0 or 3.
# CI runs a bounded sample; SOAK=1 many more (several seeds, more states each).
# timeout: 600
# soak-timeout: 7200
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/lib.sh"

need_cmd qemu-img qemu-io cc || { skip powerloss "qemu-img, qemu-io or cc missing"; exit 0; }
find_crashsim powerloss || exit 1
crash_workdir

if [[ ${SOAK:-0} == 1 ]]; then
    SEEDS=(1 2 3 4 5 6); STATES=300; OPS=400
else
    SEEDS=(${POWERLOSS_SEED:-$((RANDOM % 1000 + 1))}); STATES=${POWERLOSS_STATES:-36}; OPS=200
fi
# CI time budget: the extended-L2 and discard-no-unref configurations check fewer states.
declare -A CI_STATES=([ext32k]=24 [nounref]=24 [datafile]=18 [dataraw]=18 [bitmap]=12)
CONFIGS=(${POWERLOSS_CONFIGS:-snap64k backv2 tiny512 dirty ext32k nounref datafile dataraw bitmap})
BATCH=12
TOTAL=0

# keep_failure NAME FILE...: copy evidence to $UQ_TMP/failures (kept with KEEP_TMP=1).
keep_failure() {
    local name=$1; shift
    mkdir -p "$UQ_TMP/failures/$name"
    cp "$@" "$UQ_TMP/failures/$name/" 2>/dev/null
    note "evidence kept in $UQ_TMP/failures/$name"
}

# first_failure MSG: remember the first failure of a configuration.
first_failure() { [[ -n $first ]] || first=$1; }

# run_config CONFIG SEED: record, then check STATES crash states in batches.
run_config() {
    local cfg=$1 seed=$2 name="powerloss_${1}_seed$2" d="$W/$1.$2"
    mkdir -p "$d"
    prep_run_dir "$name" "$cfg" "$d" || return
    local init work
    init=$(config_image "$cfg" "$d" init) work=$(config_image "$cfg" "$d" work)
    local backraw=-
    [[ -e $d/log.backraw ]] && backraw=$d/log.backraw
    # shellcheck disable=SC2046
    if ! timeout -k 5 300 "$CRASHSIM" record "$work" "$d/log" --seed "$seed" --ops "$OPS" \
        --depth 6 $(config_flags "$cfg") >"$d/record.out" 2>&1; then
        sed 's/^/#   /' "$d/record.out" | tail -20 >&2
        notok "$name" "the workload itself failed: $(grep -m1 problem "$d/record.out")"
        keep_failure "$name" "$init" "$d/record.out"
        return
    fi
    note "$cfg seed $seed: $(cat "$d/record.out")"
    # After a clean close: no leaks at all.
    if ! in_dir "$work" qimg_check "$work"; then
        notok "$name" "qemu-img check after the recorded run and a clean close: exit $?"
        keep_failure "$name" "$work" "$init"
        return
    fi

    local done=0 fails=0 first= leaks=0 dirty_n=0 states=$STATES
    if [[ ${SOAK:-0} != 1 && -z ${POWERLOSS_STATES:-} ]]; then states=${CI_STATES[$cfg]:-$STATES}; fi
    while [[ $done -lt $states && $fails -eq 0 ]]; do
        local n=$((states - done < BATCH ? states - done : BATCH))
        rm -rf "$d"/st.* "$d/list"
        # shellcheck disable=SC2046
        if ! timeout -k 5 300 "$CRASHSIM" crash "$d/log" "$init" "$d/st" $(config_flags "$cfg") \
            --seed $((seed * 1000 + done)) --count-states "$n" >"$d/states" 2>"$d/crash.err"; then
            notok "$name" "crashsim crash failed: $(head -c 300 "$d/crash.err")"; return
        fi
        local i t dirty rest rc
        while read -r i t dirty rest; do
            t=${t#t=}; dirty=${dirty#dirty=}
            local img raw="$d/st.$i.raw" sid="seed $seed state $((done + i)) t=$t"
            img=$(config_image "$cfg" "$d" "st.$i")
            if [[ $dirty == 0 ]]; then
                in_dir "$img" qemu-img check "$img" >"$d/check.out" 2>&1; rc=$?
                if [[ $rc -ne 0 && $rc -ne 3 ]]; then
                    first_failure "(a) $sid: qemu-img check exit $rc: $(grep -m1 -E 'ERROR|Leaked|corrupt' "$d/check.out")"
                    sed 's/^/#   /' "$d/check.out" | head -20 >&2
                    keep_failure "$name.$((done + i))" "$img" "$d/states"
                    fails=$((fails + 1)); continue
                fi
                [[ $rc -eq 3 ]] && leaks=$((leaks + 1))
            else
                dirty_n=$((dirty_n + 1))
            fi
            if ! in_dir "$img" qemu-img convert -f qcow2 -O raw "$img" "$raw" 2>"$d/convert.err"; then
                first_failure "(b) $sid: qemu-img convert failed: $(head -c 200 "$d/convert.err")"
                keep_failure "$name.$((done + i))" "$img"
                fails=$((fails + 1)); continue
            fi
            if [[ $cfg == bitmap ]] && ! bitmap_covers "$img" "$raw" "$d/log.initraw" >"$d/cov.out" 2>&1; then
                first_failure "(b) $sid: $(tail -1 "$d/cov.out")"
                keep_failure "$name.$((done + i))" "$img"
                fails=$((fails + 1)); continue
            fi
            # data_file_raw: the data file alone is a raw image of the guest disk, and after a
            # crash a valid crash state of it (as QEMU, the two views may disagree on writes
            # not yet flushed: data lands before the entry that maps it).
            if [[ $cfg == dataraw ]] && ! cmp -s "$raw" "$(dirname "$img")/data.raw" &&
                ! "$CRASHSIM" verify "$d/log" "$(dirname "$img")/data.raw" "$d/log.initraw" - "$t" \
                    >"$d/verify.out" 2>&1; then
                first_failure "(b) $sid: the raw data file is no valid crash state: $(head -c 200 "$d/verify.out")"
                keep_failure "$name.$((done + i))" "$img" "$(dirname "$img")/data.raw"
                fails=$((fails + 1)); continue
            fi
            echo "$img $raw $t" >>"$d/list"
        done <"$d/states"
        if [[ -s $d/list ]]; then
            timeout -k 5 600 "$CRASHSIM" check "$d/log" "$d/log.initraw" "$backraw" \
                "$d/list" >"$d/check-list.out" 2>"$d/check-list.err"
            grep -v '^ok ' "$d/check-list.out" | sed 's/^/#   /' >&2
            local word img2 why
            while read -r word img2 why; do
                [[ $word == ok || $word == bad ]] || continue
                img2=${img2%:}; local k=${img2##*/st.}; k=${k%.qcow2}; k=${k%/disk}
                if [[ $word != ok ]]; then
                    first_failure "(b/c) seed $seed state $((done + k)): $why; $(grep -m2 -E 'reopen:|sector' "$d/check-list.out" | tr '\n' ' ')"
                    keep_failure "$name.$((done + k))" "$img2" "$d/states" "$d/check-list.out" "$init" \
                        "$d"/log.* "$d/list"
                    fails=$((fails + 1)); continue
                fi
                in_dir "$img2" qemu-img check "$img2" >"$d/check.out" 2>&1; rc=$?
                if [[ $rc -ne 0 && $rc -ne 3 ]]; then
                    first_failure "(c) seed $seed state $((done + k)): qemu-img check after the engine's own writes: exit $rc: $(grep -m1 -E 'ERROR|corrupt' "$d/check.out")"
                    sed 's/^/#   /' "$d/check.out" | head -20 >&2
                    keep_failure "$name.$((done + k))" "$img2" "$d/states"
                    fails=$((fails + 1))
                fi
            done <"$d/check-list.out"
            if [[ $(grep -c -E '^(ok|bad) ' "$d/check-list.out") -ne $(grep -c '' "$d/list") ]]; then
                first_failure "crashsim check stopped early: $(tail -c 300 "$d/check-list.err")"
                fails=$((fails + 1))
            fi
        fi
        done=$((done + n))
    done
    TOTAL=$((TOTAL + done))
    if [[ $fails -gt 0 ]]; then
        notok "$name" "$first (starting image: prep_image $cfg; workload: crashsim record --seed $seed --ops $OPS --depth 6 $(config_flags "$cfg"))"
    else
        ok "$name: $done crash states ($leaks with leaks, $dirty_n still dirty) pass (a) check, (b) data, (c) reopen+write"
    fi
    rm -rf "$d"
}

for seed in "${SEEDS[@]}"; do
    for cfg in "${CONFIGS[@]}"; do
        run_config "$cfg" "$seed"
    done
done
echo "# powerloss: $TOTAL crash states checked"
