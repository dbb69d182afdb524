#!/bin/bash
# ublk-qcow2 benchmark suite (run by `make bench`).
#
#   bench/run.sh BINARY
#
# Measures, side by side in one run, on the same images and queue depth:
#   engine:  our engine (`BINARY bench`) on a preallocated qcow2 and on raw,
#            fio io_uring O_DIRECT on the raw file (the limit), and
#            `qemu-img bench` (QEMU's qcow2 engine, sequential only);
#   nbd:     our NBD export vs qemu-nbd --cache=none --aio=io_uring vs
#            nbdkit null (what the fio nbd client itself can reach),
#            all driven by fio --ioengine=nbd over a unix socket;
#   empty:   4k randwrite on an empty (allocating) qcow2, ours vs qemu-nbd;
#   overlay: 4k randwrite on a new overlay of the preallocated qcow2, engine, with
#            standard L2 (each write copies its whole 64k cluster from the backing
#            file) and with extended L2 (it allocates two 2k subclusters, no copy);
#   ublk:    one boot of the test VM (tests/vm/vm.sh; this host kernel has no
#            ublk) running bench/vm_ublk.sh: fio io_uring O_DIRECT 4k randread
#            and randwrite on /dev/ublkbN (qcow2 and raw), the kernel loop
#            driver with direct I/O (the limit) and qemu-nbd on /dev/nbd0,
#            all on preallocated images in the guest's tmpfs.
# Writes a Markdown table and a JSON file to bench/results/latest.{md,json}.
#
# Environment:
#   BENCH_DIR      scratch directory on a real disk (default /var/tmp/ublk-qcow2-bench)
#   BENCH_SECONDS  seconds per measurement (default 8)
#   BENCH_ONLY     engine | nbd | ublk (default: all three)
#   BENCH_SIZE     image size (default 2G)
#   BENCH_DEPTH    queue depth (default 128)
#   BENCH_UBLK_SIZE   image size in the VM's tmpfs (default 1G; the VM gets 4G RAM)
#   BENCH_UBLK_DEPTH  fio iodepth in the VM (default 64)
#   BENCH_FRESH=1  recreate the preallocated images even if they look reusable
#   BENCH_RESULTS  where to write latest.{md,json} (default bench/results)
#
# Both images are preallocated with preallocation=full: every data cluster is
# allocated in the metadata and written with zeroes on the host, so neither
# file has holes or unwritten extents that would make reads artificially cheap
# or first writes artificially expensive.  They are kept in BENCH_DIR for the
# next run (about 2 x BENCH_SIZE of disk); the empty images are removed.
set -u -o pipefail

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

[ $# -eq 1 ] || die "usage: bench/run.sh BINARY"
BIN=$(realpath "$1" 2>/dev/null) || die "binary '$1' not found"
[ -x "$BIN" ] || die "binary '$BIN' is not executable"

SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)
DIR=${BENCH_DIR:-/var/tmp/ublk-qcow2-bench}
SECS=${BENCH_SECONDS:-8}
ONLY=${BENCH_ONLY:-all}
SIZE=${BENCH_SIZE:-2G}
DEPTH=${BENCH_DEPTH:-128}
RESULTS=${BENCH_RESULTS:-$SCRIPT_DIR/results}
PREALLOC=full
USIZE=${BENCH_UBLK_SIZE:-1G}
UDEPTH=${BENCH_UBLK_DEPTH:-64}
VM_SH=$SCRIPT_DIR/../tests/vm/vm.sh

