"""Shared machines, the smaller items: ranks listen on loopback only, hung nodes are noticed,
bounds on --nodes, settings files that are wrong in odd ways, what dead kernels leave behind."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

import lepton_magic as lm


def test_local_ranks_listen_on_loopback_only(ip, run_cell):
    """Regression: the torch rendezvous (and gloo) of a local run listened on every interface
    (`::`, or the machine's address) for the length of the run."""
    result, out = run_cell(
        "%%lepton --nodes 2\n"
        "import ipaddress, psutil\n"
        "dist = lepton.init_distributed()\n"
        "me = psutil.Process()\n"
        "mine = [c.laddr.ip for c in me.net_connections('tcp') if c.status == 'LISTEN']\n"
        "dist.barrier()\n"
        "gathered = [None] * lepton.world_size\n"
        "dist.all_gather_object(gathered, mine)\n"
        "listening = gathered\n"
    )
    assert result.success, out
    listening = ip.user_ns["listening"]
    assert listening[0], "rank 0 listens nowhere?"
    for rank, addresses in enumerate(listening):
        assert all(a.startswith("127.") or a == "::1" for a in addresses), (rank, addresses)


def test_a_hung_node_is_lost_and_never_handed_out_again(tmp_path):
    """Regression: a SIGSTOPped agent left its run `running` with no message, the node `ready`
    with an old last_seen, and the next run was given the hung node."""
    from lepton_magic.config import Config
    from lepton_magic.session import Session
    from lepton_magic.store import Store

    config = Config.defaults()
    config.set("heartbeat_timeout", "4s")
    session = Session(config, Store(tmp_path))
    try:
        run = session.submit("import time\ntime.sleep(60)\n", {}, nodes=2)
        deadline = time.monotonic() + 30
        while run.status != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        pool = session.pool()
        hung = pool.live_nodes[1]
        pid = hung.facts["pid"]
        os.kill(pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(lm.LeptonError, match=r"local-1 was lost \(no heartbeat for \d+ s\)"):
            run.wait(30)
        noticed = time.monotonic() - t0
        assert noticed < 12, f"noticed after {noticed:.1f} s"
        nodes = session.store.query("SELECT node, status FROM nodes WHERE pool=? ORDER BY node", (pool.id,))
        assert [n["status"] for n in nodes] == ["ready", "lost"]
        assert session.store.query("SELECT status FROM run_nodes WHERE run=? AND node='local-1'",
                                   (run.seq,))[0]["status"] == "lost"
        deadline = time.monotonic() + 10
        while psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the hung agent was left running"
            time.sleep(0.1)
        again = session.submit("import os\nnode = lepton.node\n", {}, nodes=2).wait(60)
        assert "local-1" not in list(again.nodes["node"]), "the hung node was handed to a new run"
    finally:
        session.close()


def test_a_killed_agent_is_reaped_at_once(tmp_path):
    """Regression: a killed agent stayed a zombie child of the kernel until %lepton down."""
    from lepton_magic.session import Session
    from lepton_magic.store import Store

    session = Session(store=Store(tmp_path))
    try:
        pool = session.up(nodes=1)
        pid = pool.live_nodes[0].facts["pid"]
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:
            try:
                zombie = psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                break
            assert time.monotonic() < deadline, f"agent {pid} still {'a zombie' if zombie else 'there'}"
            time.sleep(0.1)
    finally:
        session.close()


@pytest.mark.parametrize("line", ["--nodes 99999999999999999999", "--nodes 65"])
def test_node_counts_beyond_max_nodes_get_one_line(run_cell, line):
    result, out = run_cell(f"%%lepton {line}\nx = 1\n")
    assert not result.success
    message = str(result.error_in_exec)
    assert "is more than max_nodes (64)" in message and "%lepton config max_nodes=" in message


@pytest.mark.parametrize("text, expected", [
    ("timeout = true\n", "timeout: expected a duration like 90s, 30m or 2h, got true"),
    ("timeout = -1\n", "timeout: expected a positive duration"),
    ("idle_timeout = 0\n", "idle_timeout: expected a positive duration"),
    ("nodes = 2.5\n", "nodes takes a positive whole number"),
    ("nodes = true\n", "nodes takes a positive whole number"),
    (b"backend = '\xff'\n", "is not UTF-8 text"),
    (None, "cannot be read"),  # a directory where the file should be
])
def test_odd_settings_files_get_one_line_naming_file_and_key(tmp_path, monkeypatch, text, expected):
    """Regression: TOML `true` became 1 s, -1 was accepted, and a non-UTF-8 file or a directory
    in its place raised a traceback at %load_ext."""
    from lepton_magic.config import Config, ConfigError

    path = tmp_path / "config.toml"
    if text is None:
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    monkeypatch.setenv("LEPTON_CONFIG", str(path))
    with pytest.raises(ConfigError) as caught:
        Config.load()
    message = str(caught.value)
    assert expected in message and str(path) in message and "\n" not in message


KILLED_KERNEL = """
import lepton_magic as lm, time
session = lm.current_session()
run = session.submit("import time\\nfor i in range(600):\\n    lepton.log(step=i, loss=1.0)\\n    time.sleep(0.1)\\n",
                     {{}}, nodes=2, name="orphaned")
while len(run.metrics) < 5:
    time.sleep(0.1)
print("running", flush=True)
time.sleep(600)
"""


def test_the_next_session_closes_what_a_killed_kernel_left_open(tmp_path):
    """Regression: after a kernel was killed its run stayed `running`, its pool `up` and its node
    rows `running` until someone read them lazily, and `ended` was stamped when someone first
    looked (not when the run was last heard from)."""
    import subprocess
    import sys

    from lepton_magic.session import Session
    from lepton_magic.store import OWNER_GONE_REASON, Store

    home = tmp_path / "home"
    script = tmp_path / "kernel.py"
    script.write_text(KILLED_KERNEL.format())
    kernel = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, LEPTON_HOME=str(home)))
    assert kernel.stdout.readline().strip() == "running"
    os.kill(kernel.pid, signal.SIGKILL)
    kernel.wait()
    killed_at = time.time()
    time.sleep(3)  # someone opens the store a while later
    store = Store(home)
    before = store.query("SELECT status FROM runs")
    assert [r["status"] for r in before] == ["running"]
    session = Session(store=store)
    try:
        run = store.query("SELECT * FROM runs")[0]
        assert run["status"] == "failed" and run["reason"] == OWNER_GONE_REASON
        assert run["ended"] <= killed_at + 0.5, "ended is when someone looked, not when it was last heard from"
        assert {r["status"] for r in store.query("SELECT status FROM run_nodes")} == {"lost"}
        assert [p["status"] for p in store.query("SELECT status FROM pools")] == ["down"]
        assert {n["status"] for n in store.query("SELECT status FROM nodes")} == {"lost"}
    finally:
        session.close()


