"""What a new user meets in the first hour, on the local backend through a real InteractiveShell:
cell code that is a real ``__main__``, ranks in the notebook's folder, tracebacks in the logs,
progress bars, the package's own import surface."""

from __future__ import annotations

import subprocess
import sys
import time

import lepton_magic as lm


def test_functions_defined_in_the_cell_pickle_by_reference_like_in_a_notebook(ip, run_cell):
    """Regression: ``Pool.map(square, ...)`` with ``square`` defined in the cell failed with
    "attribute lookup square on __main__ failed" (the cell ran in a dict, not in __main__)."""
    result, out = run_cell(
        "%%lepton\n"
        "import multiprocessing, sys\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "def square(x):\n"
        "    return x * x\n"
        "with multiprocessing.get_context('fork').Pool(2) as pool:\n"
        "    by_pool = pool.map(square, range(5))\n"
        "with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context('fork')) as ex:\n"
        "    by_executor = list(ex.map(square, range(4)))\n"
        "main_is_the_cell = sys.modules['__main__'].__dict__ is globals()\n"
    )
    assert result.success, out
    assert ip.user_ns["by_pool"] == [0, 1, 4, 9, 16] and ip.user_ns["by_executor"] == [0, 1, 4, 9]
    assert ip.user_ns["main_is_the_cell"] is True


def test_dataloader_workers_use_a_dataset_and_collate_defined_in_the_cell(ip, run_cell):
    result, out = run_cell(
        "%%lepton\n"
        "import torch\n"
        "from torch.utils.data import DataLoader, Dataset\n"
        "class Squares(Dataset):\n"
        "    def __len__(self):\n"
        "        return 8\n"
        "    def __getitem__(self, i):\n"
        "        return torch.tensor([float(i * i)])\n"
        "def stack(batch):\n"
        "    return torch.stack(batch).sum()\n"
        "loader = DataLoader(Squares(), batch_size=4, num_workers=2, collate_fn=stack)\n"
        "sums = [float(b) for b in loader]\n"
        "del loader\n"
    )
    assert result.success, out
    assert ip.user_ns["sums"] == [14.0, 126.0]


def test_local_ranks_run_in_the_notebooks_current_folder(ip, run_cell, tmp_path):
    """Regression: after %cd the ranks still ran in the folder where the pool had started, and
    a module beside the notebook did not import."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "models.py").write_text("WIDTH = 64\n")
    (folder / "data.csv").write_text("a,b\n1,2\n")
    run_cell("%%lepton\nx = 1\n")  # the pool starts in the old folder
    before = ip.run_line_magic("pwd", "")
    try:
        ip.run_line_magic("cd", str(folder))
        result, out = run_cell("%%lepton\nimport os, models\nwhere = os.getcwd()\nwidth = models.WIDTH\n"
                               "text = open('data.csv').read()\n")
    finally:
        ip.run_line_magic("cd", before)
    assert result.success, out
    assert ip.user_ns["where"] == str(folder)
    assert ip.user_ns["width"] == 64 and ip.user_ns["text"].startswith("a,b")


def test_a_failed_ranks_traceback_is_in_its_log(ip, run_cell):
    """Regression: the traceback was only in the raised error, not in run.logs(), %lepton logs
    or the sidebar's run detail."""
    # Rank 1 fails once rank 0 has printed and ended (a failure cancels the other ranks).
    result, out = run_cell("%%lepton --nodes 2 --name failing\nprint('before')\nif lepton.rank == 1:\n"
                           "    1 / 0 if __import__('time').sleep(1) is None else 0\n")
    assert not result.success
    run = lm.get_run("failing")
    logs = run.logs(rank=1)
    assert "Traceback (most recent call last):" in logs and "ZeroDivisionError: division by zero" in logs
    assert 'File "<lepton cell>", line 4' in logs  # the cell's own line numbers
    assert "before" in run.logs(rank=0) and "Traceback" not in run.logs(rank=0)
    _result, printed = run_cell("%lepton logs failing --rank 1")
    assert "ZeroDivisionError: division by zero" in printed
    from lepton_magic.server.manager import LeptonManager

    detail = LeptonManager(run.store).run(run.id)
    assert any("ZeroDivisionError" in line for line in detail["logs"]["1"])


def test_a_progress_bar_shows_its_current_state_while_it_runs(ip):
    """Regression: a line redrawn with carriage returns (tqdm) showed nothing until it ended."""
    session = lm.current_session()
    run = session.submit(
        "import sys, time\n"
        "for i in range(1, 31):\n"
        "    sys.stdout.write(f'\\rtraining {i}/30')\n"
        "    sys.stdout.flush()\n"
        "    time.sleep(0.1)\n"
        "print()\n", {}, nodes=1)
    seen = set()
    deadline = time.monotonic() + 30
    while not run.done and time.monotonic() < deadline:
        seen.update(run.store.log_partials(run.seq).values())
        time.sleep(0.05)
    run.wait(10)
    progress = {int(s.split()[1].split("/")[0]) for s in seen if s.startswith("training ")}
    # (30/30 may be seen too: it stands unfinished for 0.1 s before the newline ends it)
    assert len(progress) >= 3 and min(progress) < 30, f"unfinished states seen: {sorted(seen)}"
    assert run.logs(rank=0) == "training 30/30"  # the log keeps the final state only
    assert run.store.log_partials(run.seq) == {}


def test_import_lepton_magic_session_is_the_module():
    """Regression: the lm.session() accessor shadowed the module lepton_magic.session."""
    code = ("import types, lepton_magic.session as s, lepton_magic as lm\n"
            "assert isinstance(s, types.ModuleType) and s.Session is lm.Session, s\n"
            "assert isinstance(lm.current_session(), s.Session)\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_the_node_side_imports_nothing_of_the_kernel_side():
    code = ("import sys, lepton_magic.agent.node, lepton_magic.agent.rank\n"
            "kernel_side = {'lepton_magic.session', 'lepton_magic.store', 'lepton_magic.run', 'lepton_magic.config',"
            " 'lepton_magic.liverun', 'lepton_magic.pool', 'lepton_magic.magics', 'IPython', 'pandas', 'sqlite3',"
            " 'matplotlib', 'ipywidgets', 'boto3', 'asyncssh'}\n"
            "print(sorted(kernel_side & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_names_the_cell_binds_itself_are_not_shipped(ip, run_cell, tmp_path):
    """Regression: `with open(...) as f` was refused ("cannot send 'f'") when the notebook had a
    closed file `f`, and `for batch in ...` shipped the notebook's 100 MB `batch`."""
    import torch

    notes = tmp_path / "notes.txt"
    notes.write_text("remember\n")
    with open(notes) as f:
        ip.user_ns["f"] = f
    ip.user_ns["batch"] = torch.zeros(25_000_000)  # 100 MB
    ip.user_ns["notes_path"] = str(notes)
    result, out = run_cell("%%lepton\nwith open(notes_path) as f:\n    text = f.read()\n"
                           "total = 0\nfor batch in range(3):\n    total += batch\n")
    assert result.success, out
    assert ip.user_ns["text"] == "remember\n" and ip.user_ns["total"] == 3
    assert lm.last_run().store.run_row(lm.last_run().id)["inputs"] == '["notes_path"]'
    del ip.user_ns["batch"], ip.user_ns["f"]