case "$ONLY" in all|engine|nbd|ublk) ;; *) die "BENCH_ONLY must be engine, nbd or ublk (got '$ONLY')" ;; esac
[[ "$UDEPTH" =~ ^[0-9]+$ ]] && [ "$UDEPTH" -gt 0 ] || die "BENCH_UBLK_DEPTH must be a positive integer"
[[ "$USIZE" =~ ^[0-9]+[KMG]?$ ]] || die "BENCH_UBLK_SIZE must be a size like 512M or 1G (got '$USIZE')"
[[ "$SECS" =~ ^[0-9]+$ ]] && [ "$SECS" -gt 0 ] || die "BENCH_SECONDS must be a positive integer"
[[ "$DEPTH" =~ ^[0-9]+$ ]] && [ "$DEPTH" -gt 0 ] || die "BENCH_DEPTH must be a positive integer"
for tool in qemu-img qemu-nbd fio jq nbdkit awk; do
    command -v "$tool" >/dev/null || die "'$tool' is not installed (try 'make deps')"
done

mkdir -p "$DIR" "$DIR/logs" "$RESULTS" || die "cannot create $DIR"
# Two runs sharing BENCH_DIR would mix their results and stop each other's
# servers (same pid files): the second one waits for the first.
exec 8>"$DIR/.lock" || die "cannot open $DIR/.lock"
if ! flock -n 8; then
    log "another bench run is using $DIR; waiting for it (set BENCH_DIR to run elsewhere)"
    flock -w 3600 8 || die "timed out waiting for the other bench run in $DIR"
fi
case "$(findmnt -no FSTYPE --target "$DIR" 2>/dev/null)" in
    tmpfs|ramfs) log "warning: $DIR is on $(findmnt -no FSTYPE --target "$DIR"), not a real disk" ;;
esac
# Drop stale results so a failed run is never mistaken for a fresh one.
rm -f "$DIR"/results.tsv "$DIR"/ratios.tsv

QCOW2=$DIR/prealloc.qcow2
RAW=$DIR/prealloc.raw
EMPTY=$DIR/empty.qcow2
OVERLAY=$DIR/overlay.qcow2
T_START=$(date +%s.%N)
# Other work on the machine skews every number: record the load around the run.
LOAD_START=$(cut -d' ' -f1 /proc/loadavg)

# ---- server bookkeeping: every server we start is stopped on exit ---------
# Servers are started inside $(...) subshells, so the list is fixed up front.
PIDFILES=("$DIR/ours.pid" "$DIR/qemu.pid" "$DIR/null.pid")

stop_server() {
    local pidf=$1 pid
    [ -s "$pidf" ] || return 0
    pid=$(cat "$pidf")
    # Only a live process whose command line names our directory is ours.
    if [[ "$pid" =~ ^[0-9]+$ ]] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF "$DIR/"; then
        kill "$pid" 2>/dev/null
        # Not our child (the servers daemonize), so poll, bounded, then insist.
        timeout 10 bash -c "while kill -0 $pid 2>/dev/null; do sleep 0.05; done" ||
            kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidf"
}

