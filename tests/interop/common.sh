# Interop matrix, shared logic: QEMU is the oracle.
#
# A case prepares an image; the same seeded workload is applied to a reference copy with
# qemu-io (QEMU's qcow2 driver) and to our copy through the NBD export; then our server must
# exit 0 on SIGTERM, `qemu-img check` must find our copy clean (no errors, no leaks) and
# `qemu-img compare` must find both copies identical.
#
# Sourced after lib.sh.

INTEROP_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
WORKLOAD=$INTEROP_DIR/workload.py
export PYTHONPATH=$INTEROP_DIR${PYTHONPATH:+:$PYTHONPATH}    # qhdr.py for inline scripts

# Fixed seeds keep failures reproducible; SEED=N overrides, SOAK=1 adds more rounds.
SEED_BASE=${SEED:-1}
ROUNDS=1
[[ ${SOAK:-0} == 1 ]] && ROUNDS=${SOAK_ROUNDS:-5}

FAIL=  # reason of the current case's failure
FAILED_CASES=0

fail() { [[ -n $FAIL ]] || FAIL=$*; return 1; }

# A stable number from a case name (so each case gets its own seed).
name_seed() { cksum <<<"$1" | awk '{ print $1 % 100000 }'; }

img_info_json() { qemu-img info -U --output=json "$1"; }
img_vsize()     { img_info_json "$1" | jq -r '."virtual-size"'; }
img_csize()     { img_info_json "$1" | jq -r '."cluster-size" // 65536'; }

