"""Inputs reach every node at once: large buffers out of band, one private shared-memory file for
the nodes on this machine (mapped by every rank, removed when the run ends), the pipe for the
others; a run that may start again keeps a copy the notebook cannot change under it."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch

from lepton_magic import values
from lepton_magic.agent.rank import _load_inputs
from lepton_magic.inputs import Inputs
from lepton_magic.session import Session
from lepton_magic.store import Store

CELL = """import time
lepton.log(step=0, arrived=time.time())
checks = (float(x.sum()), x.dtype == torch.float32, type(w).__name__, w.requires_grad, int(a.sum()), small.tolist())
"""


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    session = Session(store=Store(tmp_path_factory.mktemp("home")))
    session.up("local", 2)
    yield session
    session.down()


def test_a_large_tensor_reaches_both_nodes_through_one_shared_file_at_once(session):
    x = torch.randn(8_000_000)  # 32 MB
    w = torch.nn.Parameter(torch.randn(512, 512))
    namespace = {"x": x, "w": w, "a": np.arange(100_000), "small": torch.tensor([1.0, 2.0]), "torch": torch}
    pool = session.pool("local")
    shm = pool.backend.shared_memory_dir()
    for warm in (False, True):
        if warm:
            # Measured on a warm pool: while a node's torch-preloaded zygote is still importing,
            # its rank imports torch itself, and two nodes warm at different moments (on 2 busy
            # cores one rank started 1.7 s after the other): that is start-up, not the inputs.
            _wait_for_preloaded_standbys(pool)
        t0 = time.time()
        run = session.submit(CELL, namespace, nodes=2)
        run.wait(120)
        assert run.status == "succeeded", run.error
        arrived = sorted(run.metrics.query("name == 'arrived'")["value"])
        assert len(arrived) == 2
    assert namespace["checks"] == (pytest.approx(float(x.sum()), rel=1e-5), True, "Parameter", True,
                                   int(np.arange(100_000).sum()), [1.0, 2.0])
    assert (arrived[1] - arrived[0]) <= 0.1 * (arrived[1] - t0) + 0.05, arrived
    assert not [f for f in os.listdir(shm) if "inputs" in f], "the run's inputs file was left behind"


def _wait_for_preloaded_standbys(pool, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(link.direct is None or link.direct.standbys(True) >= 1 for link in pool.live_nodes):
            return
        time.sleep(0.05)
    raise AssertionError("the nodes offered no standby with torch preloaded")


def test_inputs_through_the_pipe_and_from_a_bucket_load_the_same():
    x = torch.arange(100_000, dtype=torch.float64)
    inputs = Inputs.pickle({"x": x, "frame": np.ones((300, 300))})
    assert inputs.buffers and len(inputs.blob) < 10_000  # the arrays stayed out of the pickle
    piped = inputs.message(None, "r-test")
    assert set(piped) == {"inputs", "_buffers"}
    loaded = _load_inputs({**piped, "inputs": piped["inputs"]})
    assert torch.equal(loaded["x"], x) and loaded["frame"].shape == (300, 300)
    blob, buffers = values.split_oob(inputs.joined())
    assert torch.equal(values.loads(blob, buffers)["x"], x)


def test_settled_inputs_are_a_copy_the_notebook_cannot_change():
    x = torch.zeros(1_000_000)
    inputs = Inputs.pickle({"x": x})
    inputs.settle(None, "r-test")  # no shared memory here: a copy
    x += 1
    assert float(values.loads(inputs.blob, inputs.buffers)["x"].sum()) == 0.0
