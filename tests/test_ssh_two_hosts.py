"""Two "hosts" in two network namespaces, each with its own sshd, joined by a bridge: a 2-node
DDP cell across them. On a single host gloo's choice of interface never matters; here a rank
that advertises the wrong address (127.0.0.1, or an interface the other host cannot reach)
hangs or fails, so this is the test that catches the wrong-interface bug."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import psutil
import pytest

from lepton_magic.config import Config
from lepton_magic.session import Session
from lepton_magic.store import Store

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
IP = shutil.which("ip") or "/usr/sbin/ip"
SUBNET = "10.213.77"
HOSTS = {"lm-ha": f"{SUBNET}.1", "lm-hb": f"{SUBNET}.2"}
BRIDGE = "lm-hbr"


def _can_make_namespaces() -> bool:
    if os.geteuid() != 0 or not os.path.exists(IP) or not os.path.exists(SSHD):
        return False
    probe = subprocess.run([IP, "netns", "add", "lm-probe"], capture_output=True)
    if probe.returncode:
        return False
    subprocess.run([IP, "netns", "del", "lm-probe"], capture_output=True)
    return True


pytestmark = pytest.mark.skipif(not _can_make_namespaces(),
                                reason="needs root, iproute2 and sshd to build two test hosts")


def sh(*args: str) -> None:
    subprocess.run([IP, *args], check=True, capture_output=True)


def _teardown() -> None:
    for ns in HOSTS:
        subprocess.run([IP, "netns", "del", ns], capture_output=True)
    subprocess.run([IP, "link", "del", BRIDGE], capture_output=True)
    for ns in HOSTS:
        subprocess.run([IP, "link", "del", f"{ns}1"], capture_output=True)


@pytest.fixture(scope="module")
def two_hosts(tmp_path_factory):
    _teardown()  # leftovers of an interrupted run
    d = tmp_path_factory.mktemp("hosts")
    sh("link", "add", BRIDGE, "type", "bridge")
    sh("addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
    sh("link", "set", BRIDGE, "up")
    user = psutil.Process().username()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "user_key")], check=True)
    (d / "authorized").mkdir()
    shutil.copy(d / "user_key.pub", d / "authorized" / user)
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    known, procs = [], []
    try:
        for ns, addr in HOSTS.items():
            sh("netns", "add", ns)
            sh("link", "add", f"{ns}0", "type", "veth", "peer", "name", f"{ns}1")
            sh("link", "set", f"{ns}0", "netns", ns)
            sh("link", "set", f"{ns}1", "master", BRIDGE)
            sh("link", "set", f"{ns}1", "up")
            sh("-n", ns, "addr", "add", f"{addr}/24", "dev", f"{ns}0")
            sh("-n", ns, "link", "set", f"{ns}0", "up")
            sh("-n", ns, "link", "set", "lo", "up")
            key = d / f"{ns}_host_key"
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
            config = d / f"{ns}_sshd_config"
            config.write_text(
                f"Port 22\nListenAddress {addr}\nHostKey {key}\nPidFile {d / ns}.pid\n"
                f"AuthorizedKeysFile {d / 'authorized'}/%u\nUsePAM no\nPasswordAuthentication no\n"
                "StrictModes no\nPermitRootLogin prohibit-password\n"
            )
            procs.append(subprocess.Popen([IP, "netns", "exec", ns, SSHD, "-f", str(config), "-D",
                                           "-E", str(d / f"{ns}.log")]))
            pub = (d / f"{ns}_host_key.pub").read_text().split()
            known.append(f"{addr} {pub[0]} {pub[1]}")
        (d / "known_hosts").write_text("\n".join(known) + "\n")
        for addr in HOSTS.values():
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    socket.create_connection((addr, 22), timeout=0.3).close()
                    break
                except OSError:
                    time.sleep(0.1)
        yield {"user": user, "key": str(d / "user_key"), "known_hosts": str(d / "known_hosts")}
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        _teardown()


def test_ddp_across_two_hosts(two_hosts, tmp_path):
    config = Config.defaults()
    hosts = ",".join(f"{two_hosts['user']}@{addr}:22" for addr in HOSTS.values())
    for key, value in {"backend": "ssh", "ssh_hosts": hosts, "ssh_key": two_hosts["key"],
                       "ssh_known_hosts": two_hosts["known_hosts"], "ssh_python": sys.executable,
                       "preload": "torch"}.items():
        config.set(key, value)
    session = Session(config, Store(tmp_path / "home"))
    try:
        ns: dict = {}
        run = session.submit(
            "import os, socket, torch\n"
            "dist = lepton.init_distributed(timeout_s=60)\n"
            "total = torch.tensor([float(lepton.rank + 1)])\n"
            "dist.all_reduce(total)\n"
            "seen = [None, None]\n"
            "dist.all_gather_object(seen, (lepton.node, os.environ.get('GLOO_SOCKET_IFNAME')))\n",
            ns, nodes=2, timeout=120,
        ).wait(timeout=150)
        assert run.status == "succeeded"
        assert ns["total"].item() == 3.0
        assert ns["seen"] == [("ssh-0", "lm-ha0"), ("ssh-1", "lm-hb0")]
    finally:
        session.down()
