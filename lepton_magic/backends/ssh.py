"""SSH hosts as nodes, reached with asyncssh.

Each node is an agent started over SSH on a configured host (``user@host:port``, a key file).
Host keys are checked against known_hosts; an unknown key is refused unless the user chose
``ssh_host_keys=accept-new`` (a changed key is always refused). The node needs Python and, for
torch cells, torch: this package travels as one zip, cached on the host by content hash.

The agent's stdin and stdout are bridged to local socket pairs, so everything above this module
(NodeLink, protocol, store, panel) is the same as for local nodes. Closing our end of stdin is
the agent's dead-man switch here too: sshd passes the EOF on, and the agent kills its ranks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import getpass
import hashlib
import io
import os
import shlex
import socket
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..agent import spot
from ..errors import LeptonError
from .base import Backend, LinkGone, NodeLink, OnLost, OnMessage, Resumer

CONNECT_TIMEOUT = 20.0
#: SSH keepalives: a peer that stopped answering (a vanished laptop, a dead instance) is noticed
#: within KEEPALIVE_SECONDS * KEEPALIVE_COUNT_MAX, not after TCP's two hours.
KEEPALIVE_SECONDS = 15.0
KEEPALIVE_COUNT_MAX = 4
REMOTE_CACHE = ".cache/lepton_magic"
#: An agent that has heard nothing from its kernel this long (the pool beats every 2 s) takes it
#: for gone: it stops its ranks and exits, or, for detached runs, waits for it to come back.
KERNEL_TIMEOUT = 60.0
#: An agent of detached runs with no run left waits this long for a kernel to come back.
LINGER_SECONDS = 600.0


class Unreachable(LeptonError):
    """No SSH connection to the host (yet): a fresh cloud instance may still be booting."""


@dataclass(frozen=True)
class Host:
    user: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> "Host":
        """``user@host:port``; user defaults to the local user, port to 22."""
        raw = text.strip()
        user, _, rest = raw.rpartition("@")
        host, _, port = rest.partition(":")
        if not host or (port and not port.isdigit()):
            raise ValueError(f"an SSH host looks like user@host:port, got {text!r}")
        return cls(user or getpass.getuser(), host, int(port or 22))

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


def parse_hosts(text: str) -> list[Host]:
    return [Host.parse(h) for h in str(text).split(",") if h.strip()]


def package_zip() -> tuple[bytes, str]:
    """This package's Python files as one zip (importable from the zip), and its hash."""
    root = Path(__file__).resolve().parents[1]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent)
            if "labextension" in rel.parts:
                continue
            info = zipfile.ZipInfo(str(rel), date_time=(2020, 1, 1, 0, 0, 0))  # same bytes, same hash
            z.writestr(info, path.read_bytes())
        for rel, path in agent_dependencies():
            z.writestr(zipfile.ZipInfo(f"{DEPS_DIR}/{rel}", date_time=(2020, 1, 1, 0, 0, 0)), path.read_bytes())
    data = buffer.getvalue()
    return data, hashlib.sha256(data).hexdigest()[:16]


#: The agent's own dependencies travel in the zip, under this folder, as pure Python (msgpack
#: then runs its pure-Python fallback): a host needs only Python. The agent puts the folder
#: last on sys.path (agent/__init__.py), so what the host has installed wins.
DEPS_DIR = "lepton_deps"
AGENT_DEPENDENCIES = ("msgpack", "cloudpickle", "pynvml")


def agent_dependencies() -> list[tuple[str, Path]]:
    """(path in the zip under DEPS_DIR, file) of the Python files of the agent's dependencies
    this kernel has (pynvml, from nvidia-ml-py, is optional)."""
    import importlib.util

    files = []
    for name in AGENT_DEPENDENCIES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            continue
        origin = Path(spec.origin)
        if spec.submodule_search_locations:
            for path in sorted(origin.parent.rglob("*.py")):
                files.append((f"{name}/{path.relative_to(origin.parent).as_posix()}", path))
        elif origin.suffix == ".py":
            files.append((origin.name, origin))
    return files


class _Loop:
    """One asyncio loop in a daemon thread for every SSH connection of the process."""

    _instance: "_Loop | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name="lepton-ssh").start()

    @classmethod
    def get(cls) -> "_Loop":
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def run(self, coro, timeout: float | None = None):
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except BaseException:
            # A timeout or Ctrl-C here must not leave the coroutine going on (and opening a
            # connection nobody will close) behind our back.
            future.cancel()
            raise


