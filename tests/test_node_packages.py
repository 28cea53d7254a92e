"""Packages on the node (--pip) and hosts with nothing but Python (a bare venv as ssh_python),
over a real sshd on 127.0.0.1 (see tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from lepton_magic.agent import envs
from lepton_magic.errors import LeptonError
from test_ssh import SSHD, ssh_session

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD) or not shutil.which("ssh-keygen"),
    reason="needs openssh-server (sshd) and ssh-keygen; scripts/ci_ssh_deps.sh installs them",
)

#: Tiny and pure-Python, from PyPI through pip as configured here; not installed in the image.
PACKAGE = "termcolor"


def env_events(session, run) -> dict:
    rows = session.store.query("SELECT data FROM events WHERE run=? AND kind='workdir' ORDER BY id DESC LIMIT 1",
                               (run.seq,))
    return json.loads(rows[0]["data"])["nodes"]


def test_pip_installs_once_per_python_and_requirements(sshd, tmp_path):
    shutil.rmtree(envs.env_dir([PACKAGE]), ignore_errors=True)  # (the agent runs this same Python)
    session = ssh_session(sshd, tmp_path, nodes=2, preload="", workdir="none")
    try:
        ns: dict = {}
        cell = "import termcolor\nwhere = termcolor.__file__\n"
        t0 = time.monotonic()
        run = session.submit(cell, ns, nodes=2, pip=PACKAGE).wait(timeout=600)
        first_wall = time.monotonic() - t0
        assert run.status == "succeeded", run.error
        assert "/.cache/lepton_magic/envs/" in ns["where"]
        first = env_events(session, run)
        assert not all(n["env_cached"] for n in first.values())  # one node installed, the other waited
        assert "packages]" in run.logs()  # the install log is in the run's log

        t0 = time.monotonic()
        run2 = session.submit(cell, ns, nodes=2, pip=PACKAGE).wait(timeout=120)
        second_wall = time.monotonic() - t0
        assert run2.status == "succeeded", run2.error
        second = env_events(session, run2)
        assert all(n["env_cached"] for n in second.values())
        slowest_first = max(n["env_seconds"] for n in first.values())
        slowest_second = max(n["env_seconds"] for n in second.values())
        print(f"\n--pip {PACKAGE}: environment ready in {slowest_first:.2f} s the first time, "
              f"{slowest_second * 1e3:.1f} ms the second (whole run {first_wall:.2f} s, then {second_wall:.2f} s)")
        assert slowest_second < 0.5
    finally:
        session.down()


def test_a_package_that_cannot_install_is_one_table(sshd, tmp_path):
    session = ssh_session(sshd, tmp_path, nodes=2, preload="", workdir="none")
    try:
        try:  # (the failure is the run's: raised by submit, or by the run as it ends)
            run = session.submit("x = 1", {}, nodes=2, pip="lepton-magic-no-such-package==9.9.9")
            run.wait(timeout=300)
            assert run.status == "failed"
            text = str(run.error)
        except LeptonError as e:
            text = str(e)
        print("\n" + text)
        assert "2 of 2 node(s)" in text and "ssh-0" in text and "ssh-1" in text
        assert "lepton-magic-no-such-package" in text
        assert "Traceback" not in text
    finally:
        session.down()


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """A venv with nothing installed: no msgpack, cloudpickle, psutil or torch."""
    folder = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    python = folder / "bin" / "python"
    probe = subprocess.run([python, "-c", "import msgpack"], capture_output=True)
    assert probe.returncode != 0  # truly bare
    return str(python)


def test_a_bare_python_runs_plain_cells(sshd, tmp_path, bare_python):
    session = ssh_session(sshd, tmp_path, nodes=2, ssh_python=bare_python, preload="", workdir="none")
    try:
        pool = session.up(nodes=2)
        facts = pool.live_nodes[0].facts
        assert facts["executable"] == bare_python
        assert any("psutil" in m for m in facts.get("missing", []))  # said, not fatal
        ns = {"base": 10}
        run = session.submit("import socket\ntotal = base + lepton.rank + lepton.world_size\n", ns,
                             nodes=2).wait(timeout=120)
        assert run.status == "succeeded", run.error
        assert ns["total"] == 12
        time.sleep(2.5)  # a heartbeat with telemetry from /proc
        nodes = session.nodes()
        assert nodes["cpu_percent"].notna().all()
    finally:
        session.down()


def test_a_bare_python_refuses_torch_cells_before_the_run(sshd, tmp_path, bare_python):
    session = ssh_session(sshd, tmp_path, nodes=1, ssh_python=bare_python, preload="", workdir="none")
    try:
        with pytest.raises(LeptonError) as e:
            session.submit("import torch\nx = torch.ones(1)\n", {}, nodes=1)
        assert "no torch installed" in str(e.value) and "psutil" in str(e.value)
    finally:
        session.down()
