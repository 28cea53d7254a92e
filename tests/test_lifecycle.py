"""Stopping things: cancel, timeout, Ctrl-C, a killed kernel, idle release. Checked with psutil."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import _thread


import lepton_magic as lm
from lepton_magic import protocol
from lepton_magic.errors import LeptonError
from lepton_magic.session import Session
from lepton_magic.store import Store

from procs import descendants, wait_gone
from slowpkg import once_building, slow_package

SLEEPER = "import time\nfor i in range(600):\n    lepton.log(step=i, t=i)\n    time.sleep(0.1)\n"


def _rank_pids(run, count, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = dict(run._live.rank_pids)
        if len(pids) == count:
            return list(pids.values())
        time.sleep(0.05)
    raise AssertionError(f"ranks did not start: {run._live.rank_pids}")


def _some_points(run, timeout=30.0):
    """The cell is running and has logged (a rank given its job may not have run a line yet)."""
    deadline = time.monotonic() + timeout
    while len(run.metrics) == 0:
        assert time.monotonic() < deadline, "the cell logged nothing"
        time.sleep(0.05)


def test_cancel_stops_every_rank_within_5s(ip):
    run = lm.current_session().submit(SLEEPER, ip.user_ns, nodes=2)
    pids = _rank_pids(run, 2)
    _some_points(run)
    t0 = time.monotonic()
    run.cancel()
    assert run._live.wait(6.0)
    assert not wait_gone(pids, 5.0 - (time.monotonic() - t0) + 0.5)
    assert time.monotonic() - t0 < 5.0
    assert run.status == "cancelled"
    assert len(run.metrics) > 0  # what was logged before the cancel is kept


def test_timeout_fails_the_run_and_kills_it(ip, run_cell):
    result, out = run_cell("%%lepton --nodes 2 --timeout 1.5s\n" + SLEEPER)
    run = lm.last_run()
    assert run.status == "failed"
    assert "timed out after 1.5 s" in str(result.error_in_exec)
    assert not wait_gone(list(run._live.rank_pids.values()), 5.0)


def test_ctrl_c_in_a_blocking_cell_cancels_the_run(ip, run_cell):
    timer = threading.Timer(1.5, _thread.interrupt_main)
    timer.start()
    t0 = time.monotonic()
    result, out = run_cell("%%lepton --nodes 2\n" + SLEEPER)
    assert isinstance(result.error_in_exec, KeyboardInterrupt)
    run = lm.last_run()
    assert run.status == "cancelled" and "cancelling" in out
    assert time.monotonic() - t0 < 10
    assert not wait_gone(list(run._live.rank_pids.values()), 5.0)


def test_down_leaves_no_process(ip):
    session = lm.current_session()
    pool = session.up(nodes=2)
    agents = [link.facts["pid"] for link in pool.live_nodes]
    run = session.submit(SLEEPER, ip.user_ns, nodes=2)
    everything = agents + [p for a in agents for p in descendants(a)] + _rank_pids(run, 2)
    session.down()
    assert run.status == "cancelled"
    assert not wait_gone(everything, 10.0)


def test_idle_pool_is_released(tmp_path):
    """A pool started the old way (--nodes N, or by a cell) has min 0: after the idle timeout
    every node goes, and the pool, up with no node, starts nodes again for the next run."""
    session = Session(store=lm.current_session().store)
    session.config.set("idle_timeout", "1s")
    pool = session.up(nodes=1)

    def node_status():
        return session.store.query("SELECT status FROM nodes WHERE pool=?", (pool.id,))[0]["status"]

    try:
        agent = pool.live_nodes[0].facts["pid"]
        assert not wait_gone([agent], 8.0)
        deadline = time.monotonic() + 5  # the store is told just after the agent is gone
        while time.monotonic() < deadline and node_status() != "released":
            time.sleep(0.05)
        assert node_status() == "released"
        assert pool.live_nodes == [] and not pool.closed
        assert session.submit("x = 1\n", {}, nodes=1).wait(60).status == "succeeded"
        assert len(pool.live_nodes) == 1
    finally:
        session.down()


KERNEL = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {root!r})
    from lepton_magic.session import Session
    session = Session()
    run = session.submit({code!r}, {{}}, nodes=2)
    deadline = time.time() + 60
    while len(run._live.rank_pids) < 2 and time.time() < deadline:
        time.sleep(0.05)
    while len(run.metrics) == 0 and time.time() < deadline:  # some points in the store
        time.sleep(0.05)
    pool = session.pool()
    agents = [link.facts["pid"] for link in pool.live_nodes]
    # A process the kernel forked holds copies of the agents' pipes: their EOF alone would
    # never come. The agents must notice the kernel's death itself.
    holder = os.fork()
    if holder == 0:
        time.sleep(120)
        os._exit(0)
    print(" ".join(map(str, agents + list(run._live.rank_pids.values()) + [holder])), flush=True)
    time.sleep(600)
    """
)


