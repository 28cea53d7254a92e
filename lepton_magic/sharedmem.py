"""Large results between processes of one machine (the local backend) through shared memory.

A rank writes the out-of-band buffers of its pickled outputs into one file under /dev/shm and
sends only the file's name in its (signed) result frame; the kernel maps the file copy-on-write
and unlinks it at once. Arrays come back backed by that mapping: no bytes cross a pipe.

The buffers are raw array memory, never parsed as pickle opcodes (the pickle itself, with every
reference to them, travels in the signed frame), and the file is private to the user (0600),
whom the kernel and the ranks run as anyway.
"""

from __future__ import annotations

import mmap
import os
import secrets
import tempfile
from pathlib import Path

#: Below this, buffers ride in the frame itself.
SHM_MIN_BYTES = 1 << 20


def default_dir() -> str | None:
    """A private folder in /dev/shm, or None where there is no shared-memory file system."""
    base = Path("/dev/shm")
    if not base.is_dir() or not os.access(base, os.W_OK):
        return None
    folder = base / f"lepton-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
    except OSError:
        return None
    return str(folder)


def write_buffers(folder: str, prefix: str, buffers: list[memoryview]) -> dict:
    """Write ``buffers`` one after another into a new file; returns what ``map_buffers`` needs."""
    fd, path = tempfile.mkstemp(prefix=f"{prefix}-{secrets.token_hex(4)}-", dir=folder)
    try:
        views = [memoryview(b).cast("B") for b in buffers]
        os.ftruncate(fd, sum(v.nbytes for v in views))
        for view in views:
            while view.nbytes:
                n = os.write(fd, view)
                view = view[n:]
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return {"path": path, "lens": [memoryview(b).nbytes for b in buffers]}


def map_buffers(info: dict) -> list[memoryview]:
    """Map the file privately (writable, copy-on-write), unlink it, and slice the buffers."""
    path = info["path"]
    with open(path, "rb") as f:
        size = sum(info["lens"])
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else b""
    os.unlink(path)
    view = memoryview(mapped)
    out, pos = [], 0
    for n in info["lens"]:
        out.append(view[pos:pos + n])
        pos += n
    return out


def discard(info: dict | None) -> None:
    if info:
        try:
            os.unlink(info["path"])
        except OSError:
            pass


def sweep(folder: str, prefixes: list[str]) -> None:
    """Remove the files runs with these ids left behind."""
    try:
        names = os.listdir(folder)
    except OSError:
        return
    wanted = tuple(f"{p}-" for p in prefixes)
    for name in names:
        if name.startswith(wanted):
            try:
                os.unlink(os.path.join(folder, name))
            except OSError:
                pass
