#!/usr/bin/env python3
"""Make malformed qcow2 images by patching valid ones made by qemu-img.

Usage:
  mkbad.py open VALID.qcow2 BACKED.qcow2 SMALL.qcow2 OUTDIR
      Images that must be refused at open: OUTDIR/open_<case>.qcow2 for every case in OPEN_CASES.
      BACKED.qcow2 is a valid image with a backing file name (for the backing cases),
      SMALL.qcow2 a valid image with 4 KiB clusters.
  mkbad.py runtime VALID.qcow2 OUTDIR
      Images that open fine but hold one corrupt mapping: OUTDIR/rt_<case>.qcow2.  VALID must be
      the image t_hostile.sh makes (4 KiB clusters, data at 0, 4M, compressed data at 8M).
  mkbad.py overlap VALID.qcow2 SNAP.qcow2 OUTDIR
      Images whose metadata overlaps (refcounts calling a table free, L2/L1/refcount table
      entries naming other tables): OUTDIR/ol_<case>.qcow2, VALID as for runtime; SNAP is VALID
      with an internal snapshot, after which guest offset 0 was written again (so the snapshot
      has an L2 table of its own), for the ol_snap_* cases.
  mkbad.py absurd DIRTY.qcow2 DIRTYSNAP.qcow2 OUTDIR
      Images whose sizes would make a careless repair allocate or write gigabytes:
      OUTDIR/ab_<case>.qcow2.  DIRTY: 512-byte clusters, lazy refcounts, left dirty;
      DIRTYSNAP: the same with an internal snapshot.
  mkbad.py protected IMAGE
      The byte ranges (offset length, one a line) of IMAGE's header, L1 table, refcount table,
      L2 tables, snapshot table and snapshot L1 and L2 tables: no write may ever land there.
Prints the case names made, one a line.
"""
import os
import struct
import sys

QCOW_MAGIC = 0x514649FB
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00


