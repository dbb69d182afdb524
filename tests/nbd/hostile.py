#!/usr/bin/env python3
"""Protocol-level NBD tests: malformed and hostile clients, edge cases.

usage: hostile.py SUFFIX RW_SOCKET RO_SOCKET SIZE

With HOSTILE_TLS_CA=CA-CERT-FILE in the environment every connection that
gets past the greeting upgrades to TLS first (NBD_OPT_STARTTLS), so the same
scenarios run inside TLS against a server started with --tls require.

Prints one "ok NAME" / "not ok NAME: reason" line per scenario (NAME gets
SUFFIX appended).  After every scenario a fresh, well-behaved client must
still be served, so a scenario also fails if the server died or hung.
"""
import os
import socket
import ssl
import struct
import sys
import threading
import traceback

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x3E889045565A9
REQMAGIC = 0x25609513
SIMPLEMAGIC = 0x67446698

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_INFO, OPT_GO, OPT_STRUCTURED = 1, 2, 3, 6, 7, 8
REP_ACK, REP_SERVER, REP_INFO = 1, 2, 3
ERR_UNSUP, ERR_INVALID, ERR_UNKNOWN = (1 << 31) + 1, (1 << 31) + 3, (1 << 31) + 6
INFO_EXPORT, INFO_NAME, INFO_DESC, INFO_BLOCK = 0, 1, 2, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WZ, CMD_BS = range(8)
F_FUA, F_NO_HOLE, F_DF = 1, 2, 4
EPERM, EINVAL, ENOSPC = 1, 22, 28
FLAG_READ_ONLY = 2

TIMEOUT = 20
TLS_CA = os.environ.get("HOSTILE_TLS_CA")


class Fail(Exception):
    pass


def check(cond, msg):
    if not cond:
        raise Fail(msg)


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(path)
    return s


def recvn(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError("server closed the connection")
        buf += chunk
    return buf


def expect_closed(s, what):
    """The server must hard-disconnect (EOF or reset) without sending more."""
    try:
        extra = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            extra += chunk
        check(not extra, "%s: unexpected %d bytes before close" % (what, len(extra)))
    except (ConnectionResetError, ssl.SSLError):
        pass    # (a TLS peer that closes without close_notify)
    except socket.timeout:
        raise Fail("%s: server did not close the connection" % what)


def greet(s, cflags=3):
    magic, opt, hflags = struct.unpack(">QQH", recvn(s, 18))
    check(magic == NBDMAGIC and opt == IHAVEOPT, "bad greeting")
    check(hflags & 1, "FIXED_NEWSTYLE not offered")
    s.sendall(struct.pack(">I", cflags))
    if TLS_CA and cflags & ~3 == 0:
        s = starttls(s)
    return s


def starttls(s):
    """NBD_OPT_STARTTLS, then the TLS handshake; returns the TLS socket."""
    send_opt(s, 5)
    opt, typ, _ = recv_rep(s)
    check(opt == 5 and typ == REP_ACK, "STARTTLS answered %#x" % typ)
    ctx = ssl.create_default_context(cafile=TLS_CA)
    ctx.check_hostname = False
    t = ctx.wrap_socket(s)
    t.settimeout(TIMEOUT)
    return t


def send_opt(s, opt, data=b""):
    s.sendall(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def recv_rep(s):
    magic, opt, typ, ln = struct.unpack(">QIII", recvn(s, 20))
    check(magic == REPMAGIC, "bad option reply magic %#x" % magic)
    return opt, typ, recvn(s, ln)


def info_data(name=b"", infos=(INFO_BLOCK,)):
    return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
            + b"".join(struct.pack(">H", i) for i in infos))


def go(s, name=b"", infos=(INFO_BLOCK,), opt=OPT_GO):
    """Returns (error or None, {info type: payload})."""
    send_opt(s, opt, info_data(name, infos))
    items = {}
    while True:
        ropt, typ, data = recv_rep(s)
        check(ropt == opt, "reply for option %d, expected %d" % (ropt, opt))
        if typ == REP_INFO:
            items[struct.unpack(">H", data[:2])[0]] = data[2:]
        elif typ == REP_ACK:
            return None, items
        else:
            return typ, items


def open_export(path, infos=(INFO_BLOCK,)):
    s = connect(path)
    s = greet(s)
    err, items = go(s, infos=infos)
    check(err is None, "GO failed with %#x" % (err or 0))
    size, flags = struct.unpack(">QH", items[INFO_EXPORT])
    return s, size, flags


def request(s, typ, off, length, flags=0, cookie=1, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQMAGIC, flags, typ, cookie, off, length) + payload)


