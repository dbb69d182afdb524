#!/usr/bin/env python3
"""Make the seed corpora of fuzz_image and fuzz_nbd.

Usage: mkseeds.py image OUTDIR     (tests/fuzz/corpus_image; needs qemu-img and qemu-io)
       mkseeds.py nbd OUTDIR       (tests/fuzz/corpus_nbd)

image: one seed per configuration of the interop matrix (cluster sizes, refcount widths, v2/v3,
preallocation, lazy refcounts left dirty, compressed zlib/zstd, internal snapshots, backing
files raw and qcow2, extended L2, a persistent bitmap), each with a small virtual size and a
few writes, stored in fuzz_image's sparse input form (see fuzz_image.c) after a fixed request
program, so every seed is a few KiB.  Deterministic for a given QEMU version.
nbd: client sessions (fixed-newstyle handshakes with LIST, INFO, GO, EXPORT_NAME, ABORT and
unsupported options, then pipelined READ, WRITE, FLUSH, TRIM, WRITE_ZEROES with and without
FUA, misaligned requests, DISC), after fuzz_nbd's flags byte.
"""
import os
import random
import struct
import subprocess
import sys
import tempfile

# name, qemu-img create options, virtual size, qemu-io commands run after creation
CONFIGS = [
    ("c512", "cluster_size=512", "256k", ["write -P 1 0 1k", "write -P 0 4k 60k", "write -P 2 100k 512"]),
    ("c4k", "cluster_size=4096", "1M", ["write -P 1 0 512", "write -P 0 8k 64k", "write -P 2 600k 512"]),
    ("c64k", "cluster_size=65536", "2M", ["write -P 1 0 1k", "write -P 2 1M 512"]),
    ("c2M", "cluster_size=2M", "4M", ["write -P 1 0 1k", "write -P 2 3M 512"]),
    ("rc1", "refcount_bits=1,cluster_size=4096", "1M", ["write -P 1 0 512", "write -P 0 4k 32k"]),
    ("rc2", "refcount_bits=2,cluster_size=512", "256k", ["write -P 1 0 512", "write -P 0 1k 16k"]),
    ("rc4", "refcount_bits=4", "1M", ["write -P 1 0 1k"]),
    ("rc8", "refcount_bits=8", "1M", ["write -P 1 0 1k"]),
    ("rc32", "refcount_bits=32,cluster_size=4096", "1M", ["write -P 1 0 512", "write -P 0 4k 16k"]),
    ("rc64", "refcount_bits=64,cluster_size=512", "256k", ["write -P 1 0 512", "write -P 0 1k 16k"]),
    ("v2", "compat=0.10", "1M", ["write -P 1 0 1k", "write -z 64k 64k"]),
    ("v2c4k", "compat=0.10,cluster_size=4096", "1M", ["write -P 1 0 1k", "write -P 0 4k 16k", "discard 0 4k"]),
    ("prealloc_meta", "preallocation=metadata,cluster_size=4096", "512k", []),
    ("zero_alloc", "cluster_size=4096", "512k", ["write -P 1 0 512", "write -P 0 4k 12k", "write -z 4k 8k"]),
    ("lazy_dirty", "lazy_refcounts=on,cluster_size=4096", "1M", None),   # left dirty: see below
    ("zlib", "cluster_size=4096", "1M", ["write -c -P 3 0 8k", "write -c 64k 4k", "write -P 4 2k 512"]),
    ("zstd", "compression_type=zstd,cluster_size=4096", "1M", ["write -c -P 3 0 8k", "write -P 5 128k 512"]),
    ("snapshot", "cluster_size=4096", "1M", None),
    ("backing_raw", "cluster_size=4096,backing_file=base.raw,backing_fmt=raw", "1M",
     ["write -P 6 4k 512", "write -P 0 300k 8k"]),
    ("backing_qcow2", "cluster_size=4096,backing_file=base.qcow2,backing_fmt=qcow2", "1M",
     ["write -P 6 8k 512"]),
    ("extl2", "extended_l2=on,cluster_size=16384", "1M", ["write -P 8 0 512", "write -P 9 64k 512"]),
    ("bitmap", "cluster_size=4096", "1M", None),
]

MAX_RECORD = 32768


