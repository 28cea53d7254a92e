"""Sweeps across the pool (``%%lepton --sweep``), on real local nodes: trials see their own
parameters, run ``parallel`` at a time, report to Optuna's pruner, fail alone, and come back as
run.trials / run.best / run.study; a named study goes on in a later session."""

from __future__ import annotations

import json
import os
import math
import time

import pytest
from IPython.core.error import UsageError

from lepton_magic.magics import LeptonMagics
from lepton_magic.session import Session
from lepton_magic.store import Store
from lepton_magic.sweeps.space import make_spec
from procs import wait_gone
from slowpkg import once_building, slow_package

SEEN = """import time
lepton.log(step=0, lr_seen=lr, width_seen=width, trial_seen=lepton.trial)
for step in range(1, 6):
    lepton.log(step=step, loss=(lr - 0.01) ** 2 * 1e4 + width / 1000 + 1.0 / step)
    time.sleep(0.05)
model = {"lr": lr, "width": width, "trial": lepton.trial}
"""


@pytest.fixture
def session(tmp_path):
    session = Session(store=Store(tmp_path / "home"))
    yield session
    session.down()


@pytest.fixture
def lepton(ip, session, capsys):
    magics = LeptonMagics(ip, session)

    def run(line, cell=None):
        magics.lepton(line, cell)
        return capsys.readouterr().out

    return run


def _intervals(session, run) -> list[tuple[float, float]]:
    return [(r["started"], r["ended"]) for r in session.store.query(
        "SELECT started, ended FROM runs WHERE parent=? ORDER BY trial", (run.seq,))]


def _most_at_once(intervals) -> int:
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals], key=lambda x: (x[0], x[1]))
    now = most = 0
    for _, delta in edges:
        now += delta
        most = max(most, now)
    return most


def test_a_grid_of_six_trials_runs_two_at_a_time_and_binds_the_best(session, ip):
    namespace: dict = {"lr": 123.0}  # the notebook's own lr must not leak into the trials
    run = session.submit(SEEN, namespace, nodes=2, sweep=make_spec("lr=[1e-3,1e-2,1e-1]; width=[64,128]",
                                                                    objective="min loss"))
    run.wait(120)
    assert run.status == "succeeded"
    trials = run.trials
    assert len(trials) == 6 and set(trials["status"]) == {"succeeded"}
    assert sorted(zip(trials["lr"], trials["width"])) == sorted(
        (lr, w) for lr in (1e-3, 1e-2, 1e-1) for w in (64, 128))
    for number, row in trials.iterrows():  # each trial saw exactly its own parameters
        assert (row["last_lr_seen"], row["last_width_seen"], row["last_trial_seen"]) == (row["lr"], row["width"], number)
    assert _most_at_once(_intervals(session, run)) == 2
    assert {n for nodes in trials["nodes"] for n in nodes} == {"local-0", "local-1"}
    best = run.best
    assert best["params"] == {"lr": 0.01, "width": 64}
    assert namespace["model"] == {"lr": 0.01, "width": 64, "trial": best["trial"]}
    assert run.study.best_params == {"lr": 0.01, "width": 64}
    assert run.trial(best["trial"]).outputs["model"]["trial"] == best["trial"]
    listed = session.runs()
    assert (listed["sweep"] == run.name).sum() == 6


def test_a_seeded_random_search_draws_the_same_parameters_twice(session):
    spec = "lr=loguniform(1e-4,1e-1); width=choice(64,128,256); p=uniform(0,0.5)"
    code = "lepton.log(step=0, loss=lr * width + p)\n"
    drawn = []
    for _ in range(2):
        run = session.submit(code, {}, nodes=2, sweep=make_spec(spec, trials=5, sampler="random", seed=7))
        run.wait(120)
        assert run.status == "succeeded"
        drawn.append(run.trials[["lr", "width", "p"]].to_dict("records"))
    assert drawn[0] == drawn[1]
    assert all(1e-4 <= r["lr"] <= 1e-1 and r["width"] in (64, 128, 256) and 0 <= r["p"] <= 0.5 for r in drawn[0])


PRUNED = """import math, time
for step in range(30):
    if lr >= 1.0:  # a learning rate that diverges
        loss = math.exp(step) if step < 3 else float("nan")
    else:
        loss = 1.0 / (step + 1) + lr
    lepton.log(step=step, loss=loss)
    time.sleep(0.05)
"""


