"""The REST handlers for the sidebar, through a real Jupyter Server (pytest-jupyter's jp_fetch),
over the real store, with real runs whose cancel travels as a command to this process."""

import asyncio
import json
import sqlite3
import subprocess
import threading
import time
import uuid

import pytest
import tornado.httpclient
from jupyter_server.auth.authorizer import Authorizer

import lepton_magic as lm

pytest_plugins = ["pytest_jupyter.jupyter_server"]

LONG = "import time\nfor i in range(600):\n    lepton.log(step=i, loss=1 / (i + 1))\n    time.sleep(0.05)\n"


@pytest.fixture
def jp_server_config():
    return {"ServerApp": {"jpserver_extensions": {"lepton_magic": True}}}


async def get(jp_fetch, *path, **params):
    response = await jp_fetch("lepton", "api", *path, params=params or None)
    return json.loads(response.body)


async def post(jp_fetch, *path):
    response = await jp_fetch("lepton", "api", *path, method="POST", body="{}")
    return response.code, json.loads(response.body)


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


async def test_pools_runs_and_run_detail(jp_fetch):
    session = lm.current_session()
    pool = session.up(nodes=2)
    run = session.submit("for s in range(60):\n    lepton.log(step=s, loss=1 / (s + 1))\nprint('bye')\n",
                         {}, nodes=2, name="listed").wait()
    pools = (await get(jp_fetch, "pools"))["pools"]
    mine = [p for p in pools if p["id"] == pool.id][0]
    assert mine["backend"] == "local" and mine["nodes_total"] >= 2 and mine["status"] == "up"
    assert mine["idle_remaining"] is not None and mine["idle_remaining"] <= mine["idle_timeout"]
    runs = (await get(jp_fetch, "runs", limit="5"))["runs"]
    row = runs[0]
    assert row["id"] == run.id and row["name"] == "listed" and row["status"] == "succeeded"
    assert row["last_step"] == 59 and len(row["sparkline"]) == 40 and row["sparkline"][0] == 1.0
    detail = await get(jp_fetch, "runs", run.id)
    assert [n["node"] for n in detail["nodes"]] == ["local-0", "local-1"]
    assert len(detail["curves"]["loss"]["0"]) == 60 and detail["curves"]["loss"]["1"][0] == [0, 1.0]
    assert detail["logs"]["0"] == ["bye"]
    assert (await get(jp_fetch, "runs", "listed"))["id"] == run.id  # by name too


async def test_cancel_from_the_sidebar_reaches_the_kernel(jp_fetch):
    run = lm.current_session().submit(LONG, {}, nodes=2)
    assert wait_for(lambda: len(run._live.rank_pids) == 2)
    t0 = time.monotonic()
    code, body = await post(jp_fetch, "runs", run.id, "cancel")
    assert code == 202
    assert wait_for(lambda: run.status == "cancelled", 6.0)
    assert time.monotonic() - t0 < 6.0
    command = await get(jp_fetch, "commands", str(body["command"]))
    for _ in range(50):  # its result is written by the thread that took it, just after the cancel
        if command["result"] is not None:
            break
        await asyncio.sleep(0.1)
        command = await get(jp_fetch, "commands", str(body["command"]))
    assert command["taken"] - command["created"] < 1.0  # the kernel took it within a second
    assert "cancelling" in command["result"]
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await post(jp_fetch, "runs", run.id, "cancel")
    assert info.value.code == 409  # already ended


async def test_release_a_node_then_the_pool(jp_fetch):
    from lepton_magic.session import Session

    session = Session(store=lm.current_session().store)  # a pool no other test is using
    pool = session.up(nodes=2)
    node = pool.live_nodes[-1].name
    code, body = await post(jp_fetch, "pools", pool.id, "nodes", node, "release")
    assert code == 202
    assert wait_for(lambda: node not in [n.name for n in pool.live_nodes]), \
        session.store.query("SELECT * FROM commands WHERE id=?", (body["command"],))
    code, _ = await post(jp_fetch, "pools", pool.id, "release")
    assert code == 202
    assert wait_for(lambda: pool.closed)
    # The store says "down" once the last agent is gone, a moment after the pool closed.
    assert wait_for(lambda: session.store.query("SELECT status FROM pools WHERE id=?", (pool.id,))[0]["status"]
                    == "down")
    pools = (await get(jp_fetch, "pools"))["pools"]
    assert pool.id not in [p["id"] for p in pools]


@pytest.mark.parametrize("path, code", [
    (("runs", "r-nothere"), 404),
    (("runs", "r-nothere", "cancel"), 404),
    (("pools", "p-nothere", "release"), 404),
])
async def test_unknown_ids_are_404(jp_fetch, path, code):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        if path[-1] in ("cancel", "release"):
            await post(jp_fetch, *path)
        else:
            await get(jp_fetch, *path)
    assert info.value.code == code