cleanup() {
    local pidf
    for pidf in "${PIDFILES[@]}"; do stop_server "$pidf"; done
    rm -f "$DIR"/*.sock "$EMPTY"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME COMMAND... : the command must daemonize, writing
# $DIR/NAME.pid and listening on $DIR/NAME.sock.
start_server() {
    local name=$1; shift
    local sock=$DIR/$name.sock pidf=$DIR/$name.pid
    stop_server "$pidf"
    rm -f "$sock"
    if ! timeout 30 "$@" >"$DIR/logs/$name.log" 2>&1; then
        log "$name failed to start (see $DIR/logs/$name.log)"
        stop_server "$pidf"
        return 1
    fi
    if ! timeout 10 bash -c "until [ -S '$sock' ] && [ -s '$pidf' ]; do sleep 0.05; done"; then
        log "$name did not create $sock"
        stop_server "$pidf"
        return 1
    fi
}

# ---- workloads -------------------------------------------------------------
WORKLOADS=(randwrite_4k randread_4k randrw_4k rw_512k)
declare -A WL_RW=([randwrite_4k]=randwrite [randread_4k]=randread [randrw_4k]=randrw [rw_512k]=rw)
declare -A WL_BS=([randwrite_4k]=4k [randread_4k]=4k [randrw_4k]=4k [rw_512k]=512k)
declare -A WL_TITLE=([randwrite_4k]="randwrite 4k" [randread_4k]="randread 4k"
                     [randrw_4k]="randrw 4k (r/w)" [rw_512k]="rw 512k (r/w)" [alloc_4k]="randwrite 4k")

# Each measurement prints "READ_IOPS WRITE_IOPS" on stdout, or fails.
# fio runs with --norandommap (random offsets with repeats, as `bench` draws
# them) and --gtod_reduce (no per-I/O clock reads): the client's own cost
# should be as low as possible, it is the yardstick.

m_engine() {  # IMAGE FORMAT WORKLOAD [RW]
    local img=$1 fmt=$2 wl=$3 rw=${4:-${WL_RW[$3]}} out
    out=$(timeout $((SECS + 120)) "$BIN" bench --rw "$rw" --bs "${WL_BS[$wl]}" \
          --depth "$DEPTH" --seconds "$SECS" --format "$fmt" --json "$img" \
          2>>"$DIR/logs/engine.log") || return 1
    echo "$out" >>"$DIR/logs/engine.log"
    jq -er 'select(.errors == 0) | "\(.read_ios / .seconds) \(.write_ios / .seconds)"' <<<"$out"
}

fio_run() {  # WORKLOAD LOGNAME FIO-ARGS...
    local wl=$1 name=$2 json=$DIR/logs/fio-$2-$1.json; shift 2
    rm -f "$json"
    timeout $((SECS + 120)) fio --name=bench --rw="${WL_RW[$wl]}" --rwmixread=50 \
        --bs="${WL_BS[$wl]}" --iodepth="$DEPTH" --numjobs=1 --runtime="$SECS" --time_based \
        --norandommap --gtod_reduce=1 \
        --output-format=json --output="$json" "$@" >>"$DIR/logs/fio.log" 2>&1 || return 1
    jq -er '.jobs[0] | select(.error == 0) | "\(.read.iops) \(.write.iops)"' "$json"
}

# The limit: fio's leanest io_uring setup (registered file and buffers).
m_fio_file() {
    fio_run "$2" file --ioengine=io_uring --direct=1 --fixedbufs --registerfiles --filename="$1"
}
m_fio_nbd()  { fio_run "$2" "$3" --ioengine=nbd --uri="nbd+unix:///?socket=$1"; }

# QEMU's engine: qemu-img bench is count based and sequential, so calibrate
# the count to about SECS seconds first.
qemu_img_bench_iops() {  # IMAGE BS [-w]
    local img=$1 bs=$2 w=${3:-} count t out
    if [ "$bs" = 4k ]; then count=20000; else count=1000; fi
    for try in 1 2 3 4 5 6; do
        out=$(timeout $((SECS + 120)) qemu-img bench -f qcow2 -t none -i io_uring \
              -d "$DEPTH" -s "$bs" -c "$count" ${w:+"$w"} "$img" 2>&1) || { echo "$out" >&2; return 1; }
        t=$(sed -n 's/^Run completed in \([0-9.]*\) seconds.*/\1/p' <<<"$out")
        [ -n "$t" ] || return 1
        if [ $try = 6 ] || awk -v t="$t" -v s="$SECS" 'BEGIN { exit !(t >= s / 2) }'; then
            break
        fi
        count=$(awk -v c="$count" -v t="$t" -v s="$SECS" \
                'BEGIN { printf "%d", (t >= 0.1) ? c * s / t : c * 10 }')
    done
    awk -v c="$count" -v t="$t" 'BEGIN { printf "%.1f\n", c / t }'
}

m_qemu_img_bench() {  # IMAGE WORKLOAD
    local img=$1 wl=$2 r=0 w=0
    case "$wl" in
        randwrite_4k) w=$(qemu_img_bench_iops "$img" 4k -w) || return 1 ;;
        randread_4k)  r=$(qemu_img_bench_iops "$img" 4k) || return 1 ;;
        rw_512k)      w=$(qemu_img_bench_iops "$img" 512k -w) || return 1
                      r=$(qemu_img_bench_iops "$img" 512k) || return 1 ;;
        *) return 1 ;;
    esac
    echo "$r $w"
}

