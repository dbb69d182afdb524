#!/usr/bin/python3
"""ublk-qcow2 benchmark suite (`make bench`).

    bench/bench.py BINARY            run the suite (configured by the environment below)
    bench/report.py JSON [DIR]       render latest.md and latest.png again from a latest.json

(bench/guest.py is the VM part, bench/common.py what the three share.)

Measures side by side, in one run, on the same images and with the same clients:

  engine   `BINARY bench` on a qcow2 and on the same data as raw; fio io_uring O_DIRECT on the
           raw file (the limit); `qemu-img bench` on the qcow2 (QEMU's engine, sequential).
  nbd      our NBD export vs `qemu-nbd --cache=none --aio=io_uring` vs `nbdkit null` (what the
           client itself can reach), all driven by fio's nbd engine over a unix socket; again
           with the qcow2 copied to /dev/shm (tmpfs), which takes the disk out of the
           comparison with nbdkit null (which stores nothing).
  tls      our NBD export vs qemu-nbd, both with TLS (x509, certificates made with certtool
           into BENCH_DIR/pki), fio's nbd engine (libnbd) over nbds+unix without checking the
           server's certificate (fio cannot pass libnbd a certificate file): 4k random, 512k.
  sizes    our NBD export vs qemu-nbd on sparse qcow2 images of growing size (metadata
           preallocated, data holes): 4k randread then randwrite, and each daemon's peak memory.
  ublk     one boot of the test VM (tests/vm/vm.sh; the host kernel may have no ublk): fio io_uring
           O_DIRECT on /dev/ublkbN (qcow2 and raw), the kernel loop driver with direct I/O on the
           raw file, and qemu-nbd on the kernel nbd driver; on ext4 on a RAM disk (brd) and on the
           guest's tmpfs; paths interleaved, BENCH_UBLK_ROUNDS rounds, medians with the spread.

Workloads (engine and nbd): 4k randwrite, randread, randrw and 512k sequential rw at BENCH_DEPTH;
depth-1 4k read and write latency (p50, p99); 4k randwrite on an empty qcow2 (allocating) and on
a qcow2 overlay of a fully written raw file (copy-on-write; for the engine also with extended
L2), each path on a fresh image and stopping early after 32768 writes or a quarter of its
clusters, so that nearly every write allocates whatever the speed (qemu-img check counts the clusters
afterwards; fio moves the same disk traffic, to show what the disk gives); 4k randread of a compressed
qcow2 (qemu-img convert -c).  The engine and nbd workloads run in BENCH_ROUNDS rounds, the paths
interleaved (in reverse order every other round), and report the median round: the virtual
disk of the development machine swings by 10-20% from one run to the next.  Every image is filled
with data when created (no holes, no unwritten extents; the qcow2 is `qemu-img convert` of the
filled raw file, so both hold the same data); the sizes section is sparse on purpose.  Each result also has the CPU time per I/O of the process that
serves it (server, or the bench/fio/qemu-img process itself) and its peak memory.

Writes BENCH_RESULTS/latest.md (tables, ratios, targets met or not), latest.json (every raw
number) and latest.png (gnuplot chart, if gnuplot is installed).

Environment:
  BENCH_DIR        scratch directory on a real disk (default /var/tmp/ublk-qcow2-bench); the
                   filled images are kept there for the next run (about 2 x BENCH_SIZE +
                   BENCH_OVERLAY_SIZE + 2 x BENCH_COMPRESSED_SIZE), and it is locked against
                   concurrent runs
  BENCH_SECONDS    seconds per measurement (default 4, quick 2; decimals allowed)
  BENCH_ROUNDS     rounds of the engine and nbd workloads (default 3, quick 1)
  BENCH_ONLY       sections, comma-separated: engine,nbd,tls,sizes,ublk,compressed (default all;
                   compressed is bench/compressed.py: compressed-image reads, latency under a
                   compressed stream, convert -c, into BENCH_RESULTS/compressed.{md,json})
  BENCH_WORKLOADS  only these workloads, comma-separated (names as in latest.json)
  BENCH_QUICK=1    check that the suite works: 2 s per measurement, small images, 1 VM round
  BENCH_SIZE       image size for engine/nbd (default 2G, quick 256M)
  BENCH_ALLOC_SIZE size of the empty image for allocating writes (default 64G, quick 256M):
                   large, so that the run lasts until BENCH_SECONDS; its allocated clusters
                   take real disk space (64 KiB per write, deleted after each run)
  BENCH_OVERLAY_SIZE  size of the overlays and of their filled raw backing file (default 8G,
                   kept like the others; quick: BENCH_SIZE, the raw image is the backing file)
  BENCH_DEPTH      queue depth (default 128)
  BENCH_SIZES      sparse image sizes (default 1G,8G,64G; quick 64M,256M,1G)
  BENCH_COMPRESSED_SIZE  compressed image size (default 1G, quick 64M)
  BENCH_COMPRESSED_SUBSTRATES  disk,ram (default both): where the compressed section's images
                   are; ram is ext4 on a loop device over /dev/shm (not bound by the disk)
  BENCH_UBLK_SIZE  image size in the VM (default 512M, quick 256M; the VM gets 4G RAM; making
                   the images under TCG takes about 3 minutes per GiB and substrate)
  BENCH_UBLK_DEPTH fio iodepth in the VM (default 64)
  BENCH_UBLK_SECONDS      seconds per measurement in the VM (default 6, quick 2)
  BENCH_UBLK_ROUNDS       rounds of interleaved paths in the VM (default 3, quick 1)
  BENCH_UBLK_SUBSTRATES   brd,tmpfs (default both)
  BENCH_UBLK_KERNELS      VM kernels, one boot each (default 6.12,newest; see tests/vm/vm.sh)
  BENCH_UBLK_PATHS        VM paths to measure (default all: see VM_PATHS in bench/common.py)
  BENCH_FRESH=1    recreate the kept images
  BENCH_RESULTS    where latest.{md,json,png} go (default bench/results)
"""
import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