@pytest.mark.parametrize("params", [{"limit": "lots"}, {"limit": "0"}, {"limit": "100000"}])
async def test_bad_input_is_400(jp_fetch, params):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await get(jp_fetch, "runs", **params)
    assert info.value.code == 400


async def test_no_token_no_data(jp_fetch, http_server_client, jp_base_url):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await http_server_client.fetch(jp_base_url + "lepton/api/runs", raise_error=True)
    assert info.value.code == 403


# --- authorization: the server's Authorizer decides, as for its own APIs (JupyterHub roles,
# read-only sharing) -----------------------------------------------------------------------------

class _RecordingAuthorizer(Authorizer):
    """Allows what ``allows(action)`` says, and remembers what it was asked about lepton's API."""

    asked: list = []

    def allows(self, action: str) -> bool:
        raise NotImplementedError

    def is_authorized(self, handler, user, action, resource):
        if "/lepton/api/" in handler.request.path:
            type(self).asked.append((handler.request.method, action, resource))
        return self.allows(action)


class _DenyAll(_RecordingAuthorizer):
    asked: list = []

    def allows(self, action):
        return False


class _ReadOnly(_RecordingAuthorizer):
    asked: list = []

    def allows(self, action):
        return action == "read"


def _with_authorizer(authorizer) -> dict:
    return {"ServerApp": {"jpserver_extensions": {"lepton_magic": True}, "authorizer_class": authorizer}}


async def _code(jp_fetch, *path, method="GET"):
    try:
        response = await jp_fetch(*path, method=method, body="{}" if method == "POST" else None)
        return response.code
    except tornado.httpclient.HTTPClientError as e:
        return e.code


LEPTON_GETS = [("pools",), ("runs",), ("runs", "r-nothere"), ("commands", "1")]
LEPTON_POSTS = [("runs", "r-nothere", "cancel"), ("pools", "p-nothere", "release"),
                ("pools", "p-nothere", "nodes", "n", "release")]


@pytest.mark.parametrize("jp_server_config", [_with_authorizer(_DenyAll)])
async def test_a_deny_all_authorizer_denies_the_lepton_api(jp_fetch):
    assert await _code(jp_fetch, "api", "contents") == 403  # the authorizer is in force
    for path in LEPTON_GETS:
        assert await _code(jp_fetch, "lepton", "api", *path) == 403, path
    for path in LEPTON_POSTS:
        assert await _code(jp_fetch, "lepton", "api", *path, method="POST") == 403, path
    assert set(_DenyAll.asked) == {("GET", "read", "lepton"), ("POST", "write", "lepton")}


@pytest.mark.parametrize("jp_server_config", [_with_authorizer(_ReadOnly)])
async def test_a_read_only_authorizer_reads_but_cannot_act(jp_fetch):
    assert await _code(jp_fetch, "lepton", "api", "pools") == 200
    assert await _code(jp_fetch, "lepton", "api", "runs") == 200
    assert await _code(jp_fetch, "lepton", "api", "runs", "r-nothere") == 404  # read, then looked up
    for path in LEPTON_POSTS:  # refused before anything is looked up
        assert await _code(jp_fetch, "lepton", "api", *path, method="POST") == 403, path
    assert set(_ReadOnly.asked) == {("GET", "read", "lepton"), ("POST", "write", "lepton")}


# --- the store is read off the Tornado loop -----------------------------------------------------

class _WriteLockHolder(threading.Thread):
    """Another process's long write transaction, in a real second connection: the store's
    writers wait on their busy timeout until it ends (``release`` or ``hold`` seconds)."""

    def __init__(self, path, hold: float):
        super().__init__(daemon=True)
        self.path, self.hold = path, hold
        self.locked, self.release = threading.Event(), threading.Event()
        self.released_at = None

    def run(self):
        db = sqlite3.connect(self.path, isolation_level=None, timeout=10)
        db.execute("BEGIN EXCLUSIVE")
        self.locked.set()
        self.release.wait(self.hold)
        db.execute("COMMIT")
        self.released_at = time.monotonic()
        db.close()


async def test_a_request_stuck_on_the_store_does_not_stall_the_server(jp_fetch):
    store = lm.current_session().store
    pool_id = f"p-stall-{uuid.uuid4().hex[:8]}"
    store.add_pool(pool_id, "local", {})  # owned by this live process: its release is a command
    holder = _WriteLockHolder(store.path, hold=4.0)
    holder.start()
    assert holder.locked.wait(10)
    try:
        t0 = time.monotonic()
        stuck = asyncio.ensure_future(post(jp_fetch, "pools", pool_id, "release"))
        await asyncio.sleep(0.3)  # the release reaches the store and waits on the lock
        await jp_fetch("api", "status")
        answered = time.monotonic()
    finally:
        holder.release.set()
        holder.join(10)
    code, _ = await stuck
    assert code == 202  # it went through once the lock was gone
    assert answered < holder.released_at, "the server answered nothing while one request waited on the store"
    assert answered - t0 < 2.0
    store.end_pool(pool_id)


