#!/usr/bin/env bash
# Interop: external data files (qemu-img create -o data_file=...,data_file_raw=on|off).  The
# same workload through our NBD export and through qemu-io must give identical guest views,
# `qemu-img check` must pass, and with data_file_raw the data file itself must be a raw image
# equal to the guest view.  Also: relative data file names resolve against the image's
# directory, the data file is locked while served, and what QEMU refuses is refused.
# QEMU 7.2 resolves a relative data file name against its working directory, so its tools run
# from the image's directory here (where both readings agree).
# timeout: 600
# soak-timeout: 2400
. "$(dirname "$0")/../lib/lib.sh"
. "$(dirname "$0")/common.sh"

# make_df_image DIR NAME DATANAME OPTS: DIR/NAME.qcow2 with its data in DIR/DATANAME (name as
# stored in the header, relative to DIR), prefilled by qemu-io.
make_df_image() {
    local dir=$1 name=$2 dname=$3 opts=$4
    (cd "$dir" && make_image "$name.qcow2" 16M "data_file=$dname${opts:+,$opts}" "${PREFILL[@]}")
}

# case_datafile DIR SEED RAW(on|off) OPTS [apply_workload opts...]
case_datafile() {
    local dir=$1 seed=$2 raw=$3 opts=$4; shift 4
    mkdir -p "$dir/data"
    make_df_image "$dir" ref data/ref.raw "data_file_raw=$raw${opts:+,$opts}" &&
        make_df_image "$dir" ours data/ours.raw "data_file_raw=$raw${opts:+,$opts}" ||
        { fail "could not make the images"; return; }
    pushd "$dir" >/dev/null || return
    apply_workload "$dir" qcow2 "$seed" "$@"
    popd >/dev/null || return
    [[ -n $FAIL ]] && return
    local want=false
    [[ $raw == on ]] && want=true
    [[ $(cd "$dir" && qemu-img info -U --output=json ours.qcow2 2>/dev/null |
        jq -r '."format-specific".data."data-file-raw"') == "$want" ]] ||
        fail "data_file_raw=$raw did not survive"
    if [[ $raw == on ]]; then
        # The data file alone is the guest disk.
        (cd "$dir" && qimg_compare data/ours.raw ref.qcow2 raw qcow2) ||
            fail "the raw data file differs from the guest view"
    fi
}

run_case "data file, cluster_size=4k, --discard-no-unref" case_datafile off "cluster_size=4096" \
    --server-opt --discard-no-unref
run_case "data file, data_file_raw, write-zeroes with unmap" case_datafile on "" --wl-opt --zero-unmap
run_case "data file, extended_l2 cluster_size=16k, write-zeroes with unmap" case_datafile off \
    "extended_l2=on,cluster_size=16384" --wl-opt --zero-unmap

# A relative name into a sibling directory, the server started from elsewhere with a relative
# image path: resolved against the image's directory, never the working directory.
case_relative() {
    local dir=$1 seed=$2
    # From elsewhere/deep, ../data would be a directory that does not exist.
    mkdir -p "$dir/vm" "$dir/data" "$dir/elsewhere/deep"
    make_df_image "$dir/vm" ref ../data/ref.raw "" && make_df_image "$dir/vm" ours ../data/ours.raw "" ||
        { fail "could not make the images"; return; }
    pushd "$dir/vm" >/dev/null || return
    apply_workload "$dir/vm" qcow2 "$seed" --cwd "$dir/elsewhere/deep"
    popd >/dev/null || return
}
run_case "data file, relative name, server started elsewhere" case_relative

# --- locking and refusals ---------------------------------------------------------------------
D=$UQ_TMP/df
mkdir -p "$D"
(cd "$D" && qemu-img create -q -f qcow2 -o data_file=disk.raw disk.qcow2 4M) || { notok "datafile/setup" "qemu-img create"; exit 1; }

# While served read-write, QEMU may not write the data file (we hold its locks as QEMU does).
if start_nbd "$D/disk.qcow2"; then
    if qemu-io -f raw "$D/disk.raw" -c "write 0 512" >"$UQ_TMP/lock.out" 2>&1; then
        notok "datafile/locked while served" "qemu-io wrote the data file of a served image"
    elif grep -q -i "lock" "$UQ_TMP/lock.out"; then
        ok "datafile/locked while served"
    else
        notok "datafile/locked while served" "qemu-io failed without naming a lock: $(head -c 200 "$UQ_TMP/lock.out")"
    fi
    stop_nbd || notok "datafile/locked while served" "server exit $? after SIGTERM"
else
    notok "datafile/locked while served" "server did not start"
fi

# And we refuse a data file QEMU is writing (qemu-nbd --fork returns once it holds the locks).
if qemu-nbd --fork --pid-file "$UQ_TMP/qn.pid" -k "$UQ_TMP/qn.sock" -f raw "$D/disk.raw" >&2; then
    if start_nbd "$D/disk.qcow2"; then
        stop_nbd
        notok "datafile/refused while QEMU writes it" "served an image whose data file qemu-nbd holds"
    elif grep -q -i "data file" "$NBD_LOG" && grep -q -i "in use" "$NBD_LOG"; then
        ok "datafile/refused while QEMU writes it"
    else
        notok "datafile/refused while QEMU writes it" "message does not name the data file: $(head -c 200 "$NBD_LOG")"
    fi
    kill "$(cat "$UQ_TMP/qn.pid")"
    # qemu-nbd is not our child: wait (bounded) for its locks to go.
    timeout 30 tail --pid="$(cat "$UQ_TMP/qn.pid")" -f /dev/null
