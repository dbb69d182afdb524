#!/bin/bash
# The `make bench` suite (bench/bench.py) in quick mode on tiny images, host sections only
# (the VM section takes minutes under TCG; `make bench` runs it): it finishes, latest.json
# parses and holds every measurement of the plan with numbers, the Markdown report and the
# chart are written, `bench/report.py` renders them again, bad settings are refused.
# Never asserts speed.
# timeout: 480
. "$(dirname "$0")/../lib/lib.sh"

SUITE=$REPO_ROOT/bench/bench.py
D=$UQ_TMP/bench_suite
mkdir -p "$D" || { notok bench_suite_setup "cannot create $D"; exit 1; }
for tool in fio qemu-img qemu-nbd nbdkit; do
    need_cmd "$tool" || { skip bench_suite "$tool is not installed"; exit 0; }
done

# Tiny everything: 0.1 s per measurement, depth 16, 16 MiB images, two sparse sizes, two
# rounds of the main workloads.
quick() {
    BENCH_QUICK=1 BENCH_ONLY=engine,nbd,sizes BENCH_SECONDS=0.1 BENCH_DEPTH=16 BENCH_ROUNDS=2 \
    BENCH_SIZE=16M BENCH_ALLOC_SIZE=16M BENCH_OVERLAY_SIZE=32M BENCH_COMPRESSED_SIZE=16M BENCH_SIZES=16M,32M \
    BENCH_DIR="$D/dir" BENCH_RESULTS="$D/res" "$@"
}

if quick timeout 420 "$PYTHON" "$SUITE" "$UQ" >"$D/out.md" 2>"$D/err.log"; then
    ok bench_suite_runs
else
    notok bench_suite_runs "exit $?: $(grep -E 'failed|error|Error' "$D/err.log" | head -c 600)"
fi

# Every (section, path, workload[, size]) the issue asks for, with IOPS, CPU per I/O and,
# where they apply, latency percentiles and the server's peak memory.
# The NBD paths on an image in memory run where /dev/shm is a tmpfs with room, else the log
# says why not.
mem=1
grep -q "not measuring NBD on an image in memory" "$D/err.log" && mem=0
if "$PYTHON" - "$D/res/latest.json" "$mem" >"$D/check.log" 2>&1 <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
mem = sys.argv[2] == "1"
MAIN = ["randwrite_4k", "randread_4k", "randrw_4k", "rw_512k"]
LAT = ["lat_read_4k", "lat_write_4k"]
want = []
# The main and latency workloads: once per round.
for rnd in (1, 2):
    for wl in MAIN + LAT:
        want += [("engine", p, wl, rnd) for p in ("engine_qcow2", "engine_raw", "fio_raw")]
        want += [("nbd", p, wl, rnd) for p in ("nbd_ours", "nbd_qemu", "nbd_null")
                 + (("nbd_ours_mem", "nbd_qemu_mem") if mem and wl in MAIN else ())]
    want += [("engine", "qemu_img_bench", wl, rnd) for wl in ("randwrite_4k", "randread_4k", "rw_512k")]
want += [("engine", "fio_cow", "overlay_4k", None)]
for wl in ("alloc_4k", "overlay_4k", "compressed_4k"):
    want += [("engine", "engine_qcow2", wl, None)]
    want += [("nbd", p, wl, None) for p in ("nbd_ours", "nbd_qemu")]
want += [("engine", "engine_raw", "compressed_4k", None),
         ("engine", "engine_qcow2_extl2", "overlay_4k", None)]
for size in (16 << 20, 32 << 20):
    want += [("sizes", p, wl, size) for p in ("nbd_ours", "nbd_qemu")
             for wl in ("randread_4k", "randwrite_4k")]
got = {(r["section"], r["path"], r["workload"], r.get("size") or r.get("round")): r
       for r in doc["results"]}
