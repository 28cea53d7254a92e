"""A run as the pool schedules it: a sequence of attempts, each one world of ranks on a set of
nodes (a :class:`~lepton_magic.liverun.LiveRun`).

When an attempt loses a node (its agent exited, its host went away, its heartbeat stopped) or a
rank (killed, OOM-killed), the whole world is stopped and the run starts again on healthy nodes
— the pool replaces the lost one, growing if it may — up to ``retries`` times, after a short
backoff, from the last checkpoint the ranks saved (``lepton.checkpoint`` / ``lepton.restore``).
An exception raised by the cell is the cell's own failure: retried only with ``retry_on_error``.
Cancels and the run's timeout end the run, whatever attempt it is on.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from . import compat
from .errors import LeptonError
from .inputs import Inputs
from .liverun import LiveRun
from .workdir import Plan, Stopped

log = logging.getLogger("lepton_magic.scheduler")

#: Seconds between an attempt's end and the next one's start (the last value repeats).
BACKOFF_SECONDS = (1.0, 2.0, 5.0)


@dataclass
class RunSpec:
    """What every attempt of a run starts from."""

    code: str
    line_offset: int
    inputs: "Inputs | None"
    outputs: list[str]
    explicit_outputs: bool
    nodes: int
    gpus: int | None
    env: dict[str, str]
    preload: bool
    local: bool  # the backend's nodes share this machine (for the compatibility check)
    retries: int = 0
    retry_on_error: bool = False
    timeout: float | None = None
    #: A sweep's trial: its number and its parameters (plain variables of the cell on the nodes).
    trial: int | None = None
    params: dict | None = None
    #: The run frees its inputs' shared memory when it ends (a sweep's trials share their sweep's).
    owns_inputs: bool = True
    #: What remote nodes need before the ranks start: the mirrored folder, packages (workdir.py).
    plan: "Plan | None" = None
    on_done: list[Callable] = field(default_factory=list)


class ScheduledRun:
    """The run in flight, across its attempts: what ``Run`` and the views see of it."""

    is_sweep = False

    def __init__(self, *, store, pool, seq: int, run_id: str, name: str, spec: RunSpec):
        self.store = store
        self.pool = pool
        self.seq = seq
        self.id = self.run_id = run_id
        self.name = name
        self.spec = spec
        self.attempt = 0
        self.current: LiveRun | None = None
        self._first_started: float | None = None  # when the first attempt started
        self.done = threading.Event()
        self._cancel: tuple[str, bool] | None = None  # (reason, counts as a failure)
        self._cancelled = threading.Event()  # wakes a retry waiting out its backoff
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None
        self._inputs = spec.inputs if spec.owns_inputs else None  # freed when the run ends

    # --- what a run in flight shows (the current attempt's, mostly) ---------------------------
    @property
    def status(self) -> str:
        if self.current is None or (self.current.retrying and not self.done.is_set()):
            return "starting"  # between attempts
        return self.current.status

    @property
    def outputs(self) -> dict:
        return self.current.outputs

    def drop_outputs(self) -> None:
        """Free the outputs held in memory (they stay in the store's outputs file)."""
        if self.current is not None:
            self.current.outputs = {}

    @property
    def skipped(self) -> dict[str, str]:
        return self.current.skipped

    @property
    def error(self) -> LeptonError | None:
        return self.current.error

    @property
    def notes(self) -> list[str]:
        return self.current.notes

    @property
    def world_size(self) -> int:
        return self.current.world_size

    @property
    def nodes(self) -> list:
        return self.current.nodes

    @property
    def rank_pids(self) -> dict[int, int]:
        """The current attempt's rank processes (rank → pid), as they started."""
        return self.current.rank_pids

    @property
    def ended_at(self) -> float | None:
        return self.current.ended_at if self.done.is_set() else None

    @property
    def started_at(self) -> float | None:
        if self._first_started is not None:
            return self._first_started
        attempts = self.store.attempts(self.seq)
        return attempts[0]["started"] if attempts else None

    # --- control -----------------------------------------------------------------------------
    def start(self, links) -> None:
        """The first attempt, on nodes already acquired and checked."""
        self._arm_timer()
        self._begin(links)

    def start_queued(self, why: str) -> None:
        """Every node the pool may hold is busy: wait for nodes in the pool's queue (first come,
        first served), then start. The timeout counts from now; a cancel ends the wait."""
        self.current = self._attempt(links=[])  # not started: what the run shows while it waits
        self.current.status = "queued"
        self.store.add_event("queued", {"reason": why}, run=self.seq)
        log.info("%s queued: %s", self.name, why)
        self._arm_timer()
        threading.Thread(target=self._start_when_placed, name=f"lepton-queued-{self.name}", daemon=True).start()

    def _start_when_placed(self) -> None:
        links = self._placed(self.run_id, "")
        if links is None:
            return
        try:
            self._begin(links)
        except Exception as e:
            self.current.abort(e)

    def _still_wanted(self) -> bool:
        with self._lock:
            return self._cancel is None

    def _arm_timer(self) -> None:
        self._timer = arm_timeout(self.spec.timeout, self.cancel)

    def _begin(self, links) -> None:
        if self.spec.retries:
            self.pool.hold_spare(self.run_id, self.name)
        self._start_attempt(links)

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def cancel(self, reason: str = "cancelled by the user", failure: bool = False) -> None:
        with self._lock:
            if self.done.is_set() or self._cancel is not None:
                return
            self._cancel = (reason, failure)
            self._cancelled.set()
            current = self.current
        if current is None or current.done.is_set():
            return  # between attempts: the wait sees the cancel and ends the run instead
        if current.status != "queued":
            current.cancel(reason=reason, failure=failure)
        else:  # waiting for nodes, or starting: its nodes' preparation (a long install) stops now;
            # ranks that already have their jobs are cancelled once all have (see _start_attempt)
            current.stop_preparing(reason, failure)

    def abort(self, error: BaseException) -> None:
        if self.current is not None:
            self.current.abort(error)

    # --- attempts ----------------------------------------------------------------------------
    def _attempt(self, links) -> LiveRun:
        spec = self.spec
        return LiveRun(
            store=self.store, pool=self.pool, seq=self.seq, run_id=self.run_id, name=self.name, code=spec.code,
            line_offset=spec.line_offset, inputs=spec.inputs, outputs=spec.outputs,
            explicit_outputs=spec.explicit_outputs, nodes=links, gpus=spec.gpus, env=spec.env,
            on_done=spec.on_done, preload=spec.preload, attempt=self.attempt, trial=spec.trial, params=spec.params,
            plan=spec.plan,
            checkpoint=self.store.last_checkpoint(self.seq) if self.attempt else None,
            will_retry=self._will_retry, after_end=self._attempt_ended,
        )

    def _start_attempt(self, links) -> None:
        spec = self.spec
        live = self._attempt(links)
        with self._lock:
            self.current = live
            cancel = self._cancel
        if cancel is not None:  # it came while the nodes were acquired: this attempt never starts
            raise Stopped(*cancel)
        live.start()
        with self._lock:
            cancel = self._cancel
        if cancel is not None:  # it came while the attempt started (its nodes made ready, its jobs sent)
            live.cancel(reason=cancel[0], failure=cancel[1])
        if self._first_started is None:
            self._first_started = live.started_at
        if not spec.retries:
            spec.inputs = None  # no retry will need them: do not keep a copy of every input
        elif spec.inputs is not None and self.attempt == 0:
            spec.inputs.settle(self.pool.backend.shared_memory_dir(), self.run_id)

    def _will_retry(self, live: LiveRun) -> bool:
        """Asked by an attempt that failed, before it records the run's end."""
        with self._lock:
            return (self._cancel is None and self.attempt < self.spec.retries
                    and live.retryable(self.spec.retry_on_error))

    def _attempt_ended(self, live: LiveRun) -> None:
        if not live.retrying:
            if self._timer is not None:
                self._timer.cancel()
            self.pool.drop_spare(self.run_id)
            self._free_inputs()
            self.done.set()
            return
        with self._lock:
            self.attempt += 1
        log.info("%s: attempt %d ended (%s); retrying", self.name, live.attempt + 1, live.lost)
        self.store.add_event("retry", {"attempt": self.attempt, "reason": live.lost}, run=self.seq)
        threading.Thread(target=self._retry, name=f"lepton-retry-{self.name}", daemon=True).start()

    def _retry(self) -> None:
        self._cancelled.wait(BACKOFF_SECONDS[min(self.attempt - 1, len(BACKOFF_SECONDS) - 1)])
        holder = f"{self.run_id}.{self.attempt}"
        links = self._placed(holder, f" attempt {self.attempt + 1}")
        if links is None:
            return
        try:
            self._start_attempt(links)
        except Exception as e:
            if self.current.attempt == self.attempt:  # dispatch failed half-way: that attempt ends the run
                self.current.abort(e)
                return
            self.pool.release_run(holder)
            error = LeptonError(f"{self.name} could not start attempt {self.attempt + 1}: {e}")
            self._end_between_attempts("failed", str(error), error)

    def _placed(self, holder: str, what: str) -> list | None:
        """Nodes for the next attempt, taken for ``holder`` (waiting in the pool's queue while
        every node is busy) and checked. None when the run ended instead: cancelled meanwhile
        (a cancel ends the wait), or no healthy nodes to be had, saying why."""
        spec = self.spec
        try:
            if not self._still_wanted():
                raise LeptonError("cancelled")
            links = self.pool.acquire(spec.nodes, holder, wanted=self._still_wanted)
            try:
                compat.check(links, needs_torch=spec.preload, gpus=spec.gpus, local=spec.local)
            except LeptonError:
                self.pool.release_run(holder)
                raise
            return links
        except Exception as e:
            with self._lock:
                stop = self._cancel
            if stop is not None:
                reason, failure = stop
                self._end_between_attempts("failed" if failure else "cancelled", reason,
                                           LeptonError(f"{self.name} {reason}") if failure else None)
            else:
                error = LeptonError(f"{self.name} could not start{what}: {e}")
                self._end_between_attempts("failed", str(error), error)
            return None

    def _end_between_attempts(self, status: str, reason: str, error: LeptonError | None) -> None:
        """The run ends while no attempt runs (cancelled during the backoff, no nodes)."""
        live = self.current
        error = error or live.error
        self.store.update_run(self.seq, status=status, ended=time.time(), reason=reason,
                              error={"type": "LeptonError", "message": str(error)} if error else None)
        live.status, live.error, live.retrying = status, error, False  # after the store: see LiveRun._finish
        for callback in self.spec.on_done:
            try:
                callback(live)
            except Exception:
                log.exception("a run-end callback failed")
        if self._timer is not None:
            self._timer.cancel()
        self.pool.drop_spare(self.run_id)
        self._free_inputs()
        self.done.set()

    def _free_inputs(self) -> None:
        if self._inputs is not None:
            self._inputs.discard()
            self._inputs = None


def arm_timeout(seconds: float | None, cancel: Callable[..., None]) -> threading.Timer | None:
    """A run's (or a sweep's) timeout: cancel it as failed, saying after how long."""
    if not seconds:
        return None
    timer = threading.Timer(seconds, lambda: cancel(reason=f"timed out after {_seconds(seconds)}", failure=True))
    timer.daemon = True
    timer.start()
    return timer


def _seconds(value: float) -> str:
    if value >= 3600 and value % 3600 == 0:
        return f"{value / 3600:g} h"
    if value >= 60 and value % 60 == 0:
        return f"{value / 60:g} min"
    return f"{value:g} s"
