"""The agent's side of getting a node ready for a run: the mirror of the notebook's folder
(agent/mirror.py) and the packages it asks for (agent/envs.py).

Every request carries its run id and every answer names it, so the kernel's pool hands the
answers to that run. A request that fails is answered with the error, never dropped: the
kernel waits for the answer. Installs run as processes of their own whose output the agent's
loop relays (``on_output``); nothing here blocks the loop for longer than a file operation.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable

from . import envs
from .mirror import Mirror

KINDS = frozenset({"sync", "blobs", "env", "pull"})


class Install:
    """An installer process and what it said so far."""

    def __init__(self, run: str, rank: int, node: str, folder: Path, proc):
        self.run, self.rank, self.node, self.folder, self.proc = run, rank, node, folder, proc
        self.started = time.monotonic()
        self.partial = b""
        self.verdict: str | None = None
        self.cancelled = False


class Preparer:
    def __init__(self, node: str, send: Callable[[dict], None], watch: Callable[[int, "Install"], None],
                 unwatch: Callable[[int], None]):
        self.node = node
        self.send = send
        self.watch, self.unwatch = watch, unwatch
        self.mirror = Mirror()
        self.installs: list[Install] = []  # running

    def on_message(self, message: dict) -> None:
        kind, run = message["t"], message["run"]
        try:
            if kind == "sync":
                need = self.mirror.begin(run, message["key"], message["files"])
                root = None if need else self.mirror.materialise(run)
                self.send({"t": "sync_need", "run": run, "need": need, "root": root})
            elif kind == "blobs":
                if self.mirror.receive(run, message["parts"], message.get("_buffers") or []):
                    self.send({"t": "sync_done", "run": run, "root": self.mirror.materialise(run)})
            elif kind == "env":
                self.start_env(message)
            elif kind == "pull":
                self.pull(message)
        except Exception as e:
            self.mirror.abandon(run)
            answer = {"sync": "sync_done", "blobs": "sync_done", "env": "env_done", "pull": "pull_done"}[kind]
            self.send({"t": answer, "run": run, "error": f"{type(e).__name__}: {e}"})

    # --- packages ----------------------------------------------------------------------------
    def start_env(self, message: dict) -> None:
        requirements = list(message["requirements"])
        folder = envs.env_dir(requirements)
        if envs.ready(folder):
            self.send({"t": "env_done", "run": message["run"], "site": envs.site_packages(folder),
                       "seconds": 0.0, "cached": True})
            return
        proc = envs.start_install(folder, requirements, message.get("cwd"))
        install = Install(message["run"], message.get("rank", 0), self.node, folder, proc)
        os.set_blocking(proc.stdout.fileno(), False)
        self.watch(proc.stdout.fileno(), install)
        self.installs.append(install)

    def cancel(self, run: str) -> None:
        """The run was cancelled while this node was made ready for it: its sync is dropped and
        its installs are stopped, pip and all (the next install of those packages starts over)."""
        try:
            self.mirror.abandon(run)
        except OSError:  # a temporary blob that will not go is litter, not a reason to keep going
            pass
        for install in self.installs:
            if install.run == run and not install.cancelled:
                install.cancelled = True
                try:
                    os.killpg(install.proc.pid, signal.SIGKILL)  # a session of its own: see envs
                except OSError:  # gone already (or its group number taken since)
                    pass

    def on_output(self, install: Install) -> None:
        """The installer printed (or ended): its lines go to the run's log, its verdict to the kernel."""
        fd = install.proc.stdout.fileno()
        try:
            data = os.read(fd, 1 << 16)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        *lines, install.partial = (install.partial + data).split(b"\n")
        if not data and install.partial:
            lines.append(install.partial)
            install.partial = b""
        shown = []
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            if line.startswith((envs.OK, envs.FAILED)):
                install.verdict = line
            else:
                shown.append(f"[{self.node} packages] {line}")
        if shown:
            self.send({"t": "log", "run": install.run, "rank": install.rank, "stream": "stdout",
                       "lines": shown, "partial": None, "time": time.time()})
        if data:
            return
        self.unwatch(fd)
        install.proc.stdout.close()
        self.installs.remove(install)
        if install.cancelled:
            install.verdict = f"{envs.FAILED}\t(the environment)\tcancelled"
        verdict = (install.verdict or f"{envs.FAILED}\t(the environment)\tthe installer ended without a word").split("\t")
        answer = {"t": "env_done", "run": install.run, "seconds": time.monotonic() - install.started,
                  "cached": False}
        if verdict[0] == envs.OK:
            answer["site"] = verdict[1]
        else:
            answer["error"] = verdict[2] if len(verdict) > 2 else "failed"
            answer["package"] = verdict[1] if len(verdict) > 1 else "?"
        self.send(answer)

    # --- pulling files back ----------------------------------------------------------------------
    def pull(self, message: dict) -> None:
        run, files, sent, same = message["run"], 0, 0, 0
        for rel, mode, size, chunks in self.mirror.pull(message["key"], message["path"], message.get("have") or {}):
            if chunks is None:
                same += 1
                continue
            files += 1
            for offset, data in chunks:
                self.send({"t": "pull_data", "run": run, "path": rel, "mode": mode, "size": size,
                           "offset": offset, "_buffers": [data]})
                sent += len(data)
        self.send({"t": "pull_done", "run": run, "files": files, "bytes": sent, "unchanged": same})
