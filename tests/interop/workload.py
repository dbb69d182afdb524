#!/usr/bin/env python3
"""Seeded random qemu-io workload, one command per line.

Usage: workload.py SEED SIZE CLUSTER_SIZE [--ops N] [--no-discard] [--no-aio] [--no-read] [--zero-unmap]

Writes with patterns at unaligned and cluster-crossing offsets/lengths, overwrites of earlier
writes, zero writes, whole-cluster discards (QEMU ignores partial-cluster ones), flushes and
batches of concurrent non-overlapping aio writes.  --zero-unmap makes half the zero writes
`write -z -u` (the range may be deallocated: NBD without NO_HOLE).  Reads (`read -P`) check ranges whose
content the workload itself determined (written, never touched since), so the server's read
path is checked while it is still caching metadata.  Everything stays inside SIZE.
"""
import argparse
import random

SECTOR = 512


def parse_size(s):
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    s = s.strip().lower()
    if s[-1] in mult:
        return int(s[:-1]) * mult[s[-1]]
    return int(s)


class Gen:
    def __init__(self, seed, size, cluster, ops, discard, aio, reads, zero_unmap=False):
        self.r = random.Random(seed)
        self.zero_unmap = zero_unmap
        self.size = size
        self.cs = cluster
        self.nops = ops
        self.discard = discard
        self.aio = aio
        self.reads = reads
        self.out = []
        # (offset, length, pattern) of every content-defining op, in order; pattern None
        # marks content the workload does not determine (discard).
        self.hist = []

    # An offset near a cluster boundary half the time, anywhere otherwise.
    def offset(self, align=1):
        r = self.r
        if r.random() < 0.5:
            k = r.randrange(0, max(1, self.size // self.cs))
            off = k * self.cs + r.randint(-2048, 2048)
        else:
            off = r.randrange(0, self.size)
        off = max(0, min(off, self.size - 1))
        return off - off % align

    def length(self, align=1):
        r = self.r
        cs = self.cs
        x = r.random()
        if x < 0.4:
            n = r.randint(1, 4096)
        elif x < 0.8:
            n = r.randint(1, min(2 * cs + 4096, 1 << 20))
        else:
            n = r.randint(1, min(4 * cs + 8192, 1 << 20))
        n = max(align, n - n % align)
        return n

    def clip(self, off, n):
        return off, max(1, min(n, self.size - off))

    def pattern(self):
        return self.r.randint(1, 255)

    def emit(self, cmd, off=None, n=None, pat=None):
        self.out.append(cmd)
        if off is not None:
            self.hist.append((off, n, pat))

    def write(self):
        off, n = self.clip(self.offset(), self.length())
        p = self.pattern()
        self.emit("write -P %d %d %d" % (p, off, n), off, n, p)

    def overwrite(self):
        olds = [h for h in self.hist if h[2] is not None]
        if not olds:
            return self.write()
        o, l, _ = self.r.choice(olds[-30:])
        off = o + self.r.randrange(0, l)
        off, n = self.clip(off, self.r.randint(1, max(1, l)))
        p = self.pattern()
        self.emit("write -P %d %d %d" % (p, off, n), off, n, p)

    def zero(self):
        align = SECTOR if self.r.random() < 0.7 else 1
        off = self.offset(align)
        n = self.r.randint(1, 3 * self.cs)
        if align > 1:
            n = max(SECTOR, n - n % SECTOR)
        off, n = self.clip(off, n)
        u = " -u" if self.zero_unmap and self.r.random() < 0.5 else ""
        self.emit("write -z%s %d %d" % (u, off, n), off, n, 0)

    def do_discard(self):
        nclusters = self.size // self.cs
        if nclusters < 1:
            return self.flush()
        k = self.r.randrange(0, nclusters)
        cnt = min(self.r.randint(1, 4), nclusters - k)
        off, n = k * self.cs, cnt * self.cs
        self.emit("discard %d %d" % (off, n), off, n, None)

    def flush(self):
        self.emit("flush")

    def aio_batch(self):
        # Non-overlapping even after rounding out to sectors, so the result does not
        # depend on completion order (an NBD client read-modify-writes partial sectors).
        taken = []
        for _ in range(self.r.randint(2, 6)):
            for _try in range(10):
                off, n = self.clip(self.offset(), self.r.randint(1, min(2 * self.cs, 1 << 18)))
                lo = off - off % SECTOR
                hi = -(-(off + n) // SECTOR) * SECTOR
                if all(hi <= a or lo >= b for a, b in taken):
                    taken.append((lo, hi))
                    p = self.pattern()
                    self.emit("aio_write -P %d %d %d" % (p, off, n), off, n, p)
                    break
        self.emit("aio_flush")

    def read_check(self):
        # A recent op whose range no later op has touched: its content is known.
        cands = list(range(max(0, len(self.hist) - 12), len(self.hist)))
        self.r.shuffle(cands)
        for i in cands:
            off, n, pat = self.hist[i]
            if pat is None:
                continue
            if any(o < off + n and off < o + l for o, l, _ in self.hist[i + 1:]):
                continue
            # Sometimes only part of it.
            if n > 1 and self.r.random() < 0.5:
                a = self.r.randrange(0, n)
                b = self.r.randint(a + 1, n)
                off, n = off + a, b - a
            self.emit("read -P %d %d %d" % (pat, off, n))
            return

    def run(self):
        table = [(30, self.write), (12, self.overwrite), (10, self.zero), (5, self.flush)]
        if self.discard:
            table.append((8, self.do_discard))
        if self.aio:
            table.append((8, self.aio_batch))
        if self.reads:
            table.append((10, self.read_check))
        total = sum(w for w, _ in table)
        while len(self.out) < self.nops:
            x = self.r.uniform(0, total)
            for w, f in table:
                x -= w
                if x <= 0:
                    f()
                    break
        self.emit("flush")
        return self.out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("seed", type=int)
    ap.add_argument("size", type=parse_size)
    ap.add_argument("cluster_size", type=parse_size)
    ap.add_argument("--ops", type=int, default=200)
    ap.add_argument("--no-discard", action="store_true")
    ap.add_argument("--no-aio", action="store_true")
    ap.add_argument("--no-read", action="store_true")
    ap.add_argument("--zero-unmap", action="store_true")
    a = ap.parse_args()
    g = Gen(a.seed, a.size, a.cluster_size, a.ops, not a.no_discard, not a.no_aio, not a.no_read,
            a.zero_unmap)
    print("\n".join(g.run()))


if __name__ == "__main__":
    main()
