"""A compact text view of a running run: rank output as it arrives, a status line, and a
one-line summary at the end. Everything it shows comes from the store.

On a terminal the status line is redrawn in place (carriage return, then "erase to the end of the
line"). Anywhere else (a CI log, a pipe, ``python script.py > log``) nothing is redrawn, as tqdm
does off a terminal: one line when the run starts, a progress line every
``PLAIN_PROGRESS_SECONDS`` (30 s; the ``LEPTON_PROGRESS_INTERVAL`` environment variable sets it,
in seconds, when the module is imported), the rank output, and the summary, with no carriage
returns and no escape codes."""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from typing import TextIO

from ..run import Run
from ..store import TRACEBACK_STREAM

#: Redraws of the status line are at most this frequent.
MIN_REDRAW_SECONDS = 0.25
#: A run shorter than this gets only its summary, no status line.
QUIET_SECONDS = 1.0


def _seconds_from_env(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value >= 0 else default


#: Off a terminal, a progress line is printed at most this often.
PLAIN_PROGRESS_SECONDS = _seconds_from_env("LEPTON_PROGRESS_INTERVAL", 30.0)
#: Back to the start of the line and erase to its end: what a redraw leaves behind does not depend
#: on how many columns the old text took (⏳ takes two).
ERASE_LINE = "\r\x1b[K"

MARKS = {"succeeded": "✓", "failed": "✗", "cancelled": "■"}


class TextProgress:
    """Where no widget frontend is attached (notebooks get the panel, ui/panel.py). ``terminal``
    says whether ``out`` is a terminal; by default ``out.isatty()`` decides."""

    def __init__(self, run: Run, out: TextIO | None = None, show_logs: bool = True, status_line: bool = True,
                 terminal: bool | None = None):
        self.run = run
        self.out = out or sys.stdout
        self.show_logs = show_logs
        self.status_line = status_line
        self.terminal = _is_terminal(self.out) if terminal is None else terminal
        self._last_log = 0
        self._log_batches = 0  # (see _print_logs)
        self._drawn = False  # a status line is on screen (terminal only)
        self._last_draw = 0.0
        self._announced = False  # the start line is out (off a terminal only)
        self._t0 = time.monotonic()
        self._sweep = None  # a sweep's view (its trials), once known to be one
        self._told: set[int] = set()  # trials whose end was printed
        if run.is_sweep:
            from .sweep_panel import SweepView

            self._sweep = SweepView(run.store, run.seq)

    def tick(self) -> None:
        try:
            if not self.terminal:
                self._announce()
            self._print_logs()
            now = time.monotonic()
            if not self.status_line:
                return
            if self.terminal:
                if now - self._t0 > QUIET_SECONDS and now - self._last_draw >= MIN_REDRAW_SECONDS:
                    self._draw(self.status_text())
                    self._last_draw = now
            elif now - self._last_draw >= PLAIN_PROGRESS_SECONDS:
                print(self.status_text(), file=self.out, flush=True)
                self._last_draw = now
        except Exception as e:  # a display problem must never stop (or orphan) the run
            self.status_line = self.show_logs = False
            print(f"(progress display stopped: {type(e).__name__}: {e})", file=self.out)

    def finish(self) -> None:
        if not self.terminal:
            self._announce()
        self._print_logs()
        self._clear()
        print(self.summary_text(), file=self.out, flush=True)

    # --- text ------------------------------------------------------------------------------
    def status_text(self) -> str:
        run = self.run
        if self._sweep is not None:
            return f"⏳ {run.name} {run.status} · {self._trials_text()} · {time.monotonic() - self._t0:.1f} s"
        parts = [f"⏳ {run.name}", run.status]
        if run.world_size:
            parts.append(f"{run.world_size} rank{'s' if run.world_size != 1 else ''}")
        latest = run.store.latest_metrics(run.seq)
        if latest:
            step = max(s for s, _v in latest.values())
            parts.append(f"step {step}")
            for name, (_s, value) in sorted(latest.items())[:3]:
                parts.append(f"{name} {_number(value)}")
        parts.append(f"{time.monotonic() - self._t0:.1f} s")
        return " · ".join(parts)

    def start_text(self) -> str:
        world = self.run.world_size
        ranks = f" · {world} rank{'s' if world != 1 else ''}" if world else ""
        return f"⏳ {self.run.name} started{ranks}"

    def summary_text(self) -> str:
        run = self.run
        status, world, nodes, duration = run.status, run.world_size, run.node_count, run.duration
        took = f"{duration:.3g} s" if duration is not None else "-"
        if self._sweep is not None:
            text = f"{MARKS.get(status, '·')} {run.name} {status} in {took}: {self._trials_text()}"
        else:
            text = (f"{MARKS.get(status, '·')} {run.name} {status} in {took} on {nodes} "
                    f"node{'s' if nodes != 1 else ''} (world size {world})")
        if status == "succeeded":
            bound = sorted(run.outputs)
            if bound:
                text += " · bound: " + ", ".join(bound)
        for name, why in sorted(run.skipped.items()):
            text += f"\n  ! {name} was not returned: {why}"
        for note in run.notes:
            text += f"\n  · {note}"
        return text

    def _trials_text(self) -> str:
        """How a sweep's trials stand, and its best one."""
        view = self._sweep.refresh()
        counts: dict[str, int] = {}
        for t in view.trials.values():
            counts[t.status] = counts.get(t.status, 0) + 1
        text = f"{len(view.trials)} of {view.spec.get('trials', '?')} trials"
        if counts:
            text += " (" + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + ")"
        ranked = view.ranked()
        if ranked and ranked[0].status == "succeeded" and ranked[0].last is not None:
            way = "max" if view.maximize else "min"
            text += f" · best: trial {ranked[0].number} ({_params(ranked[0].params)}) {way} {view.metric} {_number(ranked[0].last)}"
        return text

    def _print_trial_ends(self) -> None:
        """A sweep's output: one line as each trial ends (its ranks' lines: run.trial(n).logs())."""
        view = self._sweep.refresh()
        lines = []
        for t in sorted(view.trials.values(), key=lambda t: t.number):
            if t.number in self._told or t.status not in ("succeeded", "failed", "cancelled", "pruned"):
                continue
            self._told.add(t.number)
            step = f" at step {t.pruned_step}" if t.status == "pruned" and t.pruned_step is not None else ""
            value = f": {view.metric} {_number(t.last)}" if t.values else ""
            lines.append(f"trial {t.number} ({_params(t.params)}) {t.status}{step}{value}")
        if lines:
            self._clear()
            print("\n".join(lines), file=self.out, flush=True)

    # --- drawing ---------------------------------------------------------------------------
    def _print_logs(self) -> None:
        if not self.show_logs:
            return
        if self._sweep is not None:
            self._print_trial_ends()
            return
        if self.run.is_live:  # its lines are stored by this process: read only when some came
            batches = self.run.store.log_batches(self.run.seq)
            if batches == self._log_batches:
                return
            self._log_batches = batches
        rows = self.run.store.logs_since(self.run.seq, self._last_log)
        if not rows:
            return
        self._clear()
        multi = (self.run.world_size or 1) > 1
        lines = []
        for log_id, rank, stream, line in rows:
            self._last_log = log_id
            if stream != TRACEBACK_STREAM:  # the error raised at the end shows it
                lines.append(f"[rank {rank}] {line}" if multi else line)
        if not lines:
            return
        print("\n".join(lines), file=self.out, flush=True)

    def _announce(self) -> None:
        if self.status_line and not self._announced:
            self._announced = True
            self._last_draw = time.monotonic()  # the next progress line is one interval away
            print(self.start_text(), file=self.out, flush=True)

    def _draw(self, text: str) -> None:
        # A line wider than the screen would wrap, and the erase only reaches its last row.
        columns = _columns(self.out)
        if columns:
            text = _fit(text, columns - 1)
        self.out.write(ERASE_LINE + text)
        self.out.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.out.write(ERASE_LINE)
            self.out.flush()
            self._drawn = False


def _is_terminal(out) -> bool:
    try:
        return bool(out.isatty())
    except Exception:  # no isatty, or a closed or detached stream
        return False


def _columns(out) -> int | None:
    try:
        return os.get_terminal_size(out.fileno()).columns or None
    except Exception:  # not a real file descriptor (a StringIO), or no size
        return None


def _width(char: str) -> int:
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _fit(text: str, columns: int) -> str:
    """``text`` cut to at most ``columns`` screen columns, with an ellipsis where it was cut."""
    if sum(_width(c) for c in text) <= columns:
        return text
    used, kept = 1, []  # the ellipsis takes one column
    for char in text:
        used += _width(char)
        if used > columns:
            break
        kept.append(char)
    return "".join(kept) + "…"


def _params(params: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _number(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4g}"  # SQLite keeps NaN as NULL