bad = []
for key in want:
    r = got.get(key)
    if r is None:
        bad.append(f"{key}: missing")
        continue
    if r.get("error"):
        bad.append(f"{key}: {r['error']}")
        continue
    if not (r["read_iops"] + r["write_iops"] > 0 and r["ios"] > 0):
        bad.append(f"{key}: no I/O counted")
    if key[1] != "fio_cow" and not isinstance(r.get("cpu_us_per_io"), (int, float)):
        bad.append(f"{key}: no CPU per I/O")
    if key[2] in LAT:
        d = "read" if key[2] == "lat_read_4k" else "write"
        if not 0 < r.get(f"{d}_p50_us", 0) <= r.get(f"{d}_p99_us", 0):
            bad.append(f"{key}: latency percentiles {r.get(d + '_p50_us')} {r.get(d + '_p99_us')}")
    if key[2] in ("alloc_4k", "overlay_4k") and key[1] != "fio_cow" and \
            not 0 < r.get("clusters_allocated", 0) <= r["ios"]:
        bad.append(f"{key}: {r.get('clusters_allocated')} clusters allocated by {r['ios']} writes")
    if key[1].startswith("nbd_") and not r.get("peak_kib"):
        bad.append(f"{key}: no server peak memory")
extra = set(got) - set(want)
if extra:
    bad.append(f"unexpected rows: {sorted(extra, key=str)}")
names = {t["name"] for t in doc["targets"]}
for n in ("engine qcow2 / engine raw", "NBD export / qemu-nbd", "NBD export / nbdkit null",
          "allocating: NBD export / qemu-nbd", "overlay COW: NBD export / qemu-nbd",
          "daemon peak memory growth over image size"):
    if n not in names:
        bad.append(f"target '{n}' not evaluated")
if any(t["met"] is None for t in doc["targets"]):
    bad.append("a target has no verdict")
if not any(t.get("round_range") for t in doc["targets"]):
    bad.append("no target shows the range of its rounds")
print("\n".join(bad))
sys.exit(1 if bad else 0)
EOF
then
    ok bench_suite_json
else
    notok bench_suite_json "$(head -c 800 "$D/check.log")"
fi

# The report: Markdown with every section, the chart as a PNG, stdout = the Markdown.
md=$D/res/latest.md
miss=""
for heading in "## Targets" "## Engine and NBD export" "## Latency at depth 1" "## Image size"; do
    grep -q "^$heading" "$md" 2>/dev/null || miss="$miss '$heading'"
done
if [ -n "$miss" ]; then
    notok bench_suite_markdown "latest.md lacks$miss"
elif ! cmp -s "$md" <(head -c "$(stat -c %s "$md")" "$D/out.md"); then
    notok bench_suite_markdown "stdout is not the Markdown report"
else
    ok bench_suite_markdown
fi
if ! command -v gnuplot >/dev/null; then
    skip bench_suite_chart "gnuplot is not installed"
elif [ "$(head -c 4 "$D/res/latest.png" 2>/dev/null | od -An -tx1 | tr -d ' ')" = 89504e47 ] &&
        grep -q '!\[chart\](latest.png)' "$md"; then
    ok bench_suite_chart
else
    notok bench_suite_chart "no PNG chart, or latest.md does not show it"
fi

# Rendering again from the JSON gives the same report.
mkdir -p "$D/again" && cp "$D/res/latest.json" "$D/again/"
if "$PYTHON" "$REPO_ROOT/bench/report.py" "$D/again/latest.json" >/dev/null 2>"$D/again.err" &&
        cmp -s "$D/again/latest.md" "$md"; then
    ok bench_suite_report_again
else
    notok bench_suite_report_again "$(head -c 300 "$D/again.err") $(diff "$md" "$D/again/latest.md" | head -5)"
fi

# Bad settings: exit 1 with a message naming the setting, nothing measured.
bad=""
for setting in BENCH_ONLY=engine,bogus BENCH_SECONDS=0 BENCH_SECONDS=x BENCH_DEPTH=-1 \
               BENCH_SIZE=12Q BENCH_ALLOC_SIZE=1M BENCH_OVERLAY_SIZE=x BENCH_WORKLOADS=randfoo \
               BENCH_ROUNDS=0 BENCH_UBLK_SECONDS=x; do
    env "$setting" BENCH_DIR="$D/dir" BENCH_RESULTS="$D/bad" timeout 60 "$PYTHON" "$SUITE" "$UQ" \
        >/dev/null 2>"$D/bad.err"
    rc=$?
    if [ $rc != 1 ]; then bad="$bad $setting exited $rc;"
    elif ! grep -q "${setting%%=*}\|${setting#*=}" "$D/bad.err"; then
        bad="$bad $setting: message does not name it ($(head -c 100 "$D/bad.err"));"
    fi
done
[ -e "$D/bad" ] && bad="$bad results written for a refused setting;"
if [ -z "$bad" ]; then ok bench_suite_bad_settings; else notok bench_suite_bad_settings "$bad"; fi
