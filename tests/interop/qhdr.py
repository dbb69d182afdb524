"""Helpers for the interop tests' hand-made qcow2 images (imported by their inline scripts,
PYTHONPATH set by common.sh)."""
import struct


def extensions(h):
    """(offset, type, length) of each header extension in the header bytes h, up to the end
    marker."""
    off = struct.unpack(">I", h[100:104])[0]
    out = []
    while off + 8 <= len(h):
        t, n = struct.unpack(">II", h[off:off + 8])
        if t == 0:
            break
        out.append((off, t, n))
        off += 8 + (n + 7) // 8 * 8
    return out


def find_extension(h, etype):
    """Offset of the first extension of type etype in h (its 8-byte type/length head)."""
    for off, t, _ in extensions(h):
        if t == etype:
            return off
    raise SystemExit("no header extension 0x%08x" % etype)


LUKS_EXT = 0x0537be77


def luks_header_offset(h):
    """Where the LUKS header of an encrypted image lies (its header extension's pointer)."""
    off = find_extension(h, LUKS_EXT)
    return struct.unpack(">Q", h[off + 8:off + 16])[0]
