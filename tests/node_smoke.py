"""One node under another Python: start the agent through the local backend, run a light cell
with an input, print what came back as JSON. Run by tests/test_node_pythons.py with the Python
under test (no torch there: the cell needs none)."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import threading

from lepton_magic import config, values  # noqa: F401  (config: the settings parser imports here too)
from lepton_magic.backends.local import LocalBackend

messages: list[dict] = []
ended = threading.Event()


def on_message(_link, message: dict) -> None:
    messages.append(message)
    if message["t"] in ("result", "error"):
        ended.set()


def on_lost(_link, reason: str) -> None:
    messages.append({"t": "lost", "reason": reason})
    ended.set()


backend = LocalBackend({"preload": ""})
link = backend.start_nodes(["node-0"], os.urandom(32), on_message, on_lost, tempfile.mkdtemp())[0]
assert link.ready.wait(60), "the agent never said hello"
code = "import sys\nz = y * 2\nversion = list(sys.version_info[:2])\nprint('hello from', version)\n"
link.send({
    "t": "run", "run": "r-smoke", "code": code, "line_offset": 1, "inputs": values.dumps({"y": 21}),
    "inputs_s3": None, "outputs_s3": None, "outputs": ["z", "version"], "explicit_outputs": False,
    "node": "node-0", "node_rank": 0, "nnodes": 1, "rank_offset": 0, "local_world_size": 1, "world_size": 1,
    "master_addr": "127.0.0.1", "master_port": 29999, "env": {}, "checkpoint": None, "preload": False,
    "shm_dir": None, "threads": 1, "cwd": os.getcwd(),
})
assert ended.wait(60), f"no result: {messages}"
result = next((m for m in messages if m["t"] in ("result", "error", "lost")))
out = {"python": list(sys.version_info[:2]), "agent_python": link.facts.get("python"), "kind": result["t"]}
if result["t"] == "result":
    out["outputs"] = values.loads(result["outputs"], result.get("_buffers"))
else:
    out["error"] = result.get("traceback") or result.get("message") or result.get("reason")
ended.wait(1)
out["log"] = [line for m in messages if m["t"] == "log" for line in m["lines"]]
backend.stop_node(link)
print(json.dumps(out))
