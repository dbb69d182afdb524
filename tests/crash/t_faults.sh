#!/usr/bin/env bash
# Fault injection through the file layer's test hooks (crashsim faults): EIO and ENOSPC on
# guest-data writes (those carrying guest-written sectors), on metadata writes (tables,
# refcounts, header; also zero-filled data), on fsync (any, or the one after a header switch
# when the refcount table grows); EIO and short
# reads; and a file that cannot grow past a given offset (out of space while the image grows,
# including refcount-table growth on 512-byte clusters).  The workload runs at depth 6 with
# the faults armed, then a clean phase, then close.  Checked:
#   - every failed request returns the injected errno (EIO after a failed fsync), and at
#     least one request reports each injected fault (short reads excepted: they look like
#     the end of the file);
#   - in the clean phase every request is served again (after a failed fsync: reads);
#   - after a failed fsync no later flush, and not the close, reports success;
#   - reads during the run return what was last written (except under short reads);
#   - after close: qemu-img check shows no corruption (exit 0 or 3), and the data check
#     (crashsim verify) finds every write acknowledged before a successful flush (short
#     reads excepted: they read as the end of the file, i.e. zeros);
#   - a fault while opening (reading tables, repairing a dirty image) fails the open with a
#     message naming the image and the error.
# timeout: 600
# soak-timeout: 3600
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/lib.sh"

need_cmd qemu-img qemu-io cc || { skip faults "qemu-img, qemu-io or cc missing"; exit 0; }
find_crashsim faults || exit 1
crash_workdir
SEED=${FAULTS_SEED:-$((RANDOM % 1000 + 1))}
note "faults: seed $SEED"
TOTAL_INJECTED=0 SCENARIOS=0