class Image:
    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            self.data = bytearray(f.read())
        h = self.data
        self.cluster_bits = self.u32(20)
        self.cluster_size = 1 << self.cluster_bits
        self.l1_size = self.u32(36)
        self.l1_offset = self.u64(40)
        self.header_length = self.u32(100) if self.u32(4) >= 3 else 72
        assert self.u32(0) == QCOW_MAGIC and len(h) >= self.header_length

    def u32(self, off):
        return struct.unpack_from(">I", self.data, off)[0]

    def u64(self, off):
        return struct.unpack_from(">Q", self.data, off)[0]

    def set32(self, off, v):
        struct.pack_into(">I", self.data, off, v)

    def set64(self, off, v):
        struct.pack_into(">Q", self.data, off, v)

    @property
    def reftable_offset(self):
        return self.u64(48)

    @property
    def refcount_order(self):
        return self.u32(96) if self.u32(4) >= 3 else 4

    def l2_tables(self):
        return [e & L1E_OFFSET_MASK for e in (self.u64(self.l1_entry_pos(i)) for i in range(self.l1_size))
                if e & L1E_OFFSET_MASK]

    def snapshot_l1(self):
        """(offset, entries) of the first snapshot's L1 table."""
        assert self.u32(60) >= 1
        sn = self.u64(64)
        return self.u64(sn), self.u32(sn + 8)

    def snapshot_l2_tables(self):
        off, n = self.snapshot_l1()
        return [e & L1E_OFFSET_MASK for e in (self.u64(off + 8 * i) for i in range(n)) if e & L1E_OFFSET_MASK]

    def set_refcount(self, cluster, value):
        """Set the refcount of host cluster CLUSTER (its refcount block must exist)."""
        bits = 1 << self.refcount_order
        per_block = self.cluster_size * 8 // bits
        block = self.u64(self.reftable_offset + 8 * (cluster // per_block)) & L1E_OFFSET_MASK
        assert block
        idx = cluster % per_block
        if bits >= 8:
            pos = block + idx * bits // 8
            self.data[pos:pos + bits // 8] = value.to_bytes(bits // 8, "big")
        else:
            pos = block + idx * bits // 8
            shift = (idx * bits) % 8
            mask = ((1 << bits) - 1) << shift
            self.data[pos] = (self.data[pos] & ~mask) | ((value << shift) & mask)

    def l1_entry_pos(self, idx):
        return self.l1_offset + 8 * idx

    def l2_entry_pos(self, guest):
        """File position of the L2 entry mapping guest offset GUEST (standard L2)."""
        l2_entries = self.cluster_size // 8
        cl = guest >> self.cluster_bits
        l1 = self.u64(self.l1_entry_pos(cl // l2_entries))
        l2 = l1 & L1E_OFFSET_MASK
        assert l2, "no L2 table for guest offset %d" % guest
        return l2 + 8 * (cl % l2_entries)

    def extensions(self):
        """[(position of the type field, type, length)] of the header extensions."""
        res = []
        pos = self.header_length
        while pos + 8 <= self.cluster_size:
            typ, length = struct.unpack_from(">II", self.data, pos)
            if typ == 0:
                break
            res.append((pos, typ, length))
            pos += 8 + ((length + 7) & ~7)
        return res

    def save(self, path, truncate=None):
        with open(path, "wb") as f:
            f.write(self.data if truncate is None else self.data[:truncate])


# --- images refused at open ------------------------------------------------------------------
def c_truncated_header_only(img, out):
    img.save(out, truncate=img.header_length)           # header, no L1/refcount table


def c_truncated_60_bytes(img, out):
    img.save(out, truncate=60)                          # shorter than the 72-byte v2 header


def c_bad_magic(img, out):
    img.set32(0, 0x514649FA); img.save(out)


def c_version_4(img, out):
    img.set32(4, 4); img.save(out)


def c_version_1(img, out):
    img.set32(4, 1); img.save(out)


def c_cluster_bits_8(img, out):
    img.set32(20, 8); img.save(out)


def c_cluster_bits_22(img, out):
    img.set32(20, 22); img.save(out)


def c_l1_beyond_eof(img, out):
    img.set64(40, (len(img.data) + 100 * img.cluster_size) & ~(img.cluster_size - 1)); img.save(out)


def c_l1_overlaps_header(img, out):
    img.set64(40, 0); img.save(out)


def c_l1_unaligned(img, out):
    img.set64(40, img.l1_offset + 512); img.save(out)


def c_l1_size_absurd(img, out):
    img.set32(36, 1 << 31); img.save(out)


def c_l1_too_small(img, out):
    img.set64(24, 1 << 40); img.save(out)               # 1 TiB virtual size, 1 L1 entry


def c_refcount_table_beyond_eof(img, out):
    img.set64(48, (len(img.data) + 100 * img.cluster_size) & ~(img.cluster_size - 1)); img.save(out)


def c_refcount_table_overlaps_header(img, out):
    img.set64(48, 0); img.save(out)


def c_refcount_table_clusters_absurd(img, out):
    img.set32(56, 1 << 30); img.save(out)


def c_refcount_order_7(img, out):
    img.set32(96, 7); img.save(out)


def c_unknown_incompatible_bit(img, out):
    img.set64(72, img.u64(72) | (1 << 20)); img.save(out)


def c_crypt_method_aes(img, out):
    img.set32(32, 1); img.save(out)


def c_crypt_method_luks_patched(img, out):
    img.set32(32, 2); img.save(out)


def c_external_data_file(img, out):
    img.set64(72, img.u64(72) | (1 << 2)); img.save(out)


def c_unknown_compression_type(img, out):
    img.set64(72, img.u64(72) | (1 << 3)); img.data[104] = 9; img.save(out)


def c_extended_l2_small_clusters(img, out):
    # (made from SMALL) extended L2 needs clusters of at least 16 KiB.
    assert img.cluster_bits < 14
    img.set64(72, img.u64(72) | (1 << 4)); img.save(out)


def c_header_length_short(img, out):
    img.set32(100, 96); img.save(out)


def c_header_length_unaligned(img, out):
    img.set32(100, 108); img.save(out)


def c_header_extension_overrun(img, out):
    pos, typ, length = img.extensions()[0]
    img.set32(pos + 4, img.cluster_size); img.save(out)   # runs past the header cluster


def c_snapshot_table_beyond_eof(img, out):
    img.set32(60, 1)
    img.set64(64, (len(img.data) + 100 * img.cluster_size) & ~(img.cluster_size - 1)); img.save(out)


def c_backing_name_past_cluster(img, out):
    off = img.u64(8)
    assert off
    img.set32(16, img.cluster_size - off + 100); img.save(out)


def c_backing_name_offset_beyond_eof(img, out):
    img.set64(8, len(img.data) + 4 * img.cluster_size); img.save(out)


OPEN_CASES = [(n[2:], f) for n, f in sorted(globals().items()) if n.startswith("c_")]
BACKED_CASES = {"backing_name_past_cluster", "backing_name_offset_beyond_eof"}
SMALL_CASES = {"extended_l2_small_clusters"}


# --- images that open but hold one corrupt mapping -------------------------------------------
RT_DATA_A = 0            # 64 KiB of pattern 1
RT_DATA_B = 4 << 20      # 64 KiB of pattern 3 (another L2 table with 4 KiB clusters)
RT_COMPRESSED = 8 << 20  # compressed clusters of pattern 2


def r_l2_reserved_bits(img, out):
    p = img.l2_entry_pos(RT_DATA_A)
    img.set64(p, img.u64(p) | 0x2); img.save(out)


def r_l2_unaligned_offset(img, out):
    p = img.l2_entry_pos(RT_DATA_A)
    img.set64(p, img.u64(p) + 512); img.save(out)


def r_l2_offset_beyond_eof(img, out):
    p = img.l2_entry_pos(RT_DATA_A)
    img.set64(p, OFLAG_COPIED | (1 << 40)); img.save(out)


def r_l1_beyond_eof(img, out):
    l2_entries = img.cluster_size // 8
    idx = (RT_DATA_A >> img.cluster_bits) // l2_entries
    img.set64(img.l1_entry_pos(idx), OFLAG_COPIED | (1 << 40)); img.save(out)


def r_l1_reserved_bits(img, out):
    l2_entries = img.cluster_size // 8
    idx = (RT_DATA_A >> img.cluster_bits) // l2_entries
    p = img.l1_entry_pos(idx)
    img.set64(p, img.u64(p) | 0x4); img.save(out)


def r_compressed_past_eof(img, out):
    p = img.l2_entry_pos(RT_COMPRESSED)
    e = img.u64(p)
    assert e & OFLAG_COMPRESSED
    x = 62 - (img.cluster_bits - 8)
    sectors = e & ((1 << 62) - 1) & ~((1 << x) - 1)
    beyond = len(img.data) + (1 << 20) + 100
    img.set64(p, OFLAG_COMPRESSED | sectors | beyond); img.save(out)


RUNTIME_CASES = [(n[2:], f) for n, f in sorted(globals().items()) if n.startswith("r_")]


# --- metadata that overlaps other metadata -----------------------------------------------------
# Same VALID as runtime.  A write to guest offset OL_NEW (no L2 table there yet) allocates a new
# L2 table and a data cluster; a write to RT_DATA_A rewrites a mapped cluster in place.
def _refcount_zero(img, out, off):
    img.set_refcount(off >> img.cluster_bits, 0); img.save(out)


def o_refcount_frees_header(img, out):
    _refcount_zero(img, out, 0)


def o_refcount_frees_l1(img, out):
    _refcount_zero(img, out, img.l1_offset)


def o_refcount_frees_reftable(img, out):
    _refcount_zero(img, out, img.reftable_offset)


def o_refcount_frees_refblock(img, out):
    _refcount_zero(img, out, img.u64(img.reftable_offset) & L1E_OFFSET_MASK)


def o_refcount_frees_l2(img, out):
    _refcount_zero(img, out, img.l2_tables()[-1])


def _l2_points_at(img, out, target):
    p = img.l2_entry_pos(RT_DATA_A)
    img.set64(p, OFLAG_COPIED | target); img.save(out)


def o_l2_points_at_l1(img, out):
    _l2_points_at(img, out, img.l1_offset)


def o_l2_points_at_reftable(img, out):
    _l2_points_at(img, out, img.reftable_offset)


def o_l2_points_at_refblock(img, out):
    _l2_points_at(img, out, img.u64(img.reftable_offset) & L1E_OFFSET_MASK)


def o_l2_points_at_other_l2(img, out):
    _l2_points_at(img, out, img.l2_tables()[1])


def o_l2_points_at_own_l2(img, out):
    _l2_points_at(img, out, img.l2_tables()[0])


def _l1_points_at(img, out, target):
    img.set64(img.l1_entry_pos(0), OFLAG_COPIED | target); img.save(out)


def o_l1_points_at_l1(img, out):
    _l1_points_at(img, out, img.l1_offset)


def o_l1_points_at_reftable(img, out):
    _l1_points_at(img, out, img.reftable_offset)


def _reftable_points_at(img, out, target):
    img.set64(img.reftable_offset, target); img.save(out)


def o_reftable_points_at_itself(img, out):
    _reftable_points_at(img, out, img.reftable_offset)


def o_reftable_points_at_l1(img, out):
    _reftable_points_at(img, out, img.l1_offset)


def o_reftable_points_at_l2(img, out):
    _reftable_points_at(img, out, img.l2_tables()[0])


def o_snap_l2_points_at_snapshot_l1(img, out):
    _l2_points_at(img, out, img.snapshot_l1()[0])


def o_snap_l2_points_at_snapshot_table(img, out):
    _l2_points_at(img, out, img.u64(64))


def o_snap_refcount_frees_snapshot_l2(img, out):
    only = [t for t in img.snapshot_l2_tables() if t not in img.l2_tables()]
    assert only, "the snapshot has no L2 table of its own"
    _refcount_zero(img, out, only[0])


OVERLAP_CASES = [(n[2:], f) for n, f in sorted(globals().items()) if n.startswith("o_")]


# --- absurd sizes ----------------------------------------------------------------------------
def a_sparse_dirty(img, out):
    # A few KiB of metadata in a 64 GiB sparse file: the refcount repair on open must cost what
    # is in use, not what the file's size suggests.
    img.save(out)
    with open(out, "r+b") as f:
        f.truncate(64 << 30)


def a_snapshot_l1_bomb(img, out):
    # 65536 snapshots whose 32 KiB L1 tables all lie on the same bytes (a copy of the real
    # snapshot's L1, then zeros): 2 GiB of L1 tables to read, and their L2 tables to count
    # 65536 times, for a file of 5 MiB.
    cs = img.cluster_size
    sn = img.u64(64)
    l1off, l1size = img.u64(sn), img.u32(sn + 8)
    extra = img.u32(sn + 36)
    idlen, namelen = struct.unpack_from(">HH", img.data, sn + 12)
    length = 40 + extra + idlen + namelen
    end = (len(img.data) + cs - 1) // cs * cs
    img.data += bytes(end - len(img.data))
    newl1 = end
    img.data += img.data[l1off:l1off + 8 * l1size] + bytes(32768 - 8 * l1size)
    entry = bytearray(img.data[sn:sn + length])
    struct.pack_into(">QI", entry, 0, newl1, 4096)         # l1_size: 32 KiB
    entry += bytes(-len(entry) % 8)
    table = newl1 + 32768
    img.data += bytes(entry) * 65536
    img.set32(60, 65536)
    img.set64(64, table)
    img.save(out)


ABSURD_CASES = [(n[2:], f) for n, f in sorted(globals().items()) if n.startswith("a_")]


def protected_ranges(img):
    cs = img.cluster_size
    res = [(0, cs), (img.l1_offset, img.l1_size * 8), (img.reftable_offset, img.u32(56) * cs)]
    res += [(t, cs) for t in img.l2_tables()]
    if img.u32(60):
        res.append((img.u64(64), cs))
        off, n = img.snapshot_l1()
        res.append((off, 8 * n))
        res += [(t, cs) for t in img.snapshot_l2_tables()]
    return res


def main():
    if len(sys.argv) == 6 and sys.argv[1] == "open":
        valid, backed, small, outdir = sys.argv[2:]
        for name, fn in OPEN_CASES:
            src = backed if name in BACKED_CASES else small if name in SMALL_CASES else valid
            fn(Image(src), os.path.join(outdir, "open_" + name + ".qcow2"))
            print(name)
    elif len(sys.argv) == 4 and sys.argv[1] == "runtime":
        valid, outdir = sys.argv[2:]
        for name, fn in RUNTIME_CASES:
            fn(Image(valid), os.path.join(outdir, "rt_" + name + ".qcow2"))
            print(name)
    elif len(sys.argv) == 5 and sys.argv[1] == "overlap":
        valid, snap, outdir = sys.argv[2:]
        for name, fn in OVERLAP_CASES:
            fn(Image(snap if name.startswith("snap_") else valid), os.path.join(outdir, "ol_" + name + ".qcow2"))
            print(name)
    elif len(sys.argv) == 5 and sys.argv[1] == "absurd":
        dirty, dirtysnap, outdir = sys.argv[2:]
        for name, fn in ABSURD_CASES:
            fn(Image(dirtysnap if "snapshot" in name else dirty), os.path.join(outdir, "ab_" + name + ".qcow2"))
            print(name)
    elif len(sys.argv) == 3 and sys.argv[1] == "protected":
        for off, length in protected_ranges(Image(sys.argv[2])):
            print(off, length)
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
