"""The zygote: a child of the agent that imports torch once, then only forks standby ranks.

The agent forks its zygotes before it reads its key from the kernel, so no key is in their
memory, nor in that of the ranks they fork.

Importing torch takes seconds; forking a process that already holds it takes milliseconds.
The zygote runs no Python threads, no torch operation, and never touches CUDA, so its children
may use CUDA and torch's thread pools freely. (numpy's OpenBLAS starts idle native threads at
import; OpenBLAS registers its own fork handlers for exactly this.) The agent runs a second,
light zygote with nothing preloaded, for cells that need neither.
The agent asks for a standby by sending the descriptors the child will use (control socket,
stdout pipe, stderr pipe, and on the kernel's machine a socket the kernel holds the other end
of) over a SOCK_SEQPACKET pair with SCM_RIGHTS.
"""

from __future__ import annotations

import faulthandler
import gc
import importlib
import os
import signal
import socket
import sys
import traceback

import msgpack

from . import network
from .forking import die_with_parent, fork_standby

READY = b"R"
FORK = b"F"


def start(preload: list[str]) -> tuple[int, socket.socket]:
    """Fork the zygote from the (single-threaded) agent; returns its pid and our socket end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    parent = os.getpid()
    pid = os.fork()
    if pid:
        theirs.close()
        return pid, ours
    status = 1
    try:
        ours.close()
        die_with_parent(parent)
        _keep_only(theirs.fileno())
        status = serve(theirs, preload)
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(status)


def _keep_only(sock_fd: int) -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # never write to the kernel's pipe
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd != sock_fd:
            try:
                os.close(fd)
            except OSError:
                pass


def serve(sock: socket.socket, preload: list[str]) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # standbys are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Where torch asks whether CUDA exists, let it ask NVML and not initialise CUDA here.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    info: dict = {"preloaded": [], "errors": {}}
    for module in preload:
        try:
            importlib.import_module(module)
            info["preloaded"].append(module)
        except Exception as e:
            info["errors"][module] = f"{type(e).__name__}: {e}"
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
        info["cuda_build"] = torch.version.cuda
    # Import what every standby runs, then freeze the heap: the garbage collector in a child
    # then never walks (and so never copies) the pages it shares with the zygote.
    from . import rank  # noqa: F401

    # A crash's traceback goes to fd 2: here the agent's log, in a standby its stderr pipe (each
    # standby would pay ~0.4 ms to enable it itself).
    faulthandler.enable()
    gc.collect()
    gc.freeze()
    sock.send(READY + msgpack.packb(info))
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, 16, 4)
        except OSError:
            return 0
        if not message:
            return 0  # the agent is gone
        if message == FORK and len(fds) in (3, 4):  # the fourth: a direct line to the kernel
            network.refresh()  # the interface list, read here once for every standby forked
            fork_standby(fds[0], fds[1], fds[2], preloaded=True, direct_fd=fds[3] if len(fds) == 4 else None)
        for fd in fds:
            os.close(fd)