def test_kill_9_of_the_kernel_leaves_no_orphans(tmp_path):
    script = tmp_path / "kernel.py"
    script.write_text(KERNEL.format(root=os.getcwd(), code=SLEEPER))
    env = dict(os.environ, LEPTON_HOME=str(tmp_path / "home"))
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=env)
    line = kernel.stdout.readline()
    *pids, holder = [int(p) for p in line.split()]
    assert len(pids) == 4, line
    everything = pids + [d for p in pids[:2] for d in descendants(p)]
    os.kill(kernel.pid, signal.SIGKILL)
    kernel.wait()
    try:
        survivors = wait_gone(everything, 30.0)
    finally:
        os.kill(holder, signal.SIGKILL)
    assert not survivors, f"still alive 30 s after kill -9 of the kernel: {survivors}"
    # A fresh process sees the run as failed, not forever "running".
    check = subprocess.run(
        [sys.executable, "-c", "import lepton_magic as lm; r = lm.last_run(); print(r.status, len(r.metrics) > 0)"],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert check.stdout.split() == ["failed", "True"], check.stderr


def test_store_is_readable_from_a_fresh_process(ip, run_cell):
    result, _ = run_cell(
        "%%lepton --nodes 2 --name fresh-read\n"
        "for s in range(50):\n    lepton.log(step=s, loss=1.0 / (s + 1), acc=s / 50)\n"
        "answer = {'rank': lepton.rank, 'values': list(range(5))}\n"
    )
    assert result.success
    code = (
        "import lepton_magic as lm\n"
        "r = lm.get_run('fresh-read')\n"
        "print(r.status, len(r.metrics), r.history.shape, r.outputs['answer']['values'], len(lm.runs()) > 0)\n"
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # outputs are written just after the run ends
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        if out.returncode == 0:
            break
        time.sleep(0.2)
    assert out.stdout.split() == ["succeeded", "200", "(50,", "2)", "[0,", "1,", "2,", "3,", "4]", "True"], out.stderr


def test_a_live_agent_drops_a_tampered_frame(tmp_path):
    """A forged 'run' frame (wrong key) must not execute; the agent logs and carries on."""
    marker = tmp_path / "pwned"
    secret = protocol.new_secret()
    agent = subprocess.Popen(
        [sys.executable, "-m", "lepton_magic.agent", "--node", "t0", "--preload", ""],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
    )
    try:
        agent.stdin.write(secret)
        reader = protocol.FrameReader(agent.stdout.fileno(), secret)
        assert reader.read()["t"] == "node"
        job = {
            "t": "run", "run": "r-evil", "code": f"open({str(marker)!r}, 'w').write('x')", "line_offset": 1,
            "inputs": {}, "outputs": [], "explicit_outputs": False, "node": "t0", "node_rank": 0,
            "nnodes": 1, "rank_offset": 0, "local_world_size": 1, "world_size": 1,
            "master_addr": "127.0.0.1", "master_port": 29999, "env": {},
        }
        agent.stdin.write(protocol.encode(protocol.new_secret(), job))
        agent.stdin.write(protocol.encode(secret, {"t": "ping", "time": 1.0}))
        reply = reader.read()
        while reply["t"] == "heartbeat":
            reply = reader.read()
        assert reply["t"] == "pong"  # the agent is alive and answered the genuine frame
        time.sleep(0.5)
        assert not marker.exists()
    finally:
        agent.stdin.close()
        agent.wait(10)
    assert "failed HMAC verification" in agent.stderr.read().decode()


def test_a_node_that_cannot_be_started_leaves_no_agent_and_no_descriptor(tmp_path, monkeypatch):
    """The second agent's process cannot be made (here: too many open files): the first agent is
    stopped, no socket of either is left open, the user gets one line, and the store does not
    show nodes 'starting' for ever."""
    from lepton_magic.backends import local

    real_popen, made = subprocess.Popen, []

    def popen(*args, **kwargs):
        if made:
            raise OSError(24, "Too many open files")
        made.append(real_popen(*args, **kwargs))
        return made[-1]

    session = Session(store=Store(tmp_path))
    fds_before = set(os.listdir("/proc/self/fd"))
    monkeypatch.setattr(local.subprocess, "Popen", popen)
    try:
        session.up("local", 2)
    except LeptonError as e:
        message = str(e)
    else:
        raise AssertionError("the pool came up without its second node")
    monkeypatch.undo()
    assert "\n" not in message and "Too many open files" in message, message
    assert made and made[0].wait(10) is not None, "the first agent was left running"
    statuses = {row["node"]: row["status"] for row in session.store.query("SELECT node, status FROM nodes")}
    assert "starting" not in statuses.values(), statuses
    session.down()
    session.store.close()
    leaked = set(os.listdir("/proc/self/fd")) - fds_before
    assert not [os.readlink(f"/proc/self/fd/{fd}") for fd in leaked if os.path.exists(f"/proc/self/fd/{fd}")]


def test_a_cancel_while_the_run_is_being_started_is_not_lost(tmp_path, monkeypatch):
    """Cancel comes while the run's nodes are still being made ready (a remote folder synced,
    packages installed: here slowed down) and before any rank has its job: the run is cancelled
    as soon as its ranks start, not left to run to its end."""
    from lepton_magic import liverun

    real_prepare = liverun.workdir.prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(1.0)
        return real_prepare(*args, **kwargs)

    monkeypatch.setattr(liverun.workdir, "prepare", slow_prepare)
    session = Session(store=Store(tmp_path / "home"))
    try:
        session.up("local", 1)
        submitted = []
        submitter = threading.Thread(target=lambda: submitted.append(session.submit(SLEEPER, {}, nodes=1)))
        submitter.start()
        deadline = time.monotonic() + 30
        while not session.live or next(iter(session.live.values())).current is None:
            assert time.monotonic() < deadline, "the run was never scheduled"
            time.sleep(0.01)
        live = next(iter(session.live.values()))
        assert live.current.status == "queued"  # its nodes are being made ready
        live.cancel("cancelled while starting")
        submitter.join(30)
        run = submitted[0]
        assert run.wait_done(10), f"the cancel was lost: the run is still {run.status}"
        assert run.status == "cancelled" and run._row()["reason"] == "cancelled while starting"
    finally:
        session.close()


def test_a_run_that_says_it_ended_has_its_end_in_the_store_and_its_outputs(tmp_path, monkeypatch):
    """Whoever sees the end first (run.status in this kernel, lm.runs() and the sidebar through the
    store) sees all of it: the row says so, the outputs are there. The store write is slowed so
    that an ordering that shows the status before the row is written shows it every time."""
    session = Session(store=Store(tmp_path / "home"))
    try:
        recorded = session.store.attempt_end

        def slowly(*args):
            time.sleep(1.0)
            return recorded(*args)

        monkeypatch.setattr(session.store, "attempt_end", slowly)
        for code, outcome in (("x = 41 + 1\n", "succeeded"), ("raise ValueError('no')\n", "failed")):
            run = session.submit(code, {}, nodes=1)
            deadline = time.monotonic() + 60
            while run.status not in ("succeeded", "failed", "cancelled"):
                assert time.monotonic() < deadline
                time.sleep(0.005)
            assert run.status == outcome
            assert session.store.run_row(run.seq)["status"] == outcome
            if outcome == "succeeded":
                assert run.outputs == {"x": 42}
            assert run.wait_done(10)
    finally:
        session.down()


def test_a_cancel_cuts_a_long_package_install_short(tmp_path, monkeypatch):
    """A cancel (or a timeout) while the nodes install --pip packages stops the install there and
    then: the run ends cancelled within seconds, not when the install would have ended. The
    package is a local one whose build (an in-tree backend, nothing to download) takes 2 minutes."""
    package, marker = slow_package(tmp_path, monkeypatch)
    session = Session(store=Store(tmp_path / "home"))
    cancelled_at = once_building(marker, lambda: session.get_run("slowpip").cancel())
    try:
        run = session.submit("x = 1\n", {}, nodes=1, name="slowpip", pip=str(package))
        assert run.wait_done(30)
        ended = time.monotonic()
        assert cancelled_at, "the build never started"
        assert ended - cancelled_at[0] < 10, f"the run ended {ended - cancelled_at[0]:.1f} s after its cancel"
        assert run.status == "cancelled" and session.store.run_row(run.seq)["reason"] == "cancelled by the user"
        # Recorded like any attempt that ended: where it was to run, when, and why it ended.
        attempts = run.attempts
        assert list(attempts["reason"]) == ["cancelled by the user"] and attempts["ended"].notna().all()
        assert list(run.nodes["status"]) == ["cancelled"] and session.store.run_row(run.seq)["started"]
        assert not wait_gone([int(marker.read_text())], 10), "the package build was left running"
        assert session.pool().live_nodes, "the node went with the install"
        assert session.submit("y = 2\n", {}, nodes=1).wait(60).status == "succeeded"  # and takes the next run

        # A timeout while packages install (a hung pip) ends the run then, as failed. (The
        # cancelled install left no environment: this one starts over.)
        marker.unlink()
        t0 = time.monotonic()
        run = session.submit("x = 1\n", {}, nodes=1, timeout=4, pip=str(package))
        assert run.wait_done(30) and run.status == "failed"
        assert time.monotonic() - t0 < 14 and "timed out after 4 s" in str(run.error)
        time.sleep(0.5)
        if marker.exists():  # (the build had started)
            assert not wait_gone([int(marker.read_text())], 10), "the package build was left running"
    finally:
        session.down()
