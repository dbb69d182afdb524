# Shared helpers for the shell test suites.  Source it from a tests/<area>/t_*.sh:
#     . "$(dirname "$0")/../lib/lib.sh"
#
# Environment (set by tests/run.sh; defaults let a script run on its own):
#   UQ          ublk-qcow2 binary (default: build/debug/ublk-qcow2)
#   UQ_TMP      scratch directory for this script (default: a fresh one, removed at exit)
#   NBD_SERVER  "uq" (default) or "qemu-nbd": which NBD server start_nbd runs, so the suites
#               can be checked against QEMU's own server.
#   SOAK        1 for long runs
#
# Output protocol: one line per test, `ok NAME`, `not ok NAME: why`, `skip NAME: why`.
# The script exits 1 if any `not ok` was printed.

set -u -o pipefail

LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LIB_DIR/../.." && pwd)

: "${UQ:=$REPO_ROOT/build/debug/ublk-qcow2}"
NBD_SERVER=${NBD_SERVER:-uq}
LIB_OWN_TMP=0
if [[ -z ${UQ_TMP:-} ]]; then
    UQ_TMP=$(mktemp -d "${TMPDIR:-/tmp}/uq-test.XXXXXX")
    LIB_OWN_TMP=1
fi
export UQ UQ_TMP NBD_SERVER

LIB_FAILED=0

# The distribution's python3 (tests/deps.sh installs it): a version-manager shim in PATH can
# cost a second or more per start on a loaded machine.
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x /usr/bin/python3 ]]; then PYTHON=/usr/bin/python3; else PYTHON=python3; fi
fi

ok()    { echo "ok $1"; }
notok() { echo "not ok $1: ${2:-failed}"; LIB_FAILED=1; }
skip()  { echo "skip $1: ${2:-skipped}"; }

# Log a diagnostic line (goes to the script's log, never counted).
note()  { echo "# $*" >&2; }

# need_cmd CMD...: true if every command exists.
need_cmd() {
    local c
    for c in "$@"; do command -v "$c" >/dev/null 2>&1 || return 1; done
}

# Run a command with a bound; its output goes to stderr (the log).
# Usage: bounded SECONDS CMD...
bounded() {
    local t=$1; shift
    timeout -k 5 "$t" "$@" >&2
}

# --- NBD server ---------------------------------------------------------------------------
# One server at a time.  After start_nbd: NBD_SOCK (socket path), NBD_PID (daemon pid),
# NBD_LOG (server stdout+stderr).  Start and stop are each bounded.
NBD_SOCK=$UQ_TMP/nbd.sock
NBD_PIDFILE=$UQ_TMP/nbd.pid
NBD_LOG=$UQ_TMP/nbd.log
NBD_FIFO=$UQ_TMP/nbd.fifo
NBD_EXPORT=
NBD_PID=
NBD_REAPER=
NBD_FD=
NBD_START_TIMEOUT=${NBD_START_TIMEOUT:-60}
NBD_STOP_TIMEOUT=${NBD_STOP_TIMEOUT:-60}

