#!/usr/bin/env python3
"""Comparisons for the image tool suites (QEMU's output is the reference).

  cmp.py json A.json B.json [--ignore KEY,...]
        The two JSON documents are equal, except the top-level keys named (in every object
        of an array, for --backing-chain output).  Prints each difference.
  cmp.py map A.json B.json [--no-zero]
        qemu-img map --output=json of two images describes the same guest layout: the same
        present/zero/data/depth for every byte (host offsets may differ).  --no-zero: not the
        zero flag (with different host layouts, host-file holes make it differ).
  cmp.py raw A.raw B.raw [OFF LEN]... [+ C.raw D.raw [OFF LEN]...]...
        The files are equal outside the given byte ranges (several pairs, separated by +).
  cmp.py check A.json B.json [--ignore KEY,...]
        qemu-img check --output=json results agree (missing counters are 0; filename ignored).
Exit status 0 when equal, 1 otherwise.
"""
import json
import sys


def load(path):
    with open(path) as f:
        return json.load(f)


def diff(a, b, path, out):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                out.append("%s.%s: %s vs %s" % (path, k, a.get(k, "<missing>"), b.get(k, "<missing>")))
            else:
                diff(a[k], b[k], "%s.%s" % (path, k), out)
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            diff(x, y, "%s[%d]" % (path, i), out)
    elif a != b:
        out.append("%s: %r vs %r" % (path, a, b))


def strip(doc, ignore):
    docs = doc if isinstance(doc, list) else [doc]
    for d in docs:
        for k in ignore:
            d.pop(k, None)
    return doc


def ignored(args):
    if "--ignore" in args:
        i = args.index("--ignore")
        keys = args[i + 1].split(",")
        del args[i:i + 2]
        return [k for k in keys if k]
    return []


def cmd_json(args):
    ign = ignored(args)
    out = []
    diff(strip(load(args[0]), ign), strip(load(args[1]), ign), "", out)
    return out


def runs(path, zero=True):
    """[(start, end, flags)] with adjacent equal runs merged."""
    res = []
    for e in load(path):
        flags = (e["present"] if "present" in e else e.get("data"), e["zero"] if zero else None,
                 e["data"], e["depth"])
        s, l = e["start"], e["length"]
        if res and res[-1][1] == s and res[-1][2] == flags:
            res[-1] = (res[-1][0], s + l, flags)
        else:
            res.append((s, s + l, flags))
    return res


def cmd_map(args):
    zero = "--no-zero" not in args
    a, b = runs(args[0], zero), runs(args[1], zero)
    return [] if a == b else ["map differs:", "  ours:   %s" % a[:8], "  theirs: %s" % b[:8]]


def cmd_raw(args):
    out = []
    while "+" in args:
        i = args.index("+")
        out += raw_pair(args[:i])
        args = args[i + 1:]
    return out + raw_pair(args)


def raw_pair(args):
    with open(args[0], "rb") as f:
        a = bytearray(f.read())
    with open(args[1], "rb") as f:
        b = bytearray(f.read())
    if len(a) != len(b):
        return ["%s, %s: sizes differ: %d vs %d" % (args[0], args[1], len(a), len(b))]
    rest = [int(x) for x in args[2:]]
    for off, length in zip(rest[0::2], rest[1::2]):
        a[off:off + length] = bytes(length)
        b[off:off + length] = bytes(length)
    if a == b:
        return []
    first = next(i for i in range(len(a)) if a[i] != b[i])
    return ["%s, %s: contents differ, first at byte %d" % (args[0], args[1], first)]


COUNTERS = ["corruptions", "leaks", "check-errors", "corruptions-fixed", "leaks-fixed",
            "image-end-offset", "total-clusters", "allocated-clusters", "fragmented-clusters",
            "compressed-clusters"]


def cmd_check(args):
    ign = ignored(args)
    a, b = load(args[0]), load(args[1])
    return ["%s: %s vs %s" % (k, a.get(k, 0), b.get(k, 0)) for k in COUNTERS
            if k not in ign and a.get(k, 0) != b.get(k, 0)]


def main():
    cmds = {"json": cmd_json, "map": cmd_map, "raw": cmd_raw, "check": cmd_check}
    if len(sys.argv) < 4 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    out = cmds[sys.argv[1]](sys.argv[2:])
    for line in out:
        print(line)
    sys.exit(1 if out else 0)


if __name__ == "__main__":
    main()
