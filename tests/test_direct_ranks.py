"""Ranks on the kernel's machine take their job straight from the kernel and answer it straight
(backends/direct.py), with real agents, standbys and ranks. What the agent did on the way (sign
checks, the order of a rank's lines and its answer, whose rank is whose for a cancel) must
still hold."""

import os
import select
import signal
import socket
import threading
import time

import msgpack
import pytest

import lepton_magic as lm
from lepton_magic.protocol import KEY_SIZE, Frame, FrameReader


@pytest.fixture
def pool(ip, run_cell):
    result, out = run_cell("%lepton up --nodes 2")
    assert result.success, out
    pool = lm.current_session().pool("local")
    _wait_for_standbys(pool, 1)
    return pool


def _wait_for_standbys(pool, each: int, preloaded: bool = False, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(link.direct.standbys(preloaded) >= each for link in pool.live_nodes):
            return
        time.sleep(0.05)
    raise AssertionError("the agents offered no standbys")


def _jobs_sent(pool) -> int:
    return sum(link.direct.jobs_sent for link in pool.live_nodes)


def test_jobs_go_straight_and_outputs_come_back(ip, run_cell, pool):
    before = _jobs_sent(pool)
    for i in range(5):
        _wait_for_standbys(pool, 1)  # a person's pace: the standbys that replace the last ones are offered
        ip.user_ns["i"] = i
        result, out = run_cell("%%lepton --nodes 2\nsquare = i * i\nrank_pid = (lepton.rank, __import__('os').getpid())\n")
        assert result.success, out
        assert ip.user_ns["square"] == i * i
    assert _jobs_sent(pool) - before == 10
    run = lm.last_run()
    assert run.status == "succeeded"
    # The kernel said the ranks started (the agent used to): each node ran, and is done.
    assert set(run.nodes["status"]) == {"done"}, run.nodes


def test_every_line_a_rank_printed_is_there_when_the_cell_returns(ip, run_cell, pool):
    """A rank that printed answers straight, but its lines come through its agent: the run ends
    only once the agent reported the rank's end, after its last line."""
    for attempt in range(8):
        result, out = run_cell(
            "%%lepton --nodes 2\n"
            "for j in range(300):\n"
            "    print(f'line {lepton.rank} {j}', flush=(j % 50 == 0))\n"
            "done = True\n"
        )
        assert result.success, out
        logs = lm.last_run().logs()
        for rank in (0, 1):
            assert f"line {rank} 299" in logs, f"attempt {attempt}: rank {rank}'s last line is missing"
            assert sum(f"line {rank} " in line for line in logs.splitlines()) == 300


def test_what_c_code_wrote_still_reaches_the_store(ip, run_cell, pool):
    """Output written below Python (a C library, os.write) is not counted by the rank: it may
    reach the kernel after the answer, and is kept all the same."""
    result, out = run_cell("%%lepton --nodes 2\nimport os\nos.write(1, b'from C ' + str(lepton.rank).encode() + b'\\n')\n")
    assert result.success, out
    run = lm.last_run()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and run.logs().count("from C") < 2:
        time.sleep(0.05)
    assert "from C 0" in run.logs() and "from C 1" in run.logs()


def test_a_standby_that_died_idle_is_passed_over(ip, run_cell, pool):
    for link in pool.live_nodes:
        link.direct.standbys(False)
        for standby in list(link.direct._idle[False]):
            os.kill(standby.pid, signal.SIGKILL)
    time.sleep(0.2)
    result, out = run_cell("%%lepton --nodes 2\nvalue = lepton.rank + 40\n")
    assert result.success, out
    assert ip.user_ns["value"] == 40


def test_a_cancel_reaches_ranks_that_took_their_job_straight(ip, run_cell, pool):
    """The agent learns whose ranks the standbys became from the kernel ('assigned'), before any
    cancel of their run: it stops them as it stops its own."""
    before = _jobs_sent(pool)
    run = lm.current_session().submit("import os, time\nprint('up', os.getpid(), flush=True)\ntime.sleep(60)\n",
                                      {}, nodes=2)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and run.logs().count("up") < 2:
        time.sleep(0.05)
    assert _jobs_sent(pool) - before == 2
    pids = [int(line.split()[-1]) for line in run.logs().splitlines() if " up " in f" {line}"]
    assert len(pids) == 2 and all(_alive(pid) for pid in pids)
    t0 = time.monotonic()
    run.cancel()
    assert run.wait(10)
    assert run.status == "cancelled"
    assert time.monotonic() - t0 < 5
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


FORGE = """
import os
from lepton_magic import protocol
from lepton_magic.agent.forking import DIRECT_FD
writer = lepton._send.__self__
assert writer.fd == DIRECT_FD
key = writer._signer.key
seq = 10**6
for channel, sender, message in (
        (lepton.run, 1 - lepton.rank, {"t": "result", "run": lepton.run, "rank": 1 - lepton.rank, "outputs": None,
                                        "forged": 1}),
        (lepton.run, 5, {"t": "metrics", "run": lepton.run, "rank": 5, "step": [0], "name": ["x"], "value": [1.0],
                         "time": [0.0], "forged": 1}),
        ("r-other", lepton.rank, {"t": "result", "run": "r-other", "rank": 0, "outputs": None, "forged": 1})):
    seq += 1
    os.write(DIRECT_FD, protocol.encode(key, message, seq=seq, channel=channel, sender=sender))
# Its own stream, numbered on as its writer numbers it: but an exit is the agent's to say.
writer.send({"t": "exit", "run": lepton.run, "rank": lepton.rank, "pid": 1, "killed": None, "forged": 1})
time.sleep(0.5)
answer = lepton.rank
"""


def test_a_rank_speaks_for_itself_only_on_the_direct_socket(ip, run_cell, pool):
    _wait_for_standbys(pool, 1, preloaded=True)  # the cell imports lepton_magic: not a light one
    before = sum(link.refused for link in pool.live_nodes)
    result, out = run_cell("%%lepton --nodes 2\nimport time\n" + FORGE)
    assert result.success, out
    run = lm.last_run()
    assert ip.user_ns["answer"] == 0
    assert run.metrics.empty  # rank 5's forged point never landed
    # Each rank's result for the other and its exit were refused (a rank says no 'exit').
    assert sum(link.refused for link in pool.live_nodes) - before >= 4


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class _StopsTheNodeOnRegister:
    """The direct reader's epoll, with the node stopped (from another thread, as the pool's watch
    or `%lepton down` do) the moment a standby is to be watched."""

    def __init__(self, direct):
        self.direct, self.poll = direct, direct._poll

    def register(self, fd, mask):
        stopper = threading.Thread(target=self.direct.close)
        stopper.start()
        stopper.join(0.5)  # stopped by now, unless the register holds it off
        return self.poll.register(fd, mask)

    def __getattr__(self, name):
        return getattr(self.poll, name)


def test_a_node_stopped_while_the_kernel_takes_an_offer_leaves_the_cell_unharmed(ip, run_cell, pool):
    result, out = run_cell("%%lepton --nodes 2\nx = 1\n")  # its replacements are offered, not taken yet
    assert result.success, out
    direct = pool.live_nodes[0].direct
    deadline = time.monotonic() + 10
    while not select.select([direct._offers], [], [], 0.05)[0]:
        assert time.monotonic() < deadline, "the agent offered no new standby"
    direct._poll = _StopsTheNodeOnRegister(direct)
    direct.standbys(False)  # takes the offer; the node stops meanwhile
    direct._thread.join(5)
    assert not direct._thread.is_alive() and not direct._by_fd, "the stopped node kept watching standbys"
    # That node's ranks go through its agent now.
    result, out = run_cell("%%lepton --nodes 2\ny = 2\n")
    assert result.success, out
    assert ip.user_ns["y"] == 2


# --- the kernel's side alone: a NodeLink over pipes, standbys offered by hand --------------------

def _bare_node(on_lost=lambda link, reason: None):
    """A link whose 'agent' is this test: the pipes' far ends, and the offers socket's."""
    from lepton_magic.backends.base import NodeLink
    from lepton_magic.backends.direct import DirectRanks

    agent_r, kernel_w = os.pipe()
    kernel_r, agent_w = os.pipe()
    link = NodeLink("bare", kernel_w, kernel_r, os.urandom(32), lambda link, message: None, on_lost)
    offers, agent_offers = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link.direct = DirectRanks(link, offers)
    key = os.read(agent_r, KEY_SIZE)  # what a real agent reads first
    return link, agent_r, agent_w, agent_offers, key


def _offer(agent_offers, sid: int) -> socket.socket:
    """Offer a standby (here: one end of a socket pair this test keeps) as an agent would."""
    mine, theirs = socket.socketpair()
    about = msgpack.packb({"standby": sid, "pid": os.getpid(), "key": os.urandom(KEY_SIZE), "preloaded": False})
    socket.send_fds(agent_offers, [about], [theirs.fileno()])
    theirs.close()
    return mine


def _run_message(run: str, ranks: int) -> dict:
    return {"t": "run", "run": run, "rank_offset": 0, "local_world_size": ranks, "world_size": ranks,
            "preload": False, "code": "x = 1", "line_offset": 1, "inputs": None, "outputs": ["x"],
            "explicit_outputs": False, "node": "bare", "node_rank": 0, "nnodes": 1}


def _close_bare(link, *fds):
    link.direct.close()
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_node_with_fewer_standbys_than_ranks_goes_through_its_agent():
    """Two ranks on a node (two GPUs) and one standby offered: the agent starts both ranks; the
    run must not fail with 'no standby was left' for the second."""
    link, agent_r, agent_w, agent_offers, _key = _bare_node()
    try:
        kept = _offer(agent_offers, 1)
        assert link.direct.standbys(False) == 1
        assert link.direct.dispatch(_run_message("r-two", 2)) is None
        assert link.direct.standbys(False) == 1 and link.direct.jobs_sent == 0
        kept.close()
    finally:
        _close_bare(link, agent_r, agent_w)


def test_the_agent_is_told_of_every_job_sent_before_an_interrupt(monkeypatch):
    """Ctrl-C while the second of three jobs is written: the agent still learns which standbys
    took jobs of the run (so a cancel kills them), and the third goes back to the idle ones."""
    from lepton_magic.backends import direct

    link, agent_r, agent_w, agent_offers, key = _bare_node()
    try:
        kept = [_offer(agent_offers, sid) for sid in (1, 2, 3)]
        assert link.direct.standbys(False) == 3
        real_send, sent = direct.FrameWriter.send, []

        def send(self, message, final=False):
            sent.append(message)
            if len(sent) == 2:
                raise KeyboardInterrupt
            return real_send(self, message, final)

        monkeypatch.setattr(direct.FrameWriter, "send", send)
        with pytest.raises(KeyboardInterrupt):
            link.direct.dispatch(_run_message("r-three", 3))
        monkeypatch.undo()
        assert link.direct.standbys(False) == 1  # the third never got its job
        link.direct.tell_agent("r-three")  # what the run's abort does before it cancels
        assert select.select([agent_r], [], [], 3)[0], "the agent was told nothing"
        told = FrameReader(agent_r, key).read()
        assert told == {"t": "assigned", "run": "r-three", "ranks": [[1, 0], [2, 1]]}
        for sock in kept:
            sock.close()
    finally:
        _close_bare(link, agent_r, agent_w)


def test_a_node_lost_while_the_agent_is_told_does_not_hang_the_thread_telling_it():
    """Writing 'assigned' fails (the agent died): the node's loss makes its runs tell their
    agents in turn; that must not wait for the lock the first telling holds."""
    from lepton_magic.backends.direct import _Untold

    lost = threading.Event()

    def on_lost(link, reason):
        link.direct.tell_agent("r-gone")  # what a run's end does (liverun._tell_agents)
        lost.set()

    link, agent_r, agent_w, agent_offers, _key = _bare_node(on_lost)
    os.close(agent_r)  # the agent is gone: writing to it fails (EPIPE)
    link.direct._untold["r-gone"] = _Untold(ranks=[[1, 0]], since=time.monotonic())
    teller = threading.Thread(target=link.direct.tell_agent, args=("r-gone",), daemon=True)
    teller.start()
    teller.join(3)
    assert not teller.is_alive(), "telling the agent hung when the node was lost"  # (left as it is)
    assert lost.wait(3) and not link.alive
    _close_bare(link, agent_w)


def test_a_message_kind_that_is_not_a_name_is_refused_and_the_node_goes_on():
    link, agent_r, agent_w, agent_offers, _key = _bare_node()
    try:
        frame = Frame(b"", 0, "r-x", 0, 1, b"", b"")
        link.deliver_rank_message(frame, {"t": ["result"], "run": "r-x", "rank": 0}, 0)
        link.deliver_rank_message(frame, {"t": {"a": 1}, "run": "r-x", "rank": 0}, 0)
        assert link.refused == 2 and link.alive
    finally:
        _close_bare(link, agent_r, agent_w)


def test_a_standby_socket_the_kernel_holds_is_not_inherited_by_the_cells_subprocesses():
    link, agent_r, agent_w, agent_offers, _key = _bare_node()
    try:
        kept = _offer(agent_offers, 1)
        assert link.direct.standbys(False) == 1
        held = [s.sock for s in link.direct._idle[False]]
        assert held and not any(os.get_inheritable(s.fileno()) for s in held)
        kept.close()
    finally:
        _close_bare(link, agent_r, agent_w)


def test_a_line_that_comes_as_its_run_is_released_reaches_the_run(tmp_path):
    """The agents' reader threads route a run's late lines through Pool.runs, then _ending: a
    line read just as the run moves from one to the other must still find it."""
    from lepton_magic.session import Session
    from lepton_magic.store import Store

    session = Session(store=Store(tmp_path / "home"))
    try:
        pool = session.up("local", 0)
        heard = []

        class Ending:  # a run whose ranks have not all exited yet
            id, all_exited = "r-late", False

            def on_message(self, link, message):
                heard.append(message["line"])

        class Runs(dict):
            def pop(self, key, *default):
                value = super().pop(key, *default)
                pool._on_message(None, {"t": "log", "run": key, "line": "late"})  # a reader thread, now
                return value

        pool.runs = Runs(pool.runs)
        pool.runs["r-late"] = Ending()
        pool.release_run("r-late")
        assert heard == ["late"]
    finally:
        session.close()