m_nbd_ours() {  # IMAGE WORKLOAD
    start_server ours "$BIN" nbd --fork --pid-file "$DIR/ours.pid" --socket "$DIR/ours.sock" "$1" ||
        return 1
    local rc=0; m_fio_nbd "$DIR/ours.sock" "$2" ours || rc=1
    stop_server "$DIR/ours.pid"
    return $rc
}

m_nbd_qemu() {  # IMAGE WORKLOAD
    start_server qemu qemu-nbd --fork --persistent --pid-file "$DIR/qemu.pid" \
        --socket "$DIR/qemu.sock" --cache=none --aio=io_uring -f qcow2 "$1" || return 1
    local rc=0; m_fio_nbd "$DIR/qemu.sock" "$2" qemu || rc=1
    stop_server "$DIR/qemu.pid"
    return $rc
}

m_nbd_null() {  # WORKLOAD
    start_server null nbdkit --unix "$DIR/null.sock" --pidfile "$DIR/null.pid" null "$SIZE" ||
        return 1
    local rc=0; m_fio_nbd "$DIR/null.sock" "$1" null || rc=1
    stop_server "$DIR/null.pid"
    return $rc
}

# measure ROW WORKLOAD FUNCTION ARGS... : records "ROW WL R W" or "ROW WL n/a n/a".
measure() {
    local row=$1 wl=$2 res; shift 2
    log "$row $wl ..."
    if res=$("$@") && [ -n "$res" ]; then
        log "$row $wl: $res"
    else
        log "$row $wl: n/a"
        res="n/a n/a"
    fi
    echo "$row $wl $res" >>"$DIR/results.tsv"
}

# ---- images ----------------------------------------------------------------
stamp="size=$SIZE prealloc=$PREALLOC"
images_ok() {
    [ -z "${BENCH_FRESH:-}" ] && [ -f "$QCOW2" ] && [ -f "$RAW" ] &&
        [ "$(cat "$DIR/images.stamp" 2>/dev/null)" = "$stamp" ] &&
        qemu-img check -q -f qcow2 "$QCOW2" >/dev/null 2>&1
}
if [ "$ONLY" = ublk ]; then
    :  # the VM makes its own images in its tmpfs
elif images_ok; then
    log "reusing preallocated images in $DIR"
else
    log "creating $SIZE images with preallocation=$PREALLOC in $DIR"
    rm -f "$QCOW2" "$RAW" "$DIR/images.stamp"
    qemu-img create -q -f qcow2 -o preallocation=$PREALLOC "$QCOW2" "$SIZE" ||
        die "cannot create $QCOW2"
    qemu-img create -q -f raw -o preallocation=$PREALLOC "$RAW" "$SIZE" ||
        die "cannot create $RAW"
    sync
    echo "$stamp" >"$DIR/images.stamp"
fi

new_empty() { rm -f "$EMPTY" && qemu-img create -q -f qcow2 "$EMPTY" "$SIZE"; }
new_overlay() {  # [CREATE-OPTIONS]
    rm -f "$OVERLAY" && qemu-img create -q -f qcow2 ${1:+-o "$1"} -b "$QCOW2" -F qcow2 "$OVERLAY" "$SIZE"
}

# ---- run ---------------------------------------------------------------------
: >"$DIR/results.tsv"
for wl in "${WORKLOADS[@]}"; do
    if [ "$ONLY" = all ] || [ "$ONLY" = engine ]; then
        measure engine_qcow2 "$wl" m_engine "$QCOW2" qcow2 "$wl"
        measure engine_raw "$wl" m_engine "$RAW" raw "$wl"
        measure fio_raw "$wl" m_fio_file "$RAW" "$wl"
        measure qemu_img_bench "$wl" m_qemu_img_bench "$QCOW2" "$wl"
    fi
    if [ "$ONLY" = all ] || [ "$ONLY" = nbd ]; then
        measure nbd_ours "$wl" m_nbd_ours "$QCOW2" "$wl"
        measure nbd_qemu "$wl" m_nbd_qemu "$QCOW2" "$wl"
        measure nbd_null "$wl" m_nbd_null "$wl"
    fi
