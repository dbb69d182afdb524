#!/usr/bin/python3
"""The ublk part of `make bench`, run as root inside the test VM (tests/vm/vm.sh) by bench.py;
needs a kernel with ublk_drv, nbd, loop and /run/vm-modules/brd.ko.

For each substrate (ext4 on a brd RAM disk, the guest tmpfs) it fills a raw image with data,
converts it to qcow2 (the same data), and runs fio io_uring O_DIRECT on each path, the paths
interleaved, --rounds times:
  ublk_qcow2  /dev/ublkbN from `BINARY add` on the qcow2
  ublk_raw    /dev/ublkbN from `BINARY add -f raw` on the raw file
  loop_raw    the kernel loop driver, --direct-io=on, on the raw file (the limit)
  qemu_nbd    qemu-nbd --cache=none --aio=io_uring on the qcow2, via the kernel nbd driver
Prints one line per measurement, `UQBENCH {json}`, and `UQBENCH {"type": "info", ...}` lines;
progress goes to stderr.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.dont_write_bytecode = True      # the host tree is shared over 9p: leave nothing behind
from common import (CLK_TCK, VM_PATHS, BenchError, fill_file, fio_argv, fmt_iops_cell,  # noqa: E402
                    make_qcow2_copy, parse_fio, proc_alive, proc_cpu_s, proc_hwm_kib, run,
                    size_name)


# ---- measurements ------------------------------------------------------------------------------

def emit(kind, **rec):
    print("UQBENCH " + json.dumps({"type": kind, **rec}), flush=True)


def glog(msg):
    print(f"vm-bench: {msg}", file=sys.stderr, flush=True)


def guest_busy_s():
    """CPU seconds the whole guest spent busy (not idle or waiting for I/O)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / CLK_TCK


class GuestPath:
    """Attach one device for a path; .dev, and .pid of the serving process (None: kernel)."""

    def __init__(self, path, a, raw, qcow2, work):
        self.path, self.a, self.dev, self.pid, self.stop_cmds = path, a, None, None, []
        self.zero_copy = self.batch_io = None
        try:
            self.attach(path, a, raw, qcow2, work)
        except BaseException:
            self.close()
            raise

    def attach(self, path, a, raw, qcow2, work):
        if path.startswith("ublk"):
            img, fmt = (qcow2, "qcow2") if path.startswith("ublk_qcow2") else (raw, "raw")
            q = "2" if "_q2" in path else "1"
            extra = ["--no-zero-copy"] if path.endswith("_nozc") else []
            extra += {"_batch": ["--batch-io"], "_nobatch": ["--no-batch-io"]}.get(
                path[path.rfind("_"):], [])
            self.dev = run([a.bin, "add", "-q", q, "-f", fmt] + extra + [img], timeout=120).strip()
            n = self.dev.removeprefix("/dev/ublkb")
            self.stop_cmds = [[a.bin, "del", "-n", n]]
            st = json.loads(run([a.bin, "list", "-n", n, "--json"]))[0]
            self.pid, self.zero_copy = st["pid"], st.get("zero_copy")
            self.batch_io = st.get("batch_io")
        elif path == "loop_raw":
            self.dev = run(["losetup", "--direct-io=on", "-f", "--show", raw]).strip()
            self.stop_cmds = [["losetup", "-d", self.dev]]
            # Direct I/O is silently dropped if the backing file cannot do it: check.
            with open(f"/sys/block/{self.dev.removeprefix('/dev/')}/loop/dio") as f:
                if f.read().strip() != "1":
                    raise BenchError(f"{self.dev} is not using direct I/O")
        else:
            self.dev, pidfile = "/dev/nbd0", f"{work}/qemu-nbd.pid"
            run(["qemu-nbd", "-c", self.dev, "--cache=none", "--aio=io_uring", "-f", "qcow2",
                 "--pid-file", pidfile, qcow2], timeout=60)
            self.stop_cmds = [["qemu-nbd", "-d", self.dev]]
            self.pid = int(open(pidfile).read())
            # The size shows up once the kernel side of the connection is set up.
            deadline = time.monotonic() + 30
            while int(run(["blockdev", "--getsize64", self.dev]).strip() or 0) == 0:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.dev} never got a size")
                time.sleep(0.1)

    def close(self):
        pid = self.pid
        cmds, self.stop_cmds = self.stop_cmds, []
        for cmd in cmds:
            run(cmd, timeout=120)
        deadline = time.monotonic() + 30
        while pid and proc_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def guest_substrate(sub, size):
    """Mount the substrate; returns (work dir, teardown commands)."""
    if sub == "brd":
        ko = "/run/vm-modules/brd.ko"
        if not os.path.exists(ko):
            raise BenchError(f"{ko} is missing (VM_KERNEL_REFRESH=1 or a newer tests/vm/vm.sh)")
        kib = 2 * size // 1024 + (256 << 10)    # both images plus room for ext4
        run(["insmod", ko, "rd_nr=1", f"rd_size={kib}"])
        mnt = "/run/bench-brd"
        os.makedirs(mnt, exist_ok=True)
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "/dev/ram0"])
        run(["mount", "/dev/ram0", mnt])
        return mnt + "/bench", [["umount", mnt], ["rmmod", "brd"]]
    tmp = os.environ["VM_TMP"]
    # Room for both images: the guest tmpfs defaults to half the RAM.
    run(["mount", "-o", "remount,size=90%", tmp])
    return tmp + "/bench", []


