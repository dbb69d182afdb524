# Shared by the crash suites: find crashsim, pick a fast scratch directory,
# and prepare the starting images.  Source after tests/lib/lib.sh.

CRASH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# find_crashsim: set CRASHSIM to the crashsim the Makefile built next to $UQ
# (make MODE=debug unit builds it into BUILD/tests/).  Prints a `not ok` and returns 1 if missing.
find_crashsim() {
    CRASHSIM=$(dirname "$UQ")/tests/crashsim
    if [[ ! -x $CRASHSIM ]]; then
        notok "${1}_build" "no $CRASHSIM (build it first: make MODE=debug unit)"
        return 1
    fi
}

# crash_workdir: set W to a scratch directory for many image copies and syncs: tmpfs when
# there is one (syncs are free there: the simulator models durability itself), else $UQ_TMP.
# Not in a $(...) subshell: the cleanup must be registered in the script itself.
crash_workdir() {
    W=
    if [[ -d /dev/shm && -w /dev/shm ]]; then
        W=$(mktemp -d /dev/shm/uq-crash.XXXXXX 2>/dev/null) || W=
    fi
    if [[ -n $W ]]; then
        at_exit "rm -rf '$W'"
    else
        W=$UQ_TMP/work
        mkdir -p "$W"
    fi
}

# qio_quiet IMAGE CMD...: qemu-io commands on a qcow2 image, output to the log.
qio_quiet() {
    local img=$1; shift
    local args=() c
    for c in "$@"; do args+=(-c "$c"); done
    timeout -k 5 120 qemu-io -f qcow2 "$img" "${args[@]}" >"$UQ_TMP/qio.out" 2>&1
    local rc=$?
    grep -v -E '^(wrote|read|discard) [0-9]+/[0-9]+ bytes|^[0-9.]+ (bytes|[KMGT]iB), [0-9]+ ops' \
        "$UQ_TMP/qio.out" | head -20 >&2
    return $rc
}

