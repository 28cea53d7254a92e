"""Turning a forked child into a standby rank process.

A standby is forked ahead of time by a zygote and waits on its control socket for one job.
Forking only ever happens from a single-threaded process that has never initialised CUDA, which
is what makes it safe, and that never held a key: a standby learns the key of its control socket
from the socket, and its run's key from its job.
"""

from __future__ import annotations

import ctypes
import fcntl
import io
import os
import signal
import sys
import traceback

CTRL_FD = 3
#: Where the agent gave the kernel the other end (nodes on the kernel's machine): the kernel
#: sends the job and takes the rank's frames straight, without the agent's two wake-ups.
DIRECT_FD = 4
_PR_SET_PDEATHSIG = 1


def _prctl():
    """libc's prctl, looked up once in the forking process (each standby would pay ~0.4 ms)."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None  # not Linux


_prctl_call = _prctl()


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent exits (the dead-man switch)."""
    if _prctl_call is not None:  # else the agent's EOF handling still kills us
        _prctl_call(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def fork_standby(ctrl_fd: int, out_fd: int, err_fd: int, preloaded: bool, direct_fd: int | None = None) -> int:
    """Fork a standby rank wired to the given descriptors; returns the child's pid."""
    parent = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        _become_standby(parent, ctrl_fd, out_fd, err_fd, direct_fd)
        from .rank import serve

        status = serve(preloaded)
    except BaseException:
        try:
            traceback.print_exc()
            sys.stderr.flush()
        except BaseException:
            pass
    finally:
        os._exit(status)


def _become_standby(parent: int, ctrl_fd: int, out_fd: int, err_fd: int, direct_fd: int | None) -> None:
    os.setpgid(0, 0)  # own process group: cancel kills the rank and whatever it spawned
    die_with_parent(parent)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGPIPE, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # Park the descriptors high, then move them to 1, 2, 3 (and 4) and close the rest.
    wired = [(1, out_fd), (2, err_fd), (CTRL_FD, ctrl_fd)] + ([(DIRECT_FD, direct_fd)] if direct_fd is not None else [])
    high = [(target, fcntl.fcntl(fd, fcntl.F_DUPFD, 100)) for target, fd in wired]
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    for target, fd in high:
        os.dup2(fd, target)
    _close_fds_above(wired[-1][0])
    sys.stdin = open(0, closefd=False)
    sys.stdout = io.TextIOWrapper(CountedFile(1), line_buffering=True)
    sys.stderr = io.TextIOWrapper(CountedFile(2), line_buffering=True)
    sys.__stdout__, sys.__stderr__ = sys.stdout, sys.stderr
    import faulthandler

    if not faulthandler.is_enabled():  # a zygote enabled it on fd 2, which is the rank's stderr now
        faulthandler.enable(sys.stderr)
    # Forked children share the parent's RNG state; Python's random reseeds itself, numpy not.
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()


class CountedFile(io.FileIO):
    """The rank's stdout or stderr, counting what Python wrote to it: a rank that printed
    nothing may answer the kernel straight (see rank.quiet_since)."""

    written = 0  # by every instance: stdout and stderr alike

    def __init__(self, fd: int):
        super().__init__(fd, "w", closefd=False)

    def write(self, data) -> int:
        n = super().write(data)
        CountedFile.written += n or 0
        return n


def _close_fds_above(keep: int) -> None:
    try:
        fds = [int(fd) for fd in os.listdir("/proc/self/fd")]
    except OSError:
        os.closerange(keep + 1, 4096)
        return
    for fd in fds:
        if fd > keep:
            try:
                os.close(fd)
            except OSError:
                pass
