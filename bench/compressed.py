#!/usr/bin/python3
"""The compressed-image section of `make bench` (BENCH_ONLY=compressed runs it alone).

    bench/compressed.py BINARY      (or through bench/bench.py with BENCH_ONLY=compressed)

On a half-compressible raw image of BENCH_COMPRESSED_SIZE (fio's buffer_compress_percentage=50),
converted by `qemu-img convert -c` with zlib and with zstd (and plainly, the uncompressed source):
  - 4k sequential reads, 4k random reads (depth BENCH_DEPTH) and 512k sequential reads (depth 16):
    the engine (`BINARY bench`) on the compressed image and on the uncompressed source, our NBD
    export and `qemu-nbd --cache=none --aio=io_uring` (fio's nbd engine); IOPS and the server's
    CPU time per read.  BENCH_BASELINE=OLD-BINARY adds the engine of an older build.
  - p99 of 4k reads (depth 1) of uncompressed clusters of a compressed image over our export,
    idle and while a second fio job streams the compressed part (64k reads, depth 32).
  - `BINARY convert -c` of the raw image against `qemu-img convert -c`: time and output size.
  - The device's ceiling: fio O_DIRECT random reads of one cluster's compressed bytes.
BENCH_COMPRESSED_SUBSTRATES (default disk,ram): where the images are.  disk: BENCH_DIR.  ram:
ext4 on a loop device over a file in /dev/shm (root only), so that the device's bandwidth is
not the bound: on a slow disk random compressed reads are bound by the disk for every server
(each needs a whole cluster's compressed bytes), on a RAM disk by CPU.  The reads run on each
substrate; convert runs on the first.
Writes BENCH_RESULTS/compressed.{md,json} and prints the tables with the issue's targets.
"""
import json
import os
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True
from common import (BenchError, fill_file, log, parse_fio, parse_size, proc_cpu_s,  # noqa: E402
                    run, size_name)

HERE = os.path.dirname(os.path.abspath(__file__))


class Env:
    def __init__(self, binary):
        self.binary = os.path.abspath(binary)
        quick = os.environ.get("BENCH_QUICK") == "1"
        self.dir = os.environ.get("BENCH_DIR", "/var/tmp/ublk-qcow2-bench")
        self.size = parse_size(os.environ.get("BENCH_COMPRESSED_SIZE", "64M" if quick else "1G"))
        self.secs = float(os.environ.get("BENCH_SECONDS", "2" if quick else "4"))
        self.depth = int(os.environ.get("BENCH_DEPTH", "128"))
        self.results = os.environ.get("BENCH_RESULTS", os.path.join(HERE, "results"))
        self.baseline = os.environ.get("BENCH_BASELINE")
        self.logs = os.path.join(self.dir, "logs")
        os.makedirs(self.logs, exist_ok=True)


def images(env):
    d = env.dir
    src = os.path.join(d, "zsrc.raw")
    imgs = {"raw": src, "plain": os.path.join(d, "zplain.qcow2"),
            "zlib": os.path.join(d, "zzlib.qcow2"), "zstd": os.path.join(d, "zzstd.qcow2"),
            "mixed": os.path.join(d, "zmixed.qcow2")}
    stamp = os.path.join(d, "zimages.stamp")
    want = json.dumps({"size": env.size, "v": 1})
    if os.path.exists(stamp) and open(stamp).read() == want and all(map(os.path.exists, imgs.values())):
        log("reusing the compressed images")
        return imgs
    log(f"making a {size_name(env.size)} half-compressible raw image and its qcow2 copies")
    fill_file(src, env.size, compressible=True)
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, imgs["plain"]], timeout=3600)
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", src, imgs["zlib"]], timeout=3600)
    run(["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd",
         src, imgs["zstd"]], timeout=3600)
    # The first eighth rewritten uncompressed: the clusters whose latency is measured.
    run(["cp", imgs["zlib"], imgs["mixed"]])
    run(["qemu-io", "-f", "qcow2", "-c", f"write -P 7 0 {env.size // 8}", imgs["mixed"]], timeout=600)
    os.sync()
    open(stamp, "w").write(want)
    return imgs


