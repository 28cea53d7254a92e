"""The REST handlers for the sidebar, through a real Jupyter Server (pytest-jupyter's jp_fetch),
over the real store, with real runs whose cancel travels as a command to this process."""

import json
import time

import pytest
import tornado.httpclient

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
