"""A detached run on SSH hosts (a real sshd on 127.0.0.1) whose SSH connections are cut mid-run:
the agents keep the run going and journal what it sends; the keeper connects again, gets what
it missed exactly once, and the run ends with every metric and its outputs."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from test_detach import _wait_for
from test_ssh import SSHD, ssh_session

pytestmark = pytest.mark.skipif(not os.path.exists(SSHD), reason="needs openssh-server (sshd)")

STEPS = 50
CELL = f"""import time
for step in range({STEPS}):
    lepton.log(step=step, loss=1.0 / (step + 1))
    print("step", step, flush=True)
    time.sleep(0.1)
final = {{"steps": step + 1, "world": lepton.world_size}}
"""


def _cut_ssh_connections_of(pid: int, port: int) -> int:
    """Kill the sshd processes serving ``pid``'s connections to ``port``: the links drop as if
    the network had gone."""
    ours = {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port}
    killed = 0
    for proc in psutil.process_iter(["name"]):
        if proc.info["name"] != "sshd":
            continue
        try:
            if any(c.raddr and c.raddr.port in ours and c.laddr.port == port
                   for c in proc.net_connections(kind="tcp")):
                proc.send_signal(signal.SIGKILL)
                killed += 1
        except psutil.Error:
            continue
    return killed


def test_a_detached_run_survives_its_ssh_connections_being_cut(sshd, tmp_path):
    session = ssh_session(sshd, tmp_path, heartbeat_timeout="4s")
    store = session.store
    try:
        namespace: dict = {}
        run = session.submit(CELL, namespace, nodes=2, detach=True)
        points = lambda: store.execute("SELECT COUNT(*) FROM metrics WHERE run=?", (run.seq,))[0][0]  # noqa: E731
        _wait_for(lambda: points() >= 6, 90, "the run logs its first points")
        keeper = store.run_row(run.seq)["owner_pid"]
        assert _cut_ssh_connections_of(keeper, sshd["port"]) >= 2
        cut_at = points()
        assert cut_at < 2 * STEPS, "the run ended before its connections were cut"

        run.wait(120)
        session.bind_pending(run.seq)
        assert run.status == "succeeded", run.error
        assert namespace["final"] == {"steps": STEPS, "world": 2}
        rows = store.execute("SELECT rank, step, COUNT(*) FROM metrics WHERE run=? GROUP BY rank, step",
                             (run.seq,))
        assert {(r, s): n for r, s, n in rows} == {(r, s): 1 for r in (0, 1) for s in range(STEPS)}
        lines = [line for line in run.logs(rank=0).splitlines() if line.startswith("step")]
        assert lines == [f"step {s}" for s in range(STEPS)], "log lines lost or repeated"
        kinds = [k for (k,) in store.execute("SELECT kind FROM events WHERE run=? ORDER BY id", (run.seq,))]
        assert "node_reconnecting" in kinds and "node_resumed" in kinds, kinds
        assert "node_lost" not in kinds
        _wait_for(lambda: not psutil.pid_exists(keeper), 30, "the keeper exits after the run")
        _wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                               if "--resume-socket" in (p.info["cmdline"] or [])], 30,
                  "the agents of the detached run exit")
    finally:
        session.close()
