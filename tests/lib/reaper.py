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
    if done[child] != 0 or daemon is None:
        # No daemon to follow (start failed or wrote no pid file): wait for
        # any stray descendants so none outlives us, then report.
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
        out.write("exited none\n")
        return 0

    rc = done.get(daemon)
    while True:
        try:
            pid, st = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == daemon:
            rc = status_code(st)
    if rc is None:
        # The daemon was not our descendant (should not happen).
        out.write("exited unknown\n")
    else:
        out.write("exited %d\n" % rc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