done
# Allocating writes: a fresh empty image for each contender.
if [ "$ONLY" = all ] || [ "$ONLY" = engine ]; then
    new_empty && measure engine_qcow2_empty alloc_4k m_engine "$EMPTY" qcow2 randwrite_4k randwrite
    # Overlays: copy-on-write from the backing file, whole clusters vs subclusters.
    new_overlay && measure engine_overlay alloc_4k m_engine "$OVERLAY" qcow2 randwrite_4k randwrite
    new_overlay extended_l2=on &&
        measure engine_overlay_extl2 alloc_4k m_engine "$OVERLAY" qcow2 randwrite_4k randwrite
    rm -f "$OVERLAY"
fi
if [ "$ONLY" = all ] || [ "$ONLY" = nbd ]; then
    new_empty && measure nbd_ours_empty alloc_4k m_nbd_ours "$EMPTY" randwrite_4k
    new_empty && measure nbd_qemu_empty alloc_4k m_nbd_qemu "$EMPTY" randwrite_4k
fi
rm -f "$EMPTY"

# ublk: one VM boot; its result lines go straight into results.tsv as vm_*.
UBLK_ROWS=(vm_ublk_qcow2 vm_ublk_raw vm_loop_raw vm_qemu_nbd)
UBLK_WORKLOADS=(randread_4k randwrite_4k)
UBLK_CHECK=
run_vm_ublk() {
    local out=$DIR/logs/vm-ublk.out rc=0 row wl
    log "ublk: booting the test VM (tests/vm/vm.sh, QEMU TCG), $USIZE images, iodepth $UDEPTH ..."
    # Guest progress goes to our stderr as it happens; results to $out.
    "$VM_SH" --mem 4G --timeout $((300 + 8 * (SECS + 60))) -- \
        bash "$SCRIPT_DIR/vm_ublk.sh" "$BIN" "$SECS" "$UDEPTH" "$USIZE" >"$out" || rc=$?
    case $rc in
        0) ;;
        125) log "ublk: the VM failed to boot or timed out (VM_VERBOSE=1 shows its console)" ;;
        *) log "ublk: some measurements failed in the VM (exit $rc)" ;;
    esac
    UBLK_CHECK=$(sed -n 's/^UQBENCH-INFO qcow2_check //p' "$out")
    UBLK_KERNEL=$(sed -n 's/^UQBENCH-INFO kernel //p' "$out")
    for row in "${UBLK_ROWS[@]}"; do
        for wl in "${UBLK_WORKLOADS[@]}"; do
            local line
            line=$(awk -v p="${row#vm_}" -v w="$wl" '$1 == "UQBENCH" && $2 == p && $3 == w { print $4, $5; exit }' "$out")
            [ -n "$line" ] || line="n/a n/a"
            log "$row $wl: $line"
            echo "$row $wl $line" >>"$DIR/results.tsv"
        done
    done
    return $rc
}
UBLK_KERNEL=
if [ "$ONLY" = all ] || [ "$ONLY" = ublk ]; then
    run_vm_ublk
fi
LOAD_END=$(cut -d' ' -f1 /proc/loadavg)
T_TOTAL=$(awk -v a="$T_START" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')

# ---- report --------------------------------------------------------------------
declare -A READ WRITE
while read -r row wl r w; do READ[$row|$wl]=$r; WRITE[$row|$wl]=$w; done <"$DIR/results.tsv"

fmt_num() { awk -v n="$1" 'BEGIN { n = sprintf("%.0f", n); s = "";
    while (length(n) > 3) { s = "," substr(n, length(n) - 2) s; n = substr(n, 1, length(n) - 3) }
    print n s }'; }

cell() {  # ROW WL
    local r=${READ[$1|$2]:-} w=${WRITE[$1|$2]:-}
    if [ -z "$r" ]; then echo ""; return; fi
    if [ "$r" = n/a ]; then echo "n/a"; return; fi
    case "$2" in
        randrw_4k|rw_512k)
            if [ "$1" = qemu_img_bench ] && awk -v r="$r" 'BEGIN { exit !(r == 0) }'; then
                echo "n/a"
            else
                echo "$(fmt_num "$r") / $(fmt_num "$w")"
            fi ;;
        randread_4k) fmt_num "$r" ;;
        *) fmt_num "$w" ;;
    esac
}