def main(argv):
    ap = argparse.ArgumentParser(prog="guest.py")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--depth", type=int, required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--substrates", required=True)
    ap.add_argument("--workloads", required=True)
    ap.add_argument("--paths", default="")
    a = ap.parse_args(argv)
    a.paths = [p for p in a.paths.split(",") if p]
    if "VM_TMP" not in os.environ:
        raise BenchError("run me inside tests/vm/vm.sh")
    if not os.path.exists("/dev/ublk-control"):
        raise BenchError("no /dev/ublk-control in this kernel")
    emit("info", kernel=os.uname().release, cpus=os.cpu_count())
    # Results are per kernel: the substrate is named with it (tmpfs@7.2).
    a.ktag = ".".join(os.uname().release.split(".")[:2])
    a.zc = None     # does this kernel give devices zero copy? (the first ublk path says)
    a.batch = None  # and batch I/O? (the first _batch path says)
    failed = False
    for sub in a.substrates.split(","):
        teardown = []
        try:
            work, teardown = guest_substrate(sub, a.size)
            failed |= not guest_substrate_run(a, sub, work)
        except BenchError as e:
            glog(f"{sub}: {e}")
            emit("info", **{f"error_{sub}": str(e)})
            failed = True
        finally:
            if os.path.isdir(os.environ["VM_TMP"] + "/bench"):
                shutil.rmtree(os.environ["VM_TMP"] + "/bench")
            for cmd in teardown:
                subprocess.run(cmd, capture_output=True)
    return 1 if failed else 0


