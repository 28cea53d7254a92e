"""The Optuna study behind a sweep, and what a finished sweep reads back from the store.

``--study NAME`` keeps the study in an Optuna storage under LEPTON_HOME (``studies.sqlite``, as
private as the store), so a later sweep — in this kernel or a new one — continues it. Without a
name the study lives with the run; once the run is over (or in another process) it is rebuilt
from the store, where every trial is a run with its parameters and metrics.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .. import private
from .space import SweepSpec

if TYPE_CHECKING:
    import optuna
    import pandas as pd

    from ..store import Store

STUDIES_FILE = "studies.sqlite"


def _optuna():
    import optuna

    optuna.logging.set_verbosity(logging.WARNING)  # a line per trial would drown the notebook
    return optuna


def storage_url(store: "Store") -> str:
    path = Path(store.home) / STUDIES_FILE
    if not path.exists():
        private.make_file(path)
    return f"sqlite:///{path}"


def _sampler(spec: SweepSpec):
    optuna = _optuna()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seed)
    if spec.sampler == "grid":  # the driver enqueues each grid point itself (longest first)
        return optuna.samplers.RandomSampler(seed=spec.seed)
    return optuna.samplers.TPESampler(seed=spec.seed)


def _pruner(spec: SweepSpec):
    optuna = _optuna()
    if spec.prune == "median":
        # A median of at least two finished trials — and of no fewer than run at once, so the
        # first wave is not judged by the one or two that happened to end first.
        return optuna.pruners.MedianPruner(n_startup_trials=max(2, spec.parallel or 2), n_warmup_steps=0)
    if spec.prune == "asha":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(store: "Store", spec: SweepSpec) -> "WorkingStudy":
    optuna = _optuna()
    study = optuna.create_study(direction=spec.objective.direction, sampler=_sampler(spec), pruner=_pruner(spec))
    if not spec.study:
        return WorkingStudy(study, None)
    kept = optuna.create_study(study_name=spec.study, storage=storage_url(store), load_if_exists=True,
                               direction=spec.objective.direction)
    study.add_trials(kept.get_trials(deepcopy=False))  # what earlier sweeps of this study found
    return WorkingStudy(study, kept)


class WorkingStudy:
    """The study a sweep asks and tells, in memory (an ask on the SQLite storage takes 60-250 ms,
    which would sit between one trial's end and the next one's start), and, for ``--study NAME``,
    the stored study each finished trial is copied to on a thread of its own."""

    def __init__(self, study: "optuna.Study", kept: "optuna.Study | None"):
        self.study = study
        self._kept = kept
        self._copying: "queue.Queue | None" = None
        self._thread: threading.Thread | None = None
        # The stored study numbers trials as they are added: add them in number order, so its
        # numbers are lepton's (lepton.trial, run.trials) whatever order trials finish in.
        self._next = len(study.get_trials(deepcopy=False))
        self._waiting: dict[int, object] = {}
        if kept is not None:
            self._copying = queue.Queue()
            self._thread = threading.Thread(target=self._copy, daemon=True, name="lepton-study-keeper")
            self._thread.start()

    def finished(self, number: int) -> None:
        """Trial ``number`` was told its outcome: keep it in the stored study too."""
        if self._copying is not None:
            self._copying.put(self.study.get_trials(deepcopy=False)[number])

    def close(self) -> None:
        """Wait until every finished trial is in the stored study."""
        if self._copying is not None:
            self._copying.put(None)
            self._thread.join()

    def _copy(self) -> None:
        while (trial := self._copying.get()) is not None:
            self._waiting[trial.number] = trial
            while self._next in self._waiting:
                self._add(self._waiting.pop(self._next))
                self._next += 1
        for number in sorted(self._waiting):  # (every trial the sweep asked was told an outcome)
            self._add(self._waiting.pop(number))

    def _add(self, trial) -> None:
        try:
            self._kept.add_trial(trial)
        except Exception:  # the stored study is a copy: the sweep itself goes on
            logging.getLogger("lepton_magic.sweep").exception("could not keep trial %d in the study", trial.number)


def study_of(store: "Store", seq: int) -> "optuna.Study":
    """The study of a finished (or another process's) sweep: loaded from its storage when it was
    named, else rebuilt from the trials in the store."""
    optuna = _optuna()
    row = store.run_row(seq)
    sweep = json.loads(row["sweep"] or "{}")
    if sweep.get("study"):
        return optuna.load_study(study_name=sweep["study"], storage=storage_url(store))
    from optuna.distributions import json_to_distribution
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(direction=sweep.get("direction") or "minimize")
    metric = sweep.get("objective")
    distributions = {k: json_to_distribution(v) for k, v in (sweep.get("distributions") or {}).items()}
    for child in trial_rows(store, seq):
        params = json.loads(child["params"] or "{}")
        value = _last(store, child["seq"], metric) if metric else None
        if child["status"] == "succeeded" and value is not None and not math.isnan(value):
            state = TrialState.COMPLETE
        elif child["pruned_step"] is not None:
            state = TrialState.PRUNED
        else:
            state, value = TrialState.FAIL, None
        study.add_trial(create_trial(params=params, distributions=distributions, value=value, state=state))
    return study


def trial_rows(store: "Store", seq: int) -> list[dict]:
    return store.query("SELECT * FROM runs WHERE parent=? ORDER BY trial", (seq,))


#: Words in a metric's name that say higher is better (accuracy, F1, reward...); other metrics
#: (losses, errors) are best when lowest. The objective's own metric goes the objective's way.
HIGHER_IS_BETTER = ("acc", "auc", "f1", "precision", "recall", "score", "reward", "r2", "iou", "bleu",
                    "rouge", "map", "ndcg", "throughput")


def higher_is_better(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in HIGHER_IS_BETTER) and "loss" not in lowered and "err" not in lowered


def _last(store: "Store", seq: int, metric: str, at_most: int | None = None) -> float | None:
    """Rank 0's last value of ``metric`` (at a step no later than ``at_most``, when given)."""
    rows = store.execute("SELECT value FROM metrics WHERE run=? AND rank=0 AND name=? AND step<=? "
                         "ORDER BY step DESC, rowid DESC LIMIT 1",
                         (seq, metric, at_most if at_most is not None else 2 ** 62))
    if not rows:
        return None
    return math.nan if rows[0][0] is None else float(rows[0][0])


def trial_status(row: dict) -> str:
    """succeeded, failed, pruned, cancelled, or still queued/starting/running."""
    if row["pruned_step"] is not None or (row["reason"] or "").startswith("pruned at step"):
        return "pruned"
    return row["status"]


def trials_frame(store: "Store", seq: int) -> "pd.DataFrame":
    """One row per trial: trial, each parameter, status, nodes, started, duration, objective,
    pruned_at_step, and the last and best (the objective's way) of every metric rank 0 logged."""
    import pandas as pd

    row = store.run_row(seq)
    sweep = json.loads(row["sweep"] or "{}")
    names = sweep.get("names") or []
    metric = sweep.get("objective")
    maximize = sweep.get("direction") == "maximize"
    children = trial_rows(store, seq)
    records = []
    for child in children:
        params = json.loads(child["params"] or "{}")
        nodes = [n for (n,) in store.execute("SELECT node FROM run_nodes WHERE run=? ORDER BY node", (child["seq"],))]
        pruned = child["pruned_step"]
        record = {"trial": child["trial"], **{n: params.get(n) for n in names}, "status": trial_status(child),
                  "nodes": nodes, "started": child["started"],
                  "duration": ((child["ended"] or 0) - child["started"]) if child["started"] and child["ended"] else None,
                  # a pruned trial ran on for a moment after the pruner's verdict: its value then
                  "objective": _last(store, child["seq"], metric, pruned) if metric else None,
                  "pruned_at_step": pruned, "run": child["name"]}
        stats = store.execute(
            "SELECT name, value FROM metrics WHERE run=? AND rank=0 ORDER BY step, rowid", (child["seq"],))
        per_metric: dict[str, list] = {}
        for name, value in stats:
            per_metric.setdefault(name, []).append(math.nan if value is None else value)
        for name, points in per_metric.items():
            finite = [v for v in points if not math.isnan(v)]
            higher = maximize if name == metric else higher_is_better(name)
            record[f"last_{name}"] = points[-1]
            record[f"best_{name}"] = (max(finite) if higher else min(finite)) if finite else math.nan
        records.append(record)
    df = pd.DataFrame(records)
    if len(df):
        df["started"] = pd.to_datetime(df["started"], unit="s", utc=True)
        df = df.set_index("trial")
    return df