total() {  # ROW WL -> read+write IOPS, empty if unknown
    local r=${READ[$1|$2]:-} w=${WRITE[$1|$2]:-}
    [ -n "$r" ] && [ "$r" != n/a ] || return 0
    awk -v r="$r" -v w="$w" 'BEGIN { print r + w }'
}

ratio() {  # ROW_A ROW_B WL -> "1.23x" or "n/a"
    local a b
    a=$(total "$1" "$3"); b=$(total "$2" "$3")
    if [ -z "$a" ] || [ -z "$b" ] || awk -v b="$b" 'BEGIN { exit !(b == 0) }'; then
        echo "n/a"
    else
        awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2fx\n", a / b }'
    fi
}

declare -A LABEL=(
    [engine_qcow2]="ours, engine (\`bench\`), qcow2"
    [engine_raw]="ours, engine (\`bench\`), raw"
    [fio_raw]="fio io_uring O_DIRECT on the raw file (the limit)"
    [qemu_img_bench]="\`qemu-img bench\` on the qcow2 (QEMU's engine; sequential, separate read and write runs)"
    [nbd_ours]="ours, NBD export, qcow2, fio nbd"
    [nbd_qemu]="qemu-nbd --cache=none --aio=io_uring, qcow2, fio nbd"
    [nbd_null]="nbdkit null (fio nbd client ceiling)"
    [engine_qcow2_empty]="ours, engine (\`bench\`), empty qcow2"
    [nbd_ours_empty]="ours, NBD export, empty qcow2"
    [nbd_qemu_empty]="qemu-nbd, empty qcow2"
    [engine_overlay]="ours, engine, new overlay of the qcow2 (64k clusters: COW of whole clusters)"
    [engine_overlay_extl2]="ours, engine, new overlay with extended L2 (2k subclusters allocated)"
    [vm_ublk_qcow2]="ours, \`ublk-qcow2 add\` /dev/ublkbN, qcow2"
    [vm_ublk_raw]="ours, \`ublk-qcow2 add -f raw\` /dev/ublkbN, raw file"
    [vm_loop_raw]="kernel loop driver, --direct-io=on, raw file (the limit)"
    [vm_qemu_nbd]="qemu-nbd --cache=none --aio=io_uring on the kernel nbd driver, qcow2"
)
ROWS=(engine_qcow2 engine_raw fio_raw qemu_img_bench nbd_ours nbd_qemu nbd_null)
EMPTY_ROWS=(engine_qcow2_empty nbd_ours_empty nbd_qemu_empty engine_overlay engine_overlay_extl2)
RATIOS=(
    "nbd_ours nbd_qemu ours NBD / qemu-nbd"
    "engine_qcow2 engine_raw ours engine qcow2 / ours engine raw"
    "engine_raw fio_raw ours engine raw / limit"
    "engine_qcow2 fio_raw ours engine qcow2 / limit"
    "nbd_ours nbd_null ours NBD / nbdkit null"
)
# NUMERATOR DENOMINATOR TARGET TEXT
UBLK_RATIOS=(
    "vm_ublk_qcow2 vm_qemu_nbd 6 ublk qcow2 / qemu-nbd"
    "vm_ublk_qcow2 vm_ublk_raw 0.9 ublk qcow2 / ublk raw"
    "vm_ublk_qcow2 vm_loop_raw 0.65 ublk qcow2 / kernel loop"
)
HAVE_HOST=; [ "$ONLY" = ublk ] || HAVE_HOST=1
HAVE_UBLK=; [ "$ONLY" = all ] || [ "$ONLY" = ublk ] && HAVE_UBLK=1

