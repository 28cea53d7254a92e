"""Runs that survive a lost node: attempts, checkpoints, one continuous curve (real processes)."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from lepton_magic.config import Config
from lepton_magic.errors import LeptonError, RemoteError
from lepton_magic.session import Session
from lepton_magic.store import Store

# Ranks in lockstep, as DDP keeps them (a collective every step): a rank cannot run ahead of
# a lost one.
RESUMABLE = """
import time, torch
dist = lepton.init_distributed()
state = lepton.restore() or {"step": 0}
resumed_from = state["step"]
for step in range(resumed_from, 30):
    dist.all_reduce(torch.ones(1))
    lepton.log(step=step, loss=1.0 / (step + 1))
    if step % 5 == 4:
        lepton.checkpoint({"step": step + 1})
    time.sleep(0.1)
attempt = lepton.attempt
"""


# No torch: for the tests that only need a run going.
GOING = "import time\nfor step in range(300):\n    lepton.log(step=step, loss=1.0)\n    time.sleep(0.1)\n"


@pytest.fixture
def session(tmp_path):
    config = Config.defaults()
    config.set("heartbeat_timeout", "4s")
    s = Session(config, Store(tmp_path))
    yield s
    s.close()


def _wait_for_steps(run, steps: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while run.store.execute("SELECT COUNT(*) FROM metrics WHERE run=? AND rank=0", (run.seq,))[0][0] < steps:
        assert time.monotonic() < deadline and not run.done, f"{run.name} never reached step {steps}"
        time.sleep(0.05)


def _agent_pid(session, node: str) -> int:
    return next(link.facts["pid"] for link in session.pool().live_nodes if link.name == node)


@pytest.mark.parametrize("how", ["kill -9", "SIGSTOP"])
def test_a_lost_node_is_replaced_and_the_run_resumes_from_its_checkpoint(session, how):
    run = session.submit(RESUMABLE, {}, nodes=2, retries=1, name=f"resumed-{how.split()[0]}")
    _wait_for_steps(run, 12)
    victim = _agent_pid(session, "local-1")
    # SIGSTOP: the whole node freezes (its agent and its ranks), as a hung host does.
    frozen = [victim] + [p.pid for p in psutil.Process(victim).children(recursive=True)]
    for pid in ([victim] if how == "kill -9" else frozen):
        os.kill(pid, signal.SIGKILL if how == "kill -9" else signal.SIGSTOP)
    try:
        run.wait(90)
    finally:
        if how == "SIGSTOP":
            for pid in frozen:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass
    assert run.status == "succeeded"
    assert run.outputs["attempt"] == 1
    assert run.outputs["resumed_from"] >= 10 and run.outputs["resumed_from"] % 5 == 0
    attempts = run.attempts
    assert list(attempts["attempt"]) == [1, 2]
    assert "local-1" in attempts["reason"].iat[0] and attempts["reason"].iat[1] == "succeeded"
    if how == "SIGSTOP":
        assert "no heartbeat" in attempts["reason"].iat[0]
    assert "local-1" not in attempts["nodes"].iat[1], "the lost node was given to the next attempt"
    metrics = run.metrics
    for rank in (0, 1):
        steps = metrics[(metrics["rank"] == rank) & (metrics["name"] == "loss")]["step"]
        assert sorted(steps) == list(range(30)), f"rank {rank}: steps not continuous or logged twice"
    assert set(metrics["attempt"]) == {0, 1}
    assert list(run.history.index) == list(range(30))


def test_an_exception_in_the_cell_is_not_retried_unless_asked(session):
    run = session.submit("x = 1 / 0\n", {}, nodes=1, retries=2)
    with pytest.raises(RemoteError, match="ZeroDivisionError"):
        run.wait(60)
    assert len(run.attempts) == 1
    again = session.submit("x = 1 / 0\n", {}, nodes=1, retries=2, retry_on_error=True)
    with pytest.raises(RemoteError):
        again.wait(60)
    assert list(again.attempts["attempt"]) == [1, 2, 3]


def test_without_retries_a_lost_node_fails_the_run(session):
    run = session.submit(GOING, {}, nodes=2)
    _wait_for_steps(run, 5)
    os.kill(_agent_pid(session, "local-1"), signal.SIGKILL)
    with pytest.raises(LeptonError, match="local-1"):
        run.wait(60)
    assert len(run.attempts) == 1


def test_cancel_during_a_retry_ends_the_run(session):
    run = session.submit(GOING, {}, nodes=2, retries=3)
    _wait_for_steps(run, 5)
    os.kill(_agent_pid(session, "local-1"), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while run.status != "starting":  # between attempts (the backoff)
        assert time.monotonic() < deadline
        time.sleep(0.02)
    run.cancel()
    assert run.wait_done(15)
    assert run.status == "cancelled" and len(run.attempts) == 1


SNAPSHOT = """
import os, time, torch
dist = lepton.init_distributed()
snapshot = "snapshot.pt"  # the pytorch/examples DDP pattern: Trainer loads it if present
resumed_from = torch.load(snapshot)["step"] if os.path.exists(snapshot) else 0
for step in range(resumed_from, 30):
    dist.all_reduce(torch.ones(1))
    lepton.log(step=step, loss=1.0 / (step + 1))
    if lepton.rank == 0 and step % 5 == 4:
        torch.save({"step": step + 1}, snapshot)
    time.sleep(0.1)
"""


def test_a_snapshot_file_the_cell_saves_resumes_a_retry_on_another_node(session, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # local ranks run in the notebook's folder, as the snapshot does
    run = session.submit(SNAPSHOT, {}, nodes=2, retries=1)
    _wait_for_steps(run, 12)
    os.kill(_agent_pid(session, "local-1"), signal.SIGKILL)
    run.wait(90)
    assert run.outputs["resumed_from"] >= 10 and len(run.attempts) == 2
    assert "local-1" not in run.attempts["nodes"].iat[1]