# --- a GET leaves the store as it found it ------------------------------------------------------

def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def _rows(store, pool_id, seq):
    return (store.query("SELECT * FROM pools WHERE id=?", (pool_id,)),
            store.query("SELECT * FROM nodes WHERE pool=? ORDER BY node", (pool_id,)),
            store.query("SELECT * FROM runs WHERE seq=?", (seq,)),
            store.query("SELECT * FROM commands WHERE target IN (?, ?)", (pool_id, f"r-dead-{seq}")))


async def test_gets_show_a_dead_kernels_pool_and_run_as_ended_without_writing(jp_fetch):
    store = lm.current_session().store
    dead = _dead_pid()
    pool_id, run_id = f"p-dead-{uuid.uuid4().hex[:8]}", f"r-dead-{uuid.uuid4().hex[:8]}"
    store.add_pool(pool_id, "local", {"idle_timeout": 600})
    store.upsert_node(pool_id, "local-0", host="here", status="ready", gpus=0)
    store.upsert_node(pool_id, "local-1", host="here", status="lost", gpus=0)
    seq, _ = store.add_run(run_id, "dead-kernel", pool=pool_id, backend="local", world_size=1, nodes=1)
    started = time.time() - 100
    store.update_run(seq, status="running", started=started)
    store.add_metrics(seq, 0, [0, 1], ["loss", "loss"], [1.0, 0.5], [started + 1, started + 2])
    store.write([("UPDATE pools SET owner_pid=? WHERE id=?", (dead, pool_id)),
                 ("UPDATE runs SET owner_pid=? WHERE seq=?", (dead, seq))])
    before = _rows(store, pool_id, seq)
    try:
        pools = (await get(jp_fetch, "pools"))["pools"]
        every_pool = (await get(jp_fetch, "pools", all="1"))["pools"]
        listed = [r for r in (await get(jp_fetch, "runs", limit="5"))["runs"] if r["id"] == run_id][0]
        detail = await get(jp_fetch, "runs", run_id)
        assert _rows(store, pool_id, seq) == before, "a GET wrote to the store"
        assert pool_id not in [p["id"] for p in pools]
        shown = [p for p in every_pool if p["id"] == pool_id][0]
        assert shown["status"] == "down" and shown["idle_remaining"] is None
        assert [n["status"] for n in shown["nodes"]] == ["released", "lost"] and shown["nodes_total"] == 0
        for run in (listed, detail):
            assert run["status"] == "failed" and run["reason"] == "the kernel running it exited"
            assert run["ended"] == started + 2 and run["duration"] == pytest.approx(2.0)  # last heard
        with pytest.raises(tornado.httpclient.HTTPClientError) as info:
            await post(jp_fetch, "runs", run_id, "cancel")
        assert info.value.code == 409  # it has ended, for the sidebar as for the API
        assert _rows(store, pool_id, seq) == before, "a refused cancel wrote to the store"
    finally:
        store.write([("DELETE FROM metrics WHERE run=?", (seq,)), ("DELETE FROM runs WHERE seq=?", (seq,)),
                     ("DELETE FROM nodes WHERE pool=?", (pool_id,)),
                     ("DELETE FROM pools WHERE id=?", (pool_id,))])


# --- bad input is a 400 that says what was wrong and what is accepted -----------------------------

@pytest.mark.parametrize("limit", ["²", "٣", "-1", "0", "1001", "", "1.5",
                                   pytest.param("9" * 5000, id="5000-digits")])
async def test_a_bad_limit_is_400_with_a_reason(jp_fetch, limit):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await get(jp_fetch, "runs", limit=limit)
    assert info.value.code == 400
    message = json.loads(info.value.response.body)["message"]
    assert message.startswith("limit must be a whole number from 1 to 1000"), message
    assert len(message) < 200  # a 5000-digit limit is not echoed back whole


@pytest.mark.parametrize("command", ["99999999999999999999", str(2**63), "0", "²", "٣", "abc", "-1"])
async def test_a_bad_command_id_is_400_with_a_reason(jp_fetch, command):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await get(jp_fetch, "commands", command)
    assert info.value.code == 400
    message = json.loads(info.value.response.body)["message"]
    assert message.startswith(f"a command id must be a whole number from 1 to {2**63 - 1}"), message


@pytest.mark.parametrize("path", [("commands", str(2**63 - 1)), ("runs", "99999999999999999999"),
                                  ("runs", "r-nothere")])
async def test_well_formed_unknown_ids_stay_404(jp_fetch, path):
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await get(jp_fetch, *path)
    assert info.value.code == 404


async def test_a_post_body_is_not_read(jp_fetch):
    """No action takes a body: a malformed one changes nothing (the sidebar sends none)."""
    with pytest.raises(tornado.httpclient.HTTPClientError) as info:
        await jp_fetch("lepton", "api", "runs", "r-nothere", "cancel", method="POST", body="{not json")
    assert info.value.code == 404
