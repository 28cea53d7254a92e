"""A new user's first hour, in a real kernel driven through jupyter_client: runs whose metrics
are not called loss, interrupting a cell, restarting the kernel mid-run."""

from __future__ import annotations

import json
import os
import time

import pytest

from kernels import Kernel
from lepton_magic.kernel_shutdown import RESTARTED
from lepton_magic.store import Store


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kernel-home"))


@pytest.fixture(scope="module")
def kernel(home, tmp_path_factory):
    k = Kernel(home, str(tmp_path_factory.mktemp("kernel-cwd")))
    assert k.run("%load_ext lepton_magic").status == "ok"
    yield k
    k.stop()


def test_a_run_whose_metrics_are_not_loss_returns(kernel):
    """Regression: the first metric `acc` froze the kernel for good (blocking cells, --async
    cells and %lepton attach alike)."""
    reply = kernel.run("%%lepton --nodes 1 --name acc-only\nlepton.log(step=0, acc=0.5)\nlepton.log(step=1, acc=0.75)\n",
                       timeout=60)
    assert reply.status == "ok", reply.error
    assert "acc-only succeeded" in reply.stdout
    reply = kernel.run("%%lepton --nodes 1 --async --name acc-async\nlepton.log(step=0, zeta=1.0)\n"
                       "lepton.log(step=0, alpha=2.0)\n", timeout=60)
    assert reply.status == "ok", reply.error
    reply = kernel.run("import lepton_magic as lm\nlm.get_run('acc-async').wait(30).status", timeout=60)
    assert reply.status == "ok" and reply.data("text/plain") == ["'succeeded'"], reply
    reply = kernel.run("%lepton attach acc-only", timeout=60)
    assert reply.status == "ok", reply.error
    reply = kernel.run("%%lepton --nodes 1 --name no-metrics\nprint('nothing logged')\n", timeout=60)
    assert reply.status == "ok" and "no-metrics succeeded" in reply.stdout, reply


def test_a_finished_run_leaves_one_record_with_the_rank_output(kernel):
    reply = kernel.run("%%lepton --nodes 2 --name record\nfor i in range(3):\n    print(f'hello {i}')\n"
                       "    lepton.log(step=i, loss=1 / (i + 1))\n", timeout=60)
    assert reply.status == "ok", reply.error
    shown = [o for o in reply.outputs if o["output_type"] == "display_data"]
    assert len(shown) == 1, f"the run shows in {len(shown)} outputs, not one"
    panel_id = shown[0]["transient"]["display_id"]
    # (Updates to other display ids may arrive meanwhile: an earlier --async run's record.)
    finals = [o for o in reply.outputs
              if o["output_type"] == "update_display_data" and o["transient"]["display_id"] == panel_id]
    assert finals, "the live panel was not replaced by the run's record"
    record = finals[-1]["data"]
    assert set(record) == {"text/html", "text/plain", "image/png"}  # no widget left behind
    assert "[rank 1] hello 2" in record["text/plain"] and "[rank 0] hello 0" in record["text/html"]


def test_interrupt_cancels_and_ends_with_one_keyboardinterrupt_line(kernel, home):
    started = []

    def on_output(output):
        if not started and "lepton-panel" in str(output.get("data", {}).get("text/html", "")) or \
                "application/vnd.jupyter.widget-view+json" in output.get("data", {}):
            started.append(time.monotonic())

    def interrupt_when_running(output):
        on_output(output)

    code = "%%lepton --nodes 2 --name interrupted\nimport time\nfor i in range(600):\n    time.sleep(0.1)\n"
    import threading

    def interrupter():
        store = Store(home)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            row = store.run_row("interrupted")
            if row and row["status"] == "running":
                break
            time.sleep(0.1)
        time.sleep(0.5)
        kernel.interrupt()

    thread = threading.Thread(target=interrupter, daemon=True)
    thread.start()
    t0 = time.monotonic()
    reply = kernel.run(code, timeout=90, on_output=interrupt_when_running)
    thread.join(5)
    assert time.monotonic() - t0 < 40, "the interrupt did not stop the cell"
    assert reply.status == "error"
    assert reply.error["ename"] == "KeyboardInterrupt", reply.error
    assert reply.error["traceback"] == ["KeyboardInterrupt: interrupted was cancelled"]
    assert "interrupted cancelled" in reply.stdout
    assert Store(home).run_row("interrupted")["status"] == "cancelled"


def test_a_kernel_restart_during_a_run_says_so(home, tmp_path):
    k = Kernel(home, str(tmp_path))
    try:
        assert k.run("%load_ext lepton_magic").status == "ok"
        reply = k.run("%%lepton --nodes 1 --async --name outlived\nimport time\ntime.sleep(120)\n", timeout=60)
        assert reply.status == "ok", reply.error
        store = Store(home)
        deadline = time.monotonic() + 60
        while store.run_row("outlived")["status"] != "running":
            assert time.monotonic() < deadline, "the run never started"
            time.sleep(0.1)
        k.restart()
        deadline = time.monotonic() + 30
        while store.run_row("outlived")["status"] == "running":
            assert time.monotonic() < deadline, "the run outlived the restart"
            time.sleep(0.1)
        row = store.run_row("outlived")
        assert row["status"] == "cancelled" and row["reason"] == RESTARTED, row
    finally:
        k.stop()


def test_a_saved_and_exported_notebook_shows_what_the_ranks_printed(tmp_path, home):
    """Regression: rank output lived only inside the widget; a saved, exported or papermill-run
    notebook held the summary line and a PNG, nothing the ranks printed."""
    import nbformat
    from nbclient import NotebookClient
    from nbconvert import HTMLExporter

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext lepton_magic"),
        nbformat.v4.new_code_cell("%%lepton --nodes 2 --name exported\nfor step in range(5):\n"
                                  "    print(f'step {step} of rank {lepton.rank}')\n"
                                  "    lepton.log(step=step, loss=1 / (step + 1))\n"),
    ])
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=dict(os.environ, LEPTON_HOME=home))
    path = tmp_path / "executed.ipynb"
    nbformat.write(nb, path)
    saved = nbformat.read(path, as_version=4)
    outputs = saved.cells[1].outputs
    records = [o for o in outputs if o.output_type == "display_data"]
    assert len(records) == 1, [o.output_type for o in outputs]
    data = records[0].data
    assert "application/vnd.jupyter.widget-view+json" not in data
    assert "[rank 1] step 4 of rank 1" in data["text/plain"] and "image/png" in data
    html_page, _resources = HTMLExporter().from_notebook_node(saved)
    assert "[rank 0] step 0 of rank 0" in html_page and "[rank 1] step 4 of rank 1" in html_page
    assert html_page.count('src="data:image/png;base64') == 1  # the curves once, inside the record
    state = json.dumps(saved.metadata.get("widgets", {}))
    assert "iVBORw0KGgo" not in state, "the closed panel's curves are saved again in the widget state"