# Build the server command line for NBD_SERVER into the array NBD_CMD.
_nbd_cmdline() {
    local image=$1; shift
    NBD_EXPORT=
    if [[ $NBD_SERVER == qemu-nbd ]]; then
        local fmt=auto args=() discard=unmap
        local sockargs=(-k "$NBD_SOCK")
        while [[ $# -gt 0 ]]; do
            case $1 in
                --read-only) args+=(-r) ;;
                --format) fmt=$2; shift ;;
                --export-name) args+=(-x "$2"); NBD_EXPORT=$2; shift ;;
                --cache-size) shift ;;  # qemu-nbd sizes its caches itself
                --socket) NBD_SOCK=$2; sockargs=(-k "$2"); shift ;;
                --bind) sockargs=(-b "${2%:*}" -p "${2##*:}"); shift ;;
                --discard) discard=$2; shift ;;
                *) note "start_nbd: option $1 not mapped for qemu-nbd"; return 2 ;;
            esac
            shift
        done
        if [[ $fmt == auto ]]; then
            # Same probe as ours: qcow2 magic, else raw.
            if [[ $(head -c 4 "$image" 2>/dev/null | od -An -tx1 | tr -d ' \n') == 514649fb ]]; then
                fmt=qcow2
            else
                fmt=raw
            fi
        fi
        # -t: keep serving after a client disconnects; discard=unmap: honour TRIM like QEMU's
        # own qemu-io does on the reference copy.
        NBD_CMD=(qemu-nbd --fork --pid-file "$NBD_PIDFILE" "${sockargs[@]}" -t -e 8
                 -f "$fmt" --cache=none --aio=io_uring --discard="$discard" "${args[@]}" "$image")
    else
        local i discard=(--discard unmap)
        for ((i = 1; i <= $#; i++)); do
            if [[ ${!i} == --export-name ]]; then
                local j=$((i + 1)); NBD_EXPORT=${!j}
            elif [[ ${!i} == --socket ]]; then
                local j=$((i + 1)); NBD_SOCK=${!j}
            elif [[ ${!i} == --discard || ${!i} == --discard=* ]]; then
                discard=()
            fi
        done
        # As for qemu-nbd above: --discard unmap unless the caller chose.
        NBD_CMD=("$UQ" nbd --fork --pid-file "$NBD_PIDFILE" --socket "$NBD_SOCK" "${discard[@]}" "$@" "$image")
    fi
}

# start_nbd IMAGE [OPTIONS...]: start the server (forking; ready on return).
# Returns the start command's exit status (0 = serving).  On failure the server's
# messages are in $NBD_LOG (also copied to stderr).
start_nbd() {
    [[ -z $NBD_REAPER ]] || { note "start_nbd: a server is already running"; return 2; }
    NBD_SOCK=$UQ_TMP/nbd.sock
    _nbd_cmdline "$@" || return 2
    rm -f "$NBD_SOCK" "$NBD_PIDFILE" "$NBD_FIFO"
    mkfifo "$NBD_FIFO"
    "$PYTHON" "$LIB_DIR/reaper.py" "$NBD_FIFO" "$NBD_PIDFILE" -- \
        timeout -k 5 "$NBD_START_TIMEOUT" "${NBD_CMD[@]}" </dev/null >"$NBD_LOG" 2>&1 &
    NBD_REAPER=$!
    exec {NBD_FD}<"$NBD_FIFO"
    local word rc=
    if ! read -r -t $((NBD_START_TIMEOUT + 15)) -u "$NBD_FD" word rc || [[ $word != started ]]; then
        note "start_nbd: no answer from the server start within ${NBD_START_TIMEOUT}s"
        kill -TERM "$NBD_REAPER" 2>/dev/null
        rc=124
    fi
    NBD_PID=$(cat "$NBD_PIDFILE" 2>/dev/null)
    if [[ $rc -ne 0 && $NBD_SERVER == qemu-nbd && -n $NBD_PID && -S $NBD_SOCK ]] &&
        kill -0 "$NBD_PID" 2>/dev/null; then
        # qemu-nbd --fork exits 1 when the server printed anything (e.g. repair messages
        # for a dirty image) although it serves: accept that.
        note "start_nbd: qemu-nbd exit $rc but serving"
        rc=0
    fi
    if [[ $rc -ne 0 ]]; then
        _nbd_reap_after_failure
        sed 's/^/# nbd: /' "$NBD_LOG" >&2
        return "$rc"
    fi
    if [[ -z $NBD_PID ]] || ! kill -0 "$NBD_PID" 2>/dev/null; then
        note "start_nbd: started, but no live server in pid file '$NBD_PID'"
        _nbd_reap_after_failure
        sed 's/^/# nbd: /' "$NBD_LOG" >&2
        return 1
    fi
    [[ -S $NBD_SOCK ]] || note "start_nbd: warning: $NBD_SOCK is not a socket after start"
    return 0
}

# After a failed start: end a daemon that may still run, collect the reaper (all bounded).
_nbd_reap_after_failure() {
    local w r pid
    pid=$(cat "$NBD_PIDFILE" 2>/dev/null)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
        note "start_nbd: the start failed but server $pid is running: stopping it"
        kill -TERM "$pid" 2>/dev/null
    fi
    if ! read -r -t 30 -u "$NBD_FD" w r; then
        [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null
        read -r -t 30 -u "$NBD_FD" w r || kill -KILL "$NBD_REAPER" 2>/dev/null
    fi
    wait "$NBD_REAPER" 2>/dev/null
    exec {NBD_FD}<&-
    NBD_REAPER= NBD_PID= NBD_FD=
}

# stop_nbd: SIGTERM the server and wait (bounded) for it to exit.  Returns its exit status
# (expected 0: it flushed and exited cleanly); 124 if it did not exit in time (then killed).
stop_nbd() {
    [[ -n $NBD_REAPER ]] || { note "stop_nbd: no server running"; return 2; }
    local w rc
    kill -TERM "$NBD_PID" 2>/dev/null
    if read -r -t "$NBD_STOP_TIMEOUT" -u "$NBD_FD" w rc && [[ $w == exited ]]; then
        :
    else
        note "stop_nbd: server $NBD_PID did not exit within ${NBD_STOP_TIMEOUT}s after SIGTERM"
        kill -KILL "$NBD_PID" 2>/dev/null
        read -r -t 10 -u "$NBD_FD" w rc || true
        rc=124
    fi
    wait "$NBD_REAPER" 2>/dev/null
    exec {NBD_FD}<&-
    NBD_REAPER= NBD_PID= NBD_FD=
    [[ $rc =~ ^[0-9]+$ ]] || rc=125
    if [[ -s $NBD_LOG ]]; then sed 's/^/# nbd: /' "$NBD_LOG" >&2; fi
    [[ $rc -eq 0 ]] || note "stop_nbd: server exit status $rc"
    return "$rc"
}

# nbd_uri: the NBD URI of the running server's export.
nbd_uri() { echo "nbd+unix:///${NBD_EXPORT}?socket=$NBD_SOCK"; }

# --- qemu oracles -------------------------------------------------------------------------
# qimg_check IMAGE [ARGS]: qemu-img check; output to the log; returns its exit code
# (0 clean, 1 check failed, 2 corruption, 3 leaks only, 63 unsupported).
qimg_check() {
    local img=$1; shift
    timeout -k 5 120 qemu-img check "$@" "$img" >"$UQ_TMP/check.out" 2>&1
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        note "qemu-img check $img -> exit $rc"
        sed 's/^/#   /' "$UQ_TMP/check.out" | head -40 >&2
    fi
    return $rc
}

# qimg_compare IMG1 IMG2 [FMT1 FMT2]: qemu-img compare (strict: also sizes); exit code.
qimg_compare() {
    local f1=${3:-qcow2} f2=${4:-qcow2}
    timeout -k 5 300 qemu-img compare -f "$f1" -F "$f2" "$1" "$2" >"$UQ_TMP/compare.out" 2>&1
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        note "qemu-img compare $1 $2 -> exit $rc"
        sed 's/^/#   /' "$UQ_TMP/compare.out" | head -20 >&2
    fi
    return $rc
}

# qio FORMAT TARGET CMDFILE [qemu-io options]: run every line of CMDFILE as one qemu-io -c
# command (no shell quoting involved).  Output to the log; returns qemu-io's exit code
# (non-zero if any command failed).
qio() {
    local fmt=$1 target=$2 file=$3; shift 3
    local -a cmds=() args=()
    mapfile -t cmds <"$file"
    local c
    for c in "${cmds[@]}"; do
        [[ -n $c && $c != \#* ]] && args+=(-c "$c")
    done
    timeout -k 5 300 qemu-io "$@" -f "$fmt" "$target" "${args[@]}" >"$UQ_TMP/qio.out" 2>&1
    local rc=$?
    # Only failures are worth the log space.
    grep -v -E '^(wrote|read|discard) [0-9]+/[0-9]+ bytes|^[0-9.]+ (bytes|[KMGT]iB), [0-9]+ ops' "$UQ_TMP/qio.out" | head -40 >&2
    [[ $rc -eq 0 ]] || note "qemu-io $target -> exit $rc"
    return $rc
}

# header_field IMAGE OFFSET SIZE: a big-endian header field as a decimal number.
header_field() {
    "$PYTHON" - "$1" "$2" "$3" <<'EOF'
import sys
with open(sys.argv[1], "rb") as f:
    f.seek(int(sys.argv[2]))
    print(int.from_bytes(f.read(int(sys.argv[3])), "big"))
EOF
}

# --- sanitizers ---------------------------------------------------------------------------
# tests/run.sh points ASan/UBSan log_path into UQ_SAN_DIR, so reports of daemons are kept.
SAN_RE='ERROR: AddressSanitizer|runtime error:|LeakSanitizer'

# san_clean [LOGFILE...]: true if no sanitizer report appeared since the last call (report
# files are moved to UQ_SAN_DIR/seen, where tests/run.sh still counts them) and none is in the
# given log files.  Reports are copied to stderr.
san_clean() {
    local f clean=0
    if [[ -n ${UQ_SAN_DIR:-} && -d $UQ_SAN_DIR ]]; then
        mkdir -p "$UQ_SAN_DIR/seen"
        for f in "$UQ_SAN_DIR"/*; do
            [[ -f $f && -s $f ]] || continue
            clean=1
            head -60 "$f" | sed 's/^/# san: /' >&2
            mv "$f" "$UQ_SAN_DIR/seen/"
        done
    fi
    for f in "$@"; do
        if [[ -f $f ]] && grep -q -E "$SAN_RE" "$f"; then
            clean=1
        fi
    done
    return $clean
}

# --- cleanup -------------------------------------------------------------------------------
# Extra cleanup commands a script wants run at exit.
LIB_CLEANUP=()
at_exit() { LIB_CLEANUP+=("$*"); }

_lib_exit() {
    local rc=$?
    if [[ -n $NBD_REAPER ]]; then
        note "cleanup: stopping a server left running"
        stop_nbd >/dev/null 2>&1 || true
    fi
    local c
    for c in "${LIB_CLEANUP[@]}"; do eval "$c" || true; done
    [[ $LIB_OWN_TMP -eq 1 && ${KEEP_TMP:-0} != 1 ]] && rm -rf "$UQ_TMP"
    if [[ $rc -eq 0 && $LIB_FAILED -ne 0 ]]; then rc=1; fi
    exit $rc
}
trap _lib_exit EXIT
trap 'exit 130' INT TERM
