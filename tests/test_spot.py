"""Spot interruptions: the agent watches the instance metadata (a fake IMDSv2 server on
127.0.0.1), warns the kernel and the cell (``lepton.preempting``), and a run that checkpoints on
the notice resumes from there on a new node once the instance is reclaimed (real processes)."""

from __future__ import annotations

import http.server
import json
import queue
import socket
import threading
import time
from pathlib import Path

import psutil
import pytest

from lepton_magic.agent import spot
from lepton_magic.config import Config
from lepton_magic.session import Session
from lepton_magic.store import Store

POLL_SECONDS = 0.3
NOTICE = {"action": "terminate", "time": "2026-12-02T03:00:00Z"}
TOKEN = "fake-imds-token"


class FakeMetadata(http.server.ThreadingHTTPServer):
    """IMDSv2 as a spot instance sees it: 404 for the instance action until ``notice`` is set;
    ``mode`` "error" answers 500 to everything."""

    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _MetadataHandler)
        self.notice: dict | None = None
        self.mode = "ok"
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, token sent
        threading.Thread(target=self.serve_forever, daemon=True, name="fake-imds").start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _MetadataHandler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):
        self.server.requests.append(("PUT", self.path, None))
        if self.server.mode == "error":
            return self._answer(500, b"broken")
        if self.path == spot.TOKEN_PATH and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._answer(200, TOKEN.encode())
        self._answer(400, b"")

    def do_GET(self):
        token = self.headers.get("X-aws-ec2-metadata-token")
        self.server.requests.append(("GET", self.path, token))
        if self.server.mode == "error":
            return self._answer(500, b"broken")
        if token != TOKEN:
            return self._answer(401, b"")
        if self.path != spot.NOTICE_PATH or self.server.notice is None:
            return self._answer(404, b"Not Found")
        self._answer(200, json.dumps(self.server.notice).encode())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def metadata():
    server = FakeMetadata()
    yield server
    server.stop()


@pytest.fixture
def session(tmp_path, monkeypatch):
    monkeypatch.setenv("LEPTON_SPOT_POLL_SECONDS", str(POLL_SECONDS))  # the agents inherit it
    config = Config.defaults()
    config.set("heartbeat_timeout", "4s")
    # Every local agent here reads the same fake metadata server: a warm spare would get the
    # notice too (on EC2 each instance has its own), and the reclaim must find a fresh node.
    config.set("retry_spare", "off")
    s = Session(config, Store(tmp_path))
    yield s
    s.close()


def _up(session, url: str):
    """A local pool whose agents watch ``url`` (no torch: the cells here need none)."""
    assert url.startswith("http://127.0.0.1:"), "a test must never reach the real metadata service"
    return session.up("local", 1, preload="", spot_watch=True, spot_metadata_url=url)


def _agent(session, node: str) -> psutil.Process:
    return psutil.Process(next(link.facts["pid"] for link in session.pool().live_nodes if link.name == node))


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


# Checks the flag every step; on the notice, logs when it saw it and saves a checkpoint, then
# keeps going slowly (as a loop does until the instance goes). The retry runs a few steps more.
TRAIN = """
import time
state = lepton.restore() or {"step": 0}
resumed_from = state["step"]
seen = False
for step in range(resumed_from, resumed_from + 2000):
    if lepton.preempting and not seen:
        seen = True
        lepton.log(step=step, preempting_seen=time.time())
        lepton.checkpoint({"step": step})
    lepton.log(step=step, loss=1.0 / (step + 1))
    time.sleep(0.05)
    if lepton.attempt and step >= resumed_from + 10:
        break
attempt = lepton.attempt
preempting_on_retry = lepton.preempting
"""


def _metric(session, run, name: str) -> list[tuple[int, float]]:
    return session.store.execute("SELECT step, value FROM metrics WHERE run=? AND name=? ORDER BY step",
                                 (run.seq, name))


