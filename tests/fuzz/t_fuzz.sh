#!/usr/bin/env bash
# libFuzzer targets (make fuzz -> build/fuzz, clang with ASan/UBSan): each runs for a bounded
# time from its committed seed corpus (tests/fuzz/corpus_*; new inputs go to a scratch copy).
#   fuzz_header  header, header extensions and snapshot table parsing
#   fuzz_image   open a mutated image, then reads, writes, discards, write-zeroes, flushes,
#                close + reopen (seeds: qemu-img images of the interop matrix, mkseeds.py)
#   fuzz_nbd     the NBD handshake and request parser, a client stream over a socketpair
# A target fails on any crash, leak, timeout (10 s per input), out-of-memory (1 GiB) or
# sanitizer report; the input is kept in build/fuzz/artifacts/.  Prints the executions run.
# FUZZ_SECONDS (default 18; SOAK=1: 600) sets the time per target, FUZZ_TARGETS which run.
# timeout: 300
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
need_cmd clang || { skip fuzz "clang is not installed (tests/deps.sh installs it)"; exit 0; }
if [[ ${SOAK:-0} == 1 ]]; then SECS=${FUZZ_SECONDS:-600}; else SECS=${FUZZ_SECONDS:-18}; fi
TARGETS=(${FUZZ_TARGETS:-fuzz_header fuzz_image fuzz_nbd})

# The build shares make's dependency tracking with everything else (one make at a time).
if ! env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$REPO_ROOT" -s -j2 fuzz >"$UQ_TMP/make.log" 2>&1; then
    sed 's/^/#   /' "$UQ_TMP/make.log" | tail -30 >&2
    notok fuzz_build "make fuzz failed: $(grep -m1 -E 'error' "$UQ_TMP/make.log")"
    exit 1
fi
ok fuzz_build

# Scratch files of the targets on tmpfs when there is one (syncs cost nothing there).
FTMP=$UQ_TMP
if [[ -d /dev/shm && -w /dev/shm ]] && FTMP=$(mktemp -d /dev/shm/uq-fuzz.XXXXXX 2>/dev/null); then
    at_exit "rm -rf '$FTMP'"
else
    FTMP=$UQ_TMP
fi
# A qcow2 backing file for seeds made with "-b base.qcow2".
qemu-img create -q -f qcow2 -o cluster_size=4096 "$FTMP/base.qcow2" 1M >&2 &&
    qemu-io -f qcow2 "$FTMP/base.qcow2" -c 'write -P 91 0 64k' >/dev/null 2>&1 ||
    rm -f "$FTMP/base.qcow2"

ART=$REPO_ROOT/build/fuzz/artifacts
mkdir -p "$ART"
TOTAL=0
for t in "${TARGETS[@]}"; do
    corpus=$HERE/corpus_${t#fuzz_}
    work=$UQ_TMP/corpus.$t
    mkdir -p "$work"
    note "=== $t: $SECS s from $corpus"
    # Our own sanitizer settings: reports go to this log (not to files), leaks are checked
    # after every input that allocated more than it freed.
    rc=0
    TMPDIR=$FTMP UQ_FUZZ_BASE=$FTMP/base.qcow2 \
        ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 \
        UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        timeout -k 10 $((SECS + 120)) "$REPO_ROOT/build/fuzz/$t" -max_total_time="$SECS" \
        -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=1024 -print_final_stats=1 \
        -artifact_prefix="$ART/$t-" "$work" "$corpus" >"$UQ_TMP/$t.out" 2>&1 || rc=$?
    grep -v -E '^#[0-9]+\s+(NEW|REDUCE|pulse)|^"|Recommended dictionary|End of recommended' \
        "$UQ_TMP/$t.out" | tail -40 >&2
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$UQ_TMP/$t.out")
    art=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$UQ_TMP/$t.out" | head -1)
    why=
    if [[ $rc -ne 0 ]]; then
        kind=$(grep -m1 -o -E 'ERROR: (AddressSanitizer|LeakSanitizer|libFuzzer): [a-z-]+[^ ]*|runtime error: .*|ALARM: working on the last Unit for [0-9]+ seconds|out-of-memory \([^)]*\)' "$UQ_TMP/$t.out")
        why="exit $rc: ${kind:-see the log}${art:+; input kept in $art}"
    elif [[ -z $execs ]]; then
        why="no statistics printed"
    elif grep -q -E 'ERROR: (AddressSanitizer|LeakSanitizer)|runtime error:' "$UQ_TMP/$t.out"; then
        why="sanitizer report"
    fi
    if [[ -n $why ]]; then
        notok "$t" "$why"
    else
        ok "$t: $execs executions in $SECS s, no crash, leak, hang or sanitizer report"
        TOTAL=$((TOTAL + execs))
    fi
done
echo "# fuzz: $TOTAL executions"