class Server:
    def __init__(self, env, kind, image):
        self.env, self.kind, self.image = env, kind, image
        self.sock = os.path.join(env.dir, f"z-{kind}.sock")
        self.pidf = self.sock + ".pid"

    def __enter__(self):
        for f in (self.sock, self.pidf):
            if os.path.exists(f):
                os.unlink(f)
        if self.kind == "ours":
            argv = [self.env.binary, "nbd", "--fork", "--pid-file", self.pidf, "--socket", self.sock,
                    "--read-only", self.image]
        else:
            argv = ["qemu-nbd", "--fork", "--pid-file", self.pidf, "-k", self.sock, "-t", "-e", "8", "-r",
                    "-f", "qcow2", "--cache=none", "--aio=io_uring", self.image]
        # Output to a file: a forked server keeps its stdout and stderr open.
        with open(os.path.join(self.env.logs, f"z-{self.kind}.log"), "a") as logf:
            r = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, timeout=120)
        if r.returncode:
            raise BenchError(f"{self.kind} server did not start (exit {r.returncode})")
        self.pid = int(open(self.pidf).read())
        return self

    def uri(self):
        return f"nbd+unix:///?socket={self.sock}"

    def __exit__(self, *exc):
        try:
            os.kill(self.pid, 15)
            for _ in range(600):
                os.kill(self.pid, 0)
                time.sleep(0.05)
        except ProcessLookupError:
            pass


WL = {"read_4k": ("read", "4k", None), "randread_4k": ("randread", "4k", None),
      "read_512k": ("read", "512k", 16)}


def fio_nbd(env, srv, wl, tag):
    rw, bs, depth = WL[wl]
    out = os.path.join(env.logs, f"z-{tag}.json")
    cpu0 = proc_cpu_s(srv.pid)
    run(["fio", "--name=z", "--ioengine=nbd", f"--uri={srv.uri()}", f"--rw={rw}", f"--bs={bs}",
         f"--iodepth={depth or env.depth}", f"--runtime={env.secs}s", "--time_based", "--norandommap",
         "--gtod_reduce=1", "--output-format=json", f"--output={out}"], timeout=env.secs + 120)
    cpu = proc_cpu_s(srv.pid) - cpu0
    r = parse_fio(out)
    ios = max(1, r["ios"])
    return {"iops": r["read_iops"], "cpu_us_per_io": cpu / ios * 1e6}


def engine(env, binary, img, wl):
    rw, bs, depth = WL[wl]
    p = subprocess.run([binary, "bench", "--rw", rw, "--bs", bs, "--depth", str(depth or env.depth),
                        "--seconds", str(max(1, round(env.secs))), "--json", img],
                       capture_output=True, text=True, timeout=env.secs + 120)
    if p.returncode:
        raise BenchError(f"bench failed: {p.stderr.strip()[:200]}")
    d = json.loads(p.stdout)
    ios = max(1, d.get("ios") or d["iops"] * d.get("seconds", env.secs))
    return {"iops": d["iops"], "cpu_us_per_io": (d["cpu_user_s"] + d["cpu_sys_s"]) / ios * 1e6}


