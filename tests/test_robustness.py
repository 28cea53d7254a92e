"""Defects found in review, each pinned by a test with real processes."""

import os
import subprocess
import sys
import time

import pytest
import torch

import lepton_magic as lm
from lepton_magic.config import Config, ConfigError
from lepton_magic.errors import LeptonError, RemoteError



def test_inputs_that_share_state_still_share_it(ip, run_cell):
    torch.manual_seed(0)
    ip.user_ns["net"] = net = torch.nn.Linear(4, 1)
    ip.user_ns["opt"] = torch.optim.SGD(net.parameters(), lr=0.1)
    result, out = run_cell(
        "%%lepton\n"
        "import torch\n"
        "shared = opt.param_groups[0]['params'][0] is net.weight\n"
        "before = net.weight.detach().clone()\n"
        "net(torch.ones(8, 4)).pow(2).sum().backward()\n"
        "opt.step()\n"
        "moved = not torch.equal(before, net.weight.detach())\n"
    )
    assert result.success, out
    assert ip.user_ns["shared"] is True and ip.user_ns["moved"] is True


def test_nan_metrics_and_numpy_steps(ip, run_cell):
    result, out = run_cell(
        "%%lepton\n"
        "import time\nimport numpy as np\n"
        "for i in np.arange(12):\n"
        "    lepton.log(step=i, loss=float('nan') if i % 2 else 1.0)\n"
        "    time.sleep(0.1)\n"
    )
    assert result.success, out
    assert "Traceback" not in out
    metrics = lm.last_run().metrics
    assert len(metrics) == 12 and metrics["value"].isna().sum() == 6
    assert list(lm.last_run().history.index) == list(range(12))


def test_bad_steps_are_refused_at_the_call(run_cell):
    result, _ = run_cell("%%lepton\nlepton.log(step=2**63, a=1.0)\n")
    assert isinstance(result.error_in_exec, RemoteError)
    assert "does not fit in 64 bits" in result.error_in_exec.message
    result, _ = run_cell("%%lepton\nlepton.log(step=1.5, a=1.0)\n")
    assert "step must be a whole number" in result.error_in_exec.message


def test_ranks_share_the_cores_of_a_machine(ip, run_cell):
    result, out = run_cell("%%lepton --nodes 2\nimport torch, os\nthreads = (torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])\n")
    assert result.success, out
    cpus = os.cpu_count()
    assert ip.user_ns["threads"] == (max(1, cpus // 2), str(max(1, cpus // 2)))
    result, out = run_cell("%%lepton --env OMP_NUM_THREADS=3\nimport torch\nthreads = torch.get_num_threads()\n")
    assert ip.user_ns["threads"] == 3


def test_last_line_without_newline_and_blank_lines_are_kept(run_cell):
    result, out = run_cell("%%lepton\nimport sys\nprint('first')\nprint('')\nsys.stdout.write('no newline')\n")
    assert result.success, out
    assert lm.last_run().logs(rank=0) == "first\n\nno newline"


def test_processes_forked_by_the_cell_do_not_repeat_its_metrics(ip):
    code = (
        "import os, time\n"
        "for i in range(10):\n    lepton.log(step=i, x=i)\n"
        "children = []\n"
        "for _ in range(3):\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    children.append(pid)\n"
        "time.sleep(30)\n"
    )
    run = lm.current_session().submit(code, ip.user_ns, nodes=1)
    deadline = time.monotonic() + 20
    while len(run.metrics) < 10 and time.monotonic() < deadline:
        time.sleep(0.1)
    run.cancel()
    run._live.wait(10)
    time.sleep(0.5)
    assert len(run.metrics) == 10


def test_a_crashed_rank_ends_the_run_even_if_its_sibling_left_a_child(ip, run_cell):
    t0 = time.monotonic()
    result, out = run_cell(
        "%%lepton --nodes 2 --timeout 5s\n"
        "import os, subprocess, time\n"
        "if lepton.rank == 1:\n"
        "    time.sleep(0.5)\n"
        "    os._exit(3)\n"
        "child = subprocess.Popen(['sleep', '40'], start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    assert isinstance(result.error_in_exec, LeptonError)
    assert "rank 1" in str(result.error_in_exec)
    assert time.monotonic() - t0 < 15
    assert lm.last_run().status == "failed"


def test_dispatch_failure_leaves_no_run_hanging(ip, monkeypatch):
    from lepton_magic import liverun

    def refuse(link, gpus):
        raise LeptonError("local-0 has 0 GPUs; --gpus 4 asks for more")

    monkeypatch.setattr(liverun, "ranks_on", refuse)
    with pytest.raises(LeptonError, match="asks for more"):
        lm.current_session().submit("x = 1", {}, nodes=1)
    run = lm.last_run()
    assert run.status == "failed"
    assert run.wait.__self__ is run
    with pytest.raises(LeptonError):
        run.wait(timeout=2)
    assert not lm.current_session().pool().busy


def test_bad_settings_name_their_source(monkeypatch, tmp_path):
    monkeypatch.setenv("LEPTON_NODES", "abc")
    with pytest.raises(ConfigError, match="LEPTON_NODES: nodes: nodes takes a positive whole number, got 'abc'"):
        Config.load()


def test_load_ext_with_bad_settings_says_so_in_one_line(tmp_path):
    env = dict(os.environ, LEPTON_NODES="abc", LEPTON_HOME=str(tmp_path))
    code = ("from IPython.testing.globalipapp import start_ipython\nip = start_ipython()\n"
            "ip.run_line_magic('load_ext', 'lepton_magic')\nimport lepton_magic as lm\n"
            "print('nodes', lm.current_session().config['nodes'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "lepton_magic: LEPTON_NODES: nodes: nodes takes a positive whole number, got 'abc'; using the default" \
        in out.stdout
    assert "nodes 1" in out.stdout and "Traceback" not in out.stdout + out.stderr


def test_a_rank_that_crashes_in_c_leaves_its_python_traceback(run_cell):
    """faulthandler is enabled once in the zygote, on fd 2, which in a standby is its stderr."""
    result, out = run_cell("%%lepton\nimport ctypes\nctypes.string_at(0)\n")
    assert isinstance(result.error_in_exec, LeptonError)
    logs = lm.last_run().logs()
    assert "Fatal Python error: Segmentation fault" in logs, logs
    assert 'File "<lepton cell>", line 3' in logs, logs
