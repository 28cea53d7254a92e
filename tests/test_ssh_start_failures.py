"""SSH nodes that fail to start or stop answering, against the real loopback sshd (shared/HARNESS.md):
a start that fails half-way leaves no agent and no connection, and a peer that goes silent is
noticed by the SSH keepalives."""

from __future__ import annotations

import os
import select
import shutil
import socket
import sys
import threading
import time

import psutil
import pytest

from lepton_magic.config import Config
from lepton_magic.errors import LeptonError
from lepton_magic.session import Session
from lepton_magic.store import Store

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD) or not shutil.which("ssh-keygen"),
    reason="needs openssh-server (sshd) and ssh-keygen; scripts/ci_ssh_deps.sh installs them",
)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def _our_sshd(sshd) -> psutil.Process:
    """The sshd this test session started (its children are the sessions it serves)."""
    config = str(sshd["dir"] / "sshd_config")
    return next(p for p in psutil.Process().children() if config in " ".join(_cmdline(p)))


def _agents_of(sshd) -> list[psutil.Process]:
    return [p for p in _our_sshd(sshd).children(recursive=True)
            if "lepton_magic.agent" in " ".join(_cmdline(p))]


def _cmdline(process: psutil.Process) -> list[str]:
    """A process's command line; none for one that has ended (a zombie another test left)."""
    try:
        return process.cmdline()
    except (psutil.ZombieProcess, psutil.NoSuchProcess):
        return []


def _connections_to(port: int) -> list:
    return [c for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def test_a_start_that_fails_at_node_2_of_3_leaves_nothing_behind(sshd, tmp_path):
    good = f"{sshd['user']}@127.0.0.1:{sshd['port']}"
    bad = f"{sshd['user']}@127.0.0.1:{_closed_port()}"
    config = Config.defaults()
    for key, value in {"backend": "ssh", "ssh_hosts": f"{good},{bad},{good}", "ssh_key": sshd["key"],
                       "ssh_known_hosts": sshd["known_hosts"], "ssh_python": sys.executable,
                       "preload": ""}.items():
        config.set(key, value)
    session = Session(config, Store(tmp_path / "home"))
    try:
        with pytest.raises(LeptonError) as info:
            session.up(nodes=3)
        message = str(info.value)
        assert message.startswith(f"node ssh-1 (2 of 3, {bad}) did not start: cannot reach {bad} over SSH")
        assert message.endswith("stopped the 1 node(s) already started")
        backend = session.pool("ssh").backend
        assert backend._nodes == {}
        assert _wait_until(lambda: not _connections_to(sshd["port"]), 10), "a connection to sshd is left open"
        assert _wait_until(lambda: not _agents_of(sshd), 10), "an agent of the failed start still runs"
    finally:
        session.down()


class FreezableProxy:
    """A TCP relay to the sshd that can stop relaying while keeping both sockets open: to the
    client, a peer that vanished without a FIN (a laptop gone to sleep, a dead instance)."""

    def __init__(self, port: int):
        self.target = port
        self.frozen = threading.Event()
        self.closed = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        while not self.closed.is_set():
            if self.frozen.is_set():
                time.sleep(0.05)
                continue
            try:
                ready, _, _ = select.select([client, server], [], [], 0.05)
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        return
                    peer[s].sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.closed.set()
        for s in self.sockets:
            s.close()


def test_keepalives_notice_a_peer_that_went_silent(sshd, tmp_path, monkeypatch):
    from lepton_magic.backends import ssh
    from lepton_magic.protocol import new_secret

    assert (ssh.KEEPALIVE_SECONDS, ssh.KEEPALIVE_COUNT_MAX) == (15.0, 4)  # what real pools use
    monkeypatch.setattr(ssh, "KEEPALIVE_SECONDS", 0.5)  # the same mechanism, on a test's clock
    monkeypatch.setattr(ssh, "KEEPALIVE_COUNT_MAX", 3)
    proxy = FreezableProxy(sshd["port"])
    backend = ssh.SSHBackend({"ssh_hosts": f"{sshd['user']}@127.0.0.1:{proxy.port}", "ssh_key": sshd["key"],
                              "ssh_known_hosts": str(tmp_path / "known_hosts"), "ssh_host_keys": "accept-new",
                              "ssh_python": sys.executable})
    lost = []
    link = None
    try:
        [link] = backend.start_nodes(["ssh-0"], new_secret(), lambda link, m: None,
                                     lambda link, why: lost.append(why), str(tmp_path))
        assert link.ready.wait(30) and link.alive
        time.sleep(2.0)  # (while the node starts: its zygote imports torch on 2 cores)
        assert link.alive  # keepalives answered: nothing is lost while the peer answers
        proxy.frozen.set()
        t0 = time.monotonic()
        assert _wait_until(lambda: not link.alive, 10), "a silent peer was not noticed"
        noticed = time.monotonic() - t0
        assert noticed < 5.0
        print(f"\nsilent SSH peer noticed after {noticed:.2f} s (keepalive 0.5 s x 3)")
    finally:
        proxy.close()
        if link is not None:
            backend.stop_node(link, wait=1.0)
    assert lost and _wait_until(lambda: not _agents_of(sshd), 10)
