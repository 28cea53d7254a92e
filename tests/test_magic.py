"""%%lepton end to end on the local backend, through a real InteractiveShell and real processes."""

import json

import pytest
import torch
from IPython.core.error import UsageError

import lepton_magic as lm
from lepton_magic.errors import RemoteError


def test_two_node_ddp_with_all_reduce_comes_back(ip, run_cell):
    ip.user_ns["X_train"] = torch.randn(64, 8)
    ip.user_ns["y_train"] = torch.randint(0, 3, (64,))
    result, out = run_cell(
        "%%lepton --nodes 2\n"
        "import torch\n"
        "dist = lepton.init_distributed()\n"
        "torch.manual_seed(0)\n"
        "model = torch.nn.Linear(8, 3)\n"
        "ddp = torch.nn.parallel.DistributedDataParallel(model)\n"
        "opt = torch.optim.SGD(ddp.parameters(), lr=0.1)\n"
        "shard = slice(lepton.rank, None, lepton.world_size)\n"
        "for step in range(20):\n"
        "    opt.zero_grad()\n"
        "    loss = torch.nn.functional.cross_entropy(ddp(X_train[shard]), y_train[shard])\n"
        "    loss.backward()\n"
        "    opt.step()\n"
        "    lepton.log(step=step, loss=loss.item())\n"
        "total = torch.tensor([float(lepton.rank + 1)])\n"
        "dist.all_reduce(total)\n"
        "ranks_seen = (lepton.rank, lepton.world_size)\n"
    )
    assert result.success, out
    assert ip.user_ns["total"].item() == 3.0  # 1 + 2 from the two ranks
    assert ip.user_ns["ranks_seen"] == (0, 2)  # rank 0's values come back
    model = ip.user_ns["model"]
    assert isinstance(model, torch.nn.Linear) and model.weight.device.type == "cpu"
    assert isinstance(ip.user_ns["ddp"], torch.nn.Linear)  # DDP comes back unwrapped
    assert "torch" not in ip.user_ns or ip.user_ns["torch"] is torch  # modules are not outputs
    run = lm.last_run()
    assert run.status == "succeeded"
    metrics = run.metrics
    assert list(metrics.columns) == ["rank", "step", "name", "value", "time", "attempt"]
    assert sorted(metrics["rank"].unique()) == [0, 1]
    assert len(metrics) == 40  # 20 steps x 2 ranks, nothing lost
    history = run.history
    assert list(history.columns) == ["loss"] and list(history.index) == list(range(20))
    nodes = run.nodes
    assert list(nodes["node"]) == ["local-0", "local-1"] and list(nodes["ranks"]) == [[0], [1]]
    assert list(nodes["status"]) == ["done", "done"]
    assert run.id in lm.runs().index
    assert "succeeded" in out and "bound:" in out


def test_inputs_by_ast_and_outputs_by_assignment(ip, run_cell):
    ip.user_ns.update(alpha=3, beta=4, unused=object())  # `unused` cannot be pickled, and is not needed
    result, out = run_cell("%%lepton\ngamma = alpha * beta\n_hidden = 1\n")
    assert result.success, out
    assert ip.user_ns["gamma"] == 12 and "_hidden" not in ip.user_ns
    row = lm.current_session().store.run_row(lm.last_run().id)
    assert json.loads(row["inputs"]) == ["alpha", "beta"]


def test_in_and_out_override_the_analysis(ip, run_cell):
    ip.user_ns.update(p=2, q=5)
    ip.user_ns.pop("r1", None)
    result, out = run_cell("%%lepton --in p --out r2\nr1 = p * 10\nr2 = p + 1\n")
    assert result.success, out
    assert ip.user_ns["r2"] == 3 and "r1" not in ip.user_ns
    result, out = run_cell("%%lepton --in p\nprint(q)\n")  # q not shipped: a NameError on the node
    assert isinstance(result.error_in_exec, RemoteError)
    assert result.error_in_exec.type_name == "NameError"


def test_unpicklable_input_is_named_with_advice(ip, run_cell):
    import threading

    ip.user_ns["lock"] = threading.Lock()
    result, _ = run_cell("%%lepton\nwith lock:\n    pass\n")
    assert isinstance(result.error_in_exec, UsageError)
    message = str(result.error_in_exec)
    assert "'lock'" in message and "--in" in message and "\n" not in message


def test_remote_exception_has_the_cell_line_number(ip, run_cell):
    ip.user_ns.pop("before", None)
    result, _ = run_cell("%%lepton --nodes 2\nbefore = 1\n\nvalue = {}['missing']\n")
    error = result.error_in_exec
    assert isinstance(error, RemoteError)
    assert error.type_name == "KeyError" and error.line == 4
    text = "\n".join(error._render_traceback_())
    assert 'File "<lepton cell>", line 4' in text and "value = {}['missing']" in text
    assert "lepton_magic" not in text  # no frames from inside the package
    assert "before" not in ip.user_ns  # a failed run binds nothing
    assert lm.last_run().status == "failed"


