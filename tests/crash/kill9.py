#!/usr/bin/env python3
"""An NBD client for kill -9 rounds: runs a write workload with flushes, kills the server
with SIGKILL at a random moment, logs what was acknowledged, and verifies a crash image.

Usage:
  kill9.py run SOCKET SERVER_PID LOG SEED
      Handshake, then pipelined writes (some FUA), write-zeroes, cluster-aligned trims and
      flushes, at most DEPTH in flight and never two overlapping ones.  After a random number
      of requests the server gets SIGKILL while requests are in flight; replies already sent
      still count.  LOG (json) records every request: when it was sent, when (and whether) it
      was acknowledged.
  kill9.py verify LOG BASE.raw AFTER.raw
      BASE: the guest view before the round, AFTER: after the crash (qemu-img convert).
      Every sector must hold its last durable value (a write acknowledged before a completed
      FLUSH was sent, or acknowledged with FUA; else BASE) or the value of a later write.
      Prints a summary; exit 1 with the first bad sector otherwise.
  kill9.py reopen SOCKET SEED
      Write 64 KiB at a random offset, flush, read it back (the server restarted on the crash
      image), disconnect.  Prints "OFFSET" for the caller to check later.
"""
import json
import os
import random
import signal
import socket
import struct
import sys

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPMAGIC = 0x3E889045565A9
REQMAGIC = 0x25609513
SIMPLEMAGIC = 0x67446698
OPT_GO = 7
REP_ACK, REP_INFO = 1, 3
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WZ = 0, 1, 2, 3, 4, 6
F_FUA = 1
SECTOR = 512
CLUSTER = 65536        # trims are cluster-aligned so the image reads zeros there afterwards
DEPTH = 8