# meets RATIO TARGET -> yes / no / n/a
meets() {
    case "$1" in n/a) echo "n/a"; return ;; esac
    awk -v r="${1%x}" -v t="$2" 'BEGIN { print (r >= t) ? "yes" : "no" }'
}

COMMIT=$(git -C "$SCRIPT_DIR" rev-parse --short HEAD 2>/dev/null || echo unknown)
MD=$RESULTS/latest.md
{
    echo "# ublk-qcow2 benchmark results"
    echo
    echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $COMMIT, $(nproc) CPUs, kernel $(uname -r)," \
         "$(findmnt -no FSTYPE --target "$DIR") in $DIR."
    echo "Load average (1 min) at start $LOAD_START, at end $LOAD_END: other work on the" \
         "machine lowers and skews the numbers; compare ratios within one run."
    echo
  if [ -n "$HAVE_HOST" ]; then
    echo "## Engine and NBD export (on this host)"
    echo
    echo "IOPS; $SIZE images (preallocation=$PREALLOC for raw and qcow2), iodepth $DEPTH, 1 job," \
         "$SECS s per measurement. r/w cells are read / write IOPS."
    echo
    printf '| path |'; for wl in "${WORKLOADS[@]}"; do printf ' %s |' "${WL_TITLE[$wl]}"; done; echo
    printf '|---|'; for wl in "${WORKLOADS[@]}"; do printf -- '---:|'; done; echo
    for row in "${ROWS[@]}"; do
        [ -n "${READ[$row|randwrite_4k]:-}" ] || continue
        printf '| %s |' "${LABEL[$row]}"
        for wl in "${WORKLOADS[@]}"; do printf ' %s |' "$(cell "$row" "$wl")"; done; echo
    done
    echo
    echo "Allocating writes (empty qcow2 or new overlay, 4k randwrite):"
    echo
    echo "| path | randwrite 4k |"
    echo "|---|---:|"
    for row in "${EMPTY_ROWS[@]}"; do
        [ -n "${READ[$row|alloc_4k]:-}" ] || continue
        echo "| ${LABEL[$row]} | $(cell "$row" alloc_4k) |"
    done
    echo
    echo "Extended L2 overlay / standard overlay: $(ratio engine_overlay_extl2 engine_overlay alloc_4k)"
    echo
    echo "Ratios (total IOPS):"
    echo
    printf '| ratio |'; for wl in "${WORKLOADS[@]}"; do printf ' %s |' "${WL_TITLE[$wl]}"; done
    echo " empty randwrite 4k |"
    printf '|---|'; for wl in "${WORKLOADS[@]}"; do printf -- '---:|'; done; printf -- '---:|\n'
    for spec in "${RATIOS[@]}"; do
        read -r a b text <<<"$spec"
        printf '| %s |' "$text"
        for wl in "${WORKLOADS[@]}"; do printf ' %s |' "$(ratio "$a" "$b" "$wl")"; done
        case "$a/$b" in
            nbd_ours/nbd_qemu) printf ' %s |\n' "$(ratio nbd_ours_empty nbd_qemu_empty alloc_4k)" ;;
            *) printf ' |\n' ;;
        esac
    done
    echo
  fi
  if [ -n "$HAVE_UBLK" ]; then
    echo "## ublk block devices (inside the test VM)"
    echo
    echo "One boot of tests/vm/vm.sh: QEMU TCG (no KVM), 2 vCPUs, 4G RAM, Debian kernel" \
         "${UBLK_KERNEL:-?}. $USIZE images in the guest's tmpfs, preallocation=full," \
         "the same data (zeroes) as qcow2 and raw. fio io_uring O_DIRECT 4k, 1 job," \
         "iodepth $UDEPTH, $SECS s per measurement; ublk-qcow2 with 1 queue. IOPS are" \
         "emulator-bound: the ratios are what counts."
    echo
    echo "| path | randread 4k | randwrite 4k |"
    echo "|---|---:|---:|"
    for row in "${UBLK_ROWS[@]}"; do
        echo "| ${LABEL[$row]} | $(cell "$row" randread_4k) | $(cell "$row" randwrite_4k) |"
    done
    echo
    echo "| ratio | randread 4k | randwrite 4k | target | met |"
    echo "|---|---:|---:|---:|---|"
    for spec in "${UBLK_RATIOS[@]}"; do
        read -r a b t text <<<"$spec"
        r1=$(ratio "$a" "$b" randread_4k); r2=$(ratio "$a" "$b" randwrite_4k)
        echo "| $text | $r1 | $r2 | >= ${t}x | $(meets "$r1" "$t") / $(meets "$r2" "$t") |"
    done
    echo
    echo "qemu-img check on the qcow2 after all its runs: ${UBLK_CHECK:-not run}."
    echo
  fi
    echo "Total run time: ${T_TOTAL} s."
} >"$MD"

