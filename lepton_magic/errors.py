"""Errors a person sees. Each renders as a short message, never as a traceback into this package."""

from __future__ import annotations


class LeptonError(Exception):
    """A run or pool could not do what was asked; the message says what and why."""

    def _render_traceback_(self) -> list[str]:
        return [f"LeptonError: {self}"]


class RemoteError(LeptonError):
    """The cell raised on a node. Shows the node's traceback with the notebook cell's line numbers."""

    def __init__(self, run: str, rank: int, node: str, type_name: str, message: str, traceback: str,
                 line: int | None):
        super().__init__(f"{type_name}: {message}")
        self.run = run
        self.rank = rank
        self.node = node
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback
        self.line = line

    def __str__(self) -> str:
        where = f" (cell line {self.line})" if self.line else ""
        return f"{self.type_name} on rank {self.rank} ({self.node}) of {self.run}{where}: {self.message}"

    def _render_traceback_(self) -> list[str]:
        header = f"RemoteError: rank {self.rank} on {self.node} failed in {self.run}"
        return [header, ""] + self.remote_traceback.rstrip("\n").splitlines()


def run_left(run: str) -> KeyboardInterrupt:
    """What an interrupted cell that followed a run it does not own (detached, attached) raises:
    one line saying the run goes on."""
    error = KeyboardInterrupt(f"stopped following {run}; it goes on")
    error._render_traceback_ = lambda: [f"KeyboardInterrupt: stopped following {run}; it goes on"]  # type: ignore[attr-defined]
    return error


def run_interrupted(run: str) -> KeyboardInterrupt:
    """What an interrupted ``%%lepton`` cell raises once its run is cancelled: a plain
    KeyboardInterrupt, as any interrupted cell ends with, shown as one line (IPython uses an
    exception's ``_render_traceback_``) instead of frames inside this package."""
    error = KeyboardInterrupt(f"{run} was cancelled")
    error._render_traceback_ = lambda: [f"KeyboardInterrupt: {run} was cancelled"]  # type: ignore[attr-defined]
    return error