def _orphan(store, **owner):
    seq, _name = store.add_run("r-" + os.urandom(3).hex(), None, pool="p-x", backend="local")
    sets = ", ".join(f"{k}=?" for k in owner)
    store.write([(f"UPDATE runs SET status='running', started=?, {sets} WHERE seq=?",
                  (time.time() - 100, *owner.values(), seq))])
    return seq


def test_a_reused_pid_does_not_keep_a_dead_kernels_run_alive(tmp_path):
    """The pid of a dead kernel may belong to another process by now: its start time tells."""
    from lepton_magic import owners
    from lepton_magic.store import Store

    store = Store(tmp_path)
    me = owners.this_process()
    reused = _orphan(store, owner_pid=me["owner_pid"], owner_started=me["owner_started"] - 3600)
    mine = _orphan(store, owner_pid=me["owner_pid"], owner_started=me["owner_started"])
    assert store.reconcile() == 1
    assert store.run_row(reused)["status"] == "failed" and store.run_row(mine)["status"] == "running"


def test_owners_on_other_machines_are_gone_when_their_lease_expires(tmp_path):
    from lepton_magic import owners
    from lepton_magic.store import Store

    store = Store(tmp_path)
    now = time.time()
    expired = _orphan(store, owner_host="elsewhere", owner_pid=1,
                      lease=now - owners.LEASE_GRACE_SECONDS - 1)
    fresh = _orphan(store, owner_host="elsewhere", owner_pid=1, lease=now + 30)
    store.reconcile()
    assert store.run_row(expired)["status"] == "failed" and store.run_row(fresh)["status"] == "running"
    store.renew_leases([], [store.run_row(fresh)["id"]])
    assert store.run_row(fresh)["lease"] >= now + owners.LEASE_SECONDS - 1
