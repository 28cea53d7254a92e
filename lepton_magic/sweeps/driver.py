"""A sweep in flight: trials asked of an Optuna study, each run as a run of its own on the pool,
at most ``parallel`` at once; their objective told back; bad ones pruned as they report.

The seed documents' loop — decompose, allocate, run in parallel, aggregate, re-balance — is
this: the sampler decomposes the search into trials, the pool's queue allocates free nodes to
them (a trial is an ordinary scheduled run: retries, checkpoints and placement are the
scheduler's), the driver keeps ``parallel`` going, and the study aggregates. A grid sweep starts
its longest trials first once earlier trials tell how long they take (see durations.py).

Optuna is driven ask-and-tell: the driver, not Optuna, owns the trials' life, so a trial on a
node is stopped by cancelling its run, and Optuna only hears the outcome.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import queue
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

from ..errors import LeptonError
from ..scheduler import RunSpec, arm_timeout
from . import studies
from .durations import DurationModel
from .space import SweepSpec

if TYPE_CHECKING:
    from ..pool import Pool
    from ..scheduler import ScheduledRun

log = logging.getLogger("lepton_magic.sweep")

#: How often the driver looks at its running trials' reports (pruning) when nothing ends.
POLL_SECONDS = 0.2
#: How long an ended trial may take to finish ending (nodes released, row written).
RECORD_SECONDS = 30


@dataclasses.dataclass
class _Trial:
    number: int
    optuna: Any  # optuna.Trial
    params: dict
    seq: int
    name: str
    live: "ScheduledRun | None" = None
    started: float = 0.0
    reported: int = -1  # the last step told to the pruner
    cursor: int = 0  # metrics rowid read so far
    pruned_at: int | None = None


class SweepRun:
    """What ``Run`` and the views see of a sweep in flight (the same surface as a ScheduledRun)."""

    is_sweep = True

    def __init__(self, *, session, pool: "Pool", seq: int, run_id: str, name: str, spec: SweepSpec,
                 base: RunSpec, parallel: int, on_done: list[Callable]):
        self.session = session
        self.store = session.store
        self.pool = pool
        self.seq = seq
        self.id = self.run_id = run_id
        self.name = name
        self.spec = spec
        self.base = base
        self.parallel = parallel
        self.on_done = on_done
        self.status = "starting"
        self.done = threading.Event()
        self.outputs: dict = {}
        self.skipped: dict[str, str] = {}
        self.error: LeptonError | None = None
        self.notes: list[str] = []
        self.world_size = 0
        self.nodes: list = []
        self.rank_pids: dict[int, int] = {}
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.study = None
        self.best: dict | None = None
        self._trials: dict[int, _Trial] = {}  # running
        self._ended: queue.Queue[int] = queue.Queue()
        self._wake = threading.Event()
        self._cancel: tuple[str, bool] | None = None
        self._starting = None  # the trial being started (its ScheduledRun)
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self._counts = {"succeeded": 0, "failed": 0, "pruned": 0, "cancelled": 0}
        self._first_error: LeptonError | None = None
        self._first_failed: int | None = None
        self._best_live: "ScheduledRun | None" = None  # the best trial so far: its outputs are kept
        self._durations = DurationModel(spec.names)

    # --- control -------------------------------------------------------------------------------
    def start(self) -> None:
        if self.base.inputs is not None:  # every trial sends them: out of the notebook's memory now
            self.base.inputs.settle(self.pool.backend.shared_memory_dir(), self.run_id)
        self.working = studies.open_study(self.store, self.spec)
        self.study = self.working.study
        for frozen in self.study.get_trials(deepcopy=False):
            if frozen.state.name == "COMPLETE" and frozen.duration is not None:
                self._durations.add(frozen.params, frozen.duration.total_seconds())
        self._timer = arm_timeout(self.base.timeout, self.cancel)
        threading.Thread(target=self._drive, name=f"lepton-sweep-{self.name}", daemon=True).start()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def cancel(self, reason: str = "cancelled by the user", failure: bool = False) -> None:
        with self._lock:
            if self.done.is_set() or self._cancel is not None:
                return
            self._cancel = (reason, failure)
            starting = self._starting
        self._wake.set()
        if starting is not None:  # the loop waits on its start (a long --pip install): stop it there
            starting.cancel(reason=reason)

    def _trial_scheduled(self, trial) -> None:
        """A trial's run exists and is about to start: a cancel of the sweep from now on reaches it."""
        with self._lock:
            self._starting = trial
            cancel = self._cancel
        if cancel is not None:
            trial.cancel(reason=cancel[0])

    def abort(self, error: BaseException) -> None:
        self.cancel(reason=f"could not start: {error}", failure=True)

    # --- the loop ------------------------------------------------------------------------------
    def _drive(self) -> None:
        try:
            self._loop()
        except Exception as e:  # never leave a sweep running with nobody driving it
            log.exception("the sweep %s failed", self.name)
            self._first_error = self._first_error or LeptonError(f"{self.name}: {type(e).__name__}: {e}")
            self._stop_all("the sweep failed")
        self._finish()

    def _loop(self) -> None:
        pending = self._grid_left() if self.spec.sampler == "grid" else None
        asked = 0
        total = self.spec.trials if pending is None else min(self.spec.trials, len(pending))
        self.store.update_run(self.seq, status="running", started=self.started_at)
        self.status = "running"
        while True:
            self._take_ended()
            self._feed_pruner()
            with self._lock:
                stop = self._cancel
            if stop is None and self._first_error is not None and self.spec.fail_fast:
                stop = self._cancel = (f"stopped after trial {self._first_failed} failed (--fail-fast)", True)
            if stop is not None:
                self._stop_all(stop[0])
                return
            while len(self._trials) < self.parallel and asked < total:
                params = None
                if pending is not None:
                    pending = self._durations.longest_first(pending)
                    params = pending.pop(0)
                self._start_trial(params)
                asked += 1
            if not self._trials and asked >= total:
                return
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()

    def _grid_left(self) -> list[dict]:
        """The grid's points, less those the study already finished (a continued ``--study``)."""
        done = {json.dumps(t.params, sort_keys=True) for t in self.study.get_trials(deepcopy=False)
                if t.state.name in ("COMPLETE", "PRUNED")}
        return [p for p in self.spec.grid() if json.dumps(p, sort_keys=True) not in done]

    def _start_trial(self, params: dict | None) -> None:
        if params is not None:
            self.study.enqueue_trial(params, skip_if_exists=False)
        try:
            trial = self.study.ask(self.spec.distributions())
        except ValueError as e:  # a continued study made with other values for a parameter
            raise LeptonError(f"{self.name}: this sweep's parameters do not fit the study "
                              f"{self.spec.study!r} ({e}); give the sweep a new --study name") from None
        n = trial.number
        name = f"{self.name}.t{n}"
        child_id = f"{self.run_id}-t{n}"
        seq, name = self.store.add_run(
            child_id, name, pool=self.pool.id, backend=self.pool.backend_name, nodes=self.base.nodes,
            gpus=self.base.gpus, code=self.base.code, inputs=[], timeout=None, env=self.base.env,
            retries=self.base.retries, parent=self.seq, trial=n, params=dict(trial.params),
        )
        record = _Trial(n, trial, dict(trial.params), seq, name, started=time.time())
        spec = dataclasses.replace(self.base, trial=n, params=dict(trial.params), timeout=None,
                                   on_done=[lambda live, n=n: self._trial_ended(n)])
        self._trials[n] = record
        try:
            record.live = self.session.start_trial(self.pool, seq, child_id, name, spec,
                                                   scheduled=self._trial_scheduled)
        except LeptonError as e:  # it could not start (recorded as failed): a failed trial
            record.live = None
            self._record_error(n, e)
            self._trial_ended(n)
        finally:
            with self._lock:
                self._starting = None
        log.info("%s: trial %d started with %s", self.name, n, trial.params)

    def _trial_ended(self, number: int) -> None:
        self._ended.put(number)
        self._wake.set()

    # --- outcomes --------------------------------------------------------------------------------
    def _take_ended(self) -> None:
        from optuna.trial import TrialState

        while True:
            try:
                number = self._ended.get_nowait()
            except queue.Empty:
                return
            trial = self._trials.pop(number, None)
            if trial is None:
                continue
            live = trial.live
            # It tells the sweep before its end is whole: wait for its nodes to go back to the
            # pool (the next trial takes them) and its row to be written (run.trials reads it).
            if live is not None and not live.wait(RECORD_SECONDS):
                log.warning("%s: trial %d did not record its end within %d s", self.name, number, RECORD_SECONDS)
            self._feed_pruner(only=trial)  # the last reports
            status = live.status if live is not None else "failed"
            if trial.pruned_at is not None:
                self.study.tell(trial.optuna, state=TrialState.PRUNED)
                self._counts["pruned"] += 1
                self.store.update_run(trial.seq, pruned_step=trial.pruned_at)
            elif status == "succeeded":
                value = self._objective_value(trial)
                if value is None or math.isnan(value):
                    self.study.tell(trial.optuna, state=TrialState.FAIL)
                    self._counts["failed"] += 1
                    metric = self.spec.objective.metric or "metric"
                    self._record_error(number, LeptonError(
                        f"trial {number} ended with a NaN {metric}" if value is not None else
                        f"trial {number} logged no {metric}; lepton.log({self.spec.objective.metric or 'loss'}=...) "
                        f"gives the sweep its objective"))
                else:
                    self.study.tell(trial.optuna, value)
                    self._counts["succeeded"] += 1
                    self._durations.add(trial.params, time.time() - trial.started)
                    self._consider_best(trial, value, live)
            else:
                self.study.tell(trial.optuna, state=TrialState.FAIL)
                self._counts["failed" if status == "failed" else "cancelled"] += 1
                if status == "failed" and live is not None and live.error is not None:
                    self._record_error(number, live.error)
            self.working.finished(number)
            if live is not None and live is not self._best_live:
                live.drop_outputs()  # kept in outputs.bin; only the best one's stay in memory
            log.info("%s: trial %d %s", self.name, number,
                     "pruned at step %d" % trial.pruned_at if trial.pruned_at is not None else status)

    def _record_error(self, number: int, error: LeptonError) -> None:
        if self._first_error is None:
            self._first_error, self._first_failed = error, number

    def _consider_best(self, trial: _Trial, value: float, live) -> None:
        better = (self.best is None or (value < self.best["objective"]
                  if self.spec.objective.direction == "minimize" else value > self.best["objective"]))
        if better:
            if self._best_live is not None:
                self._best_live.drop_outputs()
            self._best_live = live
            self.best = {"trial": trial.number, "params": trial.params, "objective": value, "run": trial.name}

    def _objective_value(self, trial: _Trial) -> float | None:
        metric = self._objective_metric()
        if metric is None:
            return None
        rows = self.store.execute(
            "SELECT value FROM metrics WHERE run=? AND rank=0 AND name=? ORDER BY step DESC, rowid DESC LIMIT 1",
            (trial.seq, metric))
        if not rows or rows[0][0] is None:
            return None if not rows else math.nan
        return float(rows[0][0])

    def _objective_metric(self) -> str | None:
        """The objective's metric; by default the first one any trial of this sweep logged."""
        if self.spec.objective.metric is None:
            rows = self.store.execute(
                "SELECT m.name FROM metrics m JOIN runs r ON r.seq = m.run WHERE r.parent=? ORDER BY m.rowid LIMIT 1",
                (self.seq,))
            if rows:
                self.spec.objective.metric = rows[0][0]
                self.store.update_run(self.seq, sweep=self.spec.describe())
        return self.spec.objective.metric

    def _feed_pruner(self, only: _Trial | None = None) -> None:
        """Tell the pruner what each running trial's rank 0 logged of the objective; stop the
        trials it prunes (their nodes take the next trial)."""
        if self.spec.prune == "none":
            return
        metric = self._objective_metric()
        if metric is None:
            return
        for trial in [only] if only is not None else list(self._trials.values()):
            if trial.pruned_at is not None or trial.live is None:
                continue
            rows = self.store.execute(
                "SELECT rowid, step, value FROM metrics WHERE run=? AND rank=0 AND name=? AND rowid>? ORDER BY rowid",
                (trial.seq, metric, trial.cursor))
            for rowid, step, value in rows:
                trial.cursor = rowid
                if step is None or step <= trial.reported:
                    continue  # a retried attempt logging a step again
                trial.reported = step
                trial.optuna.report(math.nan if value is None else float(value), step)
                if only is None and trial.optuna.should_prune():
                    trial.pruned_at = step
                    trial.live.cancel(reason=f"pruned at step {step}")
                    break

    def _stop_all(self, reason: str) -> None:
        for trial in list(self._trials.values()):
            if trial.live is not None:
                trial.live.cancel(reason=reason)
        deadline = time.monotonic() + 15
        while self._trials and time.monotonic() < deadline:
            self._wake.wait(POLL_SECONDS)
            self._wake.clear()
            self._take_ended()

    # --- the end -------------------------------------------------------------------------------
    def _finish(self) -> None:
        self.working.close()
        if self.base.inputs is not None:
            self.base.inputs.discard()  # the trials' shared memory
        with self._lock:
            stop = self._cancel
        if self.best is not None and self._best_live is not None:
            self.outputs = dict(self._best_live.outputs)
            self.skipped = dict(self._best_live.skipped)
        if stop is not None:
            status = "failed" if stop[1] else "cancelled"
            reason = stop[0]
            if stop[1]:
                self.error = self._first_error if "fail-fast" in reason and self._first_error else \
                    LeptonError(f"{self.name} {reason}")
        elif self._counts["succeeded"]:
            status, reason = "succeeded", None
        else:
            status = "failed"
            reason = "no trial succeeded"
            self.error = self._first_error or LeptonError(f"{self.name}: no trial succeeded")
        if self._first_error is not None and status == "succeeded":
            self.notes.append(f"trial {self._first_failed} failed: {self._first_error}")
        self.ended_at = time.time()
        error = {"type": type(self.error).__name__, "message": str(self.error)} if self.error else None
        self.store.update_run(self.seq, status=status, ended=self.ended_at, reason=reason, error=error,
                              outputs=sorted(self.outputs), sweep={**self.spec.describe(), "best": self.best,
                                                                   "counts": self._counts})
        self.status = status
        if self._timer is not None:
            self._timer.cancel()
        for callback in self.on_done:
            try:
                callback(self)
            except Exception:
                log.exception("a sweep-end callback failed")
        self.done.set()