def recvn(s, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def connect(path):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    magic, opts, _ = struct.unpack(">QQH", recvn(s, 18))
    assert magic == NBDMAGIC and opts == IHAVEOPT, "bad greeting"
    s.sendall(struct.pack(">I", 3))                          # fixed newstyle, no zeroes
    data = struct.pack(">IH", 0, 0)                          # default export, no info requests
    s.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
    size = None
    while True:
        magic, _, typ, length = struct.unpack(">QIII", recvn(s, 20))
        payload = recvn(s, length)
        assert magic == REPMAGIC, "bad option reply"
        if typ == REP_INFO and struct.unpack(">H", payload[:2])[0] == 0:
            size = struct.unpack(">Q", payload[2:10])[0]
        elif typ == REP_ACK:
            return s, size
        elif typ & (1 << 31):
            raise RuntimeError("NBD_OPT_GO refused: %r" % payload)


def sector_data(wid, sector):
    return struct.pack("<QQ", wid, sector) + bytes([(wid * 7 + sector) & 255]) * (SECTOR - 16)


def write_payload(wid, off, length):
    return b"".join(sector_data(wid, off // SECTOR + i) for i in range(length // SECTOR))


def request(s, cookie, typ, off=0, length=0, flags=0, payload=b""):
    s.sendall(struct.pack(">IHHQQI", REQMAGIC, flags, typ, cookie, off, length) + payload)


def read_reply(s):
    magic, err, cookie = struct.unpack(">IIQ", recvn(s, 16))
    assert magic == SIMPLEMAGIC, "bad reply magic"
    return cookie, err


def run(sock, pid, log, seed):
    rng = random.Random(seed)
    s, size = connect(sock)
    clock = 0
    reqs = []            # {t, off, len, fua, issue, ack, err}
    inflight = {}        # cookie -> index
    kill_after = rng.randint(20, 300)

    def reap_one():
        nonlocal clock
        cookie, err = read_reply(s)
        clock += 1
        r = reqs[inflight.pop(cookie)]
        r["ack"], r["err"] = clock, err

    def overlaps(off, length):
        return any(reqs[i]["t"] != "flush" and off < reqs[i]["off"] + reqs[i]["len"]
                   and reqs[i]["off"] < off + length for i in inflight.values())

    killed = False
    try:
        while not killed:
            while len(inflight) >= DEPTH:
                reap_one()
            p = rng.random()
            if p < 0.14:
                t, off, length = "flush", 0, 0
            else:
                if p < 0.22:
                    t = "trim"
                    off = rng.randrange(size // CLUSTER) * CLUSTER
                    length = CLUSTER * rng.randint(1, 2)
                else:
                    t = "zero" if p < 0.30 else "write"
                    length = SECTOR * rng.choice([1, 8, 8, 16, 64, 128, 256])
                    off = rng.randrange((size - length) // SECTOR + 1) * SECTOR
                length = min(length, size - off)
                if overlaps(off, length):
                    if inflight:
                        reap_one()
                    continue
            fua = t in ("write", "zero") and rng.random() < 0.15
            idx = len(reqs)
            clock += 1
            reqs.append({"t": t, "off": off, "len": length, "fua": fua, "issue": clock,
                         "ack": None, "err": None})
            inflight[idx + 1] = idx
            flags = F_FUA if fua else 0
            if t == "write":
                request(s, idx + 1, CMD_WRITE, off, length, flags, write_payload(idx + 1, off, length))
            elif t == "zero":
                request(s, idx + 1, CMD_WZ, off, length, flags)
            elif t == "trim":
                request(s, idx + 1, CMD_TRIM, off, length)
            else:
                request(s, idx + 1, CMD_FLUSH)
            if len(reqs) >= kill_after and inflight:
                os.kill(pid, signal.SIGKILL)
                killed = True
    except (BrokenPipeError, ConnectionResetError):
        pass
    if not killed:
        os.kill(pid, signal.SIGKILL)
    # Replies the server sent before it died are acknowledgements.
    try:
        while inflight:
            reap_one()
    except (EOFError, ConnectionResetError, BrokenPipeError, OSError):
        pass
    s.close()
    with open(log, "w") as f:
        json.dump({"size": size, "reqs": reqs}, f)
    acked = sum(1 for r in reqs if r["ack"] is not None)
    print("%d requests, %d acknowledged, %d in flight at the kill" % (len(reqs), acked, len(reqs) - acked))


def verify(log, base, after):
    with open(log) as f:
        L = json.load(f)
    reqs = L["reqs"]
    with open(base, "rb") as f:
        b = f.read()
    with open(after, "rb") as f:
        a = f.read()
    if len(a) != len(b):
        print("size changed: %d -> %d" % (len(b), len(a)))
        return 1
    flush_issues = sorted(r["issue"] for r in reqs
                          if r["t"] == "flush" and r["ack"] is not None and r["err"] == 0)

    def durable(r):
        if r["ack"] is None or r["err"] != 0:
            return False
        if r["fua"]:
            return True
        # A flush sent after the acknowledgement covers it.
        lo, hi = 0, len(flush_issues)
        while lo < hi:
            mid = (lo + hi) // 2
            if flush_issues[mid] > r["ack"]:
                hi = mid
            else:
                lo = mid + 1
        return lo < len(flush_issues)

    touched = {}
    for i, r in enumerate(reqs):
        if r["t"] == "flush":
            continue
        for sct in range(r["off"] // SECTOR, (r["off"] + r["len"]) // SECTOR):
            touched.setdefault(sct, []).append(i)
    zero = bytes(SECTOR)
    nsec = len(a) // SECTOR
    checked_durable = 0
    for sct in range(nsec):
        got = a[sct * SECTOR:(sct + 1) * SECTOR]
        ws = touched.get(sct)
        if not ws:
            if got != b[sct * SECTOR:(sct + 1) * SECTOR]:
                print("sector %d was never written in this round but changed" % sct)
                return 1
            continue
        last = -1
        for k, i in enumerate(ws):          # in issue order; never two in flight at once
            if durable(reqs[i]):
                last = k
        allowed = [b[sct * SECTOR:(sct + 1) * SECTOR]] if last < 0 else []
        for i in ws[max(last, 0):]:
            r = reqs[i]
            allowed.append(sector_data(i + 1, sct) if r["t"] == "write" else zero)
        if last >= 0:
            checked_durable += 1
        if got not in allowed:
            r = reqs[ws[last]] if last >= 0 else None
            print("sector %d: holds %s; the last durable value is %s" % (
                sct, describe(got), "request %d (%s, acknowledged at %s)" % (ws[last] + 1, r["t"], r["ack"])
                if r else "the one before the round"))
            return 1
    acked = sum(1 for r in reqs if r["ack"] is not None)
    print("ok: %d requests (%d acknowledged), %d sectors with a durable value, all as required"
          % (len(reqs), acked, checked_durable))
    return 0


def describe(sec):
    if not any(sec):
        return "zeros"
    wid, sct = struct.unpack("<QQ", sec[:16])
    if sec == sector_data(wid, sct):
        return "data of request %d for sector %d" % (wid, sct)
    return "unknown data"


def reopen(sock, seed):
    rng = random.Random(seed)
    s, size = connect(sock)
    off = rng.randrange((size - 65536) // SECTOR + 1) * SECTOR
    data = bytes([rng.randrange(1, 256)]) * 65536
    # One at a time: the server may complete pipelined requests in any order.
    for cookie, typ, args in ((1, CMD_WRITE, (off, len(data), 0, data)), (2, CMD_FLUSH, ()),
                              (3, CMD_READ, (off, len(data)))):
        request(s, cookie, typ, *args)
        got, err = read_reply(s)
        if got != cookie or err:
            raise SystemExit("reopen: request %d failed (error %d)" % (cookie, err))
        if typ == CMD_READ and recvn(s, len(data)) != data:
            raise SystemExit("reopen: read back differs")
    request(s, 4, CMD_DISC)
    s.close()
    print(off, data[0])


def main():
    a = sys.argv
    if len(a) == 6 and a[1] == "run":
        run(a[2], int(a[3]), a[4], int(a[5]))
    elif len(a) == 5 and a[1] == "verify":
        return verify(a[2], a[3], a[4])
    elif len(a) == 4 and a[1] == "reopen":
        reopen(a[2], int(a[3]))
    else:
        sys.stderr.write(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