# prep_image CONFIG DIR: create DIR/init.qcow2 (and DIR/backing.raw if it has one) for one of
# the configurations below; prints the backing raw path or "-".
#   snap64k   v3, 64 KiB clusters, 16-bit refcounts: data, compressed clusters, an internal
#             snapshot sharing them, more data on top.
#   backv2    v2 (compat 0.10), 4 KiB clusters, over a raw backing file with varied content:
#             partial writes copy from the backing file; discard does nothing (as QEMU:
#             without a zero flag it would uncover the backing file).
#   tiny512   v3, 512-byte clusters, 64-bit refcounts, 1.8 MiB of data: the workload pushes
#             the file past what one refcount-table cluster describes (table growth).
#   dirty     v3, 64 KiB clusters, 4-bit refcounts, lazy refcounts, left dirty by a crash
#             (qemu-io abort): the engine repairs it on open, and that is recorded too.
#   ext32k    v3, 32 KiB clusters with extended L2 (1 KiB subclusters) over a raw backing
#             file: subclusters written, zeroed and discarded one by one, compressed
#             clusters and an internal snapshot sharing them.
#   nounref   as snap64k, run with --discard-no-unref (config_flags): discarded clusters
#             stay allocated as zero clusters and their data is punched out at once.
#   datafile  v3, 32 KiB clusters with extended L2, guest data in an external data file
#             (data_file=data.raw): data before the metadata naming it across two files.
#   dataraw   v3, 4 KiB clusters, external data file with data_file_raw=on: the data file
#             must equal the guest view in every crash state too.
#   bitmap    v3, 64 KiB clusters, enabled dirty bitmaps of 64 KiB and 4 KiB granularity
#             (with bits set by QEMU) and a disabled one: in every crash state QEMU must find
#             each enabled bitmap in use (inconsistent), or, if it trusts one, the bitmap must
#             cover every range that differs from the starting image (bitmap_covers).
# Configurations with a data file keep each image in a directory of its own next to its data
# file (DIR/init/disk.qcow2 + DIR/init/data.raw; see config_image).
prep_image() {
    local cfg=$1 d=$2
    rm -rf "$d/init.qcow2" "$d/backing.raw" "$d/init"
    case $cfg in
    bitmap)
        qemu-img create -q -f qcow2 "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0xb1 0 1M" &&
        qemu-img bitmap --add "$d/init.qcow2" b64k && qemu-img bitmap --add -g 4k "$d/init.qcow2" b4k &&
        qemu-img bitmap --add "$d/init.qcow2" off &&
        qio_quiet "$d/init.qcow2" "write -P 0xb2 2M 100k" && qemu-img bitmap --disable "$d/init.qcow2" off ||
            return 1
        echo - ;;
    datafile|dataraw)
        local raw=off opts=extended_l2=on,cluster_size=32k
        [[ $cfg == dataraw ]] && raw=on opts=cluster_size=4k
        mkdir -p "$d/init" &&
        (cd "$d/init" && qemu-img create -q -f qcow2 -o "$opts,data_file=data.raw,data_file_raw=$raw" \
            disk.qcow2 4M && qio_quiet disk.qcow2 "write -P 0xa1 0 1M" "write -P 0xa2 1536k 100k" \
            "write -z 2M 256k" "discard 3M 64k") || return 1
        echo - ;;
    snap64k)
        qemu-img create -q -f qcow2 -o cluster_size=64k,refcount_bits=16 "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x11 0 1M" "write -c -P 0x22 1536k 256k" \
            "write -c -P 0x23 3M 128k" &&
        qemu-img snapshot -c s1 "$d/init.qcow2" &&
        qio_quiet "$d/init.qcow2" "write -P 0x33 512k 192k" "write -P 0x34 2M 64k" || return 1
        echo - ;;
    backv2)
        qemu-img create -q -f raw "$d/backing.raw" 4M &&
        timeout 60 qemu-io -f raw "$d/backing.raw" -c "write -P 0x41 0 1M" -c "write -P 0x42 1M 1M" \
            -c "write -P 0x43 2M 1536k" >/dev/null &&
        qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=4k -b backing.raw -F raw \
            "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x51 8k 64k" "write -P 0x52 1M 32k" || return 1
        echo "$d/backing.raw" ;;
    tiny512)
        qemu-img create -q -f qcow2 -o cluster_size=512,refcount_bits=64 "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x61 0 1850k" || return 1
        echo - ;;
    dirty)
        qemu-img create -q -f qcow2 -o cluster_size=64k,refcount_bits=4,lazy_refcounts=on \
            "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x71 0 1M" || return 1
        # abort() leaves the dirty bit set and the refcounts stale.
        (ulimit -c 0; timeout 60 qemu-io -f qcow2 "$d/init.qcow2" -c "write -P 0x72 1M 512k" \
            -c "write -P 0x73 3M 64k" -c abort >/dev/null 2>&1) 2>/dev/null
        [[ $(( $(header_field "$d/init.qcow2" 72 8) & 1 )) -eq 1 ]] || return 1
        echo - ;;
    ext32k)
        qemu-img create -q -f raw "$d/backing.raw" 4M &&
        timeout 60 qemu-io -f raw "$d/backing.raw" -c "write -P 0x81 0 2M" -c "write -P 0x82 2M 2M" \
            >/dev/null &&
        qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=32k -b backing.raw -F raw \
            "$d/init.qcow2" 4M &&
        qio_quiet "$d/init.qcow2" "write -P 0x91 4k 8k" "write -P 0x92 100k 70k" "write -z 300k 3k" \
            "write -c -P 0x93 1M 64k" &&
        qemu-img snapshot -c s1 "$d/init.qcow2" &&
        qio_quiet "$d/init.qcow2" "write -P 0x94 6k 1k" "discard 1056k 32k" || return 1
        echo "$d/backing.raw" ;;
    nounref)
        prep_image snap64k "$d" ;;
    *) return 1 ;;
    esac
}