# JSON: the raw numbers plus the same ratios.
: >"$DIR/ratios.tsv"
if [ -n "$HAVE_HOST" ]; then
    for spec in "${RATIOS[@]}"; do
        read -r a b text <<<"$spec"
        for wl in "${WORKLOADS[@]}"; do echo "$a $b $wl $(ratio "$a" "$b" "$wl")"; done
    done >>"$DIR/ratios.tsv"
    echo "nbd_ours_empty nbd_qemu_empty alloc_4k $(ratio nbd_ours_empty nbd_qemu_empty alloc_4k)" \
        >>"$DIR/ratios.tsv"
fi
if [ -n "$HAVE_UBLK" ]; then
    for spec in "${UBLK_RATIOS[@]}"; do
        read -r a b t text <<<"$spec"
        for wl in "${UBLK_WORKLOADS[@]}"; do echo "$a $b $wl $(ratio "$a" "$b" "$wl") $t"; done
    done >>"$DIR/ratios.tsv"
fi

jq -n --rawfile res "$DIR/results.tsv" --rawfile rat "$DIR/ratios.tsv" \
    --arg commit "$COMMIT" --arg date "$(date -u +%FT%TZ)" --arg size "$SIZE" \
    --arg prealloc "$PREALLOC" --arg kernel "$(uname -r)" \
    --argjson seconds "$SECS" --argjson depth "$DEPTH" --argjson cpus "$(nproc)" \
    --argjson total "$T_TOTAL" --argjson load0 "$LOAD_START" --argjson load1 "$LOAD_END" \
    --arg only "$ONLY" --arg vmkernel "$UBLK_KERNEL" --arg usize "$USIZE" \
    --argjson udepth "$UDEPTH" --arg ucheck "$UBLK_CHECK" '
    def num: tonumber? // null;
    {commit: $commit, date: $date, cpus: $cpus, kernel: $kernel, size: $size,
     preallocation: $prealloc, depth: $depth, seconds_each: $seconds, total_seconds: $total,
     loadavg_start: $load0, loadavg_end: $load1, sections: $only,
     ublk_vm: (if $only == "all" or $only == "ublk" then
                {kernel: $vmkernel, size: $usize, depth: $udepth, qcow2_check: $ucheck}
               else null end),
     results: [$res | split("\n")[] | select(length > 0) | split(" ")
               | {path: .[0], workload: .[1], read_iops: (.[2] | num), write_iops: (.[3] | num)}],
     ratios: [$rat | split("\n")[] | select(length > 0) | split(" ")
              | {numerator: .[0], denominator: .[1], workload: .[2],
                 ratio: (.[3] | rtrimstr("x") | num), target: (.[4] | num)}]}' >"$RESULTS/latest.json" ||
    die "cannot write $RESULTS/latest.json"

cat "$MD"
log "results in $MD and $RESULTS/latest.json (total ${T_TOTAL} s)"
