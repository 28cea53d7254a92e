"""Ranks on the kernel's machine take their job straight from the kernel and answer it straight
(backends/direct.py), with real agents, standbys and ranks. What the agent did on the way (sign
checks, the order of a rank's lines and its answer, whose rank is whose for a cancel) must
still hold."""

import os
import select
import signal
import threading
import time

import pytest

import lepton_magic as lm


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
        time.sleep(0.2)  # a person's pace: the standbys that replace the last ones are offered by then
        ip.user_ns["i"] = i
        result, out = run_cell("%%lepton --nodes 2\nsquare = i * i\nrank_pid = (lepton.rank, __import__('os').getpid())\n")
        assert result.success, out
        assert ip.user_ns["square"] == i * i
    assert _jobs_sent(pool) - before >= 8  # (one that finds none offered yet goes through the agent)
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