class SSHBackend(Backend, Resumer):
    """Pools of detached runs (``resumable``) start agents that outlive their SSH connection:
    a link that drops connects again through ``lepton_magic.agent.bridge`` to the agent's
    resume socket and gets what it missed from the agent's journal (see agent/uplink.py)."""

    name = "ssh"

    def __init__(self, settings: dict):
        super().__init__(settings)
        hosts = settings.get("ssh_hosts") or ""
        self.hosts = parse_hosts(hosts)
        if not self.hosts:
            raise LeptonError("the ssh backend needs hosts: %lepton config ssh_hosts=user@host:port,...")
        self.key = settings.get("ssh_key") or None
        self.known_hosts = settings.get("ssh_known_hosts") or str(Path.home() / ".ssh" / "known_hosts")
        self.policy = settings.get("ssh_host_keys") or "strict"
        self.python = settings.get("ssh_python") or "python3"
        self.spot_metadata = spot.metadata_url(settings)
        self._nodes: dict[str, tuple] = {}  # name -> (connection, process, host, our sockets)
        self.resumable = bool(settings.get("resumable"))
        self.timeout = float(settings.get("resume_timeout") or Resumer.timeout)
        self._pool = settings.get("pool_id") or "pool"
        self._retired: dict[str, tuple] = {}  # our ends of a replaced connection, closed at the next
        self.uploaded_bytes = 0  # agent package bytes sent (0 when every host had it cached)
        self._loop = _Loop.get()

    # --- nodes -----------------------------------------------------------------------------
    def start_nodes(self, names: list[str], secret: bytes, on_message: OnMessage, on_lost: OnLost,
                    log_dir: str) -> list[NodeLink]:
        links = []
        for name in names:
            index = int(name.rsplit("-", 1)[-1]) if name.rsplit("-", 1)[-1].isdigit() else len(self._nodes)
            host = self.hosts[index % len(self.hosts)]
            try:
                links.append(self._loop.run(self._start(name, host, secret, on_message, on_lost, log_dir),
                                            CONNECT_TIMEOUT * 3))
            except BaseException as e:
                self.stop_started(links)
                raise start_failed(name, len(links) + 1, len(names), host, e, len(links)) from None
        return links

    def stop_started(self, links: list[NodeLink]) -> None:
        """A start that failed half-way: the nodes it had started go too (their connections
        closed), since the pool never learns of them."""
        for link in links:
            try:
                self.stop_node(link, wait=2.0)
            except Exception:  # keep stopping the others
                pass

    async def _start(self, name: str, host: Host, secret: bytes, on_message: OnMessage, on_lost: OnLost,
                     log_dir: str) -> NodeLink:
        conn = await self._connect(host)
        stdin_ours, stdin_theirs = socket.socketpair()
        stdout_ours, stdout_theirs = socket.socketpair()
        try:
            remote_zip = await self._ensure_package(conn)
            # On the command line, not in the environment: sshd passes only what its AcceptEnv allows.
            watch = "".join(f" {shlex.quote(a)}" for a in spot.agent_arguments(self.spot_metadata))
            resume = (f' --resume-socket "{self._socket(name)}" --linger {LINGER_SECONDS:g}'
                      if self.resumable else "")
            command = (f'PYTHONPATH="{remote_zip}"${{PYTHONPATH:+:$PYTHONPATH}} '
                       f"exec {self.python} -m lepton_magic.agent --node {name}{watch}"
                       f" --kernel-timeout {KERNEL_TIMEOUT:g}{resume}")
            process = await conn.create_process(
                command, stdin=stdin_theirs, stdout=stdout_theirs,
                stderr=os.path.join(log_dir, f"agent-{name}.log"), encoding=None,
            )
        except BaseException:  # (cancelled too) nobody else would close them
            conn.close()
            for s in (stdin_ours, stdin_theirs, stdout_ours, stdout_theirs):
                s.close()
            raise
        stdin_theirs.close()
        stdout_theirs.close()
        self._nodes[name] = (conn, process, host, stdin_ours, stdout_ours, remote_zip)
        return NodeLink(name, stdin_ours.fileno(), stdout_ours.fileno(), secret, on_message, on_lost,
                        resumer=self if self.resumable else None)

    def _socket(self, name: str) -> str:
        return f"$HOME/{REMOTE_CACHE}/agents/{self._pool}-{name}.sock"

    # --- coming back to an agent of detached runs ----------------------------------------------
    def reconnect(self, link: NodeLink) -> tuple[int, int]:
        return self._loop.run(self._reconnect(link), CONNECT_TIMEOUT * 2)

    async def _reconnect(self, link: NodeLink) -> tuple[int, int]:
        entry = self._nodes.get(link.name)
        if entry is None:
            raise LinkGone(f"{link.name} was stopped")
        old_conn, _process, host, old_in, old_out, remote_zip = entry
        conn = await self._connect(host)
        stdin_ours, stdin_theirs = socket.socketpair()
        stdout_ours, stdout_theirs = socket.socketpair()
        try:
            process = await conn.create_process(
                f'PYTHONPATH="{remote_zip}"${{PYTHONPATH:+:$PYTHONPATH}} '
                f'exec {self.python} -m lepton_magic.agent.bridge "{self._socket(link.name)}"',
                stdin=stdin_theirs, stdout=stdout_theirs, encoding=None,
            )
            said = await asyncio.wait_for(process.stderr.readline(), CONNECT_TIMEOUT)
        except BaseException:
            conn.close()
            for s in (stdin_ours, stdin_theirs, stdout_ours, stdout_theirs):
                s.close()
            raise
        finally:
            stdin_theirs.close()
            stdout_theirs.close()
        if not said.startswith(b"lepton bridge: connected"):
            conn.close()
            stdin_ours.close()
            stdout_ours.close()
            raise LinkGone(said.decode(errors="replace").strip() or "the agent's resume socket did not answer")
        old_conn.close()
        for sock in self._retired.pop(link.name, ()):  # the link took the previous ones long ago
            sock.close()
        self._retired[link.name] = (old_in, old_out)  # the link still holds these until it swaps
        self._nodes[link.name] = (conn, process, host, stdin_ours, stdout_ours, remote_zip)
        return stdin_ours.fileno(), stdout_ours.fileno()

    def disconnect(self, link: NodeLink) -> None:
        entry = self._nodes.get(link.name)
        if entry is not None:
            self._loop.loop.call_soon_threadsafe(entry[0].close)

    async def _connect(self, host: Host):
        import asyncssh

        options = dict(host=host.host, port=host.port, username=host.user,
                       client_keys=[self.key] if self.key else None, connect_timeout=CONNECT_TIMEOUT,
                       keepalive_interval=KEEPALIVE_SECONDS, keepalive_count_max=KEEPALIVE_COUNT_MAX)
        try:
            return await asyncssh.connect(known_hosts=self.known_hosts if os.path.exists(self.known_hosts)
                                          else (), **options)
        except asyncssh.HostKeyNotVerifiable:
            if self.policy != "accept-new" or self._is_known(host):
                what = "changed" if self._is_known(host) else "not in"
                hint = ("it CHANGED: remove the old entry only if you know why"
                        if what == "changed" else
                        f"add it with `ssh-keyscan -p {host.port} {host.host} >> {self.known_hosts}`, "
                        "or trust new hosts on first use: %lepton config ssh_host_keys=accept-new")
                raise LeptonError(f"the host key of {host} is {what} {self.known_hosts}; {hint}") from None
            conn = await asyncssh.connect(known_hosts=None, **options)
            self._remember(host, conn.get_server_host_key())
            return conn
        except (OSError, asyncssh.Error) as e:
            raise Unreachable(f"cannot reach {host} over SSH: {e}") from None

    def _is_known(self, host: Host) -> bool:
        import asyncssh

        if not os.path.exists(self.known_hosts):
            return False
        trusted = asyncssh.read_known_hosts(self.known_hosts).match(host.host, "", host.port)[0]
        return bool(trusted)

    def _remember(self, host: Host, key) -> None:
        name = host.host if host.port == 22 else f"[{host.host}]:{host.port}"
        Path(self.known_hosts).parent.mkdir(parents=True, exist_ok=True)
        with open(self.known_hosts, "a") as f:
            f.write(f"{name} {key.export_public_key().decode().strip()}\n")

    async def _ensure_package(self, conn) -> str:
        """Upload this package's zip unless the host has it already (named by content hash).
        Plain shell over the exec channel: no SFTP subsystem needed on the host."""
        data, digest = package_zip()
        remote = f"$HOME/{REMOTE_CACHE}/lepton_magic-{digest}.zip"
        check = await conn.run(f'test -f "{remote}" && echo cached', encoding=None)
        if check.stdout.strip() != b"cached":
            sent = await conn.run(
                f'mkdir -p "$HOME/{REMOTE_CACHE}" && cat > "{remote}.$$" && mv "{remote}.$$" "{remote}"',
                input=data, encoding=None,
            )
            if sent.exit_status != 0:
                raise LeptonError(f"could not copy the agent to the host: {sent.stderr.decode(errors='replace')}")
            self.uploaded_bytes += len(data)
        return remote

    def master_addr(self, link: NodeLink) -> str:
        return self._nodes[link.name][2].host

    def stop_node(self, link: NodeLink, wait: float = 5.0) -> None:
        link.stopped = True  # no coming back from here
        entry = self._nodes.pop(link.name, None)
        if entry is None:
            return
        conn, process, _host, stdin_ours, stdout_ours, _zip = entry
        link.send({"t": "shutdown"})
        stdin_ours.close()  # EOF: the agent kills its ranks and exits

        async def finish():
            try:
                await asyncio.wait_for(process.wait_closed(), wait)
            except (asyncio.TimeoutError, Exception):
                process.terminate()  # SIGTERM over the channel (OpenSSH 9 honours it)
            conn.close()

        try:
            self._loop.run(finish(), wait + 5)
        finally:
            stdout_ours.close()
            for sock in self._retired.pop(link.name, ()):
                sock.close()


def start_failed(name: str, position: int, asked: int, where: object, error: BaseException,
                 stopped: int) -> BaseException:
    """The one line a failed start raises: which node, where, why, and what was undone. Ctrl-C
    stays a KeyboardInterrupt."""
    if not isinstance(error, Exception):
        return error
    cause = str(error) or type(error).__name__
    if isinstance(error, (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)):
        cause = "no answer within the start timeout"
    undone = f"; stopped the {stopped} node(s) already started" if stopped else ""
    return LeptonError(f"node {name} ({position} of {asked}, {where}) did not start: {cause}{undone}")
