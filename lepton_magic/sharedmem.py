"""Large results between processes of one machine (the local backend) through shared memory.

A rank writes the out-of-band buffers of its pickled outputs into one file under /dev/shm and
sends only the file's name and identity in its (signed) result frame; the kernel maps the file
copy-on-write and unlinks it at once. Arrays come back backed by that mapping: no bytes cross a
pipe.

The buffers are raw array memory, never parsed as pickle opcodes (the pickle itself, with every
reference to them, travels in the signed frame). /dev/shm is shared by every user of the
machine, so nothing there is trusted by name: the folder must be a real folder of this user
that nobody else may enter (a squatter who made it first could otherwise swap results), and the
kernel maps a file only if it is the very file the rank wrote (device, inode, size).
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets
import stat

log = logging.getLogger("lepton_magic.sharedmem")

#: Below this, buffers ride in the frame itself.
SHM_MIN_BYTES = 1 << 20
#: Where the per-user folder lives (tests point it elsewhere).
SHM_ROOT = "/dev/shm"

_CREATE_NEW = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_EXISTING = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Folders already refused, so each is reported once per process.
_refused: set[str] = set()


class SharedMemoryRefused(OSError):
    """A result file is not the one its rank wrote: the outputs in it must not be loaded."""


def default_dir(root: str | None = None) -> str | None:
    """This user's private folder in /dev/shm (made on first use), or None: no shared-memory
    file system, or a folder by that name this user cannot trust (results use the pipe then)."""
    base = root or SHM_ROOT
    if not os.path.isdir(base) or not os.access(base, os.W_OK):
        return None
    folder = os.path.join(base, f"lepton-{os.getuid()}")
    try:
        os.mkdir(folder, 0o700)
    except FileExistsError:
        pass  # ours from an earlier run, or someone else's: checked below either way
    except OSError:
        return None
    problem = _why_not_private(folder)
    if problem:
        _refuse_once(folder, problem)
        return None
    return folder


def _why_not_private(folder: str) -> str | None:
    try:
        info = os.lstat(folder)  # lstat: a symlink is judged itself, never its target
    except OSError as e:
        return f"it cannot be examined ({e.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return "it is a symbolic link"
    if not stat.S_ISDIR(info.st_mode):
        return "it is not a folder"
    if info.st_uid != os.getuid():
        return f"it belongs to uid {info.st_uid}"
    if info.st_mode & 0o077:
        return f"its mode {stat.S_IMODE(info.st_mode):04o} lets other users in"
    return None


def _refuse_once(folder: str, problem: str) -> None:
    if folder not in _refused:
        _refused.add(folder)
        log.warning("lepton: not using %s for large results (%s); they come through the pipe instead",
                    folder, problem)


def write_buffers(folder: str, prefix: str, buffers: list[memoryview]) -> dict:
    """Write ``buffers`` one after another into a new file; returns what ``map_buffers`` needs."""
    path = os.path.join(folder, f"{prefix}-{secrets.token_hex(8)}")
    fd = os.open(path, _CREATE_NEW, 0o600)  # a name someone placed first fails: the pipe is used
    try:
        views = [memoryview(b).cast("B") for b in buffers]
        os.ftruncate(fd, sum(v.nbytes for v in views))
        for view in views:
            while view.nbytes:
                n = os.write(fd, view)
                view = view[n:]
        written = os.fstat(fd)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return {"path": path, "lens": [memoryview(b).nbytes for b in buffers],
            "dev": written.st_dev, "ino": written.st_ino, "size": written.st_size}


def map_buffers(info: dict, keep: bool = False) -> list[memoryview]:
    """Map the file privately (writable, copy-on-write), unlink it (unless others will map it
    too: ``keep``, for a run's inputs), and slice the buffers.

    Raises SharedMemoryRefused when the file is not the one its writer wrote."""
    fd = _open_the_written_file(info)
    try:
        size = sum(info["lens"])
        mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY) if size else b""
    finally:
        os.close(fd)
    if not keep:
        os.unlink(info["path"])
    view = memoryview(mapped)
    out, pos = [], 0
    for n in info["lens"]:
        out.append(view[pos:pos + n])
        pos += n
    return out


def _open_the_written_file(info: dict) -> int:
    """The descriptor of the file the rank wrote, checked on the descriptor itself (fstat), so
    nothing can be swapped in between the check and the mapping."""
    path = info["path"]
    try:
        fd = os.open(path, _OPEN_EXISTING)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SharedMemoryRefused(f"the result file {path} was replaced by a symbolic link: "
                                      "its outputs are refused") from None
        raise
    found = os.fstat(fd)
    same_file = (found.st_dev, found.st_ino) == (info.get("dev"), info.get("ino"))
    whole = found.st_size == info.get("size") == sum(info["lens"])
    if not (stat.S_ISREG(found.st_mode) and same_file and whole):
        os.close(fd)
        raise SharedMemoryRefused(f"the result file {path} was replaced after the rank wrote it "
                                  "(not the same file): its outputs are refused")
    return fd


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