sys.dont_write_bytecode = True
from common import (TLS_WORKLOADS, ALLOC_CAP_PER_CLUSTER, ALLOC_MAX_WRITES, CLUSTER, HERE, LATENCY, MAIN, ROOT,  # noqa: E402
                    SIZE_WORKLOADS, SUBSTRATES, VM_PATHS, VM_WORKLOADS, WORKLOADS, BenchError,
                    default_cache_bytes, fio_argv, fill_file, fmt_iops_cell, log,
                    make_qcow2_copy, parse_fio, parse_size, proc_alive, proc_cpu_s,
                    proc_hwm_kib, run, run_measured, size_name)
from report import vm_summary, write_report  # noqa: E402

VM_SH = os.path.join(ROOT, "tests", "vm", "vm.sh")
IMAGES_VERSION = 2          # bump when the way kept images are made changes


# ---- host servers ------------------------------------------------------------------------------

class Server:
    """A daemonizing NBD server started by us; only ever stopped by its own pid."""
    live = []

    def __init__(self, kind, cfg, image=None, size=None):
        self.kind, self.cfg = kind, cfg
        d = cfg.dir
        self.sock, self.pidfile = f"{d}/{kind}.sock", f"{d}/{kind}.pid"
        self.logpath = f"{d}/logs/{kind}.log"
        server = kind.removesuffix("_mem")     # the same server on an image in memory
        self.tls = server.endswith("_tls")     # ... or with TLS (x509 from cfg.pki)
        server = server.removesuffix("_tls")
        if server == "nbd_ours":
            self.argv = [cfg.bin, "nbd", "--fork", "--pid-file", self.pidfile,
                         "--socket", self.sock, image]
            if self.tls:
                self.argv[2:2] = ["--tls-certificates", cfg.pki]
        elif server == "nbd_qemu":
            self.argv = ["qemu-nbd", "--fork", "--persistent", "--pid-file", self.pidfile,
                         "--socket", self.sock, "--cache=none", "--aio=io_uring", "-f", "qcow2",
                         image]
            if self.tls:
                self.argv[1:1] = ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={cfg.pki},verify-peer=off",
                                  "--tls-creds", "tls0"]
        elif kind == "nbd_null":
            self.argv = ["nbdkit", "--unix", self.sock, "--pidfile", self.pidfile, "null",
                         str(size)]
        else:
            raise BenchError(f"unknown server {kind}")
        self.pid = None

    def __enter__(self):
        for p in (self.sock, self.pidfile):
            if os.path.exists(p):
                os.unlink(p)
        with open(self.logpath, "a") as logf:
            r = subprocess.run(self.argv, stdout=logf, stderr=logf, timeout=60)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                pid = int(open(self.pidfile).read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and os.path.exists(self.sock):
                break
            time.sleep(0.05)
        else:
            pid = 0
        # Only a live process whose command line names our directory is ours.
        if pid and proc_alive(pid):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if self.cfg.dir.encode() in f.read():
                    self.pid = pid
                    Server.live.append(self)
        if r.returncode != 0 or not self.pid:
            self.stop()
            raise BenchError(f"{self.kind} did not start (see {self.logpath})")
        return self

    def uri(self):
        if self.tls:
            # fio's libnbd may not read files named in the URI (tls-certificates): the client
            # encrypts without checking the server's certificate (nor could it match a host
            # name over a unix socket); the cost measured is the same.
            return f"nbds+unix:///?socket={self.sock}&tls-verify-peer=false"
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self):
        if not self.pid:
            return
        pid, self.pid = self.pid, None
        Server.live.remove(self)
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        # Not our child (it daemonized): poll, bounded, then insist.
        deadline = time.monotonic() + 15
        while proc_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc_alive(pid):
            log(f"{self.kind} (pid {pid}) ignored SIGTERM; killing it")
            os.kill(pid, signal.SIGKILL)

    def __exit__(self, *exc):
        self.stop()


# ---- the host part ---------------------------------------------------------------------------