def test_syntax_error_starts_nothing(ip, run_cell):
    session = lm.current_session()
    runs_before = session.store.execute("SELECT COUNT(*) FROM runs")[0][0]
    session.down()
    result, _ = run_cell("%%lepton --nodes 2\nx = 1\nfor\n")
    assert isinstance(result.error_in_exec, UsageError)
    assert "line 3" in str(result.error_in_exec)
    assert session.pool() is None  # no node was started
    assert session.store.execute("SELECT COUNT(*) FROM runs")[0][0] == runs_before


@pytest.mark.parametrize(
    "line, expected",
    [
        ("%%lepton --nodes 0", "--nodes takes a positive whole number, got '0'"),
        ("%%lepton --nodes two", "--nodes takes a positive whole number, got 'two'"),
        ("%%lepton --gpus -1", "--gpus takes a whole number"),
        ("%%lepton --backend slurm", "unknown backend 'slurm'; accepted: local, ssh, ec2, ray"),
        ("%%lepton --timeout soon", "expected a duration like 90s, 30m or 2h, got 'soon'"),
        ("%%lepton --in 1a", "--in takes comma-separated variable names"),
        ("%%lepton --env NOEQUALS", "--env takes KEY=VALUE"),
        ("%%lepton --frobnicate", "unrecognized arguments: --frobnicate; %%lepton accepts:"),
        ("%%lepton --instance-type g5.xlarge", "--instance-type goes with --backend ec2"),
    ],
)
def test_bad_arguments_get_one_clear_line(run_cell, line, expected):
    result, _ = run_cell(f"{line}\nx = 1\n")
    error = result.error_in_exec
    assert isinstance(error, UsageError), error
    assert expected in str(error)
    assert "\n" not in str(error)


@pytest.mark.parametrize(
    "line, expected",
    [
        ("%lepton", "needs a subcommand; accepted: up, down"),
        ("%lepton launch", "unknown subcommand 'launch'"),
        ("%lepton up --nodes 2 --min 1", "either --nodes N or --min N --max M"),
        ("%lepton up --min 3 --max 2", "--min 3 is more than --max 2"),
        ("%lepton wait", "the following arguments are required: run"),
        ("%lepton wait no-such-run", "no run called 'no-such-run'"),
        ("%lepton config color=blue", "unknown setting 'color'"),
        ("%lepton config nodes=-2", "nodes: nodes takes a positive whole number"),
        ("%lepton config nodes", "takes key=value pairs"),
    ],
)
def test_bad_line_magic_use(run_cell, line, expected):
    result, _ = run_cell(line)
    assert isinstance(result.error_in_exec, UsageError), result.error_in_exec
    assert expected in str(result.error_in_exec)


def test_async_returns_at_once_and_binds_at_the_end(ip, run_cell):
    ip.user_ns.pop("slow_result", None)
    result, out = run_cell("%%lepton --async --name slowpoke\nimport time\ntime.sleep(1.0)\nslow_result = 42\n")
    assert result.success and "background" in out
    assert "slow_result" not in ip.user_ns
    run = lm.get_run("slowpoke")
    assert run.status in ("starting", "running")
    assert run.wait(timeout=30) is run
    assert run.status == "succeeded" and ip.user_ns["slow_result"] == 42
    assert run.outputs == {"slow_result": 42}


def test_env_and_torchrun_environment(ip, run_cell):
    result, out = run_cell(
        "%%lepton --nodes 2 --env MY_FLAG=on\n"
        "import os\n"
        "env = {k: os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'LOCAL_WORLD_SIZE',"
        " 'MASTER_ADDR', 'MASTER_PORT', 'MY_FLAG')}\n"
        "print('flag', os.environ['MY_FLAG'], 'rank', lepton.rank)\n"
    )
    assert result.success, out
    env = ip.user_ns["env"]
    assert env["RANK"] == "0" and env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MY_FLAG"] == "on"
    logs = lm.last_run().logs()
    assert "[rank 0] flag on rank 0" in logs and "[rank 1] flag on rank 1" in logs
    assert lm.last_run().logs(rank=1) == "flag on rank 1"


def test_unpicklable_output_is_reported_not_fatal(ip, run_cell):
    result, out = run_cell("%%lepton\nimport threading\nok = 1\nguard = threading.Lock()\n")
    assert result.success, out
    assert ip.user_ns["ok"] == 1
    assert "guard was not returned" in out


