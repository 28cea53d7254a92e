"""The node's copy of the notebook's folder: a content-addressed blob cache and mirrors built
from it (the kernel side is lepton_magic/workdir.py).

    ~/.cache/lepton_magic/blobs/ab/<sha256>[.x]   one file per content (".x": executable)
    ~/.cache/lepton_magic/work/<project key>/     the mirror ranks run in
    ~/.cache/lepton_magic/work/<project key>.files  what the last sync placed there

A sync is three messages: the kernel's manifest ({path: [sha256, size, mode]}), the agent's
answer naming the blobs it lacks, then those blobs in chunks; once the last one is complete the
agent builds the mirror with hard links into the cache and answers with its folder.

Hard links share their bytes with the cache, so a rank that rewrites a mirrored file in place
rewrites the cached blob too. A blob therefore carries an mtime derived from its hash: a stat
shows whether it is still what its name says (a blob written since is taken as missing and sent
again), with no second hash. Distinct contents get distinct mtimes, so Python's bytecode cache
(keyed by a source's mtime and size) never mistakes one version of a module for another.

What ranks wrote into the mirror (checkpoints, figures) is left alone by later syncs: only
files an earlier sync placed and the new manifest lacks are deleted. Nothing here imports the
kernel side.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path

CACHE = Path(os.path.expanduser("~")) / ".cache" / "lepton_magic"
#: The mtime of a blob is this many seconds plus the first 28 bits of its hash (2001-2009).
_MTIME_BASE = 1_000_000_000
#: Pulled files travel in chunks of this many bytes (a frame holds at most 16 MiB).
PULL_CHUNK = 8 << 20


def blob_name(sha: str, mode: int) -> str:
    return sha + (".x" if mode & 0o111 else "")


def blob_mtime_ns(sha: str) -> int:
    return (_MTIME_BASE + int(sha[:7], 16)) * 1_000_000_000


class Mirror:
    """The blob cache and the mirrors of one node (one user's home)."""

    def __init__(self, cache: Path = CACHE):
        self.blobs = cache / "blobs"
        self.work = cache / "work"
        #: run id -> the sync waiting for its blobs: {"key", "files", "need": {name: size}, "got"}
        self.pending: dict[str, dict] = {}

    # --- a sync ------------------------------------------------------------------------------
    def begin(self, run: str, key: str, files: dict) -> list[str]:
        """The blobs of ``files`` this node lacks (their names); none: the mirror is ready."""
        need: dict[str, tuple[str, int]] = {}
        for sha, size, mode in files.values():
            name = blob_name(sha, mode)
            if name not in need and not self._have(name, sha, size):
                need[name] = (sha, size)
        self.pending[run] = {"key": _safe_key(key), "files": files, "need": need, "got": {}}
        return sorted(need)

    def _have(self, name: str, sha: str, size: int) -> bool:
        path = self.blob_path(name)
        try:
            st = path.stat()
        except OSError:
            return False
        if st.st_size == size and st.st_mtime_ns == blob_mtime_ns(sha):
            return True
        # Written since it was cached (a rank rewrote a mirrored file in place): not this hash.
        path.unlink(missing_ok=True)
        return False

    def blob_path(self, name: str) -> Path:
        return self.blobs / name[:2] / name

    def receive(self, run: str, parts: list, buffers: list) -> bool:
        """Chunks of blobs ([name, offset] each, with its bytes); True once every blob is in."""
        sync = self.pending[run]
        for (name, offset), data in zip(parts, buffers):
            sha, size = sync["need"][name]
            tmp = sync["got"].get(name)
            if tmp is None:
                self.blobs.mkdir(parents=True, exist_ok=True)
                tmp = sync["got"][name] = self.blobs / f".{name}.{os.getpid()}.{time.monotonic_ns()}"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            else:
                fd = os.open(tmp, os.O_WRONLY)
            try:
                os.pwrite(fd, data, offset)
            finally:
                os.close(fd)
            if offset + len(data) >= size:
                self._store(name, sha, size, tmp)
                del sync["need"][name]
                del sync["got"][name]
        return not sync["need"]

    def _store(self, name: str, sha: str, size: int, tmp: Path) -> None:
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != sha:
            tmp.unlink(missing_ok=True)
            raise ValueError(f"blob {sha[:12]} arrived with other bytes")
        os.chmod(tmp, 0o555 if name.endswith(".x") else 0o444)  # a hint not to write in place
        os.utime(tmp, ns=(time.time_ns(), blob_mtime_ns(sha)))
        target = self.blob_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, target)

    def abandon(self, run: str) -> None:
        sync = self.pending.pop(run, None)
        for tmp in (sync or {}).get("got", {}).values():
            Path(tmp).unlink(missing_ok=True)

    def materialise(self, run: str) -> str:
        """Build the mirror of a sync whose blobs are all here; returns its folder."""
        sync = self.pending.pop(run)
        root = self.work / sync["key"]
        record = self.work / f"{sync['key']}.files"
        root.mkdir(parents=True, exist_ok=True)
        try:
            before = set(json.loads(record.read_text()))
        except (OSError, ValueError):
            before = set()
        files = sync["files"]
        for rel, (sha, _size, mode) in files.items():
            self._place(root, _safe_rel(rel), self.blob_path(blob_name(sha, mode)))
        for rel in before - set(files):  # placed by an earlier sync, gone from the project now
            try:
                (root / _safe_rel(rel)).unlink()
            except (OSError, ValueError):
                pass
        tmp = record.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(sorted(files)))
        os.replace(tmp, record)
        return str(root)

    @staticmethod
    def _place(root: Path, rel: str, blob: Path) -> None:
        target = root / rel
        try:
            if os.stat(target).st_ino == os.stat(blob).st_ino:
                return
        except OSError:
            pass
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.lepton{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(blob, tmp)
        except OSError:  # another file system, or no hard links there: a copy will do
            shutil.copy2(blob, tmp)
        os.replace(tmp, target)

    # --- pulling back what ranks wrote ---------------------------------------------------------
    def pull(self, key: str, path: str, have: dict[str, str]):
        """(relative path, mode, size, chunks) of each file under ``path`` in the mirror whose
        hash is not the one ``have`` gives; ``chunks`` yields (offset, bytes)."""
        root = (self.work / _safe_key(key)).resolve()
        start = (root / path).resolve() if path not in ("", ".") else root
        if start != root and root not in start.parents:
            raise ValueError(f"{path!r} is outside the mirror")
        if not start.exists():
            raise FileNotFoundError(f"{path!r} does not exist in the mirror {root} on this node")
        paths = [start] if start.is_file() else sorted(p for p in start.rglob("*") if p.is_file())
        for p in paths:
            rel = p.relative_to(root).as_posix()
            if rel.startswith(".lepton_modules/") or p.name.startswith(".") and ".lepton" in p.name:
                continue
            if have.get(rel) is not None and have[rel] == _sha256(p):
                yield rel, None, None, None  # the same there already
                continue
            st = p.stat()
            yield rel, stat.S_IMODE(st.st_mode), st.st_size, _chunks(p)


def _chunks(path: Path):
    with open(path, "rb") as f:
        offset = 0
        while True:
            data = f.read(PULL_CHUNK)
            if not data and offset:
                return
            yield offset, data
            offset += len(data)
            if not data:
                return


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_key(key: str) -> str:
    if not key or "/" in key or key.startswith("."):
        raise ValueError(f"bad project key {key!r}")
    return key


def _safe_rel(rel: str) -> str:
    """A manifest path stays inside its mirror."""
    parts = rel.split("/")
    if rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"bad path {rel!r} in the manifest")
    return rel
