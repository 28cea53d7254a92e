"""Runs that outlive the notebook (``%%lepton --detach``): real kernels through jupyter_client,
killed with SIGKILL mid-run; a later kernel attaches, follows the run to its end, has every
metric once and gets the outputs."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from kernels import Kernel
from lepton_magic.session import Session
from lepton_magic.store import Store

STEPS = 40

CELL = f"""%%lepton --detach --async --nodes 2 --name {{name}}
import time
for step in range({STEPS}):
    lepton.log(step=step, loss=1.0 / (step + 1), rank_seen=lepton.rank)
    time.sleep(0.1)
final = {{{{"steps": step + 1, "world": lepton.world_size}}}}
"""


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout:g} s"
        time.sleep(0.05)


def _metric_counts(store: Store, seq: int) -> dict:
    rows = store.execute("SELECT rank, step, COUNT(*) FROM metrics WHERE run=? AND name='loss' "
                         "GROUP BY rank, step", (seq,))
    return {(rank, step): n for rank, step, n in rows}


@pytest.fixture
def home(tmp_path):
    return str(tmp_path / "home")


def _detach_then_kill_the_kernel(home: str, folder: str, cell: str, name: str, going, what: str):
    """Run ``cell`` (a detached one, named ``name``) in a real kernel; once ``going(store, row)``,
    kill the kernel with SIGKILL, as a laptop's kernel dies. Returns the run's row and its keeper."""
    store = Store(home)
    first = Kernel(home, folder)
    try:
        assert first.run("%load_ext lepton_magic").status == "ok"
        reply = first.run(cell, timeout=60)
        assert reply.status == "ok", reply.error
        assert f"{name} detached" in reply.stdout
        row = _wait_for(lambda: store.run_row(name), 10, "the run is recorded")
        _wait_for(lambda: going(store, row), 60, what)
        keeper = store.run_row(name)["owner_pid"]
        kernel_pid = first.manager.provisioner.process.pid
        assert keeper != kernel_pid and psutil.Process(keeper).is_running()
        os.kill(kernel_pid, signal.SIGKILL)
        first.manager.provisioner.process.wait(10)  # (reaped: no zombie left to later tests)
    finally:
        first.client.stop_channels()
        first.manager.cleanup_resources()
    time.sleep(1.0)
    assert store.run_row(name)["status"] == "running", "the run died with its kernel"
    return row, keeper


def test_a_detached_run_outlives_its_killed_kernel_and_a_new_kernel_attaches(home, tmp_path):
    store = Store(home)
    row, keeper = _detach_then_kill_the_kernel(
        home, str(tmp_path), CELL.format(name="lasting"), "lasting",
        lambda store, row: len(_metric_counts(store, row["seq"])) >= 4, "the run logs its first points")

    second = Kernel(home, str(tmp_path))
    try:
        assert second.run("%load_ext lepton_magic").status == "ok"
        reply = second.run("%lepton attach lasting", timeout=60)
        assert reply.status == "ok", reply.error
        reply = second.run("import lepton_magic as lm\nrun = lm.get_run('lasting').wait(60)\nprint(run.status)",
                           timeout=90)
        assert reply.status == "ok", reply.error
        assert reply.stdout.strip() == "succeeded"
        reply = second.run("print(final)")
        assert reply.status == "ok", reply.error
        assert reply.stdout.strip() == "{'steps': 40, 'world': 2}"
    finally:
        second.stop()

    counts = _metric_counts(store, row["seq"])
    assert counts == {(rank, step): 1 for rank in (0, 1) for step in range(STEPS)}
    # The keeper released its nodes and went.
    _wait_for(lambda: not psutil.pid_exists(keeper), 20, "the keeper exits after the run")
    pool = store.run_row("lasting")["pool"]
    assert store.query("SELECT status FROM pools WHERE id=?", (pool,))[0]["status"] != "up"
    alive = [p for p in psutil.process_iter(["cmdline"]) if "lepton_magic.agent" in " ".join(p.info["cmdline"] or [])
             and "--parent-pid" in (p.info["cmdline"] or []) and str(keeper) in p.info["cmdline"]]
    assert not alive, f"agents of the keeper still running: {alive}"


def test_interrupting_a_blocking_detached_cell_leaves_the_run_going(home, tmp_path):
    store = Store(home)
    k = Kernel(home, str(tmp_path))
    try:
        assert k.run("%load_ext lepton_magic").status == "ok"
        started = []

        def interrupt_when_running(output):
            if not started and store.run_row("kept") and store.run_row("kept")["status"] == "running":
                started.append(True)
                k.interrupt()

        code = "%%lepton --detach --name kept\nimport time\nfor i in range(600):\n    time.sleep(0.1)\n"
        reply = k.run(code, timeout=60, on_output=interrupt_when_running)
        if not started:  # the panel's outputs came before the run was running: interrupt now
            _wait_for(lambda: store.run_row("kept")["status"] == "running", 30, "the run starts")
        assert reply.status == "error" and reply.error["ename"] == "KeyboardInterrupt", reply.error
        assert "stopped following kept" in "".join(reply.error["traceback"])
        time.sleep(1.0)
        assert store.run_row("kept")["status"] == "running"
        reply = k.run("%lepton cancel kept")
        assert reply.status == "ok", reply.error
        _wait_for(lambda: store.run_row("kept")["status"] == "cancelled", 15, "the run is cancelled")
        assert store.run_row("kept")["reason"].startswith("cancelled from another process")
    finally:
        k.stop()


def test_a_detached_run_is_cancelled_from_another_process(home):
    session = Session(store=Store(home))
    try:
        run = session.submit("import time\nfor i in range(600):\n    time.sleep(0.1)\n", {}, detach=True)
        assert run.detached and not run.is_live
        _wait_for(lambda: run.status == "running", 60, "the run starts")
        other = Session(store=Store(home))  # another notebook on this machine
        other.get_run(run.name).cancel()
        _wait_for(lambda: run.status == "cancelled", 15, "the run is cancelled")
        assert other.runs().loc[run.id, "detached"]
    finally:
        session.close()


def test_a_detached_run_that_cannot_start_says_why(home):
    session = Session(store=Store(home))
    session.config.set("ssh_hosts", "nobody@127.0.0.1:1")
    try:
        run = session.submit("x = 1\n", {}, backend="ssh", detach=True)
        _wait_for(lambda: run.done, 30, "the run ends")
        assert run.status == "failed"
        assert "cannot reach nobody@127.0.0.1:1" in str(run.error)
    finally:
        session.close()


SWEEP_CELL = """%%lepton --detach --async --nodes 2 --name {name} --sweep "lr=[0.1,0.2,0.3,0.4,0.5,0.6]" --objective "min loss"
import time
for step in range(10):
    lepton.log(step=step, loss=(lr - 0.3) ** 2 + 1.0 / (step + 1))
    time.sleep(0.1)
