"""Shared by the `make bench` suite (bench.py), its part inside the test VM (guest.py) and its
report (report.py): workloads and paths, fio, CPU and memory accounting, making images."""
import json
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    pass


# ---- sizes -----------------------------------------------------------------------------------

def parse_size(text):
    m = re.fullmatch(r"(\d+)([KMGT]?)", text.strip())
    if not m:
        raise BenchError(f"'{text}' is not a size like 512M or 8G")
    return int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}[m.group(2)]


def size_name(n):
    for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def default_cache_bytes(size, cluster=65536):
    """The engine's default metadata cache (src/qcow2/qcow2.c): L2 to map the whole image, at
    most 32 MiB, plus a quarter of that for refcount blocks."""
    l2 = min(-(-size // cluster) * 8, 32 << 20)
    return l2 + l2 // 4


# ---- workloads ---------------------------------------------------------------------------------

# rw and bs as fio and `bench` take them; depth None = the section's depth.
WORKLOADS = {
    "randwrite_4k": dict(rw="randwrite", bs="4k", title="randwrite 4k"),
    "randread_4k": dict(rw="randread", bs="4k", title="randread 4k"),
    "randrw_4k": dict(rw="randrw", bs="4k", title="randrw 4k (r/w)"),
    "rw_512k": dict(rw="rw", bs="512k", title="rw 512k (r/w)"),
    "read_512k": dict(rw="read", bs="512k", title="read 512k, sequential"),
    "write_512k": dict(rw="write", bs="512k", title="write 512k, sequential"),
    "lat_read_4k": dict(rw="randread", bs="4k", depth=1, latency=True, title="4k read, depth 1"),
    "lat_write_4k": dict(rw="randwrite", bs="4k", depth=1, latency=True,
                         title="4k write, depth 1"),
    "alloc_4k": dict(rw="randwrite", bs="4k", title="randwrite 4k, empty image"),
    "overlay_4k": dict(rw="randwrite", bs="4k", title="randwrite 4k, overlay"),
    "compressed_4k": dict(rw="randread", bs="4k", title="randread 4k, compressed"),
}
MAIN = ["randwrite_4k", "randread_4k", "randrw_4k", "rw_512k"]
LATENCY = ["lat_read_4k", "lat_write_4k"]
SPECIAL = ["alloc_4k", "overlay_4k", "compressed_4k"]
SIZE_WORKLOADS = ["randread_4k", "randwrite_4k"]
TLS_WORKLOADS = ["randwrite_4k", "randread_4k", "rw_512k"]
# Allocating and copy-on-write runs write at most this share of the image's clusters (random
# offsets, so some land twice): each contender then allocates (or copies) for nearly every
# write, however fast it is, and all of them for about the same share.
ALLOC_CAP_PER_CLUSTER = 0.25
# ... and at most this many writes (also the random writes into the sparse images of the sizes
# section): each leaves a written 4k inside an unwritten (preallocated) or unallocated range,
# so the file ends up with about two extents per write, and ext4 took 3 minutes to delete a
# file after 65536 such writes on the loaded development machine.
ALLOC_MAX_WRITES = 32768
CLUSTER = 65536             # qemu-img create's default, used by every image made here
VM_WORKLOADS = ["randread_4k", "randwrite_4k", "read_512k", "write_512k"]
# _nozc: add --no-zero-copy (only where the kernel has zero copy: elsewhere the same as
# without); _q2: add -q 2; _batch / _nobatch: add --batch-io / --no-batch-io (only where the
# kernel has batch I/O), the one the default is not, so that both are measured.
VM_PATHS = ["ublk_qcow2", "ublk_qcow2_nozc", "ublk_qcow2_batch", "ublk_qcow2_q2",
            "ublk_qcow2_q2_batch", "ublk_raw", "ublk_raw_nozc", "ublk_raw_batch",
            "loop_raw", "qemu_nbd"]
SUBSTRATES = ["brd", "tmpfs"]

LABELS = {
    "engine_qcow2": "ours, engine (`bench`), qcow2",
    "engine_qcow2_extl2": "ours, engine (`bench`), overlay with extended L2 (2k subclusters)",
    "engine_raw": "ours, engine (`bench`), raw",
    "fio_raw": "fio io_uring O_DIRECT, raw file (the limit)",
    "qemu_img_bench": "`qemu-img bench`, qcow2 (QEMU's engine; sequential)",
    "nbd_ours": "ours, NBD export, fio nbd",
    "nbd_qemu": "qemu-nbd --cache=none --aio=io_uring, fio nbd",
    "nbd_null": "nbdkit null (the fio nbd client's ceiling)",
    "nbd_ours_mem": "ours, NBD export, fio nbd, image in memory (tmpfs)",
    "nbd_qemu_mem": "qemu-nbd --cache=none --aio=io_uring, fio nbd, image in memory (tmpfs)",
    "nbd_ours_tls": "ours, NBD export with TLS (x509), fio nbd (nbds+unix)",
    "nbd_qemu_tls": "qemu-nbd --cache=none --aio=io_uring with TLS (x509), fio nbd (nbds+unix)",
    "fio_cow": "fio: the copies' disk traffic (64k random reads of the backing file and 64k "
               "random writes, in parallel; (reads + writes) / 2 per second)",
    "ublk_qcow2": "ours, /dev/ublkbN, qcow2",
    "ublk_qcow2_nozc": "ours, /dev/ublkbN, qcow2, --no-zero-copy",
    "ublk_qcow2_q2": "ours, /dev/ublkbN, qcow2, -q 2",
    "ublk_qcow2_batch": "ours, /dev/ublkbN, qcow2, --batch-io",
    "ublk_qcow2_q2_batch": "ours, /dev/ublkbN, qcow2, -q 2, --batch-io",
    "ublk_raw_batch": "ours, /dev/ublkbN, raw file, --batch-io",
    "ublk_qcow2_nobatch": "ours, /dev/ublkbN, qcow2, --no-batch-io",
    "ublk_qcow2_q2_nobatch": "ours, /dev/ublkbN, qcow2, -q 2, --no-batch-io",
    "ublk_raw_nobatch": "ours, /dev/ublkbN, raw file, --no-batch-io",
    "ublk_raw": "ours, /dev/ublkbN, raw file",
    "ublk_raw_nozc": "ours, /dev/ublkbN, raw file, --no-zero-copy",
    "loop_raw": "kernel loop, --direct-io=on, raw file (the limit)",
    "qemu_nbd": "qemu-nbd on the kernel nbd driver, qcow2",
}
HOST_PATHS = ["engine_qcow2", "engine_qcow2_extl2", "engine_raw", "fio_raw", "fio_cow",
              "qemu_img_bench", "nbd_ours", "nbd_qemu", "nbd_null", "nbd_ours_mem",
              "nbd_qemu_mem", "nbd_ours_tls", "nbd_qemu_tls"]
SUBSTRATE_TEXT = {"brd": "ext4 on a RAM disk (brd)", "tmpfs": "tmpfs"}


def fio_argv(wl, depth, secs, out_json, extra, ios=None):
    """ios: stop after that many I/Os or secs, whichever comes first (fio ignores
    --number_ios in time-based runs, so then the run is not time-based)."""
    w = WORKLOADS[wl]
    argv = ["fio", "--name=bench", f"--rw={w['rw']}", "--rwmixread=50", f"--bs={w['bs']}",
            f"--iodepth={w.get('depth') or depth}", "--numjobs=1",
            f"--runtime={max(1, round(secs * 1000))}ms", "--norandommap",
            "--output-format=json", f"--output={out_json}"]
    argv += [f"--number_ios={ios}"] if ios else ["--time_based"]
    # The client's own cost should be as low as possible: no per-I/O clock reads, except
    # where latency is what is measured.
    argv += ["--percentile_list=50:99"] if w.get("latency") else ["--gtod_reduce=1"]
    return argv + extra


def parse_fio(path):
    with open(path) as f:
        text = f.read()
    # fio may print notes before the JSON object.
    job = json.loads(text[text.index("{"):])["jobs"][0]
    if job.get("error"):
        raise BenchError(f"fio reports error {job['error']}")
    res = {"read_iops": job["read"]["iops"], "write_iops": job["write"]["iops"],
           "ios": job["read"]["total_ios"] + job["write"]["total_ios"],
           "seconds": job["job_runtime"] / 1000.0}
    for d in ("read", "write"):
        pct = job[d].get("clat_ns", {}).get("percentile")
        if job[d]["total_ios"] and pct:
            res[f"{d}_p50_us"] = pct["50.000000"] / 1000.0
            res[f"{d}_p99_us"] = pct["99.000000"] / 1000.0
    res["client_cpu_s"] = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * res["seconds"]
    return res


# ---- processes -------------------------------------------------------------------------------

def proc_cpu_s(pid):
    """user+system CPU seconds of a whole process (all threads, io-wq workers included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return None


def proc_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_measured(argv, timeout, err_path):
    """Run argv to completion; returns (exit status, stdout text, cpu seconds, peak KiB) from
    the child's own rusage (wait4); stderr is appended to err_path."""
    out_path = err_path + ".stdout"
    with open(err_path, "a") as err, open(out_path, "w+") as out:
        p = subprocess.Popen(argv, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, ru = os.wait4(p.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                p.kill()
                os.wait4(p.pid, 0)
                p.returncode = -9
                raise BenchError(f"{argv[0]} timed out after {timeout:.0f} s")
            time.sleep(0.02)
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    os.unlink(out_path)
    return p.returncode, text, ru.ru_utime + ru.ru_stime, ru.ru_maxrss


def run(argv, timeout=600, quiet=True, **kw):
    r = subprocess.run(argv, timeout=timeout, text=True, capture_output=quiet, **kw)
    if r.returncode != 0:
        detail = (r.stderr or "").strip().splitlines()[-3:] if quiet else []
        raise BenchError(f"{' '.join(argv[:3])}... failed (exit {r.returncode}): "
                         + " / ".join(detail))
    return r.stdout


def fill_file(path, size, compressible=False, timeout=3600):
    """Write every byte of path (size bytes) once with fio's data, 1 MiB O_DIRECT writes:
    no holes and no unwritten extents left.  compressible: half of each 4k compresses."""
    with open(path, "wb") as f:
        f.truncate(size)
    argv = ["fio", "--name=fill", f"--filename={path}", "--rw=write", "--bs=1M", "--direct=1",
            "--ioengine=psync", f"--size={size}", "--output=/dev/null"]
    if compressible:
        argv += ["--buffer_compress_percentage=50", "--buffer_compress_chunk=4k",
                 "--refill_buffers"]
    run(argv, timeout=timeout)


def settle_file(path):
    """Leave path on disk and out of the page cache, as fill_file's O_DIRECT writes leave the raw
    file.  qemu-img convert writes through the page cache: an O_DIRECT reader or writer of a file
    with cached pages (dirty and not yet allocated, right after the convert) pays for writing
    them back and invalidating them, which once made every qcow2 path look slower than raw."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def make_qcow2_copy(raw, qcow2, compressed=False, timeout=3600):
    tmp = qcow2 + ".tmp"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2"] + (["-c"] if compressed else [])
        + [raw, tmp], timeout=timeout)
    run(["qemu-img", "check", "-q", "-f", "qcow2", tmp], timeout=timeout)
    settle_file(tmp)
    os.rename(tmp, qcow2)


# ---- formatting ------------------------------------------------------------------------------

def fmt_num(v, digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def fmt_iops_cell(rec, wl):
    if rec is None:
        return ""
    if rec.get("error") or rec.get("read_iops") is None:
        return "n/a"
    r, w = rec["read_iops"], rec["write_iops"]
    if r and w:
        return f"{fmt_num(r)} / {fmt_num(w)}"
    return fmt_num(r + w)