def reply(s, readlen=0):
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    check(magic == SIMPLEMAGIC, "bad reply magic %#x" % magic)
    data = recvn(s, readlen) if err == 0 and readlen else b""
    return err, cookie, data


def cmd(s, typ, off, length, flags=0, payload=b"", readlen=0, cookie=7):
    request(s, typ, off, length, flags, cookie, payload)
    err, c, data = reply(s, readlen)
    check(c == cookie, "reply cookie %d, expected %d" % (c, cookie))
    return err, data


# ---- scenarios -----------------------------------------------------------------

def t_bad_option_magic(ctx):
    s = connect(ctx.rw)
    s = greet(s)
    s.sendall(struct.pack(">QII", 0x1122334455667788, OPT_GO, 0))
    expect_closed(s, "bad option magic")


def t_unknown_client_flags(ctx):
    s = connect(ctx.rw)
    s = greet(s, cflags=0x80)
    expect_closed(s, "unknown client flags")


def t_garbage_handshake(ctx):
    s = connect(ctx.rw)
    recvn(s, 18)
    s.sendall(os.urandom(4096))
    expect_closed(s, "garbage")


def t_unknown_option(ctx):
    s = connect(ctx.rw)
    s = greet(s)
    send_opt(s, 999, b"xyz")
    _, typ, _ = recv_rep(s)
    check(typ == ERR_UNSUP, "unknown option answered %#x" % typ)
    send_opt(s, OPT_STRUCTURED)
    _, typ, _ = recv_rep(s)
    check(typ == ERR_UNSUP, "structured reply answered %#x" % typ)
    err, _ = go(s)
    check(err is None, "GO after unknown options failed")
    err, data = cmd(s, CMD_READ, 0, 512, readlen=512)
    check(err == 0, "read failed %d" % err)


def t_list(ctx):
    s = connect(ctx.rw)
    s = greet(s)
    send_opt(s, OPT_LIST)
    _, typ, data = recv_rep(s)
    check(typ == REP_SERVER and data == struct.pack(">I", 0), "LIST entry %#x %r" % (typ, data))
    _, typ, _ = recv_rep(s)
    check(typ == REP_ACK, "LIST not terminated by ACK")
    send_opt(s, OPT_LIST, b"junk")
    _, typ, _ = recv_rep(s)
    check(typ == ERR_INVALID, "LIST with data answered %#x" % typ)
    send_opt(s, OPT_ABORT)
    _, typ, _ = recv_rep(s)
    check(typ == REP_ACK, "ABORT not acknowledged")
    expect_closed(s, "after ABORT")