def disk_ceiling(env, img):
    """What the device itself allows for random compressed reads: fio O_DIRECT random reads
    of the size of one cluster's compressed data (the file's size over its clusters, in
    512-byte-aligned spans as the engine reads them), at the same depth.  A random 4k read
    of a compressed cluster needs all of its compressed bytes (a zstd cluster is one block),
    so no server can beat this on this device."""
    bs = (os.path.getsize(img) // max(1, env.size // 65536) + 511) // 512 * 512 + 512
    out = os.path.join(env.logs, "z-ceiling.json")
    run(["fio", "--name=ceiling", f"--filename={img}", "--rw=randread", f"--bs={bs}", "--blockalign=512",
         "--direct=1", "--ioengine=io_uring", f"--iodepth={env.depth}", f"--runtime={env.secs}s",
         "--time_based", "--norandommap", "--gtod_reduce=1", "--output-format=json", f"--output={out}"],
        timeout=env.secs + 120)
    return {"iops": parse_fio(out)["read_iops"], "cpu_us_per_io": 0.0}


def p99_test(env, img):
    """p99 of 4k reads of uncompressed clusters, idle and with a compressed stream."""
    res = {}
    with Server(env, "ours", img) as srv:
        for tag, stream in (("idle", False), ("stream", True)):
            out = os.path.join(env.logs, f"z-p99-{tag}.json")
            argv = ["fio", "--output-format=json", f"--output={out}", "--ioengine=nbd",
                    f"--uri={srv.uri()}", f"--runtime={env.secs}s", "--time_based",
                    "--percentile_list=50:99",
                    "--name=lat", "--rw=randread", "--bs=4k", "--iodepth=1", "--offset=0",
                    f"--size={env.size // 8}"]
            if stream:
                argv += ["--name=stream", "--rw=read", "--bs=64k", "--iodepth=32",
                         f"--offset={env.size // 4}", f"--size={env.size - env.size // 4}"]
            run(argv, timeout=env.secs + 120)
            text = open(out).read()
            job = json.loads(text[text.index("{"):])["jobs"][0]
            res[tag] = job["read"]["clat_ns"]["percentile"]["99.000000"] / 1000.0
    return res


def convert_test(env, src):
    res = {}
    for who, argv in (("ours", [env.binary, "convert", "-c", "-f", "raw", "-O", "qcow2"]),
                      ("qemu-img", ["qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2"])):
        out = os.path.join(env.dir, f"zconv-{who}.qcow2")
        if os.path.exists(out):
            os.unlink(out)
        os.sync()
        t = time.monotonic()
        run(argv + [src, out], timeout=3600)
        res[who] = {"seconds": time.monotonic() - t, "bytes": os.path.getsize(out)}
        os.unlink(out)
    return res


class RamDisk:
    """ext4 on a loop device over a sparse file in /dev/shm, mounted under BENCH_DIR/ram."""
    def __init__(self, env, size):
        self.env, self.size = env, size
        self.file = os.path.join("/dev/shm", f"uq-bench-ram-{os.getpid()}.img")
        self.mnt = os.path.join(env.dir, "ram")
        self.dev = None

    def __enter__(self):
        if os.geteuid() != 0:
            raise BenchError("the ram substrate needs root (losetup, mount)")
        with open(self.file, "wb") as f:
            f.truncate(self.size)
        try:
            self.dev = run(["losetup", "-f", "--show", self.file]).strip()
            run(["mkfs.ext4", "-q", "-F", self.dev], timeout=600)
            os.makedirs(self.mnt, exist_ok=True)
            run(["mount", self.dev, self.mnt])
        except BenchError:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        if self.dev:
            subprocess.run(["umount", self.mnt], capture_output=True)
            subprocess.run(["losetup", "-d", self.dev], capture_output=True)
        if os.path.exists(self.file):
            os.unlink(self.file)


def ram_images(env, imgs, ram):
    """Copies of the images on the RAM disk (and logs and sockets there too)."""
    out = {}
    for k, path in imgs.items():
        out[k] = os.path.join(ram.mnt, os.path.basename(path))
        shutil.copyfile(path, out[k])
    os.sync()
    return out


def read_rows(env, imgs):
    rows = []
    for comp in ("zlib", "zstd"):
        for wl in WL:
            paths = [("engine", lambda: engine(env, env.binary, imgs[comp], wl)),
                     ("engine, uncompressed source", lambda: engine(env, env.binary, imgs["plain"], wl))]
            if env.baseline:
                paths.append(("engine, baseline build", lambda: engine(env, env.baseline, imgs[comp], wl)))
            if wl == "randread_4k":
                paths.append(("disk ceiling (fio, compressed bytes)", lambda: disk_ceiling(env, imgs[comp])))
            for kind in ("ours", "qemu"):
                def nbd(kind=kind):
                    with Server(env, kind, imgs[comp]) as s:
                        return fio_nbd(env, s, wl, f"{comp}-{wl}-{kind}")
                paths.append((f"nbd {kind}", nbd))
            for name, fn in paths:
                try:
                    r = fn()
                except (BenchError, subprocess.SubprocessError, OSError, ValueError) as e:
                    r = {"error": str(e)[:200]}
                log(f"{comp} {wl} {name}: {r}")
                rows.append({"compression": comp, "workload": wl, "path": name, **r})
    p99 = p99_test(env, imgs["mixed"])
    log(f"p99: {p99}")
    return {"rows": rows, "p99_us": p99}


def main(binary):
    env = Env(binary)
    imgs = images(env)
    wanted = [w.strip() for w in os.environ.get("BENCH_COMPRESSED_SUBSTRATES", "disk,ram").split(",") if w.strip()]
    subs = {}
    for sub in wanted:
        if sub == "disk":
            log("compressed: images on disk")
            subs["disk"] = read_rows(env, imgs)
        elif sub == "ram":
            try:
                need = sum(os.path.getsize(p) for p in imgs.values()) + (512 << 20)
                with RamDisk(env, need * 5 // 4) as ram:
                    log(f"compressed: images on a RAM disk ({ram.dev} over /dev/shm)")
                    subs["ram"] = read_rows(env, ram_images(env, imgs, ram))
            except (BenchError, OSError) as e:
                log(f"compressed: ram substrate skipped: {e}")
                subs["ram"] = {"skipped": str(e)[:200]}
        else:
            raise BenchError(f"BENCH_COMPRESSED_SUBSTRATES: unknown substrate {sub!r} (disk, ram)")
    conv = convert_test(env, imgs["raw"])
    log(f"convert: {conv}")
    doc = {"size": env.size, "seconds": env.secs, "depth": env.depth, "substrates": subs,
           "convert": conv, "loadavg": open("/proc/loadavg").read().split()[:3]}
    os.makedirs(env.results, exist_ok=True)
    with open(os.path.join(env.results, "compressed.json"), "w") as f:
        json.dump(doc, f, indent=1)
    md = report(doc)
    with open(os.path.join(env.results, "compressed.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


SUBSTRATE_NAMES = {"disk": "on disk (BENCH_DIR)",
                   "ram": "on a RAM disk (ext4 on a loop device over /dev/shm: not bound by the device)"}


def report(doc):
    lines = [f"# Compressed images ({size_name(doc['size'])}, {doc['seconds']:g} s each, depth "
             f"{doc['depth']}, load {' '.join(doc['loadavg'])})", ""]
    for sub, res in doc["substrates"].items():
        lines.append(f"## {SUBSTRATE_NAMES.get(sub, sub)}")
        lines.append("")
        if "skipped" in res:
            lines += [f"skipped: {res['skipped']}", ""]
            continue
        lines += report_reads(res)
    c = doc["convert"]
    o, q = c["ours"], c["qemu-img"]
    lines += ["## convert -c (first substrate)", "", "| target | measured | met |", "|---|---|---|"]
    lines.append(f"| convert -c time <= qemu-img's | {o['seconds']:.1f} s vs {q['seconds']:.1f} s | "
                 f"{'yes' if o['seconds'] <= q['seconds'] else 'no'} |")
    lines.append(f"| convert -c size <= 1.05x qemu-img's | {o['bytes']:,} vs {q['bytes']:,} "
                 f"({o['bytes'] / q['bytes']:.4f}x) | {'yes' if o['bytes'] <= 1.05 * q['bytes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def report_reads(res):
    def get(comp, wl, path):
        for r in res["rows"]:
            if r["compression"] == comp and r["workload"] == wl and r["path"] == path:
                return r
        return {}
    lines = ["| image | workload | path | IOPS | server CPU us/read |", "|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['compression']} | {r['workload']} | {r['path']} | error: {r['error']} | |")
        else:
            lines.append(f"| {r['compression']} | {r['workload']} | {r['path']} | {r['iops']:,.0f} | "
                         f"{r['cpu_us_per_io']:.1f} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for comp in ("zlib", "zstd"):
        for wl, want in (("read_4k", 3), ("randread_4k", 2)):
            o, q = get(comp, wl, "nbd ours").get("iops"), get(comp, wl, "nbd qemu").get("iops")
            if o and q:
                lines.append(f"| {comp} {wl} NBD >= {want}x qemu-nbd | {o / q:.2f}x | "
                             f"{'yes' if o / q >= want else 'no'} |")
            d = get(comp, wl, "disk ceiling (fio, compressed bytes)").get("iops")
            if o and q and d:
                lines.append(f"| (the device's ceiling for {comp} {wl}: {d / q:.2f}x qemu-nbd; "
                             f"ours reach {o / d:.0%} of it) | | |")
        e, b = get(comp, "read_4k", "engine").get("iops"), get(comp, "read_4k", "engine, baseline build").get("iops")
        if e and b:
            lines.append(f"| {comp} read_4k engine >= 8x the baseline build | {e / b:.1f}x | "
                         f"{'yes' if e / b >= 8 else 'no'} |")
    p = res["p99_us"]
    lines.append(f"| uncompressed 4k p99 with a compressed stream <= 2x idle | {p['stream']:.0f} us vs "
                 f"{p['idle']:.0f} us ({p['stream'] / p['idle']:.2f}x) | "
                 f"{'yes' if p['stream'] <= 2 * p['idle'] else 'no'} |")
    return lines + [""]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(main(sys.argv[1]))
    except BenchError as e:
        log(str(e))
        sys.exit(1)
