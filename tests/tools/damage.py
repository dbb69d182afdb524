#!/usr/bin/env python3
"""Damage qcow2 images the way t_check.sh needs: one kind of metadata damage per case.

Usage: damage.py CASE IN.qcow2 OUT.qcow2
Prints the guest byte ranges whose content the damage changes ("guest OFF LEN" lines), so the
test can compare everything else with the undamaged image.  Cases are listed by `damage.py list`.

IN must be an image made by t_check.sh (qemu-img/qemu-io): clusters of 64 KiB or less, data at
guest 0..1M, a cluster freed by a discard inside the file, compressed data at 4M, a preallocated
zero cluster at 5M, and for the snapshot cases one internal snapshot.
"""
import struct
import sys

COPIED = 1 << 63
COMPRESSED = 1 << 62
ZERO = 1
OFF_MASK = 0x00FFFFFFFFFFFE00


class Image:
    def __init__(self, path):
        with open(path, "rb") as f:
            self.d = bytearray(f.read())
        self.version = self.u32(4)
        self.cb = self.u32(20)
        self.cs = 1 << self.cb
        self.size = self.u64(24)
        self.l1_size = self.u32(36)
        self.l1_off = self.u64(40)
        self.rt_off = self.u64(48)
        self.rt_clusters = self.u32(56)
        self.nb_snap = self.u32(60)
        self.snap_off = self.u64(64)
        self.rorder = self.u32(96) if self.version >= 3 else 4
        self.rbits = 1 << self.rorder
        self.changed = []

    def u32(self, o): return struct.unpack_from(">I", self.d, o)[0]
    def u64(self, o): return struct.unpack_from(">Q", self.d, o)[0]
    def s32(self, o, v): struct.pack_into(">I", self.d, o, v)
    def s64(self, o, v): struct.pack_into(">Q", self.d, o, v)

    def l2_pos(self, guest):
        """File position of the L2 entry for GUEST (standard 8-byte entries)."""
        cl = guest >> self.cb
        per = self.cs // 8
        l2 = self.u64(self.l1_off + 8 * (cl // per)) & OFF_MASK
        assert l2, "no L2 table for guest offset %#x" % guest
        return l2 + 8 * (cl % per)

    def l2e(self, guest): return self.u64(self.l2_pos(guest))
    def set_l2e(self, guest, v): self.s64(self.l2_pos(guest), v)

    def rc_pos(self, cluster):
        """Bit position of CLUSTER's refcount in the file (big-endian fields of 8+ bits;
        narrower ones packed from the least significant bit of each byte)."""
        per = self.cs * 8 // self.rbits
        blk = self.u64(self.rt_off + 8 * (cluster // per)) & ~0x1FF
        assert blk, "no refcount block for cluster %d" % cluster
        return blk * 8 + (cluster % per) * self.rbits

    def refcount(self, c):
        bit = self.rc_pos(c)
        if self.rbits >= 8:
            return int.from_bytes(self.d[bit // 8:bit // 8 + self.rbits // 8], "big")
        return (self.d[bit // 8] >> (bit % 8)) & ((1 << self.rbits) - 1)

    def set_refcount(self, c, v):
        bit = self.rc_pos(c)
        if self.rbits >= 8:
            self.d[bit // 8:bit // 8 + self.rbits // 8] = v.to_bytes(self.rbits // 8, "big")
        else:
            mask = ((1 << self.rbits) - 1) << (bit % 8)
            self.d[bit // 8] = (self.d[bit // 8] & ~mask) | ((v << (bit % 8)) & mask)

    def free_cluster_inside(self):
        """A cluster inside the file with refcount 0 (the discarded one)."""
        for c in range(len(self.d) // self.cs - 1, 0, -1):
            if self.refcount(c) == 0:
                return c
        raise SystemExit("no free cluster inside the file")

    def guest(self, off, length):
        self.changed.append((off, length))

    def save(self, path):
        with open(path, "wb") as f:
            f.write(self.d)


# --- refcounts ---------------------------------------------------------------------------
def leaked_cluster(img):
    """One cluster past the end of the file counted as in use (a leak)."""
    c = len(img.d) // img.cs
    img.d += bytes(img.cs)
    img.set_refcount(c, 1)


def refcount_too_high(img):
    c = (img.l2e(0) & OFF_MASK) // img.cs
    img.set_refcount(c, 2)


def refcount_too_low(img):
    """Two L2 entries name one data cluster whose refcount is 1."""
    img.set_l2e(img.cs, img.l2e(0))
    img.guest(img.cs, img.cs)


def refcount_zero(img):
    c = (img.l2e(0) & OFF_MASK) // img.cs
    img.set_refcount(c, 0)


def l2_to_free_cluster(img):
    """An L2 entry names a free cluster inside the file."""
    c = img.free_cluster_inside()
    img.set_l2e(2 * img.cs, COPIED | (c * img.cs))
    img.guest(2 * img.cs, img.cs)


def l2_past_eof(img):
    """An L2 entry names a cluster past the end of the file."""
    end = (len(img.d) + img.cs - 1) // img.cs + 3
    img.set_l2e(3 * img.cs, COPIED | (end * img.cs))
    img.guest(3 * img.cs, img.cs)


def l2_to_l1_table(img):
    """An L2 entry overlaps metadata: it names the L1 table's cluster."""
    img.set_l2e(4 * img.cs, COPIED | img.l1_off)
    img.guest(4 * img.cs, img.cs)


def copied_clear_l2(img):
    img.set_l2e(0, img.l2e(0) & ~COPIED)


def copied_set_shared(img):
    """COPIED on an entry whose cluster a snapshot shares (refcount 2)."""
    img.set_l2e(0, img.l2e(0) | COPIED)


def copied_clear_l1(img):
    img.s64(img.l1_off, img.u64(img.l1_off) & ~COPIED)


def copied_compressed(img):
    img.set_l2e(4 << 20, img.l2e(4 << 20) | COPIED)


def l1_reserved_bits(img):
    img.s64(img.l1_off, img.u64(img.l1_off) | (1 << 58))


def l2_reserved_bits(img):
    img.set_l2e(0, img.l2e(0) | (1 << 57))


def l2_unaligned_data(img):
    img.set_l2e(0, img.l2e(0) + 0x200)
    img.guest(0, img.cs)


def l2_unaligned_zero(img):
    """A preallocated zero cluster whose offset is not cluster aligned."""
    e = img.l2e(5 << 20)
    assert e & ZERO and e & OFF_MASK, "no preallocated zero cluster at 5M"
    img.set_l2e(5 << 20, e + 0x200)


def reftable_past_eof(img):
    """A refcount table entry names a block past the end of the file."""
    img.s64(img.rt_off + 8, ((len(img.d) + img.cs - 1) // img.cs + 10) * img.cs)


def reftable_unaligned(img):
    img.s64(img.rt_off, img.u64(img.rt_off) + 0x200)


def corrupt_bit(img):
    """Marked corrupt, but consistent."""
    img.s64(72, img.u64(72) | 2)


# --- snapshot table ---------------------------------------------------------------------
def snapshot_entries(img):
    """[(position, fixed fields, extra, id, name)] of the snapshot table."""
    res, pos = [], img.snap_off
    for _ in range(img.nb_snap):
        pos = (pos + 7) & ~7
        l1o, l1s, idl, nml, ds, dn, vmc, vms, exl = struct.unpack_from(">QIHHIIQII", img.d, pos)
        p = pos + 40
        extra = bytes(img.d[p:p + exl]); p += exl
        sid = bytes(img.d[p:p + idl]); p += idl
        name = bytes(img.d[p:p + nml]); p += nml
        res.append([pos, [l1o, l1s, ds, dn, vmc, vms], extra, sid, name])
        pos = p
    return res


def write_snapshot_entries(img, entries):
    """Rewrite the table in place (it must still fit in its cluster)."""
    pos = img.snap_off
    end = pos + img.cs
    img.d[pos:end] = bytes(img.cs)
    for _, (l1o, l1s, ds, dn, vmc, vms), extra, sid, name in entries:
        pos = (pos + 7) & ~7
        struct.pack_into(">QIHHIIQII", img.d, pos, l1o, l1s, len(sid), len(name), ds, dn, vmc, vms, len(extra))
        p = pos + 40
        img.d[p:p + len(extra)] = extra; p += len(extra)
        img.d[p:p + len(sid)] = sid; p += len(sid)
        img.d[p:p + len(name)] = name; p += len(name)
        assert p <= end
        pos = p


def snapshot_incomplete(img):
    """A v3 snapshot entry without the 16 bytes of extra data v3 requires."""
    e = snapshot_entries(img)
    e[0][2] = b""
    write_snapshot_entries(img, e)


def snapshot_extra_too_large(img):
    """More extra data than QEMU accepts (1024 bytes)."""
    e = snapshot_entries(img)
    e[0][2] = e[0][2] + bytes(2000)
    write_snapshot_entries(img, e)


def snapshot_l1_unaligned(img):
    e = snapshot_entries(img)
    e[0][1][0] += 0x200
    write_snapshot_entries(img, e)


CASES = {f.__name__: f for f in [
    leaked_cluster, refcount_too_high, refcount_too_low, refcount_zero, l2_to_free_cluster,
    l2_past_eof, l2_to_l1_table, copied_clear_l2, copied_set_shared, copied_clear_l1,
    copied_compressed, l1_reserved_bits, l2_reserved_bits, l2_unaligned_data, l2_unaligned_zero,
    reftable_past_eof, reftable_unaligned, corrupt_bit, snapshot_incomplete,
    snapshot_extra_too_large, snapshot_l1_unaligned,
]}


def main():
    if len(sys.argv) == 2 and sys.argv[1] == "list":
        print("\n".join(CASES))
        return
    if len(sys.argv) != 4 or sys.argv[1] not in CASES:
        sys.exit("usage: damage.py CASE IN OUT | damage.py list")
    img = Image(sys.argv[2])
    CASES[sys.argv[1]](img)
    img.save(sys.argv[3])
    for off, length in img.changed:
        print("guest %d %d" % (off, length))


if __name__ == "__main__":
    main()