# qio_cmds FMT TARGET [qemu-io opts] -- CMD...: run the given commands in one qemu-io.
qio_cmds() {
    local fmt=$1 target=$2; shift 2
    local opts=()
    while [[ $# -gt 0 && $1 != -- ]]; do opts+=("$1"); shift; done
    shift
    printf '%s\n' "$@" >"$UQ_TMP/cmds.txt"
    qio "$fmt" "$target" "$UQ_TMP/cmds.txt" "${opts[@]}"
}

# make_image PATH SIZE OPTS [PREFILL-CMD...]: qemu-img create -f qcow2 -o OPTS, then run the
# prefill commands with qemu-io directly (so our server starts from QEMU-written metadata).
make_image() {
    local path=$1 size=$2 opts=$3; shift 3
    local o=()
    [[ -n $opts ]] && o=(-o "$opts")
    qemu-img create -q -f qcow2 "${o[@]}" "$path" "$size" >&2 || return 1
    if [[ $# -gt 0 ]]; then
        qio_cmds qcow2 "$path" -- "$@" || return 1
    fi
}

# Default prefill: a few QEMU-written extents for the workload to overwrite.
PREFILL=("write -P 165 0 3M" "write -P 90 5M 1M" "write -P 17 7340032 12345" "write -z 9M 1M")

# apply_workload DIR FMT SEED [--server-opt OPT]... [--wl-opt OPT]... [--extra CMD]... [--cwd D]
# DIR/ref.IMG and DIR/ours.IMG exist (IMG = qcow2 or raw by FMT).  Applies extra commands
# followed by the seeded workload to both, stops the server and judges.  Sets FAIL.
# --cwd D starts the server from directory D, naming the image relative to D.
apply_workload() {
    local dir=$1 fmt=$2 seed=$3; shift 3
    local sopts=() wopts=() extra=() cwd=
    while [[ $# -gt 0 ]]; do
        case $1 in
            --cwd) cwd=$2; shift 2 ;;
            --server-opt) sopts+=("$2"); shift 2 ;;
            --wl-opt) wopts+=("$2"); shift 2 ;;
            --extra) extra+=("$2"); shift 2 ;;
            *) note "apply_workload: bad option $1"; return 2 ;;
        esac
    done
    local ref=$dir/ref.$fmt ours=$dir/ours.$fmt
    local size cs
    size=$(img_vsize "$ours") || { fail "qemu-img info failed"; return 1; }
    if [[ $fmt == qcow2 ]]; then cs=$(img_csize "$ours"); else cs=65536; fi
    {
        [[ ${#extra[@]} -gt 0 ]] && printf '%s\n' "${extra[@]}"
        "$PYTHON" "$WORKLOAD" "$seed" "$size" "$cs" "${wopts[@]}"
    } >"$dir/workload.txt" || { fail "workload generator failed"; return 1; }

    qio "$fmt" "$ref" "$dir/workload.txt" || { fail "qemu-io on the reference failed (harness)"; return 1; }

    local src=$ours
    if [[ -n $cwd ]]; then
        pushd "$cwd" >/dev/null || { fail "no directory $cwd"; return 1; }
        src=$(realpath --relative-to=. "$ours")
    fi
    start_nbd "$src" "${sopts[@]}"
    local src_rc=$?
    [[ -n $cwd ]] && popd >/dev/null
    [[ $src_rc -eq 0 ]] || { fail "server did not start (exit $src_rc)"; return 1; }
    qio raw "$(nbd_uri)" "$dir/workload.txt" || fail "qemu-io through NBD failed"
    local rc=0
    stop_nbd || rc=$?
    [[ $rc -eq 0 ]] || fail "server exit $rc after SIGTERM"
    [[ -n $FAIL ]] && return 1
    verdict "$dir" "$fmt"
}

# verdict DIR FMT: qemu-img check on ours (qcow2), then compare with ref.
verdict() {
    local dir=$1 fmt=$2 rc=0
    if [[ $fmt == qcow2 ]]; then
        qimg_check "$dir/ours.qcow2" || rc=$?
        [[ $rc -eq 0 ]] || { fail "qemu-img check exit $rc"; return 1; }
    fi
    qimg_compare "$dir/ours.$fmt" "$dir/ref.$fmt" "$fmt" "$fmt" || rc=$?
    [[ $rc -eq 0 ]] || { fail "qemu-img compare exit $rc (content differs)"; return 1; }
}

# run_case NAME FUNC [ARGS]: run FUNC DIR SEED ARGS for each round in a fresh DIR, print one
# result line per round.
run_case() {
    local name=$1 func=$2; shift 2
    local r seed label dir
    # CASES=REGEX runs only the matching cases (for debugging).
    if [[ -n ${CASES:-} ]] && ! [[ $name =~ $CASES ]]; then return 0; fi
    for ((r = 0; r < ROUNDS; r++)); do
        seed=$(($(name_seed "$name") + SEED_BASE + r * 7919))
        label="interop/$name"
        [[ $ROUNDS -gt 1 ]] && label+=" seed=$seed"
        dir=$UQ_TMP/case
        rm -rf "$dir" && mkdir -p "$dir"
        FAIL=
        note "=== $label (seed $seed)"
        "$func" "$dir" "$seed" "$@"
        if [[ -n $FAIL ]]; then
            # Keep the failed case's files (seen with KEEP_TMP=1).
            local keep=$UQ_TMP/failed-$((++FAILED_CASES))
            mv "$dir" "$keep" && note "files of the failed case: $keep"
            notok "$label" "$FAIL (seed $seed)"
        else
            ok "$label"
        fi
    done
}

# Standard case: image made by make_image with OPTS at SIZE, copied to ref and ours.
case_standard() {
    local dir=$1 seed=$2 opts=$3 size=$4; shift 4
    make_image "$dir/base.qcow2" "$size" "$opts" "${PREFILL[@]}" || { fail "could not make the image"; return; }
    cp --sparse=always "$dir/base.qcow2" "$dir/ref.qcow2"
    mv "$dir/base.qcow2" "$dir/ours.qcow2"
    apply_workload "$dir" qcow2 "$seed" "$@"
}

# refused PREFIX CASE REGEX IMAGE [server options]: the server must refuse to start (non-zero
# exit), naming the problem (REGEX, case-insensitive); one result line "PREFIX/refused: CASE".
refused_start() {
    local label="$1/refused: $2" regex=$3; shift 3
    if start_nbd "$@"; then
        stop_nbd
        notok "$label" "accepted the image"
    elif grep -q -i -E "$regex" "$NBD_LOG"; then
        ok "$label"
    else
        notok "$label" "message does not name the problem (/$regex/): $(head -c 200 "$NBD_LOG")"
    fi
}
