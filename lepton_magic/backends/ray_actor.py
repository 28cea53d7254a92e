"""The node end of the ray backend: one actor per node starts the agent and is its byte pipe.

Node-side code: it imports nothing of the kernel side (no store, no session, no IPython), only
ray and the standard library, so Ray can ship this class by value; the package itself comes as
one zip through the object store (``py_modules`` with a local folder is refused for a single
actor: Ray takes it only in ``ray.init``, which a user may have called already).

The agent is an ordinary child process (``python -m lepton_magic.agent``, as every backend
starts it): its stdin is fed by ``write`` and its stdout is read by ``drain``. Both move batches,
because one actor call per frame tops out near 10^3 calls/s (10^2 through Ray Client), while one
call carrying a batch of messages moves 10^5 and more. ``drain`` is a long poll the kernel keeps
two of in flight: while one answer travels, the next batch collects. Plain calls, no streaming
generators: Ray Client has none (ray #43357).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
import tempfile

import ray

#: What the agent may write ahead of the kernel before it has to wait (the kernel drains fast;
#: this only bounds memory when the kernel stops draining).
MAX_BUFFERED = 64 << 20


class AgentActor:
    """An async actor: a drain parked in its long poll never holds up a write."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._buffer = bytearray()
        self._eof = False
        self._more = asyncio.Event()  # bytes (or the end) arrived
        self._room = asyncio.Event()  # the buffer went below MAX_BUFFERED
        self._turn = asyncio.Condition()  # drains answer in the order they were sent
        self._next_drain = 0
        self._folder = ""

    async def start(self, node: str, preload: str, package: bytes) -> dict:
        """Start the agent from ``package`` (the zip of lepton_magic, importable as it is);
        return where Ray put this node (what the panel shows of it)."""
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        # Its own private folder: `-m` puts the current folder first on sys.path, and a stray
        # psutil.py or msgpack.py there must not replace the agent's own. Ranks run here too
        # (nothing of the notebook's folder is on a Ray node).
        self._folder = tempfile.mkdtemp(prefix=f"lepton-{node}-")
        package_path = os.path.join(self._folder, "lepton_magic.zip")
        with open(package_path, "wb") as f:
            f.write(package)
        env = dict(os.environ, LEPTON_PRELOAD=preload)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_path, env.get("PYTHONPATH")) if p)
        if not gpu_ids:
            # Since ray #54868 an actor with 0 GPUs sees every GPU of its machine: its ranks must not.
            env["CUDA_VISIBLE_DEVICES"] = ""
        log_path = os.path.join(self._folder, "agent.log")
        with open(log_path, "ab") as log:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lepton_magic.agent", "--node", node, "--parent-pid", str(os.getpid()),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
                env=env, cwd=self._folder, start_new_session=True,
            )
        self._room.set()
        asyncio.get_running_loop().create_task(self._read_agent())
        context = ray.get_runtime_context()
        return {
            "ray_node_id": context.get_node_id(),
            "ip": ray.util.get_node_ip_address(),
            "gpu_ids": gpu_ids,
            "cpus": context.get_assigned_resources().get("CPU"),
            "actor_pid": os.getpid(),
            "agent_pid": self._proc.pid,
            "log": log_path,
        }

    async def _read_agent(self) -> None:
        stdout = self._proc.stdout
        while True:
            await self._room.wait()
            data = await stdout.read(1 << 20)
            if not data:
                self._eof = True
                self._more.set()
                return
            self._buffer += data
            self._more.set()
            if len(self._buffer) >= MAX_BUFFERED:
                self._room.clear()

    async def drain(self, seq: int, max_bytes: int, timeout: float) -> bytes | None:
        """Call number ``seq``: what the agent wrote since the last call, up to ``max_bytes``;
        waits up to ``timeout`` for the first byte. None once the agent has exited and
        everything it wrote was taken."""
        async with self._turn:
            await self._turn.wait_for(lambda: self._next_drain == seq)
        try:
            if not self._buffer and not self._eof:
                try:
                    await asyncio.wait_for(self._more.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
            data = bytes(self._buffer[:max_bytes])
            del self._buffer[:max_bytes]
            if not self._buffer and not self._eof:
                self._more.clear()
            if len(self._buffer) < MAX_BUFFERED:
                self._room.set()
            return None if not data and self._eof else data
        finally:
            async with self._turn:
                self._next_drain += 1
                self._turn.notify_all()

    async def write(self, data: bytes) -> bool:
        """Into the agent's stdin; False when it is gone (its end shows in ``drain``)."""
        try:
            self._proc.stdin.write(data)
            await self._proc.stdin.drain()
            return True
        except (ConnectionError, OSError):
            return False

    async def close(self, wait: float) -> int | None:
        """EOF on the agent's stdin (it kills its ranks and exits), then SIGKILL to its process
        group if it has not gone within ``wait`` seconds. Returns its exit status."""
        if self._proc is None:
            return None
        try:
            self._proc.stdin.close()
        except (ConnectionError, OSError):
            pass
        try:
            status = await asyncio.wait_for(self._proc.wait(), wait)
        except asyncio.TimeoutError:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            status = await self._proc.wait()
        shutil.rmtree(self._folder, ignore_errors=True)  # stopped on purpose: nothing to look at
        return status

    async def free_port(self) -> int:
        """A port free now on this node's address: rank 0's rendezvous (MASTER_PORT)."""
        with socket.socket() as s:
            s.bind((ray.util.get_node_ip_address(), 0))
            return s.getsockname()[1]

    async def how_it_ended(self, limit: int = 600) -> str:
        """How the agent ended (its exit status, the end of its stderr), in a few words."""
        try:
            status = await asyncio.wait_for(self._proc.wait(), 2.0)
        except asyncio.TimeoutError:
            status = None
        said = f"exit status {status}" if status is None or status >= 0 else f"killed by signal {-status}"
        try:
            with open(os.path.join(self._folder, "agent.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                lines = f.read().decode(errors="replace").strip().splitlines()
        except OSError:
            lines = []
        return said + (f"; its log ends: {lines[-1]}" if lines else "")
