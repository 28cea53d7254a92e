"""Elastic pools (``%lepton up --min N --max M --idle-timeout T``): real agents on the local
backend, with an idle timeout of seconds. Each test has a session and a store of its own, so the
shared pool of the other tests is left alone."""

import json
import time

import psutil
import pytest
from IPython.core.error import UsageError

from lepton_magic.errors import LeptonError
from lepton_magic.magics import LeptonMagics
from lepton_magic.server.manager import LeptonManager
from lepton_magic.session import Session
from lepton_magic.store import Store
from lepton_magic.ui.panel import PoolPanel

from procs import wait_gone

IDLE = 2.0  # seconds: the pools below release idle nodes after this long
HELLO = "print('hello from', lepton.rank)\n"


@pytest.fixture
def session(tmp_path):
    session = Session(store=Store(tmp_path))
    yield session
    session.down()


@pytest.fixture
def lepton(ip, session, capsys):
    """``%lepton ...`` and ``%%lepton`` of a kernel whose session is ``session``; returns what the
    line magic printed."""
    magics = LeptonMagics(ip, session)

    def run(line, cell=None):
        magics.lepton(line, cell)
        return capsys.readouterr().out

    return run


def wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def agent_pids(pool):
    return {link.name: link.facts["pid"] for link in pool.live_nodes}


def pool_events(session, pool):
    rows = session.store.query("SELECT kind, data FROM events WHERE pool=? ORDER BY id", (pool.id,))
    return [(r["kind"], json.loads(r["data"])) for r in rows]


def test_grows_to_max_for_a_run_then_shrinks_back_to_min_and_no_further(session, lepton):
    out = lepton(f"up --min 1 --max 3 --idle-timeout {IDLE:g}s")
    pool = session.pool()
    assert out.strip() == (f"pool {pool.id} up: 1 local node(s) · min 1, max 3"
                           " · nodes above 1 released after 2 s idle")

    run = session.submit(HELLO, {}, nodes=3).wait(60)
    assert run.status == "succeeded" and len(run.nodes) == 3
    agents = agent_pids(pool)
    assert len(agents) == 3

    assert wait_for(lambda: len(pool.live_nodes) == 1, IDLE * 3)
    kept = pool.live_nodes[0].name
    assert kept == "local-0"  # the oldest stays: runs take the oldest free nodes first
    assert not wait_gone([pid for name, pid in agents.items() if name != kept], 5.0)
    for _ in range(int(IDLE * 3 / 0.25)):  # three more timeouts: the pool stays at its min
        assert [n.name for n in pool.live_nodes] == [kept]
        time.sleep(0.25)
    assert pool.idle_remaining() is None  # nothing left to release

    events = pool_events(session, pool)
    assert [kind for kind, _ in events] == ["pool_grow", "pool_grow", "pool_shrink"]
    assert events[0][1] == {"nodes": 1, "reason": "1 node asked for, 0 up"}
    assert events[1][1]["nodes"] == 2 and "3 nodes" in events[1][1]["reason"]
    assert events[2][1] == {"nodes": 2, "released": ["local-2", "local-1"], "reason": "idle 2 s; min 1"}

    panel = PoolPanel(session)
    panel.update()
    shown = panel.table.value
    assert "1 node(s) · min 1, max 3" in shown
    assert shown.count('class="lepton-pool-event"') == 3
    assert "released 2 node(s) (local-2, local-1): idle 2 s; min 1" in shown
    assert shown.count('class="lepton-node-row"') == 1  # released nodes are in the events, not the table

    api = [p for p in LeptonManager(session.store).pools() if p["id"] == pool.id][0]
    assert (api["min_nodes"], api["max_nodes"], api["nodes_total"]) == (1, 3, 1)
    assert [e["kind"] for e in api["events"]] == ["pool_grow", "pool_grow", "pool_shrink"]
    assert api["events"][-1]["data"]["reason"] == "idle 2 s; min 1" and api["idle_remaining"] is None