def test_a_spot_notice_reaches_the_cell_and_the_run_resumes_on_a_new_node(session, metadata):
    pool = _up(session, metadata.url)
    agent = _agent(session, "local-0")
    command = agent.cmdline()
    assert command[command.index("--spot-metadata") + 1] == metadata.url
    assert "169.254.169.254" not in " ".join(command)

    run = session.submit(TRAIN, {}, nodes=1, retries=1, name="spot")
    _wait(lambda: len(_metric(session, run, "loss")) >= 10, 60, "the run to get going")
    assert not _metric(session, run, "preempting_seen"), "preempting before any notice"

    noticed = time.time()
    metadata.notice = NOTICE
    seen = _wait(lambda: _metric(session, run, "preempting_seen"), 15, "lepton.preempting")
    delay = seen[0][1] - noticed
    print(f"notice posted → lepton.preempting True in the cell: {delay:.2f} s (polls every {POLL_SECONDS} s)")
    assert delay < 3.0
    checkpoint_step = seen[0][0]
    _wait(lambda: session.store.last_checkpoint(run.seq) is not None, 10, "the checkpoint")

    events = session.store.query("SELECT run, pool, data FROM events WHERE kind='node_preempting'")
    assert {(e["run"], e["pool"]) for e in events} == {(None, pool.id), (run.seq, None)}
    assert all(json.loads(e["data"]) == {"node": "local-0", **NOTICE} for e in events)
    status = "SELECT status FROM nodes WHERE pool=? AND node=?"
    assert session.store.execute(status, (pool.id, "local-0"))[0][0] == "preempting"
    assert any(m == "GET" and p == spot.NOTICE_PATH and t == TOKEN for m, p, t in metadata.requests)

    # The reclaim: the instance vanishes. The next node is an instance with no notice.
    metadata.notice = None
    agent.kill()
    run.wait(90)
    assert run.status == "succeeded"
    assert run.outputs["attempt"] == 1
    assert run.outputs["resumed_from"] == checkpoint_step
    assert run.outputs["preempting_on_retry"] is False
    attempts = run.attempts
    assert list(attempts["attempt"]) == [1, 2]
    assert "local-0" in attempts["reason"].iat[0]
    assert "local-0" not in attempts["nodes"].iat[1]
    assert session.store.execute(status, (pool.id, "local-0"))[0][0] == "lost"


def test_a_node_with_a_notice_is_given_to_no_new_run(session, metadata):
    metadata.notice = NOTICE
    _up(session, metadata.url)
    _wait(lambda: session.store.query("SELECT 1 FROM events WHERE kind='node_preempting'"), 15, "the notice")
    run = session.submit("flag = lepton.preempting\n", {}, nodes=1)
    run.wait(60)
    assert list(run.nodes["node"]) != ["local-0"], "a new run was placed on a node being reclaimed"
    # AWS repeats the notice on every poll: the kernel hears of it once per node.
    time.sleep(4 * POLL_SECONDS)
    notices = session.store.query("SELECT data FROM events WHERE kind='node_preempting' AND pool IS NOT NULL")
    assert sum('"local-0"' in n["data"] for n in notices) == 1


@pytest.fixture
def hanging_endpoint():
    """Takes connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    sock.close()


@pytest.fixture
def absent_endpoint():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there: connections are refused
    return f"http://127.0.0.1:{port}"


SHORT_RUN = """
import time
for step in range(10):
    lepton.log(step=step, x=1.0)
    time.sleep(0.05)
done = True
"""


@pytest.mark.parametrize("failure", ["error", "hang", "absent"])
def test_a_broken_metadata_service_never_stalls_the_agent(session, metadata, hanging_endpoint,
                                                          absent_endpoint, failure):
    metadata.mode = "error"
    url = {"error": metadata.url, "hang": hanging_endpoint, "absent": absent_endpoint}[failure]
    pool = _up(session, url)
    link = pool.live_nodes[0]
    pongs: queue.Queue = queue.Queue()
    on_message = link._on_message

    def spy(source, message):
        if message.get("t") == "pong":
            pongs.put(message)
        on_message(source, message)

    link._on_message = spy
    for _ in range(8):  # across several polls (a hung one lasts its 2 s timeout)
        sent = time.monotonic()
        link.send({"t": "ping", "time": time.time()})
        pongs.get(timeout=3.0)
        assert time.monotonic() - sent < 1.5  # (a stall behind a hung poll is 2 s)
        time.sleep(0.25)
    run = session.submit(SHORT_RUN, {}, nodes=1)
    run.wait(30)
    assert run.outputs["done"] is True
    assert link.alive and time.monotonic() - link.last_heard < 3
    agent_log = Path(session.store.home) / "logs" / "agent-local-0.log"
    log = _wait(lambda: "cannot read spot notices" in agent_log.read_text() and agent_log.read_text(), 10,
                "the agent to say it cannot read the notices")
    assert log.count("cannot read spot notices") == 1, log  # once, not once a poll
    assert not session.store.query("SELECT 1 FROM events WHERE kind='node_preempting'")


def test_the_client_speaks_imdsv2(metadata):
    client = spot.MetadataClient(metadata.url)
    assert client.notice() is None
    metadata.notice = NOTICE
    assert client.notice() == NOTICE
    assert [m for m, _p, _t in metadata.requests] == ["PUT", "GET", "GET"]  # the token is kept
    client._token = "stale"  # the service restarted: a new token, once
    assert client.notice() == NOTICE
    metadata.mode = "error"
    with pytest.raises(OSError):
        client.notice()


def test_watching_is_on_only_where_asked():
    assert spot.metadata_url({}) is None
    assert spot.metadata_url({"spot_watch": False}, on_spot=False) is None
    assert spot.metadata_url({}, on_spot=True) == spot.DEFAULT_METADATA_URL
    local = "http://127.0.0.1:9"
    assert spot.metadata_url({"spot_watch": True, "spot_metadata_url": local}) == local
    assert spot.agent_arguments(None) == []