def t_info(ctx):
    s = connect(ctx.rw)
    s = greet(s)
    err, items = go(s, infos=(INFO_NAME, INFO_DESC, INFO_BLOCK), opt=OPT_INFO)
    check(err is None, "INFO failed %#x" % (err or 0))
    size, flags = struct.unpack(">QH", items[INFO_EXPORT])
    check(size == ctx.size, "INFO size %d" % size)
    check(items.get(INFO_NAME) == b"", "INFO_NAME %r" % items.get(INFO_NAME))
    check(INFO_DESC in items, "no description")
    check(struct.unpack(">III", items[INFO_BLOCK]) == (512, 4096, 32 << 20), "block sizes")
    # Inconsistent lengths.
    send_opt(s, OPT_INFO, struct.pack(">I", 100) + b"ab")
    _, typ, _ = recv_rep(s)
    check(typ == ERR_INVALID, "bad name length answered %#x" % typ)
    send_opt(s, OPT_GO, info_data() + b"\0")
    _, typ, _ = recv_rep(s)
    check(typ == ERR_INVALID, "trailing byte answered %#x" % typ)
    send_opt(s, OPT_GO, b"\0")
    _, typ, _ = recv_rep(s)
    check(typ == ERR_INVALID, "short GO answered %#x" % typ)
    err, _ = go(s, name=b"nope")
    check(err == ERR_UNKNOWN, "unknown export answered %#x" % (err or 0))
    err, _ = go(s)
    check(err is None, "GO after errors failed")


def t_huge_option(ctx):
    s = connect(ctx.rw)
    s = greet(s)
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, 1 << 30))
    expect_closed(s, "1 GiB option")


def t_export_name(ctx):
    s = connect(ctx.rw)
    s = greet(s)
    send_opt(s, OPT_EXPORT_NAME, b"nope")
    expect_closed(s, "unknown EXPORT_NAME")
    for cflags, extra in ((3, 0), (1, 124)):
        s = connect(ctx.rw)
        s = greet(s, cflags)
        send_opt(s, OPT_EXPORT_NAME, b"")
        size, flags = struct.unpack(">QH", recvn(s, 10))
        check(size == ctx.size, "EXPORT_NAME size %d" % size)
        check(recvn(s, extra) == bytes(extra), "zero padding")
        err, _ = cmd(s, CMD_READ, 0, 4096, readlen=4096)
        check(err == 0, "read after EXPORT_NAME failed")
        request(s, CMD_DISC, 0, 0)
        expect_closed(s, "after DISC")


def t_bad_request_magic(ctx):
    s, _, _ = open_export(ctx.rw)
    s.sendall(struct.pack(">IHHQQI", 0xDEADBEEF, 0, CMD_READ, 1, 0, 512))
    expect_closed(s, "bad request magic")


def t_huge_write(ctx):
    s, _, _ = open_export(ctx.rw)
    request(s, CMD_WRITE, 0, 0xFFFFFFFF)
    expect_closed(s, "4 GiB write")


def t_truncated_header(ctx):
    s, _, _ = open_export(ctx.rw)
    s.sendall(struct.pack(">IHH", REQMAGIC, 0, CMD_READ))
    s.close()


def t_mid_payload_close(ctx):
    s, _, _ = open_export(ctx.rw)
    request(s, CMD_WRITE, 0, 1 << 20, payload=b"\xee" * 1000)
    s.close()
    # The partial write must not have reached the image.
    s, _, _ = open_export(ctx.rw)
    err, data = cmd(s, CMD_READ, 0, 1024, readlen=1024)
    check(err == 0, "read failed %d" % err)
    check(data[:1000] != b"\xee" * 1000, "partial payload was written")


def t_past_end(ctx):
    s, size, _ = open_export(ctx.rw)
    checks = [
        ("read at end", CMD_READ, size, 512, EINVAL, b""),
        ("read across end", CMD_READ, size - 512, 1024, EINVAL, b""),
        ("read offset overflow", CMD_READ, (1 << 64) - 512, 1024, EINVAL, b""),
        ("write at end", CMD_WRITE, size, 512, ENOSPC, b"x" * 512),
        ("write across end", CMD_WRITE, size - 512, 1024, ENOSPC, b"x" * 1024),
        ("trim past end", CMD_TRIM, size, 4096, ENOSPC, b""),
        ("zeroes past end", CMD_WZ, size - 4096, 8192, ENOSPC, b""),
        ("read too large", CMD_READ, 0, 64 << 20, EINVAL, b""),
    ]
    for what, typ, off, ln, want, payload in checks:
        err, _ = cmd(s, typ, off, ln, payload=payload)
        check(err == want, "%s: error %d, expected %d" % (what, err, want))
    err, _ = cmd(s, CMD_READ, size - 512, 512, readlen=512)
    check(err == 0, "last sector unreadable")