class Config:
    def __init__(self, binary):
        env = os.environ
        self.bin = os.path.realpath(binary)
        if not os.access(self.bin, os.X_OK):
            raise BenchError(f"binary '{binary}' is not an executable")
        self.quick = env.get("BENCH_QUICK", "") not in ("", "0")
        q = self.quick
        self.dir = os.path.realpath(env.get("BENCH_DIR", "/var/tmp/ublk-qcow2-bench"))
        self.results = env.get("BENCH_RESULTS", os.path.join(HERE, "results"))
        self.secs = self.seconds("BENCH_SECONDS", "2" if q else "4")
        # In the VM a fio start costs seconds and the emulator swings: longer runs.
        self.usecs = self.seconds("BENCH_UBLK_SECONDS", "2" if q else "6")
        self.depth = self.posint("BENCH_DEPTH", "128")
        self.host_rounds = self.posint("BENCH_ROUNDS", "1" if q else "3")
        self.size = self.sizelist("BENCH_SIZE", "256M" if q else "2G")[0]
        self.alloc_size = self.sizelist("BENCH_ALLOC_SIZE", "256M" if q else "64G")[0]
        self.osize = self.sizelist("BENCH_OVERLAY_SIZE", env.get("BENCH_SIZE", "256M")
                                   if q else "8G")[0]
        self.csize = self.sizelist("BENCH_COMPRESSED_SIZE", "64M" if q else "1G")[0]
        self.sizes = self.sizelist("BENCH_SIZES", "64M,256M,1G" if q else "1G,8G,64G")
        self.usize = self.sizelist("BENCH_UBLK_SIZE", "256M" if q else "512M")[0]
        self.udepth = self.posint("BENCH_UBLK_DEPTH", "64")
        # 3 rounds: a median that one slow round cannot move (a full run near 25 minutes).
        self.rounds = self.posint("BENCH_UBLK_ROUNDS", "1" if q else "3")
        self.substrates = self.names("BENCH_UBLK_SUBSTRATES", SUBSTRATES, SUBSTRATES)
        self.ukernels = [k for k in env.get("BENCH_UBLK_KERNELS", "6.12,newest").split(",") if k]
        self.upaths = self.names("BENCH_UBLK_PATHS", VM_PATHS, VM_PATHS)
        self.sections = self.names("BENCH_ONLY", ["engine", "nbd", "tls", "sizes", "ublk", "compressed"],
                                   ["engine", "nbd", "tls", "sizes", "ublk", "compressed"])
        self.pki = os.path.join(self.dir, "pki")
        self.workloads = self.names("BENCH_WORKLOADS", list(WORKLOADS), list(WORKLOADS))
        self.fresh = env.get("BENCH_FRESH", "") not in ("", "0")

    @staticmethod
    def sizelist(name, default):
        v = os.environ.get(name, default)
        try:
            sizes = [parse_size(x) for x in v.split(",")]
        except BenchError as e:
            raise BenchError(f"{name}: {e}")
        if min(sizes) < 16 << 20 or (len(sizes) > 1 and "SIZES" not in name):
            raise BenchError(f"{name} must be {'sizes' if 'SIZES' in name else 'a size'} "
                             f"of at least 16M (got '{v}')")
        return sizes

    @staticmethod
    def seconds(name, default):
        try:
            v = float(os.environ.get(name, default))
        except ValueError:
            v = 0
        if not 0 < v <= 3600:
            raise BenchError(f"{name} must be a positive number of seconds")
        return v

    @staticmethod
    def posint(name, default):
        v = os.environ.get(name, default)
        if not v.isdigit() or int(v) < 1:
            raise BenchError(f"{name} must be a positive integer (got '{v}')")
        return int(v)

    @staticmethod
    def names(name, allowed, default):
        v = os.environ.get(name, "")
        if not v or v == "all":
            return default
        got = [x for x in re.split(r"[,\s]+", v) if x]
        bad = [x for x in got if x not in allowed]
        if bad:
            raise BenchError(f"{name}: unknown {', '.join(bad)} (known: {', '.join(allowed)})")
        return got

    def to_json(self):
        return {"seconds_each": self.secs, "host_rounds": self.host_rounds,
                "depth": self.depth, "size": self.size,
                "alloc_size": self.alloc_size, "overlay_size": self.osize,
                "compressed_size": self.csize, "sizes": self.sizes, "sections": self.sections,
                "workloads": self.workloads, "quick": self.quick,
                "ublk": {"size": self.usize, "depth": self.udepth, "rounds": self.rounds,
                         "seconds_each": self.usecs,
                         "substrates": self.substrates}}


def plan(cfg):
    """(host measurements, fio runs in the VM, rough wall seconds) of this configuration.
    The overheads are from runs on the 2-core development machine: about 1.5 s of setup per
    host measurement, 6-15 s to start fio under TCG, a minute to boot, 40 s per substrate and
    about 6 MiB/s to fill and convert its images."""
    def n(section, wls):
        return sum(1 for w in wls if w in cfg.workloads) if section in cfg.sections else 0
    host = cfg.host_rounds * (n("engine", MAIN + LATENCY) * 3 + n("nbd", MAIN + LATENCY) * 3
                              + n("engine", ["randwrite_4k", "randread_4k", "rw_512k"])
                              + 2 * n("nbd", MAIN))
    host += cfg.host_rounds * 2 * n("tls", TLS_WORKLOADS)
    host += n("engine", ["alloc_4k"]) + 2 * n("nbd", ["alloc_4k"])
    host += 2 * (n("engine", ["overlay_4k", "compressed_4k"]) + n("nbd", ["overlay_4k",
                                                                         "compressed_4k"]))
    host += n("engine", ["overlay_4k"]) or n("nbd", ["overlay_4k"])
    host += len(cfg.sizes) * 2 * n("sizes", SIZE_WORKLOADS)
    vm = len(cfg.ukernels) * len(cfg.substrates) * cfg.rounds * len(cfg.upaths) * n("ublk", VM_WORKLOADS)
    # Deleting the images the allocating runs leave takes seconds each (see ALLOC_MAX_WRITES).
    secs = host * (cfg.secs + 1.5) + vm * (cfg.usecs + 10)
    secs += 15 * (n("engine", ["alloc_4k", "overlay_4k"]) + 2 * n("nbd", ["alloc_4k"])
                  + len(cfg.sizes) * 2 * n("sizes", ["randwrite_4k"]))
    if vm:
        secs += 60 + len(cfg.substrates) * (40 + cfg.usize / (6 << 20))
    return host, vm, secs


