"""Folders and files only this user can read: everything lepton keeps under LEPTON_HOME.

The store holds cell code, metrics and logs; runs/<id>/outputs.bin is a pickle. On a shared
machine another user who can read them reads the user's work, and one who can read a pickle
the user loads can go further. So folders are 0700 and files 0600 whatever the umask: they
are created that way and narrowed with chmod, never by changing the umask, which is
process-wide and belongs to the user's own code running in the same kernel.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger("lepton_magic.private")

DIR_MODE = 0o700
FILE_MODE = 0o600
#: Group and other bits: what "open to other users" means here.
SHARED_BITS = 0o077


def make_dir(path: str | os.PathLike) -> int | None:
    """Make ``path`` (and any missing parent) a folder only this user may enter.

    Returns the mode an existing folder had when it had to be narrowed, else None."""
    path = Path(path)
    if not path.parent.exists():
        make_dir(path.parent)  # XDG asks for 0700 on data folders it has to create
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return narrow(path)
    os.chmod(path, DIR_MODE)  # a umask that strips the owner's bits would leave it unusable
    return None


def make_home(home: str | os.PathLike) -> None:
    """LEPTON_HOME, private; one made by an earlier version under umask 022 is narrowed, saying so."""
    old = make_dir(home)
    if old is not None:
        log.warning("lepton: %s was open to other users (mode %s); it is now %s", home,
                    _octal(old), _octal(stat.S_IMODE(os.stat(home).st_mode)))


def narrow(path: str | os.PathLike) -> int | None:
    """Take group and other bits off an existing ``path``; returns its old mode if it had any."""
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return None
    if not mode & SHARED_BITS:
        return None
    os.chmod(path, mode & ~SHARED_BITS)
    return mode


def open_file(path: str | os.PathLike, mode: str = "wb"):
    """``open(path, mode)``, the file created 0600 (or narrowed to it, if it was already there)."""
    return open(path, mode, opener=_private_opener)


def make_file(path: str | os.PathLike) -> None:
    """Create ``path`` empty and 0600 unless it exists; an existing one is narrowed to 0600."""
    with open_file(path, "ab"):
        pass


def make_sqlite_files(database: str | os.PathLike) -> None:
    """The database private before SQLite opens it: SQLite gives the -wal and -shm files it
    creates later, in any process, the database file's own mode (with fchmod, past the umask).
    Side files an earlier version left are narrowed."""
    make_file(database)
    for suffix in ("-wal", "-shm", "-journal"):
        narrow(f"{os.fspath(database)}{suffix}")


def _private_opener(path: str, flags: int) -> int:
    fd = os.open(path, flags, FILE_MODE)
    if stat.S_IMODE(os.fstat(fd).st_mode) != FILE_MODE:
        os.fchmod(fd, FILE_MODE)
    return fd


def _octal(mode: int) -> str:
    return f"{mode:04o}"