def test_pruning_stops_diverging_trials_early_and_their_nodes_take_the_next(session):
    run = session.submit(PRUNED, {}, nodes=2, sweep=make_spec(
        "lr=[0.01, 0.02, 5.0, 0.03, 8.0, 0.04]", prune="median", objective="min loss"))
    run.wait(120)
    assert run.status == "succeeded"
    trials = run.trials
    bad = trials[trials["lr"] >= 1.0]
    assert set(bad["status"]) == {"pruned"}, trials[["lr", "status", "pruned_at_step"]]
    assert (bad["pruned_at_step"] < 29).all()
    assert (bad["duration"] < trials[trials["status"] == "succeeded"]["duration"].min()).all()
    # Median pruning also stops a sound trial that does worse than the median of those before it.
    assert (trials["status"] == "succeeded").sum() >= 2 and set(trials[trials["lr"] < 1.0]["status"]) <= {
        "succeeded", "pruned"}
    assert run.best["params"] == {"lr": 0.01}
    assert sum(t.state.name == "PRUNED" for t in run.study.trials) == (trials["status"] == "pruned").sum()


def test_a_failing_trial_is_recorded_and_the_others_finish(session):
    code = "if x == 2:\n    raise ValueError('bad x')\nlepton.log(step=0, score=x)\n"
    run = session.submit(code, {}, nodes=2, sweep=make_spec("x=[1,2,3]", objective="max score"))
    run.wait(60)
    assert run.status == "succeeded"
    trials = run.trials.set_index("x")
    assert trials.loc[2, "status"] == "failed" and set(trials.loc[[1, 3], "status"]) == {"succeeded"}
    assert run.best["params"] == {"x": 3}
    assert "ValueError" in run.trial(int(trials.loc[2, "run"].rsplit("t", 1)[1])).error.type_name

    stopped = session.submit("import time\ntime.sleep(0.2 * x)\nif x == 1:\n    raise ValueError('no')\n",
                             {}, nodes=1, sweep=make_spec("x=[1,2,3,4]", fail_fast=True))
    with pytest.raises(Exception, match="no"):
        stopped.wait(60)
    assert stopped.status == "failed"
    assert len(stopped.trials) < 4  # nothing more was started


def _two_trials_running(session, space: str):
    """A sweep of sleeping trials on 2 nodes, once two of its trials are running."""
    run = session.submit("import time\ntime.sleep(30)\n", {}, nodes=2, sweep=make_spec(space))
    deadline = time.monotonic() + 30
    while len(session.store.query("SELECT 1 FROM runs WHERE parent=? AND status='running'", (run.seq,))) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return run


def test_cancelling_a_sweep_stops_its_trials_and_starts_no_more(session):
    run = _two_trials_running(session, "x=[1,2,3,4,5]")
    run.cancel()
    assert run.wait_done(20) and run.status == "cancelled"
    trials = run.trials
    assert len(trials) == 2 and set(trials["status"]) == {"cancelled"}


def test_a_cancelled_sweep_ends_after_its_trials_ends_are_recorded(session, monkeypatch):
    """A trial tells the sweep it ended before its run's row says so; the sweep must not end (and
    show its trials still running) in between. CI saw it once; a slow store write shows it always."""
    run = _two_trials_running(session, "x=[1,2,3]")
    recorded = session.store.attempt_end

    def slowly(*args):
        time.sleep(2)
        return recorded(*args)

    monkeypatch.setattr(session.store, "attempt_end", slowly)
    run.cancel()
    assert run.wait_done(20) and run.status == "cancelled"
    assert set(run.trials["status"]) == {"cancelled"}


def test_cancelling_a_sweep_stops_a_trial_whose_packages_are_installing(tmp_path, monkeypatch):
    """The sweep's loop waits on the start of a trial whose node installs its --pip packages: a
    cancel of the sweep reaches that trial there (its install stops), not once it is done."""
    package, marker = slow_package(tmp_path, monkeypatch)
    session = Session(store=Store(tmp_path / "home"))
    try:
        run = session.submit("y = x\n", {}, nodes=1, pip=str(package), sweep=make_spec("x=[1,2]"))
        cancelled_at = once_building(marker, run.cancel)
        assert run.wait_done(150)
        assert cancelled_at, "the build never started"
        assert time.monotonic() - cancelled_at[0] < 10
        assert run.status == "cancelled" and set(run.trials["status"]) == {"cancelled"}
        assert not wait_gone([int(marker.read_text())], 10), "the package build was left running"
    finally:
        session.down()


