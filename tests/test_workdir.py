"""The notebook's folder on ssh nodes: mirrored before the run, incrementally, and pulled back
(a real sshd on 127.0.0.1, see tests/conftest.py)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from lepton_magic import workdir
from lepton_magic.config import Config
from lepton_magic.errors import LeptonError
from test_ssh import SSHD, ssh_session

pytestmark = pytest.mark.skipif(
    not os.path.exists(SSHD) or not shutil.which("ssh-keygen"),
    reason="needs openssh-server (sshd) and ssh-keygen; scripts/ci_ssh_deps.sh installs them",
)


def make_project(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models.py").write_text(
        f"# {os.urandom(8).hex()}\n"  # new bytes every time: the node's blob cache outlives a test session
        "class Net:\n"
        "    def __init__(self, width=4):\n"
        "        self.width = width\n"
        "    def forward(self, xs):\n"
        "        return [x * self.width for x in xs]\n")
    (folder / "data").mkdir(exist_ok=True)
    (folder / "data" / "train.csv").write_text("x,y\n" + "".join(f"{i},{2 * i}\n" for i in range(100)))
    (folder / "data" / "seed.txt").write_text(os.urandom(8).hex())
    (folder / ".gitignore").write_text("scratch/\n*.log\n")
    (folder / "scratch").mkdir(exist_ok=True)
    (folder / "scratch" / "big.bin").write_bytes(b"\0" * 100_000)
    (folder / "debug.log").write_text("not sent\n")
    return folder


def sync_events(session, run) -> list[dict]:
    rows = session.store.query("SELECT data FROM events WHERE run=? AND kind='workdir' ORDER BY id", (run.seq,))
    return [json.loads(r["data"]) for r in rows]


CELL = (
    "import csv, os\n"
    "from models import Net\n"
    "rows = list(csv.DictReader(open('data/train.csv')))\n"
    "out = Net(3).forward([int(r['x']) for r in rows[:3]])\n"
    "here = os.getcwd()\n"
    "seen = sorted(os.listdir('.'))\n"
    "os.makedirs('checkpoints', exist_ok=True)\n"
    "if lepton.rank == 0:\n"
    "    open('checkpoints/model.txt', 'w').write(f'weights of {lepton.node} {len(rows)}')\n"
)


def test_project_folder_travels_and_comes_back(sshd, tmp_path):
    project = make_project(tmp_path / "proj")
    session = ssh_session(sshd, tmp_path, nodes=2, preload="")
    try:
        ns: dict = {}
        run = session.submit(CELL, ns, nodes=2, workdir=str(project)).wait(timeout=120)
        assert run.status == "succeeded", run.error
        assert ns["out"] == [0, 3, 6]
        assert "models.py" in ns["seen"] and "data" in ns["seen"]
        assert "scratch" not in ns["seen"] and "debug.log" not in ns["seen"]  # .gitignore honoured
        assert ns["here"] != str(project) and "/.cache/lepton_magic/work/proj-" in ns["here"]
        first = sync_events(session, run)[-1]
        assert first["files"] == 4 and first["sent_bytes"] > 0

        # Unchanged: the second run sends nothing.
        run2 = session.submit(CELL, ns, nodes=2, workdir=str(project)).wait(timeout=120)
        assert run2.status == "succeeded", run2.error
        second = sync_events(session, run2)[-1]
        print(f"\nworkdir first sync sent {first['sent_bytes']} bytes, second {second['sent_bytes']}")
        assert second["sent_bytes"] == 0
        assert all(n["sent_files"] == 0 for n in second["nodes"].values())

        # One file changed: only it travels.
        (project / "models.py").write_text((project / "models.py").read_text() + "\nVERSION = 2\n")
        run3 = session.submit("from models import VERSION\nversion = VERSION\n", ns, nodes=2, workdir=str(project)).wait(timeout=120)
        assert run3.status == "succeeded", run3.error
        assert ns["version"] == 2
        third = sync_events(session, run3)[-1]
        assert 0 < third["sent_bytes"] <= 2 * (project / "models.py").stat().st_size
        # A file removed from the project goes from the mirror; what the ranks wrote stays.
        (project / "data" / "train.csv").unlink()
        run4 = session.submit("import os\ngone = not os.path.exists('data/train.csv')\n"
                              "kept = os.path.exists('checkpoints/model.txt')\n", ns, nodes=1,
                              workdir=str(project)).wait(timeout=120)
        assert run4.status == "succeeded", run4.error
        assert ns["gone"] and ns["kept"]

        # Pull: rank 0's checkpoint comes back into the project; again, nothing moves.
        pulled = run.pull("checkpoints/")
        assert (project / "checkpoints" / "model.txt").read_text() == "weights of ssh-0 100"
        assert pulled["files"] == 1 and pulled["bytes"] > 0
        again = run.pull("checkpoints/")
        assert again["files"] == 0 and again["bytes"] == 0 and again["unchanged"] == 1
    finally:
        session.down()


def test_sibling_module_outside_the_workdir_is_shipped(sshd, tmp_path, monkeypatch):
    lib = tmp_path / "elsewhere"
    lib.mkdir()
    (lib / "helpers_for_lepton_test.py").write_text("def double(x):\n    return 2 * x\n")
    monkeypatch.syspath_prepend(str(lib))
    session = ssh_session(sshd, tmp_path, nodes=1, preload="")
    try:
        ns: dict = {}
        run = session.submit("from helpers_for_lepton_test import double\ny = double(21)\n", ns, nodes=1,
                             workdir="none").wait(timeout=120)
        assert run.status == "succeeded", run.error
        assert ns["y"] == 42
    finally:
        session.down()


def test_local_runs_need_no_sync(tmp_path):
    config = Config.defaults()
    assert workdir.plan_run(config, False, None, {}, []) is None


def test_size_cap_lists_the_largest_files(tmp_path):
    project = make_project(tmp_path / "proj")
    (project / "weights.bin").write_bytes(b"\1" * 300_000)
    config = Config.defaults()
    config.set("workdir_max_bytes", "100KB")
    with pytest.raises(LeptonError) as e:
        workdir.plan_run(config, True, None, {}, [], workdir=str(project))
    assert "weights.bin" in str(e.value) and "workdir_max_bytes" in str(e.value)
    assert "scratch" not in str(e.value)  # ignored files do not count
    config.set("workdir_exclude", "*.bin")
    plan = workdir.plan_run(config, True, None, {}, [], workdir=str(project))
    assert sorted(plan.files) == [".gitignore", "data/seed.txt", "data/train.csv", "models.py"]


def test_a_missing_workdir_is_one_line(tmp_path):
    with pytest.raises(LeptonError, match="is not a folder"):
        workdir.plan_run(Config.defaults(), True, None, {}, [], workdir=str(tmp_path / "nope"))


def test_nested_gitignore(tmp_path):
    project = make_project(tmp_path / "proj")
    (project / "data" / ".gitignore").write_text("*.tmp\n")
    (project / "data" / "x.tmp").write_text("no")
    plan = workdir.plan_run(Config.defaults(), True, None, {}, [], workdir=str(project))
    assert "data/x.tmp" not in plan.files and "data/train.csv" in plan.files


def test_a_sweeps_trials_and_a_detached_run_get_the_folder_too(sshd, tmp_path):
    """The plan travels with the run's spec: every trial of a sweep, and the keeper of a
    detached run, mirror the folder before their ranks start."""
    from lepton_magic.sweeps.space import make_spec

    project = make_project(tmp_path / "proj")
    session = ssh_session(sshd, tmp_path, nodes=2, preload="")
    try:
        code = "from models import Net\nlepton.log(step=0, loss=Net(width).forward([1])[0])\n"
        sweep = session.submit(code, {}, nodes=2, workdir=str(project), sweep=make_spec("width=[2,5]"))
        sweep.wait(120)
        assert sweep.status == "succeeded", sweep.error
        assert sorted(sweep.trials["objective"]) == [2.0, 5.0]

        ns: dict = {}
        detached = session.submit("from models import Net\nout = Net(7).forward([1])\n", ns, nodes=1,
                                  workdir=str(project), detach=True)
        detached.wait(120)
        session.bind_pending(detached.seq)
        assert detached.status == "succeeded", detached.error
        assert ns["out"] == [7]
    finally:
        session.close()


def test_lepton_home_inside_the_folder_is_never_sent(tmp_path, monkeypatch):
    project = make_project(tmp_path / "proj")
    home = project / "lepton-home"
    (home / "runs").mkdir(parents=True)
    (home / "store.sqlite").write_bytes(b"changing all the time")
    monkeypatch.setenv("LEPTON_HOME", str(home))
    sent = {rel for rel, _path in workdir.walk(project, [])}
    assert "models.py" in sent and not any(rel.startswith("lepton-home") for rel in sent)