def guest_substrate_run(a, sub, work):
    os.makedirs(work, exist_ok=True)
    raw, qcow2 = f"{work}/data.raw", f"{work}/data.qcow2"
    glog(f"{sub}: filling a {size_name(a.size)} raw image, converting it to qcow2")
    fill_file(raw, a.size)
    make_qcow2_copy(raw, qcow2)
    run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1")
    ok = True
    for rnd in range(1, a.rounds + 1):
        # Odd rounds in order, even ones reversed: no path always runs right after another.
        for path in (VM_PATHS if rnd % 2 else VM_PATHS[::-1]):
            if a.paths and path not in a.paths:
                continue
            if path.endswith("_nozc") and a.zc is False:
                continue    # no zero copy on this kernel: the same as the path without _nozc
            if path.endswith("batch") and a.batch is False:
                continue    # no batch I/O on this kernel: per tag, whatever the option says
            glog(f"{sub} round {rnd}: {path} ...")
            dev = None
            try:
                dev = GuestPath(path, a, raw, qcow2, work)
                if path == "ublk_qcow2":
                    a.zc = bool(dev.zero_copy)
                if path.endswith("_batch"):
                    a.batch = bool(dev.batch_io)
                    if not a.batch:
                        continue    # (closed below) the kernel has no batch I/O
                for wl in a.workloads.split(","):
                    rec = {"section": "ublk", "substrate": f"{sub}@{a.ktag}", "round": rnd,
                           "path": path, "workload": wl, "zero_copy": dev.zero_copy,
                           "batch_io": dev.batch_io}
                    t0 = time.monotonic()
                    try:
                        rec.update(guest_fio(a, dev, wl, work))
                    except (BenchError, OSError, ValueError, KeyError,
                            subprocess.SubprocessError) as e:
                        rec["error"] = str(e)
                        ok = False
                    rec["wall_s"] = time.monotonic() - t0
                    glog(f"  {wl}: {fmt_iops_cell(rec, wl)} ({rec['wall_s']:.0f} s)")
                    emit("result", **rec)
            except (BenchError, OSError, ValueError, subprocess.SubprocessError) as e:
                glog(f"  {path}: {e}")
                for wl in a.workloads.split(","):
                    emit("result", section="ublk", substrate=f"{sub}@{a.ktag}", round=rnd, path=path,
                         workload=wl, error=str(e))
                ok = False
            finally:
                if dev:
                    try:
                        dev.close()
                    except BenchError as e:
                        glog(f"  {path}: detaching failed: {e}")
                        ok = False
    # After all that writing, the qcow2 must still be consistent.
    chk = subprocess.run(["qemu-img", "check", "-q", qcow2], capture_output=True, text=True)
    emit("info", **{f"qcow2_check_{sub}@{a.ktag}": "ok" if chk.returncode == 0
                    else (chk.stdout + chk.stderr).strip()[:300]})
    return ok and chk.returncode == 0


def dev_ios(dev):
    """Reads and writes the block device has completed (/sys/block/X/stat)."""
    with open(f"/sys/block/{os.path.basename(dev)}/stat") as f:
        v = f.read().split()
    return int(v[0]) + int(v[4])


def guest_fio(a, dev, wl, work):
    """fio on the device; CPU is sampled while it runs and counted only from the last sample
    before the device saw I/O to the first one after it stopped: starting fio (read over 9p,
    under TCG) takes several seconds of guest CPU that belong to no path."""
    js = f"{work}/fio.json"
    argv = fio_argv(wl, a.depth, a.seconds, js, ["--ioengine=io_uring", "--direct=1",
                                                  f"--filename={dev.dev}"])
    samples = []        # (completed I/Os, guest busy s, server cpu s)
    with open(f"{work}/fio.err", "w") as err:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + a.seconds + 300
        while True:
            samples.append((dev_ios(dev.dev), guest_busy_s(),
                            proc_cpu_s(dev.pid) if dev.pid else 0.0))
            if p.poll() is not None:
                break
            if time.monotonic() > deadline:
                p.kill()
                p.wait()
                raise BenchError("fio timed out")
            time.sleep(0.2)
    if p.returncode != 0:
        raise BenchError(f"fio exited {p.returncode}: {open(f'{work}/fio.err').read()[-300:]}")
    res = parse_fio(js)
    first = max(i for i, s in enumerate(samples) if s[0] == samples[0][0])
    last = min(i for i, s in enumerate(samples) if s[0] == samples[-1][0])
    ios = samples[last][0] - samples[first][0]
    if ios > 0:
        res["guest_cpu_s"] = samples[last][1] - samples[first][1]
        res["guest_cpu_us_per_io"] = res["guest_cpu_s"] / ios * 1e6
        if dev.pid:
            res["cpu_s"] = samples[last][2] - samples[first][2]
            res["cpu_of"] = "server process"
            res["cpu_us_per_io"] = res["cpu_s"] / ios * 1e6
    if dev.pid:
        res["peak_kib"] = proc_hwm_kib(dev.pid)
    return res


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as e:
        glog(str(e))
        sys.exit(1)