# config_flags CONFIG: extra crashsim options of a configuration.
config_flags() {
    case $1 in
    nounref) echo --discard-no-unref ;;
    datafile|dataraw) echo --data-file data.raw ;;
    esac
}

# config_image CONFIG DIR NAME: the path of image NAME (init, work, or a crash state st.N) of
# a configuration: DIR/NAME.qcow2, or DIR/NAME/disk.qcow2 with a data file next to it.
config_image() {
    case $1 in
    datafile|dataraw) echo "$2/$3/disk.qcow2" ;;
    *) echo "$2/$3.qcow2" ;;
    esac
}

# bitmap_covers IMAGE RAW INITRAW: for each enabled bitmap of IMAGE that QEMU trusts (not
# in-use, autoclear bit 0 set), every granule where RAW differs from INITRAW must be dirty.
# Prints what is wrong; returns 1 then.
bitmap_covers() {
    local img=$1 raw=$2 init=$3 b sock=$UQ_TMP/cov.sock pidf=$UQ_TMP/cov.pid
    (( $(header_field "$img" 88 8) & 1 )) || return 0    # QEMU ignores all of them
    for b in b64k b4k; do
        local flags
        flags=$(qemu-img info -U --output=json "$img" |
            jq -r --arg n "$b" '."format-specific".data.bitmaps[] | select(.name == $n) | .flags | join(",")')
        [[ $flags == *in-use* ]] && continue
        rm -f "$sock" "$pidf"
        qemu-nbd -r --fork --pid-file "$pidf" -k "$sock" -f qcow2 -B "$b" "$img" >&2 || { echo "qemu-nbd -B $b failed"; return 1; }
        nbdinfo --map="qemu:dirty-bitmap:$b" "nbd+unix:///?socket=$sock" >"$UQ_TMP/cov.map" 2>&1
        local pid; pid=$(cat "$pidf"); kill "$pid" 2>/dev/null; timeout 30 tail --pid="$pid" -f /dev/null
        "$PYTHON" - "$raw" "$init" "$UQ_TMP/cov.map" "$b" <<'EOF' || return 1
import sys
raw, init, mp, name = open(sys.argv[1], "rb").read(), open(sys.argv[2], "rb").read(), sys.argv[3], sys.argv[4]
dirty = []
for line in open(mp):
    f = line.split()
    if len(f) >= 3 and f[2] == "1":
        dirty.append((int(f[0]), int(f[0]) + int(f[1])))
for off in range(0, max(len(raw), len(init)), 512):
    if raw[off:off + 512] != init[off:off + 512] and not any(a <= off < e for a, e in dirty):
        print(f"bitmap {name} is trusted by QEMU but misses a change at offset {off}")
        sys.exit(1)
EOF
    done
}

# in_dir IMAGE CMD...: run CMD from IMAGE's directory (QEMU 7.2 resolves a relative data file
# name against its working directory, we against the image's: there both agree).
in_dir() {
    local img=$1; shift
    (cd "$(dirname "$img")" && "$@")
}

# prep_run_dir NAME CONFIG DIR: the starting image DIR/init.qcow2 (and its
# raw views for the verifier: log.initraw, log.backraw for a backing file),
# and DIR/work.qcow2, the copy the workload runs on.  Reports NAME failed
# and returns 1 if any step fails.
prep_run_dir() {
    local name=$1 cfg=$2 d=$3 back init work
    back=$(prep_image "$cfg" "$d") || { notok "$name" "cannot prepare the starting image"; return 1; }
    init=$(config_image "$cfg" "$d" init) work=$(config_image "$cfg" "$d" work)
    in_dir "$init" qemu-img convert -f qcow2 -O raw "$init" "$d/log.initraw" ||
        { notok "$name" "qemu-img convert of the starting image failed"; return 1; }
    [[ $back == - ]] || cp "$back" "$d/log.backraw"
    if [[ $init == */init/* ]]; then
        rm -rf "$d/work" && cp -a --sparse=always "$d/init" "$d/work"
    else
        cp "$init" "$work"
    fi
}