# scenario NAME CONFIG CRASHSIM-FAULT-ARGS...
scenario() {
    local name=faults_$1 cfg=$2; shift 2
    local d="$W/$name"
    mkdir -p "$d"
    prep_run_dir "$name" "$cfg" "$d" || return
    local backraw=-
    [[ -e $d/log.backraw ]] && backraw=$d/log.backraw
    local args=("$@")
    local limit_i
    for limit_i in "${!args[@]}"; do
        # "+N" after --space-limit: N bytes past the starting file's end.
        if [[ ${args[$limit_i]} == +* ]]; then
            args[$limit_i]=$(( $(stat -c %s "$d/init.qcow2") + ${args[$limit_i]#+} ))
        fi
    done
    timeout -k 5 300 "$CRASHSIM" faults "$d/work.qcow2" "$d/log" --seed "$SEED" --ops 150 --ops2 60 \
        --depth 6 "${args[@]}" >"$d/out" 2>"$d/err"
    local rc=$? summary
    summary=$(grep -m1 '^requests=' "$d/out")
    note "$name: $summary"
    grep -v -E '^requests=' "$d/err" | grep -v -E 'flush failed|suspect' | head -5 | sed 's/^/#   /' >&2
    local inj
    inj=$(sed -n 's/.*injected=\([0-9]*\).*/\1/p' <<<"$summary")
    TOTAL_INJECTED=$((TOTAL_INJECTED + ${inj:-0}))
    SCENARIOS=$((SCENARIOS + 1))
    if [[ $rc -ne 0 ]]; then
        notok "$name" "crashsim faults ${args[*]} (seed $SEED): exit $rc: $(grep -m1 problem "$d/out")$(tail -n1 "$d/err")"
        return
    fi
    if [[ ${inj:-0} -eq 0 ]]; then
        notok "$name" "no fault was injected (seed $SEED, ${args[*]}; $(grep -o 'class_ops=[0-9]*' <<<"$summary")): the scenario tests nothing"
        return
    fi
    qemu-img check "$d/work.qcow2" >"$d/check.out" 2>&1; rc=$?
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        sed 's/^/#   /' "$d/check.out" | head -20 >&2
        notok "$name" "qemu-img check after close: exit $rc: $(grep -m1 -E 'ERROR|corrupt' "$d/check.out") (seed $SEED, ${args[*]})"
        return
    fi
    qemu-img convert -f qcow2 -O raw "$d/work.qcow2" "$d/work.raw" ||
        { notok "$name" "qemu-img convert after close failed"; return; }
    if [[ " $* " == *" SHORT "* ]]; then
        # A short read looks like the end of the file: the engine reads the rest as zeros (as
        # QEMU does past the end of a file), so data read short may have been copied on write
        # or written back as zeros.  Only the structure is judged here.
        "$CRASHSIM" verify "$d/log" "$d/work.raw" "$d/log.initraw" "$backraw" end >"$d/verify.out" 2>&1 ||
            note "$name: after short reads: $(tail -n1 "$d/verify.out")"
        ok "$name: ${inj:-0} short reads, no crash or hang, image structure consistent (check exit $rc)"
        return
    fi
    if ! "$CRASHSIM" verify "$d/log" "$d/work.raw" "$d/log.initraw" "$backraw" end >"$d/verify.out" 2>&1; then
        sed 's/^/#   /' "$d/verify.out" | head -8 >&2
        notok "$name" "data after close: $(grep -m1 sector "$d/verify.out") (seed $SEED, ${args[*]})"
        return
    fi
    local leaks=
    [[ $rc -eq 3 ]] && leaks=", leaks"
    ok "$name: $inj faults injected, $(sed -n 's/.*failed=\([0-9]*\).*/\1/p' <<<"$summary") requests failed as expected${leaks}"
}

# nth: which operation of the class fails first; varies with the seed.  The range must stay
# inside the class's count for every seed (summary's class_ops): over seeds 1-1000 (the
# range SEED is drawn from) snap64k's workload makes at least 20 reads and backv2's at
# least 6 (seed 2), so read faults pick nth from 1-20 there and 1-6 here.
n() { echo $(( (SEED * 7919 + $1) % $2 + 1 )); }

# open_scenario NAME CONFIG ARGS...: a fault while opening must fail the open with a message
# naming the image and the error (exit 2), never crash, hang or open a damaged image.
open_scenario() {
    local name=faults_$1 cfg=$2; shift 2
    local d="$W/$name"
    mkdir -p "$d"
    prep_image "$cfg" "$d" >/dev/null || { notok "$name" "cannot prepare the starting image"; return; }
    cp "$d/init.qcow2" "$d/work.qcow2"
    timeout -k 5 120 "$CRASHSIM" faults "$d/work.qcow2" "$d/log" --seed "$SEED" --ops 20 --ops2 5 \
        --depth 2 --at-open "$@" >"$d/out" 2>"$d/err"
    local rc=$?
    SCENARIOS=$((SCENARIOS + 1))
    local inj
    inj=$(sed -n 's/.*injected=\([0-9]*\).*/\1/p' "$d/out")
    if [[ $rc -eq 2 ]]; then
        TOTAL_INJECTED=$((TOTAL_INJECTED + 1))
        if grep -q "work.qcow2.*Input/output error" "$d/err"; then
            ok "$name: open fails with '$(head -c 160 "$d/err" | tr '\n' ' ')'"
        else
            notok "$name" "open failed without naming the error: '$(head -c 300 "$d/err")' (seed $SEED, $*)"
        fi
        return
    fi
    TOTAL_INJECTED=$((TOTAL_INJECTED + ${inj:-0}))
    # The fault hit after the open: then the usual rules apply.
    if [[ $rc -ne 0 ]]; then
        notok "$name" "exit $rc: $(grep -m1 problem "$d/out")$(tail -n1 "$d/err") (seed $SEED, $*)"
        return
    fi
    qemu-img check "$d/work.qcow2" >"$d/check.out" 2>&1; rc=$?
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        notok "$name" "qemu-img check after close: exit $rc (seed $SEED, $*)"
        return
    fi
    ok "$name: the fault hit after the open (${inj:-0} injected); image consistent"
}

run_all() {
    open_scenario open_read_eio   snap64k --class read --errno EIO --nth "$(n 12 4)" --count 1
    open_scenario open_repair_sync dirty  --class sync --errno EIO --nth 1 --count 1
    open_scenario open_repair_meta dirty  --class meta --errno EIO --nth "$(n 13 3)" --count 1
    scenario data_eio        snap64k --class data --errno EIO    --nth "$(n 1 20)" --count 1
    scenario data_enospc     backv2  --class data --errno ENOSPC --nth "$(n 2 20)" --count 1
    scenario data_eio_burst  snap64k --class data --errno EIO    --nth "$(n 3 10)" --count 0
    scenario meta_eio        snap64k --class meta --errno EIO    --nth "$(n 4 10)" --count 1
    scenario meta_enospc     tiny512 --class meta --errno ENOSPC --nth "$(n 5 30)" --count 2
    scenario meta_eio_burst  backv2  --class meta --errno EIO    --nth "$(n 6 6)"  --count 5
    scenario sync_eio        snap64k --class sync --errno EIO    --nth "$(n 7 8)"  --count 1
    scenario sync_eio_dirty  dirty   --class sync --errno EIO    --nth "$(n 8 12)" --count 1
    # The sync after the header switch of a refcount-table growth.
    scenario sync_eio_reftable tiny512 --class hdrsync --errno EIO --nth 1 --count 1 --ops 300
    scenario read_eio        backv2  --class read --errno EIO    --nth "$(n 9 6)" --count 1
    scenario read_eio_burst  snap64k --class read --errno EIO    --nth "$(n 10 20)" --count 4
    scenario read_short      snap64k --class read --errno SHORT  --nth "$(n 11 20)" --count 3
    scenario nospace_grow    snap64k --space-limit +196608
    scenario nospace_reftable tiny512 --space-limit +180000
}

if [[ ${SOAK:-0} == 1 ]]; then
    for SEED in $SEED $((SEED + 1)) $((SEED + 2)) $((SEED + 3)) $((SEED + 4)); do run_all; done
else
    run_all
fi
echo "# faults: $SCENARIOS scenarios, $TOTAL_INJECTED faults injected"