def test_a_run_needing_more_than_max_fails_at_once_in_one_line(session, lepton):
    lepton(f"up --min 1 --max 3 --idle-timeout {IDLE:g}s")
    pool = session.pool()
    t0 = time.monotonic()
    with pytest.raises(UsageError) as info:
        lepton("--nodes 4", HELLO)
    assert time.monotonic() - t0 < 2.0
    message = str(info.value)
    assert "\n" not in message and "--max 3" in message, message
    assert message == "the pool may hold at most 3 nodes (%lepton up --max 3); a run needs 4 nodes, 1 free"
    assert len(pool.live_nodes) == 1  # nothing was started for it
    assert pool_events(session, pool)[-1] == ("pool_grow_refused", {"nodes": 3, "reason": message})
    with pytest.raises(LeptonError, match="--max 3"):  # the Python API says the same
        session.submit(HELLO, {}, nodes=4)


def test_a_min_0_pool_goes_to_0_nodes_stays_up_and_grows_on_the_next_run(session, lepton):
    out = lepton(f"up --min 0 --max 2 --idle-timeout {IDLE:g}s")
    pool = session.pool()
    assert "min 0, max 2 · released after 2 s idle" in out
    agents = list(agent_pids(pool).values())
    assert not wait_gone(agents, IDLE * 3 + 2)
    assert pool.live_nodes == [] and not pool.closed and session.pool() is pool
    assert session.store.query("SELECT status FROM pools WHERE id=?", (pool.id,))[0]["status"] == "up"

    run = session.submit(HELLO, {}, nodes=2).wait(60)
    assert run.status == "succeeded" and len(pool.live_nodes) == 2
    assert sorted(run.nodes["node"]) == ["local-0", "local-1"]
    assert pool_events(session, pool) == [("pool_grow", {"nodes": 2, "reason": "a run needs 2 nodes, 0 free"})]
    assert not wait_gone([link.facts["pid"] for link in pool.live_nodes], IDLE * 3 + 2)
    assert pool.live_nodes == [] and [kind for kind, _ in pool_events(session, pool)] == ["pool_grow", "pool_shrink"]


def test_busy_nodes_are_not_released_while_a_run_goes_on_past_the_timeout(session):
    pool = session.up(nodes=2, min_nodes=0, idle_timeout=1.0)
    agents = list(agent_pids(pool).values())
    run = session.submit("import time\ntime.sleep(5)\n", {}, nodes=2)
    assert wait_for(lambda: run.status == "running", 30)
    while not run.wait_done(0.2):  # five idle timeouts go by while it runs
        assert len(pool.live_nodes) == 2 and all(psutil.pid_exists(pid) for pid in agents)
    assert run.wait(10).status == "succeeded"
    assert not wait_gone(agents, 5.0)  # then both go, the pool's min being 0
    assert [kind for kind, _ in pool_events(session, pool)] == ["pool_grow", "pool_shrink"]


def test_runs_beyond_a_full_pool_wait_their_turn_and_a_queued_run_can_be_cancelled(session, lepton):
    """At its max with every node busy, a run that fits the pool is queued (first come, first
    served) instead of failing, starts on the nodes the first run frees, and can be cancelled
    while it waits."""
    lepton("up --min 0 --max 2")
    first = session.submit("import time\ntime.sleep(3)\n", {}, nodes=2, name="first")
    out = lepton("--nodes 1 --async --name second", "import time\nwhen = time.time()\n")
    second = session.get_run("second")
    assert "second is queued" in out and second.status == "queued"
    third = session.submit("x = 1\n", {}, nodes=2, name="third")
    assert third.status == "queued"
    queued = [json.loads(d) for (d,) in session.store.execute(
        "SELECT data FROM events WHERE run=? AND kind='queued'", (second.seq,))]
    assert queued and "max of 2 nodes" in queued[0]["reason"], queued
    third.cancel()
    assert third.wait_done(5) and third.status == "cancelled"

    first.wait(30)
    second.wait(30)
    assert second.status == "succeeded"
    assert second.outputs["when"] >= session.store.run_row("first")["ended"] - 0.5
    assert len(session.pool().live_nodes) == 2  # the queue never grew the pool past its max
    assert session.store.run_row("third")["status"] == "cancelled"
