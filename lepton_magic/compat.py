"""Can these nodes run this cell? Checked before a run starts, so a mismatch fails in seconds
with one table, not minutes later inside a job."""

from __future__ import annotations

import functools
import platform

from .backends import NodeLink
from .errors import LeptonError

#: Less free disk than this on a node is a problem (checkpoints, caches, the agent).
MIN_DISK_FREE = 1 << 30


@functools.lru_cache(maxsize=1)
def _torch_here() -> str | None:
    """The kernel's torch version, read once (package metadata lookups take milliseconds)."""
    try:
        from importlib.metadata import version

        return version("torch")
    except Exception:
        return None


def _minor(version: str | None) -> str | None:
    return ".".join(version.split("+")[0].split(".")[:2]) if version else None


def problems(link: NodeLink, needs_torch: bool, gpus: int | None, local: bool) -> list[str]:
    facts = link.facts
    found = []
    here = _minor(platform.python_version())
    there = _minor(facts.get("python"))
    if there and there != here:
        found.append(f"Python {there} there, {here} here (values are pickled for one Python version)")
    if needs_torch:
        torch_there = facts.get("torch")
        if not torch_there:
            found.append("no torch installed")
        else:
            torch_here = _torch_here()
            if torch_here and _minor(torch_here) != _minor(torch_there):
                found.append(f"torch {torch_there} there, {torch_here} here")
    if gpus and not local and not facts.get("gpus"):
        found.append(f"no GPU found (NVML), --gpus {gpus} asked for")
    free = facts.get("disk_free")
    if free is not None and free < MIN_DISK_FREE:
        found.append(f"only {free / 2**30:.1f} GiB free on disk")
    return found


def missing_notes(links: list[NodeLink]) -> list[str]:
    """Optional pieces nodes lack (psutil, nvidia-ml-py), each with what the node does instead."""
    return [f"{link.name}: no {item}" for link in links for item in link.facts.get("missing") or []]


def check(links: list[NodeLink], needs_torch: bool, gpus: int | None, local: bool) -> None:
    """Raise one LeptonError holding a table of every node with a problem."""
    rows = [(link, problems(link, needs_torch, gpus, local)) for link in links]
    bad = [(link, found) for link, found in rows if found]
    if not bad:
        return
    lines = [f"{len(bad)} of {len(links)} node(s) cannot run this cell:",
             f"  {'node':<10} {'host':<18} {'python':<8} {'torch':<14} {'GPUs':<5} problem"]
    for link, found in bad:
        f = link.facts
        lines.append(f"  {link.name:<10} {str(f.get('host', '?')):<18} {str(f.get('python', '?')):<8} "
                     f"{str(f.get('torch') or '–'):<14} {len(f.get('gpus') or []):<5} {'; '.join(found)}"
                     + (f"; also missing: {', '.join(f['missing'])}" if f.get("missing") else ""))
    raise LeptonError("\n".join(lines))