model = {{"lr": lr, "trial": lepton.trial}}
"""


def test_a_detached_sweep_outlives_its_killed_kernel_and_a_new_kernel_gets_the_best(home, tmp_path):
    """The keeper drives a detached sweep's trials: the kernel is killed after the first trials
    started, every trial still runs once, and a later kernel that attaches gets the best one's
    outputs; a second detached sweep is cancelled from another process with its trials."""
    store = Store(home)
    row, keeper = _detach_then_kill_the_kernel(
        home, str(tmp_path), SWEEP_CELL.format(name="tuned"), "tuned",
        lambda store, row: store.execute("SELECT COUNT(*) FROM runs WHERE parent=?", (row["seq"],))[0][0] >= 2,
        "the first trials start")
    assert row["detached"] and row["sweep"]

    second = Kernel(home, str(tmp_path))
    try:
        assert second.run("%load_ext lepton_magic").status == "ok"
        reply = second.run("%lepton attach tuned", timeout=120)
        assert reply.status == "ok", reply.error
        reply = second.run("import lepton_magic as lm\nrun = lm.get_run('tuned').wait(120)\n"
                           "print(run.status, len(run.trials), sorted(set(run.trials['status'])), run.best['params'])",
                           timeout=150)
        assert reply.status == "ok", reply.error
        assert reply.stdout.strip() == "succeeded 6 ['succeeded'] {'lr': 0.3}"
        reply = second.run("print(model['lr'], model['trial'] == run.best['trial'])")
        assert reply.status == "ok", reply.error
        assert reply.stdout.strip() == "0.3 True"
    finally:
        second.stop()
    trials = store.query("SELECT trial, COUNT(*) AS n FROM runs WHERE parent=? GROUP BY trial", (row["seq"],))
    assert sorted((t["trial"], t["n"]) for t in trials) == [(n, 1) for n in range(6)]
    _wait_for(lambda: not psutil.pid_exists(keeper), 20, "the keeper exits after the sweep")

    session = Session(store=Store(home))
    try:
        long = "import time\nfor i in range(600):\n    time.sleep(0.1)\n"
        from lepton_magic.sweeps.space import make_spec

        sweep = session.submit(long, {}, nodes=1, detach=True, sweep=make_spec("lr=[1,2,3]"))
        _wait_for(lambda: store.execute("SELECT COUNT(*) FROM runs WHERE parent=? AND status='running'",
                                        (sweep.seq,))[0][0] >= 1, 60, "a trial runs")
        Session(store=Store(home)).get_run(sweep.name).cancel()
        _wait_for(lambda: sweep.status == "cancelled", 30, "the sweep is cancelled")
        statuses = [r["status"] for r in store.query("SELECT status FROM runs WHERE parent=?", (sweep.seq,))]
        assert statuses and set(statuses) == {"cancelled"}, statuses
    finally:
        session.close()