def test_a_named_study_goes_on_in_a_later_session(tmp_path):
    home = tmp_path / "home"
    code = "lepton.log(step=0, loss=(lr - 0.3) ** 2)\n"
    first = Session(store=Store(home))
    try:
        run = first.submit(code, {}, nodes=1, sweep=make_spec("lr=uniform(0,1)", trials=3, seed=1, study="tuning"))
        run.wait(60)
        assert len(run.study.trials) == 3
    finally:
        first.close()
    later = Session(store=Store(home))  # a fresh kernel: the study lives in LEPTON_HOME
    try:
        run = later.submit(code, {}, nodes=2, sweep=make_spec("lr=uniform(0,1)", trials=2, study="tuning"))
        run.wait(60)
        study = run.study
        assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
        assert sorted(run.trials.index) == [3, 4]
        import optuna  # the stored study numbers trials as lepton does, whatever order they ended in

        stored = optuna.load_study(study_name="tuning", storage=f"sqlite:///{home}/studies.sqlite")
        for number, row in run.trials.iterrows():
            assert stored.trials[number].params == {"lr": row["lr"]}
        assert json.loads(later.store.run_row(run.seq)["sweep"])["study"] == "tuning"
    finally:
        later.close()


@pytest.mark.parametrize("line, expected", [
    ('--sweep "lr=[1,2]" --trials 0', "--trials takes a positive whole number"),
    ('--sweep "lr=logunif(1,2)"', "unknown distribution 'logunif'; accepted: [a, b, ...], choice("),
    ('--sweep "lr=uniform(0,1)"', "a sweep over ranges (lr) needs --trials N"),
    ('--sweep "lr=uniform(0,1)" --trials 3 --sampler grid', "--sampler grid needs listed values"),
    ('--sweep "lr=[1,1]"', "a value is listed twice"),
    ('--sweep "lr 1"', "--sweep takes name=values parts separated by ';'"),
    ('--sweep "lr=[1,2]" --objective "lowest loss"', '--objective takes "min METRIC" or "max METRIC"'),
    ('--sweep "lr=[1,2]" --prune sometimes', "--prune takes median, asha, none"),
    ('--trials 4', "--trials goes with --sweep"),
    ('--sweep "lr=uniform(1,0)" --trials 2', "low must be below high"),
    ('--sweep "lr=[__import__(\'os\')]"', "is not a literal value"),
])
def test_bad_sweep_options_get_one_clear_line(lepton, session, line, expected):
    before = session.store.execute("SELECT COUNT(*) FROM runs")[0][0]
    with pytest.raises(UsageError) as info:
        lepton(line, "x = 1\n")
    assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert session.store.execute("SELECT COUNT(*) FROM runs")[0][0] == before  # nothing started


def test_the_sweep_panel_shows_every_trial_and_leaves_a_record(session):
    from lepton_magic.ui.sweep_panel import SweepPanel, SweepView

    run = session.submit(SEEN, {}, nodes=2, sweep=make_spec("lr=[1e-3,1e-2]; width=[64]", objective="min loss"))
    panel = SweepPanel(SweepView(session.store, run.seq), on_cancel=run.cancel)
    while not panel.update() or not panel.frozen:
        time.sleep(0.1)
    assert panel.text().startswith(f"{run.name} succeeded · 2 of 2 trials done · objective: min loss")
    record = panel.static_bundle()
    assert record["text/html"].count('class="lepton-trial-row"') == 2 and "image/png" in record
    assert not math.isnan(run.best["objective"])


def test_the_sidebar_api_lists_a_sweep_with_its_trial_counts_not_its_trials(session):
    from lepton_magic.server.manager import LeptonManager

    code = "if x == 3:\n    raise ValueError('no')\nlepton.log(step=0, loss=x)\n"
    run = session.submit(code, {}, nodes=2, sweep=make_spec("x=[1,2,3]"))
    run.wait(60)
    listed = LeptonManager(session.store).runs()
    assert [r["name"] for r in listed if r["name"].startswith(run.name)] == [run.name]
    sweep = next(r for r in listed if r["name"] == run.name)["sweep"]
    assert sweep["counts"] == {"succeeded": 2, "failed": 1} and sweep["trials"] == 3
    assert (sweep["objective"], sweep["direction"]) == ("loss", "minimize")
    assert sweep["best"]["params"] == {"x": 1}


def test_a_terminal_shows_a_line_per_trial_and_a_sweep_summary(session):
    import io

    from lepton_magic.ui.progress import TextProgress

    run = session.submit("lepton.log(step=0, loss=x)\nbest_x = x\n", {}, nodes=2, sweep=make_spec("x=[3,1,2]"))
    out = io.StringIO()
    progress = TextProgress(run, out=out, terminal=False)
    while not run.wait_done(0.05):
        progress.tick()
    progress.finish()
    lines = out.getvalue().splitlines()
    assert sorted(line for line in lines if line.startswith("trial ")) == [
        "trial 0 (x=3) succeeded: loss 3", "trial 1 (x=1) succeeded: loss 1", "trial 2 (x=2) succeeded: loss 2"]
    assert lines[-1].startswith(f"✓ {run.name} succeeded in ")
    assert lines[-1].endswith("3 of 3 trials (3 succeeded) · best: trial 1 (x=1) min loss 1 · bound: best_x")