def test_status_runs_and_config_magics(ip, run_cell):
    ip.run_line_magic("lepton", "up --nodes 2")
    nodes = ip.run_line_magic("lepton", "status")
    assert len(nodes) >= 2 and set(nodes["status"]) == {"ready"}
    runs = ip.run_line_magic("lepton", "runs")
    assert {"name", "status", "duration"} <= set(runs.columns)
    settings = ip.run_line_magic("lepton", "config")
    assert "idle_timeout" in settings.index
    _, out = run_cell("%lepton config timeout=45s")
    assert lm.current_session().config["timeout"] == 45.0
    lm.current_session().config.set("timeout", "none")


def test_log_rejects_non_numbers(run_cell):
    result, _ = run_cell("%%lepton\nlepton.log(loss='high')\n")
    error = result.error_in_exec
    assert isinstance(error, RemoteError) and error.type_name == "TypeError"
    assert "lepton.log takes numbers; loss is not" in error.message


def test_outputs_keep_shared_references(ip, run_cell):
    result, out = run_cell(
        "%%lepton\n"
        "import torch\n"
        "net = torch.nn.Linear(2, 2)\n"
        "opt = torch.optim.SGD(net.parameters(), lr=0.1)\n"
        "pair = [net, net]\n"
    )
    assert result.success, out
    net, opt, pair = ip.user_ns["net"], ip.user_ns["opt"], ip.user_ns["pair"]
    assert pair[0] is net and pair[1] is net
    assert opt.param_groups[0]["params"][0] is net.weight  # opt.step() in the notebook moves net


@pytest.mark.parametrize("through", ["shared memory", "the pipe"])
def test_large_dataframe_output(ip, run_cell, monkeypatch, through):
    import os

    from lepton_magic import sharedmem
    from lepton_magic.backends.local import LocalBackend

    if through == "the pipe":
        monkeypatch.setattr(LocalBackend, "shared_memory_dir", lambda self: None)
    result, out = run_cell(
        "%%lepton --out frame\n"
        "import numpy as np, pandas as pd\n"
        "frame = pd.DataFrame({'a': np.arange(300_000), 'b': np.ones(300_000)})\n"
    )
    assert result.success, out
    frame = ip.user_ns["frame"]
    assert frame.shape == (300_000, 2) and int(frame["a"].sum()) == 299_999 * 300_000 // 2
    frame.loc[0, "b"] = 5.0  # arrays rebuilt from received buffers are writable
    run = lm.last_run()
    transfer = json.loads(run.store.query("SELECT data FROM events WHERE run=? AND kind='outputs'", (run.seq,))[0]["data"])
    assert transfer["bytes"] > 4_000_000 and transfer["seconds"] > 0
    assert not os.listdir(sharedmem.default_dir())  # nothing left behind in /dev/shm


def test_checkpoint_reaches_the_kernel(ip, run_cell):
    result, out = run_cell(
        "%%lepton --nodes 2\n"
        "first = lepton.restore()\n"
        "lepton.checkpoint({'step': 3, 'rank': lepton.rank})\n"
        "again = lepton.restore()\n"
    )
    assert result.success, out
    assert ip.user_ns["first"] is None  # a first attempt has nothing to restore
    assert ip.user_ns["again"] == {"step": 3, "rank": 0}
    from lepton_magic import values

    run = lm.last_run()
    assert values.loads(run.store.last_checkpoint(run.seq)) == {"step": 3, "rank": 0}  # rank 0's, kept durably


def test_attach_in_a_terminal_prints_the_summary(ip, run_cell):
    result, _ = run_cell("%%lepton --name attach-me\nv = 1\n")
    assert result.success
    result, out = run_cell("%lepton attach attach-me")
    assert result.success and "attach-me succeeded" in out


def test_cost_of_a_local_pool_is_zero(ip, run_cell):
    ip.run_line_magic("lepton", "up --nodes 1")
    cost = ip.run_line_magic("lepton", "cost")
    assert list(cost.columns) == ["pool", "backend", "nodes", "status", "dollars_per_hour", "cost_so_far",
                                  "price_note"]
    assert (cost["dollars_per_hour"] == 0).all() and (cost["price_note"] == "").all()
    result, _ = run_cell("%lepton up --nodes 1 --instance-type g5.xlarge")
    assert "go with --backend ec2" in str(result.error_in_exec)


def test_a_repeated_cell_line_is_parsed_once_and_each_cell_gets_its_own_options():
    from lepton_magic import magics

    line = "--nodes 2 --env A=1 --name twice"
    first = magics._parse_cell_line(line)
    first.env.append(("B", "2"))  # what one cell does with its options stays its own
    second = magics._parse_cell_line(line)
    assert second.nodes == 2 and second.name == "twice"
    assert second.env == [("A", "1")]
    assert line in magics._cell_lines
    with pytest.raises(UsageError):
        magics._parse_cell_line("--nodes two")
    assert "--nodes two" not in magics._cell_lines