def t_unknown_command(ctx):
    s, _, _ = open_export(ctx.rw)
    for typ in (42, CMD_CACHE, CMD_BS, 0xFFFF):
        err, _ = cmd(s, typ, 0, 512)
        check(err == EINVAL, "command %d answered %d" % (typ, err))
    err, _ = cmd(s, CMD_READ, 0, 512, flags=F_NO_HOLE)
    check(err == EINVAL, "read with NO_HOLE answered %d" % err)
    err, _ = cmd(s, CMD_READ, 0, 512, flags=F_DF)
    check(err == EINVAL, "read with DF (not negotiated) answered %d" % err)
    # A rejected write still has its payload consumed.
    err, _ = cmd(s, CMD_WRITE, 0, 512, flags=F_DF, payload=b"q" * 512)
    check(err == EINVAL, "write with DF answered %d" % err)
    err, data = cmd(s, CMD_READ, 0, 512, readlen=512)
    check(err == 0 and data != b"q" * 512, "stream out of sync or bad write applied")


def t_zero_length(ctx):
    s, _, _ = open_export(ctx.rw)
    for typ in (CMD_READ, CMD_WRITE, CMD_TRIM, CMD_WZ):
        err, _ = cmd(s, typ, 4096, 0)
        check(err == 0, "zero-length command %d answered %d" % (typ, err))
    err, _ = cmd(s, CMD_FLUSH, 0, 0, flags=F_FUA)
    check(err == 0, "flush with FUA answered %d" % err)


def t_strict_alignment(ctx):
    s, _, _ = open_export(ctx.rw, infos=(INFO_BLOCK,))
    err, _ = cmd(s, CMD_READ, 1, 512)
    check(err == EINVAL, "misaligned read answered %d" % err)
    err, _ = cmd(s, CMD_WRITE, 512, 100, payload=b"z" * 100)
    check(err == EINVAL, "misaligned write answered %d" % err)
    err, data = cmd(s, CMD_READ, 512, 512, readlen=512)
    check(err == 0 and b"z" * 100 not in data, "misaligned write was applied")


def t_rmw(ctx):
    """A client that never asked for block sizes gets byte-granular I/O."""
    s, _, _ = open_export(ctx.rw, infos=())
    base = 1 << 20
    err, _ = cmd(s, CMD_WRITE, base, 8192, payload=b"\x11" * 8192)
    check(err == 0, "aligned write failed")
    err, _ = cmd(s, CMD_WRITE, base + 1000, 100, payload=b"\x22" * 100, flags=F_FUA)
    check(err == 0, "unaligned write failed %d" % err)
    err, _ = cmd(s, CMD_WRITE, base + 510, 1030, payload=b"\x33" * 1030)
    check(err == 0, "write across sectors failed %d" % err)
    err, _ = cmd(s, CMD_WZ, base + 3000, 2200)
    check(err == 0, "unaligned write zeroes failed %d" % err)
    err, _ = cmd(s, CMD_WZ, base + 6000, 10)
    check(err == 0, "tiny write zeroes failed %d" % err)
    err, _ = cmd(s, CMD_TRIM, base + 7777, 13)
    check(err == 0, "tiny trim failed %d" % err)
    expect = bytearray(b"\x11" * 8192)
    expect[1000:1100] = b"\x22" * 100
    expect[510:1540] = b"\x33" * 1030
    expect[3000:5200] = bytes(2200)
    expect[6000:6010] = bytes(10)
    err, data = cmd(s, CMD_READ, base, 8192, readlen=8192)
    check(err == 0 and data == bytes(expect), "RMW result differs")
    err, data = cmd(s, CMD_READ, base + 999, 103, readlen=103)
    check(err == 0 and data == bytes(expect[999:1102]), "unaligned read differs")


