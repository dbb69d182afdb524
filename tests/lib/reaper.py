#!/usr/bin/env python3
"""Run a daemonising command and report the daemon's real exit status.

Usage: reaper.py FIFO PIDFILE -- COMMAND...

A command like `ublk-qcow2 nbd --fork` returns once the server is ready and
leaves the server running as an orphan, so the shell that started it cannot
wait for it.  This process makes itself a child subreaper (orphans are
re-parented to it), runs COMMAND, and writes to FIFO:
    started RC      when COMMAND returned (RC = its exit code)
    exited RC       when the daemon named in PIDFILE ended (RC = its exit
                    code, or 128+signal), or "exited none" if there was none
It then exits.  The shell reads these lines with bounded `read -t`.
"""
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def status_code(st):
    if os.WIFEXITED(st):
        return os.WEXITSTATUS(st)
    if os.WIFSIGNALED(st):
        return 128 + os.WTERMSIG(st)
    return 255


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.stderr.write("usage: reaper.py FIFO PIDFILE -- COMMAND...\n")
        return 2
    fifo, pidfile, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        sys.stderr.write("reaper: prctl(PR_SET_CHILD_SUBREAPER) failed\n")
        return 2
    out = open(fifo, "w", buffering=1)

    child = os.fork()
    if child == 0:
        out.close()
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            sys.stderr.write("reaper: cannot run %s: %s\n" % (cmd[0], e))
        os._exit(127)

    # Reap until the command itself has returned; a daemon that already died
    # in the meantime is remembered.
    done = {}
    while True:
        pid, st = os.waitpid(-1, 0)
        done[pid] = status_code(st)
        if pid == child:
            break
    out.write("started %d\n" % done[child])

    daemon = None
    try:
        with open(pidfile) as f:
            daemon = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    if daemon is None or (daemon not in done and not alive(daemon)):
        # No daemon to follow: make sure no stray descendant outlives us, then report.
        signal.signal(signal.SIGALRM, lambda *_: kill_children(signal.SIGKILL))
        signal.alarm(20)
        reap_all()
        out.write("exited none\n")
        return 0

    # Follow the daemon (even when the start command failed: the shell decides).
    rc = done.get(daemon)
    for pid, st in reap_all():
        if pid == daemon:
            rc = st
    out.write("exited %s\n" % ("unknown" if rc is None else rc))
    return 0


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def reap_all():
    """Wait for every descendant; returns [(pid, code)]."""
    res = []
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            return res
        except InterruptedError:
            continue
        res.append((pid, status_code(st)))


def kill_children(sig):
    me = str(os.getpid())
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = f.read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if ppid == me:
            try:
                os.kill(int(d), sig)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main())