class HostBench:
    def __init__(self, cfg):
        self.cfg = cfg
        self.results = []
        self.logs = os.path.join(cfg.dir, "logs")
        self.raw = os.path.join(cfg.dir, "data.raw")
        self.qcow2 = os.path.join(cfg.dir, "data.qcow2")
        self.csrc = os.path.join(cfg.dir, "comp-src.raw")
        self.comp = os.path.join(cfg.dir, "comp.qcow2")
        self.scratch = os.path.join(cfg.dir, "scratch.qcow2")
        self.mem_qcow2 = None     # the qcow2 copied to tmpfs, for the nbd "in memory" paths
        # The overlays' backing file: the filled raw image if it has the size, else its own.
        self.obase = self.raw if cfg.osize == cfg.size else os.path.join(cfg.dir, "base.raw")
        self.steps = 0

    def wanted(self, section, wl):
        return section in self.cfg.sections and wl in self.cfg.workloads

    # -- images --
    def kept_images(self, name, files, size, make):
        """Images kept between runs while their stamp matches; make() creates them."""
        stamp_path = os.path.join(self.cfg.dir, f"{name}.stamp")
        stamp = json.dumps({"v": IMAGES_VERSION, "files": [os.path.basename(f) for f in files],
                            "size": size})
        try:
            ok = (not self.cfg.fresh and open(stamp_path).read() == stamp
                  and all(os.path.exists(f) for f in files))
            for f in files:
                if ok and f.endswith(".qcow2"):
                    run(["qemu-img", "check", "-q", "-f", "qcow2", f], timeout=600)
        except (OSError, BenchError):
            ok = False
        if ok:
            log(f"reusing the {name} images in {self.cfg.dir}")
            return
        for f in files + [stamp_path]:
            if os.path.exists(f):
                os.unlink(f)
        make()
        os.sync()
        with open(stamp_path, "w") as f:
            f.write(stamp)

    def prepare(self):
        c = self.cfg
        need_overlay = any(self.wanted(s, "overlay_4k") for s in ("engine", "nbd"))
        need_data = any(self.wanted(s, w) for s in ("engine", "nbd", "tls") for w in MAIN + LATENCY) \
            or (need_overlay and self.obase == self.raw)
        need_comp = any(self.wanted(s, "compressed_4k") for s in ("engine", "nbd"))
        if need_data:
            def make():
                log(f"filling a {size_name(c.size)} raw image and converting it to qcow2")
                fill_file(self.raw, c.size)
                make_qcow2_copy(self.raw, self.qcow2)
            self.kept_images("data", [self.raw, self.qcow2], c.size, make)
        if need_overlay and self.obase != self.raw:
            def make():
                log(f"filling a {size_name(c.osize)} raw image, the overlays' backing file")
                fill_file(self.obase, c.osize)
            self.kept_images("base", [self.obase], c.osize, make)
        if any(self.wanted("nbd", w) for w in MAIN):
            self.copy_to_memory()
        if need_comp:
            def make():
                log(f"making a {size_name(c.csize)} compressed qcow2 (qemu-img convert -c)")
                fill_file(self.csrc, c.csize, compressible=True)
                make_qcow2_copy(self.csrc, self.comp, compressed=True)
            self.kept_images("comp", [self.csrc, self.comp], c.csize, make)

    def copy_to_memory(self):
        """Copy the qcow2 to /dev/shm if that is a tmpfs with room to spare."""
        shm = "/dev/shm"
        try:
            st = os.statvfs(shm)
            # The last line: the mount on top (/dev/shm may be mounted twice).
            fs = (subprocess.run(["findmnt", "-no", "FSTYPE", "--target", shm],
                                 capture_output=True, text=True).stdout.split() or ["?"])[-1]
        except OSError:
            return
        size = os.path.getsize(self.qcow2)
        if fs != "tmpfs" or st.f_bavail * st.f_frsize < size + (1 << 30):
            log(f"not measuring NBD on an image in memory: {shm} is not a tmpfs with "
                f"{size_name(size)} + 1G free")
            return
        self.mem_qcow2 = os.path.join(shm, f"ublk-qcow2-bench-{os.getpid()}.qcow2")
        log(f"copying the qcow2 to {self.mem_qcow2}")
        shutil.copyfile(self.qcow2, self.mem_qcow2)

    def drop_memory_copy(self):
        if self.mem_qcow2 and os.path.exists(self.mem_qcow2):
            os.unlink(self.mem_qcow2)
        self.mem_qcow2 = None

    def new_scratch(self, kind, size=None, extended_l2=False):
        if os.path.exists(self.scratch):
            os.unlink(self.scratch)
        if kind == "empty":
            argv = ["-f", "qcow2", self.scratch, str(self.cfg.alloc_size)]
        elif kind == "overlay":
            # The backing file is a filled raw image, opened read-only by both servers.
            # Extended L2: a 4k write allocates two 2k subclusters instead of copying the
            # whole 64k cluster from the backing file.
            argv = ["-f", "qcow2"] + (["-o", "extended_l2=on"] if extended_l2 else []) + [
                "-b", self.obase, "-F", "raw", self.scratch, str(self.cfg.osize)]
        else:   # sparse: every L2 table and refcount in place, the data clusters are holes
            argv = ["-f", "qcow2", "-o", "preallocation=metadata", self.scratch, str(size)]
        run(["qemu-img", "create", "-q"] + argv)
        return self.scratch

    # -- measurements: each returns a dict of numbers or raises BenchError --
    def m_engine(self, img, fmt, wl, ios=None):
        w, c = WORKLOADS[wl], self.cfg
        argv = [c.bin, "bench", "--rw", w["rw"], "--bs", w["bs"],
                "--depth", str(w.get("depth") or c.depth), "--seconds", f"{c.secs:g}",
                "--format", fmt, "--json", img] + (["--ios", str(ios)] if ios else [])
        rc, out, _, peak = run_measured(argv, c.secs + 300, f"{self.logs}/engine.log")
        if rc != 0:
            raise BenchError(f"bench exited {rc} (see {self.logs}/engine.log)")
        j = json.loads(out)
        with open(f"{self.logs}/engine.log", "a") as f:
            f.write(out)
        # CPU of the measured run (bench's own getrusage), without opening the image and
        # filling the buffers.
        res = {"read_iops": j["read_ios"] / j["seconds"], "write_iops": j["write_ios"] / j["seconds"],
               "ios": j["ios"], "seconds": j["seconds"], "cpu_s": j["cpu_user_s"] + j["cpu_sys_s"],
               "cpu_of": "bench process", "peak_kib": peak}
        if w.get("latency"):
            d = "read" if w["rw"] == "randread" else "write"
            res[f"{d}_p50_us"], res[f"{d}_p99_us"] = j["lat_p50_us"], j["lat_p99_us"]
        return res

    def m_fio_file(self, img, wl):
        js = f"{self.logs}/fio-file-{wl}.json"
        argv = fio_argv(wl, self.cfg.depth, self.cfg.secs, js,
                        ["--ioengine=io_uring", "--direct=1", "--fixedbufs", "--registerfiles",
                         f"--filename={img}"])
        run(argv, timeout=self.cfg.secs + 300)
        res = parse_fio(js)
        res["cpu_s"], res["cpu_of"] = res["client_cpu_s"], "fio job"
        return res

    def m_fio_cow(self):
        """The disk traffic of copy-on-write without the copying: 64k random reads of the
        overlays' backing file and 64k random writes (into the filled raw image) in parallel,
        half the queue depth each.  Reported as copies per second, (reads + writes) / 2; a 4k
        COW write reads 60k and writes 64k.  A path near it is bound by the disk."""
        js = f"{self.logs}/fio-cow.json"
        half = str(max(1, self.cfg.depth // 2))
        argv = ["fio", "--output-format=json", f"--output={js}", "--ioengine=io_uring",
                "--direct=1", "--bs=64k", f"--runtime={max(1, round(self.cfg.secs * 1000))}ms",
                "--time_based", "--norandommap", "--gtod_reduce=1", "--group_reporting",
                "--name=read", "--rw=randread", f"--iodepth={half}", f"--filename={self.obase}",
                "--name=write", "--rw=randwrite", f"--iodepth={half}", f"--filename={self.raw}"]
        run(argv, timeout=self.cfg.secs + 300)
        res = parse_fio(js)
        reads, writes = res["read_iops"], res["write_iops"]
        res.update(read_iops=0.0, write_iops=(reads + writes) / 2, read64k_iops=reads,
                   write64k_iops=writes, cpu_s=None, cpu_of="fio jobs")
        return res

    def m_qemu_img_bench(self, img, wl):
        """qemu-img bench counts requests and is sequential: calibrate the count to about
        BENCH_SECONDS, once per direction; 512k rw runs a read and a write pass."""
        passes = {"randwrite_4k": [("write", "4k")], "randread_4k": [("read", "4k")],
                  "rw_512k": [("read", "512k"), ("write", "512k")]}[wl]
        secs = self.cfg.secs / len(passes)
        res = {"read_iops": 0.0, "write_iops": 0.0, "ios": 0, "seconds": 0.0, "cpu_s": 0.0,
               "cpu_of": "qemu-img process", "peak_kib": 0}
        for d, bs in passes:
            count = 4096 if bs == "4k" else 256
            for attempt in (1, 2):
                argv = ["qemu-img", "bench", "-f", "qcow2", "-t", "none", "-i", "io_uring",
                        "-d", str(self.cfg.depth), "-s", bs, "-c", str(count)]
                argv += (["-w"] if d == "write" else []) + [img]
                rc, out, cpu, peak = run_measured(argv, secs * 10 + 300,
                                                  f"{self.logs}/qemu-img-bench.log")
                m = re.search(r"Run completed in ([0-9.]+) seconds", out)
                if rc != 0 or not m:
                    raise BenchError(f"qemu-img bench failed (see {self.logs}/qemu-img-bench.log)")
                t = max(float(m.group(1)), 1e-6)
                if attempt == 2 or t >= secs / 4:
                    break
                count = max(count, int(count * secs / t))
            res[f"{d}_iops"] = count / t
            res["ios"] += count
            res["seconds"] += t
            res["cpu_s"] += cpu
            res["peak_kib"] = max(res["peak_kib"], peak)
        return res

    def fio_nbd(self, srv, wl, tag, ios=None):
        js = f"{self.logs}/fio-{srv.kind}-{tag}.json"
        cpu0 = proc_cpu_s(srv.pid)
        run(fio_argv(wl, self.cfg.depth, self.cfg.secs, js, ["--ioengine=nbd", f"--uri={srv.uri()}"],
                     ios=ios), timeout=self.cfg.secs + 300)
        res = parse_fio(js)
        res["cpu_s"], res["cpu_of"] = proc_cpu_s(srv.pid) - cpu0, "server process"
        res["peak_kib"] = proc_hwm_kib(srv.pid)
        return res

    def m_nbd(self, kind, img, wl, ios=None):
        with Server(kind, self.cfg, image=img, size=self.cfg.size) as srv:
            return self.fio_nbd(srv, wl, wl, ios=ios)

    def m_fresh(self, path, kind, wl, size):
        """A new empty image or overlay for one contender, at most a quarter of its clusters'
        worth of writes (and ALLOC_MAX_WRITES); afterwards qemu-img check (the image must be
        clean) counts the clusters the run allocated."""
        cap = min(int(size // CLUSTER * ALLOC_CAP_PER_CLUSTER), ALLOC_MAX_WRITES)
        cap = max(cap, self.cfg.depth)
        img = self.new_scratch(kind, extended_l2=path.endswith("_extl2"))
        try:
            if path.startswith("engine_"):
                res = self.m_engine(img, "qcow2", wl, ios=cap)
            else:
                res = self.m_nbd(path, img, wl, ios=cap)
            chk = json.loads(run(["qemu-img", "check", "--output=json", "-f", "qcow2", img],
                                 timeout=600))
        finally:
            cleanup_s = self.remove(img)
        res.update(ios_cap=cap, image_size=size, clusters_allocated=chk["allocated-clusters"],
                   cleanup_s=cleanup_s)
        return res

    @staticmethod
    def remove(path):
        """Delete a scratch image; returns the seconds it took (many extents: can be long)."""
        t = time.monotonic()
        if os.path.exists(path):
            os.unlink(path)
        t = time.monotonic() - t
        if t > 5:
            log(f"    deleting {os.path.basename(path)} took {t:.0f} s")
        return t

    def measure(self, path, wl, fn, *args, **extra):
        self.steps += 1
        log(f"[{self.steps}] {path} {wl}{' ' + size_name(extra['size']) if 'size' in extra else ''}"
            + (f" (round {extra['round']})" if extra.get("round") else "") + " ...")
        rec = {"section": extra.pop("section"), "path": path, "workload": wl, **extra}
        t0 = time.monotonic()
        try:
            rec.update(fn(*args))
            ios = rec.get("ios") or 0
            if rec.get("cpu_s") is not None and ios:
                rec["cpu_us_per_io"] = rec["cpu_s"] / ios * 1e6
            log(f"    {fmt_iops_cell(rec, wl)} IOPS"
                + (f", {rec['cpu_us_per_io']:.1f} us CPU/IO" if "cpu_us_per_io" in rec else "")
                + f" ({time.monotonic() - t0:.1f} s)")
        except (BenchError, OSError, ValueError, KeyError, subprocess.SubprocessError) as e:
            rec["error"] = str(e)
            log(f"    failed: {e}")
        rec["wall_s"] = time.monotonic() - t0     # with setup and teardown: for planning runs
        self.results.append(rec)
        return rec

    def run(self):
        c = self.cfg
        E, N = "engine", "nbd"
        try:
            self.run_rounds()
        finally:
            self.drop_memory_copy()
        if self.wanted(E, "overlay_4k") or self.wanted(N, "overlay_4k"):
            self.measure("fio_cow", "overlay_4k", self.m_fio_cow, section=E)
        # Allocating writes and overlay COW: a fresh image for each contender.
        for wl, kind, size in (("alloc_4k", "empty", c.alloc_size),
                               ("overlay_4k", "overlay", c.osize)):
            if self.wanted(E, wl):
                self.measure("engine_qcow2", wl, self.m_fresh, "engine_qcow2", kind, wl, size,
                             section=E)
                if wl == "overlay_4k":
                    self.measure("engine_qcow2_extl2", wl, self.m_fresh, "engine_qcow2_extl2",
                                 kind, wl, size, section=E)
            if self.wanted(N, wl):
                for path in ("nbd_ours", "nbd_qemu"):
                    self.measure(path, wl, self.m_fresh, path, kind, wl, size, section=N)
        wl = "compressed_4k"
        if self.wanted(E, wl):
            self.measure("engine_qcow2", wl, self.m_engine, self.comp, "qcow2", wl, section=E)
            self.measure("engine_raw", wl, self.m_engine, self.csrc, "raw", wl, section=E,
                         note="the uncompressed source")
        if self.wanted(N, wl):
            for path in ("nbd_ours", "nbd_qemu"):
                self.measure(path, wl, self.m_nbd, path, self.comp, wl, section=N)
        if "sizes" in c.sections:
            self.run_sizes()
        if os.path.exists(self.scratch):
            os.unlink(self.scratch)

    def run_rounds(self):
        """The main and latency workloads: every path once per round, in reverse order every
        other round, so that drift of the disk hits each path alike."""
        E, N = "engine", "nbd"
        for wl in MAIN + LATENCY:
            paths = []
            if self.wanted(E, wl):
                paths += [("engine_qcow2", E, self.m_engine, (self.qcow2, "qcow2", wl)),
                          ("engine_raw", E, self.m_engine, (self.raw, "raw", wl)),
                          ("fio_raw", E, self.m_fio_file, (self.raw, wl))]
                if wl in ("randwrite_4k", "randread_4k", "rw_512k"):
                    paths.append(("qemu_img_bench", E, self.m_qemu_img_bench, (self.qcow2, wl)))
            if self.wanted("tls", wl) and wl in TLS_WORKLOADS:
                paths += [(p, "tls", self.m_nbd, (p, self.qcow2, wl))
                          for p in ("nbd_ours_tls", "nbd_qemu_tls")]
            if self.wanted(N, wl):
                paths += [(p, N, self.m_nbd, (p, img, wl)) for p, img in
                          (("nbd_ours", self.qcow2), ("nbd_qemu", self.qcow2), ("nbd_null", None))]
                if self.mem_qcow2 and wl in MAIN:
                    paths += [(p, N, self.m_nbd, (p, self.mem_qcow2, wl))
                              for p in ("nbd_ours_mem", "nbd_qemu_mem")]
            for k in range(self.cfg.host_rounds):
                for path, sec, fn, args in (paths if k % 2 == 0 else paths[::-1]):
                    self.measure(path, wl, fn, *args, section=sec, round=k + 1)

    def run_sizes(self):
        """One server per image: randread then randwrite, peak memory after both."""
        for size in self.cfg.sizes:
            for path in ("nbd_ours", "nbd_qemu"):
                wls = [w for w in SIZE_WORKLOADS if w in self.cfg.workloads]
                if not wls:
                    return
                try:
                    img = self.new_scratch("sparse", size)
                    srv = Server(path, self.cfg, image=img).__enter__()
                except BenchError as e:
                    for wl in wls:
                        self.results.append({"section": "sizes", "path": path, "workload": wl,
                                             "size": size, "error": str(e)})
                    log(f"{path} on {size_name(size)}: {e}")
                    continue
                try:
                    for wl in wls:
                        cap = ALLOC_MAX_WRITES if WORKLOADS[wl]["rw"] != "randread" else None
                        self.measure(path, wl, self.fio_nbd, srv, wl, f"{wl}-{size_name(size)}",
                                     cap, section="sizes", size=size,
                                     cache_bytes=default_cache_bytes(size), ios_cap=cap)
                finally:
                    srv.stop()
                    self.remove(img)


# ---- the VM part (ublk) --------------------------------------------------------------------------

def run_vm(cfg, results):
    """One boot of the test VM per kernel (BENCH_UBLK_KERNELS, default 6.12 and the newest)
    running guest.py; returns what the guests reported (info keys prefixed by the kernel)."""
    info = {}
    for k in cfg.ukernels:
        for key, v in run_vm_on(cfg, results, k).items():
            info[f"{k}:{key}"] = v
        info["exit"] = info.get("exit") or info.get(f"{k}:exit")
    return info


def run_vm_on(cfg, results, kernel):
    c = cfg
    wls = [w for w in VM_WORKLOADS if w in c.workloads]
    if not wls:
        return {}
    per_sub = 300 + c.usize / (4 << 20) + c.rounds * len(c.upaths) * (len(wls) * (c.usecs + 20) + 30)
    timeout = int(120 + len(c.substrates) * per_sub)
    out_path = os.path.join(c.dir, "logs", f"vm-{kernel}.out")
    log(f"ublk: booting the test VM (QEMU TCG, kernel {kernel}), {size_name(c.usize)} images on "
        f"{', '.join(c.substrates)}, iodepth {c.udepth}, {c.rounds} round(s); at most {timeout} s")
    argv = [VM_SH, "--kernel", kernel, "--mem", "4G", "--timeout", str(timeout), "--",
            os.path.join(HERE, "guest.py"), "--bin", c.bin,
            "--seconds", f"{c.usecs:g}", "--depth", str(c.udepth), "--size", str(c.usize),
            "--rounds", str(c.rounds), "--substrates", ",".join(c.substrates),
            "--workloads", ",".join(wls), "--paths", ",".join(c.upaths)]
    with open(out_path, "w") as out:
        # Guest progress goes to our stderr as it happens; results to out_path.
        rc = subprocess.run(argv, stdout=out).returncode
    if rc == 125:
        log("ublk: the VM failed to boot or timed out (VM_VERBOSE=1 shows its console)")
    elif rc:
        log(f"ublk: some measurements failed in the VM (exit {rc})")
    info = {"exit": rc}
    with open(out_path) as f:
        for line in f:
            if not line.startswith("UQBENCH "):
                continue
            rec = json.loads(line[8:])
            if rec.pop("type") == "info":
                info.update(rec)
            else:
                results.append(rec)
    return info


# ---- main ---------------------------------------------------------------------------------------

def make_pki(d):
    """A CA and a server certificate for the TLS rows (kept in BENCH_DIR/pki)."""
    if os.path.exists(os.path.join(d, "server-cert.pem")):
        return
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "ca.info"), "w") as f:
        f.write("cn = bench CA\nca\ncert_signing_key\nexpiration_days = 3650\n")
    with open(os.path.join(d, "server.info"), "w") as f:
        f.write("cn = localhost\ndns_name = localhost\ntls_www_server\nencryption_key\n"
                "signing_key\nexpiration_days = 3650\n")
    for argv in (["--generate-privkey", "--outfile", "ca-key.pem"],
                 ["--generate-self-signed", "--load-privkey", "ca-key.pem", "--template",
                  "ca.info", "--outfile", "ca-cert.pem"],
                 ["--generate-privkey", "--outfile", "server-key.pem"],
                 ["--generate-certificate", "--load-ca-certificate", "ca-cert.pem",
                  "--load-ca-privkey", "ca-key.pem", "--load-privkey", "server-key.pem",
                  "--template", "server.info", "--outfile", "server-cert.pem"]):
        r = subprocess.run(["certtool"] + argv, cwd=d, capture_output=True, text=True)
        if r.returncode:
            raise BenchError(f"certtool {argv[0]} failed: {r.stderr.strip()[:200]}")
    os.chmod(os.path.join(d, "server-key.pem"), 0o600)


def check_tools(cfg):
    need = {"fio", "qemu-img"}
    if {"engine", "nbd", "sizes"} & set(cfg.sections):
        need |= {"qemu-nbd"}
    if "nbd" in cfg.sections:
        need |= {"nbdkit"}
    if "tls" in cfg.sections:
        need |= {"qemu-nbd", "certtool"}
    missing = sorted(t for t in need if not shutil.which(t))
    if missing:
        raise BenchError(f"not installed: {', '.join(missing)} (try 'make deps')")


def suite_main(binary):
    cfg = Config(binary)
    if "compressed" in cfg.sections:
        # Its own report: bench/compressed.py (BENCH_RESULTS/compressed.{md,json}).
        import compressed
        rc = compressed.main(binary)
        cfg.sections = [s for s in cfg.sections if s != "compressed"]
        if not cfg.sections:
            return rc
    check_tools(cfg)
    os.makedirs(os.path.join(cfg.dir, "logs"), exist_ok=True)
    # Two runs sharing BENCH_DIR would mix their results and stop each other's servers.
    lock = open(os.path.join(cfg.dir, ".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another bench run is using {cfg.dir}; waiting for it (set BENCH_DIR to run elsewhere)")
        fcntl.flock(lock, fcntl.LOCK_EX)
    # Kept images, plus the clusters an allocating run may reserve (and 256 MiB preallocated).
    need = 2 * cfg.size + cfg.osize + 2 * cfg.csize + (256 << 20) + min(
        cfg.alloc_size * ALLOC_CAP_PER_CLUSTER, ALLOC_MAX_WRITES * CLUSTER)
    st = os.statvfs(cfg.dir)
    if st.f_bavail * st.f_frsize < need:
        log(f"warning: {cfg.dir} has {size_name(st.f_bavail * st.f_frsize >> 30 << 30)} free; "
            f"the run may need up to {need / (1 << 30):.0f} GiB")
    fstype = subprocess.run(["findmnt", "-no", "FSTYPE", "--target", cfg.dir],
                            capture_output=True, text=True).stdout.strip() or "?"
    if fstype in ("tmpfs", "ramfs"):
        log(f"warning: {cfg.dir} is on {fstype}, not a real disk")
    n_host, n_vm, secs = plan(cfg)
    log(f"plan: {n_host} measurements on this host, {n_vm} fio runs in the VM, "
        f"{cfg.secs:g} s each ({cfg.usecs:g} s in the VM); roughly {secs / 60:.0f} minutes, "
        f"more under load or when the kept "
        f"images must be made first")
    t0 = time.monotonic()
    load0 = float(open("/proc/loadavg").read().split()[0])
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    if subprocess.run(["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "src"]).returncode:
        commit += "+changes"
    hb = HostBench(cfg)
    vm_info = {}
    phases = {}     # wall seconds: preparing images, host measurements, the VM
    try:
        if "tls" in cfg.sections:
            make_pki(cfg.pki)
        if {"engine", "nbd", "tls", "sizes"} & set(cfg.sections):
            t = time.monotonic()
            hb.prepare()
            phases["prepare"] = time.monotonic() - t
            t = time.monotonic()
            hb.run()
            phases["host"] = time.monotonic() - t
        if "ublk" in cfg.sections:
            t = time.monotonic()
            vm_info = run_vm(cfg, hb.results)
            phases["vm"] = time.monotonic() - t
    finally:
        for s in list(Server.live):
            s.stop()
        hb.drop_memory_copy()
    doc = {"suite": "ublk-qcow2 make bench", "format": 2, "commit": commit,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "host": {"cpus": os.cpu_count(), "kernel": os.uname().release, "fstype": fstype,
                    "dir": cfg.dir},
           "loadavg_start": load0, "loadavg_end": float(open("/proc/loadavg").read().split()[0]),
           "total_seconds": time.monotonic() - t0, "phase_seconds": phases, "config": cfg.to_json(), "vm": vm_info,
           "results": hb.results}
    doc["vm_summary"] = vm_summary(hb.results)
    md = write_report(doc, cfg.results)
    print(md)
    failed = sum(1 for r in hb.results if r.get("error"))
    log(f"results in {cfg.results}/latest.{{md,json,png}} ({doc['total_seconds']:.0f} s"
        + (f"; {failed} measurement(s) failed" if failed else "") + ")")
    return 1 if failed or vm_info.get("exit") else 0


def main(argv):
    def on_signal(sig, frame):
        raise SystemExit(128 + sig)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        if argv[:1] in (["-h"], ["--help"]):
            print(__doc__)
            return 0
        if len(argv) != 1 or argv[0].startswith("-"):
            print("\n\n".join(__doc__.split("\n\n")[:3]), file=sys.stderr)
            return 2
        return suite_main(argv[0])
    except BenchError as e:
        log(str(e))
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