def t_read_only(ctx):
    s, size, flags = open_export(ctx.ro)
    check(flags & FLAG_READ_ONLY, "READ_ONLY flag missing")
    for typ, payload in ((CMD_WRITE, b"w" * 512), (CMD_TRIM, b""), (CMD_WZ, b"")):
        err, _ = cmd(s, typ, 0, 512, payload=payload)
        check(err == EPERM, "command %d on read-only export answered %d" % (typ, err))
    err, _ = cmd(s, CMD_READ, 0, 512, readlen=512)
    check(err == 0, "read on read-only export failed")
    err, _ = cmd(s, CMD_FLUSH, 0, 0)
    check(err == 0, "flush on read-only export failed")


def t_pipelined(ctx):
    """1000 requests sent without waiting: all answered exactly once."""
    s, _, _ = open_export(ctx.rw)
    n = 1000
    reqs = b"".join(
        struct.pack(">IHHQQI", REQMAGIC, 0, CMD_WRITE if i % 4 == 0 else CMD_READ, i,
                    (i % 64) * 65536, 65536) + (bytes([i % 251]) * 65536 if i % 4 == 0 else b"")
        for i in range(n))
    seen = set()
    if TLS_CA:
        # One TLS socket must not be written and read by two threads at
        # once: send in slices of 100 requests and read their replies.
        step = len(reqs) // 10
        sender = None
    else:
        sender = threading.Thread(target=s.sendall, args=(reqs,))
        sender.start()
    for i in range(n):
        if sender is None and i % 100 == 0:
            s.sendall(reqs[(i // 100) * step:(i // 100 + 1) * step])
        magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
        check(magic == SIMPLEMAGIC and err == 0, "reply %d: magic %#x err %d" % (cookie, magic, err))
        check(cookie not in seen and cookie < n, "duplicate or unknown cookie %d" % cookie)
        seen.add(cookie)
        if cookie % 4:
            recvn(s, 65536)
    if sender:
        sender.join(TIMEOUT)
    check(len(seen) == n, "%d replies" % len(seen))


def t_disc_inflight(ctx):
    s, _, _ = open_export(ctx.rw)
    data = os.urandom(65536)
    request(s, CMD_WRITE, 2 << 20, len(data), cookie=5, payload=data)
    request(s, CMD_DISC, 0, 0)
    err, cookie, _ = reply(s)
    check(err == 0 and cookie == 5, "write before DISC not answered")
    expect_closed(s, "after DISC")
    s, _, _ = open_export(ctx.rw)
    err, back = cmd(s, CMD_READ, 2 << 20, len(data), readlen=len(data))
    check(err == 0 and back == data, "write before DISC lost")


def t_many_connections(ctx):
    socks = []
    for _ in range(64):
        s = connect(ctx.rw)
        s = greet(s)
        socks.append(s)
    for s in socks[::2]:
        err, _ = go(s)
        check(err is None, "GO failed")
    for s in socks:
        s.close()


def alive(ctx):
    s, size, _ = open_export(ctx.rw)
    check(size == ctx.size, "size %d" % size)
    err, _ = cmd(s, CMD_READ, 0, 4096, readlen=4096)
    check(err == 0, "read failed")
    request(s, CMD_DISC, 0, 0)
    s.close()


class Ctx:
    pass


def main():
    suffix, rw, ro, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    ctx = Ctx()
    ctx.rw, ctx.ro, ctx.size = rw, ro, size
    failed = 0
    tests = [(k, v) for k, v in globals().items() if k.startswith("t_") and callable(v)]
    for name, fn in tests:
        label = "nbd_hostile_%s_%s" % (name[2:], suffix)
        try:
            fn(ctx)
            alive(ctx)
            print("ok %s" % label)
        except (Fail, EOFError, OSError, struct.error, KeyError) as e:
            failed += 1
            where = traceback.extract_tb(e.__traceback__)[-1].lineno
            print("not ok %s: %s (line %d)" % (label, e, where))
        sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
