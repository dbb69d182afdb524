#!/usr/bin/env bash
# Run every test: unit test binaries BUILD_DIR/tests/test_* and shell suites tests/*/t_*.sh.
#
# Usage: tests/run.sh BUILD_DIR [PATTERN]
#   PATTERN (extended regex) keeps only the tests whose path matches.
# Environment: KEEP_TMP=1 keeps each script's scratch dir; SOAK=1 is passed through;
#   CI=true makes a skipped VM test a failure.
#
# Each test prints `ok NAME`, `not ok NAME: why` or `skip NAME: why` lines; they are echoed
# as they come and counted.  A test that exits non-zero (or times out) without printing any
# `not ok`, prints no result at all, leaves a sanitizer report, or leaves processes behind
# counts as one more failure.  Full output of each test: BUILD_DIR/test-logs/.
# Default timeout per test 600 s; a script may declare `# timeout: N` (and `# soak-timeout: N`).
set -uo pipefail

if [[ $# -lt 1 || ! -d $1 ]]; then
    echo "usage: tests/run.sh BUILD_DIR [PATTERN]" >&2
    exit 2
fi
BUILD=$(cd "$1" && pwd)
PATTERN=${2:-}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2

export UQ=$BUILD/ublk-qcow2
export SOAK=${SOAK:-0}
# LeakSanitizer works as root here; keep going after a report so the log holds all of it.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
LOGDIR=$BUILD/test-logs
mkdir -p "$LOGDIR"
TMPBASE=${TMPDIR:-/tmp}

passed=0 failed=0 skipped=0
SAN_RE='ERROR: AddressSanitizer|runtime error:|LeakSanitizer'
RESULT_RE='^(ok|not ok|skip)( |$)'

# Tests, in order: unit binaries, then shell scripts (each list sorted).
tests=()
for f in "$BUILD"/tests/test_*; do
    [[ -f $f && -x $f ]] && tests+=("$f")
done
while IFS= read -r f; do
    [[ -x $f ]] && tests+=("$f")
done < <(ls tests/*/t_*.sh 2>/dev/null | LC_ALL=C sort)

declared() {  # declared SCRIPT KEY: value of a `# KEY: N` line, if any
    grep -m1 -E "^# $2: *[0-9]+ *$" "$1" 2>/dev/null | sed -E 's/.*: *([0-9]+) *$/\1/'
}

run_one() {
    local t=$1 rel=${1#"$ROOT"/} name
    if [[ $t == *.sh ]]; then name=${rel#tests/}; name=${name%.sh}; else name=unit/${t##*/}; fi
    name=${name//\//_}
    local log=$LOGDIR/$name.log
    local limit=600 v
    if [[ $t == *.sh ]]; then
        v=$(declared "$t" timeout); [[ -n $v ]] && limit=$v
        if [[ $SOAK == 1 ]]; then v=$(declared "$t" soak-timeout); [[ -n $v ]] && limit=$v; fi
    fi
    local scratch
    scratch=$(mktemp -d "$TMPBASE/uq-$name.XXXXXX") || { echo "not ok $rel: no scratch dir"; failed=$((failed + 1)); return; }
    mkdir -p "$scratch/tmp" "$scratch/san"
    # Sanitizer reports go to files too, so those of daemons (whose stderr may be gone) count.
    local asan="$ASAN_OPTIONS:log_path=$scratch/san/asan" ubsan="$UBSAN_OPTIONS:log_path=$scratch/san/ubsan"

    : >"$log"
    local t0=$SECONDS
    # timeout runs the test in its own process group, so leftovers can be found afterwards.
    UQ_TMP=$scratch/tmp UQ_SAN_DIR=$scratch/san ASAN_OPTIONS=$asan UBSAN_OPTIONS=$ubsan \
        timeout -k 10 "$limit" "$t" </dev/null >>"$log" 2>&1 &
    local pid=$!
    # Echo result lines live; tail stops once the test has been reaped.
    tail -n +1 -s 0.2 -f --pid="$pid" "$log" 2>/dev/null | grep --line-buffered -E "$RESULT_RE" &
    local echo_pid=$!
    wait "$pid"
    local rc=$?
    wait "$echo_pid"

    # Processes the test left in its group: kill them by pid, count it against the test.
    local left=() p i
    for ((i = 0; i < 20; i++)); do
        mapfile -t left < <(pgrep -g "$pid" 2>/dev/null)
        [[ ${#left[@]} -eq 0 ]] && break
        [[ $i -eq 0 ]] || sleep 0.1   # bounded grace for processes already exiting
    done
    local leftover=
    if [[ ${#left[@]} -gt 0 ]]; then
        for p in "${left[@]}"; do
            leftover+=" $(tr '\0' ' ' </proc/"$p"/cmdline 2>/dev/null | cut -c1-80)"
            kill -KILL "$p" 2>/dev/null
        done
    fi

    # Count this test's result lines.
    local n_ok n_notok n_skip n_vmskip=0
    n_ok=$(grep -c -E '^ok( |$)' "$log")
    n_notok=$(grep -c -E '^not ok( |$)' "$log")
    n_skip=$(grep -c -E '^skip( |$)' "$log")
    if [[ ${CI:-} == true ]]; then
        n_vmskip=$(grep -E '^skip( |$)' "$log" | grep -c -i -E '(^|[^a-z])vm([^a-z]|$)')
        if [[ $n_vmskip -gt 0 ]]; then
            echo "not ok $rel: $n_vmskip VM test(s) skipped in CI"
            failed=$((failed + n_vmskip))
            n_skip=$((n_skip - n_vmskip))
        fi
    fi
    passed=$((passed + n_ok))
    failed=$((failed + n_notok))
    skipped=$((skipped + n_skip))

    # Test-level failures.
    local why=()
    if [[ $rc -ne 0 && $n_notok -eq 0 ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then why+=("exit $rc (timed out after ${limit}s)")
        else why+=("exit $rc"); fi
    elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
        echo "# $rel: timed out after ${limit}s" >>"$log"
    fi
    if [[ $((n_ok + n_notok + n_skip + n_vmskip)) -eq 0 && $rc -eq 0 ]]; then
        why+=("printed no test result")
    fi
    local sanfiles=()
    mapfile -t sanfiles < <(find "$scratch/san" -type f -size +0 2>/dev/null)
    if [[ ${#sanfiles[@]} -gt 0 ]]; then
        cat "${sanfiles[@]}" >>"$log"
    fi
    if grep -q -E "$SAN_RE" "$log"; then
        why+=("sanitizer report")
    fi
    if [[ -n $leftover ]]; then
        echo "# left running:$leftover" >>"$log"
        why+=("left processes running:$leftover")
    fi
    if [[ ${#why[@]} -gt 0 ]]; then
        local IFS=';'
        echo "not ok $rel: ${why[*]}"
        failed=$((failed + 1))
    fi
    if [[ ${#why[@]} -gt 0 || $n_notok -gt 0 ]]; then
        echo "# --- tail of $log"
        if grep -q -E "$SAN_RE" "$log"; then
            grep -m1 -A30 -E "$SAN_RE" "$log" | sed 's/^/#   /'
        else
            tail -n 30 "$log" | sed 's/^/#   /'
        fi
    fi

    echo "# $rel: $((SECONDS - t0)) s"
    if [[ ${KEEP_TMP:-0} == 1 ]]; then
        echo "# $rel: scratch kept in $scratch"
    else
        rm -rf "$scratch"
    fi
}

for t in "${tests[@]}"; do
    if [[ -n $PATTERN ]] && ! [[ $t =~ $PATTERN ]]; then continue; fi
    run_one "$t"
done

summary="$passed passed, $failed failed"
[[ $skipped -gt 0 ]] && summary+=", $skipped skipped"
echo "$summary"
[[ $failed -eq 0 ]]
