"""The embedded default: nodes are agent processes on this machine. No configuration, no network."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import sys

from .. import private, sharedmem
from ..errors import LeptonError
from ..agent import spot
from .base import Backend, NodeLink, OnLost, OnMessage
from .direct import DirectRanks


def _widen_pipe(fd: int) -> None:
    """Give the agent's output pipe 1 MiB instead of 64 KiB: fewer wake-ups for large results."""
    try:
        fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size, or not Linux


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


class LocalBackend(Backend):
    name = "local"

    def __init__(self, settings: dict):
        super().__init__(settings)
        self._procs: dict[str, subprocess.Popen] = {}
        self._shm: str | None = None

    def start_nodes(self, names: list[str], secret: bytes, on_message: OnMessage, on_lost: OnLost,
                    log_dir: str) -> list[NodeLink]:
        links: list[NodeLink] = []
        env = dict(os.environ, LEPTON_PRELOAD=self.settings.get("preload", "torch"))
        watch = spot.agent_arguments(spot.metadata_url(self.settings))  # tests: a fake metadata server
        for name in names:
            try:
                links.append(self._start_node(name, secret, on_message, on_lost, log_dir, env, watch))
            except OSError as e:  # no process could be made (too many files, no memory): all or none
                for link in links:
                    self.stop_node(link)
                raise LeptonError(f"could not start local node {name}: {e.strerror or e}") from e
        return links

    def _start_node(self, name: str, secret: bytes, on_message: OnMessage, on_lost: OnLost, log_dir: str,
                    env: dict, watch: list[str]) -> NodeLink:
        # The agent offers its standbys on this socket: the kernel then talks to them straight.
        offers, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) if _direct() else (None, None)
        direct = ["--direct-fd", str(theirs.fileno())] if theirs else []
        try:
            with private.open_file(os.path.join(log_dir, f"agent-{name}.log"), "ab") as agent_log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "lepton_magic.agent", "--node", name,
                     "--parent-pid", str(os.getpid()), *watch, *direct],
                    pass_fds=[theirs.fileno()] if theirs else [],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=agent_log,
                    bufsize=0,
                    env=env,
                    # Not the notebook's folder: `-m` puts the current folder first on sys.path, and
                    # a user's psutil.py or msgpack.py there must not replace the agent's own.
                    # Ranks move to the notebook's folder for each run (rank_cwd).
                    cwd=log_dir,
                    # Its own session: a terminal's Ctrl-C reaches the kernel, which cancels
                    # the run itself; the agent must not die half-way on the same signal.
                    start_new_session=True,
                )
        except BaseException:
            for sock in (offers, theirs):
                if sock is not None:
                    sock.close()
            raise
        self._procs[name] = proc
        _widen_pipe(proc.stdout.fileno())
        link = NodeLink(name, proc.stdin.fileno(), proc.stdout.fileno(), secret, on_message, on_lost)
        if offers is not None:
            theirs.close()
            link.direct = DirectRanks(link, offers)
        return link

    def master_addr(self, link: NodeLink) -> str:
        return "127.0.0.1"

    def rank_cwd(self) -> str | None:
        """The notebook's current directory now (after any %cd), as if the cell ran there."""
        return os.getcwd()

    def shared_memory_dir(self) -> str | None:
        if self._shm is None:
            self._shm = sharedmem.default_dir() or ""
        return self._shm or None

    def stop_node(self, link: NodeLink, wait: float = 5.0) -> None:
        proc = self._procs.pop(link.name, None)
        if proc is None:
            return
        link.send({"t": "shutdown"})
        try:
            proc.stdin.close()  # EOF alone makes the agent kill its ranks and exit
        except OSError:
            pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        if link.direct is not None:
            link.direct.close()


def _direct() -> bool:
    """Ranks answer the kernel straight (backends/direct); LEPTON_DIRECT_RANKS=0 sends everything
    through the agents, as on other machines (benchmarks compare the two)."""
    return os.environ.get("LEPTON_DIRECT_RANKS", "1") != "0"
