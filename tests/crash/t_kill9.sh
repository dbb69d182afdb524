#!/usr/bin/env bash
# kill -9 of the NBD server in the middle of writes with flushes, many rounds.  Each round, on
# an image that carries everything earlier rounds left behind: kill9.py runs a pipelined
# workload (writes, some with FUA, write-zeroes, trims, flushes) and sends SIGKILL to the
# server at a random moment with requests in flight; then
#   (a) qemu-img check: no corruption (exit 0, or 3: leaked clusters only);
#   (b) every sector acknowledged before a completed FLUSH (or with FUA) reads back exactly,
#       every other one holds its old value or a later write's (kill9.py verify on the
#       qemu-img convert of the image);
#   (c) the server opens the image again, a write + flush reads back, a clean shutdown, and
#       qemu-img check finds no corruption.
# Images: v3 64 KiB clusters with an internal snapshot (COW of shared clusters), v3 4 KiB
# clusters with 8-bit refcounts, v2 16 KiB clusters.  KILL9_ROUNDS (default 20; SOAK=1: 300).
# timeout: 600
# soak-timeout: 5400
. "$(dirname "$0")/../lib/lib.sh"

HERE=$(cd "$(dirname "$0")" && pwd)
need_cmd qemu-img qemu-io || { skip kill9 "qemu-img or qemu-io missing"; exit 0; }
if [[ ${SOAK:-0} == 1 ]]; then ROUNDS=${KILL9_ROUNDS:-300}; else ROUNDS=${KILL9_ROUNDS:-20}; fi
SEED=${KILL9_SEED:-$((RANDOM % 10000))}
NBD_START_TIMEOUT=30
NBD_STOP_TIMEOUT=60

# name | qemu-img create options | set-up commands (qemu-io, ';'-separated) | snapshot
CONFIGS=(
    "snap64k|cluster_size=65536|write -P 0x11 0 2M;write -c -P 0x22 4M 512k|s1"
    "c4k_rc8|cluster_size=4096,refcount_bits=8|write -P 0x33 1M 1M|"
    "v2_16k|compat=0.10,cluster_size=16384|write -P 0x44 8M 1M|"
)

W=$UQ_TMP/k9
mkdir -p "$W"
for row in "${CONFIGS[@]}"; do
    IFS='|' read -r name opts setup snap <<<"$row"
    img=$W/$name.qcow2
    args=()
    IFS=';' read -r -a cmds <<<"$setup"
    for c in "${cmds[@]}"; do args+=(-c "$c"); done
    if ! qemu-img create -q -f qcow2 -o "$opts" "$img" 16M ||
        ! qemu-io -f qcow2 "$img" "${args[@]}" >/dev/null ||
        { [[ -n $snap ]] && ! qemu-img snapshot -c "$snap" "$img"; } ||
        ! qemu-img convert -f qcow2 -O raw "$img" "$W/$name.base"; then
        notok "kill9_setup_$name" "could not prepare the image"
        exit 1
    fi
done

# check_image IMAGE: qemu-img check exit 0 or 3 (leaks only); prints the exit code.
check_image() {
    qemu-img check "$1" >"$UQ_TMP/check.out" 2>&1
    local rc=$?
    echo $rc
    [[ $rc -eq 0 || $rc -eq 3 ]] || sed 's/^/#   /' "$UQ_TMP/check.out" | head -20 >&2
}

passed=0 leaky=0 acked=0 first=
for ((i = 0; i < ROUNDS; i++)); do
    row=${CONFIGS[i % ${#CONFIGS[@]}]}
    name=${row%%|*}
    img=$W/$name.qcow2
    seed=$((SEED * 1000 + i))
    tag="round $i ($name, seed $seed)"
    note "=== $tag"
    if ! start_nbd "$img" --format qcow2; then
        first=${first:-"$tag: the server did not start on the image the last round left"}
        break
    fi
    if ! "$PYTHON" "$HERE/kill9.py" run "$NBD_SOCK" "$NBD_PID" "$W/log.json" "$seed" >"$UQ_TMP/run.out" 2>&1; then
        sed 's/^/#   /' "$UQ_TMP/run.out" >&2
        stop_nbd >/dev/null 2>&1
        first=${first:-"$tag: the workload failed: $(tail -1 "$UQ_TMP/run.out")"}
        break
    fi
    note "$(cat "$UQ_TMP/run.out")"
    rc=0
    stop_nbd >/dev/null 2>&1 || rc=$?
    if [[ $rc -ne 137 ]]; then
        first=${first:-"$tag: the server was not killed by SIGKILL (exit $rc)"}
        break
    fi
    acked=$((acked + $(sed -n 's/.*requests, \([0-9]*\) acknowledged.*/\1/p' "$UQ_TMP/run.out")))
    # (a)
    rc=$(check_image "$img")
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        first=${first:-"$tag: (a) qemu-img check after the kill: exit $rc"}
        cp "$img" "$W/log.json" "$UQ_TMP/" 2>/dev/null
        break
    fi
    [[ $rc -eq 3 ]] && leaky=$((leaky + 1))
    # (b)
    if ! qemu-img convert -f qcow2 -O raw "$img" "$W/after.raw" ||
        ! "$PYTHON" "$HERE/kill9.py" verify "$W/log.json" "$W/$name.base" "$W/after.raw" >"$UQ_TMP/verify.out" 2>&1; then
        first=${first:-"$tag: (b) $(tail -1 "$UQ_TMP/verify.out")"}
        cp "$img" "$W/log.json" "$W/$name.base" "$UQ_TMP/" 2>/dev/null
        break
    fi
    note "$(cat "$UQ_TMP/verify.out")"
    # (c)
    if ! start_nbd "$img" --format qcow2; then
        first=${first:-"$tag: (c) the server does not open the crash image"}
        break
    fi
    if ! "$PYTHON" "$HERE/kill9.py" reopen "$NBD_SOCK" "$seed" >"$UQ_TMP/reopen.out" 2>&1; then
        stop_nbd >/dev/null 2>&1
        first=${first:-"$tag: (c) write + flush + read back failed: $(tail -1 "$UQ_TMP/reopen.out")"}
        break
    fi
    rc=0
    stop_nbd || rc=$?
    if [[ $rc -ne 0 ]]; then
        first=${first:-"$tag: (c) clean shutdown after the reopen: exit $rc"}
        break
    fi
    rc=$(check_image "$img")
    if [[ $rc -ne 0 && $rc -ne 3 ]]; then
        first=${first:-"$tag: (c) qemu-img check after reopen + write + close: exit $rc"}
        break
    fi
    read -r off byte <"$UQ_TMP/reopen.out"
    if ! qemu-img convert -f qcow2 -O raw "$img" "$W/$name.base" ||
        ! cmp -s -i "$off:0" -n 65536 "$W/$name.base" <(head -c 65536 /dev/zero | tr '\0' "\\$(printf %o "$byte")"); then
        first=${first:-"$tag: (c) the write made after the reopen does not read back after close"}
        break
    fi
    passed=$((passed + 1))
done

if [[ -n $first ]]; then
    notok kill9 "$first (KILL9_SEED=$SEED; evidence in the scratch dir with KEEP_TMP=1)"
else
    ok "kill9: $passed rounds of SIGKILL during writes and flushes ($acked requests acknowledged, $leaky rounds with leaked clusters only): check, durable data and reopen all pass"
fi
echo "# kill9: $passed rounds survived"
