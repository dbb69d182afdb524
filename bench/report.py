#!/usr/bin/python3
"""The report of `make bench`: targets and ratios from the raw results, latest.md, latest.json
and the gnuplot chart latest.png.

    bench/report.py JSON [DIR]    render the report again from a latest.json (into DIR)
"""
import json
import os
import shutil
import statistics
import subprocess
import sys

sys.dont_write_bytecode = True
from common import (ALLOC_MAX_WRITES, HOST_PATHS, LABELS, LATENCY, MAIN, SIZE_WORKLOADS, SPECIAL,  # noqa: E402
                    SUBSTRATE_TEXT, SUBSTRATES, VM_PATHS, VM_WORKLOADS, WORKLOADS,
                    default_cache_bytes, fmt_iops_cell, fmt_num, log, size_name)


# ---- analysis -----------------------------------------------------------------------------------

def total(rec):
    if not rec or rec.get("error") or rec.get("read_iops") is None:
        return None
    return rec["read_iops"] + rec["write_iops"]


def vm_summary(results):
    """Median over the rounds of each (substrate, path, workload), with the spread."""
    groups = {}
    for r in results:
        if r.get("section") == "ublk":
            groups.setdefault((r["substrate"], r["path"], r["workload"]), []).append(r)
    out = []
    for (sub, path, wl), recs in sorted(groups.items()):
        vals = [total(r) for r in recs if total(r) is not None]
        s = {"substrate": sub, "path": path, "workload": wl, "rounds": len(recs),
             "ok_rounds": len(vals), "iops": vals}
        if vals:
            med = statistics.median(vals)
            s.update(median=med, min=min(vals), max=max(vals),
                     spread_pct=(max(vals) - min(vals)) / med * 100 if med else None)
            for k in ("cpu_us_per_io", "guest_cpu_us_per_io"):
                v = [r[k] for r in recs if r.get(k) is not None]
                if v:
                    s[k] = statistics.median(v)
            peaks = [r["peak_kib"] for r in recs if r.get("peak_kib")]
            if peaks:
                s["peak_kib"] = max(peaks)
            if any("zero_copy" in r for r in recs):
                s["zero_copy"] = any(r.get("zero_copy") for r in recs)
        out.append(s)
    return out


