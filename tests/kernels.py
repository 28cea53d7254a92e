"""A real Jupyter kernel for tests, driven through jupyter_client as a notebook frontend drives it."""

from __future__ import annotations

import os
import queue
import time
from dataclasses import dataclass, field

from jupyter_client.manager import KernelManager


@dataclass
class Reply:
    status: str
    outputs: list[dict] = field(default_factory=list)
    error: dict | None = None

    @property
    def stdout(self) -> str:
        return "".join(o["text"] for o in self.outputs if o.get("name") == "stdout")

    def data(self, mime: str) -> list:
        return [o["data"][mime] for o in self.outputs if mime in o.get("data", {})]


class Kernel:
    """One ipykernel process with its own LEPTON_HOME and working directory."""

    def __init__(self, home: str, cwd: str):
        env = dict(os.environ, LEPTON_HOME=home)
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(env=env, cwd=cwd)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 90, on_output=None) -> Reply:
        """Execute ``code``; collect its outputs until the kernel is idle again. ``on_output``
        sees each output as it arrives (to act in the middle of a run)."""
        msg_id = self.client.execute(code)
        reply = Reply("ok")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no end of the cell within {timeout} s: {code[:80]!r} (outputs {reply.outputs})"
            try:
                msg = self.client.get_iopub_msg(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "status" and content["execution_state"] == "idle":
                break
            if kind in ("stream", "display_data", "execute_result", "update_display_data"):
                reply.outputs.append(dict(content, output_type=kind))
                if on_output is not None:
                    on_output(reply.outputs[-1])
            elif kind == "error":
                reply.status, reply.error = "error", content
        return reply

    def interrupt(self) -> None:
        self.manager.interrupt_kernel()

    def restart(self) -> None:
        self.manager.restart_kernel(now=False)
        self.client.wait_for_ready(timeout=60)

    def stop(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=False)
