"""The ssh backend against a real sshd that the test starts on 127.0.0.1 (see shared/HARNESS.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

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


def ssh_session(sshd, tmp_path, nodes=2, **overrides) -> Session:
    config = Config.defaults()
    host = f"{sshd['user']}@127.0.0.1:{sshd['port']}"
    settings = {"backend": "ssh", "ssh_hosts": ",".join([host] * nodes), "ssh_key": sshd["key"],
                "ssh_known_hosts": sshd["known_hosts"], "ssh_python": sys.executable,
                "preload": "torch"}
    settings.update(overrides)
    for key, value in settings.items():
        config.set(key, value)
    return Session(config, Store(tmp_path / "home"))


def _agents(marker: str) -> list[int]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "lepton_magic.agent" in cmd and marker in cmd:
            out.append(p.pid)
    return out


def test_two_node_ddp_over_ssh(sshd, tmp_path):
    # Start from a host without the agent package, so this test sees it uploaded.
    from lepton_magic.backends.ssh import REMOTE_CACHE, package_zip

    (Path.home() / REMOTE_CACHE / f"lepton_magic-{package_zip()[1]}.zip").unlink(missing_ok=True)
    session = ssh_session(sshd, tmp_path)
    try:
        t0 = time.monotonic()
        pool = session.up(nodes=2)
        up = time.monotonic() - t0
        assert [n.facts["node"] for n in pool.live_nodes] == ["ssh-0", "ssh-1"]
        ns = {}
        run = session.submit(
            "import os, torch\ndist = lepton.init_distributed()\n"
            "total = torch.tensor([float(lepton.rank + 1)])\ndist.all_reduce(total)\n"
            "where = (os.environ['MASTER_ADDR'], lepton.world_size)\n",
            ns, nodes=2,
        ).wait(timeout=120)
        assert run.status == "succeeded" and ns["total"].item() == 3.0
        assert ns["where"] == ("127.0.0.1", 2)
        uploaded = pool.backend.uploaded_bytes
        assert uploaded > 0  # the package went over once
        session.submit("x = 1", ns, nodes=2).wait(timeout=60)  # warm: measure the dispatch
        t0 = time.monotonic()
        for _ in range(10):
            session.submit("x = 1", ns, nodes=2).wait(timeout=60)
        per_run = (time.monotonic() - t0) / 10
        print(f"\nssh pool up {up:.2f} s; trivial cell over ssh {per_run * 1e3:.1f} ms; uploaded {uploaded} bytes")
    finally:
        session.down()
    assert not _wait_no_agents("--node ssh-", 10)


def test_the_package_is_cached_on_the_host(sshd, tmp_path):
    session = ssh_session(sshd, tmp_path, nodes=1)
    try:
        pool = session.up(nodes=1)
        assert pool.backend.uploaded_bytes == 0  # the first test left it there
    finally:
        session.down()


def test_an_unknown_host_key_is_refused_with_the_way_out(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    session = ssh_session(sshd, tmp_path, nodes=1, ssh_known_hosts=str(empty))
    with pytest.raises(LeptonError) as info:
        session.up(nodes=1)
    message = str(info.value)
    assert "not in" in message and "ssh-keyscan" in message and "ssh_host_keys=accept-new" in message
    session.down()


def test_accept_new_trusts_on_first_use(sshd, tmp_path):
    fresh = tmp_path / "known_hosts"
    session = ssh_session(sshd, tmp_path, nodes=1, ssh_known_hosts=str(fresh), ssh_host_keys="accept-new")
    try:
        session.up(nodes=1)
        assert f"[127.0.0.1]:{sshd['port']} ssh-ed25519" in fresh.read_text()
    finally:
        session.down()


def test_a_changed_host_key_is_always_refused(sshd, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    pub = (tmp_path / "other_key.pub").read_text().split()
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"[127.0.0.1]:{sshd['port']} {pub[0]} {pub[1]}\n")
    session = ssh_session(sshd, tmp_path, nodes=1, ssh_known_hosts=str(wrong), ssh_host_keys="accept-new")
    with pytest.raises(LeptonError, match="changed"):
        session.up(nodes=1)
    session.down()


def _wait_no_agents(marker: str, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = _agents(marker)
        if not left:
            return []
        time.sleep(0.2)
    return _agents(marker)


def test_an_incompatible_node_fails_in_seconds_with_a_table(sshd, tmp_path):
    from lepton_magic import compat

    session = ssh_session(sshd, tmp_path, nodes=2)
    try:
        pool = session.up(nodes=2)
        pool.live_nodes[1].facts["python"] = "3.8.10"  # as a host with an older Python reports it
        pool.live_nodes[1].facts["torch"] = None
        t0 = time.monotonic()
        with pytest.raises(LeptonError) as info:
            session.submit("import torch\nx = torch.ones(1)\n", {}, nodes=2)
        assert time.monotonic() - t0 < 5
        text = str(info.value)
        assert "1 of 2 node(s) cannot run this cell" in text and "ssh-1" in text and "ssh-0" not in text
        assert "Python 3.8 there" in text and "no torch installed" in text
        assert not pool.busy  # the nodes are free again
        with pytest.raises(LeptonError) as info:  # a cell without torch: only Python is in the way
            session.submit("y = 2", {}, nodes=2)
        assert "Python 3.8 there" in str(info.value) and "torch" not in str(info.value).split("problem")[1]
        pool.live_nodes[1].facts["disk_free"] = compat.MIN_DISK_FREE // 2
        pool.live_nodes[1].facts["python"] = pool.live_nodes[0].facts["python"]
        with pytest.raises(LeptonError, match="0.5 GiB free on disk"):
            session.submit("y = 2", {}, nodes=2)
    finally:
        session.down()


def test_a_silent_ssh_node_is_lost_after_the_heartbeat_deadline(sshd, tmp_path):
    """Half-open: the connection stays up but nothing comes through it (here: the remote agent is
    stopped). The node must be lost by the deadline, not kept as ready."""
    import signal

    session = ssh_session(sshd, tmp_path, nodes=1, heartbeat_timeout="4s", preload="")
    try:
        pool = session.up(nodes=1)
        link = pool.live_nodes[0]
        pid = link.facts["pid"]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        while link.alive:
            assert time.monotonic() - t0 < 12, "the silent ssh node is still alive"
            time.sleep(0.1)
        row = session.store.query("SELECT status FROM nodes WHERE pool=?", (pool.id,))[0]
        assert row["status"] == "lost"
        events = session.store.query("SELECT data FROM events WHERE kind='node_lost'")
        assert "no heartbeat for" in events[-1]["data"]
        os.kill(pid, signal.SIGCONT)
    finally:
        session.close()