def test_a_trial_on_two_nodes_is_one_world_of_two_ranks(session):
    code = "import os\nlepton.log(step=0, loss=x, world=lepton.world_size, master=int(os.environ['MASTER_PORT']))\n"
    run = session.submit(code, {}, nodes=2, sweep=make_spec("x=[1,2]", nodes_per_trial=2))
    run.wait(60)
    trials = run.trials
    assert list(trials["status"]) == ["succeeded", "succeeded"]
    assert all(sorted(nodes) == ["local-0", "local-1"] for nodes in trials["nodes"])
    assert list(trials["last_world"]) == [2, 2]
    assert _most_at_once(_intervals(session, run)) == 1  # 2 nodes, 2 per trial: one at a time


def test_a_sweeps_timeout_stops_its_trials(session):
    run = session.submit("import time\ntime.sleep(30)\n", {}, nodes=2, timeout=2.0, sweep=make_spec("x=[1,2,3]"))
    assert run.wait_done(25) and run.status == "failed"
    assert "timed out after 2 s" in str(run.error)
    assert set(run.trials["status"]) == {"cancelled"} and len(run.trials) == 2


def test_runs_side_by_side_on_one_machine_share_its_cores(session):
    """Two trials at once on one host: each rank's thread count is the host's cores shared among
    the ranks running there, not all of them (torchrun's rule across runs, not within one)."""
    code = "import os, time\ntime.sleep(3.0)\nlepton.log(step=0, loss=x, threads=int(os.environ['OMP_NUM_THREADS']))\n"
    run = session.submit(code, {}, nodes=2, sweep=make_spec("x=[1,2]"))
    run.wait(60)
    cpus = max(1, os.cpu_count() or 1)
    threads = sorted(run.trials["last_threads"])
    assert threads[0] == max(1, cpus // 2), threads  # the second to start saw the first running


def test_each_metrics_best_goes_its_own_way_and_a_pruned_objective_is_its_value_at_the_prune(session):
    code = ("import time\nfor step in range(40):\n"
            "    lepton.log(step=step, loss=(100.0 + step) if k % 2 else 1.0 / (step + 1), acc=step / 40)\n"
            "    time.sleep(0.05)\n")
    run = session.submit(code, {}, nodes=2, sweep=make_spec("k=[0, 1, 2, 3]", prune="median",
                                                            objective="min loss", parallel=1))
    run.wait(120)
    trials = run.trials
    good = trials[trials["status"] == "succeeded"].iloc[0]
    assert good["best_acc"] == good["last_acc"] == 39 / 40  # accuracy: the highest is best
    assert good["best_loss"] == good["last_loss"] == 1.0 / 40  # loss: the lowest
    pruned = trials[trials["status"] == "pruned"]
    assert len(pruned) >= 1
    for _n, row in pruned.iterrows():
        assert row["objective"] == 100.0 + row["pruned_at_step"]  # not a value logged after the verdict


def test_releasing_the_pool_cancels_a_sweep_with_the_pools_reason(session):
    run = _two_trials_running(session, "x=[1,2,3,4]")
    session.down()
    assert run.wait_done(30) and run.status == "cancelled"
    assert session.store.run_row(run.seq)["reason"] == "the pool was released"
    assert len(run.trials) == 2  # no trial was started on the pool that went


def test_a_finished_sweeps_outputs_read_back_in_a_later_session(tmp_path):
    """A sweep's outputs are its best trial's: a later kernel (or one that attaches) reads them
    from the store, as for any run."""
    home = tmp_path / "home"
    code = "lepton.log(step=0, loss=(lr - 0.3) ** 2)\nmodel = {'lr': lr}\n"
    first = Session(store=Store(home))
    try:
        run = first.submit(code, {}, nodes=1, sweep=make_spec("lr=[0.1,0.3,0.5]", objective="min loss"))
        run.wait(60)
        assert run.outputs == {"model": {"lr": 0.3}}
    finally:
        first.close()
    later = Session(store=Store(home))
    try:
        t0 = time.monotonic()
        again = later.get_run(run.id)
        assert again.is_sweep and again.outputs == {"model": {"lr": 0.3}}
        assert time.monotonic() - t0 < 5
    finally:
        later.close()
