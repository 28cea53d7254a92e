"""Who owns a pool or a run (the kernel that started it), and whether that owner is still there.

On the owner's machine a pid alone is not enough: once the kernel is gone the pid may be given to
another process, so the owner is also known by its process start time. From another machine a
pid means nothing: the owner renews a lease while it lives, and an expired lease means it is gone.
"""

from __future__ import annotations

import functools
import os
import socket
import time

import psutil

#: How long an owner's lease lasts; it renews it every LEASE_SECONDS / 4.
LEASE_SECONDS = 60.0
#: Clock differences between machines, on top of a lease.
LEASE_GRACE_SECONDS = 30.0
#: Two readings of the same process's start time agree to this much.
START_TIME_SLACK = 1.0


def host() -> str:
    return socket.gethostname()


def this_process() -> dict:
    """The owner columns of a row this process creates."""
    return {"owner_pid": os.getpid(), "owner_host": host(), "owner_started": _started_here(os.getpid()),
            "lease": time.time() + LEASE_SECONDS}


@functools.lru_cache(maxsize=4)
def _started_here(pid: int) -> float | None:
    """This process's start time: read from /proc once (keyed by pid: a forked child asks anew)."""
    return _started(pid)


def owner_gone(row: dict, now: float | None = None) -> bool:
    """The process that owns ``row`` (a pools or runs row) no longer exists. Unknown → not gone."""
    if row.get("owner_host") == host():
        pid = row.get("owner_pid")
        if not pid:
            return False
        try:
            started = psutil.Process(pid).create_time()
        except psutil.NoSuchProcess:
            return True
        except psutil.Error:  # it exists, and cannot be looked at: not known to be gone
            return False
        recorded = row.get("owner_started")
        return recorded is not None and abs(started - recorded) > START_TIME_SLACK  # the pid was reused
    lease = row.get("lease")
    return lease is not None and (now or time.time()) > lease + LEASE_GRACE_SECONDS


def _started(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None