def run(*args, **kw):
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def make_image(d, name, opts, size, cmds):
    path = os.path.join(d, name + ".qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size, cwd=d)
    if name == "lazy_dirty":
        run("qemu-io", "-f", "qcow2", path, "-c", "write -P 1 0 512", "-c", "write -P 0 4k 8k")
        # abort() leaves the dirty bit set and the refcounts stale
        subprocess.run(["qemu-io", "-f", "qcow2", path, "-c", "write -P 2 256k 512", "-c", "abort"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elif name == "snapshot":
        run("qemu-io", "-f", "qcow2", path, "-c", "write -P 1 0 512", "-c", "write -P 0 4k 8k",
            "-c", "write -c -P 2 64k 4k")
        run("qemu-img", "snapshot", "-c", "s1", path)
        run("qemu-io", "-f", "qcow2", path, "-c", "write -P 3 0 512")
    elif name == "bitmap":
        run("qemu-io", "-f", "qcow2", path, "-c", "write -P 1 0 512")
        run("qemu-img", "bitmap", "--add", path, "b0")
    elif cmds:
        args = []
        for c in cmds:
            args += ["-c", c]
        run("qemu-io", "-f", "qcow2", path, *args)
    with open(path, "rb") as f:
        return f.read()


def sparse(data):
    """The image in fuzz_image's form: file size in sectors, then (offset, length, bytes)."""
    out = bytearray(struct.pack("<I", (len(data) + 511) // 512))
    sec = 512
    i, n = 0, len(data)
    while i < n:
        if not any(data[i:i + sec]):
            i += sec
            continue
        j = i
        while j < n and j - i < MAX_RECORD and any(data[j:j + sec]):
            j += sec
        chunk = data[i:min(j, n)].rstrip(b"\0")
        out += struct.pack("<IH", i, len(chunk)) + chunk
        i = j
    return bytes(out)


def program(rng, size_sectors):
    """A request program: byte flags, byte count, 8-byte requests (see fuzz_image.c)."""
    ops = bytearray()
    codes = [1, 0, 2, 3, 0, 4, 6, 1, 5, 0, 8, 0, 1, 6]
    for code in codes:
        sector = rng.randrange(max(size_sectors, 1))
        count = rng.choice([0, 0, 7, 8, 127, 255])
        ops += struct.pack("<BBIH", code, rng.randrange(256), sector, count)
    return bytes([0, len(codes)]) + bytes(ops)


# --- NBD client sessions -------------------------------------------------------------------
OPTS_MAGIC = 0x49484156454F5054
REQ_MAGIC = 0x25609513


def opt(code, data=b""):
    return struct.pack(">QII", OPTS_MAGIC, code, len(data)) + data


def info_data(name, reqs):
    return struct.pack(">I", len(name)) + name + struct.pack(">H", len(reqs)) + b"".join(
        struct.pack(">H", r) for r in reqs)


def req(typ, off, length, flags=0, cookie=1, payload=b""):
    return struct.pack(">IHHQQI", REQ_MAGIC, flags, typ, cookie, off, length) + payload


READ, WRITE, DISC, FLUSH, TRIM, CACHE, WZ, BS = range(8)
FUA, NO_HOLE = 1, 2


def nbd_seeds():
    go = opt(7, info_data(b"", [3]))
    go_plain = opt(7, info_data(b"", []))
    io = (req(WRITE, 0, 1024, payload=b"\x5a" * 1024) + req(READ, 0, 4096, cookie=2) +
          req(FLUSH, 0, 0, cookie=3) + req(TRIM, 65536, 4096, cookie=4) +
          req(WZ, 8192, 8192, flags=FUA, cookie=5) + req(WZ, 16384, 4096, flags=NO_HOLE, cookie=6) +
          req(WRITE, 12288, 512, flags=FUA, cookie=7, payload=b"\x33" * 512) +
          req(READ, 1 << 20, 512, cookie=8) + req(CACHE, 0, 4096, cookie=9) + req(BS, 0, 4096, cookie=10))
    misaligned = (req(WRITE, 100, 1000, payload=b"\x11" * 1000) + req(READ, 7, 3000, cookie=2) +
                  req(WZ, 511, 2, cookie=3) + req(TRIM, 1, 1030, cookie=4))
    return {
        "go_io": b"\x00" + struct.pack(">I", 3) + opt(3) + opt(8) +
                 opt(6, info_data(b"", [1, 2, 3])) + go + io + req(DISC, 0, 0),
        "export_name": b"\x00" + struct.pack(">I", 1) + opt(1, b"") + io + misaligned,
        "named_go": b"\x02" + struct.pack(">I", 3) + opt(7, info_data(b"nope", [])) +
                    opt(7, info_data(b"exp", [1, 2])) + io,
        "read_only": b"\x01" + struct.pack(">I", 3) + go_plain + io + misaligned,
        "strict_misaligned": b"\x00" + struct.pack(">I", 3) + go + misaligned + req(DISC, 0, 0),
        "abort": b"\x00" + struct.pack(">I", 3) + opt(42, b"xyz") + opt(10, b"\0" * 8) + opt(2),
        "pipelined": b"\x00" + struct.pack(">I", 3) + go_plain + b"".join(
            req(WRITE, i * 4096, 512, cookie=i, payload=bytes([i]) * 512) for i in range(8)) +
            req(FLUSH, 0, 0, cookie=99) + req(READ, 0, 32768, cookie=100),
    }


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("image", "nbd"):
        sys.stderr.write(__doc__)
        return 2
    outdir = sys.argv[2]
    os.makedirs(outdir, exist_ok=True)
    if sys.argv[1] == "nbd":
        for name, data in nbd_seeds().items():
            with open(os.path.join(outdir, name), "wb") as f:
                f.write(data)
            print(name, len(data))
        return 0
    rng = random.Random(4)
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "base.raw"), "wb") as f:
            f.write(bytes((i // 512 * 7 + 1) & 255 for i in range(1 << 20)))
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096",
            os.path.join(d, "base.qcow2"), "1M")
        run("qemu-io", "-f", "qcow2", os.path.join(d, "base.qcow2"), "-c", "write -P 91 0 64k")
        for name, opts, size, cmds in CONFIGS:
            data = make_image(d, name, opts, size, cmds)
            vsize = struct.unpack_from(">Q", data, 24)[0]
            seed = program(rng, vsize // 512) + sparse(data)
            with open(os.path.join(outdir, name), "wb") as f:
                f.write(seed)
            # The same image with a small metadata cache (evictions).
            with open(os.path.join(outdir, name + ".smallcache"), "wb") as f:
                f.write(bytes([1]) + seed[1:])
            print(name, len(seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