def median_record(recs):
    """The round with the median total IOPS (the lower one of an even count), with every
    round's total; a failed round counts only if all failed."""
    ok = sorted((r for r in recs if total(r) is not None), key=total)
    if not ok:
        return recs[0]
    med = dict(ok[(len(ok) - 1) // 2])
    if len(recs) > 1:
        med["round_totals"] = [total(r) for r in recs]
    return med


class Data:
    """Lookups over one run's results."""

    def __init__(self, doc):
        self.doc = doc
        self.host = {}
        self.host_rounds = {}
        self.sizes = {}
        for r in doc["results"]:
            if r.get("section") in ("engine", "nbd", "tls"):
                self.host_rounds.setdefault((r["path"], r["workload"]), {})[r.get("round", 1)] = r
            elif r.get("section") == "sizes":
                self.sizes[(r["path"], r["workload"], r["size"])] = r
        self.host = {k: median_record(list(v.values())) for k, v in self.host_rounds.items()}
        self.vm = {(s["substrate"], s["path"], s["workload"]): s for s in doc.get("vm_summary", [])}
        self.vm_rounds = {}
        for r in doc["results"]:
            if r.get("section") == "ublk":
                self.vm_rounds.setdefault((r["substrate"], r["path"], r["workload"]), {})[
                    r["round"]] = r

    def ratio(self, a, b, wl):
        x, y = total(self.host.get((a, wl))), total(self.host.get((b, wl)))
        return x / y if x is not None and y else None

    def round_range(self, a, b, wl):
        """Lowest and highest ratio of a round to the same round of b (None: one round)."""
        ra, rb = self.host_rounds.get((a, wl), {}), self.host_rounds.get((b, wl), {})
        per = [total(ra[k]) / total(rb[k]) for k in ra
               if total(ra[k]) is not None and total(rb.get(k))]
        return (min(per), max(per)) if len(per) > 1 else None

    def vm_ratio(self, sub, a, b, wl):
        """Ratio of the medians, and the range of the per-round ratios (same round = paths
        measured minutes apart, under the same host load)."""
        x, y = self.vm.get((sub, a, wl), {}), self.vm.get((sub, b, wl), {})
        if not x.get("median") or not y.get("median"):
            return None, None
        per = []
        ra, rb = self.vm_rounds.get((sub, a, wl), {}), self.vm_rounds.get((sub, b, wl), {})
        for rnd in ra:
            ta, tb = total(ra[rnd]), total(rb.get(rnd))
            if ta is not None and tb:
                per.append(ta / tb)
        return x["median"] / y["median"], (min(per), max(per)) if len(per) > 1 else None


def substrates(d):
    """The VM substrates present, in SUBSTRATES order."""
    return sorted({k[0] for k in d.vm}, key=lambda s: SUBSTRATES.index(s) if s in SUBSTRATES else 9)


# (name, numerator, denominator, workloads, target)
HOST_TARGETS = [
    ("engine qcow2 / engine raw", "engine_qcow2", "engine_raw", MAIN, 0.9),
    ("NBD export / qemu-nbd", "nbd_ours", "nbd_qemu", MAIN, 3),
    ("NBD export / nbdkit null", "nbd_ours", "nbd_null", MAIN, 0.8),
    ("NBD export / qemu-nbd, images in memory", "nbd_ours_mem", "nbd_qemu_mem", MAIN, 3),
    ("NBD export / nbdkit null, image in memory", "nbd_ours_mem", "nbd_null", MAIN, 0.8),
    ("allocating: NBD export / qemu-nbd", "nbd_ours", "nbd_qemu", ["alloc_4k"], 3),
    ("overlay COW: NBD export / qemu-nbd", "nbd_ours", "nbd_qemu", ["overlay_4k"], 3),
    ("TLS: NBD export / qemu-nbd, both with TLS", "nbd_ours_tls", "nbd_qemu_tls",
     ["randwrite_4k", "randread_4k"], 2),
]
# Server CPU time per I/O, qemu-nbd's over ours, on every 4k row (issue 14): (name, ours,
# qemu-nbd's, workloads, target).
CPU_TARGETS = [
    ("CPU per I/O: qemu-nbd / NBD export", "nbd_ours", "nbd_qemu", ["randwrite_4k", "randread_4k", "randrw_4k"], 3),
    ("CPU per I/O: qemu-nbd / NBD export, images in memory", "nbd_ours_mem", "nbd_qemu_mem",
     ["randwrite_4k", "randread_4k", "randrw_4k"], 3),
    ("CPU per I/O: qemu-nbd / NBD export, both with TLS", "nbd_ours_tls", "nbd_qemu_tls",
     ["randwrite_4k", "randread_4k"], 3),
]
HOST_RATIOS = [
    ("engine raw / fio on the raw file", "engine_raw", "fio_raw", MAIN),
    ("engine qcow2 / fio on the raw file", "engine_qcow2", "fio_raw", MAIN),
    ("engine qcow2 / qemu-img bench", "engine_qcow2", "qemu_img_bench",
     ["randwrite_4k", "randread_4k", "rw_512k"]),
    ("compressed qcow2 / its raw source, engine", "engine_qcow2", "engine_raw",
     ["compressed_4k"]),
    ("compressed: NBD export / qemu-nbd", "nbd_ours", "nbd_qemu", ["compressed_4k"]),
    ("overlay: extended L2 / standard L2, engine", "engine_qcow2_extl2", "engine_qcow2",
     ["overlay_4k"]),
    ("overlay COW: engine / fio moving the same disk traffic", "engine_qcow2", "fio_cow",
     ["overlay_4k"]),
    ("overlay COW: NBD export / fio moving the same disk traffic", "nbd_ours", "fio_cow",
     ["overlay_4k"]),
    ("overlay COW: qemu-nbd / fio moving the same disk traffic", "nbd_qemu", "fio_cow",
     ["overlay_4k"]),
]
# (name, numerator, denominator, workloads (None: every VM workload), target): issue 5's
# qemu-nbd ratio, issue 16's loop, raw and -q 2 ratios.
VM_4K, VM_512K = ["randread_4k", "randwrite_4k"], ["read_512k", "write_512k"]
VM_TARGETS = [
    ("ublk qcow2 / qemu-nbd", "ublk_qcow2", "qemu_nbd", None, 6),
    ("ublk qcow2 / ublk raw", "ublk_qcow2", "ublk_raw", None, 0.95),
    ("ublk qcow2 / kernel loop", "ublk_qcow2", "loop_raw", VM_4K, 0.85),
    ("ublk qcow2 / kernel loop", "ublk_qcow2", "loop_raw", VM_512K, 0.8),
    ("ublk qcow2 -q 2 / -q 1", "ublk_qcow2_q2", "ublk_qcow2", None, 1.0),
]
# Not targets but a decision (issue 16: "adopt it where it wins"): batch I/O against the
# per-tag commands; it would be on by default only if it won in every row.
VM_DECISIONS = [
    ("ublk qcow2 --batch-io / per tag", "ublk_qcow2_batch", "ublk_qcow2", None, 1.0),
    ("ublk qcow2 -q 2 --batch-io / per tag", "ublk_qcow2_q2_batch", "ublk_qcow2_q2", None, 1.0),
    ("ublk raw --batch-io / per tag", "ublk_raw_batch", "ublk_raw", None, 1.0),
]
MEM_SLACK_KIB = 1024    # per-image tables beside the cache (L1, refcount table)


def evaluate(doc):
    d = Data(doc)
    targets, ratios = [], []
    for name, a, b, wls, t in HOST_TARGETS:
        for wl in wls:
            # (The in-memory paths are skipped where /dev/shm has no room: no row then.)
            if (a, wl) in d.host or ((b, wl) in d.host and not a.endswith("_mem")):
                r, rng = d.ratio(a, b, wl), d.round_range(a, b, wl)
                targets.append({"name": name, "numerator": a, "denominator": b, "workload": wl,
                                "ratio": r, "round_range": list(rng) if rng else None,
                                "target": t, "met": None if r is None else r >= t})
    for name, a, b, wls, t in CPU_TARGETS:
        for wl in wls:
            x, y = d.host.get((a, wl)) or {}, d.host.get((b, wl)) or {}
            ca, cb = x.get("cpu_us_per_io"), y.get("cpu_us_per_io")
            if not ca or not cb:
                continue        # a path not run (or failed): no row, as for the IOPS targets
            r = cb / ca
            targets.append({"name": name, "numerator": b, "denominator": a, "workload": wl,
                            "ratio": r, "round_range": None, "target": t,
                            "met": None if r is None else r >= t})
    for name, a, b, wls in HOST_RATIOS:
        for wl in wls:
            if (a, wl) in d.host and (b, wl) in d.host:
                ratios.append({"name": name, "numerator": a, "denominator": b, "workload": wl,
                               "ratio": d.ratio(a, b, wl)})
    subs = substrates(d)
    for sub in subs:
        for name, a, b, wls, t in VM_TARGETS + VM_DECISIONS:
            for wl in wls or VM_WORKLOADS:
                if (sub, a, wl) not in d.vm or (sub, b, wl) not in d.vm:
                    continue
                r, rng = d.vm_ratio(sub, a, b, wl)
                targets.append({"name": name, "numerator": a, "denominator": b, "workload": wl,
                                "substrate": sub, "ratio": r,
                                "round_range": list(rng) if rng else None, "target": t,
                                "met": None if r is None else r >= t,
                                "decision": any(name == x[0] for x in VM_DECISIONS),
                                "no_zero_copy": b == "loop_raw" and
                                d.vm[(sub, a, wl)].get("zero_copy") is False})
    # Memory bounded by the cache size: the daemon's peak grows with the image by no more than
    # its default metadata cache does (plus MEM_SLACK_KIB for the per-image tables).
    peaks = {}
    for (path, wl, size), r in d.sizes.items():
        if path == "nbd_ours" and r.get("peak_kib"):
            peaks[size] = max(peaks.get(size, 0), r["peak_kib"])
    if len(peaks) >= 2:
        lo, hi = min(peaks), max(peaks)
        growth = peaks[hi] - peaks[lo]
        allowed = (default_cache_bytes(hi) - default_cache_bytes(lo)) // 1024 + MEM_SLACK_KIB
        targets.append({"name": "daemon peak memory growth over image size", "numerator": "nbd_ours",
                        "denominator": None, "workload": f"{size_name(lo)} -> {size_name(hi)}",
                        "growth_kib": growth, "allowed_kib": allowed, "ratio": None,
                        "target": None, "met": growth <= allowed})
    return targets, ratios


# ---- Markdown and chart -------------------------------------------------------------------------------------

def fmt_ratio(r):
    return "n/a" if r is None else f"{r:.2f}x"


def fmt_met(m):
    return "n/a" if m is None else ("yes" if m else "**no**")


def fmt_kib(k):
    if not k:
        return "n/a"
    return f"{k:,.0f} KiB" if k < 1024 else f"{k / 1024:,.1f} MiB"


def table(head, rows, align=None):
    align = align or ["---"] + ["---:"] * (len(head) - 1)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def render_md(doc, chart_name=None):
    d = Data(doc)
    targets, ratios = doc["targets"], doc["ratios"]
    c = doc["config"]
    h = doc["host"]
    L = ["# ublk-qcow2 benchmark results\n"]
    if c["quick"]:
        L.append("**Quick mode (BENCH_QUICK=1): short runs on small images, to check that the "
                 "suite works. These numbers are a sample, not a measurement.**\n")
    L.append(f"{doc['date']}, commit {doc['commit']}, {h['cpus']} CPUs, kernel {h['kernel']}, "
             f"{h['fstype']} in {h['dir']}. Load average (1 min) {doc['loadavg_start']} at the "
             f"start, {doc['loadavg_end']} at the end: other work on the machine lowers and skews "
             f"the numbers; compare ratios within one run. {c['seconds_each']:g} s per "
             f"measurement"
             + (f"; the engine and NBD workloads ran in {c['host_rounds']} rounds, paths "
                f"interleaved: cells show the median round, ratios are of the medians with the "
                f"lowest and highest ratio of one round's measurements"
                if c.get("host_rounds", 1) > 1 else "")
             + f"; total run time {doc['total_seconds']:.0f} s"
             + ("" if not doc.get("phase_seconds") else " (" + ", ".join(
                 f"{k} {v:.0f} s" for k, v in doc["phase_seconds"].items()) + ")") + ".\n")
    if chart_name:
        L.append(f"![chart]({chart_name})\n")

    decisions = [t for t in targets if t.get("decision")]
    targets = [t for t in targets if not t.get("decision")]
    if targets:
        L.append("## Targets (issues 5, 14 and 16)\n")
        rows = []
        for t in targets:
            where = WORKLOADS[t["workload"]]["title"] if t["workload"] in WORKLOADS \
                else t["workload"]
            if t.get("substrate"):
                where += f", {SUBSTRATE_TEXT.get(t['substrate'], t['substrate'])}"
            if t.get("growth_kib") is not None:
                rows.append([t["name"], where, f"+{fmt_kib(t['growth_kib'])}",
                             f"<= +{fmt_kib(t['allowed_kib'])} (cache growth + 1 MiB)",
                             fmt_met(t["met"])])
                continue
            got = fmt_ratio(t["ratio"])
            if t.get("round_range"):
                got += f" ({t['round_range'][0]:.2f}-{t['round_range'][1]:.2f} per round)"
            met = fmt_met(t["met"]) + (" (no zero copy)" if t.get("no_zero_copy") else "")
            rows.append([t["name"], where, got, f">= {t['target']:g}x", met])
        L.append(table(["target", "workload", "measured", "target", "met"], rows,
                       ["---", "---", "---:", "---:", "---"]))
        if any(t.get("no_zero_copy") for t in targets):
            L.append("\n\"No zero copy\": the kernel has no UBLK_F_AUTO_BUF_REG (6.16+), so every "
                     "request's data is copied once by the kernel between its pages and the "
                     "daemon's buffer, a copy loop's direct I/O does not make; with 512k requests "
                     "that copy is what ublk pays over loop (docs/design.md, Kernels).\n")
    if decisions:
        L.append("\nBatch I/O (`add --batch-io`, UBLK_F_BATCH_IO) against the per-tag commands: "
                 "not a target but the decision of issue 16 (adopt it where it wins). It would be "
                 "on by default only if it won in every row" +
                 ("; it does here." if all(t["met"] for t in decisions) else
                  "; it does not, so it stays an option.") + "\n")
        rows = []
        for t in decisions:
            where = WORKLOADS[t["workload"]]["title"] + \
                f", {SUBSTRATE_TEXT.get(t['substrate'], t['substrate'])}"
            got = fmt_ratio(t["ratio"])
            if t.get("round_range"):
                got += f" ({t['round_range'][0]:.2f}-{t['round_range'][1]:.2f} per round)"
            rows.append([t["name"], where, got, "yes" if t["met"] else "no"])
        L.append(table(["ratio", "workload", "measured", "wins"], rows,
                       ["---", "---", "---:", "---"]))

    host_wls = [w for w in MAIN + SPECIAL if any((p, w) in d.host for p in HOST_PATHS)]
    if host_wls:
        L.append("## Engine and NBD export (this host)\n")
        L.append(f"IOPS, 1 job, iodepth {c['depth']}; r/w cells are read / write IOPS. "
                 f"{size_name(c['size'])} images filled with data (raw, and the same data "
                 f"converted to qcow2, 64 KiB clusters); the empty image is a new qcow2 of "
                 f"{size_name(c.get('alloc_size', c['size']))}, the overlay a new qcow2 of "
                 f"{size_name(c.get('overlay_size', c['size']))} over a raw image of that size "
                 f"filled with data (also with extended L2 for the engine), a fresh one for each "
                 f"path, and those runs stop early, after {ALLOC_MAX_WRITES:,} writes or a quarter "
                 f"of the image's clusters in writes (see below); "
                 f"the compressed image is `qemu-img convert -c` of {size_name(c['compressed_size'])}"
                 f" of half-compressible data (the engine's raw cell in that column reads its uncompressed"
                 f" source). `qemu-img bench` is sequential (its 4k rows are "
                 f"sequential 4k) and runs reads and writes separately.\n")
        rows = []
        for p in HOST_PATHS:
            if any((p, w) in d.host for w in host_wls):
                rows.append([LABELS[p]] + [fmt_iops_cell(d.host.get((p, w)), w) for w in host_wls])
        L.append(table(["path"] + [WORKLOADS[w]["title"] for w in host_wls], rows))
        rows = []
        for w in ("alloc_4k", "overlay_4k"):
            for p in HOST_PATHS:
                r = d.host.get((p, w)) or {}
                if r.get("ios") and r.get("clusters_allocated") is not None:
                    rows.append([WORKLOADS[w]["title"], LABELS[p], size_name(r["image_size"]),
                                 fmt_num(r["ios"]), fmt_num(r.get("seconds"), 2),
                                 fmt_num(r["clusters_allocated"]),
                                 f"{r['clusters_allocated'] / r['ios'] * 100:.0f}%"])
        if rows:
            L.append("\nAllocating and copy-on-write runs: how many of the writes allocated a "
                     "cluster (copied it from the backing file, for a standard overlay), as "
                     "`qemu-img check` counts the clusters afterwards (it also found each image "
                     "clean). Random offsets land twice on some clusters; each run stops after "
                     f"BENCH_SECONDS, a quarter of the image's clusters in writes or "
                     f"{ALLOC_MAX_WRITES:,} writes, whichever comes first, so that fast and slow "
                     "paths do about the same share of allocating writes.\n")
            L.append(table(["workload", "path", "image", "writes", "seconds",
                            "clusters allocated", "allocating writes"], rows,
                           ["---", "---"] + ["---:"] * 5))
        if ratios:
            L.append("\nOther ratios (total IOPS):\n")
            L.append(table(["ratio", "workload", "measured"],
                           [[r["name"], WORKLOADS[r["workload"]]["title"], fmt_ratio(r["ratio"])]
                            for r in ratios], ["---", "---", "---:"]))
        L.append("\nCPU time per I/O (user + system, microseconds) of the process doing the work: "
                 "the server for NBD paths, the `bench`, fio job or qemu-img process otherwise.\n")
        rows = []
        for p in HOST_PATHS:
            cells = []
            for w in host_wls:
                r = d.host.get((p, w))
                cells.append("" if r is None else fmt_num(r.get("cpu_us_per_io"), 1))
            if any(cells):
                rows.append([LABELS[p]] + cells)
        L.append(table(["path"] + [WORKLOADS[w]["title"] for w in host_wls], rows))
        peaks = [[LABELS[p], fmt_kib(max((d.host[(p, w)].get("peak_kib") or 0)
                                         for w in host_wls if (p, w) in d.host))]
                 for p in HOST_PATHS if p not in ("fio_raw", "fio_cow") and any((p, w) in d.host
                                                                      for w in host_wls)]
        if peaks:
            L.append("\nPeak memory (VmHWM of the server; maxrss of `bench`/qemu-img), largest "
                     "over the workloads above:\n")
            L.append(table(["path", "peak"], peaks))

    lat = [w for w in LATENCY if any((p, w) in d.host for p in HOST_PATHS)]
    if lat:
        L.append("\n## Latency at depth 1 (this host)\n")
        L.append("Microseconds, completion latency percentiles (fio clat; the engine's own "
                 "histogram for `bench`).\n")
        rows = []
        for p in HOST_PATHS:
            if not any((p, w) in d.host for w in lat):
                continue
            row = [LABELS[p]]
            for w in lat:
                r = d.host.get((p, w)) or {}
                dd = "read" if WORKLOADS[w]["rw"] == "randread" else "write"
                row += [fmt_num(r.get(f"{dd}_p50_us"), 1), fmt_num(r.get(f"{dd}_p99_us"), 1),
                        fmt_num(total(r))]
            rows.append(row)
        head = ["path"]
        for w in lat:
            head += [f"{WORKLOADS[w]['title']}: p50", "p99", "IOPS"]
        L.append(table(head, rows))

    if d.sizes:
        L.append("\n## Image size (this host)\n")
        L.append("Sparse qcow2 images (`preallocation=metadata`: every L2 table and refcount "
                 "block in place, the data clusters are holes in the file), one server per "
                 "image, fio nbd 4k randread then randwrite over the whole image (the writes stop "
                 f"after BENCH_SECONDS or {ALLOC_MAX_WRITES:,} writes). Peak memory is "
                 "the server's VmHWM after both; the engine's default metadata cache for that "
                 "size is shown for comparison.\n")
        rows = []
        for size in c["sizes"]:
            for p in ("nbd_ours", "nbd_qemu"):
                rr = d.sizes.get((p, "randread_4k", size), {})
                rw = d.sizes.get((p, "randwrite_4k", size), {})
                if not rr and not rw:
                    continue
                peak = max(rr.get("peak_kib") or 0, rw.get("peak_kib") or 0)
                rows.append([size_name(size), LABELS[p], fmt_num(total(rr)),
                             fmt_num(rr.get("cpu_us_per_io"), 1), fmt_num(total(rw)),
                             fmt_num(rw.get("cpu_us_per_io"), 1), fmt_kib(peak),
                             fmt_kib(default_cache_bytes(size) // 1024) if p == "nbd_ours" else ""])
        L.append(table(["size", "path", "randread 4k IOPS", "CPU us/IO", "randwrite 4k IOPS",
                        "CPU us/IO", "peak memory", "our cache limit"], rows,
                       ["---", "---"] + ["---:"] * 6))

    if d.vm:
        u = c["ublk"]
        vmi = doc.get("vm", {})
        L.append("\n## ublk block devices (inside the test VM)\n")
        kernels = sorted({v for k, v in vmi.items() if k.endswith("kernel")})
        L.append(f"One boot of tests/vm/vm.sh per kernel: QEMU TCG (no KVM), 2 vCPUs, 4G RAM, Debian "
                 f"kernel {', '.join(kernels) or '?'}. {size_name(u['size'])} raw image filled with data "
                 f"and the same data converted to qcow2; fio io_uring O_DIRECT, 1 job, iodepth "
                 f"{u['depth']}, {u.get('seconds_each', c['seconds_each']):g} s per measurement; ublk-qcow2 with 1 "
                 f"queue unless the path says -q 2; zero copy where the kernel has it unless the path "
                 f"says --no-zero-copy. " + (
                     f"The paths run interleaved (qcow2, raw, loop, qemu-nbd, then the reverse order, ...), "
                     f"{u['rounds']} rounds; cells are the median IOPS with the lowest and "
                     f"highest round: under TCG the numbers swing with host load. "
                     if u["rounds"] > 1 else
                     "One round only: under TCG the numbers swing with host load, so these "
                     "ratios are rough. ") +
                 "CPU is per I/O in microseconds of emulated time, counted while the device "
                 "had I/O: the serving process (none for loop, which runs in kernel workers) and "
                 "the whole guest (fio and kernel included).\n")
        L.append("On tmpfs every io_uring read and write of the daemon (and of qemu-nbd) goes to "
                 "an io-wq worker thread (tmpfs has no asynchronous O_DIRECT in 6.12); ext4 on "
                 "a RAM disk behaves like a file system on a real disk.\n")
        for sub in substrates(d):
            wls = [w for w in VM_WORKLOADS if any((sub, p, w) in d.vm for p in VM_PATHS)]
            L.append(f"\n### {SUBSTRATE_TEXT.get(sub, sub)}\n")
            rows = []
            for p in VM_PATHS:
                row = [LABELS[p]]
                peak = 0
                for w in wls:
                    s = d.vm.get((sub, p, w), {})
                    if s.get("median") is None:
                        row += ["n/a", "", ""]
                        continue
                    cell = fmt_num(s["median"])
                    if s["ok_rounds"] > 1:
                        cell += f" ({fmt_num(s['min'])}-{fmt_num(s['max'])})"
                    row += [cell, fmt_num(s.get("cpu_us_per_io"), 1),
                            fmt_num(s.get("guest_cpu_us_per_io"), 1)]
                    peak = max(peak, s.get("peak_kib") or 0)
                rows.append(row + [fmt_kib(peak) if peak else ""])
            head = ["path"]
            for w in wls:
                head += [f"{WORKLOADS[w]['title']} IOPS", "server CPU us/IO", "guest CPU us/IO"]
            L.append(table(head + ["server peak memory"], rows))
            chk = vmi.get(f"qcow2_check_{sub}")
            err = vmi.get(f"error_{sub}")
            L.append(f"\nqemu-img check on the qcow2 after all its runs: {chk or 'not run'}."
                     + (f" Error: {err}" if err else "") + "\n")
    return "\n".join(L)


def render_chart(doc, outdir, png):
    """A PNG with gnuplot: host IOPS per workload, VM medians with their spread, IOPS over
    image size.  Returns False if gnuplot is missing or fails."""
    gp = shutil.which("gnuplot")
    if not gp:
        log("gnuplot is not installed (apt-get install gnuplot-nox): no chart")
        return False
    d = Data(doc)
    work = os.path.join(outdir, ".chart")
    os.makedirs(work, exist_ok=True)
    panels = []
    host_wls = [w for w in MAIN + SPECIAL if any((p, w) in d.host for p in HOST_PATHS)]
    host_paths = [p for p in HOST_PATHS if any((p, w) in d.host for w in host_wls)]
    if host_wls:
        with open(f"{work}/host.dat", "w") as f:
            for w in host_wls:
                vals = [total(d.host.get((p, w))) for p in host_paths]
                f.write(f'"{WORKLOADS[w]["title"]}" ' +
                        " ".join("?" if v is None else f"{v:.1f}" for v in vals) + "\n")
        plots = ", ".join(f"'{work}/host.dat' using {i + 2}{':xtic(1)' if i == 0 else ''} "
                          f"title '{p}'" for i, p in enumerate(host_paths))
        panels.append(f"""set title 'This host: IOPS (log scale; read + write)'
set logscale y
set autoscale y
set style histogram clustered gap 1
set xtics rotate by -15
plot {plots}
unset logscale y
set yrange [0:*]
""")
    if d.vm:
        subs = substrates(d)
        with open(f"{work}/vm.dat", "w") as f:
            for sub in subs:
                for w in VM_WORKLOADS:
                    row = []
                    for p in VM_PATHS:
                        s = d.vm.get((sub, p, w), {})
                        row += ["?"] * 3 if s.get("median") is None else \
                            [f"{s['median']:.1f}", f"{s['min']:.1f}", f"{s['max']:.1f}"]
                    f.write(f'"{sub} {WORKLOADS[w]["title"]}" ' + " ".join(row) + "\n")
        plots = ", ".join(f"'{work}/vm.dat' using {2 + 3 * i}:{3 + 3 * i}:{4 + 3 * i}"
                          f"{':xtic(1)' if i == 0 else ''} title '{p}'"
                          for i, p in enumerate(VM_PATHS))
        panels.append(f"""set title 'In the VM (TCG): median IOPS over the rounds, bars = lowest..highest'
set style histogram errorbars gap 1 lw 1
set xtics norotate
plot {plots}
""")
    if d.sizes:
        with open(f"{work}/sizes.dat", "w") as f:
            for size in doc["config"]["sizes"]:
                vals = [total(d.sizes.get((p, w, size))) for p in ("nbd_ours", "nbd_qemu")
                        for w in SIZE_WORKLOADS]
                peaks = [max((d.sizes.get((p, w, size)) or {}).get("peak_kib") or 0
                             for w in SIZE_WORKLOADS) / 1024 for p in ("nbd_ours", "nbd_qemu")]
                f.write(f"{size / (1 << 30):g} {size_name(size)} " + " ".join(
                    "?" if v is None else f"{v:.1f}" for v in vals + peaks) + "\n")
        panels.append(f"""set title 'Sparse images: 4k IOPS and the server peak memory over image size'
set style data linespoints
set logscale x 2
set xlabel 'image size'
set offsets graph 0.04, graph 0.04, 0, 0
set ylabel 'IOPS'
set y2label 'peak memory, MiB'
set y2tics
set y2range [0:*]
set xtics norotate
plot '{work}/sizes.dat' using 1:3:xtic(2) title 'ours randread', '' using 1:4 title 'ours randwrite', \\
     '' using 1:5 title 'qemu-nbd randread', '' using 1:6 title 'qemu-nbd randwrite', \\
     '' using 1:7 axes x1y2 dashtype 2 title 'ours peak MiB', \\
     '' using 1:8 axes x1y2 dashtype 2 title 'qemu-nbd peak MiB'
""")
    if not panels:
        return False
    title = f"ublk-qcow2 make bench, {doc['date']}, commit {doc['commit']}"
    if doc["config"]["quick"]:
        title += ": QUICK-MODE SAMPLE (short runs, small images), not a measurement"
    script = f"""set terminal pngcairo size 1200,{420 * len(panels)} font ',9' noenhanced
set output '{os.path.join(outdir, png)}.tmp'
set datafile missing '?'
set multiplot layout {len(panels)},1 title '{title}'
set style data histograms
set style fill solid 0.8 border -1
set key outside right top
set grid ytics
set yrange [0:*]
""" + "\n".join(panels) + "unset multiplot\n"
    with open(f"{work}/chart.gp", "w") as f:
        f.write(script)
    r = subprocess.run([gp, f"{work}/chart.gp"], capture_output=True, text=True)
    if r.returncode != 0:
        log(f"gnuplot failed: {r.stderr.strip()[-500:]}")
        return False
    os.rename(os.path.join(outdir, png) + ".tmp", os.path.join(outdir, png))
    shutil.rmtree(work, ignore_errors=True)
    return True


def write_report(doc, outdir):
    doc["targets"], doc["ratios"] = evaluate(doc)
    os.makedirs(outdir, exist_ok=True)
    tmp = os.path.join(outdir, "latest.json.tmp")
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.rename(tmp, os.path.join(outdir, "latest.json"))
    png = "latest.png"
    have_chart = render_chart(doc, outdir, png)
    if not have_chart and os.path.exists(os.path.join(outdir, png)):
        os.unlink(os.path.join(outdir, png))     # never leave an older run's chart beside
    md = render_md(doc, png if have_chart else None)
    with open(os.path.join(outdir, "latest.md"), "w") as f:
        f.write(md)
    return md


def main(argv):
    if len(argv) not in (1, 2) or argv[0].startswith("-"):
        print(__doc__.strip().split("\n\n")[1], file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        doc = json.load(f)
    doc["vm_summary"] = vm_summary(doc["results"])
    print(write_report(doc, argv[1] if len(argv) == 2 else os.path.dirname(argv[0]) or "."))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