else
    notok "datafile/refused while QEMU writes it" "qemu-nbd could not serve the data file"
fi

refused() { refused_start datafile "$@"; }

cp "$D/disk.qcow2" "$D/missing.qcow2"
mkdir -p "$D/x" && mv "$D/missing.qcow2" "$D/x/"
refused "missing data file" "data file.*disk.raw" "$D/x/missing.qcow2"

# QEMU refuses to take internal snapshots with a data file (they would share data clusters that
# nothing counts); forge one: a snapshot first, then the data file bit and name.
qemu-img create -q -f qcow2 "$D/snap.qcow2" 4M && qemu-img snapshot -c s1 "$D/snap.qcow2" &&
    cp "$D/disk.raw" "$D/snap.raw" && "$PYTHON" - "$D/snap.qcow2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    h = bytearray(f.read(4096))
    off = struct.unpack(">I", h[100:104])[0]
    while struct.unpack(">I", h[off:off + 4])[0] != 0:
        off += 8 + (struct.unpack(">I", h[off + 4:off + 8])[0] + 7) // 8 * 8
    name = b"snap.raw"
    h[off:off + 8 + 8 + 8] = struct.pack(">II", 0x44415441, len(name)) + name + b"\0" * 8
    h[72:80] = struct.pack(">Q", struct.unpack(">Q", h[72:80])[0] | 4)
    f.seek(0); f.write(h)
EOF
refused "internal snapshot with a data file, read-write" "snapshot" "$D/snap.qcow2"
if start_nbd "$D/snap.qcow2" --read-only; then
    if stop_nbd; then ok "datafile/snapshot with a data file, read-only"; else notok "datafile/snapshot with a data file, read-only" "exit $?"; fi
else
    notok "datafile/snapshot with a data file, read-only" "refused: $(head -c 200 "$NBD_LOG")"
fi

(cd "$D" && qemu-img create -q -f qcow2 -o data_file=noname.raw noname.qcow2 4M) &&
    "$PYTHON" - "$D/noname.qcow2" <<'EOF'
# Drop the data file name extension (type 0x44415441), keep the feature bit.
import struct, sys
from qhdr import find_extension
with open(sys.argv[1], "r+b") as f:
    h = bytearray(f.read(4096))
    off = find_extension(h, 0x44415441)
    h[off:off + 4] = struct.pack(">I", 0x7a7a7a7a)   # an unknown extension now
    f.seek(0); f.write(h)
EOF
refused "data file bit without a name" "data file" "$D/noname.qcow2"

cp "$D/disk.qcow2" "$D/rawbit.qcow2"
"$PYTHON" - "$D/rawbit.qcow2" <<'EOF'
# data_file_raw without the data file bit.
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(72); v = struct.unpack(">Q", f.read(8))[0]
    f.seek(72); f.write(struct.pack(">Q", v & ~4))
    f.seek(88); a = struct.unpack(">Q", f.read(8))[0]
    f.seek(88); f.write(struct.pack(">Q", a | 2))
EOF
refused "data_file_raw without a data file" "data_file_raw" "$D/rawbit.qcow2"

# A mapping that does not match the guest offset is corruption (as QEMU says): the read fails,
# the rest is served.
(cd "$D" && qemu-img create -q -f qcow2 -o data_file=bad.raw bad.qcow2 4M &&
    qemu-io -f qcow2 bad.qcow2 -c "write -P 5 0 128k" -c "write -P 6 1M 64k" >/dev/null) &&
    "$PYTHON" - "$D/bad.qcow2" <<'EOF'
import struct, sys
with open(sys.argv[1], "r+b") as f:
    f.seek(40); l1 = struct.unpack(">Q", f.read(8))[0]
    f.seek(l1); l2 = struct.unpack(">Q", f.read(8))[0] & 0x00fffffffffffe00
    f.seek(l2 + 8); f.write(struct.pack(">Q", (1 << 63) | 0x30000))   # guest 64k -> host 192k
EOF
if start_nbd "$D/bad.qcow2" --read-only; then
    if qemu-io -r -f raw "$(nbd_uri)" -c "read 64k 4k" >/dev/null 2>&1; then
        notok "datafile/mismatched mapping" "the bad cluster was read"
    elif ! qemu-io -r -f raw "$(nbd_uri)" -c "read -P 5 0 64k" -c "read -P 6 1M 64k" >/dev/null 2>&1; then
        notok "datafile/mismatched mapping" "good clusters no longer read"
    else
        ok "datafile/mismatched mapping"
    fi
    stop_nbd || notok "datafile/mismatched mapping" "server exit $? after SIGTERM"
    grep -q -i "data file" "$NBD_LOG" || note "no message naming the data file"
else
    notok "datafile/mismatched mapping" "server did not start"
fi
san_clean "$NBD_LOG" || notok "datafile/sanitizers" "sanitizer report"
